"""Test-only entry point of the fault suite: the ``vispo`` CLI, reporting which phase it is in.

``python fault_entry.py train|eval <arguments>`` runs ``vispo.cli.main`` after patching, in this
process only (the product is untouched), a few functions so that entering a phase appends one
line ``<phase> <count> <detail>`` to the file named by ``$VISPO_FAULT_MARKS``:

===========  ==================================================================================
phase        when
===========  ==================================================================================
rollout      ``generate`` is about to sample the step's responses
reward       the reward runner is about to score them
update       ``ppo_update`` starts (scoring is done, no optimizer step yet)
log          the step's metrics are about to be appended to metrics.jsonl
ckpt-file    one file of a checkpoint has been written into its ``.tmp`` folder
ckpt-commit  the complete ``.tmp`` folder is about to be renamed to its final name
rotate       the first file of an old checkpoint has been deleted (rotation in progress)
eval-gen     ``vispo eval`` is about to generate the answers of a batch
eval-write   half of a batch's lines are in results.jsonl, the rest not yet (a torn write)
===========  ==================================================================================

With ``$VISPO_FAULT_HOLD=<phase>`` and ``$VISPO_FAULT_HOLD_AT=<n>``, the n-th entry into that
phase writes ``HOLD`` and then sleeps, so that the test's SIGKILL lands exactly there.

With ``$VISPO_FAULT_FSIZE=<bytes>``, once the first checkpoint is renamed into place the process
may no longer write files larger than that (``RLIMIT_FSIZE``: writes past it fail with EFBIG,
"File too large"), a real, OS-level stand-in for a disk that fills up during the run.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import sys
import time
from collections import Counter
from pathlib import Path

MARKS = os.environ["VISPO_FAULT_MARKS"]
HOLD = os.environ.get("VISPO_FAULT_HOLD")
HOLD_AT = int(os.environ.get("VISPO_FAULT_HOLD_AT", "0"))
FSIZE = int(os.environ.get("VISPO_FAULT_FSIZE", "0"))
_counts: Counter = Counter()
_fd = os.open(MARKS, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


def phase(name: str, detail: str = "") -> None:
    """Record entering ``name``; hold here if this is the requested moment."""
    _counts[name] += 1
    os.write(_fd, f"{name} {_counts[name]} {detail}\n".encode())
    if name == HOLD and _counts[name] == HOLD_AT:
        os.write(_fd, f"HOLD {name} {_counts[name]}\n".encode())
        time.sleep(120)  # the test kills us here


def install() -> None:
    from vispo.rewards.sandbox import RewardRunner
    from vispo.rollout import backend
    from vispo.train import checkpoint, logging, trainer

    real_generate = backend.generate

    def generate(*args, **kwargs):
        phase("rollout")
        return real_generate(*args, **kwargs)

    backend.generate = generate

    real_reward_call = RewardRunner.__call__

    def reward_call(self, *args, **kwargs):
        phase("reward")
        return real_reward_call(self, *args, **kwargs)

    RewardRunner.__call__ = reward_call

    real_update = trainer.ppo_update

    def ppo_update(*args, **kwargs):
        phase("update")
        return real_update(*args, **kwargs)

    trainer.ppo_update = ppo_update

    real_log = logging.MetricsLog.log

    def log(self, step, metrics):
        phase("log", str(step))
        return real_log(self, step, metrics)

    logging.MetricsLog.log = log

    real_save_file = checkpoint.save_file

    def save_file(tensors, filename, *args, **kwargs):
        out = real_save_file(tensors, filename, *args, **kwargs)
        phase("ckpt-file", f"{Path(filename).parent.name}/{Path(filename).name}")
        return out

    checkpoint.save_file = save_file

    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if not str(src).endswith(".tmp"):
            return real_replace(src, dst, *args, **kwargs)
        phase("ckpt-commit", Path(src).name)
        out = real_replace(src, dst, *args, **kwargs)
        if FSIZE:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, don't kill us
            resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE, resource.RLIM_INFINITY))
        return out

    os.replace = replace

    # Rotation: the checkpoint module deletes old checkpoints with shutil.rmtree, which unlinks
    # file by file through os.unlink; mark (and maybe hold) after the first file is gone.
    real_rmtree = shutil.rmtree
    real_unlink = os.unlink
    rotating: list[str] = []

    def unlink(path, *args, **kwargs):
        real_unlink(path, *args, **kwargs)
        if rotating and rotating[-1]:
            name, rotating[-1] = rotating[-1], ""
            phase("rotate", f"{name} (deleted {os.fsdecode(path)} first)")

    def rmtree(path, *args, **kwargs):
        name = Path(path).name
        rotating.append(name if re.fullmatch(r"step-\d+", name) else "")
        try:
            return real_rmtree(path, *args, **kwargs)
        finally:
            rotating.pop()

    os.unlink = unlink
    shutil.rmtree = rmtree

    from vispo.eval import runner

    real_generate_batch = runner.generate_batch

    def generate_batch(*args, **kwargs):
        phase("eval-gen")
        return real_generate_batch(*args, **kwargs)

    runner.generate_batch = generate_batch
    real_append = runner._append

    def append(path, records):
        # The same bytes as the real append, in two writes: a kill between them tears the line.
        text = "".join(json.dumps(r) + "\n" for r in records)
        with open(path, "a", encoding="utf-8") as f:
            f.write(text[: len(text) // 2])
            f.flush()
        phase("eval-write", f"{len(records)} records")
        with open(path, "a", encoding="utf-8") as f:
            f.write(text[len(text) // 2 :])
        real_append(path, [])  # the product's own fsync path, with nothing more to add

    runner._append = append


if __name__ == "__main__":
    install()
    from vispo.cli import main

    sys.exit(main(sys.argv[1:]))
