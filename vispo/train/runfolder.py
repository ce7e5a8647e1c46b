"""A run folder belongs to one run: its lock, ``--overwrite``, and the record of resumes.

- **Lock.** A training takes ``train.out_dir/.vispo-run.lock`` with ``fcntl.flock`` and writes
  who holds it (pid, host, start time, command). A second training on the folder exits with a
  message naming the holder. The kernel drops the lock when its process dies, however it dies,
  so a stale lock file never blocks. Where the filesystem refuses ``flock`` (some network
  filesystems), the holder recorded in the file is checked instead: a dead process on this
  host no longer holds it. The lock is re-entrant within one process (several ``Trainer``
  objects of one process on one folder: a test that simulates a crash, a notebook).
- **A fresh run never reuses a folder.** A folder that holds checkpoints or metrics is refused
  unless ``--resume`` continues that run or ``--overwrite`` removes it first (checkpoints
  first, so an interrupted removal never leaves a run that ``--resume`` would take).
- **Resumes are recorded.** Each start with ``--resume`` appends a line to ``resumes.jsonl``:
  the checkpoint it resumed from, checkpoints set aside, and every config field that differs
  from the previous start (``config.json``), old and new value.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
from pathlib import Path

from vispo.train.checkpoint import CheckpointError, checkpoint_dirs

LOCK_NAME = ".vispo-run.lock"
RESUMES = "resumes.jsonl"
METRICS = "metrics.jsonl"


class RunFolderError(CheckpointError):
    """The run folder cannot be used as asked (in use, holds another run, nothing to resume);
    the message says why and what to do. (A CheckpointError, so every caller that reports
    checkpoint errors in one line reports these too.)"""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# --- the lock -------------------------------------------------------------------------------

_HELD: dict[str, list] = {}  # resolved folder -> [fd, holders in this process]


def _holder_text(raw: bytes) -> str:
    try:
        h = json.loads(raw.decode())
        return f"pid {h['pid']} on host {h['host']}, started {h['started']}" + (
            f": {h['command']}" if h.get("command") else ""
        )
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "a process that left no record"


def _read(fd: int) -> bytes:
    return os.pread(fd, 4096, 0)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """One holder's share of a run folder's lock; :meth:`release` is idempotent."""

    def __init__(self, key: str, path: Path):
        self.key, self.path, self.held = key, path, True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        entry = _HELD.get(self.key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        fd = entry[0]
        del _HELD[self.key]
        try:
            os.ftruncate(fd, 0)  # no holder on record
        finally:
            os.close(fd)  # closing the descriptor drops the flock


def lock_run_folder(out: str | Path) -> RunLock:
    """Take the run folder's lock (creating the folder), or raise RunFolderError naming the
    process that holds it."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunFolderError(f"train.out_dir {out} is a file, not a folder") from None
    except OSError as e:
        raise RunFolderError(f"train.out_dir {out}: cannot create it ({e.strerror})") from None
    if not out.is_dir():
        raise RunFolderError(f"train.out_dir {out} is not a folder")
    key = str(out.resolve())
    path = out / LOCK_NAME
    if key in _HELD:
        _HELD[key][1] += 1
        return RunLock(key, path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise RunFolderError(
            f"train.out_dir {out}: cannot write its lock file ({e.strerror})"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder_text(_read(fd))
        os.close(fd)
        raise RunFolderError(
            f"train.out_dir {out} is in use by another training ({holder}); wait for it to "
            "finish, or train into another train.out_dir"
        ) from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            os.close(fd)
            raise RunFolderError(f"train.out_dir {out}: cannot lock it ({e.strerror})") from None
        _check_recorded_holder(fd, out, path)
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": _now(),
        "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:300],
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)
    _HELD[key] = [fd, 1]
    return RunLock(key, path)


def _check_recorded_holder(fd: int, out: Path, path: Path) -> None:
    """No flock on this filesystem: the holder on record blocks only while it can be alive."""
    raw = _read(fd)
    try:
        h = json.loads(raw.decode()) if raw.strip() else None
    except (ValueError, UnicodeDecodeError):
        h = None
    if not isinstance(h, dict) or not isinstance(h.get("pid"), int):
        return
    if h.get("host") == socket.gethostname():
        if h["pid"] == os.getpid() or not _pid_alive(h["pid"]):
            return  # our own record, or a dead process's: stale
    os.close(fd)
    raise RunFolderError(
        f"train.out_dir {out} is in use by another training ({_holder_text(raw)}); this "
        f"filesystem has no file locks, so if that process is gone, delete {path}"
    )


# --- a folder that holds a run ---------------------------------------------------------------


def run_contents(out: str | Path) -> list[str]:
    """What of a run the folder holds (empty: nothing that a new run would clobber)."""
    out = Path(out)
    found = []
    root = out / "checkpoints"
    if root.is_dir():
        ckpts = [p for p in root.iterdir() if p.name.startswith("step-")]
        if ckpts:
            found.append(f"{len(ckpts)} checkpoint folder{'s' * (len(ckpts) != 1)}")
    metrics = out / METRICS
    if metrics.is_file() and metrics.stat().st_size > 0:
        last = last_logged_step(out)
        found.append(f"metrics.jsonl (steps up to {last})" if last > 0 else "metrics.jsonl")
    return found


def last_logged_step(out: str | Path) -> int:
    """The highest step in metrics.jsonl; 0 without records; -1 when it does not parse."""
    from vispo.train.logging import read_metrics

    try:
        steps = [r.get("step", 0) for r in read_metrics(out) if isinstance(r, dict)]
    except (ValueError, OSError):
        return -1
    return max([s for s in steps if isinstance(s, int)], default=0)


def refuse_reuse(out: str | Path) -> None:
    """A new (not resumed) run into ``out``: refuse if it holds another run."""
    held = run_contents(out)
    if held:
        raise RunFolderError(
            f"train.out_dir {out} already holds a run ({', '.join(held)}); continue it with "
            "--resume, train into another train.out_dir, or pass --overwrite to delete the old "
            "run first"
        )


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def clear_run_folder(out: str | Path) -> list[str]:
    """``--overwrite``: delete everything in the run folder but its lock (the caller holds it);
    returns the names removed. Checkpoints go first, renamed out of the way in one step, so an
    interrupted removal leaves no checkpoint that --resume would take."""
    out = Path(out)
    here = out.resolve()
    cwd = Path.cwd().resolve()
    if _inside(cwd, here) or here == Path.home().resolve() or here == Path(here.anchor):
        raise RunFolderError(
            f"--overwrite: train.out_dir {out} is the working directory, one of its parents, "
            "the home folder or the root; refusing to delete it"
        )
    entries = sorted(
        (p for p in out.iterdir() if p.name != LOCK_NAME), key=lambda p: p.name != "checkpoints"
    )
    trash = out / ".overwrite-trash"
    removed = []
    for p in entries:
        if p == trash:
            continue
        if p.is_dir() and not p.is_symlink():
            if trash.exists():
                shutil.rmtree(trash)
            os.replace(p, trash)
            shutil.rmtree(trash)
        else:
            p.unlink()
        removed.append(p.name)
    if trash.exists():
        shutil.rmtree(trash)
    return removed


# --- resumes ---------------------------------------------------------------------------------


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict) and (tree or not prefix):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(old: dict, new: dict) -> dict[str, list]:
    """Dotted fields whose value differs: ``{field: [old, new]}`` (a field only one side has
    counts, with ``None`` for the other). ``train.out_dir`` spelled differently but naming the
    same folder is not a change."""
    a, b = _flat(old), _flat(new)
    changes = {}
    for key in sorted(a.keys() | b.keys()):
        va, vb = a.get(key), b.get(key)
        if va == vb:
            continue
        if key == "train.out_dir" and isinstance(va, str) and isinstance(vb, str):
            if Path(va).resolve() == Path(vb).resolve():
                continue
        changes[key] = [va, vb]
    return changes


def previous_config(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe_changes(changes: dict[str, list] | None) -> str:
    if changes is None:
        return "the previous config.json is missing: changes unknown"
    if not changes:
        return "no config field changed"
    return "changed: " + "; ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in changes.items())


def record_resume(out: str | Path, entry: dict) -> None:
    """Append one resume to ``resumes.jsonl`` (flushed to disk)."""
    path = Path(out) / RESUMES
    with open(path, "a") as f:
        f.write(json.dumps({"time": _now(), **entry}, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_resumes(out: str | Path) -> list[dict]:
    path = Path(out) / RESUMES
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def keep_metrics(out: str | Path, tag: str, *, move: bool) -> Path | None:
    """Keep metrics.jsonl byte for byte as ``metrics.<tag>-<n>.jsonl`` (moved or copied);
    returns the new path, or None when there is no metrics.jsonl."""
    src = Path(out) / METRICS
    if not src.is_file():
        return None
    n = 1
    while (dst := src.with_name(f"metrics.{tag}-{n}.jsonl")).exists():
        n += 1
    if move:
        os.replace(src, dst)
    else:
        shutil.copy2(src, dst)
    return dst


def resolve_checkpoint(out: str | Path, named: str | int | Path) -> Path:
    """``--resume PATH``: a checkpoint folder, or a step number of this run's checkpoints."""
    text = str(named)
    if text.isdigit():
        found = [p for p in checkpoint_dirs(out) if int(p.name.split("-")[1]) == int(text)]
        if not found:
            steps = [int(p.name.split("-")[1]) for p in checkpoint_dirs(out)]
            raise RunFolderError(
                f"--resume {text}: {out} has no checkpoint of step {text} "
                f"(its checkpoints: {', '.join(map(str, steps)) or 'none'})"
            )
        return found[0]
    path = Path(text)
    if not (path / "state.json").is_file():
        raise RunFolderError(
            f"--resume {text}: not a complete checkpoint folder (no state.json); name a "
            "folder like RUN/checkpoints/step-000100, or a step number"
        )
    return path


def belongs_to(path: Path, out: str | Path) -> bool:
    """Whether checkpoint ``path`` is one of run folder ``out``'s checkpoints."""
    return path.resolve().parent == (Path(out) / "checkpoints").resolve()


# Reasons are printed one per line; keep them short.
def first_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def agree(dist, ok: bool) -> bool:
    """True on every rank iff ``ok`` on every rank (rank 0 decides about the folder)."""
    import torch

    return int(dist.all_reduce(torch.tensor([0 if ok else 1]))[0]) == 0
