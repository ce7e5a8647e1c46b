"""Bad user reward functions during training: counted, zeroed, never fatal.

One reward file, loaded by path and run in the sandbox's worker processes, misbehaves in the
way a "mode" file says (the test switches it between steps): it raises, hangs, returns NaN or
infinity, a wrong number of values or strings, prints megabytes, calls ``sys.exit`` or kills
its own process. Only completions of odd length are its victims; the rest get their real
reward (1.0 for an even length). So every step, whatever the mode, must end with exactly the
rewards [1.0 if even else 0.0], and the runner must count one error of the mode's kind per
odd-length completion; then training goes on.
"""

from __future__ import annotations

import pytest
from faultkit import TINY

from vispo.rewards import RewardRunner
from vispo.train.config import load_config
from vispo.train.logging import read_metrics
from vispo.train.trainer import Trainer

pytestmark = pytest.mark.faults

REWARD_SOURCE = """
import math
import os
import sys
import time

MODE_FILE = {mode_file!r}


def chaos(completions, answers, **columns):
    mode = open(MODE_FILE).read().strip()
    victims = [len(c) % 2 == 1 for c in completions]
    good = [0.0 if v else 1.0 for v in victims]
    if mode == "ok" or not any(victims):
        return good
    if mode == "raise":
        raise ValueError("user bug: cannot parse the completion")
    if mode == "hang":
        time.sleep(3600)
    if mode == "exit":
        sys.exit(1)
    if mode == "crash":
        os._exit(3)
    if mode == "wrong_length":
        return good + [1.0]
    if mode == "nan":
        return [math.nan if v else g for v, g in zip(victims, good)]
    if mode == "inf":
        return [-math.inf if v else g for v, g in zip(victims, good)]
    if mode == "string":
        return ["1.0" if v else g for v, g in zip(victims, good)]
    if mode == "print":
        print("x" * 2_000_000)
        print("y" * 2_000_000, file=sys.stderr)
        os.write(1, b"z" * 1_000_000)
        return good
    raise AssertionError(mode)
"""

# mode -> the error kind its victims must be counted under (None: no error, just noise)
MODES = {
    "raise": "exception",
    "hang": "timeout",
    "nan": "nan",
    "inf": "nan",
    "wrong_length": "wrong_length",
    "string": "bad_type",
    "print": None,
    "exit": "exception",
    "crash": "crash",
}


def test_bad_rewards_are_counted_and_never_fatal(tmp_path, capfd, fault_table):
    mode_file = tmp_path / "mode"
    mode_file.write_text("ok")
    reward_file = tmp_path / "chaos_reward.py"
    reward_file.write_text(REWARD_SOURCE.format(mode_file=str(mode_file)))
    runner = RewardRunner(f"{reward_file}:chaos", num_workers=2, timeout_s=1.0, retry_budget_s=30.0)
    cfg = load_config(
        None,
        [
            "objective.name=grpo",
            *TINY,
            "train.steps=40",
            "train.save_every=0",
            f"train.out_dir={tmp_path / 'run'}",
        ],
    )
    trainer = Trainer(cfg, reward_fn=runner)
    outcomes: dict[str, dict] = {}
    try:
        for mode, kind in [*MODES.items(), ("ok", None)]:
            mode_file.write_text(mode)
            for _attempt in range(4):  # until a step has at least one odd-length completion
                before = dict(runner.errors)
                metrics = trainer.step()
                trainer.step_count += 1
                trainer._after_step(metrics)
                texts = [t for g in trainer._last_step.groups for t in g.texts]
                got = [float(r) for g in trainer._last_step.groups for r in g.rewards]
                victims = sum(len(t) % 2 for t in texts)
                if victims or mode == "ok":
                    break
            new = {k: v - before.get(k, 0) for k, v in runner.errors.items()}
            new = {k: v for k, v in new.items() if v}
            expected_errors = {kind: victims} if kind and victims else {}
            outcomes[mode] = {
                "victims": victims,
                "held": victims > 0 or mode == "ok",
                "rewards_ok": got == [0.0 if len(t) % 2 else 1.0 for t in texts],
                "errors_ok": new == expected_errors,
                "new_errors": new,
                "logged": metrics["reward/errors"] == float(runner.n_errors),
            }
    finally:
        runner.close()
    out, err = capfd.readouterr()
    quiet = len(out) + len(err) < 50_000
    rows = read_metrics(trainer.out)
    held = [
        m
        for m, o in outcomes.items()
        if m != "ok" and o["held"] and o["rewards_ok"] and o["errors_ok"] and o["logged"]
    ]
    fault_table(
        "rewards",
        "reward fn raises/hangs/NaN/inf/wrong length/str/prints MBs/exits/crashes",
        len(MODES),
        len(held) if quiet else 0,
        lost=f"0 steps; {runner.n_errors} samples zeroed and counted",
        detail=", ".join(f"{k}={v}" for k, v in sorted(runner.errors.items()))
        + f"; {len(out) + len(err)} chars reached the console",
    )
    assert all(o["victims"] > 0 for m, o in outcomes.items() if m != "ok"), outcomes
    assert held == list(MODES), outcomes
    assert outcomes["ok"]["rewards_ok"] and outcomes["ok"]["errors_ok"], outcomes["ok"]
    assert quiet, (len(out), len(err))
    assert [r["step"] for r in rows] == list(range(1, trainer.step_count + 1))
