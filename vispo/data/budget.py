"""Prompt-length budget that counts image tokens *after* the processor.

A VLM prompt's length is dominated by its image tokens, and how many there are depends on the
image size and the processor's pixel budget (Qwen-VL: one token per 28x28 pixels after
resizing). Counting text tokens only, and truncating afterwards, cuts through image tokens and
breaks the model's inputs: the most reported VLM-RL bug in TRL and verl. vispo instead encodes
every prompt exactly as training will (``vispo.models.scoring.encode_prompts``) and drops the
prompts that are too long, up front, with a logged count. Nothing is ever truncated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

from vispo.data.sample import DataError, Sample, SampleDataset
from vispo.data.templates import PromptTemplate, get_template
from vispo.data.validate import clean_text
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
        one length per sample, in order. A sample the processor refuses raises its error
        (:func:`filter_by_prompt_length` skips such samples instead).
    """
    return _prompt_lengths(samples, processor, template, batch_size=batch_size, cache=cache)


def _prompt_lengths(
    samples: Sequence[Sample],
    processor: Any,
    template: PromptTemplate | str | None = None,
    *,
    batch_size: int = 32,
    cache: bool = True,
    refused: dict[int, str] | None = None,
) -> list:
    """:func:`prompt_lengths`; with ``refused`` given, a sample that cannot be rendered,
    decoded or encoded gets length None and ``refused[index]`` says why."""
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
        try:
            messages = tmpl.render(sample)
            if cache:
                sizes = tuple(size_of(src, sample.id) for src in sample.images)
                key: Any = (json.dumps(messages, sort_keys=True), sizes)
            else:
                key = i
        except Exception as e:  # noqa: BLE001 (one bad sample, reported by the caller)
            if refused is None:
                raise
            refused[i] = f"sample {sample.id!r}: {type(e).__name__}: {e}"
            continue
        if key in pending:
            pending[key].append(i)
            continue
        pending[key] = [i]
        order.append((key, messages, sample))

    def encode(chunk) -> list[int]:
        images = [sample.load_images() for _, _, sample in chunk]
        encoded = encode_prompts(processor, [m for _, m, _ in chunk], images)
        return _row_lengths(encoded)

    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        try:
            results: list = list(zip(chunk, encode(chunk), strict=True))
        except Exception:
            if refused is None:
                raise
            results = []
            for item in chunk:  # find the sample(s) the processor refuses
                try:
                    results.append((item, encode([item])[0]))
                except Exception as e:  # noqa: BLE001 (that sample is skipped)
                    message = f"{type(e).__name__}: {str(e)[:200]}"
                    for i in pending[item[0]]:
                        refused[i] = (
                            f"sample {samples[i].id!r}: the processor refused it ({message})"
                        )
        for (key, _, _), n_tokens in results:
            for i in pending[key]:
                lengths[i] = n_tokens
    return [None if n is None else int(n) for n in lengths]


def _special_tokens(processor: Any) -> set[str]:
    """The tokenizer's special tokens (chat control, image/video slots), as text."""
    tok = getattr(processor, "tokenizer", processor)
    found = set(getattr(tok, "all_special_tokens", []) or [])
    for added in (getattr(tok, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            found.add(str(added.content))
    for name in ("image_token", "video_token", "boi_token", "eoi_token"):
        value = getattr(processor, name, None)
        if isinstance(value, str):
            found.add(value)
    return found


def neutralise_special_tokens(
    samples: Sequence[Sample], processor: Any, placeholder: str = "<image>"
) -> tuple[list[Sample], Counter]:
    """Samples whose question/system/meta text has the tokenizer's own special tokens made
    plain text (:func:`vispo.data.validate.neutralise`); returns them and a Counter of the
    neutralised tokens per sample id."""
    tokens = _special_tokens(processor)
    out: list[Sample] = []
    counts: Counter = Counter()
    for sample in samples:
        fields = {"question": sample.question, **sample.meta}
        cleaned, n, _ = clean_text(sample.id, fields, tokens, keep=placeholder)
        if n:
            counts[sample.id] = n
            question = cleaned.pop("question")
            sample = dataclasses.replace(sample, question=question, meta=cleaned)
        out.append(sample)
    return out, counts


def _row_lengths(encoded: Any) -> list[int]:
    """Real (unpadded) length of each row of an encoded ``PromptBatch``."""
    return [int(v) for v in encoded.attention_mask.sum(-1).tolist()]


def filter_by_prompt_length(
    samples: Sequence[Sample],
    processor: Any,
    template: PromptTemplate | str | None,
    max_prompt_length: int,
    *,
    on_error: str = "skip",
    **kwargs: Any,
) -> tuple[SampleDataset, int]:
    """Keep the samples whose prompt fits in ``max_prompt_length`` tokens; never truncate.

    Returns ``(kept, n_dropped)``; a prompt of exactly ``max_prompt_length`` tokens is kept. The
    number dropped is logged (warning level when any is). The model's own special tokens
    written in a sample's text are neutralised first (counted in ``kept.neutralised``); a
    sample the processor refuses (e.g. an image it rejects) is skipped and counted as
    ``processor_error`` in ``kept.skipped``, or with ``on_error="raise"`` raises
    :class:`DataError` naming it. ``kwargs`` go to :func:`prompt_lengths`.
    """
    if not isinstance(max_prompt_length, int) or max_prompt_length <= 0:
        raise ValueError(f"max_prompt_length must be a positive int, got {max_prompt_length!r}")
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    dataset = samples if isinstance(samples, SampleDataset) else SampleDataset(samples)
    tmpl = get_template(template)
    cleaned, counts = neutralise_special_tokens(list(dataset), processor, tmpl.placeholder)
    if counts:
        logger.warning(
            "neutralised %d special token(s) of the model written in the text of %d sample(s) "
            "(now plain text; first: %s)",
            sum(counts.values()),
            len(counts),
            next(iter(counts)),
        )
    refused: dict[int, str] = {}
    lengths = _prompt_lengths(cleaned, processor, tmpl, refused=refused, **kwargs)
    if refused and on_error == "raise":
        raise DataError(refused[min(refused)])
    keep = [i for i, n in enumerate(lengths) if n is not None and n <= max_prompt_length]
    n_dropped = len(lengths) - len(keep) - len(refused)
    kept = SampleDataset(
        [cleaned[i] for i in keep],
        skipped=dataset.skipped,
        errors=dataset.errors,
        source=dataset.source,
        split=dataset.split,
    )
    kept.neutralised = dataset.neutralised + counts
    if refused:
        kept.skipped["processor_error"] += len(refused)
        kept.errors.extend(refused[i] for i in sorted(refused)[:20])
        logger.warning(
            "skipped %d sample(s) that the processor refuses; first: %s",
            len(refused),
            refused[min(refused)],
        )
    fitting = [n for n in lengths if n is not None]
    if n_dropped:
        kept.skipped["prompt_too_long"] += n_dropped
        logger.warning(
            "dropped %d of %d prompts longer than max_prompt_length=%d tokens (longest: %d); "
            "raise max_prompt_length or lower the image pixel budget to keep them",
            n_dropped,
            len(lengths),
            max_prompt_length,
            max(fitting),
        )
    else:
        logger.info(
            "all %d prompts fit in max_prompt_length=%d tokens (longest: %d)",
            len(fitting),
            max_prompt_length,
            max(fitting, default=0),
        )
    return kept, n_dropped
