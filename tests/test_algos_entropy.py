"""Chunked log-probs and entropies against the naive float64 route; custom backward gradchecks."""

import pytest
import torch

from vispo.algos import (
    entropy_from_logits,
    logp_and_entropy,
    sampled_entropy,
    selective_log_softmax,
)


def _naive_logp(logits, ids, temperature=1.0):
    return torch.log_softmax(logits.double() / temperature, -1).gather(-1, ids[..., None])[..., 0]


def _naive_entropy(logits, temperature=1.0):
    lp = torch.log_softmax(logits.double() / temperature, -1)
    return -(lp.exp() * lp).sum(-1)


@pytest.mark.parametrize("chunk", [1, 3, 7, None])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_matches_naive(chunk, temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 50, generator=g) * 4
    ids = torch.randint(0, 50, (3, 5), generator=g)
    lp = selective_log_softmax(logits, ids, temperature=temperature, chunk_size=chunk)
    h = entropy_from_logits(logits, temperature=temperature, chunk_size=chunk)
    assert lp.dtype == torch.float32 and h.dtype == torch.float32
    torch.testing.assert_close(
        lp.double(), _naive_logp(logits, ids, temperature), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(h.double(), _naive_entropy(logits, temperature), atol=1e-5, rtol=0)


def test_bfloat16_logits_agree_with_float32_reference():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 16, 300, generator=g) * 3).to(torch.bfloat16)
    ids = torch.randint(0, 300, (2, 16), generator=g)
    ref = torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None])[..., 0]
    got = selective_log_softmax(logits, ids, chunk_size=5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_entropy_known_values():
    # Uniform over V: log V. One-hot-like (huge gap): ~0.
    v = 8
    assert entropy_from_logits(torch.zeros(1, v)).item() == pytest.approx(
        torch.log(torch.tensor(8.0)).item()
    )
    peaked = torch.tensor([[1e4, 0.0, 0.0, -1e4]])
    h = entropy_from_logits(peaked)
    assert torch.isfinite(h).all() and h.item() == pytest.approx(0.0, abs=1e-6)
    lp = selective_log_softmax(peaked, torch.tensor([3]))
    assert lp.item() == pytest.approx(-2e4)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 6, (2, 3), generator=g)
    assert torch.autograd.gradcheck(
        lambda z: selective_log_softmax(z, ids, temperature=0.8, chunk_size=4), (z,)
    )
    assert torch.autograd.gradcheck(
        lambda z: entropy_from_logits(z, temperature=1.5, chunk_size=2), (z,)
    )


def test_gradient_matches_autograd_of_naive_in_float32():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 7, 33, generator=g, requires_grad=True)
    ids = torch.randint(0, 33, (4, 7), generator=g)
    w = torch.randn(4, 7, generator=g)
    (selective_log_softmax(z, ids, chunk_size=3) * w).sum().backward()
    got = z.grad.clone()
    z.grad = None
    (torch.log_softmax(z, -1).gather(-1, ids[..., None])[..., 0] * w).sum().backward()
    torch.testing.assert_close(got, z.grad)
    z.grad = None
    (entropy_from_logits(z, chunk_size=5) * w).sum().backward()
    got = z.grad.clone()
    z.grad = None
    lp = torch.log_softmax(z, -1)
    (-(lp.exp() * lp).sum(-1) * w).sum().backward()
    torch.testing.assert_close(got, z.grad)


@pytest.mark.parametrize("chunk", [2, None])
def test_fused_logp_and_entropy_match_naive_values_and_gradients(chunk):
    """The one-pass pair equals the naive float64 route, and its gradient through either or
    both outputs equals autograd of the naive formulas."""
    g = torch.Generator().manual_seed(4)
    z = (torch.randn(3, 5, 40, generator=g, dtype=torch.float64) * 3).requires_grad_()
    ids = torch.randint(0, 40, (3, 5), generator=g)
    w_lp, w_h = (
        torch.randn(3, 5, generator=g, dtype=torch.float64),
        torch.randn(3, 5, generator=g, dtype=torch.float64),
    )
    lp, h = logp_and_entropy(z, ids, temperature=0.7, chunk_size=chunk)
    torch.testing.assert_close(lp, _naive_logp(z.detach(), ids, 0.7), atol=1e-12, rtol=0)
    torch.testing.assert_close(h, _naive_entropy(z.detach(), 0.7), atol=1e-12, rtol=0)
    naive_lp, naive_h = _naive_logp(z, ids, 0.7), _naive_entropy(z, 0.7)
    for weights in ((w_lp, None), (None, w_h), (w_lp, w_h)):
        terms = [(x * w).sum() for x, w in zip((lp, h), weights) if w is not None]
        (got,) = torch.autograd.grad(sum(terms), z, retain_graph=True)
        terms = [(x * w).sum() for x, w in zip((naive_lp, naive_h), weights) if w is not None]
        (want,) = torch.autograd.grad(sum(terms), z, retain_graph=True)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_shape_and_argument_checks():
    with pytest.raises(ValueError, match="token_ids shape"):
        selective_log_softmax(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        entropy_from_logits(torch.zeros(2, 5), temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        selective_log_softmax(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), chunk_size=0)
    assert torch.equal(sampled_entropy(torch.tensor([-0.5, -2.0])), torch.tensor([0.5, 2.0]))
