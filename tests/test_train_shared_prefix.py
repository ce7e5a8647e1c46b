"""``train.shared_prefix``: a training step with each prompt computed once per group equals the
step that repeats it for every response (every preset, same rollouts, same metrics)."""

from __future__ import annotations

import pytest
import torch

from vispo.rewards import RewardRunner
from vispo.train.config import ConfigError, load_config
from vispo.train.trainer import Trainer

PRESETS = ["grpo", "dapo", "dr_grpo", "papo_g", "papo_d", "cppo"]
TIMING = ("time/", "throughput/")


def parity_reward(completions, answers, **columns):
    return [float(len(c) % 2 == 0) for c in completions]


def _trainer(tmp_path, preset, shared, *extra):
    cfg = load_config(
        None,
        [
            f"objective.name={preset}",
            "model.name_or_path=tiny:qwen2_5_vl",
            "data.limit=24",
            "data.eval_size=0",
            "train.steps=1",
            "train.prompts_per_step=2",
            "rollout.n=3",
            "rollout.max_new_tokens=6",
            f"train.out_dir={tmp_path / f'{preset}-{shared}'}",
            "logging.progress=false",
            "optim.lr=1e-3",
            "train.samples_every=0",
            "train.save_every=0",
            f"train.shared_prefix={shared}",
            *extra,
        ],
    )
    return Trainer(cfg, reward_fn=RewardRunner(parity_reward, num_workers=0))


@pytest.mark.parametrize("preset", PRESETS)
def test_a_step_with_the_shared_prefix_equals_the_plain_step(tmp_path, preset):
    runs = {}
    for shared in ("off", "on"):
        trainer = _trainer(tmp_path, preset, shared)
        assert trainer.shared_prefix == (shared == "on")
        metrics = trainer.step()
        step = trainer._last_step
        runs[shared] = (metrics, step.batch.response_ids, dict(trainer.model.named_parameters()))
    (m_off, ids_off, w_off), (m_on, ids_on, w_on) = runs["off"], runs["on"]
    assert torch.equal(ids_on, ids_off)  # the same samples from the same seed
    assert m_on.keys() == m_off.keys()
    for key, value in m_off.items():
        if not key.startswith(TIMING):
            assert m_on[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    # One Adam step from the same start: the updates agree (Adam's first step is lr * g/|g|,
    # so parameters whose gradient is float noise may move differently: compare the bulk).
    moved = [(w_on[n] - w_off[n]).abs().max().item() for n in w_off if w_off[n].requires_grad]
    assert sorted(moved)[len(moved) // 2] < 1e-6


def test_a_checkpointed_step_with_the_shared_prefix_equals_the_plain_step(tmp_path):
    """Activation checkpointing keeps the shared prefix (auto turns it on) and the step equals
    the plain checkpointed step."""
    extra = ("model.gradient_checkpointing=true",)
    runs = {}
    for shared in ("off", "auto"):
        trainer = _trainer(tmp_path, "grpo", shared, *extra)
        assert trainer.shared_prefix == (shared == "auto")
        metrics = trainer.step()
        runs[shared] = (metrics, dict(trainer.model.named_parameters()))
    (m_off, w_off), (m_on, w_on) = runs["off"], runs["auto"]
    for key, value in m_off.items():
        if not key.startswith(TIMING):
            assert m_on[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    moved = [(w_on[n] - w_off[n]).abs().max().item() for n in w_off if w_off[n].requires_grad]
    assert sorted(moved)[len(moved) // 2] < 1e-6


def test_shared_prefix_on_fails_with_reentrant_checkpointing(tmp_path, monkeypatch):
    from vispo.models import adapt

    def reentrant(model):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": True}
        )
        return model

    monkeypatch.setattr(adapt, "enable_gradient_checkpointing", reentrant)
    extra = ("model.gradient_checkpointing=true",)
    assert _trainer(tmp_path, "grpo", "auto", *extra).shared_prefix is False
    with pytest.raises(ConfigError, match="reentrant"):
        _trainer(tmp_path, "grpo", "on", *extra)


def test_mini_and_micro_batches_hold_whole_groups_with_their_prefix(tmp_path, monkeypatch):
    """Mini-batches of one group (3 sequences) in two PPO epochs: every shared-prefix forward
    holds the whole of each group it touches (its prompt runs once per micro-batch), and the
    step still equals the plain step (both draw the same group order)."""
    import vispo.models.scoring as scoring

    extra = ("train.mini_batch_size=3", "train.micro_batch_size=3", "train.ppo_epochs=2")
    calls = []
    forward = scoring.shared_prefix_logits

    def recording(model, batch, variants, **kw):
        if torch.is_grad_enabled():  # the update's forwards
            calls.append(batch.prompt_index.tolist())
        return forward(model, batch, variants, **kw)

    runs = {}
    for shared in ("off", "on"):
        trainer = _trainer(tmp_path, "grpo", shared, *extra)
        with monkeypatch.context() as m:
            m.setattr(scoring, "shared_prefix_logits", recording)
            metrics = trainer.step()
        runs[shared] = (metrics, dict(trainer.model.named_parameters()))
    # 2 epochs x 2 mini-batches x 1 micro-batch, each one whole group of 3.
    assert len(calls) == 4
    assert all(len(c) == 3 and len(set(c)) == 1 for c in calls)
    (m_off, w_off), (m_on, w_on) = runs["off"], runs["on"]
    for key, value in m_off.items():
        if not key.startswith(TIMING):
            assert m_on[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    moved = [(w_on[n] - w_off[n]).abs().max().item() for n in w_off if w_off[n].requires_grad]
    assert sorted(moved)[len(moved) // 2] < 1e-6
