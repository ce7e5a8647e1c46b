"""PAPO: implicit perception loss and double entropy regularisation (algorithms.md section 6).

PAPO *maximises* the policy's KL between the original image and a patch-masked one, so the
policy's outputs must depend on what the image shows. The KL is the k3 estimator on the sampled
tokens, ``KL(pi(.|I) || pi(.|I_mask))``; the loss term is ``-gamma * aggregate(kl)``.
"""

from __future__ import annotations

import torch

from .aggregate import aggregate
from .kl import kl_estimate


def perception_kl(logp_orig: torch.Tensor, logp_mask: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi(.|I) || pi(.|I_mask)): ``kl_estimate(orig, mask, "k3")``."""
    return kl_estimate(logp_orig, logp_mask, "k3")


def top_fraction_mask(values: torch.Tensor, mask: torch.Tensor, frac: float) -> torch.Tensor:
    """Per sequence, keep the ``max(1, floor(frac * n))`` masked tokens with the largest values.

    Ties at the threshold are kept. Rows without tokens keep nothing. Returns bool ``[B, T]``.
    (A generic helper; PAPO's own token selection is :func:`quantile_top_mask`.)
    """
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    m = mask.bool()
    scores = torch.where(
        m, values.detach().float(), torch.full_like(values, float("-inf"), dtype=torch.float32)
    )
    n = m.sum(-1)
    k = torch.clamp(torch.floor(frac * n.float()).long(), min=1)
    ordered = scores.sort(dim=-1, descending=True).values
    kth = ordered.gather(-1, (k - 1).clamp(max=values.shape[-1] - 1)[:, None])
    return m & (scores >= kth)


def quantile_top_mask(values: torch.Tensor, mask: torch.Tensor, top_p: float) -> torch.Tensor:
    """PAPO's token selection: per sequence, keep the masked tokens whose value is at or above
    the ``(1 - top_p)`` quantile of that sequence's masked values (linear interpolation between
    order statistics, as ``torch.nanquantile``); ties are kept. Rows without tokens keep
    nothing. Returns bool ``[B, T]`` (no gradient)."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    m = mask.bool()
    v = values.detach().float()
    if v.numel() == 0:
        return m.clone()
    thresh = torch.nanquantile(v.masked_fill(~m, float("nan")), 1.0 - top_p, dim=-1, keepdim=True)
    return m & (v >= thresh)  # NaN thresholds (empty rows) compare False


def papo_perception_loss(
    logp_orig: torch.Tensor,
    logp_mask: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float,
    agg: str = "token-mean",
    kl_clip: float | None = None,
    top_frac: float | None = None,
    horizon: int | None = None,
    total: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``-gamma * aggregate(kl_prcp)``, returning ``(loss, per_token_kl)``.

    Options (off by default), in the reference code's order: ``top_frac`` zeroes every token
    whose KL is below the ``(1 - top_frac)`` quantile of its sequence (:func:`quantile_top_mask`;
    0.2 in the reference), then ``kl_clip`` clamps the per-token KL to ``[0, kl_clip]`` (0.2 in
    the reference). The aggregation still runs over every response token (``mask``), so the
    unselected tokens count as zeros in the mean. Whether gradient reaches ``logp_mask`` is the
    caller's choice (PAPO's default detaches it: see ``masked_grad``). The returned per-token KL
    is the value that enters the mean (after selection and clipping).
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    kl = perception_kl(logp_orig, logp_mask)
    if top_frac is not None:
        keep = quantile_top_mask(kl, mask, top_frac)
        kl = torch.where(keep, kl, torch.zeros_like(kl))
    if kl_clip is not None:
        kl = kl.clamp(0.0, kl_clip)
    return -gamma * aggregate(kl, mask, agg, horizon=horizon, total=total), kl


def double_entropy_loss(
    entropy_orig: torch.Tensor,
    entropy_mask: torch.Tensor,
    mask: torch.Tensor,
    *,
    eta_orig: float,
    eta_mask: float,
    agg: str = "token-mean",
    horizon: int | None = None,
    total: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``eta_orig * H_orig + eta_mask * H_mask``: both entropies are pushed down.

    The PAPO reference code takes both as token means whatever the policy loss's aggregation
    (the objective passes ``agg="token-mean"``). The entropies are per-token tensors from either estimator (``sampled_entropy(logp)`` or
    ``entropy_from_logits``). Returns the two weighted terms separately.
    """
    if eta_orig < 0 or eta_mask < 0:
        raise ValueError(f"entropy weights must be >= 0, got {eta_orig}/{eta_mask}")
    h_orig = aggregate(entropy_orig, mask, agg, horizon=horizon, total=total)
    h_mask = aggregate(entropy_mask, mask, agg, horizon=horizon, total=total)
    return eta_orig * h_orig, eta_mask * h_mask


def linear_anneal(progress: float, *, start: float, end: float | None, frac: float = 1.0) -> float:
    """Linear schedule from ``start`` to ``end`` over the first ``frac`` of training.

    ``progress`` is the fraction of training done, in [0, 1]. ``end=None`` means constant.
    """
    if end is None:
        return start
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    t = min(max(progress / frac, 0.0), 1.0)
    return start + (end - start) * t
