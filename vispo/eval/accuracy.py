"""Greedy (or sampled) answers of a policy on samples, scored by a reward's accuracy."""

from __future__ import annotations

import torch

from vispo.models.scoring import encode_prompts
from vispo.rollout.hf import generate


def generate_answers(
    model,
    processor,
    samples,
    template,
    *,
    max_new_tokens: int,
    k: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    budget=None,
    seed: int | None = 0,
) -> list[list[str]]:
    """``k`` completions per sample (greedy when temperature is 0), in batches."""
    from vispo.train.batch import prepare_image

    was_training = model.training
    model.eval()
    out: list[list[str]] = []
    try:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            images = [[prepare_image(im, budget) for im in s.load_images()] for s in chunk]
            prompts = encode_prompts(processor, [template.render(s) for s in chunk], images)
            with torch.no_grad():
                rollout = generate(
                    model,
                    processor,
                    prompts,
                    n=k,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature if temperature > 0 else 1.0,
                    top_p=top_p,
                    do_sample=temperature > 0,
                    seed=None if seed is None else seed + start,
                )
            out += [rollout.texts[i * k : (i + 1) * k] for i in range(len(chunk))]
    finally:
        model.train(was_training)
    return out


def greedy_accuracy(
    model,
    processor,
    samples,
    template,
    reward,
    *,
    max_new_tokens: int,
    budget=None,
    batch_size: int = 64,
) -> float:
    """Mean accuracy component (or total reward) of greedy answers."""
    texts = [
        t[0]
        for t in generate_answers(
            model,
            processor,
            samples,
            template,
            max_new_tokens=max_new_tokens,
            budget=budget,
            batch_size=batch_size,
        )
    ]
    result = reward(texts, [s.answer for s in samples])
    values = result.components.get("accuracy", result.total)
    return sum(values) / max(len(values), 1)
