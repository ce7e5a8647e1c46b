"""Prompt-length budget that counts image tokens *after* the processor.

A VLM prompt's length is dominated by its image tokens, and how many there are depends on the
image size and the processor's pixel budget (Qwen-VL: one token per 28x28 pixels after
resizing). Counting text tokens only, and truncating afterwards, cuts through image tokens and
breaks the model's inputs: the most reported VLM-RL bug in TRL and verl. vispo instead encodes
every prompt exactly as training will (``vispo.models.scoring.encode_prompts``) and drops the
prompts that are too long, up front, with a logged count. Nothing is ever truncated.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from vispo.data.sample import Sample, SampleDataset
from vispo.data.templates import PromptTemplate, get_template
from vispo.vision import load_image

logger = logging.getLogger(__name__)


def prompt_lengths(
    samples: Sequence[Sample],
    processor: Any,
    template: PromptTemplate | str | None = None,
    *,
    batch_size: int = 32,
    cache: bool = True,
) -> list[int]:
    """Token count of each sample's prompt after the processor (image tokens expanded).

    Args:
        samples: the samples (their images are decoded here).
        processor: the model's HF processor.
        template: a :class:`PromptTemplate`, a built-in name, or None for the default.
        batch_size: prompts encoded per processor call.
        cache: reuse the length of an identical prompt text with identically sized images
            (processors expand an image into a number of tokens that depends on its size only);
            on easy-vqa this turns 38k encodings into about a hundred.

    Returns:
        one length per sample, in order.
    """
    from vispo.models.scoring import encode_prompts  # the single place that encodes prompts

    tmpl = get_template(template)
    lengths: list[int | None] = [None] * len(samples)
    pending: dict[Any, list[int]] = {}  # cache key -> indices of samples sharing it
    order: list[tuple[Any, list[dict], list]] = []
    path_sizes: dict[str, tuple[int, int]] = {}  # an image file shared by many questions

    def size_of(src: Any, sample_id: str) -> tuple[int, int]:
        if isinstance(src, str):
            if src not in path_sizes:
                path_sizes[src] = load_image(src, sample_id=sample_id).size
            return path_sizes[src]
        return load_image(src, sample_id=sample_id).size

    for i, sample in enumerate(samples):
        messages = tmpl.render(sample)
        if cache:
            sizes = tuple(size_of(src, sample.id) for src in sample.images)
            key: Any = (json.dumps(messages, sort_keys=True), sizes)
        else:
            key = i
        if key in pending:
            pending[key].append(i)
            continue
        pending[key] = [i]
        order.append((key, messages, sample))

    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        images = [sample.load_images() for _, _, sample in chunk]
        encoded = encode_prompts(processor, [m for _, m, _ in chunk], images)
        for (key, _, _), n_tokens in zip(chunk, _row_lengths(encoded), strict=True):
            for i in pending[key]:
                lengths[i] = n_tokens
    return [int(n) for n in lengths]  # type: ignore[arg-type]


def _row_lengths(encoded: Any) -> list[int]:
    """Real (unpadded) length of each row of an encoded ``PromptBatch``."""
    return [int(v) for v in encoded.attention_mask.sum(-1).tolist()]


def filter_by_prompt_length(
    samples: Sequence[Sample],
    processor: Any,
    template: PromptTemplate | str | None,
    max_prompt_length: int,
    **kwargs: Any,
) -> tuple[SampleDataset, int]:
    """Keep the samples whose prompt fits in ``max_prompt_length`` tokens; never truncate.

    Returns ``(kept, n_dropped)``; a prompt of exactly ``max_prompt_length`` tokens is kept. The
    number dropped is logged (warning level when any is). ``kwargs`` go to
    :func:`prompt_lengths`.
    """
    if not isinstance(max_prompt_length, int) or max_prompt_length <= 0:
        raise ValueError(f"max_prompt_length must be a positive int, got {max_prompt_length!r}")
    lengths = prompt_lengths(samples, processor, template, **kwargs)
    keep = [i for i, n in enumerate(lengths) if n <= max_prompt_length]
    n_dropped = len(lengths) - len(keep)
    dataset = samples if isinstance(samples, SampleDataset) else SampleDataset(samples)
    kept = dataset.select(keep)
    if n_dropped:
        kept.skipped["prompt_too_long"] += n_dropped
        logger.warning(
            "dropped %d of %d prompts longer than max_prompt_length=%d tokens (longest: %d); "
            "raise max_prompt_length or lower the image pixel budget to keep them",
            n_dropped,
            len(lengths),
            max_prompt_length,
            max(lengths),
        )
    else:
        logger.info(
            "all %d prompts fit in max_prompt_length=%d tokens (longest: %d)",
            len(lengths),
            max_prompt_length,
            max(lengths, default=0),
        )
    return kept, n_dropped
