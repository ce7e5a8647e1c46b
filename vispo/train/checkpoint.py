"""Checkpoints: safetensors + JSON only (no pickle), written atomically, rotated.

A checkpoint folder ``step-000123/`` holds:
- ``weights.safetensors``: the policy's exact ``state_dict`` (``safetensors.torch.save_model``,
  loaded back strictly: transformers' ``save_pretrained`` renames some VLMs' keys, e.g.
  Qwen2-VL's language model, so its folder is not used for resuming; ``vispo export`` writes
  one);
- ``optimizer.safetensors`` + ``optimizer.json``: AdamW state tensors and the rest;
- ``rng.safetensors``: torch's RNG state;
- ``state.json``: step, Python and NumPy RNG states, data position, guard and schedule state.

Everything is written into ``step-000123.tmp/`` and renamed at the end, so an interrupted
write never leaves a half checkpoint under a valid name, and the previous one stays intact.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

_NAME = re.compile(r"^step-(\d{6,})$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which and why."""


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, state_meta = {}, {}
    for pid, pstate in sd["state"].items():
        meta = {}
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                meta[key] = value
        state_meta[str(pid)] = meta
    return tensors, {"param_groups": sd["param_groups"], "state": state_meta}


def _optimizer_from_files(tensors: dict, meta: dict) -> dict:
    state: dict = {int(pid): dict(m) for pid, m in meta["state"].items()}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict, dict]:
    """(JSON-able Python/NumPy global states, torch state tensors)."""
    py = random.getstate()
    return (
        {"python": [py[0], list(py[1]), py[2]], "numpy_global": _np_state(np.random.get_state())},
        {"torch": torch.get_rng_state()},
    )


def _np_state(state) -> list:
    return [state[0], state[1].tolist(), int(state[2]), int(state[3]), float(state[4])]


def set_rng_state(meta: dict, tensors: dict) -> None:
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    s = meta["numpy_global"]
    np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4]))
    torch.set_rng_state(tensors["torch"])


def save_checkpoint(
    run_dir: str | Path, step: int, *, model, optimizer, state: dict, keep_last: int
) -> Path:
    """Write checkpoint ``step`` atomically; keep the newest ``keep_last``. Returns its path."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f"step-{step:06d}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_model(model, str(tmp / "weights.safetensors"))
        opt_tensors, opt_meta = _optimizer_to_files(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        rng_meta, rng_tensors = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        # state.json last: its presence marks a complete checkpoint.
        payload = json.dumps({"step": step, "rng": rng_meta, **state})
        with open(tmp / "state.json", "w") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint {final}: {e.strerror or e}. The previous checkpoint "
            f"({latest_checkpoint(run_dir) or 'none'}) is intact."
        ) from e
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, *, model, optimizer) -> dict:
    """Restore weights, optimizer and RNG states in place; returns ``state.json``'s dict."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        missing, unexpected = load_model(model, str(path / "weights.safetensors"), strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: weights do not match the model (missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}): was it written by another model config?"
            )
        opt_state = _optimizer_from_files(
            load_file(str(path / "optimizer.safetensors")),
            json.loads((path / "optimizer.json").read_text()),
        )
        optimizer.load_state_dict(opt_state)
        set_rng_state(state["rng"], load_file(str(path / "rng.safetensors")))
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"could not read checkpoint {path}: {e}") from e
    return state
