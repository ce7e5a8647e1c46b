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


#: Embedded images keep up to this many pixels a side (full size for the usual VQA images).
FULL_IMAGE_SIDE = 1024
_NEXT_MARK = "<!--vispo-next-->"
_PAGE_GLOB = "step-*.html"

_PAGE_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1200px}"
    "td,th{border:1px solid #ccc;padding:4px 6px;vertical-align:top}"
    "table{border-collapse:collapse;margin-bottom:1.5em}pre{white-space:pre-wrap;margin:0}"
    "th{background:#f3f3f3}td.num{text-align:right;font-family:monospace}"
    ".good{background:#e6f4e6}.bad{background:#fbeaea}"
    "nav{margin:1em 0;font-size:1.1em}nav a,nav span{margin-right:1.5em}nav span{color:#999}"
    "img.sample{height:256px;image-rendering:pixelated;cursor:zoom-in;margin-right:8px;"
    "border:1px solid #ccc}img.sample.full{height:auto;min-height:512px;max-width:100%;"
    "cursor:zoom-out}"
)


def correctness_component(components: dict) -> str | None:
    """The component that says whether a completion is right: ``accuracy``, else the only one
    whose name starts with ``accuracy`` (e.g. a TRL ``accuracy_reward``); None without one."""
    if "accuracy" in components:
        return "accuracy"
    starts = [k for k in components if k.startswith("accuracy")]
    return starts[0] if len(starts) == 1 else None


def _page_step(path: Path) -> int | None:
    try:
        return int(path.stem.split("-", 1)[1])
    except (IndexError, ValueError):
        return None


def _nav(prev: Path | None, next_: Path | None) -> str:
    left = (
        f"<a href='{prev.name}'>&larr; previous page</a>"
        if prev
        else "<span>&larr; first page</span>"
    )
    if next_ is not None:
        right = f"<a href='{next_.name}'>next page &rarr;</a>"
    else:
        right = f"{_NEXT_MARK}<span>latest page</span>{_NEXT_MARK}"
    return f"<nav>{left}{right}</nav>"


def write_samples_page(path: Path, step: int, rows: list[dict]) -> None:
    """One self-contained HTML page: per row the image(s), question, answer, completions, each
    reward component and the total. ``rows``: dicts with images, question, answer,
    completions, rewards (totals) and optionally components (name -> one value per
    completion).

    A completion is coloured by correctness (:func:`correctness_component`; green >= 0.5),
    not by its total reward; rows without such a component are not coloured. Images are
    embedded at up to :data:`FULL_IMAGE_SIDE` px and shown 256 px high; a click shows one at
    full size (at least 512 px high, so that a 64 px image is enlarged, not shrunk). Pages link to the previous and next page of the same folder (the previous page
    gets its "next" link when this one is written).
    """
    path = Path(path)
    siblings = sorted(
        (p for p in path.parent.glob(_PAGE_GLOB) if p != path and _page_step(p) is not None),
        key=_page_step,
    )
    prev = [p for p in siblings if _page_step(p) < step]
    later = [p for p in siblings if _page_step(p) > step]
    prev_page, next_page = (prev[-1] if prev else None), (later[0] if later else None)
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>vispo samples, step {step}</title>",
        f"<style>{_PAGE_STYLE}</style>",
        f"<h1>Sample completions at step {step}</h1>",
        _nav(prev_page, next_page),
        "<p>Green: correct, red: wrong (by the accuracy component). Click an image to see it at "
        "full size (small images: 512 px high); its size in pixels is in its tooltip.</p>",
    ]
    for row in rows:
        imgs = "".join(
            f"<img class='sample' src='{image_data_uri(im, FULL_IMAGE_SIDE)}' "
            f"alt='image {k + 1}' title='{im.width}x{im.height} px' "
            "onclick=\"this.classList.toggle('full')\">"
            for k, im in enumerate(row["images"])
        )
        parts.append(f"<h3>{html.escape(row['question'])}</h3><p>{imgs}</p>")
        parts.append(f"<p>Reference answer: <b>{html.escape(str(row['answer']))}</b></p>")
        components = dict(row.get("components") or {})
        key = correctness_component(components)
        head = "".join(f"<th>{html.escape(name)}</th>" for name in components)
        parts.append(f"<table><tr><th>completion</th>{head}<th>total reward</th></tr>")
        for j, (text, reward) in enumerate(zip(row["completions"], row["rewards"])):
            cls = ""
            if key is not None:
                cls = " class='good'" if components[key][j] >= 0.5 else " class='bad'"
            cells = "".join(f"<td class='num'>{float(v[j]):.3f}</td>" for v in components.values())
            parts.append(
                f"<tr{cls}><td><pre>{html.escape(text)}</pre></td>{cells}"
                f"<td class='num'>{float(reward):.3f}</td></tr>"
            )
        parts.append("</table>")
    parts.append(_nav(prev_page, next_page))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    if prev_page is not None:  # the previous page now has a next page: link it
        text = prev_page.read_text()
        placeholder = f"{_NEXT_MARK}<span>latest page</span>{_NEXT_MARK}"
        if placeholder in text:
            link = f"<a href='{path.name}'>next page &rarr;</a>"
            prev_page.write_text(text.replace(placeholder, link))
