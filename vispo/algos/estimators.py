"""Outcome-reward advantage estimators beside GRPO: RLOO and REINFORCE++ (with or without baseline).

``advantage_estimate(kind, rewards[B], group_ids[B], *, lengths=None, scale, eps) -> [B]``, one
advantage per sequence (broadcast to its tokens), as verl defines them for one scalar reward per
response (``verl/trainer/ppo/core_algos.py``):

- ``grpo``: :func:`vispo.algos.group_advantages` with ``scale`` (algorithms.md section 1).
- ``rloo`` (Ahmadian et al. 2024, arXiv 2402.14740; Kool et al. 2019): the leave-one-out
  baseline, ``A_i = r_i - mean_{j != i in g} r_j = n/(n-1) * (r_i - mean_g)``. A group of one
  gets 0 (verl's vectorised RLOO; its loop version keeps the raw reward).
- ``reinforce_pp`` (Hu 2025, REINFORCE++, arXiv 2501.03262): no per-prompt baseline; the
  returns are whitened over the whole batch, ``A_i = (r_i - mu) / sqrt(var + 1e-8)``, where
  ``mu`` and the unbiased ``var`` are token-weighted (each sequence counts ``lengths_i`` times,
  as verl's ``masked_whiten`` over ``[B, T]`` does with the outcome reward on the last token and
  discount 1, which makes the return the same at every token).
- ``reinforce_pp_baseline``: the group mean is subtracted first (a group of one: mean 0), then
  the same batch whitening.

``lengths`` (response token counts, ``[B]``) default to 1 each (sequence-weighted statistics).
"""

from __future__ import annotations

import torch

from .advantages import _group_index, _group_sum, group_advantages

ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
_WHITEN_EPS = 1e-8  # verl's masked_whiten: (v - mean) * rsqrt(var + 1e-8)


def _group_mean_and_count(r: torch.Tensor, group_ids: torch.Tensor):
    index, n_groups = _group_index(group_ids)
    count = _group_sum(torch.ones_like(r), index, n_groups)
    mean = _group_sum(r, index, n_groups) / count
    return mean[index], count[index]


def batch_whiten(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(v - mu) / sqrt(var + 1e-8)`` with weighted mean ``mu = sum(w v) / sum(w)`` and unbiased
    weighted variance ``sum(w (v - mu)^2) / (sum(w) - 1)`` (weights are token counts)."""
    w = weights.to(values.dtype)
    n = w.sum()
    mu = (w * values).sum() / n.clamp(min=1e-8)
    var = (w * (values - mu) ** 2).sum() / (n - 1).clamp(min=1.0)
    return (values - mu) * torch.rsqrt(var + _WHITEN_EPS)


def needs_batch_statistics(kind: str, scale: str = "group") -> bool:
    """Whether an estimator's advantages depend on rewards outside their own group (REINFORCE++'s
    whitening, GRPO's ``batch`` scale): under several ranks they need the global batch."""
    return kind in ("reinforce_pp", "reinforce_pp_baseline") or (
        kind == "grpo" and scale == "batch"
    )


def advantage_estimate(
    kind: str,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    lengths: torch.Tensor | None = None,
    scale: str = "group",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-sequence advantages of the given estimator (see the module docstring); float32 ``[B]``.

    ``scale`` and ``eps`` apply to ``grpo`` only.
    """
    if kind not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage estimator must be one of {ADVANTAGE_ESTIMATORS}, got {kind!r}")
    if kind == "grpo":
        return group_advantages(rewards, group_ids, scale=scale, eps=eps)
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [B]; got {tuple(rewards.shape)} and "
            f"{tuple(group_ids.shape)}"
        )
    r = rewards.float()
    if r.numel() == 0:
        return r.clone()
    w = torch.ones_like(r) if lengths is None else lengths.float()
    if w.shape != r.shape or bool((w < 0).any()):
        raise ValueError("lengths must be [B] non-negative token counts")
    mean, count = _group_mean_and_count(r, group_ids)
    if kind == "rloo":
        adv = (r - mean) * count / (count - 1).clamp(min=1)
        return torch.where(count > 1, adv, torch.zeros_like(adv))
    if kind == "reinforce_pp":
        return batch_whiten(r, w)
    centred = torch.where(count > 1, r - mean, r)  # a group of one: baseline 0 (verl)
    return batch_whiten(centred, w)
