"""Freezing the vision tower, LoRA (vision excluded by default), gradient checkpointing."""

from __future__ import annotations

import pytest
import torch

from vispo.models import (
    ARCHS,
    TinySpec,
    apply_lora,
    build_scoring_batch,
    build_tiny_vlm,
    count_parameters,
    enable_gradient_checkpointing,
    encode_prompts,
    freeze_vision_tower,
    language_parameters,
    lora_target_names,
    score,
    vision_module_names,
    vision_parameters,
)

VISION_ROOT = {
    "qwen2_vl": "model.visual",
    "qwen2_5_vl": "model.visual",
    "qwen3_vl": "model.visual",
    "idefics3": "model.vision_model",
}


def _batch(processor, images, make_conversation):
    prompts = encode_prompts(
        processor,
        [make_conversation(1, "What shape?"), make_conversation(1, "What color is the shape?")],
        [[images[0]], [images[1]]],
    )
    responses = torch.arange(20, 28).reshape(2, 4).repeat_interleave(2, dim=0)
    return build_scoring_batch(prompts, responses, repeats=2)


def _train_step(model, batch):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    (scores,) = score(model, batch, grad=True)
    (-scores.logp.sum()).backward()
    optimizer.step()


@pytest.mark.parametrize("arch", ARCHS)
def test_vision_and_language_parameters_partition_the_model(arch):
    model, _ = build_tiny_vlm(arch)
    assert vision_module_names(model) == [VISION_ROOT[arch]]
    vision = dict(vision_parameters(model))
    language = dict(language_parameters(model))
    assert set(vision).isdisjoint(language)
    assert set(vision) | set(language) == {n for n, _ in model.named_parameters()}
    assert all(n.startswith(VISION_ROOT[arch] + ".") for n in vision)
    assert "lm_head.weight" in language


@pytest.mark.parametrize("arch", ARCHS)
def test_freeze_vision_tower_stops_its_updates(arch, sample_images, make_conversation):
    model, processor = build_tiny_vlm(arch)
    vision_count = sum(p.numel() for _, p in vision_parameters(model))
    assert freeze_vision_tower(model) == vision_count
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - vision_count
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_step(model, _batch(processor, sample_images, make_conversation))
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n, _ in vision_parameters(model))
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])


def _hand_lora_count(spec: TinySpec, r: int) -> int:
    """r * (in + out) for q, k, v, o, gate, up, down of every decoder layer."""
    h, kv, inter = spec.hidden_size, spec.num_kv_heads * spec.head_dim, spec.intermediate_size
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]
    return spec.num_layers * sum(r * (i + o) for i, o in shapes)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_trains_only_adapters_and_leaves_vision_untouched(
    arch, sample_images, make_conversation
):
    model, processor = build_tiny_vlm(arch)
    batch = _batch(processor, sample_images, make_conversation)
    (base_scores,) = score(model, batch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora = apply_lora(model, r=4, alpha=8)
    assert (
        count_parameters(lora, trainable_only=True)
        == _hand_lora_count(TinySpec(), r=4)
        == 2 * 4 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
    )
    lora_names = [n for n, _ in lora.named_parameters() if "lora_" in n]
    vision_root = vision_module_names(lora)[0]
    assert lora_names and not any(n.startswith(vision_root + ".") for n in lora_names)
    # LoRA's B matrices start at zero: the wrapped model computes exactly the base model.
    (lora_scores,) = score(lora, batch)
    torch.testing.assert_close(lora_scores.logp, base_scores.logp, atol=0, rtol=0)
    _train_step(lora, batch)
    for name, param in lora.named_parameters():
        if "lora_" in name:
            continue
        original = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(param, before[original]), name
    (trained,) = score(lora, batch)
    assert not torch.allclose(trained.logp, base_scores.logp)


def test_lora_include_vision_and_custom_targets():
    model, _ = build_tiny_vlm("qwen2_5_vl")
    language_only = lora_target_names(model)
    with_vision = lora_target_names(model, include_vision=True)
    added = [n for n in with_vision if n.startswith("model.visual.")]
    assert set(with_vision) - set(language_only) == set(added)
    linear_in_vision = [
        n
        for n, m in model.named_modules()
        if n.startswith("model.visual.") and isinstance(m, torch.nn.Linear)
    ]
    assert sorted(added) == sorted(linear_in_vision)
    assert lora_target_names(model, ["q_proj"]) == [
        f"model.language_model.layers.{i}.self_attn.q_proj" for i in range(2)
    ]
    lora = apply_lora(model, r=2, target_modules=["q_proj"])
    assert count_parameters(lora, trainable_only=True) == 2 * 2 * (64 + 64)
    with pytest.raises(ValueError, match="no linear layer matches"):
        lora_target_names(model, ["nonexistent"])
    with pytest.raises(ValueError, match="r must be >= 1"):
        apply_lora(build_tiny_vlm("qwen2_vl")[0], r=0)


@pytest.mark.parametrize("arch", ["qwen2_vl", "idefics3"])
def test_gradient_checkpointing_gives_the_same_gradients(arch, sample_images, make_conversation):
    grads = []
    for checkpointing in (False, True):
        model, processor = build_tiny_vlm(arch)
        if checkpointing:
            enable_gradient_checkpointing(model)
            assert model.is_activation_checkpointing and model.config.use_cache is False
        model.train()
        batch = _batch(processor, sample_images, make_conversation)
        (scores,) = score(model, batch, grad=True)
        scores.logp.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_lora_wrapped_model_generates_and_scores_through_the_wrapper(
    sample_images, make_conversation
):
    from vispo.rollout import generate

    model, processor = build_tiny_vlm("qwen3_vl")
    prompts = encode_prompts(processor, [make_conversation(1, "Shape?")], [[sample_images[0]]])
    base = generate(model, processor, prompts, n=2, max_new_tokens=4, do_sample=False)
    lora = apply_lora(model, r=2)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.fill_(0.5)  # a non-trivial adapter: the wrapper must be what runs
    wrapped = generate(lora, processor, prompts, n=2, max_new_tokens=4, do_sample=False)
    batch = build_scoring_batch(
        prompts, wrapped.response_ids, repeats=2, response_mask=wrapped.response_mask
    )
    (via_wrapper,) = score(lora, batch)
    with torch.no_grad():
        merged = lora.merge_and_unload()  # plain model with the adapter folded into its weights
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    (via_merged,) = score(merged, batch)
    torch.testing.assert_close(via_wrapper.logp, via_merged.logp, atol=1e-5, rtol=0)
    assert not torch.equal(wrapped.response_ids, base.response_ids)
