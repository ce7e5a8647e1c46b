"""Peak memory and time of one update forward + backward: shared prefix x activation checkpointing.

The vision-heavy CPU workload of ``benchmarks/shared_prefix.py`` cut to one micro-batch: the
standard ~30M-parameter Qwen2.5-VL-architecture model, 2 easy-vqa prompts at 256 image tokens,
8 responses each of 64 random tokens (16 sequences, two whole groups), ``score(..., grad=True)``
and ``logp.sum().backward()``. Each of the four settings runs in its own process: one warm-up
step, then the peak resident memory (``VmHWM`` after resetting it through
``/proc/self/clear_refs``) above the resident memory before the measured step, and its time.
The gradients of the four settings are compared against the plain, non-checkpointed ones.

    OMP_NUM_THREADS=1 python benchmarks/checkpoint_memory.py     # Linux only; ~2.5 minutes

Prints a Markdown table (copied into benchmarks/results/checkpoint_memory.md).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SETTINGS = [(False, False), (True, False), (False, True), (True, True)]


def measure(shared: bool, ckpt: bool, grads_path: str) -> dict:
    from step_time import MODELS  # benchmarks/ is on sys.path when run as a script

    from vispo.data import get_template, load_builtin
    from vispo.models.adapt import enable_gradient_checkpointing
    from vispo.models.scoring import build_scoring_batch, encode_prompts, score
    from vispo.models.tiny import build_tiny_vlm
    from vispo.train.batch import image_budget, prepare_image

    image_tokens, P, G, T = 256, 2, 8, 64
    side = int(math.isqrt(image_tokens)) * 28  # patch 14 x merge 2
    spec = dict(MODELS["cpu"], min_pixels=side * side, max_pixels=side * side)
    model, processor = build_tiny_vlm(
        "qwen2_5_vl", seed=0, patch_size=14, merge_size=2, tie_word_embeddings=False, **spec
    )
    data = load_builtin("easy-vqa", "train", limit=P)
    samples = [data[i] for i in range(P)]
    template, budget = get_template("short"), image_budget(processor)
    images = [[prepare_image(im, budget) for im in s.load_images()] for s in samples]
    prompts = encode_prompts(processor, [template.render(s) for s in samples], images)
    ids = torch.randint(200, 1000, (P * G, T), generator=torch.Generator().manual_seed(0))
    batch = build_scoring_batch(prompts, ids, repeats=G, response_mask=torch.ones(P * G, T))
    if ckpt:
        enable_gradient_checkpointing(model)
    model.train()

    def step():
        (out,) = score(model, batch, grad=True, shared_prefix=shared)
        out.logp.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return grads

    def status(field: str) -> float:  # MiB
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no {field} in /proc/self/status")

    step()  # warm-up: allocator pools, lazy initialisation
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    base = status("VmRSS")
    t = time.perf_counter()
    grads = step()
    seconds = time.perf_counter() - t
    torch.save(grads, grads_path)
    return {
        "peak_MiB": status("VmHWM") - base,
        "seconds": seconds,
        "prompt_tokens": int(prompts.attention_mask.sum(-1).float().mean()),
    }


def main() -> None:
    if len(sys.argv) == 4:  # one setting, in its own process
        shared, ckpt = sys.argv[1] == "1", sys.argv[2] == "1"
        print(json.dumps(measure(shared, ckpt, sys.argv[3])))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shared, ckpt in SETTINGS:
            path = f"{tmp}/grads-{int(shared)}{int(ckpt)}.pt"
            args = [sys.executable, __file__, str(int(shared)), str(int(ckpt)), path]
            done = subprocess.run(args, capture_output=True, text=True, check=True)
            rows.append((shared, ckpt, json.loads(done.stdout.strip().splitlines()[-1]), path))
        ref = torch.load(rows[0][3])
        largest = max(g.abs().max() for g in ref.values())
        print(f"prompt tokens: {rows[0][2]['prompt_tokens']}")
        print("| shared prefix | checkpointing | peak above base MiB | seconds | grad diff |")
        print("|---|---|---|---|---|")
        for shared, ckpt, r, path in rows:
            grads = torch.load(path)
            diff = max(float((grads[n] - g).abs().max() / largest) for n, g in ref.items())
            on = {True: "on", False: "off"}
            print(
                f"| {on[shared]} | {on[ckpt]} | {r['peak_MiB']:.0f} | {r['seconds']:.1f} "
                f"| {diff:.1e} |"
            )


if __name__ == "__main__":
    main()
