"""The shared-prefix forward (vispo.models.prefix) against the plain one, on every tiny arch.

The plain forward repeats each prompt (image included) for every response; the shared one runs
each distinct prompt once and the responses against its KV cache. Log-probs, entropies and the
gradient of every parameter must agree to float32 rounding, with left-padded prompts of
different lengths, 1 or 2 images per prompt, a perturbed image variant, responses of different
lengths, micro-batches, scattered sub-batches and unstacked variants.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from vispo.models import ARCHS, build_scoring_batch, encode_prompts, pixel_inputs, prefix, score
from vispo.models.adapt import enable_gradient_checkpointing
from vispo.models.prefix import shared_prefix_unsupported
from vispo.models.tokenizer import SPECIAL_TOKENS, THINK_TOKENS

G = 3  # responses per prompt
T = 7  # response length


def _masked(image: Image.Image) -> Image.Image:
    array = np.array(image)
    array[:28, 16:44] = 0
    return Image.fromarray(array)


@pytest.fixture(scope="module")
def setup(tiny_vlm, sample_images, make_conversation):
    cache = {}

    def get(arch):
        if arch not in cache:
            model, processor = tiny_vlm(arch)
            messages = [
                make_conversation(1, "What shape is in the image?"),
                make_conversation(2, "Do the two images show the same shape? Answer in a word."),
                make_conversation(1, "Color?"),
            ]
            images = [[sample_images[0]], [sample_images[1], sample_images[2]], [sample_images[3]]]
            prompts = encode_prompts(processor, messages, images)
            first_plain = len(SPECIAL_TOKENS) + len(THINK_TOKENS)
            gen = torch.Generator().manual_seed(1)
            responses = torch.randint(
                first_plain, len(processor.tokenizer), (3 * G, T), generator=gen
            )
            mask = torch.ones(3 * G, T)
            mask[1, 4:] = 0  # shorter responses, right-padded
            mask[5, 1:] = 0
            mask[7, 6:] = 0
            batch = build_scoring_batch(prompts, responses, repeats=G, response_mask=mask)
            masked = pixel_inputs(
                processor, [[_masked(im) for im in ims] for ims in images], reference=prompts
            )
            cache[arch] = (model, batch, masked)
        return cache[arch]

    return get


def _scores_and_grads(model, batch, variants, **kw):
    """Scores of every variant and the gradient of a loss that reads all of them."""
    model = copy.deepcopy(model).train()
    out = score(model, batch, variants, entropy=True, grad=True, **kw)
    weights = torch.linspace(0.5, 1.5, batch.response_mask.shape[1])
    loss = sum((s.logp * weights).sum() + 0.3 * s.entropy.sum() for s in out)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_same(plain, shared):
    (s_plain, g_plain), (s_shared, g_shared) = plain, shared
    for a, b in zip(s_plain, s_shared):
        torch.testing.assert_close(b.logp, a.logp, atol=2e-6, rtol=0)
        torch.testing.assert_close(b.entropy, a.entropy, atol=2e-6, rtol=0)
    assert g_plain.keys() == g_shared.keys()
    largest = max(g.abs().max() for g in g_plain.values())
    worst = max((g_shared[n] - g).abs().max() / largest for n, g in g_plain.items())
    assert worst <= 1e-5, f"max gradient difference / largest gradient = {worst:.2e}"


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prefix_equals_plain_forward_with_gradients(setup, arch):
    model, batch, masked = setup(arch)
    variants = [None, masked]
    shared = _scores_and_grads(model, batch, variants, shared_prefix=True)
    _assert_same(_scores_and_grads(model, batch, variants), shared)
    # The vision tower receives its gradient through the shared prefix (nothing is detached).
    assert any("vis" in n and g.abs().sum() > 0 for n, g in shared[1].items())


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "idefics3"])
def test_shared_prefix_micro_batches_scattered_rows_and_unstacked(setup, arch):
    model, batch, masked = setup(arch)
    plain = _scores_and_grads(model, batch, [None, masked])
    for kw in (dict(micro_batch_size=G), dict(micro_batch_size=2), dict(stack=False)):
        _assert_same(
            plain, _scores_and_grads(model, batch, [None, masked], shared_prefix=True, **kw)
        )
    # A sub-batch whose rows come from prompts in another order, one prompt twice.
    rows = torch.tensor([7, 0, 4, 2, 8])
    sub = batch.select(rows)
    _assert_same(
        _scores_and_grads(model, sub, [masked, None]),
        _scores_and_grads(model, sub, [masked, None], shared_prefix=True),
    )


def test_one_token_responses_need_only_the_prompt_pass(setup):
    model, batch, _ = setup("qwen2_vl")
    short = build_scoring_batch(
        batch.prompts, batch.response_ids[:, :1], repeats=G, response_mask=torch.ones(3 * G, 1)
    )
    (plain,) = score(model, short, entropy=True)
    (shared,) = score(model, short, entropy=True, shared_prefix=True)
    torch.testing.assert_close(shared.logp, plain.logp, atol=2e-6, rtol=0)
    torch.testing.assert_close(shared.entropy, plain.entropy, atol=2e-6, rtol=0)


def _checkpointed(model):
    model = enable_gradient_checkpointing(copy.deepcopy(model))
    assert shared_prefix_unsupported(model) is None
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prefix_under_activation_checkpointing_equals_plain_forward(
    setup, arch, monkeypatch
):
    """Checkpointed layers run twice (forward, and the recompute in backward); the stateless
    caches give the recompute the same keys and values, so nothing is appended twice."""
    model, batch, masked = setup(arch)
    variants = [None, masked]
    plain = _scores_and_grads(model, batch, variants)
    checkpointed = _checkpointed(model)
    # The recompute really happens: every layer's cache update runs twice in each pass.
    calls = {"record": 0, "serve": 0}

    def counting(cls, name):
        update = cls.update

        def counted(self, *args, **kwargs):
            calls[name] += 1
            return update(self, *args, **kwargs)

        return counted

    with monkeypatch.context() as m:
        m.setattr(prefix._RecordLayer, "update", counting(prefix._RecordLayer, "record"))
        m.setattr(prefix._ServeLayer, "update", counting(prefix._ServeLayer, "serve"))
        shared = _scores_and_grads(checkpointed, batch, variants, shared_prefix=True)
    layers = checkpointed.config.get_text_config().num_hidden_layers
    assert calls == {"record": 2 * layers, "serve": 2 * layers}
    _assert_same(plain, shared)
    _assert_same(plain, _scores_and_grads(checkpointed, batch, variants))
    assert any("vis" in n and g.abs().sum() > 0 for n, g in shared[1].items())


def test_shared_prefix_under_checkpointing_with_micro_batches_and_lora(setup):
    from vispo.models.adapt import apply_lora

    model, batch, masked = setup("qwen2_5_vl")
    plain = _scores_and_grads(model, batch, [None, masked])
    ckpt = _checkpointed(model)
    _assert_same(
        plain,
        _scores_and_grads(ckpt, batch, [None, masked], shared_prefix=True, micro_batch_size=G),
    )
    lora = apply_lora(copy.deepcopy(model), r=4, alpha=8)
    for p in lora.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(0))
    _assert_same(
        _scores_and_grads(lora, batch, [None, masked]),
        _scores_and_grads(_checkpointed(lora), batch, [None, masked], shared_prefix=True),
    )


def test_reentrant_checkpointing_is_reported_unsupported(tiny_vlm):
    model, _ = tiny_vlm("qwen2_vl")
    assert shared_prefix_unsupported(model) is None
    reentrant = copy.deepcopy(model)
    reentrant.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": True}
    )
    assert "reentrant" in shared_prefix_unsupported(reentrant)


def test_shared_prefix_with_lora_adapters(setup):
    from vispo.models.adapt import apply_lora

    model, batch, masked = setup("qwen2_vl")
    lora = apply_lora(copy.deepcopy(model), r=4, alpha=8)
    for p in lora.parameters():  # LoRA B starts at zero: give the adapters some effect
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(0))
    _assert_same(
        _scores_and_grads(lora, batch, [None, masked]),
        _scores_and_grads(lora, batch, [None, masked], shared_prefix=True),
    )


def test_shared_prefix_under_bf16_autocast_is_close_to_the_plain_path(setup):
    model, batch, _ = setup("qwen2_5_vl")
    (plain,) = score(model, batch, autocast=torch.bfloat16)
    (shared,) = score(model, batch, autocast=torch.bfloat16, shared_prefix=True)
    (exact,) = score(model, batch)
    # bf16 rounds differently along the two routes; both are as close to float32 as each other.
    err_plain = (plain.logp - exact.logp).abs().max()
    err_shared = (shared.logp - exact.logp).abs().max()
    assert err_shared <= 2 * err_plain + 1e-3, (err_shared, err_plain)
