"""What people look at: curves.png, the samples pages, the console of ``vispo train``."""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from vispo.eval.report import curve_images  # noqa: E402
from vispo.train.curves import (  # noqa: E402
    draw_panel,
    held_out_points,
    panels,
    plot_grid,
    smooth,
)
from vispo.train.logging import write_samples_page  # noqa: E402
from vispo.train.progress import StepProgress  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _run_metrics(kind: str, steps: int = 20) -> list[dict]:
    rows = []
    for s in range(1, steps + 1):
        m = {
            "step": s,
            "reward/mean": 0.5 + 0.01 * s,
            "reward/accuracy/mean": 0.4 + 0.01 * s,
            "reward/format/mean": 1.0,
            "accuracy/mean": 0.4 + 0.01 * s,
            "response_length/mean": 3.0,
            "response_length/max": 4.0,
            "entropy/orig": 1.0,
            "clip/low": 0.0,
            "clip/high": 0.01,
        }
        if kind == "papo":
            m.update({"perception/kl_mean": 0.01 * s, "entropy/mask": 1.2})
        if kind == "cppo":
            m.update(
                {
                    "loss/cpl": 0.007,
                    "cpl/d_pos": 0.001,
                    "cpl/d_neg": 0.002,
                    "perception/selected_frac": 0.2,
                    "kl/ref": 0.01 * s,
                }
            )
        if s % 10 == 0:
            m["eval/accuracy"] = 0.5 + s / 100
        rows.append(m)
    rows.append({"step": steps, "eval/accuracy_before": 0.45, "eval/accuracy_after": 0.7})
    return rows


def test_smoothing_is_a_trailing_mean_by_hand():
    assert smooth([1.0, 2.0, 3.0, 4.0], window=2) == [1.0, 1.5, 2.5, 3.5]
    assert smooth([3.0, 0.0, 3.0, 6.0, 0.0], window=3) == [3.0, 1.5, 2.0, 3.0, 3.0]
    assert smooth(list(range(9))) == list(range(9))  # under 10 points: unchanged
    values = [float(i % 2) for i in range(20)]  # 20 points: window 2
    assert smooth(values)[1:] == [0.5] * 19


def test_held_out_points_before_during_after():
    pts = held_out_points(_run_metrics("grpo"))
    # step 20's periodic value (0.7) is replaced by the final record (also 0.7 here).
    assert pts == [(0, 0.45), (10, 0.6), (20, 0.7)]


def test_panels_are_those_of_the_objective_that_ran():
    def titles(kind):
        return [t for t, _ in panels(_run_metrics(kind))]

    common = ["reward", "reward components", "accuracy", "response length (tokens)"]
    assert titles("grpo") == [*common, "entropy", "clip fractions"]
    assert titles("papo") == [
        *common,
        "PAPO: perception KL",
        "PAPO: entropies",
        "clip fractions",
    ]
    assert titles("cppo") == [
        *common,
        "entropy",
        "CPPO: contrastive loss",
        "CPPO: d+ / d-",
        "CPPO: selected fraction",
        "reference KL",
        "clip fractions",
    ]
    accuracy = dict(panels(_run_metrics("grpo")))["accuracy"]
    assert [k for k, _ in accuracy] == ["accuracy/mean", "eval/accuracy"]
    # The report draws the same panels.
    assert [t for t, _ in curve_images(_run_metrics("cppo"), [])] == titles("cppo")


def test_curves_png_is_a_grid_with_integer_ticks_smoothing_and_held_out_points(tmp_path):
    path = tmp_path / "curves.png"
    drawn = plot_grid(_run_metrics("cppo"), path, events=[7])
    assert len(drawn) == 10
    with Image.open(path) as im:  # 10 panels: 3 columns x 4 rows of 4.6 x 3.4 inches at 110 dpi
        assert im.size == (round(3 * 4.6 * 110), round(4 * 3.4 * 110))

    fig, ax = plt.subplots()
    metrics = _run_metrics("grpo")
    draw_panel(ax, metrics, "accuracy", dict(panels(metrics))["accuracy"], events=[7])
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    lines = ax.get_lines()
    raw, smoothed, held, event = lines
    ys = [0.4 + 0.01 * s for s in range(1, 21)]
    assert list(raw.get_ydata()) == pytest.approx(ys) and raw.get_alpha() == 0.3
    assert list(smoothed.get_ydata()) == pytest.approx(smooth(ys))
    assert held.get_linestyle() == "None" and held.get_marker() == "o"
    assert list(held.get_xdata()) == [0, 10, 20]
    assert list(event.get_xdata()) == [7, 7]
    plt.close(fig)


def _page_rows():
    img = Image.new("RGB", (300, 200), (10, 200, 30))
    return [
        {
            "images": [img],
            "question": "What color is the shape?",
            "answer": "green",
            "completions": ["green", "red", "<think>x</think> \\boxed{red}"],
            # totals: 0.9 acc + 0.1 format; the third is wrong but has a high total under
            # format weight 1 (colour must follow accuracy, not total > 0.5)
            "rewards": [0.9, 0.0, 1.0],
            "components": {"accuracy": [1.0, 0.0, 0.0], "format": [0.0, 0.0, 1.0]},
        }
    ]


def test_samples_page_colours_by_accuracy_and_shows_components(tmp_path):
    path = tmp_path / "samples" / "step-000010.html"
    write_samples_page(path, 10, _page_rows())
    text = path.read_text()
    assert "<th>completion</th><th>accuracy</th><th>format</th><th>total reward</th>" in text
    rows = re.findall(r"<tr( class='(\w+)')?><td><pre>(.*?)</pre></td>(.*?)</tr>", text)
    assert [(r[1], r[2]) for r in rows] == [
        ("good", "green"),
        ("bad", "red"),
        ("bad", "&lt;think&gt;x&lt;/think&gt; \\boxed{red}"),
    ]
    cells = re.findall(r"<td class='num'>([0-9.]+)</td>", rows[2][3])
    assert cells == ["0.000", "1.000", "1.000"]
    # The image is embedded at full size, shown larger, and a click toggles full size.
    uri = re.search(r"<img class='sample' src='data:image/png;base64,([^']+)'", text).group(1)
    with Image.open(io.BytesIO(base64.b64decode(uri))) as im:
        assert im.size == (300, 200)
    assert "this.classList.toggle('full')" in text and "img.sample{height:256px" in text
    assert "img.sample.full{height:auto;min-height:512px" in text
    # Without an accuracy component, no row is coloured.
    rows_plain = _page_rows()
    rows_plain[0]["components"] = {"format": [0.0, 0.0, 1.0]}
    write_samples_page(tmp_path / "plain.html", 1, rows_plain)
    assert "class='good'" not in (tmp_path / "plain.html").read_text()


def test_samples_pages_link_previous_and_next(tmp_path):
    folder = tmp_path / "samples"
    for step in (10, 20, 30):
        write_samples_page(folder / f"step-{step:06d}.html", step, _page_rows())

    def links(step):
        text = (folder / f"step-{step:06d}.html").read_text()
        prev = re.findall(r"<a href='([^']+)'>&larr; previous page</a>", text)
        nxt = re.findall(r"<a href='([^']+)'>next page &rarr;</a>", text)
        return prev, nxt

    assert links(10) == ([], ["step-000020.html"] * 2)  # top and bottom of the page
    assert links(20) == (["step-000010.html"] * 2, ["step-000030.html"] * 2)
    assert links(30) == (["step-000020.html"] * 2, [])


def test_progress_prints_plain_lines_without_a_terminal():
    out = io.StringIO()
    with StepProgress(120, stream=out) as bar:
        for _ in range(120):
            bar.advance({"reward/mean": 0.5, "loss/total": -0.25})
    lines = out.getvalue().splitlines()
    assert len(lines) == 40  # every ceil(120 / 50) = 3 steps
    assert lines[0].startswith("step 3/120  elapsed ") and lines[-1].startswith("step 120/120")
    assert all(line.endswith("reward 0.500  loss -0.250") for line in lines)
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    resumed = io.StringIO()
    with StepProgress(10, start=8, stream=resumed) as bar:
        bar.advance({})
        bar.advance({})
    assert [x.split("  ")[0] for x in resumed.getvalue().splitlines()] == [
        "step 9/10",
        "step 10/10",
    ]


def test_quiet_console_drops_import_notices_and_says_warnings_once():
    code = (
        "import importlib.util, warnings\n"
        "from vispo.quiet import quiet_console\n"
        "quiet_console()\n"
        "if importlib.util.find_spec('deepspeed'):\n"
        "    import deepspeed\n"
        "warnings.warn('objective.x is odd')\n"
        "warnings.warn('objective.x is odd')\n"
        "print('done')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert "Setting accelerator" not in text
    assert text.count("vispo: warning: objective.x is odd") == 1
    assert "UserWarning" not in text and "warnings.warn" not in text


def test_vispo_train_console_summary_curves_and_a_final_samples_page(tmp_path):
    """One short run of the shipped model from the CLI, output captured (no terminal)."""
    out_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [
        "cppo",
        "train.steps=2",
        "train.prompts_per_step=2",
        "rollout.n=4",
        "data.eval_size=4",
        "train.samples_every=0",  # a page is still written at the end
        "reward.name=reference",
        f"train.out_dir={out_dir}",
    ]
    out = subprocess.run(
        [sys.executable, "-m", "vispo.cli", "train", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "Loading weights" not in text and "it/s]" not in text
    assert "Setting accelerator" not in text
    assert re.search(r"^step 1/2  elapsed \d+:\d\d  ETA \d+:\d\d  reward ", text, re.M)
    assert re.search(r"^step 2/2  elapsed ", text, re.M)
    assert "reward component: accuracy" in text and "reward component: format" in text
    assert sorted(p.name for p in (out_dir / "samples").iterdir()) == ["step-000002.html"]
    page = (out_dir / "samples" / "step-000002.html").read_text()
    assert "<th>accuracy</th><th>format</th><th>total reward</th>" in page
    assert (out_dir / "curves.png").stat().st_size > 0


def test_a_run_stopped_early_still_writes_a_samples_page(tmp_path, monkeypatch):
    from vispo.rewards import RewardRunner
    from vispo.train.config import load_config
    from vispo.train.trainer import Trainer, TrainingStopped

    cfg = load_config(
        None,
        [
            "objective.name=grpo",
            "model.name_or_path=tiny:qwen2_vl",
            "data.name=synthetic",
            "data.synthetic_size=8",
            "data.eval_size=0",
            "train.steps=5",
            "train.prompts_per_step=2",
            "rollout.n=2",
            "rollout.max_new_tokens=3",
            "train.samples_every=0",
            "guard.enabled=true",
            "logging.progress=false",
            f"train.out_dir={tmp_path / 'run'}",
        ],
    )

    def exact(completions, answers, **columns):
        return [{"accuracy": float(c == a)} for c, a in zip(completions, answers)]

    trainer = Trainer(cfg, reward_fn=RewardRunner(exact, num_workers=0))

    class StopEvent:
        step, signals, action = 2, {"clip/high": 9.0}, "stop"

    monkeypatch.setattr(trainer.guard, "observe", lambda step, m: StopEvent if step == 2 else None)
    with pytest.raises(TrainingStopped):
        trainer.train()
    pages = sorted(p.name for p in (tmp_path / "run" / "samples").iterdir())
    assert pages == ["step-000002.html"]
