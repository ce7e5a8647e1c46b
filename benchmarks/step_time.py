"""Step time per objective on the standard CPU workload, split into phases, against its floor.

The standard workload (issue 7): a randomly initialised Qwen2.5-VL-architecture model of about
30M parameters in float32 (text hidden 384, 6 layers, 6 heads with 2 key/value heads,
intermediate 1024; vision depth 4, hidden 256, intermediate 1024, patch 14, merge 2; untied
output layer; vocabulary 19,008), easy-vqa images resized to 56x56 (4 image tokens), the
"short" prompt, 16 prompts x 5 rollouts per step, exactly 64 new tokens, temperature 1.0,
lr 1e-6, and a seeded Bernoulli(0.5) reward per completion, so every objective does its full
work.

The floor of an objective is what it must compute at least, from costs measured in the same
process on the same batch: the rollout and reward phases as measured, plus
- ``F``: one no-gradient forward over the batch (reference model, PAPO's detached masked
  branch), and
- ``U``: one forward + backward over the batch (the update; CPPO adds one over its I+ and I-
  views of the positive-advantage sequences, measured on exactly those rows),
each with the full-vocabulary entropies the objective needs (CPPO's token selection).

    python benchmarks/step_time.py                  # all presets, 3 measured steps each
    python benchmarks/step_time.py --presets grpo,papo_g --steps 2 --no-scaling
    python benchmarks/step_time.py --workload gpu --presets grpo,cppo --steps 2 --no-scaling

The GPU variant (``--workload gpu``, results in step_time_gpu.md): a ~0.7B-parameter model with
Qwen2.5-0.5B's language-model shape (hidden 896, 24 layers, 14 heads with 2 key/value heads,
intermediate 4864, vocabulary 151,936) and a vision tower of depth 8 (hidden 640), images
upscaled to 224x224 (64 image tokens), exactly 512 new tokens, bf16 autocast, micro-batches of
20 sequences; peak memory is the GPU's peak allocated memory.

Each configuration runs in its own process (its peak RSS is reported); GRPO is also run with
twice the prompts per step and twice the response length (the scaling exponents).

Writes benchmarks/results/step_time.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vispo.models.scoring import score
from vispo.models.tiny import build_tiny_vlm
from vispo.rewards import RewardRunner
from vispo.train.config import load_config
from vispo.train.trainer import Trainer

RESULTS = Path(__file__).resolve().parent / "results"
PHASES = ("time/rollout", "time/reward", "time/score", "time/update", "time/step")


#: The model of each workload: ``cpu`` is issue 7's standard workload (~30M parameters);
#: ``gpu`` a ~0.7B-parameter model with Qwen2.5's 0.5B language-model shape and vocabulary.
MODELS = {
    "cpu": dict(
        hidden_size=384,
        num_layers=6,
        num_heads=6,
        num_kv_heads=2,
        intermediate_size=1024,
        vision_depth=4,
        vision_hidden_size=256,
        vision_heads=4,
        vision_intermediate_size=1024,
        vocab_size=19008,
        min_pixels=56 * 56,
        max_pixels=56 * 56,
    ),
    "gpu": dict(
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        intermediate_size=4864,
        vision_depth=8,
        vision_hidden_size=640,
        vision_heads=10,
        vision_intermediate_size=2560,
        vocab_size=151936,
        min_pixels=224 * 224,  # easy-vqa's 64x64 images upscaled: 64 image tokens
        max_pixels=224 * 224,
    ),
}

#: Config overrides of each workload beyond the shared ones in :func:`workload_overrides`.
WORKLOAD_OVERRIDES = {
    "cpu": ["rollout.max_new_tokens=64", "rollout.min_new_tokens=64", "train.device=cpu"],
    "gpu": [
        "rollout.max_new_tokens=512",
        "rollout.min_new_tokens=512",
        "train.device=cuda",
        "train.autocast=bf16",
        "train.micro_batch_size=20",
    ],
}


def standard_model(seed: int = 0, quick: bool = False, workload: str = "cpu"):
    if quick:  # smoke-test size
        return build_tiny_vlm("qwen2_5_vl", seed=seed, min_pixels=56 * 56, max_pixels=56 * 56)
    return build_tiny_vlm(
        "qwen2_5_vl",
        seed=seed,
        patch_size=14,
        merge_size=2,
        tie_word_embeddings=False,
        **MODELS[workload],
    )


class BernoulliReward:
    """Seeded Bernoulli(0.5) per completion, as a batch reward function."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def __call__(self, completions, answers, **columns):
        return [float(x) for x in self.rng.integers(0, 2, len(completions))]


def workload_overrides(
    preset: str, out: Path, seed: int, steps: int = 1000, workload: str = "cpu"
) -> list[str]:
    """A workload as config overrides (the one definition; peer_trl.py uses the cpu one)."""
    return WORKLOAD_OVERRIDES[workload] + [
        f"objective.name={preset}",
        "data.name=easy-vqa",
        "data.template=short",
        "data.eval_size=0",
        "data.limit=2000",
        "train.prompts_per_step=16",
        "rollout.n=5",
        "rollout.temperature=1.0",
        "optim.lr=1e-6",
        f"train.out_dir={out}",
        "logging.progress=false",
        "train.samples_every=0",
        "train.save_every=0",
        f"train.seed={seed}",
        f"train.steps={steps}",
    ]


def trainer_for(
    preset: str,
    out: Path,
    seed: int,
    extra: tuple[str, ...] | list[str] = (),
    workload: str = "cpu",
) -> Trainer:
    overrides = workload_overrides(preset, out, seed, workload=workload) + list(extra)
    cfg = load_config(None, overrides)
    model, processor = standard_model(seed, quick=QUICK[0] in extra, workload=workload)
    return Trainer(
        cfg,
        model=model,
        processor=processor,
        reward_fn=RewardRunner(BernoulliReward(seed), num_workers=0),
    )


def pass_costs(trainer: Trainer) -> dict[str, float]:
    """The passes an objective needs, each timed alone over the last step's batch: ``F`` (a
    no-gradient forward: the reference model), ``F_mask`` (PAPO's detached masked branch),
    ``U`` (the update's forward + backward on the original image) and ``U_views`` (CPPO's I+
    and I- forward + backward over the positive-advantage rows). Each computes the
    full-vocabulary entropies its objective needs (CPPO's token selection, PAPO's "full"
    estimator)."""
    step, model, req = trainer._last_step, trainer.train_model, trainer.req
    batch, micro = step.batch, trainer.cfg.micro_batch
    kw = dict(autocast=trainer.autocast)  # the same precision and micro-batches as training

    def timed(fn) -> float:
        trainer.dist.synchronize()
        t0 = time.perf_counter()
        fn()
        trainer.dist.synchronize()
        elapsed = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        return elapsed

    def forward(variant, entropy: bool):
        score(model, batch, [variant], entropy=entropy, micro_batch_size=micro, **kw)

    def forward_backward(rows, variants, entropy):
        for idx in rows.split(micro):
            scores = score(model, batch.select(idx), variants, grad=True, entropy=entropy, **kw)
            sum(s.logp.sum() for s in scores).backward()

    out = {
        "F": timed(lambda: forward(None, False)),
        "U": timed(
            lambda: forward_backward(torch.arange(len(batch)), [None], "orig" in req.entropy)
        ),
    }
    if "mask" in step.variants:
        out["F_mask"] = timed(lambda: forward(step.variants["mask"], "mask" in req.entropy))
    if "pos" in step.variants:
        rows = torch.nonzero(step.advantages > 0).squeeze(-1)
        views = [step.variants["pos"], step.variants["neg"]]
        entropy = [False, "neg" in req.entropy]
        out["U_views"] = timed(lambda: forward_backward(rows, views, entropy))
    return out


def floor(m: dict[str, float], costs: dict[str, float], cfg) -> float:
    """The least an objective computes: rollout + reward as measured, plus its passes."""
    total = m["time/rollout"] + m["time/reward"] + costs["U"]
    if cfg.objective.beta > 0:
        total += costs["F"]  # reference model
    if cfg.objective.uses_papo and not cfg.objective.masked_grad:
        total += costs["F_mask"]  # detached masked branch
    if cfg.objective.uses_cppo:
        total += costs["U_views"]
    return total


def measure(
    preset: str,
    steps: int,
    seed: int,
    out: Path,
    extra: list[str],
    workload: str = "cpu",
    with_floor: bool = True,
) -> dict:
    """One configuration in this process: a warm-up step, then `steps` measured steps; the
    floor's passes are timed once, on the last step's batch."""
    trainer = trainer_for(preset, out, seed, extra, workload)
    trainer.step()  # warm-up
    records = [trainer.step() for _ in range(steps)]
    med = {k: statistics.median(r[k] for r in records) for k in PHASES}
    med["floor"] = floor(med, pass_costs(trainer), trainer.cfg) if with_floor else math.nan
    med["rounds"] = statistics.median(r["dynamic_sampling/rounds"] for r in records)
    med["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if trainer.dist.device.type == "cuda":
        med["peak_gpu_gib"] = torch.cuda.max_memory_allocated(trainer.dist.device) / 2**30
    return med


def run_child(
    preset: str, args, extra: list[str], with_floor: bool = True, steps: int | None = None
) -> dict:
    """Measure one configuration in a fresh process, so its peak memory is its own."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            __file__,
            "--child",
            preset,
            "--steps",
            str(steps or args.steps),
            "--threads",
            str(args.threads),
            "--seed",
            str(args.seed),
            "--workload",
            args.workload,
            "--result",
            str(result),
            *([] if with_floor else ["--no-floor"]),
            "--",
            *extra,
        ]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        subprocess.run(cmd, check=True, env=env)
        return json.loads(result.read_text())


def exponent(t1: float, t2: float) -> float:
    """Step time grows as size**e when the size doubles from t1 to t2: e = log2(t2 / t1)."""
    return math.log2(t2 / t1)


def report(rows: dict, scaling: dict, args) -> str:
    base = rows.get("grpo")
    gpu = args.workload == "gpu"
    on_gpu = all("peak_gpu_gib" in r for r in rows.values())  # not so in a CPU smoke test
    mem_key = "peak_gpu_gib" if on_gpu else "peak_rss_gib"
    mem_name = "peak GPU allocated GiB" if on_gpu else "peak RSS GiB"
    if gpu:
        where = (
            f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}, "
            f"torch {torch.__version__}, bf16 autocast; a ~0.7B-parameter Qwen2.5-VL-architecture "
            "model (Qwen2.5-0.5B language-model shape, 151,936-token vocabulary, vision depth 8), "
            "64 image tokens, 16 prompts x 5 rollouts x 512 tokens, micro-batches of 20"
        )
    else:
        where = f"{args.threads} threads, {platform.machine()}, torch {torch.__version__}"
    lines = [
        f"# Step time and peak memory per objective ({'GPU' if gpu else 'standard CPU'} workload)",
        "",
        f"{where}; median of {args.steps} steps after a warm-up step; each configuration in its "
        f"own process, one after another (peak memory is that process's maximum).",
        "",
        "| preset | rollout s | reward s | score s | update s | step s | x GRPO | floor s | "
        f"measured / floor | {mem_name} | memory x GRPO | DAPO rounds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for preset, r in rows.items():
        ratio = f"{r['time/step'] / base['time/step']:.2f}" if base else "-"
        mem = f"{r[mem_key] / base[mem_key]:.2f}" if base else "-"
        lines.append(
            f"| {preset} | {r['time/rollout']:.2f} | {r['time/reward']:.3f} | "
            f"{r['time/score']:.2f} | {r['time/update']:.2f} | {r['time/step']:.2f} | {ratio} | "
            f"{r['floor']:.2f} | {r['time/step'] / r['floor']:.2f} | {r[mem_key]:.2f} | "
            f"{mem} | {r['rounds']:.0f} |"
        )
    lines += [
        "",
        "The floor: rollout and reward as measured, plus the passes the objective needs, each "
        "timed on the same batch in the same process (see the script's docstring).",
    ]
    if base and "cppo" in rows:
        lines += [
            "",
            f"CPPO / GRPO step time: {rows['cppo']['time/step'] / base['time/step']:.2f} "
            "(the CPPO paper reports 1.39 on GPUs; its recipe runs the I+ and I- passes on "
            "every sequence, vispo only on those with positive advantage).",
        ]
    if scaling:
        lines += [
            "",
            "## Scaling (GRPO)",
            "",
            "Step time when one size doubles, everything else standard (median of "
            f"{args.scaling_steps} steps after a warm-up step); exponent e with time ~ size**e "
            "(1 = linear).",
            "",
            "| change | step s | x standard | exponent | rollout exponent | update exponent |",
            "|---|---|---|---|---|---|",
        ]
        ref = rows["grpo"]
        for label, r in scaling.items():
            lines.append(
                f"| {label} | {r['time/step']:.2f} | {r['time/step'] / ref['time/step']:.2f} | "
                f"{exponent(ref['time/step'], r['time/step']):.2f} | "
                f"{exponent(ref['time/rollout'], r['time/rollout']):.2f} | "
                f"{exponent(ref['time/update'], r['time/update']):.2f} |"
            )
    return "\n".join(lines) + "\n"


#: ``--quick``: a tiny model and batch, to check the script end to end in a minute.
QUICK = [
    "train.prompts_per_step=4",
    "rollout.n=2",
    "rollout.max_new_tokens=8",
    "rollout.min_new_tokens=8",
    "train.micro_batch_size=8",  # all 8 sequences (the gpu workload sets 20)
]

SCALING = {
    "cpu": {
        "prompts per step 16 -> 32": ["train.prompts_per_step=32"],
        "response length 64 -> 128": ["rollout.max_new_tokens=128", "rollout.min_new_tokens=128"],
    },
    "gpu": {
        "prompts per step 16 -> 32": ["train.prompts_per_step=32"],
        "response length 512 -> 1024": [
            "rollout.max_new_tokens=1024",
            "rollout.min_new_tokens=1024",
        ],
    },
}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--workload",
        choices=("cpu", "gpu"),
        default="cpu",
        help="cpu: issue 7's standard workload; gpu: the larger GPU variant (results in "
        "step_time_gpu.md)",
    )
    p.add_argument(
        "--presets", default="grpo,dapo,papo_g,papo_d,cppo,gspo,sapo,cispo,vppo,noisyrollout"
    )
    p.add_argument(
        "--steps", type=int, default=3, help="measured steps per preset (after 1 warm-up)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-scaling", action="store_true", help="skip the GRPO scaling runs")
    p.add_argument("--scaling-steps", type=int, default=2, help="measured steps per scaling run")
    p.add_argument(
        "--quick", action="store_true", help="smoke test: tiny model and batch, nothing written"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra config override for every run (e.g. train.device=cpu for a CPU smoke "
        "test of the gpu workload)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--no-floor", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        with tempfile.TemporaryDirectory() as out:
            med = measure(
                args.child,
                args.steps,
                args.seed,
                Path(out),
                args.extra,
                args.workload,
                with_floor=not args.no_floor,
            )
        Path(args.result).write_text(json.dumps(med))
        return

    base = (QUICK if args.quick else []) + args.set
    rows, scaling = {}, {}
    for preset in args.presets.split(","):
        rows[preset] = run_child(preset, args, base)
        print(preset, {k: round(v, 2) for k, v in rows[preset].items()}, flush=True)
    if not args.no_scaling and "grpo" in rows:
        for label, extra in SCALING[args.workload].items():
            scaling[label] = run_child(
                "grpo", args, base + extra, with_floor=False, steps=args.scaling_steps
            )
            print(label, {k: round(v, 2) for k, v in scaling[label].items()}, flush=True)
    text = report(rows, scaling, args)
    print(text)
    if args.quick:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "step_time_gpu.md" if args.workload == "gpu" else "step_time.md"
    (RESULTS / name).write_text(text)


if __name__ == "__main__":
    main()
