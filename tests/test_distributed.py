"""Two CPU ranks (gloo, torchrun) give the one-process update on the same global batch.

Each run is tests/dist_worker.py: PAPO-G on a tiny Qwen2-VL, 4 prompts x 3 rollouts per step,
batch-invariant rollouts (each prompt seeded on its own), so both layouts see the same samples.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("dist_worker.py")
COMPARED = [
    "loss/total",
    "loss/policy",
    "loss/ref_kl",
    "loss/perception_kl",
    "reward/mean",
    "perception/kl_mean",
    "grad_norm",
    "entropy/orig",
    "clip/high",
]


def free_port() -> int:
    """A port free right now (a fixed one per test process could still be held by the
    previous launch's store, e.g. right after an interrupted run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, *args: str, ranks: int = 1) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if ranks == 1:
        cmd = [sys.executable, str(WORKER), str(out), *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(ranks),
            "--master_port",
            str(free_port()),
            str(WORKER),
            str(out),
            *args,
        ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    _run(out)
    return json.loads((out / "history.json").read_text()), load_file(str(out / "final.safetensors"))


def _assert_same(history, weights, reference):
    ref_history, ref_weights = reference
    assert [m["step"] for m in history] == [m["step"] for m in ref_history][-len(history) :]
    for got, want in zip(history, ref_history[-len(history) :]):
        for key in COMPARED:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    assert set(weights) == set(ref_weights)
    for name, w in weights.items():
        # 5% of one AdamW step at lr 1e-3: Adam turns float noise in a near-zero gradient
        # into a visible weight difference (1.0e-5 on 2 of 8192 weights of one layer here).
        assert (w - ref_weights[name]).abs().max().item() < 5e-5, name


def test_ddp_two_ranks_equal_one_process(tmp_path, single):
    _run(tmp_path, "--strategy", "ddp", ranks=2)
    history = json.loads((tmp_path / "history.json").read_text())
    _assert_same(history, load_file(str(tmp_path / "final.safetensors")), single)


def test_fsdp2_two_ranks_train_resume_and_equal_one_process(tmp_path, single):
    _run(tmp_path, "--strategy", "fsdp2", "--interrupt-after", "1", ranks=2)
    ckpt = tmp_path / "run" / "checkpoints" / "step-000001"
    assert (ckpt / "state.json").is_file()
    assert {p.name for p in ckpt.glob("rng-rank*.json")} == {"rng-rank0.json", "rng-rank1.json"}
    _run(tmp_path, "--strategy", "fsdp2", "--resume", ranks=2)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [m["step"] for m in history] == [2]
    _assert_same(history, load_file(str(tmp_path / "final.safetensors")), single)
    logged = [
        json.loads(line)["step"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert logged == [1, 2]
