"""Per-token KL estimators (algorithms.md section 2), Schulman's k1/k2/k3."""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp: torch.Tensor, logq: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(p || q) from tokens sampled from p, in float32.

    - ``"k1"``: ``logp - logq``
    - ``"k2"``: ``0.5 * (logp - logq) ** 2``
    - ``"k3"`` (verl ``low_var_kl``): ``x = clamp(logq - logp, -20, 20)``,
      ``clamp(exp(x) - x - 1, -10, 10)``
    """
    logp, logq = logp.float(), logq.float()
    if kind == "k1":
        return logp - logq
    if kind == "k2":
        return 0.5 * (logp - logq) ** 2
    if kind == "k3":
        x = (logq - logp).clamp(-20.0, 20.0)
        return (torch.exp(x) - x - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"kind must be one of {KL_ESTIMATORS}, got {kind!r}")


def full_kl(logp_full: torch.Tensor, logq_full: torch.Tensor) -> torch.Tensor:
    """Exact per-position KL(p || q) = sum_v p_v (log p_v - log q_v) from full log-probs [..., V]."""
    logp_full, logq_full = logp_full.float(), logq_full.float()
    return (logp_full.exp() * (logp_full - logq_full)).sum(-1)
