"""Tiny offline models: tokenizer, architectures, processors, save/load round trip."""

from __future__ import annotations

import json
import os

import pytest
import torch

from vispo.models import (
    ARCHS,
    TinySpec,
    build_tiny_processor,
    build_tiny_vlm,
    build_tokenizer,
    count_parameters,
    language_parameters,
    load_policy,
    load_processor,
)
from vispo.models.processors import (
    Qwen2_5_VLImageOnlyProcessor,
    Qwen2VLImageOnlyProcessor,
    Qwen3VLImageOnlyProcessor,
)
from vispo.models.tokenizer import SPECIAL_TOKENS, THINK_TOKENS, _tokenizer_json


def test_tokenizer_is_deterministic_and_seeded():
    first = build_tokenizer(0).get_vocab()
    _tokenizer_json.cache_clear()  # retrain from scratch, not from the cache
    assert build_tokenizer(0).get_vocab() == first
    other = build_tokenizer(1).get_vocab()
    assert other != first


def test_tokenizer_special_tokens_are_atomic_and_think_survives_decoding():
    tok = build_tokenizer(0)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(token) == i
        assert tok(token, add_special_tokens=False)["input_ids"] == [i]
    for token in THINK_TOKENS:
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1
    text = "<|im_start|>assistant\n<think> 3+4 = 7 </think> \\boxed{7}<|im_end|>"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text  # byte-level BPE is lossless
    assert (
        tok.decode(ids, skip_special_tokens=True)
        == "assistant\n<think> 3+4 = 7 </think> \\boxed{7}"
    )
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.padding_side == "left"


def test_tokenizer_round_trips_arbitrary_unicode_and_math():
    tok = build_tokenizer(0)
    text = "Größe: ∠ABC = 30°, \\frac{1}{2} + x^{2} ≤ 7; 日本 🙂"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_tokenizer_vocab_padding_with_plain_tokens():
    base = build_tokenizer(0)
    padded = build_tokenizer(0, vocab_size=19008)
    assert len(padded) == 19008
    text = "What shape is in the image? Answer in one word. 123 \\boxed{red}"
    # padding tokens are never produced by encoding: same ids as without padding
    assert padded(text)["input_ids"] == base(text)["input_ids"]
    assert padded.convert_ids_to_tokens(19007) == f"<|extra_{19007 - len(base)}|>"
    assert padded.decode([19007]) == f"<|extra_{19007 - len(base)}|>"
    with pytest.raises(ValueError, match="smaller than the trained tokenizer"):
        build_tokenizer(0, vocab_size=100)


def test_chat_template_renders_chatml_with_arch_placeholders():
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Shape?"}]},
    ]
    qwen = build_tokenizer(0, arch_family="qwen")
    assert qwen.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Shape?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    idefics = build_tokenizer(0, arch_family="idefics3")
    rendered = idefics.apply_chat_template(conversation, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>Shape?<|im_end|>\n"
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_vlm_is_seeded_and_leaves_global_rng_alone(arch):
    state = torch.random.get_rng_state()
    model_a, _ = build_tiny_vlm(arch, seed=0)
    model_b, _ = build_tiny_vlm(arch, seed=0)
    model_c, _ = build_tiny_vlm(arch, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    a, b, c = (dict(m.state_dict()) for m in (model_a, model_b, model_c))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    assert 150_000 < count_parameters(model_a) < 1_000_000
    assert not model_a.training


def test_tiny_qwen2_vl_language_parameter_count_matches_hand_formula():
    spec = TinySpec()
    model, processor = build_tiny_vlm("qwen2_vl")
    V, h, inter = len(processor.tokenizer), spec.hidden_size, spec.intermediate_size
    kv = spec.num_kv_heads * spec.head_dim
    per_layer = (
        (h * h + h)  # q_proj (with bias in Qwen2)
        + 2 * (h * kv + kv)  # k_proj, v_proj (with bias)
        + h * h  # o_proj
        + 3 * h * inter  # gate, up, down
        + 2 * h  # two RMSNorms
    )
    expected = V * h + spec.num_layers * per_layer + h + V * h  # embed, layers, norm, lm_head
    assert sum(p.numel() for _, p in language_parameters(model)) == expected


def test_tied_embeddings_override_shares_the_output_layer():
    model, _ = build_tiny_vlm("qwen2_vl", tie_word_embeddings=True)
    assert model.lm_head.weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("arch", ARCHS)
def test_size_overrides_reach_the_config(arch):
    model, processor = build_tiny_vlm(
        arch, hidden_size=96, num_layers=3, num_heads=6, num_kv_heads=3, vocab_size=2048
    )
    text = model.config.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (96, 3, 6)
    assert text.num_key_value_heads == 3 and text.vocab_size == 2048 == len(processor.tokenizer)
    assert model.lm_head.weight.shape == (2048, 96)


def test_bad_arch_and_overrides_raise_clear_errors():
    with pytest.raises(ValueError, match="arch must be one of"):
        build_tiny_vlm("llama")
    with pytest.raises(TypeError, match="hidden"):
        build_tiny_vlm("qwen2_vl", hiden_size=32)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        build_tiny_vlm("qwen2_vl", hidden_size=60, num_heads=8)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", [56, 64])
def test_a_small_image_gives_four_image_tokens(arch, side, sample_images, make_conversation):
    _, processor = build_tiny_vlm(arch)
    image = sample_images[0].resize((side, side))
    text = processor.apply_chat_template(
        make_conversation(1, "What shape?"), tokenize=False, add_generation_prompt=True
    )
    encoded = processor(text=[text], images=[[image]], return_tensors="pt")
    image_token = "<image>" if arch == "idefics3" else "<|image_pad|>"
    image_id = processor.tokenizer.convert_tokens_to_ids(image_token)
    assert int((encoded["input_ids"] == image_id).sum()) == 4
    if arch != "idefics3":
        assert encoded["image_grid_thw"].tolist() == [[1, 4, 4]]
        assert tuple(encoded["pixel_values"].shape) == (16, 3 * 2 * 14 * 14)


def test_processor_classes_need_no_video_processor():
    expected = {
        "qwen2_vl": Qwen2VLImageOnlyProcessor,
        "qwen2_5_vl": Qwen2_5_VLImageOnlyProcessor,
        "qwen3_vl": Qwen3VLImageOnlyProcessor,
    }
    for arch, cls in expected.items():
        processor = build_tiny_processor(arch)
        assert type(processor) is cls
        assert cls.get_attributes() == ["image_processor", "tokenizer"]
        assert "Pil" in type(processor.image_processor).__name__


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_gives_same_logits(arch, tmp_path, sample_images, make_conversation):
    model, processor = build_tiny_vlm(arch, seed=3)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_policy(tmp_path, dtype="float32")
    assert type(loaded_processor) is type(processor)
    text = processor.apply_chat_template(
        make_conversation(2, "Same?"), tokenize=False, add_generation_prompt=True
    )
    images = [[sample_images[0], sample_images[1]]]
    before = processor(text=[text], images=images, return_tensors="pt")
    after = loaded_processor(text=[text], images=images, return_tensors="pt")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(**before).logits, loaded(**after).logits)
    assert loaded_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert load_processor(tmp_path).chat_template == processor.chat_template


def test_load_policy_dtype_and_safetensors_only(tmp_path):
    model, processor = build_tiny_vlm("qwen2_vl")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, _ = load_policy(tmp_path, dtype="bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_policy(tmp_path, dtype="float8")
    os.remove(tmp_path / "model.safetensors")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError):
        load_policy(tmp_path)


def test_load_processor_rejects_a_tokenizer_only_folder(tmp_path):
    build_tokenizer(0).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="did not load as a multimodal processor"):
        load_processor(tmp_path)


@pytest.mark.parametrize(
    ("stock", "image_only"),
    [
        ("Qwen2VLProcessor", Qwen2VLImageOnlyProcessor),
        ("Qwen2_5_VLProcessor", Qwen2_5_VLImageOnlyProcessor),
        ("Qwen3VLProcessor", Qwen3VLImageOnlyProcessor),
    ],
)
def test_stock_qwen_processor_folders_load_as_image_only_twins(tmp_path, stock, image_only):
    """A real Qwen checkpoint records the stock class (which needs torchvision for video)."""
    processor = build_tiny_processor("qwen2_vl")
    processor.save_pretrained(tmp_path)
    config_file = tmp_path / "processor_config.json"
    config = json.loads(config_file.read_text())
    config["processor_class"] = stock
    config_file.write_text(json.dumps(config))
    loaded = load_processor(tmp_path)
    assert type(loaded) is image_only
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
