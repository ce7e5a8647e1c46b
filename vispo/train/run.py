"""``vispo train``: run a config, then print a summary table and plot the curves."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vispo.data import DataError
from vispo.rewards import RewardError
from vispo.train.checkpoint import CheckpointError
from vispo.train.config import Config, ConfigError
from vispo.train.trainer import Trainer, TrainingStopped


def run_training(cfg: Config, *, resume: bool | str = False, overwrite: bool = False) -> int:
    console = Console()
    start = time.perf_counter()
    try:
        trainer = Trainer(cfg, resume=resume, overwrite=overwrite, console=console)
        trainer.train()
    except TrainingStopped as e:
        console.print(f"[bold red]stopped:[/] {e}")
        return 3
    except (CheckpointError, ConfigError, DataError, RewardError) as e:
        # Expected failures with a message that names the cause: no traceback.
        console.print(f"[bold red]error:[/] {e}")
        return 2
    wall = time.perf_counter() - start
    from vispo.train.logging import read_metrics

    records = read_metrics(cfg.train.out_dir)
    metrics = [m for m in records if "reward/mean" in m]
    plot_curves(
        records,  # with the held-out accuracy records
        Path(cfg.train.out_dir) / "curves.png",
        events=[e.step for e in trainer.guard.events],
    )
    console.print(summary_table(trainer, metrics, wall))
    console.print(
        f"run folder: {cfg.train.out_dir} (metrics.jsonl, curves.png, checkpoints/, samples/)"
    )
    return 0


def _mean(rows, key, first: bool):
    vals = [r[key] for r in rows if key in r]
    if not vals:
        return None
    part = vals[: max(1, len(vals) // 5)] if first else vals[-max(1, len(vals) // 5) :]
    return sum(part) / len(part)


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
            table.add_row(label, f"{a:.4f}", f"{b:.4f}")
    errors = getattr(trainer.reward, "errors", None)
    if errors is not None:  # a RewardRunner: samples whose reward failed and was set to 0
        detail = ", ".join(f"{k}={v}" for k, v in sorted(errors.items()) if v)
        table.add_row(
            "reward errors (samples given 0)",
            "",
            f"{sum(errors.values())}" + (f" ({detail})" if detail else ""),
        )
    table.add_row("wall time", "", f"{wall:.0f} s")
    return table


def plot_curves(metrics: list[dict], path: Path, *, events: list[int] = ()) -> list[str]:
    """``curves.png``: a grid of the run's panels (:mod:`vispo.train.curves`); returns their
    titles."""
    from vispo.train.curves import plot_grid

    return plot_grid(metrics, Path(path), events=events)
