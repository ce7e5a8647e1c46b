"""Bad user reward functions during training: counted, zeroed, never fatal.

One reward file, loaded by path and run in the sandbox's worker processes, misbehaves in the
way a "mode" file says (the test switches it between steps): it raises, hangs, returns NaN or
infinity, a wrong number of values or strings, prints megabytes, calls ``sys.exit`` or kills
its own process. Only completions of odd length are its victims; the rest get their real
reward (1.0 for an even length). So every step, whatever the mode, must end with exactly the
rewards [1.0 if even else 0.0], and the runner must count one error of the mode's kind per
odd-length completion; then training goes on.

The isolation tests then try what a hostile reward would (read secrets, signal the trainer,
connect, write outside its folder, write big files, allocate, fork, leave processes behind,
burn CPU, hang at import), rewards that fail on every call, and values that overflow float32.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from faultkit import PYTHON, TINY, subprocess_env, write_reward_file

from vispo.rewards import Limits, RewardError, RewardRunner
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


def test_bad_rewards_are_counted_and_never_fatal(tmp_path, shared, capfd, fault_table):
    mode_file = shared / "mode"  # readable by the worker's user
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


# --------------------------------------------------------------------------------------------
# Isolation: what a reward worker may not do (docs/reliability.md, "Reward isolation")
# --------------------------------------------------------------------------------------------

PROBE_SOURCE = """
import errno, os, socket, subprocess, time

SHARED = {shared!r}
SECRET = "VISPO_FAULT_SECRET"


def probe(completions, answers, **columns):
    out = []
    for c in completions:
        out.append(float(_one(c)))
    return out


def _one(c):
    if c == "env":  # the secret in our environment, or in the kernel's copy of it
        try:
            with open("/proc/self/environ", "rb") as f:
                in_proc = SECRET.encode() in f.read()
        except OSError:  # after the switch to an unprivileged user it is root's to read
            in_proc = False
        return SECRET in os.environ or in_proc
    if c == "env-listed":
        return os.environ.get("VISPO_FAULT_LISTED") == "passed"
    if c == "parent-env":  # the trainer's environment through /proc
        try:
            with open(f"/proc/{{os.getppid()}}/environ", "rb") as f:
                return SECRET.encode() in f.read()
        except OSError:
            return 0
    if c == "signal-trainer":  # signal 0: the permission check of kill(), nothing is sent
        try:
            os.kill(os.getppid(), 0)
            return 1
        except PermissionError:
            return 0
    if c == "network":  # the test listens on 127.0.0.1:PORT of the trainer's network
        port = int(open(os.path.join(SHARED, "port")).read())
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return 1
        except OSError:
            return 0
    if c == "write-outside":  # a folder of the trainer's user, not world-writable
        try:
            with open(os.path.join(SHARED, "owned", "pwned"), "w") as f:
                f.write("x")
            return 1
        except OSError:
            return 0
    if c == "write-cwd":
        with open("scratch.txt", "w") as f:
            f.write("ok")
        return os.getcwd() != SHARED and os.path.basename(os.getcwd()).startswith("vispo-reward-")
    if c == "big-file":  # 2 MiB against a 1 MiB limit
        try:
            with open("big.bin", "wb") as f:
                f.write(b"x" * (2 << 20))
            return 1
        except OSError:
            return 0
    if c == "memory":  # 1 GiB against a 512 MiB address-space limit
        try:
            block = bytearray(1 << 30)
            return len(block) > 0
        except MemoryError:
            return 0
    if c == "processes":  # how many children can it start (limit: 2 beyond its user's tasks)
        started = []
        try:
            for _ in range(8):
                started.append(subprocess.Popen(["sleep", "30"]))
        except OSError as e:  # the process limit stops it: what this probe counts
            assert e.errno in (errno.EAGAIN, errno.ENOMEM), e
        for p in started:
            p.kill()
            p.wait()
        return len(started)
    if c == "shell":
        return subprocess.run(["sh", "-c", "exit 7"]).returncode == 7
    if c == "orphan":  # a child that would outlive the call, then hang past the timeout
        child = subprocess.Popen(["sleep", "600"])
        with open(os.path.join(SHARED, "tmp", "orphan.pid"), "w") as f:
            f.write(str(child.pid))
        time.sleep(3600)
    if c == "cpu":  # burn CPU past the 1 s CPU-time limit (the wall timeout is longer)
        while True:
            pass
    return -1
"""


@pytest.fixture
def shared():
    """A folder the reward's unprivileged user may read (pytest's own tmp folders are 0700),
    holding ``owned`` (0755: not writable by that user) and ``tmp`` (world-writable)."""
    folder = Path(tempfile.mkdtemp(prefix="vispo-fault-"))
    (folder / "owned").mkdir()
    (folder / "tmp").mkdir()
    for p in (folder, folder / "owned"):
        os.chmod(p, 0o755)
    os.chmod(folder / "tmp", 0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead
        return f.read().split(") ")[1][0] != "Z"


def test_reward_worker_isolation(tmp_path, shared, monkeypatch, fault_table):
    """Each probe is an escape a reward could try; every one must be blocked or bounded."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    (shared / "port").write_text(str(server.getsockname()[1]))
    control = socket.create_connection(server.getsockname(), timeout=2)  # reachable from here
    control.close()
    (shared / "probe.py").write_text(PROBE_SOURCE.format(shared=str(shared)))
    monkeypatch.setenv("VISPO_FAULT_SECRET", "hunter2")
    monkeypatch.setenv("VISPO_FAULT_LISTED", "passed")
    limits = Limits(
        env=("VISPO_FAULT_LISTED",), memory_mb=512, cpu_s=1, file_size_mb=1, max_processes=2
    )
    # escape -> (value if blocked or bounded, value if it got through)
    expect = {
        "env": (0.0, 1.0),
        "env-listed": (1.0, 0.0),
        "parent-env": (0.0, 1.0),
        "signal-trainer": (0.0, 1.0),
        "network": (0.0, 1.0),
        "write-outside": (0.0, 1.0),
        "write-cwd": (1.0, 0.0),
        "big-file": (0.0, 1.0),
        "memory": (0.0, 1.0),
        "shell": (1.0, 0.0),  # allowed: shell commands run, as the unprivileged user
    }
    start = time.monotonic()
    runner = RewardRunner(
        f"{shared / 'probe.py'}:probe", num_workers=1, timeout_s=6.0, limits=limits
    )
    try:
        notes = list(runner.isolation_notes)
        got = dict(
            zip(
                expect,
                runner(
                    list(expect),
                    [""] * len(expect),
                ).total,
            )
        )
        n_started = runner(["processes"], [""]).total[0]
        pid = runner.worker_pids[0]
        before = dict(runner.errors)
        runner(["orphan"], [""])  # times out: the worker's whole process group is killed
        orphan = int((shared / "tmp" / "orphan.pid").read_text())
        orphan_alive = _alive(orphan)
        worker_alive = _alive(pid)
        timeouts = runner.errors["timeout"] - before.get("timeout", 0)
        runner(["cpu"], [""])  # RLIMIT_CPU kills the worker before the 6 s timeout
        after = {k: v - before.get(k, 0) for k, v in runner.errors.items()}
        scratch = list(shared.rglob("scratch.txt")) + list(tmp_path.rglob("scratch.txt"))
    finally:
        runner.close()
        server.close()
    elapsed = time.monotonic() - start
    held = {k: got[k] == v[0] for k, v in expect.items()}
    held["processes"] = n_started == 2  # RLIMIT_NPROC: 2 beyond its user's tasks
    held["orphan"] = not orphan_alive and not worker_alive and timeouts == 1
    held["cpu"] = after.get("crash") == 1 and after.get("timeout") == 1
    held["no-leftovers"] = not scratch and not (shared / "owned" / "pwned").exists()
    fault_table(
        "rewards",
        "isolation: env, /proc, signal, network, write, file size, memory, processes, orphans, CPU",
        len(held),
        sum(held.values()),
        lost="0",
        detail=f"refused by the OS: {notes or 'nothing'}; {elapsed:.1f} s",
    )
    # Where the OS refuses a protection (e.g. not root: no user switch), the runner must have
    # said so; every escape that got through must be one it reported.
    reported = {
        "parent-env": "runs as",
        "signal-trainer": "runs as",
        "write-outside": "runs as",
        "no-leftovers": "runs as",
        "network": "network not isolated",
        "processes": "process count not limited",
    }
    unexplained = [
        k for k, ok in held.items() if not ok and not any(reported.get(k, "?") in n for n in notes)
    ]
    assert unexplained == [], (unexplained, notes, got, n_started, after, orphan_alive)


HANG_AT_IMPORT = """
import os, time
with open({marker!r}, "w") as f:
    f.write(str(os.getpid()))
time.sleep(3600)

def reward(completions, answers, **columns):
    return [0.0] * len(completions)
"""


def test_reward_file_is_imported_only_in_the_worker_under_the_timeout(shared, fault_table):
    marker = shared / "tmp" / "imported-by"
    (shared / "hang.py").write_text(HANG_AT_IMPORT.format(marker=str(marker)))
    start = time.monotonic()
    with pytest.raises(RewardError, match=r"did not finish loading within 1 s") as info:
        RewardRunner(f"{shared / 'hang.py'}:reward", num_workers=1, timeout_s=1.0)
    elapsed = time.monotonic() - start
    importer = int(marker.read_text())
    held = importer != os.getpid() and elapsed < 10 and not _alive(importer)
    fault_table(
        "rewards",
        "reward file hangs at import (module-level time.sleep)",
        1,
        int(held),
        lost="run refused before any step",
        detail=f"RewardError after {elapsed:.1f} s: {str(info.value)[:60]}...",
    )
    assert held, (importer, os.getpid(), elapsed)


SPAWNS_A_CHILD = """
import os, subprocess


def reward(completions, answers, **columns):
    child = subprocess.Popen(["sleep", "600"])  # left running when the call returns
    with open(os.path.join({tmp!r}, f"child-{{child.pid}}"), "w"):
        pass
    return [0.0] * len(completions)
"""


def test_no_reward_process_outlives_the_trainer(shared, fault_table):
    """The trainer exits without closing the runner, or is killed with SIGKILL: no worker
    survives, nor any process a reward started (the worker's watchdog kills its group)."""
    (shared / "r.py").write_text(SPAWNS_A_CHILD.format(tmp=str(shared / "tmp")))
    outcomes = {}
    for how in ("exit", "kill"):
        script = (
            "import time\n"
            "from vispo.rewards import RewardRunner\n"
            f"r = RewardRunner({str(shared / 'r.py') + ':reward'!r}, num_workers=2)\n"
            "r(['a', 'b', 'c', 'd'], [''] * 4)\n"
            "print(*r.worker_pids, flush=True)\n" + ("time.sleep(600)\n" if how == "kill" else "")
        )
        trainer = subprocess.Popen(
            [PYTHON, "-c", script], stdout=subprocess.PIPE, text=True, env=subprocess_env()
        )
        pids = [int(p) for p in trainer.stdout.readline().split()]
        children = [int(p.name.split("-")[1]) for p in (shared / "tmp").glob("child-*")]
        for p in (shared / "tmp").glob("child-*"):
            p.unlink()
        if how == "kill":
            trainer.kill()
        trainer.wait(60)
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        workers_left = [p for p in pids if _alive(p)]
        children_left = [p for p in children if _alive(p)]
        for p in children_left:  # a failure: do not leave them running
            os.kill(p, 9)
        outcomes[how] = (len(pids), workers_left, len(children), children_left)
    exit_ok = outcomes["exit"][0] == 2 and outcomes["exit"][1:] == ([], outcomes["exit"][2], [])
    kill_ok = outcomes["kill"][0] == 2 and outcomes["kill"][1:] == ([], outcomes["kill"][2], [])
    fault_table(
        "rewards",
        "trainer exits without close() / is SIGKILLed: reward workers and their children",
        2,
        int(exit_ok) + int(kill_ok),
        lost=f"0 workers and 0 of {outcomes['exit'][2] + outcomes['kill'][2]} children left",
    )
    assert exit_ok and outcomes["exit"][2] >= 1, outcomes
    assert kill_ok, outcomes


ALWAYS_FAILS = """
def reward(completions, answers, **columns):
    raise KeyError("answer")
"""

ODD_FAILS = """
def reward(completions, answers, **columns):
    if any(len(c) % 2 for c in completions):
        raise ValueError("odd")
    return [1.0] * len(completions)
"""


def test_a_reward_that_always_fails_stops_the_run_with_one_line(tmp_path, capsys, fault_table):
    """Through ``vispo train``'s own function: exit 2, ``error: ...``, no traceback; a run with
    some reward errors finishes and its summary shows their count."""
    from vispo.train.run import run_training

    results = {}
    for name, source, extra in (
        ("always", ALWAYS_FAILS, ["reward.max_consecutive_failures=2", "train.steps=6"]),
        ("some", ODD_FAILS, ["train.steps=2"]),
    ):
        spec = write_reward_file(tmp_path / name, source, "reward")
        cfg = load_config(
            None,
            [
                "objective.name=grpo",
                *TINY,
                f"reward.name={spec}",
                "train.save_every=0",
                f"train.out_dir={tmp_path / name / 'run'}",
                *extra,
            ],
        )
        code = run_training(cfg)
        out = capsys.readouterr()
        results[name] = (code, out.out + out.err)
    code, text = results["always"]
    rows = read_metrics(tmp_path / "always" / "run")
    stopped = (
        code == 2
        and "error:" in text
        and "failed on every sample of 2 calls in a row" in text
        and "KeyError" in text
        and "Traceback" not in text
        and len(rows) <= 2
    )
    code2, text2 = results["some"]
    finished = code2 == 0 and "reward errors" in text2
    fault_table(
        "rewards",
        "reward fails on every call / on some calls (vispo train)",
        2,
        int(stopped) + int(finished),
        lost=f"stopped after {len(rows)} steps with exit {code}; summary counts the errors",
        detail=" ".join(text[text.find("error:") :].split())[:90],
    )
    assert stopped, text
    assert finished, text2


def test_a_reward_finite_in_float64_but_not_float32_is_an_error(fault_table):
    """1e39 is a finite float64 but inf as float32 (the trainer's reward tensors)."""
    runner = RewardRunner(
        float32_overflow, num_workers=0, weights={"a": 1.0, "b": 1.0}, max_consecutive_failures=0
    )
    result = runner(["big", "ok", "sum", "neg"], [""] * 4)
    counted = runner.errors == {"nan": 3}
    zeroed = result.total == [0.0, 1.0, 0.0, 0.0]
    fault_table(
        "rewards",
        "reward finite in float64, not in float32 (1e39, -3.5e38, a sum of 2 x 3e38)",
        3,
        3 if counted and zeroed else 0,
        lost="0 steps; 3 samples zeroed and counted",
    )
    assert counted and zeroed, (runner.errors, result.total)


def float32_overflow(completions, answers, **columns):
    values = {"big": 1e39, "ok": 1.0, "sum": {"a": 3e38, "b": 3e38}, "neg": -3.5e38}
    return [values[c] for c in completions]
