"""``vispo report``: a self-contained HTML page with curves, guard events, eval table and
re-scored samples; an opt-in headless-Chromium check of the rendered page."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_model

from vispo import cli
from vispo.eval.metrics import summarize
from vispo.eval.report import CURVE_PANELS, build_report, curve_images, guard_events, token_spans


def _metrics(steps: int, event_steps: set[int]) -> list[dict]:
    rows = []
    for s in range(1, steps + 1):
        row = {
            "step": s,
            "reward/mean": 0.1 * s,
            "accuracy/mean": 0.05 * s,
            "response_length/mean": 10.0 + s,
            "response_length/max": 12.0 + s,
            "entropy/orig": 2.0 - 0.1 * s,
            "clip/low": 0.01,
            "clip/high": 0.02 * s,
        }
        if s in event_steps:
            row["guard/event"] = 1.0
        rows.append(row)
    return rows


@pytest.fixture
def run_dir(tmp_path):
    """A CPPO run folder: config, 6 steps of metrics (guard events at 3 and 5), a checkpoint
    whose state records the event at 5 with its signals, and an eval.json."""
    from vispo.models import build_tiny_vlm
    from vispo.train.config import config_to_dict, load_config

    run = tmp_path / "my-run"
    cfg = load_config(
        None,
        [
            "objective.name=cppo",
            "model.name_or_path=tiny:qwen2_vl",
            "data.name=synthetic",
            "data.synthetic_size=4",
            "rollout.max_new_tokens=6",
            "reward.name=exact",
        ],
    )
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in _metrics(6, {3, 5})))
    ckpt = run / "checkpoints" / "step-000006"
    ckpt.mkdir(parents=True)
    model, _ = build_tiny_vlm("qwen2_vl")
    save_model(model, str(ckpt / "weights.safetensors"))
    state = {
        "step": 6,
        "guard": {
            "events": [
                {"step": 5, "signals": {"clip/high": 5.5, "entropy/orig": 4.2}, "action": "warn"}
            ]
        },
    }
    (ckpt / "state.json").write_text(json.dumps(state))
    summary = summarize({"synthetic": [[1, 0], [0, 0]]}, {"synthetic": "general"})
    (run / "eval").mkdir()
    (run / "eval" / "eval.json").write_text(
        json.dumps(
            {
                "label": "my-run",
                "model": {"spec": str(run), "checkpoint": "step-000006"},
                "modes": {"avg@2": {"k": 2, "temperature": 1.0, "top_p": 1.0, "summary": summary}},
            }
        )
    )
    return run


def _data_uris(html: str) -> list[str]:
    return re.findall(r"src='([^']*)'", html)


def test_guard_events_merge_state_and_metrics(run_dir):
    from vispo.train.logging import read_metrics

    events = guard_events(run_dir, read_metrics(run_dir))
    assert [e["step"] for e in events] == [3, 5]
    assert events[1]["signals"] == {"clip/high": 5.5, "entropy/orig": 4.2}
    assert events[1]["action"] == "warn" and events[0]["signals"] == {}


def test_curve_panels_are_the_ones_with_data():
    images = curve_images(_metrics(4, set()), [])
    titles = [t for t, _ in images]
    # Only the logged metrics get a panel: no PAPO, CPPO or reference-KL panel here.
    logged = {k for m in _metrics(4, set()) for k in m}
    assert titles == [t for t, lines in CURVE_PANELS if any(k in logged for k, _ in lines)]
    assert titles == [
        "reward",
        "accuracy",
        "response length (tokens)",
        "entropy",
        "clip fractions",
    ]
    for _, uri in images:
        png = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        assert png.format == "PNG" and np.asarray(png.convert("L")).std() > 5


def test_report_is_self_contained_with_curves_events_eval_and_shaded_tokens(run_dir):
    path = build_report(run_dir, n_samples=2, seed=0)
    assert path == run_dir / "report.html"
    html = path.read_text()
    srcs = _data_uris(html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert html.count("class='curve'") == 5  # reward, accuracy, length, entropy, clip
    assert "step 3: event" in html and "step 5: warn (clip/high z=5.5, entropy/orig z=4.2)" in html
    # The eval table: one benchmark at avg@2 = (0.5 + 0) / 2 = 25%.
    assert "<td>synthetic</td><td>general</td><td>2</td><td>25.00</td>" in html
    # Two samples: original, masked and I- image each, and one span per response token.
    assert html.count("<div class='sample'>") == 2
    assert html.count("<figure>") == 6
    n_tokens = [int(n) for n in re.findall(r"· (\d+) tokens ·", html)]
    samples = html[html.index("<div class='sample'>") : html.index("<h2>Config</h2>")]
    assert len(n_tokens) == 2 and samples.count("<span class='tok") == sum(n_tokens)
    selected = samples.count("<span class='tok sel'")
    reported = sum(int(n) for n in re.findall(r"(\d+) CPPO-selected", html))
    assert selected == reported > 0
    assert '"name": "cppo"' in html  # the config


def test_token_spans_shading_and_escaping():
    html = token_spans(["<a>", "b", "c"], np.array([0.0, 0.5, 2.0]), np.array([0, 1, 0]), 1.0)
    assert "&lt;a&gt;" in html
    alphas = [float(a) for a in re.findall(r"rgba\(66,133,244,([0-9.]+)\)", html)]
    assert alphas == [0.0, 0.5, 1.0]
    assert html.count("tok sel") == 1 and "KL 0.5 | CPPO-selected" in html


def test_report_without_rescoring_and_errors(run_dir, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert cli.main(["report", str(run_dir), "--no-rescore", "--out", str(out)]) == 0
    html = out.read_text()
    assert "Re-scoring skipped" in html and "class='sample'" not in html
    assert cli.main(["report", str(tmp_path / "nothing")]) == 2
    assert "no config.json" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Opt-in: the page rendered by headless Chromium (Debian `chromium`).
# --------------------------------------------------------------------------------------------

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@pytest.mark.browser
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("the browser test needs Debian's chromium: apt-get install -y chromium")
    page = build_report(run_dir, n_samples=3, seed=0)
    profile = tmp_path / "profile"
    base = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    dom = subprocess.run(
        [*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    # The DOM as the browser parsed it: curve images decoded from data URIs, highlighted tokens.
    assert dom.count('class="curve"') == 5
    assert re.search(r'<img class="curve" alt="reward" src="data:image/png;base64,', dom)
    assert dom.count('class="tok sel"') >= 1
    shot = tmp_path / "report.png"
    subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(float)
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels.std() > 20  # not a blank page
    # The curves' plot lines (matplotlib's default blue) and the token shading are drawn.
    blue = (
        (abs(pixels[..., 0] - 31) < 20)
        & (abs(pixels[..., 1] - 119) < 20)
        & (abs(pixels[..., 2] - 180) < 20)
    )
    assert blue.sum() > 200
    orange_outline = (
        (pixels[..., 0] > 200) & (abs(pixels[..., 1] - 123) < 25) & (pixels[..., 2] < 40)
    )
    assert orange_outline.sum() > 10
