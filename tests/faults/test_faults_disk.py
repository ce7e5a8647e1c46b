"""Full or read-only disk while a checkpoint (or the metrics log) is written.

Each fault hits one stage of ``save_checkpoint``: creating the ``.tmp`` folder, each tensor and
JSON file, ``state.json``, its fsync, the final rename. "Disk full" is real where it can be:
``RLIMIT_FSIZE`` makes the kernel refuse writes past a size (EFBIG, "File too large") half-way
through a file, exactly like a filling disk; read-only folders and ENOSPC on the small JSON
writes are simulated (the tests run as root, which ignores permission bits). Every time the
error must be a CheckpointError that names the cause and the previous checkpoint, which must
be byte-for-byte intact and loadable, with no ``.tmp`` left behind; once the disk is back the
next save works.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import re
import resource
import signal
import time

import pytest
from faultkit import (
    TINY,
    file_digests,
    parity_reward,
    start_training,
    unreadable_checkpoints,
    write_reward_file,
)

from vispo.rewards import RewardRunner
from vispo.train import checkpoint as ckpt_module
from vispo.train.checkpoint import CheckpointError, checkpoint_dirs, latest_checkpoint
from vispo.train.config import load_config
from vispo.train.logging import read_metrics
from vispo.train.trainer import Trainer

pytestmark = pytest.mark.faults


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Writes past ``nbytes`` in any file fail with EFBIG (a real, partial write) meanwhile."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def _oserror(code: int, path) -> OSError:
    return OSError(code, os.strerror(code), str(path))


def _trainer(tmp_path, *extra: str, resume: bool = False) -> Trainer:
    cfg = load_config(
        None,
        [
            "objective.name=grpo",
            *TINY,
            "train.steps=6",
            "train.save_every=0",
            "train.keep_last=2",
            f"train.out_dir={tmp_path / 'run'}",
            *extra,
        ],
    )
    return Trainer(cfg, resume=resume, reward_fn=RewardRunner(parity_reward, num_workers=0))


def test_checkpoint_write_faults_keep_the_previous_checkpoint(tmp_path, monkeypatch, fault_table):
    trainer = _trainer(tmp_path)
    trainer.step()
    trainer.step_count = 1
    first = trainer.save()
    before = file_digests(first)
    sizes = {p.name: p.stat().st_size for p in first.iterdir()}
    assert sizes["optimizer.safetensors"] > sizes["weights.safetensors"] + 4096

    real_mkdir, real_write_text = pathlib.Path.mkdir, pathlib.Path.write_text
    real_replace, real_open = os.replace, open

    def read_only_mkdir(self, *args, **kwargs):
        if self.name.endswith(".tmp"):
            raise _oserror(errno.EROFS, self)
        return real_mkdir(self, *args, **kwargs)

    def full_json(name):
        def write_text(self, data, *args, **kwargs):
            if self.name == name and self.parent.name.endswith(".tmp"):
                real_write_text(self, data[: len(data) // 2], *args, **kwargs)  # partial
                raise _oserror(errno.ENOSPC, self)
            return real_write_text(self, data, *args, **kwargs)

        return write_text

    def full_state_json(path, mode="r", *args, **kwargs):
        if pathlib.Path(path).name == "state.json" and "w" in mode:
            raise _oserror(errno.ENOSPC, path)
        return real_open(path, mode, *args, **kwargs)

    def failing_fsync(fd):
        raise _oserror(errno.EIO, f"fd {fd}")

    def read_only_rename(src, dst, *args, **kwargs):
        if str(src).endswith(".tmp"):
            raise _oserror(errno.EROFS, src)
        return real_replace(src, dst, *args, **kwargs)

    weights_size = sizes["weights.safetensors"]
    faults = {
        # name: (how to inject it, text the error must show)
        "read-only folder: .tmp cannot be created (EROFS)": (
            lambda: monkeypatch.setattr(pathlib.Path, "mkdir", read_only_mkdir),
            "Read-only file system",
        ),
        "disk full in weights.safetensors (real EFBIG at 64 KiB)": (
            lambda: file_size_limit(64 * 1024),
            "File too large",
        ),
        "disk full in optimizer.safetensors (real EFBIG)": (
            lambda: file_size_limit(weights_size + 4096),
            "File too large",
        ),
        "disk full in optimizer.json (ENOSPC, half written)": (
            lambda: monkeypatch.setattr(pathlib.Path, "write_text", full_json("optimizer.json")),
            "No space left on device",
        ),
        "disk full in rng-rank0.json (ENOSPC, half written)": (
            lambda: monkeypatch.setattr(pathlib.Path, "write_text", full_json("rng-rank0.json")),
            "No space left on device",
        ),
        "disk full in state.json (ENOSPC)": (
            lambda: monkeypatch.setattr(ckpt_module, "open", full_state_json, raising=False),
            "No space left on device",
        ),
        "fsync of state.json fails (EIO)": (
            lambda: monkeypatch.setattr(os, "fsync", failing_fsync),
            "Input/output error",
        ),
        "read-only at the final rename (EROFS)": (
            lambda: monkeypatch.setattr(os, "replace", read_only_rename),
            "Read-only file system",
        ),
    }
    held, failures = 0, {}
    for step, (name, (inject, cause)) in enumerate(faults.items(), start=2):
        trainer.step_count = step
        try:
            with contextlib.ExitStack() as stack:
                ctx = inject()
                if ctx is not None:
                    stack.enter_context(ctx)
                with pytest.raises(CheckpointError) as info:
                    trainer.save()
        finally:
            monkeypatch.undo()
        message = str(info.value)
        checks = {
            "names the cause": cause in message,
            "names the previous checkpoint": f"({first}) is intact" in message,
            "only the previous checkpoint": checkpoint_dirs(trainer.out) == [first],
            "previous bytes unchanged": file_digests(first) == before,
            "previous loads": not unreadable_checkpoints(trainer.out),
            "no .tmp left": not list((trainer.out / "checkpoints").glob("*.tmp")),
        }
        if all(checks.values()):
            held += 1
        else:
            failures[name] = {k: v for k, v in checks.items() if not v} | {"message": message}
    fault_table(
        "disk",
        "full / read-only disk during a checkpoint write",
        len(faults),
        held,
        lost="0 checkpoints" if not failures else f"{len(failures)} broken",
        detail="EROFS mkdir/rename, real EFBIG in 2 tensor files, ENOSPC in 3 JSON, EIO fsync",
    )
    assert not failures, failures

    # The disk is back: the next checkpoint is written and rotation works.
    trainer.step_count = 20
    assert trainer.save().name == "step-000020"
    assert [p.name for p in checkpoint_dirs(trainer.out)] == ["step-000001", "step-000020"]
    assert not unreadable_checkpoints(trainer.out)


def test_full_disk_while_logging_metrics_then_resume(tmp_path, fault_table):
    """A metrics.jsonl append cut short by a full disk: the run stops with the OS error, the
    torn line is dropped on --resume, and the steps after the checkpoint are redone."""
    trainer = _trainer(tmp_path, "train.steps=4", "train.save_every=2")
    log = trainer.out / "metrics.jsonl"
    real_log = trainer.metrics_log.log

    def log_then_fill(step, metrics):
        if step < 3:
            return real_log(step, metrics)
        with file_size_limit(log.stat().st_size + 40):  # the disk fills mid-line
            return real_log(step, metrics)

    trainer.metrics_log.log = log_then_fill
    with pytest.raises(OSError) as info:
        trainer.train()
    torn = log.read_text().splitlines()[-1]
    assert info.value.errno == errno.EFBIG
    assert len(torn) == 40 and torn.startswith('{"step": 3')  # a torn, partial record

    resumed = _trainer(tmp_path, "train.steps=4", "train.save_every=2", resume=True)
    assert resumed.step_count == 2
    resumed.train()
    steps = [r["step"] for r in read_metrics(trainer.out)]
    ok = steps == [1, 2, 3, 4] and not unreadable_checkpoints(trainer.out)
    fault_table(
        "disk",
        "full disk in a metrics.jsonl append, then --resume",
        1,
        int(ok),
        lost="1 step redone (after the step-2 checkpoint)",
        detail="torn last line dropped on resume",
    )
    assert steps == [1, 2, 3, 4]
    assert latest_checkpoint(trainer.out).name == "step-000004"


def test_cli_reports_a_full_disk_clearly_and_resumes(tmp_path, fault_table):
    """``vispo train`` as a process: the disk fills after the first checkpoint (real EFBIG);
    the run ends with a CheckpointError naming the cause and the intact checkpoint; once space
    is back, ``--resume`` continues from it and finishes."""
    reward = write_reward_file(tmp_path / "reward")
    out = tmp_path / "run"
    args = [
        "objective.name=grpo",
        *TINY,
        f"reward.name={reward}",
        "train.steps=3",
        "train.save_every=1",
        f"train.out_dir={out}",
    ]
    log1, log2 = tmp_path / "full.log", tmp_path / "resume.log"
    proc = start_training(args, tmp_path / "marks", log1, env={"VISPO_FAULT_FSIZE": "65536"})
    code = proc.wait(timeout=300)
    text = " ".join(log1.read_text().split())
    first = out / "checkpoints" / "step-000001"
    pattern = (
        # The CLI reports it as "error: ..." without a traceback (CheckpointError is expected).
        r"error: could not write checkpoint \S+step-000002: .*File too large.* "
        rf"The previous checkpoint \({re.escape(str(first))}\) is intact\."
    )
    clear = code != 0 and re.search(pattern, text) is not None
    intact = [p.name for p in checkpoint_dirs(out)] == ["step-000001"] and not (
        unreadable_checkpoints(out)
    )
    start = time.monotonic()
    proc = start_training(args + ["--resume"], tmp_path / "marks", log2)
    resumed = proc.wait(timeout=300) == 0
    resumed_text = " ".join(log2.read_text().split())
    fault_table(
        "disk",
        "vispo train: disk full after checkpoint 1 (real EFBIG), then --resume",
        1,
        int(clear and intact and resumed),
        lost="1 step redone",
        detail=f"exit code {code}; resumed run {time.monotonic() - start:.0f} s",
    )
    assert clear, text[-2000:]
    assert intact
    assert resumed, resumed_text[-2000:]
    assert f"resumed from {first} (step 1)" in resumed_text
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
