"""Per-token log-probabilities and entropies from logits, chunked (algorithms.md section 5).

A float32 ``[B, T, V]`` copy of the logits is the largest tensor an RL step could create: for
Qwen's 151,936-token vocabulary at 4 x 2048 tokens it is 5 GB. Both functions here therefore walk
the flattened token axis in chunks, upcasting one chunk at a time, and their backward passes
recompute the softmax chunk by chunk instead of saving float32 activations. Peak extra memory
is one float32 chunk, whatever the sequence length.
"""

from __future__ import annotations

import torch

# Elements of a float32 chunk (rows x vocabulary): 2**24 floats = 64 MiB on accelerators. On
# CPU 2**22 floats = 16 MiB, under glibc's largest mmap threshold (32 MiB): the chunk's
# temporaries are then reused from the heap, where 64 MiB ones are fresh mmaps that page-fault
# on every chunk (on the standard benchmark workload ~1M minor faults per update).
_CHUNK_ELEMENTS = 1 << 24
_CPU_CHUNK_ELEMENTS = 1 << 22


def _rows_per_chunk(logits: torch.Tensor, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    elements = _CPU_CHUNK_ELEMENTS if logits.device.type == "cpu" else _CHUNK_ELEMENTS
    return max(1, elements // max(logits.shape[-1], 1))


def _acc_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 logits; float64 stays float64 (gradcheck)."""
    return torch.promote_types(logits.dtype, torch.float32)


class _LogpEntropy(torch.autograd.Function):
    """Per row of ``z = logits * inv_temp``: ``log p(token)`` and/or the entropy ``H(z)``, chunked.

    One pass over each chunk serves both: with ``s = z - max(z)``, ``e = exp(s)``,
    ``lse = max(z) + log(sum e)``, ``log p(token) = z[token] - lse`` and
    ``H = log(sum e) - sum(e * s) / sum(e)`` (shifting first keeps float32 accurate to ~1e-6 over
    a 152k vocabulary; ``logsumexp(z) - sum(softmax(z) * z)`` loses ~3e-4 to cancellation).
    Backward, with ``p = exp(z - lse)`` recomputed per chunk:
    ``d logp / dz = onehot(token) - p`` and ``dH / dz = -p * (z - E_p[z])``.
    ``token_ids`` None: entropy only (the log-prob output is empty).
    """

    @staticmethod
    def forward(ctx, logits, token_ids, inv_temp, rows, want_entropy):
        acc = _acc_dtype(logits)
        n = logits.shape[0]
        lse = torch.empty(n, dtype=acc, device=logits.device)
        logp = torch.empty(n if token_ids is not None else 0, dtype=acc, device=logits.device)
        ent = torch.empty(n if want_entropy else 0, dtype=acc, device=logits.device)
        for s in range(0, n, rows):
            z = logits[s : s + rows].to(acc)
            if inv_temp != 1.0:
                z = z * inv_temp
            top = z.amax(-1, keepdim=True)
            shifted = z - top
            e = shifted.exp() if want_entropy else shifted.exp_()
            log_total = e.sum(-1).log()
            lse[s : s + rows] = top.squeeze(-1) + log_total
            if token_ids is not None:
                logp[s : s + rows] = z.gather(-1, token_ids[s : s + rows, None]).squeeze(-1)
            if want_entropy:
                ent[s : s + rows] = log_total - torch.linalg.vecdot(e, shifted) / log_total.exp()
        if token_ids is not None:
            logp -= lse
        ctx.save_for_backward(logits, token_ids, lse)
        ctx.inv_temp, ctx.rows = inv_temp, rows
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        logits, token_ids, lse = ctx.saved_tensors
        inv_temp, rows = ctx.inv_temp, ctx.rows
        if grad_logp is None and grad_ent is None:
            return None, None, None, None, None
        acc = _acc_dtype(logits)
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], rows):
            z = logits[s : s + rows].to(acc)
            if inv_temp != 1.0:
                z = z * inv_temp
            # In place where possible: one [rows, V] temporary besides z (none more for logp).
            p = torch.sub(z, lse[s : s + rows, None]).exp_()
            if grad_ent is not None:
                mean_z = torch.linalg.vecdot(p, z)[:, None]
                weight = (z - mean_z).mul_(grad_ent[s : s + rows, None].to(acc))
                if grad_logp is not None:
                    weight.add_(grad_logp[s : s + rows, None].to(acc))
                chunk = p.mul_(weight).neg_()
            else:
                chunk = p.mul_(grad_logp[s : s + rows, None].to(acc)).neg_()
            if grad_logp is not None:
                chunk.scatter_add_(
                    -1, token_ids[s : s + rows, None], grad_logp[s : s + rows, None].to(acc)
                )
            torch.mul(chunk, inv_temp, out=grad[s : s + rows])
        return grad, None, None, None, None


def _reduce(
    logits: torch.Tensor,
    token_ids: torch.Tensor | None,
    temperature: float,
    chunk_size: int | None,
    want_entropy: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Check the arguments, flatten, run :class:`_LogpEntropy`, restore the leading shape."""
    if token_ids is not None and logits.shape[:-1] != token_ids.shape:
        raise ValueError(
            f"token_ids shape {tuple(token_ids.shape)} must equal logits shape without the "
            f"vocabulary axis {tuple(logits.shape[:-1])}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    logp, ent = _LogpEntropy.apply(
        logits.reshape(-1, vocab),
        None if token_ids is None else token_ids.reshape(-1).long(),
        1.0 / temperature,
        _rows_per_chunk(logits, chunk_size),
        want_entropy,
    )
    return (
        None if token_ids is None else logp.reshape(lead),
        ent.reshape(lead) if want_entropy else None,
    )


def logp_and_entropy(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`selective_log_softmax` and :func:`entropy_from_logits` of the same logits in one
    pass over them (one exponential per element instead of two); both differentiable."""
    return _reduce(logits, token_ids, temperature, chunk_size, True)


def selective_log_softmax(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Log-probability of ``token_ids`` under ``softmax(logits / temperature)``, in float32.

    ``logits``: ``[..., V]`` in any float dtype; ``token_ids``: ``[...]`` (same leading shape).
    Never materialises a float32 ``[..., V]`` tensor: rows are processed ``chunk_size`` at a time
    (default: as many as fit 2**24 floats, 2**22 on CPU). Differentiable with respect to
    ``logits``.
    """
    return _reduce(logits, token_ids, temperature, chunk_size, False)[0]


def entropy_from_logits(
    logits: torch.Tensor, *, temperature: float = 1.0, chunk_size: int | None = None
) -> torch.Tensor:
    """Full-vocabulary entropy ``logsumexp(z) - sum(softmax(z) * z)`` of ``z = logits / T``.

    ``logits``: ``[..., V]``; returns ``[...]`` in float32, chunked like
    :func:`selective_log_softmax` and differentiable.
    """
    return _reduce(logits, None, temperature, chunk_size, True)[1]


def sampled_entropy(logp: torch.Tensor) -> torch.Tensor:
    """Single-sample entropy estimate ``-log p(sampled token)`` (what PAPO's code calls entropy)."""
    return -logp.float()
