"""Tiny end-to-end runs of the policy-loss variants and advantage estimators through the trainer."""

import pytest
import torch

from vispo.algos import advantage_estimate
from vispo.rewards import RewardRunner
from vispo.train.config import load_config
from vispo.train.trainer import Trainer


def parity_reward(completions, answers, **columns):
    return [float(len(c) % 2 == 0) for c in completions]


def _trainer(tmp_path, *overrides):
    cfg = load_config(
        None,
        [
            "model.name_or_path=tiny:qwen2_vl",
            "data.limit=24",
            "data.eval_size=0",
            "train.steps=2",
            "train.prompts_per_step=2",
            "rollout.n=3",
            "rollout.max_new_tokens=5",
            f"train.out_dir={tmp_path}",
            "logging.progress=false",
            "optim.lr=1e-3",
            "train.samples_every=0",
            "train.save_every=0",
            *overrides,
        ],
    )
    return Trainer(cfg, reward_fn=RewardRunner(parity_reward, num_workers=0))


@pytest.mark.parametrize("preset", ["gspo", "sapo", "cispo"])
def test_policy_loss_presets_train(tmp_path, preset):
    # Two PPO epochs: the second is off-policy, so the ratio and its clip/gate matter.
    trainer = _trainer(tmp_path, f"objective.name={preset}", "train.ppo_epochs=2")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    history = trainer.train()
    assert trainer.cfg.objective.policy_loss == preset
    for m in history:
        assert torch.isfinite(torch.tensor(m["loss/total"]))
        parts = [v for k, v in m.items() if k.startswith("loss/") and k != "loss/total"]
        assert sum(parts) == pytest.approx(m["loss/total"], abs=1e-5)
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


@pytest.mark.parametrize("estimator", ["rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_advantage_estimators_reach_the_update(tmp_path, estimator):
    trainer = _trainer(tmp_path, "objective.name=grpo", f"objective.advantage={estimator}")
    trainer.step()
    step = trainer._last_step
    gid = torch.arange(len(step.groups)).repeat_interleave(step.n)
    lengths = step.batch.response_mask.sum(-1)
    expect = advantage_estimate(estimator, step.rewards, gid, lengths=lengths)
    assert torch.equal(step.advantages, expect)
    if estimator == "rloo":  # leave-one-out advantages sum to zero within each group
        assert step.advantages.view(len(step.groups), -1).sum(-1).abs().max() < 1e-5
    else:  # batch-whitened: token-weighted mean zero
        assert (step.advantages * lengths).sum().abs() < 1e-4
