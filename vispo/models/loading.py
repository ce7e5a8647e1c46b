"""Load a Hugging Face vision-language policy and its processor.

One entry point for every architecture: the image-text-to-text auto class for the model and
vispo's own processor loader (:func:`vispo.models.processors.load_processor`), which rebuilds
Qwen-VL processors without a video processor (no torchvision). Weights load from safetensors
only, and remote code runs only when the caller asks for it.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForImageTextToText, PreTrainedModel
from transformers.processing_utils import ProcessorMixin

from vispo.models.processors import load_processor

DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """Map a dtype name (``auto``, ``float32``, ``bfloat16``, ``float16``) to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_policy(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load a VLM policy and its processor from a folder or a hub id (from the local cache).

    Args:
        name_or_path: checkpoint folder (e.g. one written by ``model.save_pretrained`` and
            ``processor.save_pretrained``) or a hub id.
        dtype: ``"auto"`` (the checkpoint's dtype), ``"float32"``, ``"bfloat16"`` or
            ``"float16"``.
        device: where to put the model (``None``: stays on CPU).
        trust_remote_code: allow the checkpoint's own Python code (off by default).
        attn_implementation: e.g. ``"eager"``, ``"sdpa"``, ``"flash_attention_2"``
            (``None``: transformers' default).

    Returns:
        ``(model, processor)`` with the model in eval mode. Raises ``OSError`` when no
        safetensors weights are found (pickle checkpoints are refused).
    """
    path = os.fspath(name_or_path)
    kwargs = dict(
        dtype=resolve_dtype(dtype),
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
    )
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    processor = load_processor(path, trust_remote_code=trust_remote_code)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, processor
