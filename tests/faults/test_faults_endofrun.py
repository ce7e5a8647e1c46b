"""The end of a good run is never an error: a run with one non-finite step, through the CLI.

``vispo train`` (``run_training``, what the CLI calls) runs 3 papo_g steps; in the last one a
forward hook on ``lm_head`` puts NaN into the logits of the update's forward pass, so that
step's loss, gradient norm, perception KL and entropy are NaN and its update is skipped. The
run must still exit 0 with its final checkpoint written, print the summary (the NaN shown as
"n/a", the skipped update counted), write curves.png, and leave a metrics.jsonl that is strict
JSON (no NaN/Infinity literals) whose non-finite values ``read_metrics`` and ``vispo report``
read back as floats.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from faultkit import TINY, write_reward_file

from vispo.eval import build_report
from vispo.train import trainer as trainer_module
from vispo.train.checkpoint import checkpoint_dirs
from vispo.train.config import load_config
from vispo.train.logging import read_metrics
from vispo.train.run import run_training

pytestmark = pytest.mark.faults


def _strict(line: str) -> dict:
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


def test_a_run_with_a_skipped_nan_step_exits_0_through_the_cli(
    tmp_path, monkeypatch, capsys, fault_table
):
    state = {"on": False, "hooked": False}

    def nan_logits(module, inputs, output):
        if state["on"] and torch.is_grad_enabled():  # the update's forward only
            output = output.clone()
            output[..., 3] = math.nan
        return output

    real_step = trainer_module.Trainer.step

    def step(self):
        if not state["hooked"]:
            self.model.lm_head.register_forward_hook(nan_logits)
            state["hooked"] = True
        state["on"] = self.step_count == 2  # the third and last step
        return real_step(self)

    monkeypatch.setattr(trainer_module.Trainer, "step", step)
    out = tmp_path / "run"
    reward = write_reward_file(tmp_path / "reward")
    cfg = load_config(
        None,
        [
            "objective.name=papo_g",
            *TINY,
            f"reward.name={reward}",
            "reward.num_workers=0",
            "train.steps=3",
            "train.save_every=2",
            f"train.out_dir={out}",
        ],
    )
    code = run_training(cfg)
    printed = capsys.readouterr()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    strict = []
    for line in lines:
        try:
            strict.append(_strict(line))
        except ValueError:
            strict.append(None)
    rows = read_metrics(out)
    last = rows[-1] if rows else {}
    report = build_report(out, rescore=False)
    checks = {
        "exit code 0": code == 0,
        "no traceback": "Traceback" not in printed.out + printed.err,
        "checkpoints 2 and 3": [p.name for p in checkpoint_dirs(out)]
        == ["step-000002", "step-000003"],
        "metrics.jsonl strict JSON": len(strict) == 3 and None not in strict,
        "NaN stored as the string 'nan'": None not in strict
        and strict[-1].get("grad_norm") == "nan"
        and strict[-1].get("perception/kl_mean") == "nan",
        "read back as floats": math.isnan(last.get("grad_norm", 0.0))
        and math.isnan(last.get("perception/kl_mean", 0.0)),
        "the step's update skipped, counted": last.get("skipped_steps") == 1.0,
        "earlier steps finite": all(math.isfinite(r["grad_norm"]) for r in rows[:2]),
        "summary printed with n/a and the skip": "perception KL" in printed.out
        and "n/a" in printed.out
        and "updates skipped" in printed.out,
        "curves.png": (out / "curves.png").is_file(),
        "vispo report reads it": report.is_file(),
    }
    fault_table(
        "numeric",
        "vispo train with one NaN step (the last): finishes, exit 0",
        1,
        int(all(checks.values())),
        lost="0 (the NaN step's update skipped; checkpoints 2 and 3 written)",
        detail='metrics.jsonl strict JSON, non-finite as "nan"/"inf"/"-inf"',
    )
    assert all(checks.values()), {k: v for k, v in checks.items() if not v}
