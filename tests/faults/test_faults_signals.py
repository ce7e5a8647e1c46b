"""SIGTERM / SIGINT during ``vispo train``, then ``--resume``: nothing lost, nobody left behind.

One run of 12 steps (papo_g, 2 PPO epochs, ``save_every=5``: a stop between two saves loses
steps unless it checkpoints) is stopped 6 times, each time resumed with ``--resume``, and its
final metrics.jsonl must equal an uninterrupted run's. The signals land:

- while the step's responses are being generated, and while its rewards are being scored
  (held there by fault_entry.py): the step is abandoned and redone after the resume;
- as soon as the step's update begins: the step is finished first;
- at 2 seeded random moments (one of them a SIGINT, as Ctrl-C sends);
- twice in a row during an update: the second exits at once (128 + 15), without a checkpoint.

After each stop: the exit code (75 for a stop with a checkpoint), one ``interrupted: ...`` line
and no traceback, every checkpoint loadable, no finished step lost (the double signal: at most
``save_every``), and none of the processes the run started (its reward worker, and a ``sleep``
that the reward starts from inside the worker) still alive.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
from faultkit import TINY, max_metric_diff, start_training, unreadable_checkpoints

from vispo.train.checkpoint import checkpoint_dirs
from vispo.train.logging import read_metrics

pytestmark = pytest.mark.faults

STEPS, SAVE_EVERY = 12, 5

#: The reward starts a long-lived child process from inside its worker (once per worker): a
#: stand-in for a reward that runs model-written code in a subprocess.
REWARD = """
import subprocess

_child = []


def parity(completions, answers, **columns):
    if not _child:
        try:
            _child.append(subprocess.Popen(["sleep", "600"]))
        except OSError:  # a sandbox that forbids new processes: nothing to leave behind
            _child.append(None)
    return [float(len(c) % 2 == 0) for c in completions]
"""

# (signal, how): ("hold", phase) waits in that phase; ("mark", phase) signals on entering it;
# ("delay", None) a seeded random moment (0-0.15 s after the process's 1st or 2nd rollout
# starts, so that every process has steps left to interrupt); "double": two SIGTERMs.
PLAN = [
    ("SIGTERM", "hold", "rollout"),
    ("SIGTERM", "hold", "reward"),
    ("SIGTERM", "mark", "update"),
    ("SIGINT", "delay", None),
    ("SIGTERM", "delay", None),
    ("DOUBLE", "hold", "update"),
]


def _args(out: Path, reward: str) -> list[str]:
    return [
        "objective.name=papo_g",
        *TINY,
        f"reward.name={reward}",
        f"train.steps={STEPS}",
        f"train.save_every={SAVE_EVERY}",
        "train.keep_last=2",
        "train.ppo_epochs=2",
        "train.mini_batch_size=3",
        f"train.out_dir={out}",
    ]


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a live process, from /proc; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return fields[0], fields[19]


def descendants(root: int) -> dict[int, str]:
    """pid -> start time of every process below ``root`` (multiprocessing's resource tracker
    excluded: it is the standard library's, and ends by itself when its pipe closes)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            try:
                text = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            ppid = int(text[text.rfind(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(name))
    out, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" in cmd or (st := _stat(pid)) is None:
            continue
        out[pid] = st[1]
        todo.extend(children.get(pid, []))
    return out


def survivors(procs: dict[int, str], wait: float = 3.0) -> list[int]:
    """Processes of ``procs`` still running (same start time, not a zombie) after ``wait`` s."""
    deadline = time.monotonic() + wait
    while True:
        alive = [
            pid
            for pid, started in procs.items()
            if (st := _stat(pid)) is not None and st[1] == started and st[0] != "Z"
        ]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _marks(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def _wait_for(proc, marks: Path, cond, limit: float = 120.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if cond(_marks(marks)):
            return True
        time.sleep(0.005)
    raise AssertionError("the training process did not reach the moment in time")


def _latest_step(run: Path) -> int:
    dirs = checkpoint_dirs(run)
    return int(dirs[-1].name.split("-")[1]) if dirs else 0


def test_sigterm_sigint_at_6_moments_then_resume(tmp_path, fault_table):
    reward_file = tmp_path / "reward" / "signal_reward.py"
    reward_file.parent.mkdir()
    reward_file.write_text(REWARD)
    reward = f"{reward_file}:parity"
    rng = random.Random(20261207)
    marks = tmp_path / "marks"

    base = tmp_path / "baseline"
    proc = start_training(_args(base, reward), marks, tmp_path / "base.log")
    seen_base = {}
    while proc.poll() is None:  # the uninterrupted run leaves nobody behind either
        seen_base.update(descendants(proc.pid))
        time.sleep(0.05)
    assert proc.returncode == 0, (tmp_path / "base.log").read_text()[-3000:]
    baseline = read_metrics(base)
    assert [r["step"] for r in baseline] == list(range(1, STEPS + 1))
    assert survivors(seen_base) == [], seen_base

    out = tmp_path / "run"
    stops: list[dict] = []
    for i, (sig, how, phase) in enumerate(PLAN):
        log = tmp_path / f"run-{i}.log"
        args = _args(out, reward) + (["--resume"] if i else [])
        hold = phase if how == "hold" else None
        proc = start_training(args, marks, log, hold=hold, at=1)
        if how == "hold":
            reached = _wait_for(proc, marks, lambda ls: any(x.startswith("HOLD ") for x in ls))
        elif how == "mark":
            reached = _wait_for(proc, marks, lambda ls, p=phase: any(x.startswith(p) for x in ls))
        else:  # a random moment within the process's first 2-3 steps (bounded progress)
            nth = f"rollout {rng.randint(1, 2)} "
            reached = _wait_for(proc, marks, lambda ls, m=nth: any(x.startswith(m) for x in ls))
            time.sleep(rng.uniform(0.0, 0.15))
        assert reached and proc.poll() is None, log.read_text()[-3000:]
        procs = descendants(proc.pid)
        landed = _marks(marks)[-1].split(" ", 1)[0] if _marks(marks) else "startup"
        sent = time.monotonic()
        if sig == "DOUBLE":
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
        else:
            proc.send_signal(getattr(signal, sig))
        code = proc.wait(timeout=120)
        latency = time.monotonic() - sent
        text = log.read_text()
        lines = [x for x in text.splitlines() if x.startswith("interrupted: ")]
        completed = max((r["step"] for r in read_metrics(out)), default=0)
        latest = _latest_step(out)
        stops.append(
            {
                "signal": sig,
                "phase": landed if how != "hold" else phase,
                "code": code,
                "latency": latency,
                "lines": lines,
                "traceback": "Traceback" in text,
                "lost": completed - latest,
                "unreadable": unreadable_checkpoints(out),
                "orphans": survivors(procs),
                "workers_seen": len(procs),
                "latest": latest,
                "log": text[-2000:],
            }
        )
    proc = start_training(_args(out, reward) + ["--resume"], marks, tmp_path / "final.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "final.log").read_text()[-3000:]
    diff = max_metric_diff(baseline, read_metrics(out))

    def ok(s: dict) -> bool:
        if s["signal"] == "DOUBLE":
            return (
                s["code"] == 128 + signal.SIGTERM
                and "second SIGTERM: exiting now" in s["log"]
                and s["latency"] < 5.0
                and s["lost"] <= SAVE_EVERY
                and not s["unreadable"]
                and not s["orphans"]
            )
        return (
            s["code"] == 75
            and len(s["lines"]) == 1
            and s["lines"][0].startswith(f"interrupted: {s['signal']}: stopped after step ")
            and not s["traceback"]
            and s["lost"] == 0
            and not s["unreadable"]
            and not s["orphans"]
        )

    held = [s for s in stops if ok(s)]
    graceful = [s for s in stops if s["signal"] != "DOUBLE"]
    fault_table(
        "signals",
        "SIGTERM/SIGINT during training (2 abandon, 3 finish the step), then --resume",
        len(graceful),
        len([s for s in graceful if ok(s)]),
        lost=f"max {max(s['lost'] for s in graceful)} finished steps (save_every {SAVE_EVERY}); "
        f"{sum(len(s['orphans']) for s in stops)} orphans of "
        f"{sum(s['workers_seen'] for s in stops)} processes started",
        detail=f"exit 75 within {max(s['latency'] for s in graceful):.1f} s; phases "
        + ", ".join(sorted({s["phase"] for s in graceful})),
    )
    double = [s for s in stops if s["signal"] == "DOUBLE"]
    fault_table(
        "signals",
        "second SIGTERM while the first one waits for the step",
        len(double),
        len([s for s in double if ok(s)]),
        lost=f"{max(s['lost'] for s in double)} steps (no new checkpoint, like kill -9)",
        detail=f"exit 143 within {max(s['latency'] for s in double):.2f} s",
    )
    fault_table(
        "signals",
        "interrupted run's metrics vs uninterrupted run",
        1,
        int(diff <= 1e-6),
        lost=f"max |diff| {diff:.1e}",
        detail=f"{len(stops)} stops, {STEPS} steps, papo_g",
    )
    assert len(held) == len(stops), [
        {k: v for k, v in s.items() if k != "log"} | {"log": s["log"][-600:]}
        for s in stops
        if not ok(s)
    ]
    assert all(s["workers_seen"] >= 1 for s in stops), stops
    assert diff <= 1e-6, diff
