"""CPPO: perception-token selection and the contrastive perception loss (algorithms.md 7).

Perception tokens are those whose entropy rises most when the image's information is removed
(``I-``). On them, the policy is pulled towards its distribution under an information-preserving
view (``I+``) and pushed away from its distribution under ``I-``: a two-way InfoNCE whose
"similarities" are negative KL divergences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .aggregate import aggregate
from .kl import full_kl, kl_estimate

CPL_ESTIMATORS = ("k3", "k1", "full")


def cppo_perception_mask(
    H: torch.Tensor,
    Hn: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    top_frac: float = 0.5,
    gate: bool = True,
) -> torch.Tensor:
    """Select perception tokens (no gradient). Returns bool ``[B, T]``.

    ``dH = Hn - H``; score ``relu(dH) / (Hn + 1e-6)``; eligible: ``dH > 0`` inside the mask. Per
    sequence with ``n`` eligible tokens, keep those scoring at least the k-th largest score,
    ``k = max(1, floor(top_frac * n))``. With ``gate``, only sequences with advantage > 0 keep any.
    """
    if not 0.0 < top_frac <= 1.0:
        raise ValueError(f"top_frac must be in (0, 1], got {top_frac}")
    with torch.no_grad():
        H, Hn = H.detach().float(), Hn.detach().float()
        dH = Hn - H
        eligible = (dH > 0) & mask.bool()
        score = torch.relu(dH) / (Hn + 1e-6)
        score = torch.where(eligible, score, torch.full_like(score, float("-inf")))
        n = eligible.sum(-1)
        k = torch.clamp(torch.floor(top_frac * n.float()).long(), min=1)
        ordered = score.sort(dim=-1, descending=True).values
        kth = ordered.gather(-1, (k - 1)[:, None])
        selected = eligible & (score >= kth)
        if gate:
            adv = advantages.detach()
            seq_adv = (
                adv if adv.ndim == 1 else adv.masked_fill(~mask.bool(), float("-inf")).amax(-1)
            )
            selected &= (seq_adv > 0)[:, None]
    return selected


def contrastive_perception_loss(
    logp: torch.Tensor,
    logp_pos: torch.Tensor,
    logp_neg: torch.Tensor,
    selected: torch.Tensor,
    *,
    tau: float = 0.1,
    estimator: str = "k3",
    agg: str = "token-mean",
    horizon: int | None = None,
    total: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L_cpl = aggregate(softplus((d+ - d-) / tau), selected, agg)``; with the default
    token-mean, ``sum(c * sel) / (sum(sel) + 1e-8)``.

    ``d+ = KL(pi(.|I) || pi(.|I+))`` and ``d- = KL(pi(.|I) || pi(.|I-))`` per token, estimated by
    ``"k3"`` (default) or ``"k1"`` from sampled-token log-probs ``[B, T]``, or exactly with
    ``"full"``, in which case the three inputs are full log-prob tensors ``[B, T, V]``.
    Gradient flows through all three passes; ``selected`` is treated as a constant. Zero (with
    finite zero gradients) when nothing is selected. ``agg`` is the policy loss's aggregation
    with the selection as the mask, as the CPPO recipe applies the actor's ``loss_agg_mode``;
    ``total`` replaces the denominator (the selected-token count for token-mean, the number of
    sequences for the seq-mean modes) by a mini-batch-wide one for micro-batching.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if estimator == "full":
        d_pos, d_neg = full_kl(logp, logp_pos), full_kl(logp, logp_neg)
    elif estimator in ("k3", "k1"):
        d_pos = kl_estimate(logp, logp_pos, estimator)
        d_neg = kl_estimate(logp, logp_neg, estimator)
    else:
        raise ValueError(f"estimator must be one of {CPL_ESTIMATORS}, got {estimator!r}")
    sel = selected.detach().to(d_pos.dtype)
    c = F.softplus((d_pos - d_neg) / tau)
    c = torch.where(sel > 0, c, torch.zeros_like(c))
    loss = aggregate(c, sel, agg, horizon=horizon, total=total)
    with torch.no_grad():
        n_sel = sel.sum().clamp(min=1)
        metrics = {
            "cpl/d_pos": (d_pos * sel).sum() / n_sel,
            "cpl/d_neg": (d_neg * sel).sum() / n_sel,
        }
    return loss, metrics
