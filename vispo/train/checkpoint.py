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
- ``state.json``: step, data position, guard and update counters, and the sha256 of every
  other file of the folder (``files``) plus one of its own content (``checksum``).

A checkpoint is good or is not used: non-finite weights or optimizer state are never written;
:func:`load_checkpoint` first checks every file against its recorded sha256 (and the weights
for NaN/inf) and raises :class:`CheckpointCorrupt` before touching the model; the trainer then
resumes from the newest checkpoint that passes (:func:`good_checkpoint`). Runs that train LoRA
adapters store only the trainable weights (``state.json``: ``"weights": "trainable"``); the
frozen base weights come from the model the run's config names.

Everything is written into ``step-000123.tmp/`` and renamed at the end (``state.json`` last), so
an interrupted write never leaves a half checkpoint under a valid name and the previous
checkpoint stays intact.
"""

from __future__ import annotations

import hashlib
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


class CheckpointCorrupt(CheckpointError):
    """A checkpoint's files do not match their recorded sha256, do not parse, or hold NaN/inf
    weights; nothing was loaded from it."""


def checkpoint_step(path: str | Path) -> int:
    """The step of a checkpoint folder named ``step-000123``."""
    m = _NAME.match(Path(path).name)
    if m is None:
        raise CheckpointError(f"{path} is not a checkpoint folder (step-NNNNNN)")
    return int(m.group(1))


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):  # 16 MiB at a time: big weight files never in memory
            h.update(chunk)
    return h.hexdigest()


def _state_checksum(state: dict) -> str:
    """sha256 of ``state.json``'s content without its own ``checksum`` field."""
    body = {k: v for k, v in state.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _first_non_finite(named: dict[str, torch.Tensor]) -> str | None:
    """Name of the first floating tensor holding NaN or inf, else None."""
    for name, t in named.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def is_adapter_model(model) -> bool:
    """A PEFT (LoRA) model: its checkpoints hold only the trainable weights."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


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
    # LoRA: the frozen base weights are the model's own; store the adapters only. (Under
    # DeepSpeed ZeRO the full weights are kept: its loader sets every partition.)
    kind = "trainable" if is_adapter_model(model) and not ds.uses_zero(optimizer) else "full"
    if kind == "trainable":
        keep = trainable_names(model)
        weights = {k: v for k, v in weights.items() if k in keep}
    error: Exception | None = None
    non_finite = None
    if d.main:
        bad = _first_non_finite(weights)
        opt_bad = _first_non_finite(
            {f"{p}{_SEP}{k}": v for p, st in optim["state"].items() for k, v in st.items()}
        )
        if bad is not None or opt_bad is not None:
            what = f"weight {bad!r}" if bad is not None else f"optimizer state {opt_bad!r}"
            non_finite = f"{what} holds NaN or inf"
    try:
        if d.main and non_finite is None:
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
    if _agree(d, error is None and non_finite is None):
        try:
            rng_meta, rng_tensors = _rng_files()
            save_file(rng_tensors, str(tmp / f"rng-rank{d.rank}.safetensors"))
            (tmp / f"rng-rank{d.rank}.json").write_text(json.dumps(rng_meta))
        except _WRITE_ERRORS as e:
            error = e
    if _agree(d, error is None and non_finite is None) and d.main:
        try:
            # state.json last: its presence marks a complete checkpoint. It records the sha256
            # of every other file (read back from disk) and of its own content.
            files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            record = {
                "step": step,
                "world_size": d.world,
                **state,
                "weights": kind,
                "files": files,
            }
            record["checksum"] = _state_checksum(record)
            with open(tmp / "state.json", "w") as f:
                f.write(json.dumps(record))
                f.flush()
                os.fsync(f.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except _WRITE_ERRORS as e:
            error = e
    ok = _agree(d, error is None and non_finite is None)
    if not ok:
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
        if non_finite is not None:
            raise CheckpointError(
                f"refused to write checkpoint {final}: {non_finite}. The last good checkpoint "
                f"({latest_checkpoint(run_dir) or 'none'}) is kept."
            )
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
        # Rotation deletes only checkpoints older than the one just written and verified (its
        # files hashed from disk, its tensors finite): never that one, never a newer folder.
        older = [p for p in checkpoint_dirs(run_dir) if checkpoint_step(p) < step]
        for old in older[: max(0, len(older) - (keep_last - 1))]:
            # state.json first: a deletion cut short leaves an incomplete folder that no
            # reader takes for a checkpoint, never a "complete" one with files missing.
            (old / "state.json").unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)
    d.barrier()
    return final


def _corrupt(path: Path, why: str) -> CheckpointCorrupt:
    return CheckpointCorrupt(f"checkpoint {path} is corrupt: {why}")


def verify_checkpoint(path: str | Path) -> dict:
    """``state.json`` of a checkpoint whose files all match their recorded sha256.

    Raises :class:`CheckpointCorrupt` naming the first file that is missing or whose bytes
    changed since it was written. (Checkpoints written before checksums existed have no
    ``files`` record: only their ``state.json`` is checked to parse.)
    """
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"state.json is unreadable ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise _corrupt(path, "state.json has no step")
    if "checksum" in state and state["checksum"] != _state_checksum(state):
        raise _corrupt(path, "state.json does not match its recorded sha256")
    files = state.get("files", {})
    if not isinstance(files, dict):
        raise _corrupt(path, "state.json's file list is not a mapping")
    for name, digest in files.items():
        target = path / name
        if "/" in name or name.startswith(".") or not target.is_file():
            raise _corrupt(path, f"{name} is missing")
        if _sha256(target) != digest:
            raise _corrupt(
                path, f"{name} does not match its recorded sha256 (its bytes changed on disk)"
            )
    return state


def _read_checked(path: Path, *, verify: bool) -> tuple[dict, dict]:
    """``(weights, state)``: files checked against their sha256 (``verify``), every floating
    weight finite; ``state["weights"]`` is ``"trainable"`` (LoRA adapters only) or ``"full"``."""
    state = verify_checkpoint(path) if verify else json.loads((path / "state.json").read_text())
    try:
        weights = load_file(str(path / "weights.safetensors"))
    except (OSError, SafetensorError) as e:
        raise _corrupt(path, f"weights.safetensors does not load ({e})") from e
    bad = _first_non_finite(weights)
    if bad is not None:
        raise _corrupt(path, f"weight {bad!r} holds NaN or inf")
    state.setdefault("weights", "full")
    return weights, state


def read_weights(path: str | Path, *, verify: bool = True) -> dict[str, torch.Tensor]:
    """The policy weights of checkpoint folder ``path`` (what ``vispo export`` and ``vispo
    eval`` load), checked: every file against its recorded sha256 and every weight finite.
    Raises :class:`CheckpointCorrupt` (a :class:`CheckpointError`) naming the folder and the
    file when they fail. A LoRA run's checkpoint holds only the trainable weights."""
    return _read_checked(Path(path), verify=verify)[0]


def _check_keys(path: Path, model, weights: dict, kind: str) -> None:
    """A trainable-only checkpoint must hold exactly the model's trainable weights."""
    if kind != "trainable":
        return
    expected = trainable_names(model)
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: adapter weights do not match the model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); was it written by another model config?"
        )


def load_model_weights(path: str | Path, model, *, verify: bool = True) -> dict:
    """Load a checkpoint's weights into a plain (single-process) model, checked as in
    :func:`read_weights`: strictly for full checkpoints, and for trainable-only (LoRA) ones
    exactly the trainable weights over the model's own base weights. Returns ``state.json``.
    For ``vispo export`` / ``vispo eval``."""
    path = Path(path)
    weights, state = _read_checked(path, verify=verify)
    _check_keys(path, model, weights, state["weights"])
    try:
        model.load_state_dict(weights, strict=state["weights"] == "full")
    except RuntimeError as e:
        raise CheckpointError(
            f"{path}: weights do not match the model ({e}); was it written by another model config?"
        ) from None
    return state


def load_checkpoint(
    path: str | Path, *, model, optimizer, dist: Dist | None = None, verify: bool = True
) -> dict:
    """Restore weights, optimizer and this rank's RNG states in place; returns ``state.json``.

    Every file is checked against its recorded sha256 (``verify``) and the weights for NaN/inf
    before anything is loaded: a failed check raises :class:`CheckpointCorrupt` with the model
    untouched. Every rank checks the same files, so all ranks reach the same verdict.
    """
    d = dist or Dist()
    path = Path(path)
    weights, state = _read_checked(path, verify=verify)
    try:
        zero = ds.uses_zero(optimizer)  # DeepSpeed ZeRO: each rank keeps its partitions
        _check_keys(path, model, weights, state["weights"])
        if zero and state["weights"] != "full":
            raise CheckpointError(f"{path}: holds adapter weights only; DeepSpeed needs full ones")
        try:
            if zero:
                ds.set_full_weights(model, optimizer, weights)
            else:
                set_model_state_dict(
                    model,
                    weights,
                    options=StateDictOptions(
                        full_state_dict=True, strict=state["weights"] == "full"
                    ),
                )
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


def set_aside(path: Path, suffix: str) -> Path:
    """Rename a checkpoint folder to ``step-NNNNNN.<suffix>`` (a name no reader, resume or
    rotation takes for a checkpoint), keeping its files for inspection."""
    target = path.with_name(f"{path.name}.{suffix}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{suffix}-{n}")
    os.replace(path, target)
    return target
