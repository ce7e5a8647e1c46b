"""Agreement with the reference code (PAPO's EasyR1 fork, CPPO's verl recipe, verl), on values
computed by hand: each test fails if the corresponding rule is changed."""

import math

import pytest
import torch

from vispo.algos import (
    ObjectiveConfig,
    ObjectiveInputs,
    compute_objective,
    objective_preset,
    papo_perception_loss,
    quantile_top_mask,
)
from vispo.train.config import load_config


def _k3(x: float) -> float:
    """k3 of KL(p || q) with x = log q - log p."""
    return math.exp(x) - x - 1


# --- PAPO's top-p token selection (reference: kl_prcp_token_level_mask_top_p) -----------------

# log q - log p of seven response tokens and one padding position (which a huge KL must not
# influence). Two tokens tie at the top.
GAPS = [0.0, 0.5, -0.5, 1.0, 2.0, 2.0, 0.1, 5.0]
MASK = [1, 1, 1, 1, 1, 1, 1, 0]


def _seven_tokens():
    lo = torch.full((1, 8), math.log(0.3))
    lm = lo + torch.tensor([GAPS])
    return lo, lm, torch.tensor([MASK], dtype=torch.float32)


def test_papo_top_p_keeps_the_tokens_at_or_above_the_quantile_by_hand():
    lo, lm, mask = _seven_tokens()
    kl = [_k3(x) for x in GAPS[:7]]
    ranked = sorted(kl)
    # The 0.8 quantile of 7 values, linear interpolation: position 0.8 * 6 = 4.8.
    threshold = ranked[4] + 0.8 * (ranked[5] - ranked[4])
    keep = [v >= threshold for v in kl]
    assert keep == [False, False, False, False, True, True, False]  # the two tied tokens
    got = quantile_top_mask(lm - lo, mask, 0.2)  # any per-token score works: here the gaps
    assert got[0, :7].tolist() == [False, False, False, False, True, True, False]
    assert not got[0, 7]
    # The loss divides the kept KL by all 7 response tokens (not by the 2 kept).
    loss, _ = papo_perception_loss(lo, lm, mask, gamma=1.0, top_frac=0.2)
    assert loss.item() == pytest.approx(-(2 * _k3(2.0)) / 7, rel=1e-6)
    # Selection happens before clipping: the two tokens are kept, then clipped to 0.2. (Clipping
    # first would tie four tokens at 0.2 and keep them all: -0.8 / 7.)
    loss, _ = papo_perception_loss(lo, lm, mask, gamma=1.0, top_frac=0.2, kl_clip=0.2)
    assert loss.item() == pytest.approx(-(2 * 0.2) / 7, rel=1e-6)


def test_quantile_top_mask_edge_rows():
    values = torch.tensor([[3.0, 1.0, 2.0], [5.0, 5.0, 5.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    got = quantile_top_mask(values, mask, 0.5)
    # Row 0: median 2 -> keep 3 and 2. Row 1: all tie -> keep both real tokens. Row 2: empty.
    assert got.tolist() == [[True, False, True], [True, True, False], [False, False, False]]
    assert quantile_top_mask(values, mask, 1.0).tolist()[0] == [True, True, True]
    with pytest.raises(ValueError, match="top_p"):
        quantile_top_mask(values, mask, 0.0)


def test_objective_uses_the_reference_top_p_and_all_tokens_as_denominator():
    lo, lm, mask = _seven_tokens()
    cfg = objective_preset("papo_g", beta=0.0, gamma=1.0, perception_top_frac=0.2)
    x = ObjectiveInputs(lo, torch.zeros(1), mask, logp_mask=lm)
    _, m = compute_objective(cfg, x)
    assert m["loss/perception_kl"].item() == pytest.approx(-(2 * _k3(2.0)) / 7, rel=1e-6)


# --- reference KL direction -------------------------------------------------------------------


def test_reference_kl_is_k3_of_policy_against_reference_by_hand():
    """KL(pi || pi_ref) from tokens sampled from pi: x = log pi_ref - log pi. With pi = 0.5 and
    pi_ref = 0.25, k3 = 0.5 + log 2 - 1 = 0.1931; the swapped direction would give
    2 - log 2 - 1 = 0.3069. Gradient: d/dlogp = 1 - pi_ref / pi = 0.5 per token, over 2 tokens."""
    cfg = objective_preset("grpo", beta=0.1)
    logp = torch.tensor([[math.log(0.5), math.log(0.5)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.25)]])
    x = ObjectiveInputs(logp, torch.zeros(1), torch.ones(1, 2), ref_logp=ref)
    loss, m = compute_objective(cfg, x)
    assert m["loss/ref_kl"].item() == pytest.approx(0.1 * (0.5 + math.log(2) - 1), rel=1e-6)
    assert m["kl/ref"].item() == pytest.approx(0.5 + math.log(2) - 1, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.1 * 0.5 / 2, 0.1 * 0.5 / 2]]))


# --- PAPO's entropy terms ---------------------------------------------------------------------


def test_collapse_guard_scale_applies_to_the_papo_entropy_weights_by_hand():
    """``gamma_scale`` (the collapse guard halving gamma) scales the double-entropy weights too,
    as PAPO's annealing does: the sampled entropies are mean(-log p) = log 2 and log 4."""
    cfg = objective_preset("papo_d", eta_orig=0.2, eta_mask=0.4, masked_grad=True)
    lo = torch.tensor([[math.log(0.5)]])
    lm = torch.tensor([[math.log(0.25)]])
    x = ObjectiveInputs(lo, torch.zeros(1), torch.ones(1, 1), logp_mask=lm)
    _, m = compute_objective(cfg, x, gamma_scale=0.25)
    assert m["loss/entropy_orig"].item() == pytest.approx(0.25 * 0.2 * math.log(2), rel=1e-6)
    assert m["loss/entropy_mask"].item() == pytest.approx(0.25 * 0.4 * math.log(4), rel=1e-6)
    assert m["loss/perception_kl"].item() == pytest.approx(-0.25 * 0.01 * _k3(-math.log(2)))


def test_papo_entropies_are_token_means_whatever_the_aggregation():
    """PAPO's code takes ``masked_mean(-log p)`` for both entropy terms even when the policy
    loss uses another ``loss_avg_mode``; the KL term follows the aggregation."""
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.125], [0.5, 1.0, 1.0]]))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    cfg = ObjectiveConfig(agg="seq-mean-token-sum", beta=0.0, gamma=0.1, eta_orig=1.0)
    cfg.eta_mask = 2.0  # after validation: no masked_grad warning for this hand check
    x = ObjectiveInputs(logp, torch.zeros(2), mask, logp_mask=logp)
    _, m = compute_objective(cfg, x)
    token_mean = (math.log(2) + math.log(4) + math.log(8) + math.log(2)) / 4
    assert m["loss/entropy_orig"].item() == pytest.approx(token_mean, rel=1e-6)
    assert m["loss/entropy_mask"].item() == pytest.approx(2 * token_mean, rel=1e-6)
    # With agg=seq-mean-token-sum the sum per sequence would be averaged: (log 64 + log 2) / 2.
    assert token_mean != pytest.approx((math.log(64) + math.log(2)) / 2)


# --- CPPO's aggregation -----------------------------------------------------------------------


def _cppo_case():
    """Two sequences with positive advantage and one negative; every response token selected
    (cpl_select: all). d+ = k3 gap a, d- = 0 (I- equals the original), so c = softplus(k3/tau)."""
    logp = torch.full((3, 3), math.log(0.5))
    gaps = torch.tensor([[0.2, 0.4, 0.7], [0.6, 0.0, 0.0], [0.3, 0.3, 0.3]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    x = ObjectiveInputs(
        logp, torch.tensor([1.0, 0.5, -1.0]), mask, logp_pos=logp + gaps, logp_neg=logp.clone()
    )
    c = [[math.log1p(math.exp(_k3(g) / 0.1)) for g in row] for row in gaps.tolist()]
    return x, c


def test_cppo_term_token_mean_by_hand():
    x, c = _cppo_case()
    cfg = objective_preset("cppo", beta=0.0, cpl_lambda=1.0, cpl_select="all")
    _, m = compute_objective(cfg, x)
    assert m["loss/cpl"].item() == pytest.approx(
        (c[0][0] + c[0][1] + c[0][2] + c[1][0]) / 4, rel=1e-6
    )


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "seq-mean-token-sum"])
def test_cppo_term_follows_the_actor_aggregation_by_hand(agg):
    """The recipe applies ``loss_agg_mode`` with the selection as mask; verl's seq-mean modes
    divide by every sequence of the batch (3 here, the negative one included)."""
    x, c = _cppo_case()
    cfg = objective_preset("cppo", beta=0.0, cpl_lambda=1.0, cpl_select="all", agg=agg)
    _, m = compute_objective(cfg, x)
    if agg == "seq-mean-token-mean":
        expected = ((c[0][0] + c[0][1] + c[0][2]) / 3 + c[1][0]) / 3
    else:
        expected = (c[0][0] + c[0][1] + c[0][2] + c[1][0]) / 3
    assert m["loss/cpl"].item() == pytest.approx(expected, rel=1e-6)
    # The token-mean over the 4 selected tokens is a different value here.
    assert expected != pytest.approx((c[0][0] + c[0][1] + c[0][2] + c[1][0]) / 4, rel=1e-3)


# --- Dr. GRPO's constant normaliser -----------------------------------------------------------


def test_dr_grpo_horizon_is_the_configured_max_response_length():
    cfg = load_config(None, ["objective.name=dr_grpo", "rollout.max_new_tokens=8"])
    assert cfg.objective.horizon == 8
    cfg = load_config(None, ["objective.name=dr_grpo", "objective.horizon=3"])
    assert cfg.objective.horizon == 3
    assert load_config(None, ["objective.name=grpo"]).objective.horizon is None


def test_dr_grpo_sequence_loss_and_gradient_do_not_depend_on_other_responses():
    """Sequence 0 (3 tokens) gets the same loss share and gradient whether the other response
    has 2 tokens or 6: the divisor is B x max_new_tokens = 2 x 8, not B x the longest response.
    On-policy (ratio 1, nothing clipped) d loss / d logp_t = -A / (B * H)."""
    cfg = load_config(None, ["objective.name=dr_grpo", "rollout.max_new_tokens=8"]).objective
    adv = torch.tensor([1.5, -0.5])
    grads, losses = [], []
    for other in (2, 6):
        T = max(3, other)
        logp = torch.full((2, T), -1.0, requires_grad=True)
        mask = torch.zeros(2, T)
        mask[0, :3] = 1
        mask[1, :other] = 1
        own = ObjectiveInputs(logp, adv * torch.tensor([1.0, 0.0]), mask)
        loss, _ = compute_objective(cfg, own)  # sequence 1 has advantage 0: sequence 0's share
        loss.backward()
        losses.append(loss.item())
        grads.append(logp.grad[0, :3].clone())
    assert losses[0] == pytest.approx(losses[1]) == pytest.approx(-1.5 * 3 / 16)
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(grads[0], torch.full((3,), -1.5 / 16))
