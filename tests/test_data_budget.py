"""vispo.data.budget: prompt lengths include the expanded image tokens; filtering is exact."""

from __future__ import annotations

import logging

import pytest
from PIL import Image

from vispo.data import TEMPLATES, Sample, SampleDataset, filter_by_prompt_length, prompt_lengths


@pytest.fixture(scope="module")
def processor():
    from vispo.models.tiny import build_tiny_processor

    # Patch 14, merge 2: one image token per 28x28 pixels, up to 112x112 (16 tokens).
    return build_tiny_processor("qwen2_vl", max_pixels=112 * 112)


def _image(side: int) -> Image.Image:
    return Image.new("RGB", (side, side), (90, 120, 200))


def _expected_length(processor, sample: Sample, template) -> int:
    """Independent route: text tokens with one pad per image, plus (side/28)^2 - 1 per image."""
    text = processor.apply_chat_template(
        template.render(sample), tokenize=False, add_generation_prompt=True
    )
    n_text = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert text.count("<|image_pad|>") == len(sample.images)
    return n_text + sum((im.width // 28) * (im.height // 28) - 1 for im in sample.images)


def _samples() -> list[Sample]:
    return [
        Sample("small", [_image(56)], "<image>What colour is it?", "blue"),
        Sample("large", [_image(112)], "<image>What colour is it?", "blue"),
        Sample("two", [_image(56), _image(84)], "Compare <image> and <image>.", "same"),
        Sample("text", [], "What is 2 + 2?", "4"),
    ]


def test_prompt_lengths_count_expanded_image_tokens(processor):
    samples = _samples()
    for template in (TEMPLATES["reasoning"], TEMPLATES["short"]):
        lengths = prompt_lengths(samples, processor, template)
        assert lengths == [_expected_length(processor, s, template) for s in samples]
    small, large, two, text = prompt_lengths(samples, processor, "plain")
    assert large - small == 16 - 4  # same text, 112px = 16 tokens vs 56px = 4 tokens
    # The cache (same text and image sizes) gives the same numbers as encoding each prompt.
    assert prompt_lengths(samples, processor, "plain", cache=False) == [small, large, two, text]


def test_prompt_exactly_at_the_limit_is_kept_one_over_is_dropped(processor, caplog):
    samples = _samples()
    lengths = prompt_lengths(samples, processor, "short")
    limit = lengths[0]  # "small" is exactly at the limit
    assert lengths[1] > limit and lengths[3] < limit
    with caplog.at_level(logging.WARNING, logger="vispo.data.budget"):
        kept, n_dropped = filter_by_prompt_length(samples, processor, "short", limit)
    expected_ids = [s.id for s, n in zip(samples, lengths, strict=True) if n <= limit]
    assert [s.id for s in kept] == expected_ids and "small" in expected_ids
    assert n_dropped == len(samples) - len(expected_ids)
    assert isinstance(kept, SampleDataset) and kept.skipped["prompt_too_long"] == n_dropped
    assert f"dropped {n_dropped} of 4 prompts longer than max_prompt_length={limit}" in caplog.text

    kept, n_dropped = filter_by_prompt_length(samples[:1], processor, "short", limit - 1)
    assert len(kept) == 0 and n_dropped == 1
    # The image tokens decide: "large" has the same text as "small" and is dropped at its limit.
    kept, _ = filter_by_prompt_length(samples[:2], processor, "short", limit)
    assert [s.id for s in kept] == ["small"]


def test_nothing_is_truncated(processor):
    samples = _samples()
    kept, n_dropped = filter_by_prompt_length(samples, processor, "reasoning", 10_000)
    assert n_dropped == 0 and [s.question for s in kept] == [s.question for s in samples]
    with pytest.raises(ValueError, match="max_prompt_length"):
        filter_by_prompt_length(samples, processor, "short", 0)
