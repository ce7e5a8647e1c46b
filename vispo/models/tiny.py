"""Tiny vision-language models built offline, in code, for tests and small experiments.

``build_tiny_vlm(arch)`` returns a randomly initialised model of a real Hugging Face VLM
architecture (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Idefics3/SmolVLM) with a few hundred thousand
parameters, and its real processor (PIL image processor; image-only twin for the Qwen family),
wired to the locally trained BPE of :mod:`vispo.models.tokenizer`. Same seed, same weights.
Everything is overridable, e.g. ``build_tiny_vlm("qwen2_5_vl", hidden_size=384,
num_layers=6, vocab_size=19008)`` for the benchmark workload.

Image geometry (defaults): patch 14, merge 2, so a 56x56 image is 4x4 patches = 4 image
tokens. Qwen processors use ``min_pixels=28*28`` and ``max_pixels=56*56`` (easy-vqa's 64x64
images are resized to 56x56); the Idefics3 processor resizes every image to 56x56 and does
not split it (``image_seq_len=4``).
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from vispo.models.processors import (
    Qwen2_5_VLImageOnlyProcessor,
    Qwen2VLImageOnlyProcessor,
    Qwen3VLImageOnlyProcessor,
)
from vispo.models.tokenizer import IM_END, PAD_TOKEN, build_tokenizer

ARCHS: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3")


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny VLM; every field can be overridden through ``build_tiny_vlm``."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vision_depth: int = 1
    vision_hidden_size: int = 32
    vision_heads: int = 2
    vision_intermediate_size: int = 64
    patch_size: int = 14
    merge_size: int = 2  # Qwen spatial merge; Idefics3 pixel-shuffle scale factor
    vocab_size: int | None = None  # None: exactly the tokenizer's size; else pad to this
    tie_word_embeddings: bool = False
    min_pixels: int = 28 * 28  # Qwen image processor bounds
    max_pixels: int = 56 * 56
    image_size: int = 56  # Idefics3: every image is resized to image_size x image_size
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "vision_depth"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be divisible by num_kv_heads={self.num_kv_heads}"
            )
        if self.vision_hidden_size % self.vision_heads:
            raise ValueError(
                f"vision_hidden_size={self.vision_hidden_size} must be divisible by "
                f"vision_heads={self.vision_heads}"
            )
        if (self.hidden_size // self.num_heads) % 4:
            raise ValueError("head dimension hidden_size/num_heads must be a multiple of 4 (RoPE)")
        if self.image_size % (self.patch_size * self.merge_size):
            raise ValueError(
                f"image_size={self.image_size} must be a multiple of patch_size*merge_size="
                f"{self.patch_size * self.merge_size}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (temporal, height, width) as Qwen does (1:1.5:1.5)."""
    half = head_dim // 2
    spatial = (3 * half) // 8
    return [half - 2 * spatial, spatial, spatial]


def _text_config(spec: TinySpec, vocab_size: int, ids: dict[str, int], *, mrope: bool) -> dict:
    config = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        bos_token_id=None,
        tie_word_embeddings=spec.tie_word_embeddings,
    )
    if mrope:
        config["rope_parameters"]["mrope_section"] = _mrope_section(spec.head_dim)
    return config


def _qwen_config(arch: str, spec: TinySpec, vocab_size: int, ids: dict[str, int]):
    text = _text_config(spec, vocab_size, ids, mrope=True)
    common_vision = dict(
        depth=spec.vision_depth,
        num_heads=spec.vision_heads,
        patch_size=spec.patch_size,
        spatial_merge_size=spec.merge_size,
        temporal_patch_size=2,
        in_channels=3,
    )
    if arch == "qwen2_vl":
        vision = dict(
            common_vision,
            embed_dim=spec.vision_hidden_size,
            hidden_size=spec.hidden_size,
            mlp_ratio=spec.vision_intermediate_size // spec.vision_hidden_size,
        )
        config_cls = Qwen2VLConfig
    elif arch == "qwen2_5_vl":
        vision = dict(
            common_vision,
            hidden_size=spec.vision_hidden_size,
            intermediate_size=spec.vision_intermediate_size,
            out_hidden_size=spec.hidden_size,
            window_size=spec.patch_size * spec.merge_size * 2,
            fullatt_block_indexes=[spec.vision_depth - 1],
        )
        config_cls = Qwen2_5_VLConfig
    else:
        vision = dict(
            common_vision,
            hidden_size=spec.vision_hidden_size,
            intermediate_size=spec.vision_intermediate_size,
            out_hidden_size=spec.hidden_size,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0],
        )
        config_cls = Qwen3VLConfig
    return config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=spec.tie_word_embeddings,
    )


def _idefics3_config(spec: TinySpec, vocab_size: int, ids: dict[str, int]) -> Idefics3Config:
    text = dict(_text_config(spec, vocab_size, ids, mrope=False), model_type="llama")
    vision = dict(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_intermediate_size,
        num_hidden_layers=spec.vision_depth,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )
    return Idefics3Config(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<image>"],
        scale_factor=spec.merge_size,
        tie_word_embeddings=spec.tie_word_embeddings,
        pad_token_id=ids["pad"],
    )


def build_tiny_processor(arch: str, *, seed: int = 0, **overrides) -> ProcessorMixin:
    """The processor of ``build_tiny_vlm(arch, seed=seed, **overrides)`` alone (no model)."""
    spec = _spec(overrides)
    return _processor(arch, spec, seed)


def _processor(arch: str, spec: TinySpec, seed: int) -> ProcessorMixin:
    _check_arch(arch)
    family = "idefics3" if arch == "idefics3" else "qwen"
    tokenizer = build_tokenizer(seed, vocab_size=spec.vocab_size, arch_family=family)
    if arch == "idefics3":
        image_processor = Idefics3ImageProcessorPil(
            size={"longest_edge": spec.image_size},
            max_image_size={"longest_edge": spec.image_size},
            do_image_splitting=False,
        )
        tokens_per_image = (spec.image_size // spec.patch_size) ** 2 // spec.merge_size**2
        return Idefics3Processor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            image_seq_len=tokens_per_image,
            chat_template=tokenizer.chat_template,
        )
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=spec.min_pixels,
        max_pixels=spec.max_pixels,
        patch_size=spec.patch_size,
        merge_size=spec.merge_size,
        temporal_patch_size=2,
    )
    processor_cls = {
        "qwen2_vl": Qwen2VLImageOnlyProcessor,
        "qwen2_5_vl": Qwen2_5_VLImageOnlyProcessor,
        "qwen3_vl": Qwen3VLImageOnlyProcessor,
    }[arch]
    return processor_cls(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def _spec(overrides: dict) -> TinySpec:
    fields = {f.name for f in dataclasses.fields(TinySpec)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown tiny-model overrides {unknown}; valid: {sorted(fields)}")
    return TinySpec(**overrides)


def build_tiny_vlm(
    arch: str, *, seed: int = 0, **overrides
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Build a seeded, randomly initialised tiny VLM of architecture `arch` and its processor.

    Args:
        arch: one of ``"qwen2_vl"``, ``"qwen2_5_vl"``, ``"qwen3_vl"``, ``"idefics3"``.
        seed: seeds both the tokenizer corpus and the weight initialisation. The global torch
            RNG state is left untouched.
        **overrides: any :class:`TinySpec` field (hidden_size, num_layers, num_heads,
            num_kv_heads, intermediate_size, vision_depth, vision_hidden_size, vision_heads,
            vision_intermediate_size, vocab_size, tie_word_embeddings, min_pixels, max_pixels,
            image_size, ...).

    Returns:
        ``(model, processor)``: the model in float32 and eval mode, its generation config
        set to stop at ``<|im_end|>`` and pad with ``<|endoftext|>``.
    """
    _check_arch(arch)
    spec = _spec(overrides)
    processor = _processor(arch, spec, seed)
    tokenizer = processor.tokenizer
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in tokenizer.all_special_tokens}
    for token in (
        "<|image_pad|>",
        "<|video_pad|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<image>",
    ):
        ids[token] = tokenizer.convert_tokens_to_ids(token)
    ids["eos"] = tokenizer.convert_tokens_to_ids(IM_END)
    ids["pad"] = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    vocab_size = len(tokenizer)

    if arch == "idefics3":
        config, model_cls = (
            _idefics3_config(spec, vocab_size, ids),
            Idefics3ForConditionalGeneration,
        )
    else:
        config = _qwen_config(arch, spec, vocab_size, ids)
        model_cls = {
            "qwen2_vl": Qwen2VLForConditionalGeneration,
            "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
            "qwen3_vl": Qwen3VLForConditionalGeneration,
        }[arch]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.eval()
    generation = model.generation_config
    generation.eos_token_id = ids["eos"]
    generation.pad_token_id = ids["pad"]
    generation.bos_token_id = None
    return model, processor
