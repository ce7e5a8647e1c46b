"""Advantage estimators (vispo.algos.advantage_estimate): by hand and against verl's definitions.

The ``_verl_*`` references are written for this test from verl's ``core_algos.py`` (commit
b178a3cd56f5: ``compute_rloo_vectorized_outcome_advantage``,
``compute_reinforce_plus_plus_outcome_advantage`` with gamma 1,
``compute_reinforce_plus_plus_baseline_outcome_advantage`` and ``verl_F.masked_whiten``), on
token-level ``[B, T]`` rewards (the outcome on the last response token), in float64.
"""

import math

import pytest
import torch

from vispo.algos import advantage_estimate, group_advantages


def _masked_whiten(values, mask):
    n = mask.sum()
    mean = (values * mask).sum() / (n + 1e-8)
    var = (((values - mean) ** 2) * mask).sum() / (n + 1e-8) * n / (n - 1)
    return (values - mean) * torch.rsqrt(var + 1e-8)


def _verl_reinforce_pp(token_rewards, mask):
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros(token_rewards.shape[0], dtype=token_rewards.dtype)
    for t in reversed(range(token_rewards.shape[1])):
        running = token_rewards[:, t] + 1.0 * running
        returns[:, t] = running
        running = running * mask[:, t]
    return _masked_whiten(returns, mask) * mask


def _verl_reinforce_pp_baseline(token_rewards, mask, index):
    scores = token_rewards.sum(-1)
    out = scores.clone()
    for i in range(len(scores)):
        same = [j for j in range(len(scores)) if index[j] == index[i]]
        mean = scores[same].mean() if len(same) > 1 else torch.tensor(0.0, dtype=scores.dtype)
        out[i] = scores[i] - mean
    tiled = out[:, None].expand_as(mask) * mask
    return _masked_whiten(tiled, mask) * mask


def _verl_rloo_vectorized(scores, index):
    inv = torch.unique(index, return_inverse=True)[1]
    c = torch.bincount(inv)[inv].to(scores.dtype)
    sums = torch.bincount(inv, weights=scores)[inv]
    return ((c * scores - sums) / (c - 1).clamp_min(1)) * (c > 1)


def _batch(seed, B=10, T=7):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 3, (B,), generator=g).double() / 2 + 0.1 * torch.rand(B, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).double()
    token_rewards = torch.zeros(B, T, dtype=torch.float64)
    token_rewards[torch.arange(B), lengths - 1] = rewards
    group_ids = torch.tensor([3, 3, 3, 0, 0, 7, 7, 7, 7, 9])  # the last group has one member
    return rewards, lengths, mask, token_rewards, group_ids


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_reinforce_pp_matches_verl(seed):
    rewards, lengths, mask, token_rewards, gid = _batch(seed)
    ref = _verl_reinforce_pp(token_rewards, mask)
    adv = advantage_estimate("reinforce_pp", rewards, gid, lengths=lengths)
    torch.testing.assert_close((adv.double()[:, None] * mask), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_reinforce_pp_baseline_matches_verl(seed):
    rewards, lengths, mask, token_rewards, gid = _batch(seed)
    ref = _verl_reinforce_pp_baseline(token_rewards, mask, gid.tolist())
    adv = advantage_estimate("reinforce_pp_baseline", rewards, gid, lengths=lengths)
    torch.testing.assert_close((adv.double()[:, None] * mask), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_rloo_matches_verl(seed):
    rewards, _, _, _, gid = _batch(seed)
    ref = _verl_rloo_vectorized(rewards, gid)
    adv = advantage_estimate("rloo", rewards, gid)
    torch.testing.assert_close(adv.double(), ref, rtol=1e-6, atol=1e-6)


def test_rloo_by_hand():
    # Group [1, 0, 0]: 1 - mean(0, 0) = 1; 0 - mean(1, 0) = -0.5. Group [2, 4]: -2, +2. Alone: 0.
    r = torch.tensor([1.0, 0.0, 0.0, 2.0, 4.0, 5.0])
    gid = torch.tensor([0, 0, 0, 1, 1, 2])
    adv = advantage_estimate("rloo", r, gid)
    torch.testing.assert_close(adv, torch.tensor([1.0, -0.5, -0.5, -2.0, 2.0, 0.0]))


def test_reinforce_pp_by_hand():
    # Rewards [1, 0] with lengths [3, 1]: token-weighted mean 3/4, unbiased variance over the 4
    # tokens: (3 * (1/4)^2 + (3/4)^2) / 3 = 1/4 -> advantages (1/4) / 0.5 = 0.5 and -1.5.
    adv = advantage_estimate(
        "reinforce_pp", torch.tensor([1.0, 0.0]), torch.tensor([0, 1]), lengths=torch.tensor([3, 1])
    )
    torch.testing.assert_close(adv, torch.tensor([0.5, -1.5]), rtol=1e-6, atol=1e-6)
    # With the group baseline and one group: centred [0.5, -0.5]; weighted mean 0.25; variance
    # (3 * 0.0625 + 0.5625) / 3 = 0.25 -> [0.5, -1.5] again (the shift cancels in the whitening).
    base = advantage_estimate(
        "reinforce_pp_baseline",
        torch.tensor([1.0, 0.0]),
        torch.tensor([0, 0]),
        lengths=torch.tensor([3, 1]),
    )
    torch.testing.assert_close(base, torch.tensor([0.5, -1.5]), rtol=1e-6, atol=1e-6)
    # Sequence weights by default: [1, 0] -> mean 0.5, var 0.5 -> +-0.5 / sqrt(0.5).
    seq = advantage_estimate("reinforce_pp", torch.tensor([1.0, 0.0]), torch.tensor([0, 1]))
    torch.testing.assert_close(seq, torch.tensor([1.0, -1.0]) * math.sqrt(0.5))


def test_baseline_differs_from_plain_across_groups():
    # Group means 0.5 and 2.5: the baseline removes the between-group difference, plain does not.
    r = torch.tensor([0.0, 1.0, 2.0, 3.0])
    gid = torch.tensor([0, 0, 1, 1])
    plain = advantage_estimate("reinforce_pp", r, gid)
    base = advantage_estimate("reinforce_pp_baseline", r, gid)
    assert plain[0] < plain[1] < plain[2] < plain[3]
    torch.testing.assert_close(base[0], base[2]) and torch.testing.assert_close(base[1], base[3])


def test_grpo_is_group_advantages_and_errors():
    r, gid = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 0])
    assert torch.equal(advantage_estimate("grpo", r, gid), group_advantages(r, gid))
    with pytest.raises(ValueError, match="advantage estimator"):
        advantage_estimate("gae", r, gid)
