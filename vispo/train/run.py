"""``vispo train``: run a config, then print a summary table and plot the curves."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vispo.data import DataError
from vispo.train.checkpoint import CheckpointError
from vispo.train.config import Config, ConfigError
from vispo.train.trainer import Trainer, TrainingStopped

CURVES = (
    ("reward/mean", "reward"),
    ("accuracy/mean", "train accuracy (rollouts)"),
    ("perception/kl_mean", "perception KL"),
    ("entropy/orig", "entropy (original)"),
    ("entropy/mask", "entropy (masked)"),
    ("clip/high", "clip fraction (high)"),
)


def run_training(cfg: Config, *, resume: bool | str = False, overwrite: bool = False) -> int:
    console = Console()
    start = time.perf_counter()
    try:
        trainer = Trainer(cfg, resume=resume, overwrite=overwrite, console=console)
        trainer.train()
    except TrainingStopped as e:
        console.print(f"[bold red]stopped:[/] {e}")
        return 3
    except (CheckpointError, ConfigError, DataError) as e:
        # Expected failures with a message that names the cause: no traceback.
        console.print(f"[bold red]error:[/] {e}")
        return 2
    wall = time.perf_counter() - start
    from vispo.train.logging import read_metrics

    metrics = [m for m in read_metrics(cfg.train.out_dir) if "reward/mean" in m]
    plot_curves(
        metrics,
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
        table.add_row(
            f"held-out accuracy ({trainer.cfg.data.eval_size} questions, greedy)",
            f"{ev['accuracy_before']:.3f}",
            f"{ev.get('accuracy_after', float('nan')):.3f}",
        )
    for key, label in (
        ("reward/mean", "reward (first/last 20% of steps)"),
        ("perception/kl_mean", "perception KL (first/last 20%)"),
    ):
        a, b = _mean(metrics, key, True), _mean(metrics, key, False)
        if a is not None:
            table.add_row(label, f"{a:.4f}", f"{b:.4f}")
    table.add_row("wall time", "", f"{wall:.0f} s")
    return table


def plot_curves(metrics: list[dict], path: Path, *, events: list[int] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [(k, label) for k, label in CURVES if any(k in m for m in metrics)]
    if not present:
        return
    fig, axes = plt.subplots(1, len(present), figsize=(3.2 * len(present), 2.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], present):
        pts = [(m["step"], m[key]) for m in metrics if key in m]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        for s in events:
            ax.axvline(s, color="red", lw=0.8, ls="--")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
