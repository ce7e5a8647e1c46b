"""One decode with a response count per prompt, and NoisyRollout's clean and noised prompts
through that one decode.

- The shared-prefix sampler with per-prompt counts draws exactly what ``generate`` draws on the
  same prompts repeated by those counts (same seed, same tokens), stopped rows leaving the
  forward included.
- Greedy decoding: every row equals its prompt's single greedy response.
- NoisyRollout: with a rollout seeded per prompt key (batch-invariant mode), one decode gives
  the same responses as the two calls (clean, then noised) in the same layout; unseeded, the
  rows draw from the same per-row distributions, only from other random numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vispo.models import encode_prompts
from vispo.rollout.hf import concat_rollouts, generate
from vispo.train import batch as B

ARCH = "qwen2_5_vl"


@pytest.fixture(scope="module")
def setup(tiny_vlm, sample_images, make_conversation):
    model, processor = tiny_vlm(ARCH)
    messages = [
        make_conversation(1, "What shape is in the image?"),
        make_conversation(2, "Do the two images show the same shape? Answer in one word."),
        make_conversation(1, "Color?"),
    ]
    images = [[sample_images[0]], [sample_images[1], sample_images[2]], [sample_images[3]]]
    return model, processor, messages, images, encode_prompts(processor, messages, images)


@pytest.mark.parametrize(
    "settings",
    [dict(), dict(temperature=0.7, top_p=0.9, min_new_tokens=2)],
    ids=["plain", "warped"],
)
def test_per_prompt_counts_draw_what_generate_draws_on_repeated_prompts(setup, settings):
    model, processor, _, _, prompts = setup
    counts = [3, 1, 2]
    kw = dict(max_new_tokens=10, seed=5, **settings)
    free = generate(model, processor, prompts, n=2, **kw)
    # Stop tokens the model samples often, so rows stop at different steps and leave the forward.
    eos = torch.bincount(free.response_ids.flatten()).topk(3).indices.tolist()
    shared = generate(
        model, processor, prompts, n=counts, shared_prefix=True, eos_token_ids=eos, **kw
    )
    repeated = prompts.select(torch.tensor([0, 0, 0, 1, 2, 2]))
    reference = generate(model, processor, repeated, n=1, eos_token_ids=eos, **kw)
    assert len(set(reference.lengths.tolist())) > 2
    assert torch.equal(shared.response_ids, reference.response_ids)
    assert torch.equal(shared.lengths, reference.lengths)
    assert shared.prompt_index.tolist() == [0, 0, 0, 1, 2, 2] and shared.n == 0
    # The unshared path with counts repeats the prompts the same way.
    plain = generate(model, processor, prompts, n=counts, eos_token_ids=eos, **kw)
    assert torch.equal(plain.response_ids, reference.response_ids)


@pytest.mark.parametrize("shared", [False, True])
def test_greedy_counts_repeat_each_prompts_response(setup, shared):
    model, processor, _, _, prompts = setup
    kw = dict(max_new_tokens=8, do_sample=False, shared_prefix=shared)
    one = generate(model, processor, prompts, n=1, **kw)
    out = generate(model, processor, prompts, n=[2, 1, 3], **kw)
    rows = torch.tensor([0, 0, 1, 2, 2, 2])
    assert torch.equal(out.response_ids, one.response_ids[rows])
    assert out.texts == [one.texts[i] for i in rows.tolist()]


def test_counts_are_checked(setup):
    model, processor, _, _, prompts = setup
    with pytest.raises(ValueError, match="one count >= 1 per prompt"):
        generate(model, processor, prompts, n=[2, 2], max_new_tokens=2)
    with pytest.raises(ValueError, match="one count >= 1 per prompt"):
        generate(model, processor, prompts, n=[2, 0, 1], max_new_tokens=2)


def _seeded_rollout(model, processor, shared: bool):
    """The trainer's batch-invariant rollout: each prompt on its own, seeded by its key."""

    def run(prompts, keys, n):
        counts = [n] * len(keys) if isinstance(n, int) else n
        parts = [
            generate(
                model,
                processor,
                B.trim_left_padding(prompts.select([i])),
                n=count,
                max_new_tokens=6,
                seed=int(B.prompt_rng(3, key, 1).integers(2**62)),
                shared_prefix=shared,
            )
            for i, (key, count) in enumerate(zip(keys, counts))
        ]
        return concat_rollouts(parts, prompts.pad_token_id)

    return run


def _unseeded_greedy(model, processor, calls):
    def run(prompts, keys, n):
        calls.append(n)
        return generate(model, processor, prompts, n=n, max_new_tokens=6, do_sample=False)

    return run


@pytest.mark.parametrize("shared", [False, True])
def test_noisy_rollout_one_decode_equals_two_calls_when_seeded_per_key(setup, shared):
    model, processor, messages, images, prompts = setup
    keys = [(4, 1, i) for i in range(3)]
    kw = dict(seed=3, n=4, n_noisy=1, signal=0.8, noise_std=0.3)
    run = _seeded_rollout(model, processor, shared)
    two = B.mixed_rollout(run, processor, prompts, messages, images, keys, **kw)
    one = B.mixed_rollout(run, processor, prompts, messages, images, keys, one_decode=True, **kw)
    assert torch.equal(one.response_ids, two.response_ids)
    assert one.texts == two.texts
    assert one.n == two.n == 4
    assert one.prompt_index.tolist() == two.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_noisy_rollout_one_decode_layout(setup):
    """Greedy: each row is its own copy's response, so the layout is visible: prompt i's
    3 clean rows (the clean prompt's response), then its noised row, in one call."""
    model, processor, messages, images, prompts = setup
    keys = [(0, 1, i) for i in range(3)]
    kw = dict(seed=3, n=4, n_noisy=1, signal=0.5, noise_std=0.5)
    calls = []
    one = B.mixed_rollout(
        _unseeded_greedy(model, processor, calls),
        processor,
        prompts,
        messages,
        images,
        keys,
        one_decode=True,
        **kw,
    )
    assert calls == [[3, 1] * 3]
    clean = generate(model, processor, prompts, n=1, max_new_tokens=6, do_sample=False)
    noisy_images = B.noised_images(images, keys, 3, signal=0.5, noise_std=0.5)
    noisy = generate(
        model,
        processor,
        encode_prompts(processor, messages, noisy_images),
        n=1,
        max_new_tokens=6,
        do_sample=False,
    )
    expected = []
    for i in range(3):
        expected += [clean.texts[i]] * 3 + [noisy.texts[i]]
    assert one.texts == expected
    assert one.n == 4 and one.prompt_index.tolist() == np.repeat(np.arange(3), 4).tolist()
    assert clean.texts != noisy.texts  # the noise changes what the model says
