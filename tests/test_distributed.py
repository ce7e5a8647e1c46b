"""Two CPU ranks (gloo, torchrun) give the one-process update on the same global batch.

Each run is tests/dist_worker.py: a preset (PAPO-G, CPPO, DAPO) on a tiny Qwen2-VL, 4 prompts x
3 rollouts per step, batch-invariant rollouts (each prompt seeded on its own), so both layouts
see the same samples. DAPO runs with a scripted reward that makes its dynamic sampling keep
groups across rounds and ranks (dist_worker.ScriptedReward).
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
COMMON = ["loss/total", "loss/policy", "reward/mean", "grad_norm", "entropy/orig", "clip/high"]
# PAPO-G's (test_deepspeed.py compares the same ones).
COMPARED = COMMON + ["loss/ref_kl", "loss/perception_kl", "perception/kl_mean"]
PRESET_COMPARED = {
    "papo_g": COMPARED,
    "cppo": COMMON + ["loss/ref_kl", "loss/cpl", "perception/selected_frac"],
    "dapo": COMMON
    + ["dynamic_sampling/rounds", "dynamic_sampling/kept_frac", "dynamic_sampling/groups_short"],
    # REINFORCE++ whitens over the whole batch: each rank must see the other's rewards.
    "reinforce_pp": COMMON,
}
ARGS = {
    "papo_g": [],
    "cppo": ["--preset", "cppo"],
    "dapo": ["--preset", "dapo", "--reward", "scripted"],
    "reinforce_pp": ["--override", "objective.advantage=reinforce_pp"],
}


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
def single_runs(tmp_path_factory):
    """The one-process run of each preset (run once, on first use)."""
    runs = {}

    def get(preset):
        if preset not in runs:
            out = tmp_path_factory.mktemp(f"single-{preset}")
            _run(out, *ARGS[preset])
            runs[preset] = (
                json.loads((out / "history.json").read_text()),
                load_file(str(out / "final.safetensors")),
                json.loads((out / "trained-rank0.json").read_text()),
            )
        return runs[preset]

    return get


@pytest.fixture()
def single(single_runs):
    return single_runs("papo_g")


def _assert_same(history, weights, reference, preset="papo_g"):
    ref_history, ref_weights = reference[:2]
    assert [m["step"] for m in history] == [m["step"] for m in ref_history][-len(history) :]
    for got, want in zip(history, ref_history[-len(history) :]):
        for key in PRESET_COMPARED[preset]:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    assert set(weights) == set(ref_weights)
    for name, w in weights.items():
        # 5% of one AdamW step at lr 1e-3: Adam turns float noise in a near-zero gradient
        # into a visible weight difference (1.0e-5 on 2 of 8192 weights of one layer here).
        assert (w - ref_weights[name]).abs().max().item() < 5e-5, name


@pytest.mark.parametrize("preset", list(PRESET_COMPARED))
def test_ddp_two_ranks_equal_one_process(tmp_path, single_runs, preset):
    reference = single_runs(preset)
    _run(tmp_path, "--strategy", "ddp", *ARGS[preset], ranks=2)
    history = json.loads((tmp_path / "history.json").read_text())
    _assert_same(history, load_file(str(tmp_path / "final.safetensors")), reference, preset)
    # The two ranks trained on the one-process batch, rank 0 on its first half.
    ranks = [json.loads((tmp_path / f"trained-rank{r}.json").read_text()) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == reference[2]
    if preset == "dapo":
        # Step 1 (step index 0): round 1 keeps positions 0, 2, 3 and round 2 its position 1;
        # each rank trains on one group the other rolled out (positions 0-1: rank 0).
        assert ranks[0][0] == [[0, 1, 0], [0, 1, 2]]
        assert ranks[1][0] == [[0, 1, 3], [0, 2, 1]]
        assert all(m["dynamic_sampling/rounds"] == 2 for m in history)
        assert all(m["dynamic_sampling/groups_short"] == 0 for m in history)


def test_fsdp2_two_ranks_train_resume_and_equal_one_process(tmp_path, single):
    _run(tmp_path, "--strategy", "fsdp2", "--interrupt-after", "1", ranks=2)
    ckpt = tmp_path / "run" / "checkpoints" / "step-000001"
    assert (ckpt / "state.json").is_file()
    assert {p.name for p in ckpt.glob("rng-rank*.json")} == {"rng-rank0.json", "rng-rank1.json"}
    _run(tmp_path, "--strategy", "fsdp2", "--resume", ranks=2)
    # train.shared_prefix=auto runs the shared-prefix forward under FSDP2 (on both ranks),
    # and the run still equals the one-process run.
    for r in (0, 1):
        assert json.loads((tmp_path / f"shared-prefix-rank{r}.json").read_text()) is True
    history = json.loads((tmp_path / "history.json").read_text())
    assert [m["step"] for m in history] == [2]
    _assert_same(history, load_file(str(tmp_path / "final.safetensors")), single)
    logged = [
        json.loads(line)["step"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert logged == [1, 2]
