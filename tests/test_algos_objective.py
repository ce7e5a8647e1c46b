"""The objective layer: presets, requirements, composition, invariances, registry, properties."""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vispo.algos import (
    OBJECTIVE_TERMS,
    PRESETS,
    ObjectiveConfig,
    ObjectiveInputs,
    aggregate,
    aggregate_total,
    compute_objective,
    contrastive_perception_loss,
    cppo_perception_mask,
    cppo_selection,
    group_advantages,
    kl_estimate,
    objective_preset,
    ppo_clip_loss,
    register_term,
    requirements,
)


def test_presets_match_algorithms_table():
    expect = {
        "grpo": dict(adv_scale="group", clip_low=0.2, clip_high=0.3, beta=0.01, gamma=0.0),
        "dapo": dict(clip_high=0.28, beta=0.0, dynamic_sampling=True, gamma=0.0),
        "papo_g": dict(clip_high=0.3, beta=0.01, gamma=0.02, eta_orig=0.0, eta_mask=0.0),
        "papo_d": dict(
            clip_high=0.28,
            beta=0.0,
            gamma=0.01,
            eta_orig=0.03,
            eta_mask=0.03,
            dynamic_sampling=True,
        ),
        "cppo": dict(
            clip_high=0.2, beta=0.01, cpl_lambda=0.01, cpl_tau=0.1, cpl_top_frac=0.5, cpl_gate=True
        ),
        "dr_grpo": dict(adv_scale="none", clip_high=0.2, beta=0.0, agg="seq-mean-token-sum-norm"),
        "gspo": dict(policy_loss="gspo", clip_low=3e-4, clip_high=4e-4, beta=0.0),
        "sapo": dict(policy_loss="sapo", tau_pos=1.0, tau_neg=1.05, beta=0.0),
        "cispo": dict(policy_loss="cispo", clip_low=10.0, clip_high=0.2, beta=0.001),
        "noisyrollout": dict(beta=0.01, clip_high=0.3, noisy_frac=0.5, noisy_t0=500),
        "vppo": dict(
            vppo_top_frac=0.4, vppo_scale_min=0.9, mask_ratio=0.5, eta_orig=0.06, beta=0.01
        ),
    }
    assert set(expect) == set(PRESETS)
    for name, fields in expect.items():
        cfg = objective_preset(name)
        for k, v in fields.items():
            assert getattr(cfg, k) == v, (name, k)


def test_requirements_per_preset():
    r = requirements(objective_preset("grpo"))
    assert r.variants == {} and r.ref and not r.entropy
    assert not requirements(objective_preset("dapo")).ref
    assert requirements(objective_preset("papo_g")).variants == {"mask": "fixed"}
    assert requirements(objective_preset("papo_g", masked_grad=True)).variants == {"mask": "grad"}
    r = requirements(objective_preset("papo_d", entropy_estimator="full", masked_grad=True))
    assert r.entropy == {"orig", "mask"}
    r = requirements(objective_preset("cppo"))
    assert r.variants == {"pos": "grad", "neg": "grad"} and r.entropy == {"orig", "neg"}
    assert r.cppo_positive_only
    assert not requirements(objective_preset("cppo", cpl_gate=False)).cppo_positive_only
    assert requirements(objective_preset("cppo", cpl_select="all")).entropy == frozenset()


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("mask_ratio", 0.0, "mask_ratio"),
        ("mask_ratio", 1.5, "mask_ratio"),
        ("gamma", -0.1, "gamma"),
        ("eta_orig", -1.0, "eta_orig"),
        ("agg", "mean", "agg"),
        ("cpl_estimator", "k2", "cpl_estimator"),
        ("dual_clip", 0.9, "dual_clip"),
        ("cpl_top_frac", 0.0, "cpl_top_frac"),
        ("extra_terms", {"entropyy": {}}, "extra_terms"),
    ],
)
def test_invalid_config_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        ObjectiveConfig(**{field: value})


def test_unknown_preset_suggests_closest():
    with pytest.raises(ValueError, match="did you mean 'papo_g'"):
        objective_preset("papo-g")


def test_masked_entropy_without_grad_warns_once():
    from vispo.algos import objective as objective_module

    objective_module._WARNED.clear()
    with pytest.warns(UserWarning, match="masked_grad"):
        objective_preset("papo_d")  # the reference default: constant H_mask term
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        objective_preset("papo_d")  # once per process
        ObjectiveConfig(gamma=0.01, eta_mask=0.03, masked_grad=True)


def _batch(B=6, T=5, seed=0, V=None):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) > 0.25).float()
    mask[:, 0] = 1
    return dict(
        logp=-torch.rand(B, T, generator=g) * 2,
        old_logp=-torch.rand(B, T, generator=g) * 2,
        ref_logp=-torch.rand(B, T, generator=g) * 2,
        logp_mask=-torch.rand(B, T, generator=g) * 3,
        logp_pos=-torch.rand(B, T, generator=g) * 2,
        logp_neg=-torch.rand(B, T, generator=g) * 3,
        entropy=torch.rand(B, T, generator=g),
        entropy_neg=torch.rand(B, T, generator=g) + 0.5,
        advantages=torch.randn(B, generator=g),
        mask=mask,
    )


def test_composition_equals_sum_of_terms():
    cfg = ObjectiveConfig(
        beta=0.05,
        gamma=0.02,
        eta_orig=0.03,
        eta_mask=0.04,
        masked_grad=True,
        cpl_lambda=0.1,
        clip_low=0.2,
        clip_high=0.28,
    )
    b = _batch()
    loss, m = compute_objective(cfg, ObjectiveInputs(**b))
    mask = b["mask"]
    pol, _ = ppo_clip_loss(
        b["logp"], b["old_logp"], b["advantages"], mask, clip_low=0.2, clip_high=0.28
    )
    ref = 0.05 * aggregate(kl_estimate(b["logp"], b["ref_logp"], "k3"), mask)
    prcp = -0.02 * aggregate(kl_estimate(b["logp"], b["logp_mask"], "k3"), mask)
    ent = 0.03 * aggregate(-b["logp"], mask) + 0.04 * aggregate(-b["logp_mask"], mask)
    sel = cppo_perception_mask(b["entropy"], b["entropy_neg"], b["advantages"], mask)
    cpl = 0.1 * contrastive_perception_loss(b["logp"], b["logp_pos"], b["logp_neg"], sel)[0]
    expected = pol + ref + prcp + ent + cpl
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    parts = ["policy", "ref_kl", "perception_kl", "entropy_orig", "entropy_mask", "cpl"]
    assert sum(m[f"loss/{p}"].item() for p in parts) == pytest.approx(loss.item(), rel=1e-6)
    assert m["loss/total"].item() == pytest.approx(loss.item())
    for key in (
        "clip/low",
        "clip/high",
        "clip/dual",
        "approx_kl",
        "perception/kl_mean",
        "perception/selected_frac",
        "entropy/orig",
        "entropy/mask",
        "entropy/pos",
        "entropy/neg",
    ):
        assert key in m and torch.is_tensor(m[key])


def test_on_policy_default_old_logp_is_current_detached():
    b = _batch()
    cfg = objective_preset("dapo")
    loss, m = compute_objective(cfg, ObjectiveInputs(b["logp"], b["advantages"], b["mask"]))
    # ratio == 1 everywhere: loss = -mean(A) over tokens, nothing clipped.
    expected = aggregate(-b["advantages"][:, None].expand_as(b["mask"]), b["mask"])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert m["clip/high"].item() == 0.0 and m["approx_kl"].item() == 0.0


def test_missing_inputs_raise_clear_errors():
    b = _batch()
    with pytest.raises(ValueError, match="ref_logp"):
        compute_objective(
            objective_preset("grpo"), ObjectiveInputs(b["logp"], b["advantages"], b["mask"])
        )
    with pytest.raises(ValueError, match="logp_mask"):
        compute_objective(
            objective_preset("papo_d"), ObjectiveInputs(b["logp"], b["advantages"], b["mask"])
        )
    with pytest.raises(ValueError, match="logp_pos"):
        compute_objective(
            objective_preset("cppo", beta=0.0),
            ObjectiveInputs(b["logp"], b["advantages"], b["mask"]),
        )


ALL_ON = dict(beta=0.05, gamma=0.02, eta_orig=0.03, eta_mask=0.04, masked_grad=True)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_appending_padding_changes_no_loss(agg):
    cfg = ObjectiveConfig(agg=agg, **ALL_ON, cpl_lambda=0.1)
    b = _batch(seed=1)
    loss, _ = compute_objective(cfg, ObjectiveInputs(**b))
    padded = {}
    for k, v in b.items():
        if v.ndim == 2:
            fill = torch.zeros(v.shape[0], 3) if k == "mask" else torch.full((v.shape[0], 3), -7.0)
            padded[k] = torch.cat([v, fill], dim=1)
        else:
            padded[k] = v
    loss_p, _ = compute_objective(cfg, ObjectiveInputs(**padded))
    assert loss_p.item() == pytest.approx(loss.item(), rel=1e-6)


def test_padding_with_fixed_horizon_for_dr_grpo():
    cfg = objective_preset("dr_grpo", horizon=16)
    b = _batch(seed=2)
    args = (b["logp"], b["advantages"], b["mask"], b["old_logp"])
    loss, _ = compute_objective(cfg, ObjectiveInputs(*args))
    pad = [torch.cat([t, torch.zeros(t.shape[0], 4)], 1) if t.ndim == 2 else t for t in args]
    loss_p, _ = compute_objective(cfg, ObjectiveInputs(*pad))
    assert loss_p.item() == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize(
    "agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
)
@pytest.mark.parametrize("splits", [[6], [3, 3], [1, 2, 3], [1, 1, 1, 1, 1, 1]])
def test_global_token_mean_invariant_to_micro_batching(agg, splits):
    """Every term, CPPO's and PAPO's top-p included: with the mini-batch-wide denominators the
    micro-batch losses sum to the whole batch's loss, however it is split."""
    cfg = ObjectiveConfig(
        agg=agg, horizon=5, **ALL_ON, cpl_lambda=0.5, perception_top_frac=0.5, perception_kl_clip=1
    )
    b = _batch(seed=3)
    total = aggregate_total(b["mask"], agg, horizon=5)
    token_total = aggregate_total(b["mask"], "token-mean")
    sel = cppo_selection(cfg, b["entropy"], b["entropy_neg"], b["advantages"], b["mask"])
    assert 0 < int(sel.sum()) < int(b["mask"].sum())
    cpl_total = aggregate_total(sel, "token-mean")

    def loss_and_grad(parts):
        logp = b["logp"].clone().requires_grad_(True)
        acc, start = 0.0, 0
        for n in parts:
            sl = slice(start, start + n)
            x = ObjectiveInputs(**{k: (logp if k == "logp" else v)[sl] for k, v in b.items()})
            acc = (
                acc
                + compute_objective(
                    cfg, x, total=total, token_total=token_total, cpl_total=cpl_total
                )[0]
            )
            start += n
        acc.backward()
        return acc.item(), logp.grad

    ref_loss, ref_grad = loss_and_grad([6])
    # The whole batch with its own denominators is the same loss.
    assert compute_objective(cfg, ObjectiveInputs(**b))[0].item() == pytest.approx(
        ref_loss, rel=1e-6
    )
    loss, grad = loss_and_grad(splits)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    torch.testing.assert_close(grad, ref_grad)


def test_permuting_sequences_with_groups_changes_nothing():
    g = torch.Generator().manual_seed(7)
    B, T = 8, 4
    rewards = torch.randint(0, 2, (B,), generator=g).float()
    groups = torch.arange(B) // 4
    b = _batch(B=B, T=T, seed=7)
    cfg = ObjectiveConfig(**ALL_ON, cpl_lambda=0.1)

    def run(perm):
        adv = group_advantages(rewards[perm], groups[perm])
        x = ObjectiveInputs(**{**{k: v[perm] for k, v in b.items()}, "advantages": adv})
        return compute_objective(cfg, x)[0].item(), adv

    ident = torch.arange(B)
    perm = torch.randperm(B, generator=g)
    loss, adv = run(ident)
    loss_p, adv_p = run(perm)
    assert loss_p == pytest.approx(loss, rel=1e-6)
    torch.testing.assert_close(adv_p, adv[perm])


def test_registered_extra_term_is_added_with_weight():
    @register_term("test_mean_sq_logp")
    def mean_sq(x, scale=1.0):
        return scale * aggregate(x.logp**2, x.mask), {
            "extra/value": aggregate(x.logp**2, x.mask).detach()
        }

    try:
        b = _batch()
        base = ObjectiveConfig(beta=0.0)
        cfg = ObjectiveConfig(
            beta=0.0, extra_terms={"test_mean_sq_logp": {"weight": 0.5, "scale": 2.0}}
        )
        x = ObjectiveInputs(b["logp"], b["advantages"], b["mask"], b["old_logp"])
        l0, _ = compute_objective(base, x)
        l1, m = compute_objective(cfg, x)
        value = aggregate(b["logp"] ** 2, b["mask"]).item()
        assert l1.item() == pytest.approx(l0.item() + 0.5 * 2.0 * value, rel=1e-6)
        assert m["loss/test_mean_sq_logp"].item() == pytest.approx(value, rel=1e-6)
        with pytest.raises(ValueError, match="already registered"):
            register_term("test_mean_sq_logp")(lambda x: None)
    finally:
        OBJECTIVE_TERMS.pop("test_mean_sq_logp")


# --- property-based ------------------------------------------------------------------------


@st.composite
def _values_and_mask(draw):
    B = draw(st.integers(1, 5))
    T = draw(st.integers(1, 6))
    vals = draw(
        st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=B * T, max_size=B * T)
    )
    bits = draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T))
    return torch.tensor(vals).reshape(B, T), torch.tensor(bits).reshape(B, T).float()


@settings(max_examples=60, deadline=None)
@given(_values_and_mask())
def test_aggregate_properties(vm):
    v, m = vm
    rows = [(v[i][m[i] > 0].double().tolist()) for i in range(v.shape[0])]
    flat = [x for r in rows for x in r]
    tm = sum(flat) / (len(flat) + 1e-8)
    assert aggregate(v, m, "token-mean").item() == pytest.approx(tm, rel=1e-4, abs=1e-4)
    nonempty = [r for r in rows if r]
    smtm = sum(sum(r) / len(r) for r in nonempty) / max(len(nonempty), 1)
    assert aggregate(v, m, "seq-mean-token-mean").item() == pytest.approx(smtm, rel=1e-4, abs=1e-4)
    assert aggregate(v, m, "seq-mean-token-sum").item() == pytest.approx(
        sum(flat) / v.shape[0], rel=1e-4, abs=1e-4
    )
    # Micro-batch split at every row boundary sums to the same value with the global total.
    for mode in (
        "token-mean",
        "seq-mean-token-mean",
        "seq-mean-token-sum",
        "seq-mean-token-sum-norm",
    ):
        total = aggregate_total(m, mode)
        split = sum(
            aggregate(v[i : i + 1], m[i : i + 1], mode, total=total) for i in range(v.shape[0])
        )
        assert split.item() == pytest.approx(aggregate(v, m, mode).item(), rel=1e-4, abs=1e-4)


@st.composite
def _rewards_and_groups(draw):
    n_groups = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.integers(1, 5), min_size=n_groups, max_size=n_groups))
    rewards, groups = [], []
    for gid, size in enumerate(sizes):
        rewards += draw(
            st.lists(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]), min_size=size, max_size=size)
        )
        groups += [gid * 3 + 1] * size
    perm = draw(st.permutations(range(len(rewards))))
    return torch.tensor(rewards)[list(perm)], torch.tensor(groups)[list(perm)]


@settings(max_examples=80, deadline=None)
@given(_rewards_and_groups(), st.floats(-5, 5))
def test_advantage_properties(rg, shift):
    r, g = rg
    adv = group_advantages(r, g, eps=0.0)
    none = group_advantages(r, g, scale="none")
    for gid in g.unique():
        idx = g == gid
        rr = r[idx].double()
        if idx.sum() < 2 or rr.max() == rr.min():
            assert torch.all(adv[idx] == 0) and torch.all(none[idx] == 0)
            continue
        # Zero mean and unit (unbiased) std within each group; "none" is r - mean.
        assert adv[idx].double().mean().item() == pytest.approx(0.0, abs=1e-5)
        assert adv[idx].double().std().item() == pytest.approx(1.0, abs=1e-4)
        torch.testing.assert_close(none[idx].double(), rr - rr.mean(), atol=1e-6, rtol=0)
    # Shifting every reward by a constant changes no advantage.
    torch.testing.assert_close(group_advantages(r + shift, g, eps=0.0), adv, atol=2e-4, rtol=0)
    assert torch.isfinite(adv).all()


def test_k3_is_nonnegative_and_zero_iff_equal():
    x = torch.linspace(-30, 30, 121)
    assert (kl_estimate(torch.zeros_like(x), x, "k3") >= 0).all()
    assert kl_estimate(torch.zeros(1), torch.zeros(1), "k3").item() == 0.0
    assert kl_estimate(torch.zeros(1), torch.full((1,), math.log(2)), "k3").item() > 0
