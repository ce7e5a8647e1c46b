"""Adapting a VLM for RL: freezing the vision tower, LoRA, gradient checkpointing.

The vision tower is found generically, by module name: the top-most modules called
``visual`` (Qwen-VL family; note that Qwen's patch merger, the projector, lives inside it),
``vision_model`` (Idefics3/SmolVLM), ``vision_tower`` (LLaVA, Gemma 3) or
``vision_encoder``. Everything else (language model, connector/projector outside the tower,
output layer) counts as language parameters.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

VISION_MODULE_NAMES: tuple[str, ...] = ("visual", "vision_model", "vision_tower", "vision_encoder")
# Linear layers LoRA targets by default (attention and MLP projections of the decoder).
DEFAULT_LORA_TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


def vision_module_names(model: nn.Module) -> list[str]:
    """Qualified names of the model's vision tower(s); ``ValueError`` if none is found."""
    prefixes: list[str] = []
    for name, _ in model.named_modules():
        if not name or name.rsplit(".", 1)[-1] not in VISION_MODULE_NAMES:
            continue
        if any(name.startswith(p + ".") for p in prefixes):
            continue  # nested inside a tower already found
        prefixes.append(name)
    if not prefixes:
        raise ValueError(
            f"no vision tower found in {type(model).__name__}: expected a module named one of "
            f"{VISION_MODULE_NAMES}"
        )
    return prefixes


def _in_vision(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def vision_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs of the vision tower."""
    prefixes = vision_module_names(model)
    for name, param in model.named_parameters():
        if _in_vision(name, prefixes):
            yield name, param


def language_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs outside the vision tower (LM, connector, output layer)."""
    prefixes = vision_module_names(model)
    for name, param in model.named_parameters():
        if not _in_vision(name, prefixes):
            yield name, param


def freeze_vision_tower(model: nn.Module) -> int:
    """Stop gradients into the vision tower; returns the number of parameters frozen."""
    frozen = 0
    for _, param in vision_parameters(model):
        param.requires_grad_(False)
        frozen += param.numel()
    return frozen


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) in seen or (trainable_only and not param.requires_grad):
            continue
        seen.add(id(param))
        total += param.numel()
    return total


def lora_target_names(
    model: nn.Module,
    target_modules: Sequence[str] | None = None,
    *,
    include_vision: bool = False,
) -> list[str]:
    """Qualified names of the linear layers LoRA wraps.

    Args:
        target_modules: last name components to match (default :data:`DEFAULT_LORA_TARGETS`;
            with ``include_vision=True`` and no targets, every linear layer of the tower too).
        include_vision: also adapt the vision tower (excluded by default).

    The output layer (``lm_head``) is never adapted.
    """
    prefixes = vision_module_names(model)
    targets = set(DEFAULT_LORA_TARGETS if target_modules is None else target_modules)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] == "lm_head":
            continue
        leaf = name.rsplit(".", 1)[-1]
        if _in_vision(name, prefixes):
            if include_vision and (target_modules is None or leaf in targets):
                names.append(name)
        elif leaf in targets:
            names.append(name)
    if not names:
        raise ValueError(f"no linear layer matches target_modules={sorted(targets)}")
    return names


def apply_lora(
    model: nn.Module,
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    include_vision: bool = False,
) -> nn.Module:
    """Wrap `model` with LoRA adapters (peft); only the adapters are trainable afterwards.

    The vision tower is left untouched unless ``include_vision=True``. Returns the
    ``PeftModel``; its forward takes the same inputs as `model`.
    """
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    names = lora_target_names(model, target_modules, include_vision=include_vision)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none"
    )
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing`; not our call site.
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
        )
        return get_peft_model(model, config)


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute activations in the backward pass (non-reentrant), and disable the KV cache
    for training forwards. Returns `model`."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    config = getattr(model, "config", None)
    if config is not None:
        config.use_cache = False
    return model


def trainable_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that receive gradients (for the optimiser)."""
    return [p for p in model.parameters() if p.requires_grad]
