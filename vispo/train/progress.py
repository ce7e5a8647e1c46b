"""Training progress: a rich bar with ETA and the key metrics of the last step on a terminal,
plain lines elsewhere (a log file, CI, a notebook's captured output), where a redrawn bar would
be cut to the width of an imaginary 80-column screen."""

from __future__ import annotations

import sys
import time

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

KEY_METRICS = (
    ("reward/mean", "reward"),
    ("accuracy/mean", "acc"),
    ("perception/kl_mean", "kl_prcp"),
    ("loss/total", "loss"),
)

#: Without a terminal, a line is printed every ``ceil(total / PLAIN_LINES)`` steps (and at the
#: last step), so a long run prints about this many lines.
PLAIN_LINES = 50


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_info(metrics: dict) -> str:
    return "  ".join(f"{short} {metrics[key]:.3f}" for key, short in KEY_METRICS if key in metrics)


class StepProgress:
    """``with StepProgress(total) as bar: ... bar.advance(metrics)``.

    ``plain``: print one line per step interval instead of a bar (default: when ``stream`` is
    not a terminal).
    """

    def __init__(
        self,
        total: int,
        *,
        start: int = 0,
        enabled: bool = True,
        plain: bool | None = None,
        stream=None,
    ):
        self.enabled = enabled
        self.total, self.done, self.start = total, start, start
        self.stream = stream if stream is not None else sys.stdout
        if plain is None:
            isatty = getattr(self.stream, "isatty", None)
            plain = not (callable(isatty) and isatty())
        self.plain = plain
        self.every = max(1, -(-max(total - start, 1) // PLAIN_LINES))
        self._t0 = time.perf_counter()
        self.progress = None
        if not plain:
            self.progress = Progress(
                TextColumn("[bold]step {task.completed}/{task.total}"),
                BarColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                disable=not enabled,
            )
            self.task = self.progress.add_task("train", total=total, completed=start, info="")

    def __enter__(self):
        self._t0 = time.perf_counter()
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()

    def advance(self, metrics: dict) -> None:
        self.done += 1
        info = format_info(metrics)
        if self.progress is not None:
            self.progress.update(self.task, advance=1, info=info)
            return
        if not self.enabled:
            return
        ran = self.done - self.start
        if ran % self.every and self.done != self.total:
            return
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / ran * (self.total - self.done) if ran else 0.0
        print(
            f"step {self.done}/{self.total}  elapsed {_clock(elapsed)}  ETA {_clock(eta)}  {info}",
            file=self.stream,
            flush=True,
        )
