"""Hand-computed values for advantages, KL estimators, aggregation and the clipped policy loss."""

import math

import pytest
import torch

from vispo.algos import (
    aggregate,
    dynamic_sampling_keep,
    group_advantages,
    kl_estimate,
    overlong_penalty,
    ppo_clip_loss,
    zero_std_group_fraction,
)

# Groups (interleaved on purpose): id 7 -> rewards 1, 0, 0; id 3 -> 1, 1; id 5 -> 0.5 alone.
REWARDS = torch.tensor([1.0, 1.0, 0.0, 0.5, 0.0, 1.0])
GROUPS = torch.tensor([7, 3, 7, 5, 7, 3])


def test_group_advantages_group_scale_by_hand():
    # Group 7: mean 1/3, deviations 2/3, -1/3, -1/3; unbiased var = (4/9 + 1/9 + 1/9) / 2 = 1/3.
    std = math.sqrt(1 / 3)
    expected = torch.tensor([(2 / 3) / std, 0.0, (-1 / 3) / std, 0.0, (-1 / 3) / std, 0.0])
    got = group_advantages(REWARDS, GROUPS, scale="group", eps=0.0)
    torch.testing.assert_close(got, expected)
    # With the default eps the value shrinks by std / (std + 1e-6).
    got_eps = group_advantages(REWARDS, GROUPS)
    torch.testing.assert_close(got_eps, expected * std / (std + 1e-6))


def test_group_advantages_none_and_batch_scale_by_hand():
    got = group_advantages(REWARDS, GROUPS, scale="none")
    torch.testing.assert_close(got, torch.tensor([2 / 3, 0.0, -1 / 3, 0.0, -1 / 3, 0.0]))
    # Batch std of [1, 1, 0, 0.5, 0, 1]: mean 7/12, sum of squared deviations 1.2083333 / 5.
    batch_std = math.sqrt(1.2083333333 / 5)
    got = group_advantages(REWARDS, GROUPS, scale="batch", eps=0.0)
    expected = torch.tensor([2 / 3, 0.0, -1 / 3, 0.0, -1 / 3, 0.0]) / batch_std
    torch.testing.assert_close(got, expected)


def test_group_advantages_degenerate_groups_are_zero_not_nan():
    # All-equal values that do not average exactly in float (0.1 * 3 / 3 != 0.1).
    r = torch.tensor([0.1, 0.1, 0.1, 0.7])
    g = torch.tensor([0, 0, 0, 1])
    for scale in ("group", "none", "batch"):
        adv = group_advantages(r, g, scale=scale)
        assert torch.equal(adv, torch.zeros(4)), scale
    assert group_advantages(torch.tensor([]), torch.tensor([], dtype=torch.long)).numel() == 0


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="scale"):
        group_advantages(REWARDS, GROUPS, scale="std")
    with pytest.raises(ValueError, match=r"\[B\]"):
        group_advantages(REWARDS[:, None], GROUPS)


def test_zero_std_fraction_and_dynamic_sampling():
    assert zero_std_group_fraction(REWARDS, GROUPS).item() == pytest.approx(2 / 3)
    acc = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0])  # group 7 mean 1/3, 3 mean 1, 5 mean 0
    keep = dynamic_sampling_keep(acc, GROUPS)
    assert keep.tolist() == [True, False, True, False, True, False]


def test_overlong_penalty_by_hand():
    lengths = torch.tensor([10, 16, 18, 20, 25])
    # max 20, buffer 4: start at 16; 18 -> -(2/4); 20 -> -1; beyond -> -1.
    got = overlong_penalty(lengths, max_length=20, buffer=4, factor=1.0)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))


def test_kl_estimators_by_hand():
    logp, logq = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_estimate(logp, logq, "k1").item() == pytest.approx(math.log(2))
    assert kl_estimate(logp, logq, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    # k3: x = log q - log p = -log 2; exp(x) - x - 1 = 0.5 + log 2 - 1.
    assert kl_estimate(logp, logq, "k3").item() == pytest.approx(0.5 + math.log(2) - 1)
    with pytest.raises(ValueError, match="kind"):
        kl_estimate(logp, logq, "k4")


def test_k3_clamps():
    logp = torch.tensor([0.0, 0.0, -1e4, 0.0])
    logq = torch.tensor([-100.0, 30.0, 0.0, 0.0])
    got = kl_estimate(logp, logq, "k3")
    # x clamps to -20 -> exp(-20) + 19 = 19.000000002 -> value clamp 10; x = 20 -> clamp 10.
    assert got.tolist() == [10.0, 10.0, 10.0, 0.0]
    logp.requires_grad_(True)
    kl_estimate(logp, logq, "k3").sum().backward()
    assert torch.isfinite(logp.grad).all()


V = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("token-mean", 7 / 3),  # (1 + 2 + 4) / 3
        ("seq-mean-token-mean", (1.5 + 4.0) / 2),
        ("seq-mean-token-sum", (3.0 + 4.0) / 2),
        ("seq-mean-token-sum-norm", 7 / (2 * 3)),
    ],
)
def test_aggregate_by_hand(mode, expected):
    assert aggregate(V, M, mode).item() == pytest.approx(expected)
    assert aggregate(V, M.bool(), mode).item() == pytest.approx(expected)


def test_aggregate_options_and_edge_cases():
    assert aggregate(V, M, "seq-mean-token-sum-norm", horizon=4).item() == pytest.approx(7 / 8)
    assert aggregate(V, M, "token-mean", total=14.0).item() == pytest.approx(0.5)
    empty_row = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert aggregate(V, empty_row, "seq-mean-token-mean").item() == pytest.approx(1.5)
    assert aggregate(V, torch.zeros_like(M), "token-mean").item() == 0.0
    assert aggregate(V, torch.zeros_like(M), "seq-mean-token-mean").item() == 0.0
    # Non-finite values in padding never leak into the result or its gradient.
    v = V.clone()
    v[0, 2] = float("nan")
    v[1, 1] = float("inf")
    v.requires_grad_(True)
    out = aggregate(v, M, "token-mean")
    out.backward()
    assert out.item() == pytest.approx(7 / 3)
    assert torch.isfinite(v.grad).all()
    with pytest.raises(ValueError, match="mode"):
        aggregate(V, M, "mean")


def test_ppo_clip_loss_by_hand():
    # Four tokens, one per case (clip_low 0.2, clip_high 0.3, dual clip 3):
    #  A=+1, ratio 1.5: max(-1.5, -1.3) = -1.3  (upper clip active)
    #  A=+1, ratio 0.5: max(-0.5, -0.8) = -0.5
    #  A=-1, ratio 0.5: max(0.5, 0.8)   =  0.8  (lower clip active)
    #  A=-1, ratio 5.0: max(5.0, 1.3)   =  5.0 -> dual clip min(5, 3) = 3
    ratio = torch.tensor([[1.5, 0.5], [0.5, 5.0]])
    old = torch.zeros(2, 2)
    logp = ratio.log().requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    mask = torch.ones(2, 2)
    loss, m = ppo_clip_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.3, dual_clip=3.0)
    assert loss.item() == pytest.approx((-1.3 - 0.5 + 0.8 + 3.0) / 4)
    assert m["clip/high"].item() == pytest.approx(0.25)
    assert m["clip/low"].item() == pytest.approx(0.25)
    assert m["clip/dual"].item() == pytest.approx(0.25)
    approx = -(math.log(1.5) + 2 * math.log(0.5) + math.log(5.0)) / 4
    assert m["approx_kl"].item() == pytest.approx(approx, rel=1e-5)
    loss.backward()
    # Only the unclipped token has gradient: d(-A * ratio)/dlogp = -ratio = -0.5, over 4 tokens.
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.125], [0.0, 0.0]]))


def test_ppo_clip_loss_sequence_advantages_broadcast_and_no_dual():
    logp = torch.tensor([[math.log(5.0), 0.0]])
    adv_seq = torch.tensor([-1.0])
    mask = torch.tensor([[1.0, 0.0]])
    loss, _ = ppo_clip_loss(logp, torch.zeros(1, 2), adv_seq, mask, dual_clip=None)
    assert loss.item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_clip_loss(logp, torch.zeros(1, 2), adv_seq, mask, dual_clip=0.5)


def test_ppo_clip_loss_extreme_gaps_stay_finite():
    logp = torch.tensor([[-1e4, 1e4, 0.0]], requires_grad=True)
    old = torch.tensor([[0.0, -1e4, 0.0]])
    for a in (1.0, -1.0):
        loss, m = ppo_clip_loss(logp, old, torch.tensor([a]), torch.ones(1, 3))
        grad = torch.autograd.grad(loss, logp)[0]
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert all(torch.isfinite(v) for v in m.values())
