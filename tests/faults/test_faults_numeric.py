"""NaN and infinity injected into the logits, the loss and the gradients.

Where: a forward hook on ``lm_head`` (the update's forward with gradient, the no-gradient
scoring pass of the pre-update policy, or every forward including generation), an extra
objective term (the loss), a gradient hook on one parameter (the gradients). A single bad step
must be skipped without touching the weights or the optimizer state, counted in
``skipped_steps``, and the run must go on and train normally; ``max_skipped_in_row`` bad steps
in a row must stop the run with TrainingStopped and a checkpoint that holds the last good
weights.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from faultkit import TINY, parity_reward, same_weights, weights_of

from vispo.algos import OBJECTIVE_TERMS, register_term
from vispo.models import build_tiny_vlm
from vispo.rewards import RewardRunner
from vispo.train import trainer as trainer_module
from vispo.train.checkpoint import latest_checkpoint, load_checkpoint
from vispo.train.config import load_config
from vispo.train.logging import read_metrics
from vispo.train.optim import build_optimizer
from vispo.train.trainer import Trainer, TrainingStopped

pytestmark = pytest.mark.faults

VALUES = {"nan": math.nan, "inf": math.inf}


class Injector:
    """Turns NaN/inf faults on and off; ``active`` says in which steps (1-based) they fire."""

    def __init__(self, where: str, value: float):
        self.where, self.value = where, value
        self.on = False
        self.scoring = False

    def logits_hook(self, module, inputs, output):
        # The update's forward runs with gradient; the old-policy scoring pass without, inside
        # score_fixed. Generation (no gradient, outside score_fixed) is left alone.
        fire = (
            (self.where == "logits-update" and torch.is_grad_enabled())
            or (self.where == "logits-score" and self.scoring)
            or self.where == "logits-all"  # generation too
        )
        if self.on and fire:
            output = output.clone()
            output[..., 3] = self.value  # one vocabulary entry everywhere
        return output

    def grad_hook(self, grad):
        return grad * self.value if self.on else grad

    def term(self, x):
        bad = x.logp.sum() * 0.0 + (self.value if self.on else 0.0)
        return bad, {}


@contextlib.contextmanager
def injected(trainer: Trainer, where: str, value: float, monkeypatch):
    inj = Injector(where, value)
    handles = []
    if where.startswith("logits"):
        handles.append(trainer.model.lm_head.register_forward_hook(inj.logits_hook))
        real = trainer_module.score_fixed

        def score_fixed(*args, **kwargs):
            inj.scoring = True
            try:
                return real(*args, **kwargs)
            finally:
                inj.scoring = False

        monkeypatch.setattr(trainer_module, "score_fixed", score_fixed)
    elif where == "grad":
        param = trainer.model.lm_head.weight
        handles.append(param.register_hook(inj.grad_hook))
    elif where == "loss":
        register_term("fault_injected")(inj.term)
        trainer.cfg.objective.extra_terms = {"fault_injected": {"weight": 1.0}}
    try:
        yield inj
    finally:
        for h in handles:
            h.remove()
        OBJECTIVE_TERMS.pop("fault_injected", None)
        monkeypatch.undo()


def _trainer(tmp_path, name: str, *extra: str) -> Trainer:
    cfg = load_config(
        None,
        [
            "objective.name=grpo",
            *TINY,
            "train.steps=4",
            "train.save_every=0",
            "train.ppo_epochs=2",  # the pre-update policy is scored without gradient
            f"train.out_dir={tmp_path / name}",
            *extra,
        ],
    )
    return Trainer(cfg, reward_fn=RewardRunner(parity_reward, num_workers=0))


def _one_step(trainer: Trainer) -> dict:
    metrics = trainer.step()
    trainer.step_count += 1
    trainer._after_step(metrics)
    return metrics


FAULTS = [
    (where, kind)
    for where in ("logits-update", "logits-score", "loss", "grad")
    for kind in ("nan", "inf")
]


def test_a_non_finite_step_is_skipped_and_training_goes_on(tmp_path, monkeypatch, fault_table):
    held, failures = 0, {}
    for where, kind in FAULTS:
        trainer = _trainer(tmp_path, f"{where}-{kind}")
        with injected(trainer, where, VALUES[kind], monkeypatch) as inj:
            _one_step(trainer)  # a normal step: weights move
            w1 = weights_of(trainer.model)
            opt1 = {k: v.clone() for k, v in trainer.optimizer.state_dict()["state"][0].items()}
            inj.on = True
            bad = _one_step(trainer)
            inj.on = False
            w2 = weights_of(trainer.model)
            opt2 = {k: v.clone() for k, v in trainer.optimizer.state_dict()["state"][0].items()}
            _one_step(trainer)
            _one_step(trainer)
        rows = read_metrics(trainer.out)
        checks = {
            "skipped step left weights alone": same_weights(w1, w2),
            "skipped step left Adam state alone": all(torch.equal(opt1[k], opt2[k]) for k in opt1),
            "counted": [r["skipped_steps"] for r in rows] == [0, 2, 2, 2],
            "counters": trainer.updates.skipped == 2 and trainer.updates.updates == 6,
            "grad_norm of the bad step not finite": bad["grad_norm"] != bad["grad_norm"],
            "later steps train": not same_weights(w2, weights_of(trainer.model)),
            "all 4 steps logged": [r["step"] for r in rows] == [1, 2, 3, 4],
        }
        if all(checks.values()):
            held += 1
        else:
            failures[f"{where}-{kind}"] = [k for k, v in checks.items() if not v]
    fault_table(
        "numeric",
        "one NaN/inf step (logits x2 passes, loss, gradient)",
        len(FAULTS),
        held,
        lost="0 (the bad step's update skipped, counted)",
        detail="2 PPO epochs: both optimizer steps of the bad step skipped",
    )
    assert not failures, failures


def test_a_run_of_non_finite_steps_stops_with_a_checkpoint(tmp_path, monkeypatch, fault_table):
    held, failures = 0, {}
    places = ["logits-all", "logits-update", "logits-score", "loss", "grad"]
    for where in places:
        trainer = _trainer(tmp_path, f"stop-{where}", "train.max_skipped_in_row=3")
        with injected(trainer, where, math.nan, monkeypatch) as inj:
            _one_step(trainer)
            good = weights_of(trainer.model)
            inj.on = True
            with pytest.raises(TrainingStopped) as info:
                trainer.train()
        path = latest_checkpoint(trainer.out)
        model, _ = build_tiny_vlm("qwen2_vl")
        opt = build_optimizer(model, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999))
        state = load_checkpoint(path, model=model, optimizer=opt)
        checks = {
            # 2 optimizer steps per step (2 epochs): the 3rd skip in a row comes in step 3
            "stopped at step 3": trainer.step_count == 3 and path.name == "step-000003",
            "clear message": "4 consecutive updates had a non-finite loss or gradient norm"
            in str(info.value)
            and str(path) in str(info.value),
            "checkpoint holds the last good weights": same_weights(good, weights_of(model)),
            "checkpoint counts the skips": state["updates"]["skipped"] == 4,
        }
        if all(checks.values()):
            held += 1
        else:
            failures[where] = [k for k, v in checks.items() if not v]
    fault_table(
        "numeric",
        "NaN every step (incl. generation): stop with a checkpoint",
        len(places),
        held,
        lost="0 (checkpoint = last good weights)",
        detail="max_skipped_in_row=3: TrainingStopped at step 3",
    )
    assert not failures, failures
