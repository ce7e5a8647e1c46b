"""Each speed lever's predicted and measured effect, on one batch of the standard workload.

One CPPO step of the standard CPU workload (benchmarks/step_time.py) gives a batch with
I+ / I- image variants and mixed advantages; on it this script times, in one process (median
of `--repeats`):

- response-only logits: vispo's scoring (logits for the T response positions only, chunked
  log-softmax) against the naive route (logits for every position, full float32
  log_softmax, gather);
- the passes the trainer skips: one no-gradient forward (the old policy when the update is
  exactly on-policy; the reference when beta = 0);
- CPPO's gate: forward + backward of the I+ / I- views on the positive-advantage rows only,
  against all rows (the reference recipe);
- stacking two image variants into one forward call against one call per variant.

Predictions come from FLOP counts (output layer vs decoder per token) and row counts.
Writes benchmarks/results/levers.md; the reasoning is in benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from step_time import RESULTS, trainer_for  # benchmarks/ is on sys.path when run as a script

from vispo.models.scoring import score


def timed(fn, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def naive_logp(model, batch) -> torch.Tensor:
    """Logits at every position, float32 log_softmax over the vocabulary, gather."""
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits.float()
    Lp = batch.prompt_length
    logp = torch.log_softmax(logits[:, Lp - 1 : -1], dim=-1)
    return logp.gather(-1, batch.response_ids[..., None]).squeeze(-1) * batch.response_mask


def output_layer_share(model) -> float:
    """FLOPs of the output layer / FLOPs of the language model, per token (2 x weights)."""
    lm = sum(p.numel() for n, p in model.named_parameters() if "lm_head" in n)
    text = sum(
        p.numel()
        for n, p in model.named_parameters()
        if "visual" not in n and "embed_tokens" not in n
    )
    return lm / text


def backward_of(*scores) -> None:
    sum(s.logp.sum() for s in scores).backward()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        trainer = trainer_for("cppo", Path(out), args.seed)
        trainer.step()
    step, model = trainer._last_step, trainer.model
    batch, variants = step.batch, step.variants
    rows = torch.nonzero(step.advantages > 0).squeeze(-1)
    B, T = batch.response_mask.shape
    Lp = batch.prompt_length
    share = output_layer_share(model)
    torch.testing.assert_close(
        score(model, batch)[0].logp, naive_logp(model, batch), atol=1e-4, rtol=0
    )

    def views(select):
        def run():
            out = score(
                model,
                batch.select(select),
                [variants["pos"], variants["neg"]],
                grad=True,
                entropy=[False, True],
            )
            backward_of(*out)
            model.zero_grad(set_to_none=True)

        return run

    t_naive = timed(lambda: naive_logp(model, batch), args.repeats)
    t_resp = timed(lambda: score(model, batch), args.repeats)
    t_f = t_resp
    t_all = timed(views(torch.arange(B)), args.repeats)
    t_pos = timed(views(rows), args.repeats)
    pair = [variants["pos"], variants["neg"]]
    t_stack = timed(lambda: score(model, batch, pair, stack=True), args.repeats)
    t_apart = timed(lambda: score(model, batch, pair, stack=False), args.repeats)

    # Predicted: the output layer runs on T of Lp + T positions; the float32 [B, Lp+T, V]
    # log-softmax copy disappears (its cost is not in the FLOP count, so this is a floor).
    pred_resp = 1 - share * (1 - T / (Lp + T))
    V = model.lm_head.weight.shape[0]
    mem_naive = B * (Lp + T) * V * 4 / 2**30
    mem_resp = B * (T + 1) * V * 4 / 2**30
    lines = [
        "# Speed levers: predicted and measured (standard CPU workload, one CPPO batch)",
        "",
        f"{args.threads} threads, {platform.machine()}, torch {torch.__version__}; batch "
        f"{B} sequences, prompt {Lp} tokens (4 image tokens), response {T} tokens, vocabulary "
        f"{V}; median of {args.repeats} runs each, all in one process. The output layer is "
        f"{share:.0%} of the language model's per-token FLOPs.",
        "",
        "| lever | without s | with s | measured with/without | predicted with/without |",
        "|---|---|---|---|---|",
        f"| logits at response positions only (no-grad scoring pass) | {t_naive:.2f} | "
        f"{t_resp:.2f} | {t_resp / t_naive:.2f} | <= {pred_resp:.2f} (FLOPs; float32 logits "
        f"{mem_naive:.2f} -> {mem_resp:.2f} GiB) |",
        f"| skip the old-policy pass when exactly on-policy | {t_f:.2f} | 0 | 0 (saves "
        f"{t_f:.2f} s per step) | saves one no-grad forward |",
        f"| skip the reference pass at beta = 0 | {t_f:.2f} | 0 | 0 (saves {t_f:.2f} s per "
        "step) | saves one no-grad forward |",
        f"| CPPO views only for positive-advantage rows ({len(rows)}/{B}) | {t_all:.2f} | "
        f"{t_pos:.2f} | {t_pos / t_all:.2f} | {len(rows) / B:.2f} (row fraction) |",
        f"| stack two image variants into one forward (no grad) | {t_apart:.2f} | "
        f"{t_stack:.2f} | {t_stack / t_apart:.2f} | ~1 (same FLOPs, fewer calls) |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "levers.md").write_text(text)


if __name__ == "__main__":
    main()
