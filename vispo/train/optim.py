"""AdamW with per-group learning rates (vision tower scale) and a warm-up + decay schedule."""

from __future__ import annotations

import math

import torch

from vispo.models.adapt import vision_module_names


def build_optimizer(
    model: torch.nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple,
    vision_lr_scale: float = 1.0,
) -> torch.optim.AdamW:
    """AdamW over trainable parameters; the vision tower's group gets ``lr * vision_lr_scale``.

    Biases and norm weights (1-D tensors) get no weight decay, as is standard.
    """
    prefixes = tuple(vision_module_names(model))
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_vision = any(name == pre or name.startswith(pre + ".") for pre in prefixes)
        groups.setdefault((is_vision, p.ndim >= 2), []).append(p)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    param_groups = [
        {
            "params": params,
            "lr": lr * (vision_lr_scale if is_vision else 1.0),
            "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": vision_lr_scale if is_vision else 1.0,
        }
        for (is_vision, decay), params in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas)


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(total - warmup, 1)
    t = min(max(step - warmup, 0) / span, 1.0)
    if schedule == "linear":
        return 1.0 - t
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"unknown schedule {schedule!r}")
