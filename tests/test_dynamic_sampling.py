"""DAPO batch building (issue 15, item 6): what a step trains on when the generation rounds
run out before ``prompts_per_step`` informative groups are found; and (issue 18) how many
prompts a refill round rolls out.

The reward here is scripted by sample id: a group is informative (rewards 1, 0, 0: mean 1/3,
inside DAPO's (0.01, 0.99)) exactly when its prompt's id is in a chosen set, else all its
rewards are 0. The expected batch is worked out from a fresh copy of the trainer's seeded
sampler, independently of the trainer's own bookkeeping.
"""

from __future__ import annotations

import pytest

from vispo.algos import refill_size
from vispo.data import PromptSampler
from vispo.rewards import RewardRunner
from vispo.train.config import load_config
from vispo.train.trainer import Trainer

N = 3  # rollouts per prompt


def scripted_reward(completions, answers, sid, **columns):
    """1 for the first rollout of an informative prompt (ids in ``INFORMATIVE``), else 0."""
    out, seen = [], set()
    for s in sid:
        first = s not in seen
        seen.add(s)
        out.append(1.0 if first and s in INFORMATIVE else 0.0)
    return out


INFORMATIVE: set[str] = set()


class ById:
    """The trainer's reward call with the sample ids passed on to the reward function."""

    def __init__(self):
        self.runner = RewardRunner(scripted_reward, num_workers=0)
        self.n_errors = 0

    def __call__(self, texts, answers, *, sample_ids, **columns):
        return self.runner(texts, answers, sample_ids=sample_ids, sid=sample_ids)


class Console:
    def __init__(self):
        self.lines: list[str] = []

    def print(self, message):
        self.lines.append(str(message))


def _trainer(tmp_path, prompts: int, rounds: int, informative):
    cfg = load_config(
        None,
        [
            "objective.name=dapo",
            f"objective.ds_max_rounds={rounds}",
            "model.name_or_path=tiny:qwen2_vl",
            "data.limit=24",
            "data.eval_size=0",
            "train.steps=1",
            f"train.prompts_per_step={prompts}",
            f"rollout.n={N}",
            "rollout.max_new_tokens=4",
            f"train.out_dir={tmp_path}",
            "logging.progress=false",
            "train.samples_every=0",
            "train.save_every=0",
        ],
    )
    console = Console()
    trainer = Trainer(cfg, reward_fn=ById(), console=console)
    # The rounds' prompt batches, as a fresh sampler with the run's seed draws them.
    sampler = PromptSampler(len(trainer.train_data), prompts, cfg.train.seed)
    batches = [[trainer.train_data[i].id for i in next(sampler)] for _ in range(rounds + 1)]
    INFORMATIVE.clear()
    INFORMATIVE.update(batches[r][i] for r, i in informative)
    return trainer, console, batches


def _trained_ids(trainer):
    return [g.sample.id for g in trainer._last_step.groups]


def test_a_full_batch_is_the_first_informative_groups_in_round_order(tmp_path):
    # Round 1: prompts 0, 2, 3 informative; round 2: prompts 1, 3 -> the batch is round 1's
    # three and round 2's prompt 1, after 2 of the 5 allowed rounds. Round 2 rolls out
    # ceil(1 * 4 / 3) = 2 prompts (its prompts 0 and 1), so 4 of the 6 groups are kept.
    trainer, console, batches = _trainer(tmp_path, 4, 5, [(0, 0), (0, 2), (0, 3), (1, 1), (1, 3)])
    m = trainer.step()
    assert _trained_ids(trainer) == [batches[0][0], batches[0][2], batches[0][3], batches[1][1]]
    assert m["dynamic_sampling/rounds"] == 2
    assert m["dynamic_sampling/groups_short"] == 0
    assert m["dynamic_sampling/kept_frac"] == pytest.approx(4 / 6)
    assert not [line for line in console.lines if "warning" in line]
    adv = trainer._last_step.advantages.view(4, N)
    assert (adv[:, 0] > 0).all() and (adv[:, 1:] < 0).all()  # every trained group informative


def test_a_partial_batch_trains_on_the_informative_groups_found_and_warns(tmp_path):
    # Two informative prompts in the 2 allowed rounds, 4 asked.
    trainer, console, batches = _trainer(tmp_path, 4, 2, [(0, 1), (1, 2)])
    m = trainer.step()
    assert _trained_ids(trainer) == [batches[0][1], batches[1][2]]
    assert len(trainer._last_step.batch) == 2 * N
    assert m["dynamic_sampling/rounds"] == 2
    assert m["dynamic_sampling/groups_short"] == 2
    assert m["dynamic_sampling/kept_frac"] == pytest.approx(2 / 8)
    (warning,) = [line for line in console.lines if line.startswith("warning")]
    assert "2 informative groups of the 4 asked after 2 rounds" in warning
    assert "ds_max_rounds=2" in warning
    # The sampler moved on by exactly the rounds run: the next step starts at batch 3.
    assert [trainer.train_data[i].id for i in next(trainer.sampler)] == batches[2]


def test_no_informative_group_in_any_round_trains_on_the_last_round_and_warns(tmp_path):
    trainer, console, batches = _trainer(tmp_path, 2, 3, [])
    m = trainer.step()
    assert _trained_ids(trainer) == batches[2]  # the third (last) round's prompts
    assert m["dynamic_sampling/rounds"] == 3
    assert m["dynamic_sampling/groups_short"] == 2
    assert m["dynamic_sampling/kept_frac"] == 0.0
    assert trainer._last_step.advantages.abs().max() == 0  # nothing to learn from
    assert m["loss/policy"] == 0.0
    (warning,) = [line for line in console.lines if line.startswith("warning")]
    assert "0 informative groups of the 2 asked after 3 rounds" in warning
    assert "last full round's groups" in warning


def test_without_dynamic_sampling_nothing_is_short(tmp_path):
    trainer, console, batches = _trainer(tmp_path, 2, 3, [])
    trainer.cfg.objective.dynamic_sampling = False
    m = trainer.step()
    assert _trained_ids(trainer) == batches[0]
    assert m["dynamic_sampling/rounds"] == 1
    assert m["dynamic_sampling/groups_short"] == 0 and m["dynamic_sampling/kept_frac"] == 1.0
    assert not [line for line in console.lines if "warning" in line]


def test_refill_size_by_hand():
    # Nothing informative seen yet: the full batch.
    assert refill_size(4, 0, 4, 4) == 4
    # 3 of 4 informative, 1 missing: ceil(1 / (3/4)) = 2 (not the full 4).
    assert refill_size(1, 3, 4, 4) == 2
    # 4 of 6 informative, 2 missing: ceil(2 * 6 / 4) = 3; then 5 of 9, 1 missing: ceil(9/5) = 2.
    assert refill_size(2, 4, 6, 6) == 3
    assert refill_size(1, 5, 9, 6) == 2
    # Never below the deficit (every group informative so far), never above the full batch.
    assert refill_size(3, 8, 8, 8) == 3
    assert refill_size(3, 1, 8, 8) == 8
    # Under 4 ranks rounded up to a multiple of 4: ceil(1 * 8 / 6) = 2 -> 4.
    assert refill_size(1, 6, 8, 8, ranks=4) == 4
    assert refill_size(0, 8, 8, 8) == 0


def test_refill_rounds_roll_out_only_the_scaled_deficit(tmp_path, monkeypatch):
    # 6 asked. Round 1: prompts 0, 1, 2, 4 informative (4 of 6) -> round 2 asks
    # ceil(2 * 6 / 4) = 3 prompts, of which prompt 0 is informative (5 of 9) -> round 3 asks
    # ceil(1 * 9 / 5) = 2, of which prompt 1 is informative: the batch is full.
    informative = [(0, 0), (0, 1), (0, 2), (0, 4), (1, 0), (1, 4), (2, 1)]
    trainer, console, batches = _trainer(tmp_path, 6, 5, informative)
    asked = []
    rollout = trainer._rollout

    def counting(prompts, keys, n=None):
        asked.append([key[1:] for key in keys])
        return rollout(prompts, keys, n)

    monkeypatch.setattr(trainer, "_rollout", counting)
    m = trainer.step()
    assert [len(keys) for keys in asked] == [6, 3, 2]
    assert asked[1] == [(2, 0), (2, 1), (2, 2)]  # (round, position): the batch's first prompts
    assert _trained_ids(trainer) == [
        batches[0][0],
        batches[0][1],
        batches[0][2],
        batches[0][4],
        batches[1][0],
        batches[2][1],
    ]
    assert m["dynamic_sampling/rounds"] == 3
    assert m["dynamic_sampling/groups_short"] == 0
    assert m["dynamic_sampling/kept_frac"] == pytest.approx(6 / 11)
    # One sampler batch per round, partial or not: the next step starts at batch 4.
    assert [trainer.train_data[i].id for i in next(trainer.sampler)] == batches[3]
