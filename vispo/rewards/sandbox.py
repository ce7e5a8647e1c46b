"""Running reward functions so that a broken one cannot stop training.

:class:`RewardRunner` calls a batch reward function (the user API of
:mod:`vispo.rewards.composite`) on chunks of a batch in a pool of worker processes, each a
fresh interpreter restricted before the reward is loaded (minimal environment, own folder and
process group, resource limits, no network, an unprivileged user where possible: see
:mod:`vispo.rewards._worker`). A reward file named by path is executed only in the workers,
and its loading has the same timeout as a call. Each call has a wall-clock timeout; a worker
that exceeds it, or dies, is killed with its whole process group and replaced. Whatever goes
wrong, the affected samples get reward 0,
the failure is counted in :attr:`RewardRunner.errors` by kind and logged once per kind with a
sample id, and the batch completes:

==============  ===========================================================================
kind            meaning
==============  ===========================================================================
exception       the function raised
timeout         no result within ``timeout_s`` (the worker is killed and replaced)
crash           the worker process died (segfault, ``os._exit``, out of memory)
nan             a value (or a component, or a dict's weighted total) is NaN or infinite,
                also once converted to float32 (the trainer's reward tensors)
wrong_length    the function returned a different number of values than completions
bad_type        the result is not a list, or a value is not a number / dict of numbers
==============  ===========================================================================

When a whole chunk fails (exception, timeout, crash, wrong_length, or a result that is not a
list), the chunk is split and every sample is retried alone, so that one bad sample does not
cost the good ones their reward. Retries are dispatched only within ``retry_budget_s`` of the
failure, which bounds the worst case (every sample hangs) to about
``timeout_s + retry_budget_s + timeout_s`` per batch. ``nan`` and ``bad_type`` of single
values only zero those samples.

What a worker prints is discarded at the file-descriptor level; Python-level prints are
kept up to ``output_limit`` characters per call and logged at DEBUG level, so a reward that
prints megabytes cannot flood the training log.

A reward that fails on every sample of ``max_consecutive_failures`` calls in a row raises
:class:`RewardError` (a broken reward would otherwise train on zeros for the whole run).

``num_workers=0`` runs the function in this process (no timeout, no isolation from crashes)
with the same validation and per-sample retries: for trusted, fast built-ins.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import multiprocessing as mp
import multiprocessing.connection
import numbers
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import weakref
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vispo.rewards._guard import SymbolicTimeout
from vispo.rewards._worker import Limits, worker_env
from vispo.rewards.composite import (
    REWARDS,
    RewardResult,
    combine_outputs,
    parse_reward_file,
    resolve_reward,
)

__all__ = ["ERROR_KINDS", "Limits", "RewardError", "RewardRunner"]

logger = logging.getLogger(__name__)

ERROR_KINDS = ("exception", "timeout", "crash", "nan", "wrong_length", "bad_type")
#: Largest finite float32: rewards become float32 tensors in the trainer.
FLOAT32_MAX = 3.4028234663852886e38

# A validated per-sample entry is a float, a dict[str, float], or an _Error.
_Error = tuple  # ("error", kind, detail)
# The outcome of one call on a chunk: ("ok", entries) or ("fail", kind, detail).
_Outcome = tuple


def _describe(e: BaseException) -> str:
    """One line: exception type, message, and where it was raised."""
    where = ""
    frames = traceback.extract_tb(e.__traceback__)
    if frames:
        f = frames[-1]
        where = f" (at {os.path.basename(f.filename)}:{f.lineno} in {f.name})"
    msg = str(e)
    if len(msg) > 300:
        msg = msg[:300] + "..."
    return f"{type(e).__name__}: {msg}{where}"


def _validate_value(v: Any) -> float | dict[str, float] | _Error:
    """A sample's value as a float or dict of floats, or an error entry saying what is wrong."""
    if isinstance(v, Mapping):
        if not v:
            return ("error", "bad_type", "empty dict of components")
        out: dict[str, float] = {}
        for k, x in v.items():
            if not isinstance(k, str):
                return ("error", "bad_type", f"component name {k!r} is not a str")
            checked = _validate_value(x)
            if isinstance(checked, tuple):
                kind, detail = checked[1], checked[2]
                return ("error", kind, f"component {k!r}: {detail}")
            if isinstance(checked, dict):
                return ("error", "bad_type", f"component {k!r} is a nested dict")
            out[str(k)] = checked
        return out
    if isinstance(v, numbers.Real) and not isinstance(v, str):
        try:
            f = float(v)
        except OverflowError:  # an int too large for a float
            return ("error", "nan", f"value {v} overflows float")
        if not math.isfinite(f):
            return ("error", "nan", f"value {f}")
        if abs(f) > FLOAT32_MAX:
            return ("error", "nan", f"value {f!r} is not finite in float32")
        return f
    return ("error", "bad_type", f"value of type {type(v).__name__} (expected a number or a dict)")


def _validate_output(out: Any, n: int) -> _Outcome:
    """Check a batch result: a list (or tuple, or 1-D array) of ``n`` values."""
    if hasattr(out, "tolist") and getattr(out, "ndim", None) == 1:
        out = out.tolist()  # numpy array
    if not isinstance(out, (list, tuple)):
        return ("fail", "bad_type", f"returned {type(out).__name__}, expected a list of {n} values")
    if len(out) != n:
        return ("fail", "wrong_length", f"returned {len(out)} values for {n} completions")
    return ("ok", [_validate_value(v) for v in out])


def _call(fn: Callable[..., Any], completions, answers, columns, *, catch_all: bool) -> _Outcome:
    """Call the reward on one chunk and validate the result; never raises for reward bugs.

    ``catch_all`` (worker processes) also turns ``SystemExit`` and other ``BaseException``s
    into failures; in-process only ``Exception`` and timeout exceptions (math-verify's and
    vispo's derive from ``BaseException``) are caught, so Ctrl-C still stops training.
    """
    try:
        out = fn(completions, answers, **columns)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 (classified below)
        is_timeout = isinstance(e, SymbolicTimeout) or type(e).__name__ == "TimeoutException"
        if not (catch_all or isinstance(e, Exception) or is_timeout):
            raise
        return ("fail", "exception", _describe(e))
    return _validate_output(out, len(completions))


class _CappedWriter(io.TextIOBase):
    """A text stream keeping only the first ``limit`` characters written to it."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self._parts: list[str] = []
        self._size = 0
        self._dropped = 0

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        room = self.limit - self._size
        if room > 0:
            kept = s[:room]
            self._parts.append(kept)
            self._size += len(kept)
        self._dropped += max(0, len(s) - max(room, 0))
        return len(s)

    def take(self) -> str:
        """Return what was kept (noting how much was dropped) and start afresh."""
        text = "".join(self._parts)
        if self._dropped:
            text += f"... [{self._dropped} more characters discarded]"
        self._parts, self._size, self._dropped = [], 0, 0
        return text


@dataclass
class _Task:
    indices: tuple[int, ...]
    task_id: int
    not_after: float | None = None  # retries: give up if not dispatched by then
    retry_kind: str = ""  # retries: the kind that caused the split


_BOOT = (
    "import sys, json; sys.path[:0] = json.loads(sys.argv[2]); "
    "from vispo.rewards._worker import worker_main; worker_main(int(sys.argv[1]), int(sys.argv[3]))"
)


class _Worker:
    """One worker process (its own interpreter, process group and folder) and its socket.

    ``state`` goes ``starting`` (interpreter start-up, bounded by ``start_timeout_s``) ->
    ``loading`` (the reward is imported, bounded by ``timeout_s``) -> ``ready``.
    """

    def __init__(self, runner: RewardRunner):
        self.workdir = tempfile.mkdtemp(prefix="vispo-reward-")
        os.chmod(self.workdir, 0o700)
        parent_sock, child_sock = socket.socketpair()
        # Only this process holds the write end: the worker's watchdog sees EOF when it dies.
        watch_read, self._watch_write = os.pipe()
        self.errlog = tempfile.TemporaryFile()  # start-up errors before stderr is detached
        paths = [p or os.getcwd() for p in sys.path]
        vispo_root = str(Path(__file__).resolve().parents[2])
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-c",
                    _BOOT,
                    str(child_sock.fileno()),
                    json.dumps([vispo_root, *paths]),
                    str(watch_read),
                ],
                env=worker_env(runner.limits, self.workdir),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self.errlog,
                pass_fds=(child_sock.fileno(), watch_read),
                process_group=0,
            )
        finally:
            child_sock.close()
            os.close(watch_read)
        self.conn = mp.connection.Connection(parent_sock.detach())
        try:
            self.sentinel: int | None = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):
            self.sentinel = None  # no pidfd: death is noticed by polling
        self.state = "starting"
        self.deadline = time.monotonic() + runner.start_timeout_s
        self.task: _Task | None = None
        self.sent_at = 0.0
        self.cpu_s = 0.0
        self.conn.send((runner.limits, runner._payload, runner.output_limit, os.getpid()))

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def waitables(self) -> list:
        return [self.conn] + ([self.sentinel] if self.sentinel is not None else [])

    def is_dead(self, ready: set) -> bool:
        if self.sentinel is not None:
            return self.sentinel in ready
        return self.proc.poll() is not None

    def send(self, task: _Task, message: tuple) -> None:
        self.conn.send(message)
        self.task = task
        self.sent_at = time.monotonic()

    def exit_code(self) -> int | None:
        try:
            return self.proc.wait(1)
        except subprocess.TimeoutExpired:
            return None

    def start_error(self) -> str:
        """The last lines the interpreter wrote before detaching stderr (start-up failures)."""
        try:
            self.errlog.seek(0)
            lines = self.errlog.read().decode(errors="replace").strip().splitlines()
        except (OSError, ValueError):
            return ""
        return lines[-1][:300] if lines else ""

    def kill(self) -> None:
        """Kill the worker's whole process group, reap it, remove its folder. Idempotent."""
        # Already gone (or never ours to signal): nothing left to kill.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the leader is not reaped yet: its id is ours
        # A process that outlives SIGKILL for 5 s is in uninterruptible sleep: the watchdog and
        # the process group's death take it when it wakes; the trainer does not wait for it.
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.conn.close()
        if self._watch_write is not None:
            os.close(self._watch_write)
            self._watch_write = None
        if self.sentinel is not None:
            os.close(self.sentinel)
            self.sentinel = None
        self.errlog.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


class _Batch:
    """Per-call state: validated entries, sample ids, and error bookkeeping."""

    def __init__(self, runner: RewardRunner, n: int, sample_ids: list[Any]):
        self.runner = runner
        self.entries: list[float | dict[str, float] | None] = [None] * n
        self.sample_ids = sample_ids

    def fail(self, index: int, kind: str, detail: str) -> None:
        self.entries[index] = None
        self.runner._record_error(kind, self.sample_ids[index], detail)

    def apply(self, task: _Task, outcome: _Outcome) -> list[int]:
        """Store a chunk's outcome; return the indices to retry one by one (if any)."""
        if outcome[0] == "ok":
            for i, entry in zip(task.indices, outcome[1]):
                if isinstance(entry, tuple):
                    self.fail(i, entry[1], entry[2])
                else:
                    self.entries[i] = entry
            return []
        _, kind, detail = outcome
        if len(task.indices) > 1:
            return list(task.indices)
        self.fail(task.indices[0], kind, detail)
        return []


def _kill_all(workers: list[_Worker]) -> None:
    """Kill every worker of a runner (its process group included) and empty the list."""
    while workers:
        workers.pop().kill()


class RewardError(RuntimeError):
    """The reward cannot be used at all: it does not load, or it failed on every sample of
    ``max_consecutive_failures`` calls in a row. The message names the cause."""


class _FileSpec:
    """A ``"path/to/file.py:function"`` reward that only the workers execute."""

    def __init__(self, spec: str):
        path, self.name = parse_reward_file(spec)
        self.path = str(path)
        self.source = path.read_text(encoding="utf-8")

    def __repr__(self) -> str:
        return f"'{self.path}:{self.name}'"


class RewardRunner:
    """Run a batch reward function with timeouts, validation and per-sample isolation.

    Args:
        fn: the reward: a callable ``f(completions, answers, **columns) -> list[float | dict]``
            (module-level, or loaded with :func:`vispo.rewards.load_reward_fn`, so it can be
            pickled to the workers), a :data:`vispo.rewards.REWARDS` name, or
            ``"path/to/file.py:function"`` (with workers, that file is executed only inside
            the workers, under ``timeout_s``; this process only reads it).
        num_workers: worker processes; 0 runs in this process (no timeout, no isolation;
            trusted code only).
        timeout_s: wall-clock limit of one call on one chunk, and of loading the reward in a
            worker (a reward file's module-level code).
        chunk_size: samples per call; default ``ceil(n / (2 * num_workers))`` (the whole batch
            in one call when ``num_workers=0``).
        weights: component name -> weight for dict outputs (default: ``fn.weights`` if the
            function has one, e.g. a :class:`vispo.rewards.CompositeReward`; else 1 each).
        retry_budget_s: after a chunk fails, how long its per-sample retries may still be
            started (default ``2 * timeout_s + 5``).
        start_timeout_s: how long a worker's interpreter may take to start.
        output_limit: characters of printed output kept per call (logged at DEBUG level).
        mp_context: kept for compatibility: ``"spawn"`` or ``"forkserver"`` (workers are
            always fresh interpreters); ``fork`` is refused.
        limits: what a worker may do (:class:`vispo.rewards._worker.Limits`: environment
            variables passed through, address space, CPU seconds, file size, processes, user,
            network); default ``Limits()``.
        max_consecutive_failures: raise :class:`RewardError` once this many calls in a row
            failed on every sample (0: never).

    The constructor starts the workers and waits until they have loaded the reward, so a
    reward that cannot load fails here (:class:`RewardError`). Use as a context manager, or
    call :meth:`close`, which kills every worker's process group. Not thread-safe.
    """

    def __init__(
        self,
        fn: Callable[..., Any] | str,
        *,
        num_workers: int = 2,
        timeout_s: float = 10.0,
        chunk_size: int | None = None,
        weights: Mapping[str, float] | None = None,
        retry_budget_s: float | None = None,
        start_timeout_s: float = 120.0,
        output_limit: int = 4096,
        mp_context: str = "spawn",
        limits: Limits | None = None,
        max_consecutive_failures: int = 5,
    ):
        self._closed = True  # until construction succeeds; makes __del__ safe
        self._workers: list[_Worker] = []
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        if not (isinstance(timeout_s, numbers.Real) and 0 < timeout_s < math.inf):
            raise ValueError(f"timeout_s must be > 0 and finite, got {timeout_s!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
        if retry_budget_s is not None and retry_budget_s < 0:
            raise ValueError(f"retry_budget_s must be >= 0, got {retry_budget_s!r}")
        if mp_context not in ("spawn", "forkserver"):
            raise ValueError(f"mp_context must be 'spawn' or 'forkserver', got {mp_context!r}")
        if not isinstance(max_consecutive_failures, int) or max_consecutive_failures < 0:
            raise ValueError(
                f"max_consecutive_failures must be an int >= 0, got {max_consecutive_failures!r}"
            )
        is_file = isinstance(fn, str) and fn not in REWARDS and ":" in fn
        # A reward file is executed only inside the workers; in-process it is loaded here.
        self.fn = _FileSpec(fn) if is_file and num_workers > 0 else resolve_reward(fn)
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.chunk_size = chunk_size
        self.retry_budget_s = 2 * self.timeout_s + 5.0 if retry_budget_s is None else retry_budget_s
        self.start_timeout_s = float(start_timeout_s)
        self.output_limit = int(output_limit)
        self.limits = limits or Limits()
        self.max_consecutive_failures = max_consecutive_failures
        self._weights_given = weights is not None
        fn_weights = getattr(self.fn, "weights", None) if weights is None else weights
        self.weights: dict[str, float] = dict(fn_weights or {})
        #: Samples whose reward failed, by kind, over the runner's lifetime.
        self.errors: Counter[str] = Counter()
        #: What the OS refused to isolate (logged once), from the first worker's report.
        self.isolation_notes: list[str] | None = None
        self._logged_kinds: set[str] = set()
        self._last_error: tuple[str, Any, str] | None = None
        self._failed_calls = 0
        self._next_task_id = 0
        if num_workers > 0:
            if isinstance(self.fn, _FileSpec):
                self._payload: tuple = ("file", self.fn.path, self.fn.name, self.fn.source)
            else:
                try:
                    self._payload = ("pickle", pickle.dumps(self.fn))
                except Exception as e:
                    raise TypeError(
                        f"the reward function {self.fn!r} cannot be sent to worker processes "
                        f"({type(e).__name__}: {e}); define it at module level, load it with "
                        "load_reward_fn('file.py:name'), or use num_workers=0"
                    ) from e
            self._closed = False
            # Kills the workers when the runner is closed, collected, or at interpreter exit.
            self._finalizer = weakref.finalize(self, _kill_all, self._workers)
            try:
                for _ in range(num_workers):
                    self._workers.append(_Worker(self))
                self._wait_ready()
            except BaseException:
                self.close()
                raise
        self._closed = False

    # -- public -------------------------------------------------------------------------------

    def __call__(
        self,
        completions: Sequence[str],
        answers: Sequence[Any],
        *,
        sample_ids: Sequence[Any] | None = None,
        **columns: Sequence[Any],
    ) -> RewardResult:
        """Rewards of a batch. ``sample_ids`` name samples in log messages (default: index)."""
        if self._closed:
            raise RuntimeError("RewardRunner is closed")
        completions, answers = list(completions), list(answers)
        n = len(completions)
        if len(answers) != n:
            raise ValueError(f"got {n} completions but {len(answers)} answers")
        cols: dict[str, list[Any]] = {}
        for name, col in columns.items():
            if isinstance(col, (str, bytes)) or not hasattr(col, "__len__"):
                raise TypeError(f"column {name!r} must be a sequence with one value per sample")
            if len(col) != n:
                raise ValueError(f"column {name!r} has {len(col)} values for {n} completions")
            cols[name] = list(col)
        ids = list(range(n)) if sample_ids is None else list(sample_ids)
        if len(ids) != n:
            raise ValueError(f"sample_ids has {len(ids)} values for {n} completions")
        if n == 0:
            return RewardResult(total=[], components={}, n_errors=0)

        batch = _Batch(self, n, ids)
        data = (completions, answers, cols)
        if self.num_workers == 0:
            self._run_inline(batch, data)
        else:
            self._run_pool(batch, data)
        for i, entry in enumerate(batch.entries):  # the trainer holds rewards as float32
            if isinstance(entry, Mapping):
                total = sum(self.weights.get(k, 1.0) * v for k, v in entry.items())
                if not abs(total) <= FLOAT32_MAX:
                    batch.fail(i, "nan", f"weighted total {total!r} is not finite in float32")
        self._check_consecutive_failures(batch)
        return combine_outputs(batch.entries, self.weights)

    @property
    def n_errors(self) -> int:
        """Samples whose reward failed, all kinds, over the runner's lifetime."""
        return sum(self.errors.values())

    def error_metrics(self) -> dict[str, int]:
        """Lifetime error counts as metrics: ``reward/errors/{kind}`` for every kind."""
        return {f"reward/errors/{kind}": self.errors.get(kind, 0) for kind in ERROR_KINDS}

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (for monitoring and tests)."""
        return [w.proc.pid for w in self._workers if w.proc.pid is not None]

    def close(self) -> None:
        """Kill every worker's process group (no process of the reward survives), reap the
        workers and remove their folders. Idempotent; safe to call from a signal handler's
        clean-up path."""
        if self._closed:
            return
        self._closed = True
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()  # kills and forgets every worker (self._workers is emptied)

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _record_error(self, kind: str, sample_id: Any, detail: str) -> None:
        self.errors[kind] += 1
        self._last_error = (kind, sample_id, detail)
        if kind not in self._logged_kinds:
            self._logged_kinds.add(kind)
            logger.warning(
                "reward %s on sample %s: %s (reward set to 0; further '%s' failures are only "
                "counted, see RewardRunner.errors)",
                kind,
                sample_id,
                detail,
                kind,
            )

    def _check_consecutive_failures(self, batch: _Batch) -> None:
        if all(e is None for e in batch.entries):
            self._failed_calls += 1
        else:
            self._failed_calls = 0
        limit = self.max_consecutive_failures
        if limit and self._failed_calls >= limit and self._last_error is not None:
            kind, sample_id, detail = self._last_error
            counts = ", ".join(f"{k}={v}" for k, v in sorted(self.errors.items()))
            self._abort(
                f"the reward {self.fn!r} failed on every sample of {self._failed_calls} calls in "
                f"a row (reward.max_consecutive_failures={limit}; errors so far: {counts}); "
                f"last: {kind} on sample {sample_id}: {detail}"
            )

    def _new_task(self, indices: Sequence[int], **kw: Any) -> _Task:
        self._next_task_id += 1
        return _Task(tuple(indices), self._next_task_id, **kw)

    def _chunks(self, n: int) -> list[_Task]:
        size = self.chunk_size or (n if self.num_workers == 0 else -(-n // (2 * self.num_workers)))
        return [self._new_task(range(s, min(n, s + size))) for s in range(0, n, size)]

    @staticmethod
    def _slice(data, indices: Sequence[int]) -> tuple[list, list, dict[str, list]]:
        completions, answers, cols = data
        return (
            [completions[i] for i in indices],
            [answers[i] for i in indices],
            {k: [v[i] for i in indices] for k, v in cols.items()},
        )

    def _log_output(self, task: _Task, text: str, sample_ids: list[Any]) -> None:
        if text:
            logger.debug(
                "reward function printed (samples from %s, at most %d characters kept): %s",
                sample_ids[task.indices[0]],
                self.output_limit,
                text,
            )

    def _run_inline(self, batch: _Batch, data) -> None:
        pending = deque(self._chunks(len(batch.entries)))
        while pending:
            task = pending.popleft()
            completions, answers, cols = self._slice(data, task.indices)
            writer = _CappedWriter(self.output_limit)
            with redirect_stdout(writer), redirect_stderr(writer):
                outcome = _call(self.fn, completions, answers, cols, catch_all=False)
            self._log_output(task, writer.take(), batch.sample_ids)
            for i in batch.apply(task, outcome):
                pending.append(self._new_task([i]))

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._workers[self._workers.index(w)] = _Worker(self)

    def _fail_and_retry(
        self, batch: _Batch, task: _Task, outcome: _Outcome, pending: deque
    ) -> None:
        retry = batch.apply(task, outcome)
        if retry:
            not_after = time.monotonic() + self.retry_budget_s
            for i in reversed(retry):  # retries go first, in sample order
                pending.appendleft(self._new_task([i], not_after=not_after, retry_kind=outcome[1]))

    def _abort(self, message: str) -> None:
        self.close()
        raise RewardError(message)

    def _wait(self, workers: list[_Worker]) -> set:
        """Block until a message, a death or the nearest deadline of ``workers``."""
        deadlines = [
            w.sent_at + self.timeout_s if w.task is not None else w.deadline for w in workers
        ]
        timeout = max(0.0, min(deadlines) - time.monotonic())
        if any(w.sentinel is None for w in workers):
            timeout = min(timeout, 0.1)  # no pidfd: poll for deaths
        return set(mp.connection.wait([x for w in workers for x in w.waitables()], timeout))

    def _wait_ready(self) -> None:
        """Wait until every worker has loaded the reward (construction)."""
        while True:
            starting = [w for w in self._workers if not w.ready]
            if not starting:
                return
            self._poll(_Batch(self, 0, []), starting, self._wait(starting), deque())

    def _run_pool(self, batch: _Batch, data) -> None:
        pending = deque(self._chunks(len(batch.entries)))
        while True:
            now = time.monotonic()
            # 1. Hand work to idle workers.
            for w in list(self._workers):
                if not (w.ready and w.task is None):
                    continue
                if self.limits.cpu_s and w.cpu_s > self.limits.cpu_s / 2:
                    self._replace(w)  # retire it well before RLIMIT_CPU would kill it
                    continue
                while pending:
                    task = pending.popleft()
                    if task.not_after is not None and now > task.not_after:
                        batch.fail(
                            task.indices[0],
                            task.retry_kind,
                            "chunk failed and the retry budget ran out before this sample",
                        )
                        continue
                    try:
                        w.send(task, (task.task_id, *self._slice(data, task.indices)))
                    except OSError:  # the idle worker died; the task was not started
                        w.task = None
                        pending.appendleft(task)
                        self._replace(w)
                    break
            if not pending and all(w.task is None for w in self._workers):
                return
            # 2. Wait for a result, a death, or the nearest deadline; 3. handle them.
            active = [w for w in self._workers if w.task is not None or not w.ready]
            self._poll(batch, active, self._wait(active), pending)

    def _poll(self, batch: _Batch, active: list[_Worker], ready: set, pending: deque) -> None:
        for w in active:
            if w.conn in ready:
                try:
                    msg = w.conn.recv()
                except (EOFError, OSError):
                    self._on_death(batch, w, pending)
                    continue
                self._on_message(batch, w, msg, pending)
            elif w.is_dead(ready):
                self._on_death(batch, w, pending)
        now = time.monotonic()
        for w in list(self._workers):
            if w.task is not None and now - w.sent_at > self.timeout_s:
                task = w.task
                self._replace(w)
                outcome = ("fail", "timeout", f"no result within {self.timeout_s:g} s")
                self._fail_and_retry(batch, task, outcome, pending)
            elif w.state == "starting" and now > w.deadline:
                self._abort(
                    f"a reward worker did not start within {self.start_timeout_s:g} s "
                    "(start_timeout_s)"
                )
            elif w.state == "loading" and now > w.deadline:
                self._abort(
                    f"the reward {self.fn!r} did not finish loading within {self.timeout_s:g} s "
                    "(reward.timeout_s): its module-level code hangs or is too slow"
                )

    def _on_message(self, batch: _Batch, w: _Worker, msg: tuple, pending: deque) -> None:
        if msg[0] == "loading":
            w.state, w.deadline = "loading", time.monotonic() + self.timeout_s
            if self.isolation_notes is None:
                self.isolation_notes = list(msg[2])
                if msg[2]:
                    logger.warning(
                        "reward sandbox: the OS refused part of the isolation, running "
                        "without it: %s (see docs/reliability.md)",
                        "; ".join(msg[2]),
                    )
        elif msg[0] == "ready":
            w.state = "ready"
            if not self._weights_given and msg[1]:
                self.weights = dict(msg[1])
        elif msg[0] == "init_error":
            hint = ""
            if "MemoryError" in msg[1] and self.limits.memory_mb:
                hint = f" (the worker may use {self.limits.memory_mb} MiB: raise reward.memory_mb)"
            self._abort(f"reward {self.fn!r} could not be loaded: {msg[1]}{hint}")
        else:
            task_id, outcome, printed, w.cpu_s = msg
            task, w.task = w.task, None
            if task is None or task.task_id != task_id:  # cannot happen: one task per worker
                self._abort(f"reward worker answered task {task_id}, expected {task}")
            self._log_output(task, printed, batch.sample_ids)
            self._fail_and_retry(batch, task, outcome, pending)

    def _on_death(self, batch: _Batch, w: _Worker, pending: deque) -> None:
        code = w.exit_code()
        if not w.ready:
            why = w.start_error()
            self._abort(
                f"a reward worker exited while {w.state} (exit code {code})"
                + (f": {why}" if why else "")
            )
        task = w.task
        self._replace(w)
        if task is not None:
            outcome = ("fail", "crash", f"worker process died (exit code {code})")
            self._fail_and_retry(batch, task, outcome, pending)
