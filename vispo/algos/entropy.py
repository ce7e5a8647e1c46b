"""Per-token log-probabilities and entropies from logits, chunked (algorithms.md section 5).

A float32 ``[B, T, V]`` copy of the logits is the largest tensor an RL step could create: for
Qwen's 151,936-token vocabulary at 4 x 2048 tokens it is 5 GB. Both functions here therefore walk
the flattened token axis in chunks, upcasting one chunk at a time, and their backward passes
recompute the softmax chunk by chunk instead of saving float32 activations. Peak extra memory
is one float32 chunk, whatever the sequence length.
"""

from __future__ import annotations

import torch

# Elements of a float32 chunk (rows x vocabulary): 2**24 floats = 64 MiB.
_CHUNK_ELEMENTS = 1 << 24


def _rows_per_chunk(vocab: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    return max(1, _CHUNK_ELEMENTS // max(vocab, 1))


def _acc_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 logits; float64 stays float64 (gradcheck)."""
    return torch.promote_types(logits.dtype, torch.float32)


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log p(token) = z[token] - logsumexp(z), chunked over rows.

    Backward: d logp / dz = onehot(token) - softmax(z), recomputed per chunk.
    """

    @staticmethod
    def forward(ctx, logits, token_ids, inv_temp, rows):
        acc = _acc_dtype(logits)
        out = torch.empty(logits.shape[0], dtype=acc, device=logits.device)
        lse = torch.empty_like(out)
        for s in range(0, logits.shape[0], rows):
            z = logits[s : s + rows].to(acc)
            if inv_temp != 1.0:
                z = z * inv_temp
            lse[s : s + rows] = torch.logsumexp(z, dim=-1)
            out[s : s + rows] = z.gather(-1, token_ids[s : s + rows, None]).squeeze(-1)
        out -= lse
        ctx.save_for_backward(logits, token_ids, lse)
        ctx.inv_temp, ctx.rows = inv_temp, rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, token_ids, lse = ctx.saved_tensors
        inv_temp, rows = ctx.inv_temp, ctx.rows
        acc = _acc_dtype(logits)
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], rows):
            z = logits[s : s + rows].to(acc)
            if inv_temp != 1.0:
                z = z * inv_temp
            g = grad_out[s : s + rows, None].to(acc)
            chunk = -torch.exp(z - lse[s : s + rows, None]) * g
            chunk.scatter_add_(-1, token_ids[s : s + rows, None], g)
            grad[s : s + rows] = chunk * inv_temp
        return grad, None, None, None


def _entropy_rows(z: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(z) per row, as log(sum e) - sum(e * s) / sum(e) with s = z - max(z).

    Shifting first and normalising once keeps float32 accurate to ~1e-6 over a 152k vocabulary;
    ``logsumexp(z) - sum(softmax(z) * z)`` loses ~3e-4 to cancellation there.
    """
    shifted = z - z.amax(-1, keepdim=True)
    e = shifted.exp()
    total = e.sum(-1)
    return total.log() - (e * shifted).sum(-1) / total


class _Entropy(torch.autograd.Function):
    """H(z) = logsumexp(z) - sum(softmax(z) * z), chunked over rows.

    Backward: dH / dz_j = -p_j * (z_j - E_p[z]), recomputed per chunk.
    """

    @staticmethod
    def forward(ctx, logits, inv_temp, rows):
        acc = _acc_dtype(logits)
        out = torch.empty(logits.shape[0], dtype=acc, device=logits.device)
        for s in range(0, logits.shape[0], rows):
            z = logits[s : s + rows].to(acc)
            if inv_temp != 1.0:
                z = z * inv_temp
            out[s : s + rows] = _entropy_rows(z)
        ctx.save_for_backward(logits)
        ctx.inv_temp, ctx.rows = inv_temp, rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (logits,) = ctx.saved_tensors
        inv_temp, rows = ctx.inv_temp, ctx.rows
        acc = _acc_dtype(logits)
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], rows):
            z = logits[s : s + rows].to(acc)
            if inv_temp != 1.0:
                z = z * inv_temp
            shifted = z - z.amax(-1, keepdim=True)
            e = shifted.exp()
            p = e / e.sum(-1, keepdim=True)
            mean_z = (p * shifted).sum(-1, keepdim=True)
            g = grad_out[s : s + rows, None].to(acc)
            grad[s : s + rows] = (-p * (shifted - mean_z) * g) * inv_temp
        return grad, None, None


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
    (default: as many as fit 2**24 floats). Differentiable with respect to ``logits``.
    """
    if logits.shape[:-1] != token_ids.shape:
        raise ValueError(
            f"token_ids shape {tuple(token_ids.shape)} must equal logits shape without the "
            f"vocabulary axis {tuple(logits.shape[:-1])}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    ids = token_ids.reshape(-1).long()
    out = _SelectiveLogSoftmax.apply(
        flat, ids, 1.0 / temperature, _rows_per_chunk(vocab, chunk_size)
    )
    return out.reshape(lead)


def entropy_from_logits(
    logits: torch.Tensor, *, temperature: float = 1.0, chunk_size: int | None = None
) -> torch.Tensor:
    """Full-vocabulary entropy ``logsumexp(z) - sum(softmax(z) * z)`` of ``z = logits / T``.

    ``logits``: ``[..., V]``; returns ``[...]`` in float32, chunked like
    :func:`selective_log_softmax` and differentiable.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    out = _Entropy.apply(flat, 1.0 / temperature, _rows_per_chunk(vocab, chunk_size))
    return out.reshape(lead)


def sampled_entropy(logp: torch.Tensor) -> torch.Tensor:
    """Single-sample entropy estimate ``-log p(sampled token)`` (what PAPO's code calls entropy)."""
    return -logp.float()
