"""Stopping a run on SIGTERM / SIGINT without losing work.

A cluster scheduler sends SIGTERM before it preempts a job, and Ctrl-C sends SIGINT. While
:meth:`vispo.train.trainer.Trainer.train` runs, the first of either signal asks the run to stop:

- a step that is still rolling out or scoring rewards (nothing of the model, optimizer or
  schedule has changed yet) is abandoned: the data order and the RNG states go back to where
  the step began, so ``--resume`` redoes it exactly;
- a step that is already scoring or updating finishes (stopping in the middle of an update
  would leave half-applied weights);

then a checkpoint is written, the reward workers and their child processes are stopped, and
``train`` raises :class:`TrainingInterrupted`; ``vispo train`` prints one line and exits with
:data:`EXIT_INTERRUPTED` (75, ``EX_TEMPFAIL``: "try again later", i.e. ``--resume``).

A second signal exits at once (exit code 128 + the signal number, as a shell reports a death
by that signal), after killing the reward workers and their children: no checkpoint is written
beyond the ones already on disk, which is as safe as ``kill -9`` (tests/faults).

Under ``torchrun`` every rank stops after the same step: the stop request is all-reduced
at the end of each step and steps are never abandoned (ranks would leave each other waiting in
a collective).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
from pathlib import Path

import numpy as np
import torch

#: ``vispo train``'s exit code after a stop on the first SIGTERM/SIGINT (a checkpoint was written).
EXIT_INTERRUPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(RuntimeError):
    """The run stopped on SIGTERM/SIGINT after writing a checkpoint (``path`` is None when no
    step had finished since the last checkpoint on disk, or none had finished at all)."""

    def __init__(self, message: str, *, signum: int, step: int, path: Path | None):
        super().__init__(message)
        self.signum, self.step, self.path = signum, step, path


class StepAbandoned(KeyboardInterrupt):
    """Raised by the signal handler inside the abandonable part of a step (rollout and reward).
    A KeyboardInterrupt, so that ``except Exception`` in user code (a reward) lets it through."""


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class GracefulStop:
    """Installs the SIGTERM/SIGINT handlers for the duration of a ``with`` block (main thread
    only; elsewhere it does nothing) and records the first signal in :attr:`signum`.

    ``can_abandon``: whether the abandonable window (:meth:`abandonable`) may raise
    :class:`StepAbandoned`. ``on_second``: called with the signal number on a second signal,
    before the process exits with ``128 + signum``.
    """

    def __init__(self, *, can_abandon: bool = True, on_second=None):
        self.signum: int | None = None
        self.can_abandon = can_abandon
        self.on_second = on_second
        self._window = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @contextlib.contextmanager
    def abandonable(self):
        """The part of a step that a first signal abandons (raising :class:`StepAbandoned`)."""
        if self.signum is not None and self.can_abandon:
            raise StepAbandoned(self.signum)
        self._window = True
        try:
            yield
        finally:
            self._window = False

    def _handle(self, signum, frame) -> None:
        name = signal_name(signum)
        if self.signum is not None:  # the second signal: out now
            _say(f"vispo: second {name}: exiting now, without a new checkpoint\n")
            try:
                if self.on_second is not None:
                    self.on_second(signum)
            finally:
                os._exit(128 + signum)
        self.signum = signum
        abandon = self._window and self.can_abandon
        _say(
            f"vispo: {name} received: "
            + ("abandoning this step" if abandon else "finishing this step")
            + ", then writing a checkpoint (send it again to exit at once)\n"
        )
        if abandon:
            self._window = False
            raise StepAbandoned(signum)


def _say(text: str) -> None:
    """Write to stderr from a signal handler (no buffered stream, which may be mid-write)."""
    # A closed or full stderr must not turn a stop into a crash: the message is only a note.
    with contextlib.suppress(OSError):
        os.write(2, text.encode())


class _NoStop:
    """Stand-in when no handlers are installed (``step()`` called outside ``train()``)."""

    signum = None
    requested = False

    @contextlib.contextmanager
    def abandonable(self):
        yield


NO_STOP = _NoStop()


# --- restoring the state of a step's start ---------------------------------------------------


def snapshot(sampler) -> dict:
    """What an abandoned step may have moved: the data order and every RNG."""
    snap = {
        "sampler": sampler.state_dict(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        snap["cuda"] = torch.cuda.get_rng_state_all()
    return snap


def restore(sampler, snap: dict) -> None:
    sampler.load_state_dict(snap["sampler"])
    random.setstate(snap["python"])
    np.random.set_state(snap["numpy"])
    torch.set_rng_state(snap["torch"])
    if "cuda" in snap:
        torch.cuda.set_rng_state_all(snap["cuda"])


# --- reward worker processes and their children --------------------------------------------


def _children_map() -> dict[int, list[int]]:
    """parent pid -> child pids, from /proc (Linux); empty elsewhere."""
    out: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1:
            out.setdefault(int(fields[1]), []).append(int(name))
    return out


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def process_tree(pids: list[int]) -> list[tuple[int, str | None]]:
    """``pids`` and all their descendants, each with its start time (to tell a reused pid)."""
    children = _children_map()
    seen: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        todo.extend(children.get(pid, []))
    return [(pid, _start_time(pid)) for pid in seen]


def kill_tree(tree: list[tuple[int, str | None]]) -> None:
    """SIGKILL every process of ``tree`` that is still the same process (same start time)."""
    for pid, started in tree:
        if pid == os.getpid() or _start_time(pid) != started or started is None:
            continue
        with contextlib.suppress(OSError):  # exited between the check and the kill
            os.kill(pid, signal.SIGKILL)
