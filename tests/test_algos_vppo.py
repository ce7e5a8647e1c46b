"""VPPO: visual dependency, advantage reweighting and token selection, by hand and against a
float64 reference written for this test from the official code (huaixuheqing/VPPO-RL
``verl/workers/actor/dp_actor.py`` ``update_policy``, commit a23c54b83565); the objective and a
tiny end-to-end run."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from vispo.algos import (
    ObjectiveConfig,
    ObjectiveInputs,
    compute_objective,
    full_kl,
    full_kl_from_logits,
    objective_preset,
    policy_loss,
    requirements,
    shaped_advantages,
    visual_dependency,
    vppo_advantage_weights,
    vppo_token_mask,
)
from vispo.models.scoring import build_scoring_batch, encode_prompts, pixel_inputs, score
from vispo.rewards import RewardRunner
from vispo.train.config import load_config
from vispo.train.trainer import Trainer


def _official_low_var_kl(old, aug):
    d = (aug - old).clamp(-20.0, 20.0)
    return (d.exp() - d - 1).clamp(0.0, 10.0)


def _official_top_mask(kl, mask, top_p):
    s = kl.clone()
    s[~mask.bool()] = -torch.inf
    k = torch.ceil(mask.sum(1) * top_p).int()
    _, idx = torch.sort(s, dim=1, descending=True, stable=True)
    rank_mask = torch.arange(s.size(1)).expand_as(s) < k[:, None]
    top = torch.zeros_like(s, dtype=torch.bool)
    top.scatter_(1, idx, rank_mask)
    return top & mask.bool()


def _official_scaling(kl, mask, tmin):
    n = mask.sum(1)
    score = (kl * mask).sum(1) / n.clamp(min=1)
    valid = n > 0
    lo, hi = torch.quantile(score[valid], 0.0), torch.quantile(score[valid], 1.0)
    out = torch.ones_like(score)
    if hi - lo > 1e-6:
        u = ((score[valid] - lo) / (hi - lo)).clamp(0, 1)
        tmax = tmin + (1 - tmin) / (u.mean() + 1e-8)
        out[valid] = tmin + u * (tmax - tmin)
    return out


def _batch(seed, B=7, T=11):
    g = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    aug = old + torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).double()
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return old, aug, mask, adv


def test_dependency_by_hand():
    orig = torch.tensor([[-1.0, -1.0, -1.0, -1.0]])
    masked = torch.tensor([[-2.0, 0.0, 4.0, -1.0]])
    # x = -1: e^-1 + 1 - 1 = 0.3679; x = 1: e - 2 = 0.7183; x = 5: e^5 - 6 = 142.4 -> 10; x = 0: 0.
    expect = torch.tensor([[math.exp(-1), math.e - 2, 10.0, 0.0]])
    torch.testing.assert_close(visual_dependency(orig, masked), expect)


def test_token_mask_by_hand():
    dep = torch.tensor([[0.1, 0.5, 0.3, 0.5, 0.0], [0.9, 0.1, 0.2, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    sel = vppo_token_mask(dep, mask, top_frac=0.4)
    # Row 0: k = ceil(2.0) = 2 -> the two 0.5s. Row 1: 3 tokens, k = ceil(1.2) = 2 -> 0.9 and 0.2
    # (the padded 7.0s never count).
    assert sel.tolist() == [[False, True, False, True, False], [True, False, True, False, False]]


def test_weights_by_hand():
    # Mean dependencies 0, 1, 0.5 -> u = 0, 1, 0.5; mean u 0.5; b = 0.9 + 0.1 / 0.5 = 1.1;
    # w = 0.9, 1.1, 1.0 (mean 1). An empty sequence keeps 1.
    dep = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.2, 0.8], [5.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    w = vppo_advantage_weights(dep, mask, scale_min=0.9)
    torch.testing.assert_close(w, torch.tensor([0.9, 1.1, 1.0, 1.0]))
    same = vppo_advantage_weights(torch.ones(3, 2), torch.ones(3, 2))
    assert torch.equal(same, torch.ones(3))  # no spread: no reweighting


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_agrees_with_official_formulas(seed):
    old, aug, mask, _ = _batch(seed)
    kl = _official_low_var_kl(old, aug)
    dep = visual_dependency(old, aug)
    torch.testing.assert_close(dep.double(), kl, rtol=1e-5, atol=1e-6)
    assert torch.equal(vppo_token_mask(kl, mask, top_frac=0.4), _official_top_mask(kl, mask, 0.4))
    torch.testing.assert_close(
        vppo_advantage_weights(kl, mask, scale_min=0.9).double(),
        _official_scaling(kl, mask, 0.9),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_objective_restricts_the_policy_gradient_to_selected_tokens(seed):
    old, aug, mask, adv = _batch(seed)
    logp = (old + 0.1 * torch.randn(old.shape, dtype=torch.float64)).float()
    old, aug, mask, adv = old.float(), aug.float(), mask.float(), adv.float()
    cfg = objective_preset("vppo", beta=0.0, eta_orig=0.0)
    x = ObjectiveInputs(
        logp=logp.requires_grad_(True), advantages=adv, mask=mask, old_logp=old, logp_mask=aug
    )
    loss, metrics = compute_objective(cfg, x)
    # Official: PPO loss * top-40% mask, averaged over all response tokens.
    sel = _official_top_mask(_official_low_var_kl(old.double(), aug.double()), mask, 0.4)
    per_token_adv = adv[:, None] * sel
    ref, _ = policy_loss("ppo", logp, old, per_token_adv, mask, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.all(grad[~sel] == 0) and torch.any(grad[sel] != 0)
    frac = sel.sum() / mask.sum()
    assert metrics["perception/vppo_selected_frac"].item() == pytest.approx(frac.item())


def test_shaped_advantages_scale_only_the_mini_batch_rows():
    old, aug, mask, adv = (t.float() for t in _batch(5))
    cfg = objective_preset("vppo")
    rows = torch.tensor([0, 2, 3, 6])
    out = shaped_advantages(cfg, adv, rows, old, aug, mask)
    w = _official_scaling(
        _official_low_var_kl(old[rows].double(), aug[rows].double()), mask[rows].double(), 0.9
    )
    torch.testing.assert_close(out[rows].double(), adv[rows].double() * w, rtol=1e-5, atol=1e-6)
    others = torch.tensor([1, 4, 5])
    assert torch.equal(out[others], adv[others])
    no_vppo = objective_preset("grpo")
    assert shaped_advantages(no_vppo, adv, rows, None, None, mask) is adv


def test_requirements_and_validation():
    r = requirements(objective_preset("vppo"))
    assert r.variants == {"mask": "fixed"} and r.old_logp and r.ref
    r = requirements(objective_preset("papo_g", vppo_top_frac=0.4))
    assert r.variants == {"mask": "fixed"} and not r.old_logp  # one masked pass, shared
    with pytest.raises(ValueError, match="masked_grad"):
        objective_preset("papo_g", vppo_top_frac=0.4, masked_grad=True)
    with pytest.raises(ValueError, match="vppo_top_frac"):
        ObjectiveConfig(vppo_top_frac=0.0)
    with pytest.raises(ValueError, match="vppo_scale_min"):
        ObjectiveConfig(vppo_scale_min=1.5)


def parity_reward(completions, answers, **columns):
    return [float(len(c) % 2 == 0) for c in completions]


@pytest.mark.parametrize(
    "preset,extra",
    [
        ("vppo", []),
        ("vppo", ["objective.vppo_estimator=full"]),
        ("papo_g", ["objective.vppo_top_frac=0.4", "objective.vppo_scale_min=0.9"]),
    ],
)
def test_vppo_trains_alone_and_with_papo(tmp_path, preset, extra):
    cfg = load_config(
        None,
        [
            f"objective.name={preset}",
            "model.name_or_path=tiny:qwen2_vl",
            "data.limit=24",
            "data.eval_size=0",
            "train.steps=2",
            "train.prompts_per_step=2",
            "rollout.n=3",
            "rollout.max_new_tokens=6",
            "rollout.min_new_tokens=3",
            f"train.out_dir={tmp_path}",
            "logging.progress=false",
            "optim.lr=1e-3",
            "train.samples_every=0",
            "train.save_every=0",
            *extra,
        ],
    )
    trainer = Trainer(cfg, reward_fn=RewardRunner(parity_reward, num_workers=0))
    history = trainer.train()
    for m in history:
        assert 0.4 <= m["perception/vppo_selected_frac"] <= 1.0  # ceil(0.4 n) of n >= 3 tokens
        assert m["perception/dependency_mean"] >= 0.0
        parts = [v for k, v in m.items() if k.startswith("loss/") and k != "loss/total"]
        assert sum(parts) == pytest.approx(m["loss/total"], abs=1e-5)
    if preset == "papo_g":
        assert "loss/perception_kl" in history[0]


def test_full_kl_from_logits_by_hand_and_chunked():
    # p = softmax([0, ln 3]) = (1/4, 3/4), q = uniform: KL = 1/4 ln(1/2) + 3/4 ln(3/2).
    p = torch.tensor([[0.0, math.log(3.0)]])
    q = torch.zeros(1, 2)
    expect = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert full_kl_from_logits(p, q).item() == pytest.approx(expect, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 17, generator=g), torch.randn(3, 5, 17, generator=g)
    ref = full_kl(torch.log_softmax(a / 0.7, -1), torch.log_softmax(b / 0.7, -1))
    for chunk in (1, 4, None):
        got = full_kl_from_logits(a, b, temperature=0.7, chunk_size=chunk)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_scoring_returns_the_full_kl_of_the_masked_pass(tiny_vlm, sample_images, make_conversation):
    model, processor = tiny_vlm("qwen2_vl")
    messages = [make_conversation(1, "What shape?"), make_conversation(1, "Color?")]
    images = [[sample_images[0]], [sample_images[1]]]
    prompts = encode_prompts(processor, messages, images)
    g = torch.Generator().manual_seed(0)
    responses = torch.randint(20, len(processor.tokenizer), (4, 5), generator=g)
    batch = build_scoring_batch(prompts, responses, repeats=2)
    masked_images = [[Image.fromarray(np.zeros_like(np.asarray(im[0])))] for im in images]
    masked = pixel_inputs(processor, masked_images, reference=prompts)
    orig, mask = score(model, batch, [None, masked], kl_to_first=[False, True], temperature=0.9)
    assert orig.kl is None
    with torch.no_grad():
        lo = model(**batch.model_inputs()).logits.float() / 0.9
        lm = model(**batch.model_inputs(masked)).logits.float() / 0.9
    Lp = batch.prompt_length
    ref = full_kl(
        torch.log_softmax(lo[:, Lp - 1 : -1], -1), torch.log_softmax(lm[:, Lp - 1 : -1], -1)
    )
    m = batch.response_mask
    torch.testing.assert_close(mask.kl, ref * m, rtol=1e-4, atol=1e-5)
    assert float(mask.kl.max()) > 1e-4  # the model sees the mask


def test_full_estimator_uses_the_scored_kl(tmp_path):
    old, aug, mask, adv = (t.float() for t in _batch(6))
    dep = torch.rand(old.shape) * mask
    cfg = objective_preset("vppo", vppo_estimator="full", beta=0.0)
    r = requirements(cfg)
    assert r.kl == {"mask"} and r.variants == {"mask": "fixed"}
    x = ObjectiveInputs(
        logp=old.clone(), advantages=adv, mask=mask, old_logp=old, logp_mask=aug, dependency=dep
    )
    _, metrics = compute_objective(cfg, x)
    expect = (dep * mask).sum() / mask.sum()
    assert metrics["perception/dependency_mean"].item() == pytest.approx(expect.item(), rel=1e-5)
    rows = torch.arange(len(adv))
    out = shaped_advantages(cfg, adv, rows, None, None, mask, dependency=dep)
    torch.testing.assert_close(out, adv * vppo_advantage_weights(dep, mask, scale_min=0.9))


def test_on_policy_single_micro_batch_reweights_inside_the_objective():
    """Without an old pass (exactly on-policy, one micro-batch) the objective reweights its own
    batch: the same loss and gradient as the old pass + shaped_advantages route."""
    old, aug, mask, adv = (t.float() for t in _batch(7))
    cfg = objective_preset("vppo", beta=0.0)
    a = old.clone().requires_grad_(True)
    loss_a, m_a = compute_objective(
        cfg, ObjectiveInputs(logp=a, advantages=adv, mask=mask, logp_mask=aug)
    )
    rows = torch.arange(len(adv))
    shaped = shaped_advantages(cfg, adv, rows, old, aug, mask)
    assert not torch.equal(shaped, adv)
    b = old.clone().requires_grad_(True)
    loss_b, _ = compute_objective(
        cfg, ObjectiveInputs(logp=b, advantages=shaped, mask=mask, old_logp=old, logp_mask=aug)
    )
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-6)
    (ga,) = torch.autograd.grad(loss_a, a)
    (gb,) = torch.autograd.grad(loss_b, b)
    torch.testing.assert_close(ga, gb)
    # ... and shaped_advantages leaves it alone then (no double reweighting).
    assert shaped_advantages(cfg, adv, rows, None, aug, mask) is adv


@pytest.mark.parametrize("micro,expect", [(None, [1]), ("2", [2])])
def test_vppo_needs_no_pass_beyond_papo_in_one_micro_batch(
    tmp_path, monkeypatch, micro, expect, one_step_config
):
    """The no-grad scoring call runs only the masked pass (as PAPO-G) when the update is one
    micro-batch; with several micro-batches it adds the old-policy pass (stacked with it)."""
    import vispo.train.update as U

    calls = []
    real = U.score

    def counting(model, batch, passes, **kw):
        if not kw.get("grad", False):
            calls.append(len(passes))
        return real(model, batch, passes, **kw)

    monkeypatch.setattr(U, "score", counting)
    extra = [] if micro is None else [f"train.micro_batch_size={micro}"]
    cfg = one_step_config(tmp_path, "vppo", "objective.beta=0", "data.limit=8", *extra)
    Trainer(cfg, reward_fn=RewardRunner(parity_reward, num_workers=0)).train()
    assert calls == expect
