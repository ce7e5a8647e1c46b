"""HF generate backend: greedy equals a hand-rolled loop, EOS handling, seeding, sampling law."""

from __future__ import annotations

import math

import pytest
import torch

from vispo.models import (
    ARCHS,
    build_scoring_batch,
    build_tiny_vlm,
    encode_prompts,
    positions_from_mask,
)
from vispo.models.tokenizer import build_tokenizer
from vispo.rollout import finish_responses, generate

MAX_NEW = 6


@pytest.fixture(scope="module")
def prompts_for(tiny_vlm, sample_images, make_conversation):
    cache = {}

    def get(arch):
        if arch not in cache:
            model, processor = tiny_vlm(arch)
            messages = [
                make_conversation(1, "What shape is in the image?"),
                make_conversation(2, "Do the images contain the same colour? Answer in one word."),
                make_conversation(1, "Colour?"),
            ]
            images = [[sample_images[0]], [sample_images[1], sample_images[2]], [sample_images[3]]]
            cache[arch] = (model, processor, encode_prompts(processor, messages, images))
        return cache[arch]

    return get


def _hand_greedy(model, prompts, n, steps):
    """Greedy decoding by repeated full forwards (no KV cache), n copies per prompt."""
    batch = build_scoring_batch(
        prompts, torch.zeros(len(prompts) * n, 0, dtype=torch.long), repeats=n
    )
    ids, mask, tokens = batch.input_ids, batch.attention_mask, dict(batch.token_inputs)
    pixels = batch.sequence_pixels()
    out = []
    with torch.no_grad():
        for _ in range(steps):
            inputs = {"input_ids": ids, "attention_mask": mask, **tokens, **pixels}
            if not prompts.layout.model_positions:
                inputs["position_ids"] = positions_from_mask(mask)
            nxt = model(**inputs).logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            ids = torch.cat([ids, nxt], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            tokens = {k: torch.cat([v, torch.zeros_like(nxt)], 1) for k, v in tokens.items()}
    return torch.cat(out, 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_equals_hand_rolled_greedy_loop(prompts_for, arch):
    model, processor, prompts = prompts_for(arch)
    rollout = generate(model, processor, prompts, n=2, max_new_tokens=MAX_NEW, do_sample=False)
    expected = _hand_greedy(model, prompts, n=2, steps=MAX_NEW)
    eos = processor.tokenizer.eos_token_id
    assert not bool((expected == eos).any())  # no early stop in this random model
    assert torch.equal(rollout.response_ids, expected)
    assert rollout.response_mask.tolist() == [[1.0] * MAX_NEW] * 6
    assert rollout.lengths.tolist() == [MAX_NEW] * 6
    assert rollout.stopped.tolist() == [False] * 6 and rollout.truncated.all()
    assert rollout.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert rollout.texts == processor.tokenizer.batch_decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("arch", ["qwen2_vl", "idefics3"])
def test_eos_stops_a_response_and_masks_what_follows(prompts_for, arch):
    model, processor, prompts = prompts_for(arch)
    greedy = _hand_greedy(model, prompts, n=1, steps=MAX_NEW)
    stop = int(greedy[0, 2])  # declare the 3rd greedy token of prompt 0 an EOS
    rollout = generate(
        model,
        processor,
        prompts,
        n=1,
        max_new_tokens=MAX_NEW,
        do_sample=False,
        eos_token_ids=[stop],
    )
    pad = processor.tokenizer.pad_token_id
    for b in range(3):
        hits = (greedy[b] == stop).nonzero().flatten().tolist()
        length = hits[0] + 1 if hits else MAX_NEW
        row = rollout.response_ids[b]
        assert int(rollout.lengths[b]) == length
        assert bool(rollout.stopped[b]) == bool(hits)
        assert torch.equal(row[:length], greedy[b, :length])
        assert torch.all(row[length:] == pad)
        assert rollout.response_mask[b].tolist() == [1.0] * length + [0.0] * (row.numel() - length)
        assert rollout.texts[b] == processor.tokenizer.decode(
            greedy[b, :length], skip_special_tokens=True
        )
    assert int(rollout.lengths[0]) <= 3 and bool(rollout.stopped[0])


def test_min_new_tokens_suppresses_an_early_eos(prompts_for):
    model, processor, prompts = prompts_for("qwen2_vl")
    greedy = _hand_greedy(model, prompts, n=1, steps=1)
    stop = int(greedy[0, 0])  # prompt 0 would stop immediately
    free = generate(
        model, processor, prompts, n=1, max_new_tokens=5, do_sample=False, eos_token_ids=[stop]
    )
    assert int(free.lengths[0]) == 1
    forced = generate(
        model,
        processor,
        prompts,
        n=1,
        max_new_tokens=5,
        min_new_tokens=3,
        do_sample=False,
        eos_token_ids=[stop],
    )
    assert bool((forced.lengths >= 3).all())
    assert not bool((forced.response_ids[:, :2] == stop).any())


def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone(prompts_for):
    model, processor, prompts = prompts_for("qwen2_5_vl")
    state = torch.random.get_rng_state()
    a = generate(model, processor, prompts, n=3, max_new_tokens=MAX_NEW, seed=7)
    b = generate(model, processor, prompts, n=3, max_new_tokens=MAX_NEW, seed=7)
    c = generate(model, processor, prompts, n=3, max_new_tokens=MAX_NEW, seed=8)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.response_ids, b.response_ids)
    assert not torch.equal(a.response_ids, c.response_ids)
    assert a.response_ids.shape == (9, MAX_NEW)
    # the n samples of one prompt differ (sampling, not greedy)
    assert len({tuple(r.tolist()) for r in a.response_ids[:3]}) == 3


@pytest.fixture(scope="module")
def peaked():
    """A private tiny model with sharpened logits and a text-only prompt (fast to sample)."""
    model, processor = build_tiny_vlm("qwen2_vl", seed=5)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    prompts = encode_prompts(processor, [[{"role": "user", "content": "Name a colour."}]], [[]])
    with torch.no_grad():
        logits = model(**prompts.model_inputs()).logits[0, -1].float()
    return model, processor, prompts, logits


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampling_follows_the_tempered_softmax_with_no_top_k(peaked, temperature):
    model, processor, prompts, logits = peaked
    # Checkpoint defaults that must NOT leak into RL sampling:
    model.generation_config.top_k = 1
    model.generation_config.suppress_tokens = [int(logits.argmax())]
    n = 2000
    rollout = generate(
        model, processor, prompts, n=n, max_new_tokens=1, temperature=temperature, seed=0
    )
    assert model.generation_config.top_k == 1  # restored after the call
    assert model.generation_config.suppress_tokens == [int(logits.argmax())]
    first = rollout.response_ids[:, 0]
    probs = torch.softmax(logits / temperature, -1)
    order = probs.argsort(descending=True)
    for k in (1, 5, 50):
        mass = float(probs[order[:k]].sum())
        frac = float(torch.isin(first, order[:k]).float().mean())
        sigma = math.sqrt(mass * (1 - mass) / n)
        assert abs(frac - mass) < 4 * sigma + 1e-3, (k, frac, mass)
    assert float(probs[order[:50]].sum()) < 0.95  # so a top-50 cut would have been visible


def test_top_p_samples_only_inside_the_nucleus(peaked):
    model, processor, prompts, logits = peaked
    top_p = 0.6
    rollout = generate(model, processor, prompts, n=500, max_new_tokens=1, top_p=top_p, seed=1)
    probs = torch.softmax(logits, -1)
    sorted_probs, order = probs.sort(descending=True)
    size = int((sorted_probs.cumsum(0) < top_p).sum()) + 1  # smallest prefix with mass >= top_p
    nucleus = order[:size]
    assert 1 < size < 200
    assert bool(torch.isin(rollout.response_ids[:, 0], nucleus).all())
    assert rollout.response_ids[:, 0].unique().numel() > 1


def test_finish_responses_by_hand():
    tokenizer = build_tokenizer(0)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    a, b, c = (tokenizer.convert_tokens_to_ids(t) for t in ("Ġred", "Ġcircle", "Ġyes"))
    prompt = [7, 7]
    sequences = torch.tensor(
        [
            prompt + [a, b, eos, pad],  # stops at position 2
            prompt + [a, b, c, a],  # truncated at the cap
            prompt + [eos, pad, pad, pad],  # stops immediately
            prompt + [c, eos, a, b],  # junk after EOS is dropped
        ]
    )
    rollout = finish_responses(
        sequences, 2, eos_token_ids=[eos], pad_token_id=pad, tokenizer=tokenizer, n=2
    )
    assert rollout.response_mask.tolist() == [
        [1, 1, 1, 0],
        [1, 1, 1, 1],
        [1, 0, 0, 0],
        [1, 1, 0, 0],
    ]
    assert rollout.lengths.tolist() == [3, 4, 1, 2]
    assert rollout.stopped.tolist() == [True, False, True, True]
    assert rollout.response_ids[3].tolist() == [c, eos, pad, pad]
    assert rollout.texts == [" red circle", " red circle yes red", "", " yes"]
    assert rollout.prompt_index.tolist() == [0, 0, 1, 1]


def test_generate_validates_its_arguments(prompts_for):
    model, processor, prompts = prompts_for("qwen2_vl")
    cases = [
        (dict(n=0, max_new_tokens=4), "n must be >= 1"),
        (dict(n=1, max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(n=1, max_new_tokens=4, min_new_tokens=5), "min_new_tokens"),
        (dict(n=1, max_new_tokens=4, temperature=0.0), "temperature must be > 0"),
        (dict(n=1, max_new_tokens=4, top_p=0.0), "top_p must be in"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            generate(model, processor, prompts, **kwargs)


@pytest.mark.parametrize("arch", ["qwen2_vl", "idefics3"])
def test_image_placeholder_tokens_are_never_generated(arch, sample_images, make_conversation):
    from vispo.models.scoring import encode_prompts
    from vispo.models.tiny import build_tiny_vlm
    from vispo.rollout.hf import generate, multimodal_token_ids

    model, processor = build_tiny_vlm(arch, seed=3)
    ids = multimodal_token_ids(processor)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert image_id in ids

    # Make the image placeholder the most likely next token everywhere.
    def boost(module, inputs, output):
        output[..., image_id] += 100.0
        return output

    handle = model.lm_head.register_forward_hook(boost)
    try:
        prompts = encode_prompts(
            processor, [make_conversation(1, "Describe.")], [sample_images[:1]]
        )
        with torch.no_grad():  # control: unsuppressed, the placeholder is the argmax
            logits = model(**prompts.model_inputs()).logits[:, -1]
        assert int(logits.argmax(-1)) == image_id
        out = generate(model, processor, prompts, n=4, max_new_tokens=6, seed=0)
        assert not any(i in ids for i in out.response_ids[out.response_mask.bool()].tolist())
        assert out.lengths.min() >= 1
    finally:
        handle.remove()
