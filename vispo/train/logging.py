"""Run logging: JSONL every step (the record), optional TensorBoard / W&B, HTML sample pages.

``metrics.jsonl`` is strict JSON, one object per line. JSON has no NaN or infinity, so a
non-finite metric (a step skipped for a NaN loss logs a NaN ``loss`` and ``grad_norm``) is
written as the string ``"nan"``, ``"inf"`` or ``"-inf"``; :func:`read_metrics` turns these
three strings back into floats, so readers get numbers.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import numbers
from pathlib import Path

from PIL import Image


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, lines after the resumed step are dropped."""

    def __init__(
        self,
        run_dir: Path,
        *,
        resume_step: int | None = None,
        tensorboard=False,
        wandb=False,
        wandb_project="vispo",
        config: dict | None = None,
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [
                line for line, record in _records(self.path) if record.get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(k + "\n" for k in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._tb = self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise _missing("tensorboard") from None
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if wandb:
            try:
                import wandb as wb
            except ImportError:
                raise _missing("wandb") from None
            self._wandb = wb.init(project=wandb_project, config=config, dir=str(run_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: encode_value(v) for k, v in metrics.items()}}
        line = json.dumps(record, allow_nan=False)  # strict JSON: no NaN/Infinity literals
        with open(self.path, "a") as f:
            f.write(line + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        """Flush and close the optional sinks (idempotent)."""
        tb, run, self._tb, self._wandb = self._tb, self._wandb, None, None
        if tb is not None:
            tb.close()
        if run is not None:
            run.finish()


def _missing(package: str):
    from vispo.train.config import ConfigError
    from vispo.train.setup import logging_package_message

    return ConfigError(logging_package_message(package, package))


_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def encode_value(v):
    """A metric value as strict JSON: non-finite numbers become "nan" / "inf" / "-inf", other
    real numbers (NumPy and 0-d tensors included) plain floats/ints; containers recursively."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real) or (hasattr(v, "item") and getattr(v, "ndim", 1) == 0):
        f = float(v)
        return f if math.isfinite(f) else str(f)
    if isinstance(v, dict):
        return {str(k): encode_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [encode_value(x) for x in v]
    return v


def decode_value(v):
    """Inverse of :func:`encode_value` for the non-finite strings; anything else unchanged."""
    if isinstance(v, str):
        return _NON_FINITE.get(v, v)
    return v


def _records(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of each line of a JSONL file; a last line cut short by a crash or a full
    disk in the middle of its write is left out (any other bad line is an error)."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return out


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [{k: decode_value(v) for k, v in record.items()} for _, record in _records(path)]


def image_data_uri(image: Image.Image, max_side: int = 256) -> str:
    img = image.copy()
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_samples_page(path: Path, step: int, rows: list[dict]) -> None:
    """One self-contained HTML page: per row the image(s), question, answer, completions and
    their rewards. ``rows``: dicts with images, question, answer, completions, rewards."""
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>vispo samples, step {step}</title>",
        "<style>body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;padding:4px;"
        "vertical-align:top}table{border-collapse:collapse}pre{white-space:pre-wrap;margin:0}"
        ".good{background:#e6f4e6}.bad{background:#fbeaea}</style>",
        f"<h1>Sample completions at step {step}</h1>",
    ]
    for row in rows:
        imgs = "".join(f"<img src='{image_data_uri(im)}'>" for im in row["images"])
        parts.append(f"<h3>{html.escape(row['question'])}</h3><p>{imgs}</p>")
        parts.append(f"<p>Reference answer: <b>{html.escape(str(row['answer']))}</b></p>")
        parts.append("<table><tr><th>completion</th><th>reward</th></tr>")
        for text, reward in zip(row["completions"], row["rewards"]):
            cls = "good" if reward > 0.5 else "bad"
            parts.append(
                f"<tr class='{cls}'><td><pre>{html.escape(text)}</pre></td>"
                f"<td>{reward:.3f}</td></tr>"
            )
        parts.append("</table>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
