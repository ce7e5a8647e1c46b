"""The one aggregation function every loss term uses (algorithms.md section 3)."""

from __future__ import annotations

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    horizon: int | None = None,
    total: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce per-token ``values [B, T]`` over the response ``mask [B, T]`` to a scalar.

    - ``"token-mean"``: ``sum(v*m) / (sum(m) + 1e-8)``
    - ``"seq-mean-token-mean"``: mean over sequences with >= 1 token of ``sum_t(v*m)/sum_t(m)``
    - ``"seq-mean-token-sum"``: mean over sequences of ``sum_t(v*m)``
    - ``"seq-mean-token-sum-norm"`` (Dr. GRPO): ``sum(v*m) / (B * horizon)``, horizon defaults to T

    ``total`` replaces the denominator (tokens for token-mean; sequences for the seq-mean modes;
    ``B * horizon`` for the norm mode) by the count over a whole mini-batch, so that summing the
    results of its micro-batches gives exactly the mini-batch value, however it is split.
    """
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} differ")
    v = values.float()
    m = mask.to(v.dtype)
    # Exactly zero outside the mask, even where padding holds inf or NaN.
    vm = torch.where(m > 0, v * m, torch.zeros_like(v))
    if mode == "token-mean":
        denom = m.sum() + 1e-8 if total is None else total
        return vm.sum() / denom
    if mode == "seq-mean-token-mean":
        tokens = m.sum(-1)
        has = tokens > 0
        per_seq = vm.sum(-1) / tokens.clamp(min=1)
        denom = has.sum().clamp(min=1) if total is None else total
        return (per_seq * has).sum() / denom
    if mode == "seq-mean-token-sum":
        return vm.sum() / (max(v.shape[0], 1) if total is None else total)
    if mode == "seq-mean-token-sum-norm":
        if total is None:
            h = v.shape[-1] if horizon is None else horizon
            total = v.shape[0] * h
        return vm.sum() / total
    raise ValueError(f"mode must be one of {AGG_MODES}, got {mode!r}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token mean for metrics (no gradient intended): ``aggregate(values, mask, "token-mean")``."""
    return aggregate(values.detach(), mask, "token-mean")
