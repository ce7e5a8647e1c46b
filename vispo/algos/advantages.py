"""Group-relative advantages and DAPO's group filter (algorithms.md sections 1 and 8)."""

from __future__ import annotations

import torch

ADVANTAGE_SCALES = ("group", "none", "batch")


def _group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map arbitrary (non-contiguous, unordered) group ids to 0..G-1."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(inverse.max().item()) + 1 if inverse.numel() else 0


def _group_sum(values: torch.Tensor, index: torch.Tensor, n_groups: int) -> torch.Tensor:
    return torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(
        0, index, values
    )


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    scale: str = "group",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Advantage of each sequence relative to the other rollouts of its prompt.

    - ``"group"`` (GRPO, DAPO): ``(r - mean_g) / (std_g + eps)``, std with Bessel's correction.
    - ``"none"`` (Dr. GRPO): ``r - mean_g``.
    - ``"batch"``: ``(r - mean_g) / (std of all rewards + eps)``.

    A group of one, or whose rewards are all equal, gets exactly 0. ``group_ids`` may be in any
    order. Returns float32 ``[B]``.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [B]; got {tuple(rewards.shape)} and "
            f"{tuple(group_ids.shape)}"
        )
    r = rewards.float()
    if r.numel() == 0:
        return r.clone()
    index, n_groups = _group_index(group_ids)
    count = _group_sum(torch.ones_like(r), index, n_groups)
    mean = _group_sum(r, index, n_groups) / count
    centred = r - mean[index]
    lo = torch.full_like(mean, float("inf")).scatter_reduce(0, index, r, "amin")
    hi = torch.full_like(mean, float("-inf")).scatter_reduce(0, index, r, "amax")
    no_signal = ((count < 2) | (hi == lo))[index]

    if scale == "none":
        adv = centred
    elif scale == "group":
        var = _group_sum(centred**2, index, n_groups) / (count - 1).clamp(min=1)
        adv = centred / (var.sqrt()[index] + eps)
    else:  # batch
        batch_std = r.std(unbiased=True) if r.numel() > 1 else r.new_zeros(())
        adv = centred / (batch_std + eps)
    return torch.where(no_signal, torch.zeros_like(adv), adv)


def zero_std_group_fraction(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Fraction of groups whose rewards are all equal (metric ``frac_zero_std_groups``)."""
    index, n_groups = _group_index(group_ids)
    r = rewards.float()
    lo = torch.full((n_groups,), float("inf"), device=r.device).scatter_reduce(0, index, r, "amin")
    hi = torch.full((n_groups,), float("-inf"), device=r.device).scatter_reduce(0, index, r, "amax")
    return (hi == lo).float().mean()


def dynamic_sampling_keep(
    accuracy: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    low: float = 0.01,
    high: float = 0.99,
) -> torch.Tensor:
    """DAPO online filter: keep sequences whose group's mean accuracy is strictly in (low, high).

    Returns bool ``[B]``. Groups that are all right or all wrong carry no group-relative signal.
    """
    index, n_groups = _group_index(group_ids)
    a = accuracy.float()
    count = _group_sum(torch.ones_like(a), index, n_groups)
    mean = _group_sum(a, index, n_groups) / count
    keep = (mean > low) & (mean < high)
    return keep[index]


def refill_size(deficit: int, informative: int, rolled_out: int, full: int, ranks: int = 1) -> int:
    """Prompts the next dynamic-sampling round rolls out: only the deficit, scaled by how rare
    informative groups have been so far in the step.

    ``ceil(deficit * rolled_out / informative)`` (the deficit over the informative fraction of
    the ``rolled_out`` groups seen so far, ``informative`` of them informative), rounded up to a
    multiple of ``ranks`` (every rank rolls out as many) and kept between the deficit and the
    full batch ``full``; the full batch while nothing informative has been seen.
    """
    if deficit <= 0:
        return 0
    if informative <= 0:
        return full
    want = max(deficit, -(-deficit * rolled_out // informative))
    return min(full, -(-want // ranks) * ranks)


def overlong_penalty(
    lengths: torch.Tensor, *, max_length: int, buffer: int, factor: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to the reward.

    0 up to ``max_length - buffer``; then falls linearly to ``-factor`` at ``max_length``;
    ``-factor`` beyond it.
    """
    if buffer <= 0 or buffer > max_length:
        raise ValueError(f"buffer must be in (0, max_length], got {buffer}")
    start = max_length - buffer
    over = (lengths.float() - start).clamp(min=0) / buffer
    return -factor * over.clamp(max=1.0)
