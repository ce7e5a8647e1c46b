"""Step time per objective on the CPU workloads, split into phases, against a FLOP floor.

The standard workload (issue 7): a randomly initialised Qwen2.5-VL-architecture model of about
30M parameters in float32 (text hidden 384, 6 layers, 6 heads with 2 key/value heads,
intermediate 1024; vision depth 4, hidden 256, intermediate 1024, patch 14, merge 2; untied
output layer; vocabulary 19,008), easy-vqa images resized to 56x56 (4 image tokens), the
"short" prompt, 16 prompts x 5 rollouts per step, exactly 64 new tokens, temperature 1.0,
lr 1e-6, and a seeded Bernoulli(0.5) reward per completion, so every objective does its full
work.

The vision-heavy CPU workload (issue 18, ``--workload vision-heavy``, results in
step_time_vision.md): the same model, easy-vqa images upscaled to 448x448 (256 image tokens
after merging), 8 prompts x 8 rollouts per step, the same 64-token responses, reward and
optimizer; GRPO also runs with ``train.shared_prefix=off``, for the effect of computing each
prompt once per group.

The floor (benchmarks/flops.py) does not measure vispo: it counts the matmul FLOPs each phase
must do for the tokens it must process (the prompt and image once per group; see that module's
docstring for exactly what is counted) and divides by this machine's dense float32 matmul
throughput, measured in the same process at the same thread count. Per phase the table gives
the achieved fraction of that throughput (floor FLOPs / phase time / matmul FLOP/s).

    python benchmarks/step_time.py                  # all presets, 3 measured steps each
    python benchmarks/step_time.py --workload vision-heavy --steps 1   # issue 18's workload
    python benchmarks/step_time.py --presets grpo,papo_g --steps 2 --no-scaling
    python benchmarks/step_time.py --workload gpu --presets grpo,cppo --steps 2 --no-scaling

The GPU variant (``--workload gpu``, results in step_time_gpu.md): a ~0.7B-parameter model with
Qwen2.5-0.5B's language-model shape (hidden 896, 24 layers, 14 heads with 2 key/value heads,
intermediate 4864, vocabulary 151,936) and a vision tower of depth 8 (hidden 640), images
upscaled to 224x224 (64 image tokens), exactly 512 new tokens, bf16 autocast, micro-batches of
20 sequences; peak memory is the GPU's peak allocated memory.

Each configuration runs in its own process (its peak RSS is reported); GRPO is also run with
twice the prompts per step and twice the response length (the scaling exponents).

Writes benchmarks/results/step_time.md (step_time_vision.md, step_time_gpu.md).
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
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, also when imported
from flops import Shapes, matmul_shapes, matmul_throughput, phase_flops  # noqa: E402

from vispo.models.tiny import build_tiny_vlm  # noqa: E402
from vispo.rewards import RewardRunner  # noqa: E402
from vispo.train.config import load_config  # noqa: E402
from vispo.train.trainer import Trainer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PHASES = ("time/rollout", "time/reward", "time/score", "time/update", "time/step")
FLOOR_PHASES = ("rollout", "score", "update")


def pixels_for(image_tokens: int) -> int:
    """The pixel budget (min = max) that gives exactly `image_tokens` per square image after
    merging (patch 14, merge 2: one merged token per 28x28 pixels)."""
    side = math.isqrt(image_tokens) * 28
    assert side * side == image_tokens * 28 * 28, "a square number of image tokens"
    return side * side


def machine() -> str:
    """The machine a results file was measured on, and whether a GPU was available."""
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    names = [ln for ln in lines if "model name" in ln]
    cpu = names[0].split(":", 1)[1].strip() if names else cpu
    gpu = (
        f"GPU: {torch.cuda.get_device_name()}"
        if torch.cuda.is_available()
        else "no GPU was available for this run"
    )
    return f"{cpu}, {os.cpu_count()} cores visible, {platform.platform()}; {gpu}"


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
#: Issue 18's vision-heavy workload: the standard model, images upscaled to 256 image tokens.
MODELS["vision-heavy"] = dict(MODELS["cpu"], min_pixels=pixels_for(256), max_pixels=pixels_for(256))
#: Prompts per step and rollouts per prompt of each workload.
BATCH = {"cpu": (16, 5), "gpu": (16, 5), "vision-heavy": (8, 8)}

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
WORKLOAD_OVERRIDES["vision-heavy"] = WORKLOAD_OVERRIDES["cpu"]


def standard_model(seed: int = 0, quick: bool = False, workload: str = "cpu"):
    if quick:  # smoke-test size, the workload's images
        pixels = MODELS[workload]["max_pixels"] if workload == "vision-heavy" else 56 * 56
        return build_tiny_vlm("qwen2_5_vl", seed=seed, min_pixels=pixels, max_pixels=pixels)
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
    """A workload as config overrides (the one definition; peer_trl.py uses it too)."""
    prompts, n = BATCH[workload]
    return WORKLOAD_OVERRIDES[workload] + [
        f"objective.name={preset}",
        "data.name=easy-vqa",
        "data.template=short",
        "data.eval_size=0",
        "data.limit=2000",
        f"train.prompts_per_step={prompts}",
        f"rollout.n={n}",
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


def floor_flops(trainer: Trainer) -> dict[str, float]:
    """The floor FLOPs of the last step's phases (benchmarks/flops.py)."""
    return phase_flops(model_shapes(trainer), trainer._last_step, trainer.cfg, trainer.req)


def model_shapes(trainer: Trainer) -> Shapes:
    model = trainer.model  # unwrapped; a PEFT model's base holds the shapes
    return Shapes.of(model.get_base_model() if hasattr(model, "get_base_model") else model)


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
    floor's FLOPs are counted on the last step's batch, and the matmul throughput is measured
    before and after the steps (the higher of the two: a contended moment lowers it; peak
    memory is read before the second probe)."""
    trainer = trainer_for(preset, out, seed, extra, workload)
    shapes = model_shapes(trainer)
    with_floor = with_floor and trainer.dist.device.type == "cpu"
    before = matmul_throughput(matmul_shapes(shapes))["peak"] if with_floor else 0.0
    trainer.step()  # warm-up
    records = [trainer.step() for _ in range(steps)]
    med = {k: statistics.median(r[k] for r in records) for k in PHASES}
    med["rounds"] = statistics.median(r["dynamic_sampling/rounds"] for r in records)
    med["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if trainer.dist.device.type == "cuda":
        med["peak_gpu_gib"] = torch.cuda.max_memory_allocated(trainer.dist.device) / 2**30
    if with_floor:
        for phase, flops in floor_flops(trainer).items():
            med[f"flops/{phase}"] = flops
        med["matmul_flops"] = max(before, matmul_throughput(matmul_shapes(shapes))["peak"])
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


def fraction(r: dict, phase: str) -> float:
    """The achieved fraction of the matmul throughput in one phase (nan without a floor)."""
    if "matmul_flops" not in r:
        return math.nan
    return r[f"flops/{phase}"] / (r[f"time/{phase}"] * r["matmul_flops"])


def floor_seconds(r: dict) -> float:
    """The step's floor FLOPs at the measured matmul throughput."""
    if "matmul_flops" not in r:
        return math.nan
    return sum(r[f"flops/{p}"] for p in FLOOR_PHASES) / r["matmul_flops"]


def pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.0f}%"


PREFIX_OFF = "grpo, shared prefix off"
TITLES = {"cpu": "standard CPU", "vision-heavy": "vision-heavy CPU", "gpu": "GPU"}


def targets(rows: dict, workload: str) -> list[str]:
    """The issue's targets that this table measures, each with its measured value."""
    base, lines = rows.get("grpo"), []
    if not base:
        return lines

    def step_ratio(name: str, target: str) -> None:
        if name in rows:
            value = rows[name]["time/step"] / base["time/step"]
            lines.append(f"- {name} / GRPO step time: {value:.2f} (target {target})")

    if workload == "vision-heavy":
        step_ratio("papo_g", "<= 1.15")
        step_ratio("cppo", "<= 1.35")
        if PREFIX_OFF in rows:
            off = rows[PREFIX_OFF]
            on_s = base["time/score"] + base["time/update"]
            off_s = off["time/score"] + off["time/update"]
            lines.append(
                f"- score + update, shared prefix on / off: {on_s:.2f} / {off_s:.2f} s = "
                f"{on_s / off_s:.2f} (target <= 0.3); rollout on / off "
                f"{base['time/rollout'] / off['time/rollout']:.2f}; step on / off "
                f"{base['time/step'] / off['time/step']:.2f}"
            )
    else:
        step_ratio("cppo", "none; the CPPO paper reports 1.39 on GPUs")
    if not math.isnan(fraction(base, "update")):
        lines.append(
            f"- GRPO update phase: {pct(fraction(base, 'update'))} of the matmul throughput"
            + (" (target >= 40%)" if workload == "cpu" else "")
        )
    return lines


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
        prompts, n = BATCH[args.workload]
        image = round(MODELS[args.workload]["max_pixels"] / 28**2)
        where = (
            f"{args.threads} threads, torch {torch.__version__}; {image} image tokens per "
            f"prompt, {prompts} prompts x {n} rollouts x 64 tokens"
        )
    if getattr(args, "quick", False):
        where = f"{args.threads} threads; QUICK smoke run (tiny model, 4 prompts x 2 x 8 tokens)"
    peaks = [r["matmul_flops"] for r in rows.values() if "matmul_flops" in r]
    lines = [
        f"# Step time and peak memory per objective ({TITLES[args.workload]} workload)",
        "",
        f"Machine: {machine()}.",
        "",
        f"{where}; median of {args.steps} step(s) after a warm-up step; each configuration in "
        "its own process, one after another (peak memory is that process's maximum).",
        "",
        "| preset | rollout s | reward s | score s | update s | step s | x GRPO | floor s | "
        f"rollout % | score % | update % | {mem_name} | memory x GRPO | DAPO rounds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for preset, r in rows.items():
        ratio = f"{r['time/step'] / base['time/step']:.2f}" if base else "-"
        mem = f"{r[mem_key] / base[mem_key]:.2f}" if base else "-"
        fl = floor_seconds(r)
        lines.append(
            f"| {preset} | {r['time/rollout']:.2f} | {r['time/reward']:.3f} | "
            f"{r['time/score']:.2f} | {r['time/update']:.2f} | {r['time/step']:.2f} | {ratio} | "
            f"{'-' if math.isnan(fl) else f'{fl:.2f}'} | "
            + " | ".join(pct(fraction(r, p)) for p in FLOOR_PHASES)
            + f" | {r[mem_key]:.2f} | {mem} | {r['rounds']:.0f} |"
        )
    lines += [""] + targets(rows, args.workload)
    if peaks:
        lines += [
            "",
            "The floor (benchmarks/flops.py): the matmul FLOPs each phase must do for the "
            "tokens it must process (the prompt and image once per group; causal attention; "
            "the LM head only where logits are needed; backward = 2 x forward; rollout: the "
            "batch trained on, so dynamic sampling's refills are not charged), divided by this "
            "machine's dense float32 matmul throughput, measured in each configuration's "
            "process before and after its steps (the higher of the two; "
            f"{min(peaks) / 1e9:.0f}-{max(peaks) / 1e9:.0f} GFLOP/s "
            "over the configurations; the best of the model's MLP, LM-head and vision-qkv "
            "shapes at 1,024 rows). floor s = the step's floor FLOPs at that throughput; "
            "phase % = floor FLOPs / (phase seconds x throughput), the achieved fraction.",
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
        choices=("cpu", "standard", "vision-heavy", "gpu"),
        default="cpu",
        help="cpu (= standard): issue 7's standard workload; vision-heavy: issue 18's (results "
        "in step_time_vision.md); gpu: the larger GPU variant (results in step_time_gpu.md)",
    )
    p.add_argument(
        "--presets", default="grpo,dapo,papo_g,papo_d,cppo,gspo,sapo,cispo,vppo,noisyrollout"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="measured steps per preset, after 1 warm-up (default 3; vision-heavy 1)",
    )
    p.add_argument(
        "--no-prefix-off",
        action="store_true",
        help="vision-heavy: skip the GRPO run with train.shared_prefix=off",
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
    args.workload = "cpu" if args.workload == "standard" else args.workload
    if args.steps is None:
        args.steps = 1 if args.workload == "vision-heavy" else 3
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
    if args.workload == "vision-heavy" and "grpo" in rows and not args.no_prefix_off:
        rows[PREFIX_OFF] = run_child("grpo", args, base + ["train.shared_prefix=off"])
        print(PREFIX_OFF, {k: round(v, 2) for k, v in rows[PREFIX_OFF].items()}, flush=True)
    if not args.no_scaling and "grpo" in rows and SCALING.get(args.workload):
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
    name = {"gpu": "step_time_gpu.md", "vision-heavy": "step_time_vision.md"}.get(
        args.workload, "step_time.md"
    )
    (RESULTS / name).write_text(text)


if __name__ == "__main__":
    main()
