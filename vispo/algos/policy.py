"""Clipped policy-gradient loss (algorithms.md section 4): PPO / GRPO / DAPO clip-higher."""

from __future__ import annotations

import torch

from .aggregate import aggregate, masked_mean


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
    agg: str = "token-mean",
    horizon: int | None = None,
    total: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's pessimistic clipped surrogate with optional dual clip.

    ``d = clamp(logp - old_logp, -20, 20)``, ``ratio = exp(d)``;
    ``l = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))``;
    where ``A < 0``: ``l = min(l, -A * dual_clip)``.
    ``advantages`` is ``[B]`` (broadcast to tokens) or ``[B, T]``.

    Metrics (token means over the mask, detached tensors): ``clip/low`` the fraction of tokens
    where the lower clip is active (A < 0 and ratio < 1 - clip_low), ``clip/high`` where the upper
    clip is active (A > 0 and ratio > 1 + clip_high), ``clip/dual`` where the dual clip bounds
    the loss, and ``approx_kl`` = mean(old_logp - logp).
    """
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low/clip_high must be >= 0, got {clip_low}/{clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    adv = advantages.float()
    if adv.ndim == 1:
        adv = adv[:, None]
    adv = adv.expand_as(logp)
    d = (logp.float() - old_logp.float()).clamp(-20.0, 20.0)
    ratio = torch.exp(d)
    l1 = -adv * ratio
    l2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(l1, l2)
    dual_active = torch.zeros_like(per_token, dtype=torch.bool)
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual_active = (adv < 0) & (per_token > bound)
        per_token = torch.where(adv < 0, torch.minimum(per_token, bound), per_token)
    loss = aggregate(per_token, mask, agg, horizon=horizon, total=total)
    with torch.no_grad():
        metrics = {
            "clip/low": masked_mean(((adv < 0) & (ratio < 1.0 - clip_low)).float(), mask),
            "clip/high": masked_mean(((adv > 0) & (ratio > 1.0 + clip_high)).float(), mask),
            "clip/dual": masked_mean(dual_active.float(), mask),
            "approx_kl": masked_mean(-d, mask),
        }
    return loss, metrics
