"""kill -9 during training, then ``vispo train ... --resume``: 20 kills, seeded.

The kills land in every phase of a step: rollout, reward, update, metrics logging, checkpoint
writing (after each file of the ``.tmp`` folder), just before the ``.tmp`` folder is renamed,
and in the middle of deleting an old checkpoint; a few more land at a random wall-clock moment.
After each kill we check that every checkpoint on disk loads, that at most one checkpoint
interval of finished steps is lost, and that ``--resume`` starts from the newest checkpoint.
Each interrupted run is resumed to the end and its metrics.jsonl must equal an uninterrupted
run's (CPU runs are deterministic; wall-clock metrics excluded).
"""

from __future__ import annotations

import random
import re
import signal
import time
from pathlib import Path

import pytest
from faultkit import (
    TINY,
    max_metric_diff,
    start_training,
    unreadable_checkpoints,
    write_reward_file,
)

from vispo.train.checkpoint import checkpoint_dirs
from vispo.train.logging import read_metrics

pytestmark = pytest.mark.faults

STEPS, SAVE_EVERY, KEEP_LAST = 8, 2, 2
KILLS = 20
# Where the 20 kills go (shuffled with the seed); "random" = a random wall-clock moment.
PLAN = (
    ["rollout"] * 3
    + ["reward"] * 2
    + ["update"] * 3
    + ["log"]
    + ["ckpt-file"] * 3
    + ["ckpt-commit"] * 2
    + ["rotate"] * 2
    + ["random"] * 4
)
STEP_SECONDS = 0.15  # rough time of one tiny step: bounds the random kill moments


def _args(out: Path, reward: str) -> list[str]:
    return [
        "objective.name=papo_g",
        *TINY,
        f"reward.name={reward}",
        f"train.steps={STEPS}",
        f"train.save_every={SAVE_EVERY}",
        f"train.keep_last={KEEP_LAST}",
        "train.ppo_epochs=2",
        "train.mini_batch_size=3",
        f"train.out_dir={out}",
    ]


def _marks(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def _wait_and_kill(proc, marks: Path, hold: str | None, delay: float, limit: float = 180.0):
    """Kill ``proc`` with SIGKILL once it holds (targeted) or ``delay`` s after its first step
    starts (random); returns the last phase it entered, or None if it exited first."""
    deadline = time.monotonic() + limit
    started = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None
        lines = _marks(marks)
        if hold is not None and any(line.startswith("HOLD ") for line in lines):
            time.sleep(random.Random(len(lines)).uniform(0.0, 0.05))
            break
        if hold is None and lines:
            started = started or time.monotonic()
            if time.monotonic() - started >= delay:
                break
        time.sleep(0.01)
    else:
        proc.kill()
        raise AssertionError("the training process neither held nor finished in time")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lines = [line for line in _marks(marks) if not line.startswith("HOLD ")]
    return lines[-1].split(" ", 2)[0] if lines else "startup"


def _available(phase: str, start: int) -> int:
    """How many times a process resuming from step ``start`` enters ``phase``."""
    remaining = STEPS - start
    saves = [s for s in range(start + 1, STEPS + 1) if s % SAVE_EVERY == 0 or s == STEPS]
    if phase in ("rollout", "reward", "update", "log"):
        return remaining
    if phase == "ckpt-file":
        return 3 * len(saves)  # weights, optimizer, rng
    if phase == "ckpt-commit":
        return len(saves)
    if phase == "rotate":
        kept = min(start // SAVE_EVERY, KEEP_LAST)
        deletions = 0
        for _ in saves:
            kept += 1
            deletions += max(0, kept - KEEP_LAST)
            kept = min(kept, KEEP_LAST)
        return deletions
    return remaining  # random


def _step_of_latest(run: Path) -> int:
    dirs = checkpoint_dirs(run)
    return int(dirs[-1].name.split("-")[1]) if dirs else 0


def test_kill9_at_20_moments_then_resume(tmp_path, fault_table):
    reward = write_reward_file(tmp_path / "reward")
    rng = random.Random(20240610)
    plan = PLAN[:]
    rng.shuffle(plan)

    base = tmp_path / "baseline"
    proc = start_training(_args(base, reward), tmp_path / "base.marks", tmp_path / "base.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "base.log").read_text()[-3000:]
    baseline = read_metrics(base)
    assert [r["step"] for r in baseline] == list(range(1, STEPS + 1))

    kills: list[dict] = []
    runs: list[dict] = []
    run_index = 0
    for _ in range(60):  # processes, a bound only
        if len(kills) == KILLS and (not runs or runs[-1]["done"]):
            break
        if not runs or runs[-1]["done"]:
            run_index += 1
            runs.append({"dir": tmp_path / f"run{run_index}", "done": False, "starts": 0})
        run = runs[-1]
        out: Path = run["dir"]
        start = _step_of_latest(out)
        hold, at, delay = None, 0, 0.0
        spec = next((p for p in plan if _available(p, start) > 0), None) if plan else None
        if len(kills) < KILLS and spec is not None:
            if spec == "random":
                delay = rng.uniform(0.0, (STEPS - start) * STEP_SECONDS)
            else:
                hold, at = spec, rng.randint(1, _available(spec, start))
        args = _args(out, reward) + (["--resume"] if run["starts"] else [])
        log = tmp_path / f"run{run_index}-{run['starts']}.log"
        proc = start_training(args, tmp_path / "marks", log, hold=hold, at=at)
        run["starts"] += 1
        if spec is None or len(kills) >= KILLS:
            assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
            last_phase = None
        else:
            last_phase = _wait_and_kill(proc, tmp_path / "marks", hold, delay)
        text = " ".join(log.read_text().split())  # rich wraps long lines
        if run["starts"] > 1:  # --resume must start from the newest checkpoint on disk
            expected = f"(step {start})" if start else "no checkpoint in"
            assert expected in text, text[-3000:]
        if last_phase is None:  # the process finished its run
            if proc.returncode != 0:
                raise AssertionError(text[-3000:])
            run["done"] = True
            run["diff"] = max_metric_diff(baseline, read_metrics(out))
            continue
        plan.remove(spec)
        completed = max((r["step"] for r in read_metrics(out)), default=0)
        latest = _step_of_latest(out)
        kills.append(
            {
                "spec": spec,
                "phase": last_phase,
                "run": run_index,
                "lost": max(0, completed - latest),
                "unreadable": unreadable_checkpoints(out),
                "leftover_tmp": sorted(p.name for p in (out / "checkpoints").glob("*.tmp"))
                if (out / "checkpoints").exists()
                else [],
            }
        )

    held = [k for k in kills if k["lost"] <= SAVE_EVERY and not k["unreadable"]]
    finished = [r for r in runs if r.get("done")]
    equal = [r for r in finished if r["diff"] <= 1e-6]
    phases = sorted({k["phase"] for k in kills})
    fault_table(
        "crash",
        "kill -9 during training, then --resume",
        len(kills),
        len(held),
        lost=f"max {max((k['lost'] for k in kills), default=0)} steps "
        f"(interval {SAVE_EVERY}); {sum(len(k['unreadable']) for k in kills)} unreadable ckpts",
        detail=f"phases {', '.join(phases)}",
    )
    fault_table(
        "crash",
        "resumed runs' metrics vs uninterrupted run",
        len(finished),
        len(equal),
        lost="max |diff| " + (f"{max(r['diff'] for r in finished):.1e}" if finished else "n/a"),
        detail=f"{len(finished)} runs of {STEPS} steps, papo_g",
    )
    assert len(kills) == KILLS, kills
    for k in kills:
        assert not k["unreadable"], k
        assert k["lost"] <= SAVE_EVERY, k
    assert {"rollout", "reward", "update", "ckpt-file", "ckpt-commit", "rotate"} <= set(phases)
    assert finished and len(equal) == len(finished), [r.get("diff") for r in runs]
    assert all(re.fullmatch(r"step-\d+\.tmp", n) for k in kills for n in k["leftover_tmp"])
