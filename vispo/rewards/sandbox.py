"""Running reward functions so that a broken one cannot stop training.

:class:`RewardRunner` calls a batch reward function (the user API of
:mod:`vispo.rewards.composite`) on chunks of a batch in a pool of worker processes started
with ``spawn`` (or ``forkserver``). Each call has a wall-clock timeout; a worker that exceeds
it, or dies, is killed and replaced. Whatever goes wrong, the affected samples get reward 0,
the failure is counted in :attr:`RewardRunner.errors` by kind and logged once per kind with a
sample id, and the batch completes:

==============  ===========================================================================
kind            meaning
==============  ===========================================================================
exception       the function raised
timeout         no result within ``timeout_s`` (the worker is killed and replaced)
crash           the worker process died (segfault, ``os._exit``, out of memory)
nan             a value (or a component of a dict value) is NaN or infinite
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

``num_workers=0`` runs the function in this process (no timeout, no isolation from crashes)
with the same validation and per-sample retries: for trusted, fast built-ins.
"""

from __future__ import annotations

import io
import logging
import math
import multiprocessing as mp
import multiprocessing.connection
import numbers
import os
import pickle
import signal
import sys
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from typing import Any

from vispo.rewards._guard import SymbolicTimeout
from vispo.rewards.composite import RewardResult, combine_outputs, resolve_reward

__all__ = ["ERROR_KINDS", "RewardRunner"]

logger = logging.getLogger(__name__)

ERROR_KINDS = ("exception", "timeout", "crash", "nan", "wrong_length", "bad_type")

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
        f = float(v)
        if not math.isfinite(f):
            return ("error", "nan", f"value {f}")
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


def _worker_main(conn, payload: bytes, output_limit: int) -> None:
    """Worker process: load the reward, then answer ``(task_id, completions, answers, columns)``."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # C-level and subprocess output goes nowhere
    os.dup2(devnull, 2)
    writer = _CappedWriter(output_limit)
    sys.stdout = sys.stderr = writer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        fn = pickle.loads(payload)
    except BaseException as e:  # noqa: BLE001 (reported to the parent)
        conn.send(("init_error", _describe(e)))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, completions, answers, columns = msg
        outcome = _call(fn, completions, answers, columns, catch_all=True)
        conn.send((task_id, outcome, writer.take()))


@dataclass
class _Task:
    indices: tuple[int, ...]
    task_id: int
    not_after: float | None = None  # retries: give up if not dispatched by then
    retry_kind: str = ""  # retries: the kind that caused the split


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, ctx, payload: bytes, output_limit: int):
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=_worker_main,
            args=(child_conn, payload, output_limit),
            daemon=True,
            name="vispo-reward-worker",
        )
        self.proc.start()
        child_conn.close()
        self.started_at = time.monotonic()
        self.ready = False
        self.task: _Task | None = None
        self.sent_at = 0.0

    def send(self, task: _Task, message: tuple) -> None:
        self.conn.send(message)
        self.task = task
        self.sent_at = time.monotonic()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()

    def ask_to_stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass


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


class RewardRunner:
    """Run a batch reward function with timeouts, validation and per-sample isolation.

    Args:
        fn: the reward: a callable ``f(completions, answers, **columns) -> list[float | dict]``
            (module-level, or loaded with :func:`vispo.rewards.load_reward_fn`, so it can be
            pickled to the workers), a :data:`vispo.rewards.REWARDS` name, or
            ``"path/to/file.py:function"``.
        num_workers: worker processes; 0 runs in this process (no timeout; trusted code only).
        timeout_s: wall-clock limit of one call on one chunk.
        chunk_size: samples per call; default ``ceil(n / (2 * num_workers))`` (the whole batch
            in one call when ``num_workers=0``).
        weights: component name -> weight for dict outputs (default: ``fn.weights`` if the
            function has one, e.g. a :class:`vispo.rewards.CompositeReward`; else 1 each).
        retry_budget_s: after a chunk fails, how long its per-sample retries may still be
            started (default ``2 * timeout_s + 5``).
        start_timeout_s: how long a worker may take to start and load the reward.
        output_limit: characters of printed output kept per call (logged at DEBUG level).
        mp_context: ``"spawn"`` (default) or ``"forkserver"``; ``fork`` is refused (unsafe
            with threads, which torch starts).

    Use as a context manager, or call :meth:`close`; workers are daemonic, so they also end
    with the parent process. Not thread-safe: call it from one thread.
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
    ):
        self._closed = True  # until construction succeeds; makes __del__ safe
        self._workers: list[_Worker] = []
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        if not (isinstance(timeout_s, numbers.Real) and timeout_s > 0):
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
        if retry_budget_s is not None and retry_budget_s < 0:
            raise ValueError(f"retry_budget_s must be >= 0, got {retry_budget_s!r}")
        if mp_context not in ("spawn", "forkserver"):
            raise ValueError(f"mp_context must be 'spawn' or 'forkserver', got {mp_context!r}")
        self.fn = resolve_reward(fn)
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.chunk_size = chunk_size
        self.retry_budget_s = 2 * self.timeout_s + 5.0 if retry_budget_s is None else retry_budget_s
        self.start_timeout_s = float(start_timeout_s)
        self.output_limit = int(output_limit)
        fn_weights = getattr(self.fn, "weights", None) if weights is None else weights
        self.weights: dict[str, float] = dict(fn_weights or {})
        #: Samples whose reward failed, by kind, over the runner's lifetime.
        self.errors: Counter[str] = Counter()
        self._logged_kinds: set[str] = set()
        self._next_task_id = 0
        if num_workers > 0:
            try:
                self._payload = pickle.dumps(self.fn)
            except Exception as e:
                raise TypeError(
                    f"the reward function {self.fn!r} cannot be sent to worker processes "
                    f"({type(e).__name__}: {e}); define it at module level, load it with "
                    "load_reward_fn('file.py:name'), or use num_workers=0"
                ) from e
            self._ctx = mp.get_context(mp_context)
            self._workers = [
                _Worker(self._ctx, self._payload, self.output_limit) for _ in range(num_workers)
            ]
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
        """Stop the workers (politely, then by force) and reap them. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            w.ask_to_stop()
        end = time.monotonic() + 2.0
        for w in self._workers:
            w.proc.join(max(0.0, end - time.monotonic()))
            w.kill()
        self._workers = []

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown: nothing left to report to)
            return

    # -- internals ----------------------------------------------------------------------------

    def _record_error(self, kind: str, sample_id: Any, detail: str) -> None:
        self.errors[kind] += 1
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
        self._workers[self._workers.index(w)] = _Worker(self._ctx, self._payload, self.output_limit)

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
        raise RuntimeError(message)

    def _run_pool(self, batch: _Batch, data) -> None:
        pending = deque(self._chunks(len(batch.entries)))
        while True:
            now = time.monotonic()
            # 1. Hand work to idle workers.
            for w in list(self._workers):
                if not (w.ready and w.task is None):
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
            active = [w for w in self._workers if w.task is not None or not w.ready]
            if not pending and all(w.task is None for w in self._workers):
                return
            # 2. Wait for a result, a death, or the nearest deadline.
            deadlines = [
                w.sent_at + self.timeout_s
                if w.task is not None
                else w.started_at + self.start_timeout_s
                for w in active
            ]
            timeout = max(0.0, min(deadlines) - time.monotonic())
            waitables = [w.conn for w in active] + [w.proc.sentinel for w in active]
            ready = set(mp.connection.wait(waitables, timeout))
            # 3. Handle what happened.
            for w in active:
                if w.conn in ready:
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):
                        self._on_death(batch, w, pending)
                        continue
                    self._on_message(batch, w, msg, pending)
                elif w.proc.sentinel in ready:
                    self._on_death(batch, w, pending)
            now = time.monotonic()
            for w in list(self._workers):
                if w.task is not None and now - w.sent_at > self.timeout_s:
                    task = w.task
                    self._replace(w)
                    outcome = ("fail", "timeout", f"no result within {self.timeout_s:g} s")
                    self._fail_and_retry(batch, task, outcome, pending)
                elif not w.ready and now - w.started_at > self.start_timeout_s:
                    self._abort(f"a reward worker did not start within {self.start_timeout_s:g} s")

    def _on_message(self, batch: _Batch, w: _Worker, msg: tuple, pending: deque) -> None:
        if msg[0] == "ready":
            w.ready = True
        elif msg[0] == "init_error":
            self._abort(f"reward worker could not load the reward function: {msg[1]}")
        else:
            task_id, outcome, printed = msg
            task, w.task = w.task, None
            if task is None or task.task_id != task_id:  # cannot happen: one task per worker
                self._abort(f"reward worker answered task {task_id}, expected {task}")
            self._log_output(task, printed, batch.sample_ids)
            self._fail_and_retry(batch, task, outcome, pending)

    def _on_death(self, batch: _Batch, w: _Worker, pending: deque) -> None:
        w.proc.join(1)
        code = w.proc.exitcode
        if not w.ready:
            self._abort(f"a reward worker exited during start-up (exit code {code})")
        task = w.task
        self._replace(w)
        if task is not None:
            outcome = ("fail", "crash", f"worker process died (exit code {code})")
            self._fail_and_retry(batch, task, outcome, pending)
