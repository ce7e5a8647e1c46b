"""Policy-loss variants (vispo.algos.policy_loss): by-hand values and agreement with verl.

The ``_verl_*`` references below are written for this test from verl's
``verl/trainer/ppo/core_algos.py`` (volcengine/verl commit b178a3cd56f5): ``agg_loss``,
``compute_policy_loss_gspo``, ``compute_policy_loss_sapo``, ``compute_policy_loss_cispo``,
evaluated in float64, loss values and gradients.
"""

import math

import pytest
import torch

from vispo.algos import (
    ObjectiveConfig,
    ObjectiveInputs,
    compute_objective,
    policy_loss,
    ppo_clip_loss,
)

# --- independent float64 references (verl's formulas) ----------------------------------------


def _verl_agg(loss_mat, mask, mode):
    if mode == "token-mean":
        return (loss_mat * mask).sum() / mask.sum()
    if mode == "seq-mean-token-mean":
        tokens = mask.sum(-1)
        seq = (loss_mat * mask).sum(-1) / (tokens + 1e-8)
        has = (tokens > 0).double()
        return (seq * has).sum() / has.sum()
    raise AssertionError(mode)


def _verl_gspo(old, logp, adv, mask, lo, hi, mode):
    neg_kl = logp - old
    seq_len = mask.sum(-1).clamp(min=1)
    seq = (neg_kl * mask).sum(-1) / seq_len
    log_ratio = (logp - logp.detach() + seq.detach()[:, None]).clamp(max=10.0)
    ratio = log_ratio.exp()
    l1 = -adv * ratio
    l2 = -adv * ratio.clamp(1 - lo, 1 + hi)
    return _verl_agg(torch.maximum(l1, l2), mask, mode)


def _verl_sapo(old, logp, adv, mask, tau_pos, tau_neg, mode):
    ratio = (logp - old).clamp(-20, 20).exp()
    tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
    gates = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    return _verl_agg(-gates * adv, mask, mode)


def _verl_cispo(old, logp, adv, mask, lo, hi, mode):
    ratio = (logp - old).clamp(-20, 20).exp()
    w = ratio.clamp(1 - lo, 1 + hi).detach()
    return _verl_agg(-w * adv * logp, mask, mode)


def _random_batch(seed, B=6, T=9, token_adv=False):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None] < lengths[:, None]).double()
    if token_adv:
        adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    else:
        adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).contiguous()
    return old, logp, adv, mask


def _value_and_grad(fn, logp):
    x = logp.clone().requires_grad_(True)
    value = fn(x)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach().double(), grad.double()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "token-mean"])
@pytest.mark.parametrize(
    "kind,verl_fn,params",
    [
        ("gspo_token", _verl_gspo, dict(clip_low=3e-4, clip_high=4e-4)),
        ("gspo_token", _verl_gspo, dict(clip_low=0.2, clip_high=0.3)),
        ("gspo", _verl_gspo, dict(clip_low=0.2, clip_high=0.3)),
        ("sapo", _verl_sapo, dict(tau_pos=1.0, tau_neg=1.05)),
        ("sapo", _verl_sapo, dict(tau_pos=2.0, tau_neg=0.5)),
        ("cispo", _verl_cispo, dict(clip_low=10.0, clip_high=0.2)),
        ("cispo", _verl_cispo, dict(clip_low=0.1, clip_high=0.1)),
    ],
)
def test_agrees_with_verl(seed, mode, kind, verl_fn, params):
    # GSPO's sequence-level form equals verl's token form when advantages are per sequence.
    old, logp, adv, mask = _random_batch(seed, token_adv=kind != "gspo")
    ref_args = list(params.values())
    ref_value, ref_grad = _value_and_grad(
        lambda x: verl_fn(old, x, adv, mask, *ref_args, mode), logp
    )
    value, grad = _value_and_grad(
        lambda x: policy_loss(kind, x, old, adv, mask, agg=mode, **params)[0], logp
    )
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_gspo_forms_differ_with_token_advantages():
    """With advantages varying along a sequence, GSPO (one ratio, gradient through the mean) and
    GSPO-token (each token's own log-prob) give different gradients but the same value."""
    old, logp, adv, mask = _random_batch(3, token_adv=True)
    v1, g1 = _value_and_grad(lambda x: policy_loss("gspo", x, old, adv, mask)[0], logp)
    v2, g2 = _value_and_grad(lambda x: policy_loss("gspo_token", x, old, adv, mask)[0], logp)
    assert v1.item() == pytest.approx(v2.item(), rel=1e-6)
    assert not torch.allclose(g1, g2, atol=1e-4)


def test_ppo_is_ppo_clip_loss():
    old, logp, adv, mask = _random_batch(4, token_adv=True)
    a, ma = policy_loss("ppo", logp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    b, mb = ppo_clip_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    assert a.item() == b.item() and ma.keys() == mb.keys()


def test_gspo_by_hand():
    # Sequence 0: log-ratios 0.2, 0.4 (2 tokens) -> s = e^0.3 = 1.3499 > 1 + 0.2, A = +1: clipped,
    # loss -1.2. Sequence 1: one token, log-ratio -0.1 -> s = e^-0.1 = 0.9048, A = -2: inside the
    # clip range, loss +2 * 0.9048 = 1.8097. seq-mean-token-mean: (-1.2 + 1.8097) / 2.
    old = torch.zeros(2, 2)
    logp = torch.tensor([[0.2, 0.4], [-0.1, 5.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    loss, m = policy_loss(
        "gspo", logp, old, adv, mask, clip_low=0.2, clip_high=0.2, agg="seq-mean-token-mean"
    )
    assert loss.item() == pytest.approx((-1.2 + 2 * math.exp(-0.1)) / 2, rel=1e-6)
    assert m["clip/high"].item() == pytest.approx(2 / 3)  # both tokens of sequence 0
    assert m["clip/low"].item() == 0.0
    # Gradient: sequence 0 is clipped (none); sequence 1: d/dlogp (2 * exp(logp)) / 2 = e^-0.1.
    x = logp.clone().requires_grad_(True)
    policy_loss("gspo", x, old, adv, mask, agg="seq-mean-token-mean")[0].backward()
    torch.testing.assert_close(x.grad, torch.tensor([[0.0, 0.0], [math.exp(-0.1), 0.0]]))


def test_cispo_by_hand():
    # ratio e^0.5 = 1.6487 clipped to 1.2 (stop-gradient), A = 2, logp = -1: loss 2.4 and the
    # gradient -1.2 * 2 = -2.4 (a clipped token keeps its gradient, unlike PPO).
    logp = torch.tensor([[-1.0]], requires_grad=True)
    old = torch.tensor([[-1.5]])
    loss, m = policy_loss("cispo", logp, old, torch.tensor([2.0]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(2.4, rel=1e-6)
    loss.backward()
    assert logp.grad.item() == pytest.approx(-2.4, rel=1e-6)
    assert m["clip/high"].item() == 1.0
    ppo = ppo_clip_loss(logp, old, torch.tensor([2.0]), torch.ones(1, 1))[0]
    assert torch.autograd.grad(ppo, logp)[0].item() == 0.0


def test_sapo_by_hand():
    # On-policy (r = 1): gate = sigmoid(0) * 4 / tau = 2 / tau, slope 1 -> gradient -A per token.
    logp = torch.tensor([[-0.7, -0.2]], requires_grad=True)
    adv = torch.tensor([[1.5, -1.0]])
    loss, _ = policy_loss(
        "sapo", logp, logp.detach(), adv, torch.ones(1, 2), tau_pos=1.0, tau_neg=2.0
    )
    assert loss.item() == pytest.approx((-1.5 * 2 / 1.0 + 1.0 * 2 / 2.0) / 2, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.5, 1.0]]) / 2)
    # Off-policy: r = e^1, tau 1: gradient -A * 4 * s(1 - s) * r with s = sigmoid(e - 1).
    x = torch.tensor([[1.0]], requires_grad=True)
    policy_loss("sapo", x, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1))[0].backward()
    s = 1 / (1 + math.exp(-(math.e - 1)))
    assert x.grad.item() == pytest.approx(-4 * s * (1 - s) * math.e, rel=1e-5)


def test_unknown_kind_and_bad_tau():
    z = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="policy loss"):
        policy_loss("grpo", z, z, z[:, 0], z)
    with pytest.raises(ValueError, match="tau"):
        policy_loss("sapo", z, z, z[:, 0], torch.ones(1, 1), tau_pos=0.0)


@pytest.mark.parametrize("kind", ["gspo", "gspo_token", "cispo", "sapo"])
def test_objective_dispatches_policy_loss(kind):
    """compute_objective's policy term is policy_loss(cfg.policy_loss, ...) with the config's
    clip, temperatures and aggregation (beta 0: the total is the policy term)."""
    old, logp, adv, mask = _random_batch(5, token_adv=True)
    cfg = ObjectiveConfig(
        policy_loss=kind, beta=0.0, clip_low=0.1, clip_high=0.15, tau_pos=1.3, tau_neg=0.7
    )
    x = ObjectiveInputs(
        logp=logp.float(), advantages=adv.float(), mask=mask.float(), old_logp=old.float()
    )
    loss, metrics = compute_objective(cfg, x)
    ref, _ = policy_loss(
        kind,
        logp.float(),
        old.float(),
        adv.float(),
        mask.float(),
        clip_low=0.1,
        clip_high=0.15,
        tau_pos=1.3,
        tau_neg=0.7,
    )
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert metrics["loss/policy"].item() == pytest.approx(ref.item(), rel=1e-6)


def test_config_rejects_unknown_policy_loss_and_advantage():
    with pytest.raises(ValueError, match="objective.policy_loss"):
        ObjectiveConfig(policy_loss="ppo2")
    with pytest.raises(ValueError, match="objective.advantage"):
        ObjectiveConfig(advantage="gae")
    with pytest.raises(ValueError, match="objective.tau_neg"):
        ObjectiveConfig(tau_neg=0.0)
