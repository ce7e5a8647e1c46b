"""The rollout phase: vispo's sampler against Hugging Face ``model.generate``, side by side.

Issue 18 asks vispo's rollout to be no slower than TRL's generation. TRL's ``GRPOTrainer``
(transformers backend) repeats every prompt ``num_generations`` times in its sampler and calls
``model.generate`` on that batch; this script makes the same call on the same model and prompts
(``do_sample``, temperature 1.0, ``top_p`` 1.0, ``top_k`` 0, exactly 64 new tokens through
``min_new_tokens``, the image placeholders suppressed, TRL's settings in peer_trl.py) and times
it against vispo's rollout as the trainer runs it:

- ``vispo``: :func:`vispo.rollout.hf.generate` with the shared prefix (``train.shared_prefix``
  auto/on): each prompt prefilled once, its cache repeated for the group;
- ``vispo plain``: the same function without it (one ``generate`` call with
  ``num_return_sequences``);
- ``HF generate``: ``model.generate`` on the repeated prompts, what TRL calls.

Workloads: the standard one (benchmarks/step_time.py: ~30M-parameter Qwen2.5-VL-architecture
random model, 4 image tokens, 16 prompts x 5 rollouts) and the vision-heavy one
(benchmarks/shared_prefix.py: 256 image tokens per image, 8 prompts x 8 rollouts), 64 tokens.
All three give the same tokens for the same seed (checked and reported).

``--part noisy`` times NoisyRollout's rollout (half of each group on a noised image) with one
decode per round (clean and noised prompts together, per-prompt response counts) and with the
two calls it replaced, against GRPO's rollout of the same prompts; ``--part step`` runs the
trainer's GRPO and NoisyRollout steps (step_time.py's ``trainer_for``), interleaved.

Each time is the median of ``--repeats`` runs, the paths interleaved in one process; wall time
and process CPU time (all threads) are both reported: on a shared machine the CPU time is the
steadier of the two.

    python benchmarks/rollout.py                        # every part (~10 min on 2 quiet cores)
    python benchmarks/rollout.py --part standard --repeats 3
    python benchmarks/rollout.py --quick                # smoke test, nothing written

Writes (or updates the parts it ran in) benchmarks/results/rollout.md.
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from shared_prefix import model_for  # benchmarks/ is on sys.path when run as a script
from step_time import QUICK, RESULTS, machine, trainer_for
from transformers import GenerationConfig

from vispo.data import get_template, load_builtin
from vispo.models.scoring import encode_prompts
from vispo.rollout.hf import generate, multimodal_token_ids
from vispo.train import batch as B

TOKENS = 64
WORKLOADS = {  # name -> (image tokens, prompts, rollouts per prompt)
    "standard": (4, 16, 5),
    "vision": (256, 8, 8),
}
LABELS = {
    "standard": "standard (4 image tokens, 16 x 5)",
    "vision": "vision-heavy (256 image tokens, 8 x 8)",
}


def clock(fn) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def interleaved(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) of each function, run in turn ``repeats`` times after a warm-up."""
    for fn in fns.values():
        fn()
    runs = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            runs[name].append(clock(fn))
    return {
        name: (statistics.median(w for w, _ in r), statistics.median(c for _, c in r))
        for name, r in runs.items()
    }


def workload(name: str, quick: bool):
    image_tokens, P, n = WORKLOADS[name]
    if quick:
        image_tokens, P, n = 16, 2, 3
    model, processor = model_for(image_tokens, quick)
    model.eval()
    data = load_builtin("easy-vqa", "train", limit=P)
    samples = [data[i] for i in range(P)]
    template, budget = get_template("short"), B.image_budget(processor)
    images = [[B.prepare_image(im, budget) for im in s.load_images()] for s in samples]
    messages = [template.render(s) for s in samples]
    prompts = encode_prompts(processor, messages, images)
    return model, processor, messages, images, prompts, n


def hf_generate(model, processor, prompts, n: int, tokens: int, seed: int) -> torch.Tensor:
    """``model.generate`` on the prompts repeated n times, as TRL's GRPOTrainer calls it."""
    tok = processor.tokenizer
    eos = tok.eos_token_id
    config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        suppress_tokens=multimodal_token_ids(processor),
        eos_token_id=eos,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
        bos_token_id=None,
        use_cache=True,
    )
    repeated = prompts.left_padded().select(torch.arange(len(prompts)).repeat_interleave(n))
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**repeated.model_inputs(), generation_config=config)
    return out[:, repeated.input_ids.shape[1] :]


def part_decode(name: str, args) -> list[str]:
    model, processor, _, _, prompts, n = workload(name, args.quick)
    tokens = 8 if args.quick else args.tokens
    sampling = dict(n=n, max_new_tokens=tokens, min_new_tokens=tokens, seed=0)
    eos = [processor.tokenizer.eos_token_id]  # TRL's stop token, for the comparison

    def vispo(shared: bool):
        return generate(
            model, processor, prompts, shared_prefix=shared, eos_token_ids=eos, **sampling
        )

    same = {}
    if args.check:
        ours = vispo(True).response_ids
        same["vispo plain"] = torch.equal(ours, vispo(False).response_ids)
        same["HF generate"] = torch.equal(
            ours, hf_generate(model, processor, prompts, n, tokens, 0)
        )
    times = interleaved(
        {
            "vispo": lambda: vispo(True),
            "vispo plain": lambda: vispo(False),
            "HF generate": lambda: hf_generate(model, processor, prompts, n, tokens, 0),
        },
        args.repeats,
    )
    hf_w, hf_c = times["HF generate"]
    lines = [
        f"## {LABELS[name]}",
        "",
        f"{len(prompts)} prompts x {n} rollouts x {tokens} tokens, "
        f"{int(prompts.attention_mask.sum(-1).float().mean())} prompt tokens; median of "
        f"{args.repeats} interleaved runs.",
        "",
        "| path | wall s | CPU s | wall / HF generate | CPU / HF generate | same tokens as vispo |",
        "|---|---|---|---|---|---|",
    ]
    for path, (w, c) in times.items():
        check = "-" if path not in same else ("yes" if same[path] else "no")
        lines.append(f"| {path} | {w:.2f} | {c:.2f} | {w / hf_w:.2f} | {c / hf_c:.2f} | {check} |")
    return lines


def part_noisy(args) -> list[str]:
    """NoisyRollout's rollout (n_noisy of n on the noised image) in one decode and in two."""
    model, processor, messages, images, prompts, n = workload("standard", args.quick)
    tokens = 8 if args.quick else args.tokens
    n_noisy = n // 2
    keys = [(0, 1, i) for i in range(len(prompts))]

    def run(p, k, count):
        return generate(
            model,
            processor,
            p,
            n=count,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            shared_prefix=True,
        )

    def noisy(one: bool):
        torch.manual_seed(0)
        return B.mixed_rollout(
            run,
            processor,
            prompts,
            messages,
            images,
            keys,
            seed=0,
            n=n,
            n_noisy=n_noisy,
            signal=0.7,
            noise_std=0.5,
            one_decode=one,
        )

    def grpo():
        torch.manual_seed(0)
        return run(prompts, keys, n)

    times = interleaved(
        {
            "GRPO": grpo,
            "NoisyRollout, one decode": lambda: noisy(True),
            "NoisyRollout, two calls": lambda: noisy(False),
        },
        args.repeats,
    )
    base_w, base_c = times["GRPO"]
    lines = [
        "## NoisyRollout's rollout against GRPO's (standard workload)",
        "",
        f"{len(prompts)} prompts x {n} rollouts ({n - n_noisy} clean + {n_noisy} on the noised "
        f"image) x {tokens} tokens, vispo's shared-prefix sampler; the NoisyRollout times include "
        f"drawing the noise and encoding the noised prompts; median of {args.repeats} "
        "interleaved runs.",
        "",
        "| rollout | wall s | CPU s | wall / GRPO | CPU / GRPO |",
        "|---|---|---|---|---|",
    ]
    for path, (w, c) in times.items():
        lines.append(f"| {path} | {w:.2f} | {c:.2f} | {w / base_w:.2f} | {c / base_c:.2f} |")
    return lines


def part_step(args) -> list[str]:
    """The trainer's step, GRPO against NoisyRollout, steps interleaved."""
    extra = QUICK if args.quick else []
    keys = ("time/step", "time/rollout")
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {p: trainer_for(p, Path(tmp) / p, 0, extra) for p in ("grpo", "noisyrollout")}
        for t in trainers.values():  # warm-up step
            t.step()
        runs = {p: [] for p in trainers}
        for _ in range(args.steps):
            for p, t in trainers.items():
                c = time.process_time()
                m = t.step()
                runs[p].append([m[k] for k in keys] + [time.process_time() - c])
    med = {p: np.median(np.array(r), axis=0) for p, r in runs.items()}
    lines = [
        "## Step: NoisyRollout against GRPO (standard workload, the trainer)",
        "",
        f"step_time.py's `trainer_for` (beta as each preset sets it), one warm-up step, then "
        f"the median of {args.steps} steps, the two trainers' steps interleaved.",
        "",
        "| preset | step wall s | rollout wall s | step CPU s | step wall / GRPO | "
        "step CPU / GRPO |",
        "|---|---|---|---|---|---|",
    ]
    g = med["grpo"]
    for p, m in med.items():
        lines.append(
            f"| {p} | {m[0]:.2f} | {m[1]:.2f} | {m[2]:.2f} | {m[0] / g[0]:.3f} | "
            f"{m[2] / g[2]:.3f} |"
        )
    return lines


def update_results(path: Path, sections: dict[str, list[str]], header: list[str]) -> str:
    """The results file with these parts' sections (re)placed, the others kept."""
    old = path.read_text() if path.exists() else ""
    kept = {}
    for block in re.split(r"(?m)^<!-- part: ", old)[1:]:
        name, _, body = block.partition(" -->\n")
        kept[name] = body.rstrip("\n")
    kept.update({name: "\n".join(lines) for name, lines in sections.items()})
    order = ["standard", "vision", "noisy", "step"]
    body = [f"<!-- part: {name} -->\n{kept[name]}\n" for name in order if name in kept]
    return "\n".join(header) + "\n\n" + "\n".join(body)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--part",
        action="append",
        choices=["standard", "vision", "noisy", "step"],
        help="what to run (repeatable; default: all)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per path")
    p.add_argument("--steps", type=int, default=3, help="measured trainer steps per preset")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=TOKENS, help="new tokens per response")
    p.add_argument(
        "--no-check", dest="check", action="store_false", help="skip the same-tokens check"
    )
    p.add_argument("--note", default="", help="a line about the machine (e.g. its load)")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, nothing written")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    parts = args.part or ["standard", "vision", "noisy", "step"]
    sections = {}
    for part in parts:
        if part in WORKLOADS:
            sections[part] = part_decode(part, args)
        elif part == "noisy":
            sections[part] = part_noisy(args)
        else:
            sections[part] = part_step(args)
        print("\n".join(sections[part]) + "\n", flush=True)
    if args.quick:
        return
    header = [
        "# The rollout phase: vispo's sampler against Hugging Face `generate` (what TRL calls)",
        "",
        "Written by benchmarks/rollout.py; each part below says how it was run. "
        "Wall and process-CPU seconds; ratios are side by side in one process.",
        "",
        "`HF generate` repeats the prompts before the call, as TRL's sampler does, so the vision "
        "tower runs once per rollout; `vispo plain` passes `num_return_sequences`, with which "
        "transformers 5.25's Qwen2.5-VL ran the vision tower once per prompt in a probe on the "
        "vision-heavy workload (vision tower over 64 images 13.3 s CPU, over 8 images 1.1 s; "
        "`generate` of 2 tokens 19.9 s repeated, 6.8 s with `num_return_sequences`, 1 thread, "
        "contended): most of the gap between those two rows there.",
    ]
    for part in parts:
        sections[part] = (
            sections[part][:1]
            + [
                "",
                f"{args.threads} threads, {platform.machine()}, torch {torch.__version__}; "
                f"{machine()}. " + args.note,
            ]
            + sections[part][1:]
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "rollout.md"
    out.write_text(update_results(out, sections, header))


if __name__ == "__main__":
    main()
