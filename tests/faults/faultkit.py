"""Helpers shared by the fault-injection tests: tiny run settings, reward files, comparisons."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

#: A run that takes about 0.1 s per step on one CPU thread: random tiny Qwen2-VL, easy-vqa.
TINY = [
    "model.name_or_path=tiny:qwen2_vl",
    "data.limit=24",
    "data.eval_size=0",
    "train.prompts_per_step=2",
    "rollout.n=3",
    "rollout.max_new_tokens=5",
    "logging.progress=false",
    "optim.lr=1e-3",
    "train.samples_every=0",
    "train.threads=1",
]

PARITY_REWARD = '''
def parity(completions, answers, **columns):
    """Deterministic and mixed within groups: 1 for an even number of characters."""
    return [float(len(c) % 2 == 0) for c in completions]
'''


def parity_reward(completions, answers, **columns):
    """In-process twin of PARITY_REWARD."""
    return [float(len(c) % 2 == 0) for c in completions]


def write_reward_file(folder: Path, source: str = PARITY_REWARD, name: str = "parity") -> str:
    """Write a reward file and return its ``path.py:function`` spec."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fault_reward.py"
    path.write_text(source)
    return f"{path}:{name}"


def subprocess_env() -> dict[str, str]:
    """Environment of child processes: one thread, offline, vispo importable."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        COLUMNS="400",  # rich would otherwise wrap long paths in the logs we search
    )
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


PYTHON = sys.executable


def comparable(row: dict) -> dict:
    """A metrics.jsonl row without wall-clock dependent values."""
    return {k: v for k, v in row.items() if not k.startswith(("time/", "throughput/"))}


def max_metric_diff(a: list[dict], b: list[dict]) -> float:
    """Largest absolute difference between two runs' comparable metrics (inf on a mismatch of
    steps, keys or non-numeric values)."""
    if [r["step"] for r in a] != [r["step"] for r in b]:
        return math.inf
    worst = 0.0
    for ra, rb in zip(a, b):
        ca, cb = comparable(ra), comparable(rb)
        if ca.keys() != cb.keys():
            return math.inf
        for k, va in ca.items():
            vb = cb[k]
            if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
                if math.isnan(va) and math.isnan(vb):
                    continue
                worst = max(worst, abs(va - vb))
            elif va != vb:
                return math.inf
    return worst


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


ENTRY = Path(__file__).with_name("fault_entry.py")


def start_training(
    args: list[str],
    marks: Path,
    log: Path,
    *,
    hold: str | None = None,
    at: int = 0,
    env: dict[str, str] | None = None,
    command: str = "train",
):
    """Start ``vispo <command> <args>`` through fault_entry.py (phase marks in ``marks``, output
    in ``log``); ``hold``/``at``: the phase occurrence where it waits to be killed."""
    import subprocess

    full_env = subprocess_env()
    full_env["VISPO_FAULT_MARKS"] = str(marks)
    if hold is not None:
        full_env["VISPO_FAULT_HOLD"], full_env["VISPO_FAULT_HOLD_AT"] = hold, str(at)
    full_env.update(env or {})
    marks.write_text("")
    with open(log, "w") as f:
        return subprocess.Popen(
            [PYTHON, str(ENTRY), command, *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=full_env,
        )


def unreadable_checkpoints(run: Path) -> list[str]:
    """Complete-looking checkpoints of a tiny:qwen2_vl run that fail to load into a fresh model
    and optimizer (with the message); [] when every one loads."""
    from vispo.models import build_tiny_vlm
    from vispo.train.checkpoint import CheckpointError, checkpoint_dirs, load_checkpoint
    from vispo.train.optim import build_optimizer

    bad = []
    for path in checkpoint_dirs(run):
        model, _ = build_tiny_vlm("qwen2_vl")
        opt = build_optimizer(model, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999))
        try:
            state = load_checkpoint(path, model=model, optimizer=opt)
            if state["step"] != int(path.name.split("-")[1]):
                raise ValueError(f"state.json says step {state['step']}")
        except (CheckpointError, ValueError, RuntimeError) as e:
            bad.append(f"{path.name}: {e}")
    return bad


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> hex digest)."""
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
