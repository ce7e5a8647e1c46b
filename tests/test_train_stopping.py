"""Signal handling of the train loop and the metrics.jsonl encoding, in-process and fast (the
full SIGTERM-then-resume test is tests/faults/test_faults_signals.py)."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from vispo.data import PromptSampler
from vispo.train.logging import MetricsLog, decode_value, encode_value, read_metrics
from vispo.train.stopping import (
    GracefulStop,
    StepAbandoned,
    kill_tree,
    process_tree,
    restore,
    snapshot,
)


def _signal_self(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.05)  # the handler runs at the next bytecode boundary of the main thread


def test_first_signal_outside_the_window_only_sets_the_flag():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert not stop.requested
        _signal_self(signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        with pytest.raises(StepAbandoned):  # a step that has not begun is not begun
            with stop.abandonable():
                pass
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored


def test_first_signal_inside_the_window_abandons_the_step():
    with GracefulStop() as stop:
        with pytest.raises(StepAbandoned):
            with stop.abandonable():
                _signal_self(signal.SIGINT)
                raise AssertionError("not reached")
        assert stop.signum == signal.SIGINT


def test_without_abandoning_the_window_runs_to_its_end():
    """Under torchrun (can_abandon=False) the step always finishes."""
    done = []
    with GracefulStop(can_abandon=False) as stop:
        with stop.abandonable():
            _signal_self(signal.SIGTERM)
            done.append(True)
    assert done and stop.requested


def test_snapshot_restores_data_order_and_every_rng():
    sampler = PromptSampler(10, 3, seed=0)
    next(sampler)
    snap = snapshot(sampler)
    expected = (next(sampler), random.random(), np.random.rand(), torch.rand(1))
    restore(sampler, snap)
    again = (next(sampler), random.random(), np.random.rand(), torch.rand(1))
    assert expected[0] == again[0] and expected[1:3] == again[1:3]
    assert torch.equal(expected[3], again[3])


def test_second_signal_exits_at_once_with_128_plus_signum(tmp_path):
    code = (
        "import os, signal, time\n"
        "from vispo.train.stopping import GracefulStop\n"
        "with GracefulStop(on_second=lambda s: print('on_second', s, flush=True)):\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    assert proc.poll() is None  # the first one only asks
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 128 + signal.SIGTERM
    assert f"on_second {int(signal.SIGTERM)}" in out
    assert "second SIGTERM: exiting now" in err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="process_tree reads /proc (Linux)")
def test_kill_tree_kills_descendants_and_spares_reused_pids():
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, time; subprocess.Popen(['sleep', '60']); "
            "print('up', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "up"
    tree = process_tree([child.pid])
    assert len(tree) == 2 and tree[0][0] == child.pid
    grandchild = tree[1][0]
    kill_tree([(pid, "not its start time") for pid, _ in tree])  # a pid reused: left alone
    assert child.poll() is None
    kill_tree(tree)
    assert child.wait(timeout=10) == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{grandchild}/stat") as f:
                gone = f.read().split(")")[-1].split()[0] == "Z"
        except OSError:
            gone = True
        if gone:
            break
        time.sleep(0.05)
    assert gone


def test_non_finite_metrics_are_strict_json_and_read_back_as_floats(tmp_path):
    log = MetricsLog(tmp_path)
    log.log(1, {"a": math.nan, "b": math.inf, "c": -math.inf, "d": np.float32(0.5), "e": 2})
    log.log(2, {"a": torch.tensor(float("nan")), "f": [1.0, math.inf], "g": "text"})
    log.close()
    log.close()  # idempotent
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"JSON constant {c}"))
    rows = read_metrics(tmp_path)
    assert math.isnan(rows[0]["a"]) and rows[0]["b"] == math.inf and rows[0]["c"] == -math.inf
    assert rows[0]["d"] == 0.5 and rows[0]["e"] == 2 and isinstance(rows[0]["e"], int)
    assert math.isnan(rows[1]["a"]) and rows[1]["g"] == "text"
    assert encode_value([1.0, math.inf]) == [1.0, "inf"]
    assert decode_value("inf") == math.inf and decode_value("nanx") == "nanx"
