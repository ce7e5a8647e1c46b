"""Scoring against independent routes, on every tiny architecture.

References: (1) a naive full forward over the batch + log_softmax + gather; (2) each sequence
run alone, unpadded, straight from the processor (independent of vispo's padding, repetition
and pixel-layout code).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vispo.algos import kl_estimate
from vispo.models import (
    ARCHS,
    build_scoring_batch,
    build_tiny_processor,
    encode_prompts,
    pixel_inputs,
    response_mask_from_ids,
    score,
)
from vispo.models.layout import IDEFICS3_LAYOUT, QWEN_LAYOUT, concat_pixels, index_pixels
from vispo.models.tokenizer import SPECIAL_TOKENS, THINK_TOKENS

N = 2  # responses per prompt
T = 6  # response length
ATOL = 1e-5


def _masked(image: Image.Image) -> Image.Image:
    """Black out the top-left 28x28 block (what PAPO's mask does, block by block)."""
    array = np.array(image)
    array[:28, :28] = 0
    return Image.fromarray(array)


@pytest.fixture(scope="module")
def setup(request, sample_images, make_conversation, tiny_vlm):
    """Per arch: model, processor, prompts of different lengths (1, 2, 1 images), responses."""
    cache = {}

    def get(arch):
        if arch in cache:
            return cache[arch]
        model, processor = tiny_vlm(arch)
        messages = [
            make_conversation(1, "What shape is in the image?"),
            make_conversation(2, "Do the two images contain the same shape? Answer in one word."),
            make_conversation(1, "Color?"),
        ]
        images = [[sample_images[0]], [sample_images[1], sample_images[2]], [sample_images[3]]]
        prompts = encode_prompts(processor, messages, images)
        first_plain_id = len(SPECIAL_TOKENS) + len(THINK_TOKENS)
        generator = torch.Generator().manual_seed(0)
        responses = torch.randint(
            first_plain_id, len(processor.tokenizer), (3 * N, T), generator=generator
        )
        eos, pad = prompts.eos_token_ids[0], prompts.pad_token_id
        responses[1, 2] = eos  # stops early; junk after EOS must be ignored
        responses[3, 4:] = pad  # right padding without EOS
        responses[4, 0] = eos  # EOS as the only token
        batch = build_scoring_batch(prompts, responses, repeats=N)
        masked_images = [[_masked(img) for img in imgs] for imgs in images]
        masked = pixel_inputs(processor, masked_images, reference=prompts)
        cache[arch] = dict(
            model=model,
            processor=processor,
            messages=messages,
            images=images,
            masked_images=masked_images,
            prompts=prompts,
            batch=batch,
            masked=masked,
        )
        return cache[arch]

    return get


def _naive(model, batch, variant=None, temperature=1.0):
    """Full forward over all positions, then log_softmax + gather at the response positions."""
    with torch.no_grad():
        logits = model(**batch.model_inputs(variant)).logits.float() / temperature
    Lp = batch.prompt_length
    logprobs = torch.log_softmax(logits[:, Lp - 1 : -1], dim=-1)
    logp = logprobs.gather(-1, batch.response_ids[..., None]).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    mask = batch.response_mask
    return logp * mask, entropy * mask


def test_prompts_are_left_padded_with_expected_image_counts(setup):
    s = setup("qwen2_vl")
    prompts = s["prompts"]
    assert prompts.num_images == [1, 2, 1]
    lengths = prompts.attention_mask.sum(-1)
    assert lengths[1] > lengths[0] > lengths[2]
    for row, length in zip(prompts.attention_mask, lengths):
        assert row.tolist() == [0] * (row.numel() - int(length)) + [1] * int(length)
    image_id = s["processor"].tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (prompts.input_ids == image_id).sum(-1).tolist() == [4, 8, 4]
    assert prompts.pixels["image_grid_thw"].tolist() == [[1, 4, 4]] * 4


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_score_matches_naive_forward_single_and_stacked(setup, arch, temperature):
    s = setup(arch)
    model, batch = s["model"], s["batch"]
    ref_logp, ref_ent = _naive(model, batch, temperature=temperature)
    ref_mlogp, ref_ment = _naive(model, batch, s["masked"], temperature=temperature)

    (single,) = score(model, batch, temperature=temperature, entropy=True)
    torch.testing.assert_close(single.logp, ref_logp, atol=ATOL, rtol=0)
    torch.testing.assert_close(single.entropy, ref_ent, atol=ATOL, rtol=0)
    assert single.logp.dtype == torch.float32 and single.logp.shape == (3 * N, T)

    orig, masked = score(
        model, batch, [None, s["masked"]], temperature=temperature, entropy=[False, True]
    )
    torch.testing.assert_close(orig.logp, ref_logp, atol=ATOL, rtol=0)
    torch.testing.assert_close(masked.logp, ref_mlogp, atol=ATOL, rtol=0)
    torch.testing.assert_close(masked.entropy, ref_ment, atol=ATOL, rtol=0)
    assert orig.entropy is None


@pytest.mark.parametrize("arch", ARCHS)
def test_score_matches_each_sequence_run_alone(setup, arch):
    s = setup(arch)
    model, processor, batch = s["model"], s["processor"], s["batch"]
    (scores,) = score(model, batch)
    for b in range(len(batch)):
        i = b // N
        text = processor.apply_chat_template(
            s["messages"][i], tokenize=False, add_generation_prompt=True
        )
        alone = dict(processor(text=[text], images=[s["images"][i]], return_tensors="pt"))
        length = int(batch.response_mask[b].sum())
        response = batch.response_ids[b, :length]
        prompt_length = alone["input_ids"].shape[1]
        alone["input_ids"] = torch.cat([alone["input_ids"], response[None]], dim=1)
        alone["attention_mask"] = torch.ones_like(alone["input_ids"])
        if "mm_token_type_ids" in alone:
            extra = torch.zeros(1, length, dtype=alone["mm_token_type_ids"].dtype)
            alone["mm_token_type_ids"] = torch.cat([alone["mm_token_type_ids"], extra], dim=1)
        with torch.no_grad():
            logits = model(**alone).logits[0, prompt_length - 1 : -1]
        expected = torch.log_softmax(logits, -1).gather(-1, response[:, None]).squeeze(-1)
        torch.testing.assert_close(scores.logp[b, :length], expected, atol=ATOL, rtol=0)
        assert torch.all(scores.logp[b, length:] == 0)


@pytest.mark.parametrize("arch", ARCHS)
def test_stacked_unstacked_and_micro_batched_agree(setup, arch):
    s = setup(arch)
    model, batch, variants = s["model"], s["batch"], [None, s["masked"]]
    stacked = score(model, batch, variants, entropy=True)
    separate = score(model, batch, variants, entropy=True, stack=False)
    micro = score(model, batch, variants, entropy=True, micro_batch_size=4, chunk_size=3)
    for a, b, c in zip(stacked, separate, micro):
        torch.testing.assert_close(a.logp, b.logp, atol=ATOL, rtol=0)
        torch.testing.assert_close(a.logp, c.logp, atol=ATOL, rtol=0)
        torch.testing.assert_close(a.entropy, c.entropy, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_select_sub_batch_scores_equal_rows_of_full_batch(setup, arch):
    s = setup(arch)
    model, batch = s["model"], s["batch"]
    index = [5, 0, 3, 2]  # across prompts, out of order
    full = score(model, batch, [None, s["masked"]], entropy=True)
    sub = score(model, batch.select(index), [None, s["masked"]], entropy=True)
    for f, p in zip(full, sub):
        torch.testing.assert_close(p.logp, f.logp[index], atol=ATOL, rtol=0)
        torch.testing.assert_close(p.entropy, f.entropy[index], atol=ATOL, rtol=0)
    assert batch.select(index).prompt_index.tolist() == [2, 0, 1, 1]


@pytest.mark.parametrize("arch", ARCHS)
def test_masked_image_keeps_tokens_and_changes_the_model_input_and_logps(setup, arch):
    s = setup(arch)
    prompts, masked = s["prompts"], s["masked"]
    # Same token ids (image-token count) and the same grid for the perturbed images.
    again = encode_prompts(s["processor"], s["messages"], s["masked_images"])
    assert torch.equal(again.input_ids, prompts.input_ids)
    assert torch.equal(again.attention_mask, prompts.attention_mask)
    for key, value in prompts.pixels.items():
        assert masked[key].shape == value.shape
    if "image_grid_thw" in prompts.pixels:
        assert torch.equal(masked["image_grid_thw"], prompts.pixels["image_grid_thw"])
    assert not torch.equal(masked["pixel_values"], prompts.pixels["pixel_values"])
    # ... and the model sees it: the perception KL is clearly non-zero.
    orig, mask = score(s["model"], s["batch"], [None, masked])
    kl = kl_estimate(orig.logp, mask.logp, "k3")
    m = s["batch"].response_mask
    assert float((kl * m).sum() / m.sum()) > 1e-6
    assert float(((orig.logp - mask.logp).abs() * m).max()) > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_pixel_inputs_of_the_same_images_equal_the_prompt_pixels(setup, arch):
    s = setup(arch)
    same = pixel_inputs(s["processor"], s["images"], reference=s["prompts"])
    assert same.keys() == s["prompts"].pixels.keys()
    for key, value in s["prompts"].pixels.items():
        assert torch.equal(same[key], value), key


@pytest.mark.parametrize("arch", ARCHS)
def test_with_pixels_makes_a_variant_the_default(setup, arch):
    s = setup(arch)
    (via_variant,) = score(s["model"], s["batch"], [s["masked"]])
    (via_default,) = score(s["model"], s["batch"].with_pixels(s["masked"]))
    torch.testing.assert_close(via_default.logp, via_variant.logp, atol=0, rtol=0)


def test_a_variant_with_another_image_size_is_rejected(setup):
    s = setup("qwen2_5_vl")
    # max_pixels=56*56 would bring a larger image back to 56x56: use a smaller one
    smaller = [[img.resize((28, 28)) for img in imgs] for imgs in s["images"]]
    with pytest.raises(ValueError, match="keep the original size"):
        pixel_inputs(s["processor"], smaller, reference=s["prompts"])
    unchecked = pixel_inputs(s["processor"], smaller)
    with pytest.raises(ValueError, match="keep the original size"):
        score(s["model"], s["batch"], [unchecked])


def test_right_padded_prompts_score_like_left_padded(setup):
    s = setup("qwen2_vl")
    processor, prompts = s["processor"], s["prompts"]
    right = prompts.select(range(len(prompts)))
    texts = prompts.texts
    encoded = processor(
        text=texts, images=s["images"], padding=True, padding_side="right", return_tensors="pt"
    )
    right.input_ids, right.attention_mask = encoded["input_ids"], encoded["attention_mask"]
    right.token_inputs = {"mm_token_type_ids": encoded["mm_token_type_ids"]}
    assert bool((right.attention_mask[:, -1] == 0).any())
    batch = build_scoring_batch(
        right, s["batch"].response_ids, repeats=N, response_mask=s["batch"].response_mask
    )
    assert torch.equal(batch.input_ids, s["batch"].input_ids)
    (a,), (b,) = score(s["model"], batch), score(s["model"], s["batch"])
    torch.testing.assert_close(a.logp, b.logp, atol=0, rtol=0)


def test_grad_flag_controls_the_graph(setup):
    from vispo.models import build_tiny_vlm

    s = setup("qwen2_vl")
    (no_grad,) = score(s["model"], s["batch"])
    assert not no_grad.logp.requires_grad
    model, _ = build_tiny_vlm("qwen2_vl")  # private copy: we backpropagate into it
    orig, masked = score(model, s["batch"], [None, s["masked"]], grad=True, entropy=True)
    (orig.logp.sum() + masked.entropy.sum()).backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0


def test_build_scoring_batch_layout_by_hand(setup):
    s = setup("qwen2_vl")
    prompts, batch = s["prompts"], s["batch"]
    Lp = prompts.input_ids.shape[1]
    assert batch.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    for b in range(len(batch)):
        assert torch.equal(batch.input_ids[b, :Lp], prompts.input_ids[b // N])
        assert torch.equal(batch.attention_mask[b, :Lp], prompts.attention_mask[b // N])
        assert batch.token_inputs["mm_token_type_ids"][b, Lp:].abs().sum() == 0
    eos, pad = prompts.eos_token_ids[0], prompts.pad_token_id
    assert batch.response_mask[1].tolist() == [1, 1, 1, 0, 0, 0]
    assert batch.response_ids[1, 2] == eos and torch.all(batch.response_ids[1, 3:] == pad)
    assert batch.response_mask[3].tolist() == [1, 1, 1, 1, 0, 0]
    assert batch.response_mask[4].tolist() == [1, 0, 0, 0, 0, 0]
    assert torch.equal(batch.attention_mask[:, Lp:].float(), batch.response_mask)
    pixels = batch.sequence_pixels()
    assert pixels["image_grid_thw"].shape[0] == 2 * (1 + 2 + 1)
    assert pixels["pixel_values"].shape[0] == 2 * 4 * 16


def test_encode_and_batch_errors_name_the_problem(setup, make_conversation, sample_images):
    s = setup("qwen2_vl")
    processor = s["processor"]
    with pytest.raises(ValueError, match="sample 1: its messages have 2 image"):
        encode_prompts(
            processor,
            [make_conversation(1, "a"), make_conversation(2, "b")],
            [[sample_images[0]], [sample_images[1]]],
        )
    with pytest.raises(ValueError, match="one entry per prompt"):
        encode_prompts(processor, [make_conversation(1, "a")], [])
    with pytest.raises(ValueError, match="sample 0, image 0: expected a PIL image"):
        encode_prompts(processor, [make_conversation(1, "a")], [[np.zeros((8, 8, 3))]])
    with pytest.raises(ValueError, match="3 prompts x 2 repeats = 6"):
        build_scoring_batch(s["prompts"], torch.ones(5, 3, dtype=torch.long), repeats=2)
    with pytest.raises(ValueError, match="response_mask shape"):
        build_scoring_batch(
            s["prompts"],
            torch.ones(6, 3, dtype=torch.long),
            repeats=2,
            response_mask=torch.ones(6, 2),
        )
    with pytest.raises(ValueError, match="entropy has 1 flags for 2 variants"):
        score(s["model"], s["batch"], [None, None], entropy=[True])


def test_response_mask_from_ids_by_hand():
    eos, pad = 2, 0
    ids = torch.tensor(
        [
            [5, 6, 2, 7, 7],  # EOS at 2: keep through EOS
            [5, 6, 7, 0, 0],  # no EOS, right-padded
            [2, 0, 0, 0, 0],  # EOS first
            [5, 6, 7, 8, 9],  # full length
            [0, 5, 0, 0, 0],  # pad id inside: real up to the last non-pad token
        ]
    )
    expected = [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert response_mask_from_ids(ids, [eos], pad).tolist() == expected
    # pad == eos (SmolLM2): the first EOS ends the response and is kept
    assert response_mask_from_ids(torch.tensor([[5, 2, 2, 2]]), [2], 2).tolist() == [[1, 1, 0, 0]]


def test_index_pixels_on_a_hand_made_qwen_layout():
    grid = torch.tensor([[1, 2, 2], [1, 2, 4], [1, 2, 2]])  # 4, 8 and 4 patch rows
    rows = torch.arange(16, dtype=torch.float32)[:, None].repeat(1, 3)
    pixels = {"pixel_values": rows, "image_grid_thw": grid}
    out = index_pixels(pixels, QWEN_LAYOUT, num_images=[1, 2], index=[1, 0, 1])
    expected_rows = list(range(4, 16)) + list(range(0, 4)) + list(range(4, 16))
    assert out["pixel_values"][:, 0].tolist() == expected_rows
    # sample 1 = images 1, 2; sample 0 = image 0
    assert out["image_grid_thw"].tolist() == [[1, 2, 4], [1, 2, 2], [1, 2, 2], [1, 2, 4], [1, 2, 2]]
    with pytest.raises(IndexError):
        index_pixels(pixels, QWEN_LAYOUT, num_images=[1, 2], index=[2])


def test_concat_pixels_pads_per_sample_image_slots():
    a = {"pixel_values": torch.ones(2, 1, 3, 4, 4), "pixel_attention_mask": torch.ones(2, 1, 4, 4)}
    b = {
        "pixel_values": torch.full((1, 2, 3, 4, 4), 2.0),
        "pixel_attention_mask": torch.ones(1, 2, 4, 4),
    }
    out = concat_pixels([a, b], IDEFICS3_LAYOUT)
    assert out["pixel_values"].shape == (3, 2, 3, 4, 4)
    assert torch.all(out["pixel_values"][:2, 1] == 0) and torch.all(out["pixel_values"][:2, 0] == 1)
    assert torch.all(out["pixel_values"][2] == 2)
    assert out["pixel_attention_mask"][:2, 1].sum() == 0


def test_processor_with_unknown_layout_is_rejected():
    from vispo.models.layout import layout_for

    processor = build_tiny_processor("qwen2_vl")
    with pytest.raises(ValueError, match="no pixel layout known"):
        layout_for(processor.tokenizer)


@pytest.mark.parametrize("arch", ARCHS)
def test_text_only_and_image_prompts_mix(tiny_vlm, sample_images, make_conversation, arch):
    model, processor = tiny_vlm(arch)
    text_only = [{"role": "user", "content": "What is 2+3?"}]
    prompts = encode_prompts(
        processor, [text_only, make_conversation(1, "Shape?")], [[], [sample_images[0]]]
    )
    assert prompts.num_images == [0, 1]
    responses = torch.arange(30, 50).reshape(4, 5)
    batch = build_scoring_batch(prompts, responses, repeats=2)
    (full,) = score(model, batch)
    torch.testing.assert_close(full.logp, _naive(model, batch)[0], atol=ATOL, rtol=0)
    text_rows = batch.select([0, 1])
    assert text_rows.sequence_pixels() == {}  # no image at all: no pixel inputs
    (sub,) = score(model, text_rows)
    torch.testing.assert_close(sub.logp, full.logp[:2], atol=ATOL, rtol=0)


def test_prompt_batch_select_keeps_each_prompts_pixels(setup):
    s = setup("qwen2_vl")
    prompts = s["prompts"]
    picked = prompts.select([2, 1])
    assert picked.num_images == [1, 2]
    assert torch.equal(picked.input_ids, prompts.input_ids[[2, 1]])
    grid = prompts.pixels["image_grid_thw"]
    assert torch.equal(picked.pixels["image_grid_thw"], grid[[3, 1, 2]])
    pv = prompts.pixels["pixel_values"]
    assert torch.equal(picked.pixels["pixel_values"], torch.cat([pv[48:64], pv[16:48]]))
    assert picked.texts == [prompts.texts[2], prompts.texts[1]]


def test_bf16_autocast_scores_like_a_naive_autocast_forward(setup):
    """``autocast=torch.bfloat16``: the forward runs in bfloat16 (the logits reaching the
    log-softmax are bfloat16) and the log-probs equal the naive route under the same autocast;
    they differ from float32 by bfloat16 rounding only, and gradients reach float32 weights."""
    s = setup("qwen2_vl")
    batch = s["batch"]
    from vispo.models import build_tiny_vlm

    model, _ = build_tiny_vlm("qwen2_vl")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_logp, ref_ent = _naive(model, batch)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    (bf16,) = score(model, batch, entropy=True, grad=True, autocast=torch.bfloat16)
    hook.remove()
    (fp32,) = score(model, batch, entropy=True)
    assert seen == [torch.bfloat16]
    assert bf16.logp.dtype == torch.float32
    torch.testing.assert_close(bf16.logp.detach(), ref_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(bf16.entropy.detach(), ref_ent, atol=1e-5, rtol=0)
    gap = (bf16.logp.detach() - fp32.logp).abs().max().item()
    assert 0 < gap < 0.1  # bfloat16 rounding: visible, and small
    bf16.logp.sum().backward()
    assert model.lm_head.weight.grad.dtype == torch.float32
    assert model.lm_head.weight.grad.abs().sum() > 0
