"""The image and the prompt computed once per group: its effect on the passes of a step.

On the vision-heavy CPU workload (issue 18: the standard ~30M-parameter Qwen2.5-VL-architecture
model of benchmarks/step_time.py, easy-vqa images upscaled to give 256 image tokens after
merging, 8 prompts x 8 rollouts, exactly 64 new tokens), and on the standard workload (16 x 5,
4 image tokens), this script times in one process, each the median of ``--repeats`` runs, with
``train.shared_prefix`` off and on, interleaved:

- rollout: ``generate`` of the step's responses (the shared path prefills each prompt once);
- score: one no-gradient scoring pass (old policy, reference, PAPO's masked image);
- update: one forward + backward of the policy over the batch (micro-batches of 16 sequences,
  two whole groups; as one of the trainer's micro-batches does it).

Before timing it checks that both paths give the same samples (same seed) and log-probs.
The scaling table repeats the measurement at 64, 256 and 1,024 image tokens (group of 8) and
at groups of 4, 8 and 16 (256 image tokens), with 4 prompts, and fits the exponents of time
in the image size and in the group size: the shared path should grow like
P * (image + prompt) + P * G * response, the plain one like P * G * (image + prompt + response).

    python benchmarks/shared_prefix.py                 # both workloads and the scaling table
    python benchmarks/shared_prefix.py --quick         # smoke test, nothing written

Writes benchmarks/results/shared_prefix.md.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics

import torch
from levers import timed  # benchmarks/ is on sys.path when run as a script
from step_time import MODELS, RESULTS, machine, pixels_for

from vispo.data import get_template, load_builtin
from vispo.models.scoring import build_scoring_batch, encode_prompts, score
from vispo.models.tiny import build_tiny_vlm
from vispo.rollout.hf import generate
from vispo.train.batch import image_budget, prepare_image


def model_for(image_tokens: int, quick: bool):
    """The standard model with a pixel budget that gives exactly `image_tokens` per image."""
    pixels = pixels_for(image_tokens)
    spec = dict(MODELS["cpu"], min_pixels=pixels, max_pixels=pixels)
    if quick:
        spec.update(hidden_size=96, num_layers=2, vision_depth=1, intermediate_size=128)
    return build_tiny_vlm(
        "qwen2_5_vl", seed=0, patch_size=14, merge_size=2, tie_word_embeddings=False, **spec
    )


def measure(
    image_tokens: int, prompts: int, group: int, length: int, args, repeats: int | None = None
) -> dict:
    model, processor = model_for(image_tokens, args.quick)
    data = load_builtin("easy-vqa", "train", limit=prompts)
    samples = [data[i] for i in range(prompts)]
    template, budget = get_template("short"), image_budget(processor)
    images = [[prepare_image(im, budget) for im in s.load_images()] for s in samples]
    batch_prompts = encode_prompts(processor, [template.render(s) for s in samples], images)
    sampling = dict(n=group, max_new_tokens=length, min_new_tokens=length, seed=0)

    def rollout(shared: bool):
        return generate(model, processor, batch_prompts, shared_prefix=shared, **sampling)

    plain, shared = rollout(False), rollout(True)
    assert torch.equal(plain.response_ids, shared.response_ids), "different samples"
    batch = build_scoring_batch(
        batch_prompts, plain.response_ids, repeats=group, response_mask=plain.response_mask
    )
    check = [score(model, batch, shared_prefix=s)[0].logp for s in (False, True)]
    diff = float((check[0] - check[1]).abs().max())
    assert diff < 1e-4, f"log-probs differ by {diff}"

    def scoring(shared: bool):
        score(model, batch, shared_prefix=shared, micro_batch_size=args.micro)

    def update(shared: bool):
        model.train()
        for idx in torch.arange(len(batch)).split(args.micro):
            (out,) = score(model, batch.select(idx), grad=True, shared_prefix=shared)
            out.logp.sum().backward()
        model.zero_grad(set_to_none=True)
        model.eval()

    row = {
        "prompt_tokens": int(batch_prompts.attention_mask.sum(-1).float().mean()),
        "logp_diff": diff,
    }
    for name, fn in (("rollout", rollout), ("score", scoring), ("update", update)):
        fn(True)  # warm-up
        times = {False: [], True: []}
        for _ in range(repeats or args.repeats):  # interleaved: off, on, off, on, ...
            for shared in (False, True):
                times[shared].append(timed(lambda f=fn, s=shared: f(s), 1))
        row[name] = {k: statistics.median(v) for k, v in times.items()}
    return row


def ratio(row: dict, *phases: str) -> float:
    return sum(row[p][True] for p in phases) / sum(row[p][False] for p in phases)


def exponent(sizes: list[int], times: list[float]) -> float:
    """Least-squares slope of log(time) against log(size)."""
    x = [math.log(s) for s in sizes]
    y = [math.log(t) for t in times]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


def table(rows: dict) -> list[str]:
    lines = [
        "| workload | prompt tokens | rollout off / on s | score off / on s | update off / on s "
        "| rollout on/off | score + update on/off | all three on/off |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        lines.append(
            f"| {label} | {r['prompt_tokens']} | "
            + " | ".join(
                f"{r[p][False]:.2f} / {r[p][True]:.2f}" for p in ("rollout", "score", "update")
            )
            + f" | {ratio(r, 'rollout'):.2f} | {ratio(r, 'score', 'update'):.2f} | "
            f"{ratio(r, 'rollout', 'score', 'update'):.2f} |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=2, help="timed runs per path and phase")
    p.add_argument(
        "--scaling-repeats", type=int, default=1, help="timed runs per path in the scaling table"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--micro", type=int, default=16, help="sequences per forward in score/update")
    p.add_argument("--no-scaling", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, nothing written")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    length = 8 if args.quick else 64
    main_rows = {
        "vision-heavy (256 image tokens, 8 x 8)": (256, 8, 8),
        "standard (4 image tokens, 16 x 5)": (4, 16, 5),
    }
    if args.quick:
        main_rows = {"quick (16 image tokens, 2 x 4)": (16, 2, 4)}
    rows = {}
    for label, (tokens, prompts, group) in main_rows.items():
        rows[label] = measure(tokens, prompts, group, length, args)
        print(label, rows[label], flush=True)
    lines = [
        "# The image and the prompt computed once per group (`train.shared_prefix`)",
        "",
        f"Machine: {machine()}.",
        "",
        f"{args.threads} threads, {platform.machine()}, torch {torch.__version__}; median of "
        f"{args.repeats} runs per path, off and on interleaved in one process; responses of "
        f"exactly {length} tokens; score/update in micro-batches of {args.micro} sequences. Both "
        "paths give the same samples (same seed) and the same log-probs (checked first).",
        "",
        *table(rows),
    ]
    if not args.no_scaling and not args.quick:
        scale = {}
        for tokens in (64, 256, 1024):
            scale[("image", tokens)] = measure(tokens, 4, 8, length, args, args.scaling_repeats)
            print("image", tokens, scale[("image", tokens)], flush=True)
        for group in (4, 16):
            scale[("group", group)] = measure(256, 4, group, length, args, args.scaling_repeats)
            print("group", group, scale[("group", group)], flush=True)
        scale[("group", 8)] = scale[("image", 256)]
        phases = ("rollout", "score", "update")
        lines += [
            "",
            f"## Scaling (4 prompts, 64-token responses, {args.scaling_repeats} run(s) per path)",
            "",
            *table(
                {
                    f"{what} {size}": scale[(what, size)]
                    for what, size in sorted(scale, key=lambda k: (k[0], k[1]))
                }
            ),
            "",
            "Exponent e of time ~ size**e for rollout + score + update (least squares over "
            "the three sizes):",
            "",
            "| size varied | off | on |",
            "|---|---|---|",
        ]
        for what, sizes in (("image", (64, 256, 1024)), ("group", (4, 8, 16))):
            cells = []
            for shared in (False, True):
                times = [sum(scale[(what, s)][ph][shared] for ph in phases) for s in sizes]
                cells.append(f"{exponent(list(sizes), times):.2f}")
            label = "image tokens (group 8)" if what == "image" else "group size (256 image tokens)"
            lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "shared_prefix.md").write_text(text)


if __name__ == "__main__":
    main()
