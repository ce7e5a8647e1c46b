"""Policy-loss variants behind one function: PPO-clip, GSPO, GSPO-token, CISPO, SAPO.

``policy_loss(kind, logp, old_logp, advantages, mask, **params) -> (loss, metrics)``, with
``d = logp - old_logp`` the per-token log-ratio and ``r = exp(d)`` the token ratio:

- ``ppo``: :func:`vispo.algos.policy.ppo_clip_loss` (algorithms.md section 4).
- ``gspo`` (Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv 2507.18071):
  one length-normalised ratio per sequence ``s_i = exp(min(mean_t d_it, 10))`` (with gradient
  through the mean), clipped per sequence:
  ``l_it = max(-A_it * s_i, -A_it * clip(s_i, 1 - clip_low, 1 + clip_high))``.
- ``gspo_token`` (the paper's GSPO-token variant; verl's ``gspo``):
  ``s_it = sg[s_i] * exp(logp_it - sg[logp_it])`` (value ``s_i``, gradient of the token's own
  log-prob), clipped like ``gspo``. With one advantage per sequence both give the same value and
  gradient; they differ when advantages vary along the sequence.
- ``cispo`` (MiniMax-M1, arXiv 2506.13585): REINFORCE with a clipped, stop-gradient
  importance weight, ``l_it = -sg[clip(r_it, 1 - clip_low, 1 + clip_high)] * A_it * logp_it``;
  every token keeps its gradient.
- ``sapo`` ("Soft Adaptive Policy Optimization", arXiv 2511.20347):
  a soft gate replaces the clip, ``f(r; tau) = sigmoid(tau * (r - 1)) * 4 / tau``,
  ``l_it = -f(r_it; tau_it) * A_it`` with ``tau_it = tau_pos`` where ``A_it > 0``, else
  ``tau_neg``. The gate's slope at ``r = 1`` is 1 (the on-policy gradient is the plain policy
  gradient) and decays smoothly as the ratio moves away.

Every variant is aggregated with the one :func:`vispo.algos.aggregate` (``agg``, ``horizon``,
``total``), so the micro-batch normalisation and the aggregation modes apply to all of them; verl
hard-codes ``seq-mean-token-mean`` for GSPO and SAPO, which vispo's ``gspo``/``sapo`` presets set.
"""

from __future__ import annotations

import torch

from .aggregate import aggregate, masked_mean
from .policy import ppo_clip_loss

POLICY_LOSSES = ("ppo", "gspo", "gspo_token", "cispo", "sapo")
_LOG_RATIO_MAX = 10.0  # GSPO: cap on the sequence log-ratio (verl's numerical clamp)


def _broadcast(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    adv = advantages.float()
    if adv.ndim == 1:
        adv = adv[:, None]
    return adv.expand_as(like)


def sequence_log_ratio(
    logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """GSPO's length-normalised sequence log-ratio ``mean_t (logp - old_logp)`` over the mask,
    ``[B]`` (0 for an empty sequence)."""
    m = mask.float()
    d = logp.float() - old_logp.float()
    return (d * m).sum(-1) / m.sum(-1).clamp(min=1.0)


def gate(ratio: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """SAPO's soft gate ``sigmoid(tau * (ratio - 1)) * 4 / tau``."""
    return torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)


def policy_loss(
    kind: str,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    agg: str = "token-mean",
    horizon: int | None = None,
    total: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy-gradient loss of the given ``kind`` (see the module docstring).

    ``advantages``: ``[B]`` (one per sequence) or ``[B, T]``. ``dual_clip`` applies to ``ppo``
    only, ``tau_pos``/``tau_neg`` to ``sapo`` only. Metrics (detached tensors, token means over
    the mask): ``clip/low``, ``clip/high`` (the fraction of tokens whose ratio, or sequence ratio
    for GSPO, is clipped on that side where the clip binds; CISPO counts clipped weights whatever
    the advantage's sign; SAPO has no clip: 0), ``clip/dual`` (PPO), ``approx_kl``.
    """
    if kind not in POLICY_LOSSES:
        raise ValueError(f"policy loss must be one of {POLICY_LOSSES}, got {kind!r}")
    if kind == "ppo":
        return ppo_clip_loss(
            logp,
            old_logp,
            advantages,
            mask,
            clip_low=clip_low,
            clip_high=clip_high,
            dual_clip=dual_clip,
            agg=agg,
            horizon=horizon,
            total=total,
        )
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low/clip_high must be >= 0, got {clip_low}/{clip_high}")
    if tau_pos <= 0 or tau_neg <= 0:
        raise ValueError(f"tau_pos/tau_neg must be > 0, got {tau_pos}/{tau_neg}")
    logp = logp.float()
    old = old_logp.float()
    adv = _broadcast(advantages, logp)
    d = logp - old
    zero = torch.zeros((), device=logp.device)
    low_hit = high_hit = torch.zeros_like(logp, dtype=torch.bool)

    if kind in ("gspo", "gspo_token"):
        seq = sequence_log_ratio(logp, old, mask)[:, None]
        if kind == "gspo":
            log_s = seq.clamp(max=_LOG_RATIO_MAX).expand_as(logp)
        else:
            log_s = (logp - logp.detach() + seq.detach()).clamp(max=_LOG_RATIO_MAX)
        s = torch.exp(log_s)
        per_token = torch.maximum(-adv * s, -adv * s.clamp(1.0 - clip_low, 1.0 + clip_high))
        with torch.no_grad():
            low_hit = (adv < 0) & (s < 1.0 - clip_low)
            high_hit = (adv > 0) & (s > 1.0 + clip_high)
    elif kind == "cispo":
        ratio = torch.exp(d.clamp(-20.0, 20.0))
        weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high).detach()
        per_token = -weight * adv * logp
        with torch.no_grad():
            low_hit = ratio < 1.0 - clip_low
            high_hit = ratio > 1.0 + clip_high
    else:  # sapo
        ratio = torch.exp(d.clamp(-20.0, 20.0))
        tau = torch.where(
            adv > 0, torch.full_like(adv, float(tau_pos)), torch.full_like(adv, float(tau_neg))
        )
        per_token = -gate(ratio, tau) * adv

    loss = aggregate(per_token, mask, agg, horizon=horizon, total=total)
    with torch.no_grad():
        metrics = {
            "clip/low": masked_mean(low_hit.float(), mask),
            "clip/high": masked_mean(high_hit.float(), mask),
            "clip/dual": zero,
            "approx_kl": masked_mean(-d.detach(), mask),
        }
    return loss, metrics
