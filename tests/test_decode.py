"""Sampling with the prompt prefilled once per group (vispo.rollout.decode) against ``generate``.

Same seed, same tokens: the shared-prefix loop draws from the same processed distribution in
the same order as transformers' ``generate``, on every tiny architecture, with temperature,
top-p, min_new_tokens, greedy decoding, rows that stop at different lengths, and 1 or 2 images
per prompt.
"""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    InfNanRemoveLogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from vispo.models import ARCHS, encode_prompts
from vispo.rollout.decode import process_logits
from vispo.rollout.hf import generate


@pytest.fixture(scope="module")
def prompts(tiny_vlm, sample_images, make_conversation):
    def get(arch):
        _, processor = tiny_vlm(arch)
        messages = [
            make_conversation(1, "What shape is in the image?"),
            make_conversation(2, "Do the two images show the same shape? Answer in one word."),
            make_conversation(1, "Color?"),
        ]
        images = [[sample_images[0]], [sample_images[1], sample_images[2]], [sample_images[3]]]
        return encode_prompts(processor, messages, images)

    return get


SETTINGS = [
    dict(temperature=1.0, top_p=1.0),
    dict(temperature=0.7, top_p=0.9, min_new_tokens=3),
    dict(do_sample=False),
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("settings", SETTINGS, ids=["plain", "warped", "greedy"])
def test_shared_prefix_sampling_gives_generates_tokens(tiny_vlm, prompts, arch, settings):
    model, processor = tiny_vlm(arch)
    batch = prompts(arch)
    kw = dict(n=4, max_new_tokens=10, seed=11, **settings)
    plain = generate(model, processor, batch, **kw)
    shared = generate(model, processor, batch, shared_prefix=True, **kw)
    assert torch.equal(shared.response_ids, plain.response_ids)
    assert torch.equal(shared.response_mask, plain.response_mask)
    assert shared.texts == plain.texts


def test_rows_stopping_at_different_lengths(tiny_vlm, prompts):
    model, processor = tiny_vlm("qwen2_5_vl")
    batch = prompts("qwen2_5_vl")
    free = generate(model, processor, batch, n=4, max_new_tokens=10, seed=3)
    # Stop tokens drawn from what the model samples, so that rows end at different lengths.
    common = torch.bincount(free.response_ids.flatten()).topk(3).indices.tolist()
    kw = dict(n=4, max_new_tokens=10, seed=3, eos_token_ids=common)
    plain = generate(model, processor, batch, **kw)
    shared = generate(model, processor, batch, shared_prefix=True, **kw)
    assert len(set(plain.lengths.tolist())) > 2
    assert torch.equal(shared.response_ids, plain.response_ids)
    assert torch.equal(shared.lengths, plain.lengths)
    assert torch.equal(shared.stopped, plain.stopped)


def test_process_logits_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0], [0.0, 0.0, 0.0, 0.0, float("nan")]])
    banned, eos = torch.tensor([4]), torch.tensor([0])
    out = process_logits(
        logits, step=0, banned=banned, eos=eos, min_new_tokens=1, temperature=0.5, top_p=0.8
    )
    # Row 0: token 4 banned, EOS (0) banned before min_new_tokens; scores /0.5 -> [., 2, 0, -2]
    # probabilities of tokens 1, 2, 3: e^2, 1, e^-2 normalised = 0.867, 0.117, 0.016: the
    # ascending cumulative sums 0.016 and 0.133 are <= 0.2, so only token 1 is kept.
    assert out[0].tolist() == [float("-inf"), 2.0, float("-inf"), float("-inf"), float("-inf")]
    # Row 1: EOS and the NaN at banned token 4 are -inf; tokens 1-3 tie at 0 / 0.5, ascending
    # cumulative 1/3, 2/3, 1: the first (1/3 > 0.2) already survives.
    assert out[1].tolist() == [float("-inf"), 0.0, 0.0, 0.0, float("-inf")]


def test_process_logits_equals_transformers_processors():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen) * 3
    logits[2, 7] = float("inf")
    logits[3, 9] = float("nan")
    banned, eos = [5, 6], [1, 2]
    for step, temperature, top_p in ((0, 0.7, 0.9), (4, 1.3, 0.5), (4, 1.0, 1.0)):
        ids = torch.zeros(6, 10 + step, dtype=torch.long)
        reference = LogitsProcessorList(
            [
                MinNewTokensLengthLogitsProcessor(10, 3, eos),
                SuppressTokensLogitsProcessor(banned),
                InfNanRemoveLogitsProcessor(),
                TemperatureLogitsWarper(temperature),
                TopPLogitsWarper(top_p),
            ]
        )(ids, logits.clone())
        ours = process_logits(
            logits,
            step=step,
            banned=torch.tensor(banned),
            eos=torch.tensor(eos),
            min_new_tokens=3,
            temperature=temperature,
            top_p=top_p,
        )
        # Row 2's +inf logit is the largest float after InfNanRemove, infinite again after a
        # temperature below 1: both give NaN probabilities there, identically.
        torch.testing.assert_close(
            ours.softmax(-1), reference.softmax(-1), atol=0, rtol=0, equal_nan=True
        )


@pytest.mark.parametrize("settings", SETTINGS, ids=["plain", "warped", "greedy"])
def test_fused_processor_gives_generates_own_processors_tokens(tiny_vlm, prompts, settings):
    """vispo's ``generate`` passes one fused logits processor and none of transformers' own;
    ``model.generate`` with transformers' processors (temperature, top-p, min_new_tokens, the
    suppressed placeholders, the NaN/inf guard) draws the same tokens for the same seed."""
    from transformers import GenerationConfig

    from vispo.rollout.hf import multimodal_token_ids, stop_token_ids

    model, processor = tiny_vlm("qwen2_5_vl")
    batch = prompts("qwen2_5_vl").left_padded()
    settings = dict(settings)
    do_sample = settings.pop("do_sample", True)
    ours = generate(
        model, processor, batch, n=3, max_new_tokens=10, seed=7, do_sample=do_sample, **settings
    )
    eos = stop_token_ids(model, processor)
    config = GenerationConfig(
        do_sample=do_sample,
        **({"top_k": 0, **settings} if do_sample else settings),
        max_new_tokens=10,
        num_return_sequences=3 if do_sample else 1,
        eos_token_id=eos,
        pad_token_id=processor.tokenizer.pad_token_id,
        bos_token_id=None,
        suppress_tokens=multimodal_token_ids(processor),
        remove_invalid_values=True,
    )
    torch.manual_seed(7)
    with torch.no_grad():
        out = model.generate(**batch.model_inputs(), generation_config=config)
    if not do_sample:
        out = out.repeat_interleave(3, dim=0)
    reference = out[:, batch.input_ids.shape[1] :]
    mask = ours.response_mask.bool()
    assert torch.equal(ours.response_ids[mask], reference[:, : mask.shape[1]][mask])
