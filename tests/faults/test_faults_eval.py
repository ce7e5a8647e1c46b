"""``vispo eval`` killed with SIGKILL part-way, then run again: identical results.

The evaluation (avg@2 and greedy, 16 questions in batches of 4, a parity reward so that the
scores are not all zero) runs through fault_entry.py and is killed three times at seeded
moments: twice while a batch is being generated, once in the middle of appending a batch to
results.jsonl (half its bytes written: a torn line). The final eval.json summary and every
stored answer must equal those of an uninterrupted evaluation.
"""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import pytest
from faultkit import start_training, write_reward_file

pytestmark = pytest.mark.faults

QUESTIONS, BATCH = 16, 4


def _args(out: Path, reward: str) -> list[str]:
    return [
        "tiny:qwen2_vl",
        "--benchmarks",
        "easy-vqa",
        "--limit",
        str(QUESTIONS),
        "--k",
        "2",
        "--batch-size",
        str(BATCH),
        "--max-new-tokens",
        "5",
        "--reward",
        reward,
        "--out",
        str(out),
        "--no-progress",
    ]


def _records(out: Path) -> dict:
    """The answers on file, by (mode, question); a question redone after a torn write keeps
    its last record."""
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {(r["sig"], r["id"], r["mode"]): r for r in rows}


def _summary(out: Path) -> dict:
    result = json.loads((out / "eval.json").read_text())
    return result["modes"]


def _complete_batches(path: Path) -> int:
    """Batches of the current run whose every answer is on file (a torn batch is redone)."""
    if not path.exists():
        return 0
    keys = set()
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        keys.add((rec["mode"], rec["id"], tuple(rec["batch"])))
    per_batch: dict = {}
    for mode, _, batch in keys:
        per_batch[(mode, batch)] = per_batch.get((mode, batch), 0) + 1
    return sum(1 for (_, (a, b)), n in per_batch.items() if n == b - a)


def test_eval_killed_three_times_then_resumed_gives_identical_results(tmp_path, fault_table):
    reward = write_reward_file(tmp_path / "reward")
    base = tmp_path / "baseline"
    proc = start_training(
        _args(base, reward), tmp_path / "marks", tmp_path / "base.log", command="eval"
    )
    assert proc.wait(timeout=300) == 0, (tmp_path / "base.log").read_text()[-2000:]

    rng = random.Random(7)
    out = tmp_path / "interrupted"
    results = out / "results.jsonl"
    batches = 2 * QUESTIONS // BATCH  # two modes
    kills = []
    for i, where in enumerate(["eval-gen", "eval-write", "eval-gen"]):
        left = batches - _complete_batches(results)
        at = rng.randint(2 if i == 0 else 1, left)  # the first kill leaves something on file
        log = tmp_path / f"kill{i}.log"
        proc = start_training(
            _args(out, reward), tmp_path / "marks", log, hold=where, at=at, command="eval"
        )
        deadline = time.monotonic() + 120
        while "HOLD" not in (tmp_path / "marks").read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        text = results.read_text() if results.exists() else ""
        kills.append(
            {
                "where": where,
                "lines": text.count("\n"),
                "torn": bool(text) and not text.endswith("\n"),
                "complete_batches": _complete_batches(results),
            }
        )
    log = tmp_path / "final.log"
    proc = start_training(_args(out, reward), tmp_path / "marks", log, command="eval")
    finished = proc.wait(timeout=300) == 0
    same_summary = finished and _summary(out) == _summary(base)
    same_records = finished and _records(out) == _records(base)
    fault_table(
        "eval",
        "vispo eval killed (-9) mid-batch / mid-write, rerun resumes",
        len(kills),
        len(kills) if same_summary and same_records else 0,
        lost="0 (finished batches reused, the interrupted one redone)",
        detail="batches on file at the kills: "
        + ", ".join(f"{k['complete_batches']}/{batches}" for k in kills)
        + f"; torn last line: {sum(k['torn'] for k in kills)}",
    )
    assert finished, log.read_text()[-2000:]
    assert [k["where"] for k in kills] == ["eval-gen", "eval-write", "eval-gen"]
    assert kills[1]["torn"], kills  # the kill inside the write left half a batch
    assert all(0 < k["complete_batches"] < batches for k in kills), kills
    assert same_summary
    assert same_records
    scores = [r["correct"] for r in _records(base).values()]
    assert 0 < sum(map(sum, scores)) < sum(map(len, scores))  # not all 0 or all 1
