"""Training curves as panels: which ones a run has, smoothing, and drawing.

``curves.png`` (:func:`vispo.train.run.plot_curves`) and the HTML report
(:func:`vispo.eval.report.curve_images`) draw the same panels from ``metrics.jsonl``: the
general ones (reward and its components, accuracy with the held-out points, response length,
clipping, reference KL) and those of the objective that ran (PAPO: perception KL and both
entropies; CPPO: contrastive loss, d+ / d-, selected fraction). A panel appears only when the
run logged its metrics. Each line is drawn raw (thin, faded) with a trailing moving average
over it; held-out accuracy is drawn as points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: (title, ((metric, legend label), ...)) in display order.
PANELS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("reward", (("reward/mean", "mean reward"),)),
    ("accuracy", (("accuracy/mean", "rollouts"),)),
    (
        "response length (tokens)",
        (("response_length/mean", "mean"), ("response_length/max", "max")),
    ),
    ("PAPO: perception KL", (("perception/kl_mean", "KL(orig || masked)"),)),
    ("entropy", (("entropy/orig", "original image"), ("entropy/mask", "masked image"))),
    ("CPPO: contrastive loss", (("loss/cpl", "loss/cpl"),)),
    ("CPPO: d+ / d-", (("cpl/d_pos", "d+ (I+)"), ("cpl/d_neg", "d- (I-)"))),
    ("CPPO: selected fraction", (("perception/selected_frac", "selected tokens"),)),
    ("reference KL", (("kl/ref", "KL(policy || ref)"),)),
    ("clip fractions", (("clip/low", "low"), ("clip/high", "high"))),
)

#: Held-out accuracy: metric of periodic evaluations, and the before/after RL records.
HELD_OUT = "eval/accuracy"
HELD_OUT_LABEL = "held-out (greedy)"


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def series(metrics: Sequence[dict], key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of ``key`` in step order; non-finite or missing values left out."""
    return sorted(
        (int(m["step"]), float(m[key])) for m in metrics if "step" in m and _number(m.get(key))
    )


def held_out_points(metrics: Sequence[dict]) -> list[tuple[int, float]]:
    """Held-out accuracy: ``eval/accuracy`` at its steps, ``eval/accuracy_before`` at step 0
    and ``eval/accuracy_after`` at its step; one point per step (the last record wins)."""
    points: dict[int, float] = {}
    for m in metrics:
        if "step" not in m:
            continue
        if _number(m.get("eval/accuracy_before")):
            points[0] = float(m["eval/accuracy_before"])
        for key in (HELD_OUT, "eval/accuracy_after"):
            if _number(m.get(key)):
                points[int(m["step"])] = float(m[key])
    return sorted(points.items())


def smooth(values: Sequence[float], window: int | None = None) -> list[float]:
    """Trailing moving average: ``out[i] = mean(values[max(0, i - w + 1) : i + 1])``.

    ``window`` defaults to a tenth of the points (at least 1, so short runs are unchanged
    below 10 points)."""
    n = len(values)
    w = window if window is not None else max(1, n // 10)
    if w < 1:
        raise ValueError(f"window must be >= 1, got {w}")
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= w:
            acc -= values[i - w]
        out.append(acc / min(i + 1, w))
    return out


def reward_components(metrics: Sequence[dict]) -> list[str]:
    """Names of the logged reward components (``reward/{name}/mean``), in first-seen order."""
    names: dict[str, None] = {}
    for m in metrics:
        for k in m:
            if k.startswith("reward/") and k.endswith("/mean") and k.count("/") == 2:
                names[k.split("/")[1]] = None
    return list(names)


def panels(metrics: Sequence[dict]) -> list[tuple[str, list[tuple[str, str]]]]:
    """The panels that have data: ``(title, [(metric, label), ...])``; the accuracy panel also
    holds the held-out points (metric :data:`HELD_OUT`), a "reward components" panel follows
    the reward when the reward has several components, and the entropy panel is "PAPO:
    entropies" when the masked image's entropy was logged."""
    out = []
    has_held_out = bool(held_out_points(metrics))
    for title, lines in PANELS:
        present = [(k, label) for k, label in lines if series(metrics, k)]
        if title == "accuracy" and has_held_out:
            present.append((HELD_OUT, HELD_OUT_LABEL))
        if title == "entropy" and any(k == "entropy/mask" for k, _ in present):
            title = "PAPO: entropies"  # both: the original and the masked image's
        if present:
            out.append((title, present))
        if title == "reward":
            comps = reward_components(metrics)
            if len(comps) > 1:  # a single component is the reward itself
                out.append(("reward components", [(f"reward/{c}/mean", c) for c in comps]))
    return out


def draw_panel(ax, metrics: Sequence[dict], title: str, lines, events: Sequence[int] = ()) -> None:
    """One panel on a matplotlib axis: each line raw (faded) and smoothed, held-out accuracy
    as points, collapse-guard events as dashed red lines, integer step ticks."""
    from matplotlib.ticker import MaxNLocator

    for i, (key, label) in enumerate(lines):
        color = f"C{i}"
        if key == HELD_OUT:
            pts = held_out_points(metrics)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color="black", ms=5, label=label)
            continue
        pts = series(metrics, key)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if len(pts) < 3:
            ax.plot(xs, ys, "o-", color=color, lw=1.3, ms=3, label=label)
            continue
        sm = smooth(ys)
        if sm == ys:
            ax.plot(xs, ys, "-", color=color, lw=1.4, label=label)
        else:
            ax.plot(xs, ys, "-", color=color, lw=0.8, alpha=0.3)
            ax.plot(xs, sm, "-", color=color, lw=1.8, label=label)
    for j, step in enumerate(events):
        ax.axvline(step, color="#d0021b", lw=1, ls="--", label="guard event" if j == 0 else None)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("step", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.25)
    if len(lines) > 1 or events:
        ax.legend(fontsize=8, frameon=False)


def plot_grid(metrics: Sequence[dict], path, *, events: Sequence[int] = (), ncols: int = 3):
    """Every panel with data in a grid of ``ncols`` columns, saved to ``path``; returns the
    panel titles drawn (empty, and no file written, when there is nothing to draw)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = panels(metrics)
    if not found:
        return []
    cols = min(ncols, len(found))
    rows = -(-len(found) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax, (title, lines) in zip(axes.flat, found):
        draw_panel(ax, metrics, title, lines, events)
    for ax in list(axes.flat)[len(found) :]:
        ax.set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [t for t, _ in found]
