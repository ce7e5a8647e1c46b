"""PAPO and CPPO terms: hand values, gradient paths, selection rules."""

import math

import pytest
import torch

from vispo.algos import (
    ObjectiveInputs,
    compute_objective,
    contrastive_perception_loss,
    cppo_perception_mask,
    double_entropy_loss,
    linear_anneal,
    objective_preset,
    papo_perception_loss,
    perception_kl,
    top_fraction_mask,
)

K3_HALF_QUARTER = 0.5 + math.log(2) - 1  # k3 with p = 0.5, q = 0.25


def test_perception_kl_and_papo_loss_by_hand():
    lo = torch.tensor([[math.log(0.5), math.log(0.5), 0.0]])
    lm = torch.tensor([[math.log(0.25), math.log(0.5), 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    kl = perception_kl(lo, lm)
    assert kl[0, 0].item() == pytest.approx(K3_HALF_QUARTER)
    assert kl[0, 1].item() == 0.0
    loss, _ = papo_perception_loss(lo, lm, mask, gamma=0.02)
    assert loss.item() == pytest.approx(-0.02 * K3_HALF_QUARTER / 2)
    # KL clip to [0, 0.1]; top-50%: the median of (k, 0) is k/2, so only the first token is
    # kept, and the mean still divides by both response tokens.
    loss, _ = papo_perception_loss(lo, lm, mask, gamma=1.0, kl_clip=0.1)
    assert loss.item() == pytest.approx(-(0.1 + 0.0) / 2)
    loss, _ = papo_perception_loss(lo, lm, mask, gamma=1.0, top_frac=0.5)
    assert loss.item() == pytest.approx(-K3_HALF_QUARTER / 2)


def test_papo_gradient_wrt_original_by_hand():
    # d k3 / d logp = 1 - exp(logq - logp); the loss is -gamma * mean over 2 tokens.
    lo = torch.tensor([[math.log(0.5), math.log(0.2)]], requires_grad=True)
    lm = torch.tensor([[math.log(0.25), math.log(0.4)]])
    loss, _ = papo_perception_loss(lo, lm, torch.ones(1, 2), gamma=0.1)
    loss.backward()
    expected = torch.tensor([[-(0.1 / 2) * (1 - 0.5), -(0.1 / 2) * (1 - 2.0)]])
    torch.testing.assert_close(lo.grad, expected)


@pytest.mark.parametrize("masked_grad", [False, True])
def test_masked_branch_gradient_follows_masked_grad(masked_grad):
    cfg = objective_preset("papo_d", masked_grad=masked_grad, beta=0.0)
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(3, 4, generator=g)).requires_grad_(True)
    logp_mask = (-torch.rand(3, 4, generator=g) - 0.5).requires_grad_(True)
    x = ObjectiveInputs(
        logp=logp,
        advantages=torch.tensor([1.0, -0.5, 0.2]),
        mask=torch.ones(3, 4),
        old_logp=logp.detach() + 0.01,
        logp_mask=logp_mask,
    )
    loss, _ = compute_objective(cfg, x)
    loss.backward()
    assert logp.grad is not None and logp.grad.abs().sum() > 0
    if masked_grad:
        assert logp_mask.grad.abs().sum() > 0
    else:
        assert logp_mask.grad is None or torch.count_nonzero(logp_mask.grad) == 0


def test_double_entropy_by_hand_and_sampled_estimator_gradient():
    h_o = torch.tensor([[1.0, 3.0]])
    h_m = torch.tensor([[2.0, 4.0]])
    t_o, t_m = double_entropy_loss(h_o, h_m, torch.ones(1, 2), eta_orig=0.03, eta_mask=0.05)
    assert t_o.item() == pytest.approx(0.06) and t_m.item() == pytest.approx(0.15)
    # Through the objective with the sampled estimator: H = mean(-logp), so each token of the
    # original path receives -eta / N on top of the policy gradient (zero here: A = 0).
    cfg = objective_preset("grpo", beta=0.0, eta_orig=0.2)
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = compute_objective(cfg, ObjectiveInputs(logp, torch.zeros(1), torch.ones(1, 2)))
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.1, -0.1]]))
    assert loss.item() == pytest.approx(0.2 * 1.5)


def test_linear_anneal_and_objective_schedule():
    assert linear_anneal(0.25, start=0.02, end=0.0, frac=0.5) == pytest.approx(0.01)
    assert linear_anneal(0.9, start=0.02, end=0.0, frac=0.5) == 0.0
    assert linear_anneal(0.9, start=0.02, end=None) == 0.02
    cfg = objective_preset("papo_g", beta=0.0, gamma_end=0.0, gamma_anneal_frac=0.5, eta_orig=0.1)
    lo = torch.tensor([[math.log(0.5)]])
    lm = torch.tensor([[math.log(0.25)]])
    x = ObjectiveInputs(lo, torch.zeros(1), torch.ones(1, 1), logp_mask=lm)
    _, m = compute_objective(cfg, x, progress=0.25)
    # gamma_t = 0.01 (half of 0.02); eta scales by the same factor 0.5.
    assert m["loss/perception_kl"].item() == pytest.approx(-0.01 * K3_HALF_QUARTER)
    assert m["loss/entropy_orig"].item() == pytest.approx(0.1 * 0.5 * math.log(2))
    _, m = compute_objective(cfg, x, progress=0.25, gamma_scale=0.5)
    assert m["perception/gamma"].item() == pytest.approx(0.005)


def test_top_fraction_mask_rules():
    vals = torch.tensor([[0.1, 0.9, 0.5, 0.7, 9.0], [1.0, 1.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    got = top_fraction_mask(vals, mask, 0.5)
    # Row 0: 4 tokens -> keep 2 (0.9, 0.7); the masked 9.0 is ignored. Row 1: 3 -> keep 1, but
    # all three tie at the threshold and ties are kept.
    assert got.tolist() == [[False, True, False, True, False], [True, True, True, False, False]]
    assert not top_fraction_mask(vals, torch.zeros_like(mask), 0.5).any()


def test_cppo_perception_mask_by_hand():
    H = torch.tensor([[1.0, 1.0, 2.0, 0.5, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    Hn = torch.tensor([[2.0, 1.5, 1.0, 1.5, 3.0], [0.5, 1.0, 0.2, 0.1, 0.3]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    adv = torch.tensor([1.0, 1.0])
    # Row 0: dH = [1, .5, -1, 1, 2(masked)] -> eligible 0, 1, 3; scores 1/2, .5/1.5, 1/1.5.
    # k = max(1, floor(0.5 * 3)) = 1 -> token 3. Row 1: no token gains entropy -> none.
    sel = cppo_perception_mask(H, Hn, adv, mask, top_frac=0.5)
    assert sel.tolist() == [[False, False, False, True, False], [False] * 5]
    sel = cppo_perception_mask(H, Hn, adv, mask, top_frac=1.0)
    assert sel[0].tolist() == [True, True, False, True, False]
    # Gating: a non-positive advantage removes the row; without gating it stays.
    neg = torch.tensor([0.0, 1.0])
    assert not cppo_perception_mask(H, Hn, neg, mask)[0].any()
    assert cppo_perception_mask(H, Hn, neg, mask, gate=False)[0, 3]
    # Token-level advantages [B, T] gate the same way.
    assert not cppo_perception_mask(H, Hn, neg[:, None].expand(2, 5), mask)[0].any()


def test_contrastive_loss_by_hand():
    lp = torch.tensor([[math.log(0.5), math.log(0.5), -3.0]])
    pos = torch.tensor([[math.log(0.5), math.log(0.25), 100.0]])
    neg = torch.tensor([[math.log(0.25), math.log(0.5), -100.0]])
    sel = torch.tensor([[True, True, False]])
    # Token 0: d+ = 0, d- = k3; token 1: d+ = k3, d- = 0. softplus(x) = log1p(exp(x)).
    c0 = math.log1p(math.exp(-K3_HALF_QUARTER / 0.1))
    c1 = math.log1p(math.exp(K3_HALF_QUARTER / 0.1))
    loss, m = contrastive_perception_loss(lp, pos, neg, sel, tau=0.1)
    assert loss.item() == pytest.approx((c0 + c1) / 2, rel=1e-5)
    assert m["cpl/d_neg"].item() == pytest.approx(K3_HALF_QUARTER / 2, rel=1e-5)
    # k1: d+ = log p - log p+, d- = log p - log p-.
    loss_k1, _ = contrastive_perception_loss(lp, pos, neg, sel, tau=0.1, estimator="k1")
    k1 = math.log(2)
    expected = (math.log1p(math.exp(-k1 / 0.1)) + math.log1p(math.exp(k1 / 0.1))) / 2
    assert loss_k1.item() == pytest.approx(expected, rel=1e-5)


def test_contrastive_full_estimator_by_hand():
    p = torch.tensor([[[0.5, 0.5]]]).log()
    q_pos = torch.tensor([[[0.5, 0.5]]]).log()
    q_neg = torch.tensor([[[0.25, 0.75]]]).log()
    kl_neg = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    loss, _ = contrastive_perception_loss(
        p, q_pos, q_neg, torch.ones(1, 1, dtype=torch.bool), estimator="full"
    )
    assert loss.item() == pytest.approx(math.log1p(math.exp(-kl_neg / 0.1)), rel=1e-5)


def test_contrastive_nothing_selected_is_zero_with_finite_grads():
    lp = torch.randn(2, 3, requires_grad=True)
    pos = torch.randn(2, 3, requires_grad=True)
    neg = (torch.randn(2, 3) - 50).requires_grad_(True)
    loss, _ = contrastive_perception_loss(lp, pos, neg, torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    for t in (lp, pos, neg):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() == 0


def test_cppo_gradients_reach_all_passes_and_not_the_selection():
    cfg = objective_preset("cppo", beta=0.0)
    g = torch.Generator().manual_seed(4)
    shape = (2, 6)
    logp = (-torch.rand(shape, generator=g)).requires_grad_(True)
    pos = (-torch.rand(shape, generator=g)).requires_grad_(True)
    neg = (-torch.rand(shape, generator=g) - 1).requires_grad_(True)
    H = torch.rand(shape, generator=g).requires_grad_(True)
    Hn = (H.detach() + torch.rand(shape, generator=g)).requires_grad_(True)
    x = ObjectiveInputs(
        logp=logp,
        advantages=torch.tensor([1.0, 0.5]),
        mask=torch.ones(shape),
        logp_pos=pos,
        logp_neg=neg,
        entropy=H,
        entropy_neg=Hn,
    )
    loss, m = compute_objective(cfg, x)
    loss.backward()
    assert m["loss/cpl"].item() > 0
    for t in (logp, pos, neg):
        assert t.grad is not None and t.grad.abs().sum() > 0
    assert H.grad is None and Hn.grad is None
    # 2 sequences x 6 tokens, all gain entropy -> 3 selected per row.
    assert m["perception/selected_frac"].item() == pytest.approx(6 / 12)


def test_cppo_rows_subset_equals_full_computation():
    """Scoring the CPPO views only for positive-advantage rows gives the same loss and grads."""
    cfg = objective_preset("cppo", beta=0.0)
    g = torch.Generator().manual_seed(5)
    B, T = 5, 7
    base = -torch.rand(B, T, generator=g)
    pos_all, neg_all = -torch.rand(B, T, generator=g), -torch.rand(B, T, generator=g) - 0.3
    H, Hn = torch.rand(B, T, generator=g), torch.rand(B, T, generator=g) + 0.5
    adv = torch.tensor([1.0, -1.0, 0.5, 0.0, 2.0])
    mask = (torch.rand(B, T, generator=g) > 0.2).float()
    rows = torch.nonzero(adv > 0).squeeze(-1)

    def run(subset):
        logp = base.clone().requires_grad_(True)
        pos = (pos_all[rows] if subset else pos_all).clone().requires_grad_(True)
        neg = (neg_all[rows] if subset else neg_all).clone().requires_grad_(True)
        x = ObjectiveInputs(
            logp=logp,
            advantages=adv,
            mask=mask,
            logp_pos=pos,
            logp_neg=neg,
            entropy=H,
            entropy_neg=Hn[rows] if subset else Hn,
            cppo_rows=rows if subset else None,
        )
        loss, _ = compute_objective(cfg, x)
        loss.backward()
        pos_grad = pos.grad if subset else pos.grad[rows]
        return loss, logp.grad, pos_grad

    full, sub = run(False), run(True)
    torch.testing.assert_close(sub[0], full[0])
    torch.testing.assert_close(sub[1], full[1])
    torch.testing.assert_close(sub[2], full[2])


def test_cppo_select_all_tokens_option():
    cfg = objective_preset("cppo", beta=0.0, cpl_select="all")
    lp = torch.full((2, 2), math.log(0.5))
    pos = torch.full((2, 2), math.log(0.5))
    neg = torch.full((2, 2), math.log(0.25))
    x = ObjectiveInputs(lp, torch.tensor([1.0, -1.0]), torch.ones(2, 2), logp_pos=pos, logp_neg=neg)
    _, m = compute_objective(cfg, x)
    assert m["perception/selected_frac"].item() == pytest.approx(0.5)
    assert m["loss/cpl"].item() == pytest.approx(
        0.01 * math.log1p(math.exp(-K3_HALF_QUARTER / 0.1)), rel=1e-5
    )
