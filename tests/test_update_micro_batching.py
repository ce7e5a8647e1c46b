"""One update split into micro-batches: the same gradient for every preset in ``global`` mode,
and the reference code's formula in ``per-micro`` mode (CPPO written out by hand)."""

import math

import pytest
import torch
import torch.nn.functional as F

from vispo.algos import cppo_perception_mask
from vispo.models.scoring import score
from vispo.rewards import RewardRunner
from vispo.train.config import load_config
from vispo.train.trainer import Trainer

SEQUENCES = 6  # prompts_per_step x rollout.n
PRESETS = ["grpo", "dapo", "dr_grpo", "papo_g", "papo_d", "cppo"]


def parity_reward(completions, answers, **columns):
    return [float(len(c) % 2 == 0) for c in completions]


def _trainer(tmp_path, preset, *extra):
    cfg = load_config(
        None,
        [
            f"objective.name={preset}",
            "model.name_or_path=tiny:qwen2_vl",
            "data.limit=24",
            "data.eval_size=0",
            "train.steps=1",
            "train.prompts_per_step=2",
            "rollout.n=3",
            # Equal-length responses: every micro-batch holds the same number of tokens.
            "rollout.max_new_tokens=5",
            "rollout.min_new_tokens=5",
            f"train.out_dir={tmp_path / preset}",
            "logging.progress=false",
            "optim.lr=1e-3",
            "optim.grad_clip=0",
            "train.samples_every=0",
            "train.save_every=0",
            *extra,
        ],
    )
    return Trainer(cfg, reward_fn=RewardRunner(parity_reward, num_workers=0))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _updates_per_micro_size(trainer, sizes, norm="global"):
    """Run one step; its update is repeated from the same weights for every micro-batch size.
    Returns ({size: (metrics, grads)}, step, fixed)."""
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    real_update, out = trainer._update, {}

    def repeated(step, fixed):
        trainer.cfg.train.micro_batch_norm = norm
        for size in sizes:
            trainer.model.load_state_dict(weights)
            trainer.cfg.train.micro_batch_size = size
            metrics = real_update(step, fixed)
            out[size] = (metrics, _grads(trainer.model))
        out["step"], out["fixed"] = step, fixed
        trainer.model.load_state_dict(weights)
        return metrics

    trainer._update = repeated
    trainer.step()
    return out


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_gives_the_same_gradient_for_any_micro_batch_size(tmp_path, preset):
    """``train.micro_batch_norm: global``: micro-batches of 1, 2, 3 or all 6 sequences
    accumulate the same gradient (float32 rounding), CPPO's and PAPO's terms included."""
    trainer = _trainer(tmp_path, preset)
    runs = _updates_per_micro_size(trainer, [SEQUENCES, 1, 2, 3])
    step = runs["step"]
    assert step.batch.response_mask.sum(-1).eq(5).all(), "responses must have equal lengths"
    if preset == "cppo":
        positive = int((step.advantages > 0).sum())
        assert 0 < positive < SEQUENCES, "the test needs a batch with and without CPL rows"
    ref_metrics, ref = runs[SEQUENCES]
    assert ref and ref_metrics["skipped_steps"] == 0
    for size in (1, 2, 3):
        metrics, grads = runs[size]
        assert set(grads) == set(ref)
        for name, g in ref.items():
            torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-4, msg=f"{size} {name}")
        for key in [k for k in ref_metrics if k.startswith("loss/")]:
            assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-4, abs=1e-7), key


def test_cppo_term_alone_is_invariant_to_micro_batching(tmp_path):
    """The contrastive term weighted heavily (lambda 5 instead of 0.01), so that a wrong
    micro-batch weight on it shows up far beyond float rounding."""
    trainer = _trainer(tmp_path, "cppo", "objective.cpl_lambda=5.0")
    runs = _updates_per_micro_size(trainer, [SEQUENCES, 1, 3])
    assert int((runs["step"].advantages > 0).sum()) >= 2, "needs CPL rows in two micro-batches"
    ref = runs[SEQUENCES][1]
    for size in (1, 3):
        for name, g in ref.items():
            torch.testing.assert_close(runs[size][1][name], g, atol=1e-6, rtol=1e-4, msg=name)


def _k3(logp, logq):
    x = (logq - logp).clamp(-20, 20)
    return (x.exp() - x - 1).clamp(-10, 10)


def test_per_micro_cppo_update_is_the_reference_formula(tmp_path):
    """``per-micro`` (the CPPO recipe's actor): each micro-batch's loss is normalised within
    the micro-batch (policy and KL over its tokens, the contrastive term over its selected
    tokens) and scaled by 1 / (number of micro-batches). Written out by hand here."""
    lam, beta, tau = 2.0, 0.01, 0.1
    trainer = _trainer(tmp_path, "cppo", f"objective.cpl_lambda={lam}")
    runs = _updates_per_micro_size(trainer, [2], norm="per-micro")
    step, fixed = runs["step"], runs["fixed"]
    _, got = runs[2]
    model, cfg = trainer.model, trainer.cfg
    model.zero_grad(set_to_none=True)
    model.train()
    micro = list(torch.arange(SEQUENCES).split(2))
    kw = dict(temperature=cfg.rollout.temperature, grad=True, stack=cfg.train.stack_variants)
    n_selected = 0
    for idx in micro:
        sub, a = step.batch.select(idx), step.advantages[idx]
        m = sub.response_mask
        (orig,) = score(model, sub, [None], entropy=[True], **kw)
        logp = orig.logp
        ratio = torch.exp(logp - logp.detach())
        A = a[:, None]
        pg = torch.maximum(-A * ratio, -A * ratio.clamp(1 - 0.2, 1 + 0.2))
        pg = torch.where(A < 0, torch.minimum(pg, -A * 3.0), pg)
        policy = (pg * m).sum() / m.sum()
        ref_kl = (_k3(logp, fixed.ref_logp[idx]) * m).sum() / m.sum()
        loss = policy + beta * ref_kl
        rows = torch.nonzero(a > 0).squeeze(-1)
        if rows.numel():
            pos, neg = score(
                model,
                sub.select(rows),
                [step.variants["pos"], step.variants["neg"]],
                entropy=[False, True],
                **kw,
            )
            lp = logp[rows]
            sel = cppo_perception_mask(orig.entropy[rows], neg.entropy, a[rows], m[rows]).float()
            c = F.softplus((_k3(lp, pos.logp) - _k3(lp, neg.logp)) / tau)
            cpl = (c * sel).sum() / sel.sum() if sel.sum() > 0 else c.sum() * 0
            n_selected += int(sel.sum())
            loss = loss + lam * cpl
        (loss / len(micro)).backward()
    assert n_selected > 0
    want = _grads(model)
    assert set(want) == set(got)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, atol=1e-6, rtol=1e-4, msg=name)
    assert math.isfinite(sum(float(g.sum()) for g in want.values()))
