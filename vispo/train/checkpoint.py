"""Checkpoints: safetensors + JSON only (no pickle), written atomically, rotated.

A checkpoint folder ``step-000123/`` holds:
- ``weights.safetensors``: the policy's full ``state_dict`` (gathered from the shards under
  FSDP2 by ``torch.distributed.checkpoint.state_dict``, from the partitions under DeepSpeed
  ZeRO by :func:`vispo.train.deepspeed.full_state`), with the module's own parameter
  names, loaded back strictly. (transformers' ``save_pretrained`` renames some VLMs' keys,
  e.g. Qwen2-VL's language model, so it is not used for resuming; ``vispo export`` writes a
  Hugging Face folder.)
- ``optimizer.safetensors`` + ``optimizer.json``: the full AdamW state, keyed by parameter name;
- ``rng-rank{r}.safetensors`` + ``rng-rank{r}.json``: each rank's torch, Python, NumPy RNG states;
- ``state.json``: step, data position, guard and update counters.

Everything is written into ``step-000123.tmp/`` and renamed at the end (``state.json`` last), so
an interrupted write never leaves a half checkpoint under a valid name and the previous
checkpoint stays intact.
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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from vispo.train import deepspeed as ds
from vispo.train.dist import Dist

_NAME = re.compile(r"^step-(\d{6,})$")
_SEP = "::"  # parameter name / state key separator in optimizer.safetensors
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
# safetensors reports I/O failures (disk full, file too large, read-only) and corrupt files as
# its own SafetensorError, which is not an OSError.
_WRITE_ERRORS = (OSError, SafetensorError)


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


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous copies where tensors share storage (tied embeddings): safetensors refuses
    shared tensors."""
    seen, out = set(), {}
    for name, t in tensors.items():
        t = t.detach().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[name] = t.clone() if key in seen else t
        seen.add(key)
    return out


def _optimizer_files(osd: dict) -> tuple[dict, dict]:
    tensors, meta = {}, {}
    for pname, pstate in osd["state"].items():
        meta[pname] = {}
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pname}{_SEP}{key}"] = value.detach().cpu().contiguous()
            else:
                meta[pname][key] = value
    return tensors, {"param_groups": osd["param_groups"], "state": meta}


def _optimizer_state(tensors: dict, meta: dict) -> dict:
    state = {p: dict(m) for p, m in meta["state"].items()}
    for name, value in tensors.items():
        pname, key = name.rsplit(_SEP, 1)
        state.setdefault(pname, {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_files() -> tuple[dict, dict]:
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [
            np_state[0],
            np_state[1].tolist(),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return meta, tensors


def _set_rng(meta: dict, tensors: dict) -> None:
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    s = meta["numpy"]
    np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4]))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def _agree(d: Dist, ok: bool) -> bool:
    """True on every rank iff ``ok`` on every rank (so no rank waits on a failed one)."""
    return int(d.all_reduce(torch.tensor([0 if ok else 1]))[0]) == 0


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model,
    optimizer,
    state: dict,
    keep_last: int,
    dist: Dist | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically; keep the newest ``keep_last``. Returns its path.

    Collective under torch.distributed: every rank must call it.
    """
    d = dist or Dist()
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step-{step:06d}", root / f"step-{step:06d}.tmp"
    if ds.uses_zero(optimizer):  # DeepSpeed ZeRO: gathered from the partitions, same format
        weights, optim = ds.full_state(model, optimizer)
    else:
        weights = get_model_state_dict(model, options=_FULL)
        optim = get_optimizer_state_dict(model, optimizer, options=_FULL)
    error: Exception | None = None
    try:
        if d.main:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            save_file(_unshared(weights), str(tmp / "weights.safetensors"))
            opt_tensors, opt_meta = _optimizer_files(optim)
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
    except _WRITE_ERRORS as e:
        error = e
    if _agree(d, error is None):
        try:
            rng_meta, rng_tensors = _rng_files()
            save_file(rng_tensors, str(tmp / f"rng-rank{d.rank}.safetensors"))
            (tmp / f"rng-rank{d.rank}.json").write_text(json.dumps(rng_meta))
        except _WRITE_ERRORS as e:
            error = e
    if _agree(d, error is None) and d.main:
        try:
            # state.json last: its presence marks a complete checkpoint.
            with open(tmp / "state.json", "w") as f:
                f.write(json.dumps({"step": step, "world_size": d.world, **state}))
                f.flush()
                os.fsync(f.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except _WRITE_ERRORS as e:
            error = e
    ok = _agree(d, error is None)
    if not ok:
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
        cause = (
            f"{getattr(error, 'strerror', None) or error}"
            if error is not None
            else "another rank failed"
        )
        raise CheckpointError(
            f"could not write checkpoint {final}: {cause}. The previous checkpoint "
            f"({latest_checkpoint(run_dir) or 'none'}) is intact."
        ) from error
    if d.main:
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            # state.json first: a deletion cut short leaves an incomplete folder that no
            # reader takes for a checkpoint, never a "complete" one with files missing.
            (old / "state.json").unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)
    d.barrier()
    return final


def load_checkpoint(path: str | Path, *, model, optimizer, dist: Dist | None = None) -> dict:
    """Restore weights, optimizer and this rank's RNG states in place; returns ``state.json``."""
    d = dist or Dist()
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        weights = load_file(str(path / "weights.safetensors"))
        zero = ds.uses_zero(optimizer)  # DeepSpeed ZeRO: each rank keeps its partitions
        try:
            if zero:
                ds.set_full_weights(model, optimizer, weights)
            else:
                set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
        except RuntimeError as e:
            raise CheckpointError(
                f"{path}: weights do not match the model ({e}); was it written by another "
                "model config?"
            ) from e
        osd = _optimizer_state(
            load_file(str(path / "optimizer.safetensors")),
            json.loads((path / "optimizer.json").read_text()),
        )
        if zero:
            ds.set_full_optimizer_state(model, optimizer, osd)
        else:
            set_optimizer_state_dict(
                model, optimizer, osd, options=StateDictOptions(full_state_dict=True)
            )
        rank_file = path / f"rng-rank{d.rank}.json"
        if state.get("world_size", 1) == d.world and rank_file.exists():
            _set_rng(
                json.loads(rank_file.read_text()),
                load_file(str(path / f"rng-rank{d.rank}.safetensors")),
            )
    except (OSError, SafetensorError, json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"could not read checkpoint {path}: {e}") from e
    return state


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The policy weights of checkpoint folder ``path`` (what ``vispo export`` and ``vispo
    eval`` load); raises :class:`CheckpointError` naming the folder when they cannot be read."""
    path = Path(path)
    try:
        return load_file(str(path / "weights.safetensors"))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"could not read checkpoint {path}: {e}") from e
