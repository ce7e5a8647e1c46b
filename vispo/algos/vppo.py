"""VPPO (Huang et al. 2025, "Spotlight on Token Perception for Multimodal Reinforcement Learning",
arXiv 2510.09285): token visual dependency, advantage shaping, and top-k token selection.

Formulas as in the official code (huaixuheqing/VPPO-RL, an EasyR1 fork,
``verl/workers/actor/dp_actor.py`` ``update_policy`` at commit a23c54b83565):

1. Visual dependency of each response token (the paper's KL between the token distributions
   with the original and the masked image, estimated as the code
   does with the sampled-token k3 estimator, from the pre-update policy's log-probs with the
   original and with the masked image):
   ``x = clamp(logp_mask - logp_orig, -20, 20)``, ``S_t = clamp(exp(x) - x - 1, 0, 10)``.
2. Trajectory-level advantage shaping: the mean dependency of each sequence
   ``s_i = sum_t S_t m_t / max(1, sum_t m_t)`` is min-max normalised over the batch,
   ``u_i = clamp((s_i - min s) / (max s - min s), 0, 1)`` (min/max over sequences with tokens), then
   mapped to ``[a, b]`` with ``a = scale_min`` (0.9) and ``b = a + (1 - a) / (mean u + 1e-8)``:
   ``w_i = a + u_i (b - a)``, so that ``mean w = 1``. ``A_i <- w_i A_i``. With fewer than two
   sequences, or ``max - min <= 1e-6``, ``w = 1``.
3. Token-level gradient filtering: per sequence keep the ``k = ceil(top_frac * n)``
   tokens of highest ``S_t`` (``top_frac`` 0.4); the policy-gradient loss of the other tokens is
   zeroed, while the aggregation still divides by all response tokens.

Departures: the code takes the min/max over a mini-batch and ``mean u`` over each micro-batch;
vispo takes both over the batch it is given (the trainer passes a mini-batch), so the result does
not depend on the micro-batch size. Ties in ``S_t`` are broken by position (stable sort).
"""

from __future__ import annotations

import math

import torch

VPPO_KL_MAX = 10.0
VPPO_ESTIMATORS = ("k3", "full")


def visual_dependency(logp_orig: torch.Tensor, logp_mask: torch.Tensor) -> torch.Tensor:
    """Per-token dependency ``clamp(exp(x) - x - 1, 0, 10)``, ``x = clamp(logp_mask - logp_orig,
    +-20)`` (k3 estimate of KL(pi(.|I) || pi(.|I_mask)) on the sampled token), no gradient."""
    with torch.no_grad():
        x = (logp_mask.float() - logp_orig.float()).clamp(-20.0, 20.0)
        return (torch.exp(x) - x - 1.0).clamp(0.0, VPPO_KL_MAX)


def sequence_dependency(dependency: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean dependency of each sequence over its tokens, ``[B]`` (0 for an empty sequence)."""
    m = mask.float()
    return (dependency * m).sum(-1) / m.sum(-1).clamp(min=1.0)


def vppo_advantage_weights(
    dependency: torch.Tensor, mask: torch.Tensor, *, scale_min: float = 0.9
) -> torch.Tensor:
    """VPPO's per-sequence advantage multipliers ``w [B]`` (module docstring, step 2)."""
    if not 0.0 <= scale_min <= 1.0:
        raise ValueError(f"scale_min must be in [0, 1], got {scale_min}")
    with torch.no_grad():
        s = sequence_dependency(dependency, mask)
        valid = mask.float().sum(-1) > 0
        w = torch.ones_like(s)
        if int(valid.sum()) < 2:
            return w
        lo, hi = s[valid].min(), s[valid].max()
        if float(hi - lo) <= 1e-6:
            return w
        u = ((s - lo) / (hi - lo)).clamp(0.0, 1.0)
        b = scale_min + (1.0 - scale_min) / (u[valid].mean() + 1e-8)
        return torch.where(valid, scale_min + u * (b - scale_min), w)


def vppo_token_mask(
    dependency: torch.Tensor, mask: torch.Tensor, *, top_frac: float = 0.4
) -> torch.Tensor:
    """Bool ``[B, T]``: in each sequence the ``ceil(top_frac * n)`` response tokens with the
    highest dependency (module docstring, step 3)."""
    if not 0.0 < top_frac <= 1.0:
        raise ValueError(f"top_frac must be in (0, 1], got {top_frac}")
    with torch.no_grad():
        m = mask.bool()
        n = m.sum(-1)
        k = torch.ceil(n.double() * top_frac - 1e-9).long()  # exact for fractions like 0.4 * 5
        scores = dependency.float().masked_fill(~m, -math.inf)
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(
            -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
        )
        return (rank < k[:, None]) & m


def full_kl_from_logits(
    logits_p: torch.Tensor,
    logits_q: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Exact per-position ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` with ``p = softmax(
    logits_p / T)``, ``q = softmax(logits_q / T)``, over the full vocabulary (``[..., V]`` ->
    ``[...]``, float32, no gradient): the paper's visual dependency with ``p`` the
    original-image and ``q`` the masked-image distribution. Rows are processed in chunks like
    :mod:`vispo.algos.entropy`, so no float32 ``[..., V]`` copy of the whole batch is made."""
    from .entropy import _acc_dtype, _rows_per_chunk

    if logits_p.shape != logits_q.shape:
        raise ValueError(f"logits shapes differ: {tuple(logits_p.shape)} {tuple(logits_q.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lead, vocab = logits_p.shape[:-1], logits_p.shape[-1]
    p2, q2 = logits_p.reshape(-1, vocab), logits_q.reshape(-1, vocab)
    acc = _acc_dtype(logits_p)
    rows = _rows_per_chunk(logits_p, chunk_size)
    out = torch.empty(p2.shape[0], dtype=acc, device=logits_p.device)
    with torch.no_grad():
        for s in range(0, p2.shape[0], rows):
            lp = torch.log_softmax(p2[s : s + rows].to(acc) / temperature, dim=-1)
            lq = torch.log_softmax(q2[s : s + rows].to(acc) / temperature, dim=-1)
            out[s : s + rows] = (lp.exp() * (lp - lq)).sum(-1).clamp(min=0.0)
    return out.reshape(lead)
