"""``vispo train``: run a config, then print a summary table and plot the curves.

Exit codes of :func:`run_training`: 0 the run finished (a step skipped for a non-finite value
does not change that); 2 an expected error, reported as one ``error: ...`` line (bad config,
reward, data, run folder, missing logging package, checkpoint I/O), most of them before the
model loads; 3 the run stopped itself with a checkpoint (non-finite steps in a row, collapse
guard); 75 stopped on a first SIGTERM/SIGINT with a checkpoint (resume with ``--resume``);
130 interrupted while starting up, before any step. A second SIGTERM/SIGINT exits at once with
128 + the signal number (143 / 130). See :mod:`vispo.train.stopping`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from vispo.data import DataError
from vispo.rewards import RewardError
from vispo.train.checkpoint import CheckpointError
from vispo.train.config import Config, ConfigError
from vispo.train.setup import clear_preloaded, preflight
from vispo.train.stopping import EXIT_INTERRUPTED, TrainingInterrupted
from vispo.train.trainer import Trainer, TrainingStopped


def _one_line(console: Console, label: str, message: object) -> None:
    """``label: message`` on one line of stderr (no markup parsing, no wrapping)."""
    text = " ".join(str(message).split())
    console.print(Text.assemble((f"{label}: ", "bold red"), text), soft_wrap=True)


def run_training(cfg: Config, *, resume: bool | str = False, overwrite: bool = False) -> int:
    console, errors = Console(), Console(stderr=True)
    start = time.perf_counter()
    trainer = None
    try:
        preflight(cfg)  # reward, logging packages, run folder, data: before the model loads
        try:
            trainer = Trainer(cfg, resume=resume, overwrite=overwrite, console=console)
        except KeyboardInterrupt:
            _one_line(errors, "interrupted", "while starting up; no step was run")
            return 130
        trainer.train()
    except TrainingInterrupted as e:
        _one_line(errors, "interrupted", e)
        return EXIT_INTERRUPTED
    except TrainingStopped as e:
        _one_line(errors, "stopped", e)
        return 3
    except (CheckpointError, ConfigError, DataError, RewardError) as e:
        # Expected failures with a message that names the cause: no traceback.
        _one_line(errors, "error", e)
        return 2
    finally:
        clear_preloaded()
        if trainer is not None:
            trainer.close()  # reward workers (and their children) end with the run
    wall = time.perf_counter() - start
    from vispo.train.logging import read_metrics

    records = read_metrics(cfg.train.out_dir)
    metrics = [m for m in records if "reward/mean" in m]
    try:  # the run is done and saved: a plot that cannot be written is not a failure
        plot_curves(
            records,  # with the held-out accuracy records
            Path(cfg.train.out_dir) / "curves.png",
            events=[e.step for e in trainer.guard.events],
        )
    except OSError as e:
        _one_line(errors, "warning", f"curves.png not written ({e})")
    console.print(summary_table(trainer, metrics, wall))
    console.print(
        f"run folder: {cfg.train.out_dir} (metrics.jsonl, curves.png, checkpoints/, samples/)"
    )
    return 0


def _mean(rows, key, first: bool):
    """Mean of the finite values of ``key`` over the first (or last) 20% of the rows that have
    it; NaN when none of them is finite, None when no row has the key."""
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    if not vals:
        return None
    part = vals[: max(1, len(vals) // 5)] if first else vals[-max(1, len(vals) // 5) :]
    finite = [v for v in part if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _fmt(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else "n/a"


def summary_table(trainer: Trainer, metrics: list[dict], wall: float) -> Table:
    table = Table(title=f"vispo: {trainer.cfg.objective.name} on {trainer.cfg.data.name}")
    table.add_column("")
    table.add_column("before RL", justify="right")
    table.add_column("after RL", justify="right")
    ev = trainer.eval_results
    if "accuracy_before" in ev:
        from vispo.train.setup import describe_eval_data

        held = describe_eval_data(trainer.eval_data, trainer.cfg.data.eval_size)
        table.add_row(
            f"held-out accuracy ({held}; greedy)",
            f"{ev['accuracy_before']:.3f}",
            f"{ev.get('accuracy_after', float('nan')):.3f}",
        )
    from vispo.train.curves import reward_components

    rows = [("reward/mean", "reward (first/last 20% of steps)")]
    rows += [(f"reward/{c}/mean", f"  reward component: {c}") for c in reward_components(metrics)]
    rows.append(("perception/kl_mean", "perception KL (first/last 20%)"))
    for key, label in rows:
        a, b = _mean(metrics, key, True), _mean(metrics, key, False)
        if a is not None:
            table.add_row(label, _fmt(a), _fmt(b))
    errors = getattr(trainer.reward, "errors", None)
    if errors is not None:  # a RewardRunner: samples whose reward failed and was set to 0
        detail = ", ".join(f"{k}={v}" for k, v in sorted(errors.items()) if v)
        table.add_row(
            "reward errors (samples given 0)",
            "",
            f"{sum(errors.values())}" + (f" ({detail})" if detail else ""),
        )
    skipped = getattr(getattr(trainer, "updates", None), "skipped", 0)
    if skipped:
        table.add_row("updates skipped (non-finite loss or gradient)", "", str(skipped))
    table.add_row("wall time", "", f"{wall:.0f} s")
    return table


def plot_curves(metrics: list[dict], path: Path, *, events: list[int] = ()) -> list[str]:
    """``curves.png``: a grid of the run's panels (:mod:`vispo.train.curves`); returns their
    titles."""
    from vispo.train.curves import plot_grid

    return plot_grid(metrics, Path(path), events=events)
