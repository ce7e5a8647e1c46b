"""A rich progress bar with ETA and the key metrics of the last step."""

from __future__ import annotations

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

KEY_METRICS = (
    ("reward/mean", "reward"),
    ("accuracy/mean", "acc"),
    ("perception/kl_mean", "kl_prcp"),
    ("loss/total", "loss"),
)


class StepProgress:
    def __init__(self, total: int, *, start: int = 0, enabled: bool = True):
        self.enabled = enabled
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
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def advance(self, metrics: dict) -> None:
        info = "  ".join(
            f"{short} {metrics[key]:.3f}" for key, short in KEY_METRICS if key in metrics
        )
        self.progress.update(self.task, advance=1, info=info)
