"""Answers of a policy on samples, and their correctness under a reward's accuracy.

:func:`generate_batch` is the one generation call of the evaluation code: one batch of
samples in, ``k`` completions per sample out (greedy when ``temperature`` is 0). The trainer's
before/after accuracy (:func:`greedy_accuracy`) and ``vispo eval`` (:mod:`vispo.eval.runner`)
both go through it, so a question gets the same prompt, image preparation and decoding rules
everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vispo.models.scoring import encode_prompts
from vispo.rollout.hf import generate


def prepared_images(samples: Sequence, budget=None) -> list[list]:
    """Each sample's images, decoded and resized once to the processor's pixel grid."""
    from vispo.train.batch import prepare_image

    return [[prepare_image(im, budget) for im in s.load_images()] for s in samples]


def generate_batch(
    model,
    processor,
    samples: Sequence,
    template,
    *,
    max_new_tokens: int,
    k: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    budget=None,
    seed: int | None = 0,
) -> list[list[str]]:
    """``k`` completions for each of ``samples`` from one batched ``generate`` call.

    Args:
        model, processor: the policy.
        samples: :class:`vispo.data.Sample` objects (one batch).
        template: a :class:`vispo.data.PromptTemplate`.
        max_new_tokens: length cap of a completion.
        k: completions per sample.
        temperature: 0 means greedy decoding (the ``k`` completions are then identical);
            otherwise sampling from ``softmax(logits / temperature)``.
        top_p: nucleus mass when sampling.
        budget: the processor's pixel budget (:func:`vispo.train.batch.image_budget`).
        seed: makes sampling reproducible (the same batch and seed give the same texts)
            without touching the global RNG; None draws from the global RNG.

    Returns:
        ``out[i]`` = the ``k`` completions of ``samples[i]``, decoded without special tokens.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not samples:
        return []
    images = prepared_images(samples, budget)
    prompts = encode_prompts(processor, [template.render(s) for s in samples], images)
    was_training = model.training
    model.eval()
    try:
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
                seed=seed,
            )
    finally:
        model.train(was_training)
    return [rollout.texts[i * k : (i + 1) * k] for i in range(len(samples))]


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
    """``k`` completions per sample (greedy when temperature is 0), in batches.

    Batch ``b`` (samples ``b*batch_size ...``) is generated with seed ``seed + b*batch_size``,
    so a call is reproducible for a fixed ``batch_size``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: list[list[str]] = []
    for start in range(0, len(samples), batch_size):
        out += generate_batch(
            model,
            processor,
            [samples[i] for i in range(start, min(start + batch_size, len(samples)))],
            template,
            max_new_tokens=max_new_tokens,
            k=k,
            temperature=temperature,
            top_p=top_p,
            budget=budget,
            seed=None if seed is None else seed + start,
        )
    return out


def correctness(
    reward, completions: Sequence[str], answers: Sequence[str], **columns
) -> list[float]:
    """Per completion: the reward's ``accuracy`` component, or its total if it has none.

    ``reward`` is a :class:`vispo.rewards.RewardRunner` (or any callable returning a
    :class:`vispo.rewards.RewardResult`); ``columns`` are passed on to it (build them with
    :func:`reward_inputs` so that a reward sees the same columns as in training).
    """
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    if not completions:
        return []
    result = reward(list(completions), list(answers), **columns)
    values = result.components.get("accuracy", result.total)
    return [float(v) for v in values]


def reward_inputs(samples, completions: Sequence[str], processor=None, repeat: int = 1) -> dict:
    """The columns of a reward call on ``completions`` of ``samples`` (each sample answered
    ``repeat`` times, in order), as training passes them (:func:`vispo.rewards.reward_columns`),
    with ``sample_ids``. ``completion_ids`` are the completions tokenized again (training
    passes the generated ids; the two agree whenever decoding round-trips)."""
    from vispo.rewards import reward_columns

    ids = None
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer is not None and completions:
        ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    return {
        "sample_ids": [s.id for s in samples for _ in range(repeat)],
        **reward_columns(samples, repeat, ids),
    }


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
    values = correctness(
        reward, texts, [s.answer for s in samples], **reward_inputs(samples, texts, processor)
    )
    return sum(values) / max(len(values), 1)
