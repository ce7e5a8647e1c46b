"""Peak memory and time of vispo's chunked log-probs/entropy against the naive float32 route.

Each route runs in a fresh subprocess on the same seeded bfloat16 logits (default shape
4 x 2048 x 151936, Qwen's vocabulary). Memory is the process's peak resident set size above its
resident size once the logits exist (``extra``), and the whole-process peak (``peak``). The
naive route is ``log_softmax(logits.float()).gather(...)`` and, for entropy,
``-(p * log p).sum(-1)`` on the float32 copy. Agreement is checked against the naive float32
result.

    python benchmarks/chunked_logprobs.py                 # full size (needs ~16 GB RAM)
    python benchmarks/chunked_logprobs.py --seq 256       # quick

Writes benchmarks/results/chunked_logprobs.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(route: str, what: str, batch: int, seq: int, vocab: int, out: str) -> None:
    """Run one route once and write {'extra', 'peak', 'seconds'} to ``out``; values to out.pt."""
    import torch

    from vispo.algos import entropy_from_logits, selective_log_softmax

    torch.manual_seed(0)
    logits = torch.empty(batch, seq, vocab, dtype=torch.bfloat16)
    for row in logits.view(-1, vocab).split(256):
        row.normal_(0.0, 3.0)
    ids = torch.randint(0, vocab, (batch, seq))
    base = _rss_bytes()
    # ru_maxrss cannot be reset; the logits were the peak so far (written in place).
    t0 = time.perf_counter()
    if route == "naive":
        lp = torch.log_softmax(logits.float(), dim=-1)
        if what == "logp":
            res = lp.gather(-1, ids[..., None]).squeeze(-1)
        else:
            res = -(lp.exp() * lp).sum(-1)
        del lp
    else:
        res = selective_log_softmax(logits, ids) if what == "logp" else entropy_from_logits(logits)
    seconds = time.perf_counter() - t0
    peak = _peak_rss_bytes()
    # Every 32nd row of logits travels back so the parent can compute a float64 ground truth.
    torch.save(
        {"res": res, "rows": logits.view(-1, vocab)[::32].clone(), "ids": ids.view(-1)[::32]},
        out + ".pt",
    )
    Path(out).write_text(json.dumps({"extra": peak - base, "peak": peak, "seconds": seconds}))


def _float64_truth(what, rows, ids):
    import torch

    lp = torch.log_softmax(rows.double(), dim=-1)
    if what == "logp":
        return lp.gather(-1, ids[:, None]).squeeze(-1)
    return -(lp.exp() * lp).sum(-1)


def run_route(route, what, args, tmp):
    out = os.path.join(tmp, f"{route}-{what}.json")
    cmd = [
        sys.executable,
        __file__,
        "--child",
        route,
        what,
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--vocab",
        str(args.vocab),
        "--out",
        out,
    ]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    return json.loads(Path(out).read_text()), out + ".pt"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", nargs=2, metavar=("ROUTE", "WHAT"))
    p.add_argument("--out")
    args = p.parse_args()
    if args.child:
        child(*args.child, args.batch, args.seq, args.vocab, args.out)
        return

    import torch

    gib = 1024**3
    rows, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        for what in ("logp", "entropy"):
            naive, naive_pt = run_route("naive", what, args, tmp)
            chunked, chunked_pt = run_route("chunked", what, args, tmp)
            n_out, c_out = torch.load(naive_pt), torch.load(chunked_pt)
            truth = _float64_truth(what, c_out["rows"], c_out["ids"])
            err = (c_out["res"].reshape(-1)[::32].double() - truth).abs().max().item()
            naive_err = (n_out["res"].reshape(-1)[::32].double() - truth).abs().max().item()
            diff = (n_out["res"] - c_out["res"]).abs().max().item()
            ratio_extra = chunked["extra"] / naive["extra"]
            ratio_peak = chunked["peak"] / naive["peak"]
            ok &= ratio_peak <= 0.25 and err <= 1e-5
            rows.append((what, naive, chunked, ratio_extra, ratio_peak, err, naive_err, diff))

    shape = f"{args.batch} x {args.seq} x {args.vocab} bfloat16"
    lines = [
        "# Chunked log-probs and entropy vs naive float32",
        "",
        f"Logits {shape}; {args.threads} threads; {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}. `extra` = peak RSS above the RSS with the logits allocated; "
        "`peak` = whole-process peak RSS (logits included). Times are CPU wall-clock, one run each: "
        "compare within a row only.",
        "",
        "| quantity | naive extra GiB | chunked extra GiB | extra ratio | naive peak GiB | "
        "chunked peak GiB | peak ratio | naive s | chunked s | chunked err | naive err | "
        "chunked vs naive |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for what, n, c, rx, rp, err, naive_err, diff in rows:
        lines.append(
            f"| {what} | {n['extra'] / gib:.2f} | {c['extra'] / gib:.2f} | {rx:.3f} | "
            f"{n['peak'] / gib:.2f} | {c['peak'] / gib:.2f} | {rp:.3f} | {n['seconds']:.1f} | "
            f"{c['seconds']:.1f} | {err:.1e} | {naive_err:.1e} | {diff:.1e} |"
        )
    lines += [
        "",
        "`err` columns: max abs difference from a float64 computation on every 32nd row; "
        "`chunked vs naive`: max abs difference between the two float32 routes on all rows (the "
        "naive float32 log_softmax over a 152k vocabulary is itself the less accurate of the two).",
        "",
        f"Target (peak ratio <= 0.25, chunked err <= 1e-5): {'met' if ok else 'NOT met'}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if (args.seq, args.vocab, args.batch) == (2048, 151936, 4):  # only the reference size is kept
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "chunked_logprobs.md").write_text(text)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
