"""``vispo report RUN_DIR``: one self-contained HTML page about a training run.

The page holds, with every image embedded as a base64 ``data:`` URI (it can be mailed or
archived as one file and opened offline):

* the training curves (matplotlib PNGs): reward, accuracy, response length, perception KL,
  the original- and masked-image entropies, the clip fractions; collapse-guard events are
  drawn as red dashed lines and listed;
* the run's config;
* the evaluation table (``RUN_DIR/eval/eval.json``, written by ``vispo eval RUN_DIR``) and
  the probe summary with its histograms (``RUN_DIR/probe/probe.json``) when present;
* sample completions re-generated with the run's latest checkpoint, with their images
  (original, PAPO-masked, CPPO's information-removing view). Each response token is shaded
  by its perception KL against the masked image (the run's mask settings when it is a PAPO
  run, PAPO's defaults otherwise), and the tokens CPPO's selection rule picks (entropy rise
  under the information-removing view, the run's ``cpl_top_frac`` or 0.5) are outlined.
  Advantage gating is not applied: a single displayed response has no group advantage.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vispo.train.checkpoint import checkpoint_dirs, latest_checkpoint
from vispo.train.curves import PANELS, draw_panel, panels
from vispo.train.logging import image_data_uri, read_metrics

#: Curve panels: the same as ``curves.png`` (see :mod:`vispo.train.curves`).
CURVE_PANELS = PANELS

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1180px;color:#1d1d1f;line-height:1.4;padding:0 16px}
h1{font-size:24px;margin-bottom:4px}h2{font-size:19px;border-bottom:1px solid #ddd;
padding-bottom:4px;margin-top:32px}.sub{color:#666;margin-top:0}
.curves{display:flex;flex-wrap:wrap;gap:10px}.curves img{border:1px solid #e3e3e3;
border-radius:4px;width:370px}
table{border-collapse:collapse;font-size:14px;margin:8px 0}td,th{border:1px solid #d6d6d6;
padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}
tr.group td{font-weight:600;background:#f4f6fa}tr.overall td{font-weight:700;background:#eef2f8}
pre.config{background:#f7f7f7;border:1px solid #e3e3e3;padding:10px;font-size:12px;
max-height:420px;overflow:auto}
.sample{border:1px solid #e3e3e3;border-radius:6px;padding:12px;margin:14px 0}
.sample .imgs{display:flex;gap:12px}.sample figure{margin:0;text-align:center;font-size:12px;
color:#555}.sample figure img{width:128px;height:128px;object-fit:contain;
image-rendering:pixelated;border:1px solid #ccc}
.response{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:14px;white-space:pre-wrap;
line-height:1.9;margin-top:8px}
.tok{border-radius:2px;padding:1px 0}
.tok.sel{outline:2px solid #e07b00;outline-offset:-1px;font-weight:700}
.legend span{margin-right:14px}.events{color:#b00020}
.muted{color:#777;font-size:13px}
"""


# --------------------------------------------------------------------------------------------
# Run contents
# --------------------------------------------------------------------------------------------


def guard_events(run_dir: str | Path, metrics: Sequence[dict]) -> list[dict]:
    """Collapse-guard events: from the latest checkpoint's state (with their signals) and
    from ``guard/event`` entries in ``metrics.jsonl``, merged by step."""
    events: dict[int, dict] = {}
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        state = json.loads((ckpt / "state.json").read_text())
        for e in state.get("guard", {}).get("events", []):
            events[int(e["step"])] = {
                "step": int(e["step"]),
                "signals": e.get("signals", {}),
                "action": e.get("action", ""),
            }
    for m in metrics:
        if m.get("guard/event"):
            events.setdefault(int(m["step"]), {"step": int(m["step"]), "signals": {}, "action": ""})
    return [events[s] for s in sorted(events)]


def _png_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def curve_images(metrics: Sequence[dict], events: Sequence[int]) -> list[tuple[str, str]]:
    """``(title, data URI)`` of each curve panel that has data (:func:`vispo.train.curves.panels`,
    the panels of ``curves.png``); guard events marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for title, lines in panels(metrics):
        fig, ax = plt.subplots(figsize=(4.6, 3.2))
        draw_panel(ax, metrics, title, lines, events)
        fig.tight_layout()
        out.append((title, _png_uri(fig)))
        plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------
# HTML pieces
# --------------------------------------------------------------------------------------------


def _esc(x) -> str:
    return html.escape(str(x))


def eval_table_html(result: dict) -> str:
    """The ``eval.json`` summary as an HTML table (scores in %)."""
    from vispo.eval.metrics import row_value, table_rows
    from vispo.eval.tables import mode_title, pct

    modes = list(result["modes"])
    first = result["modes"][modes[0]]["summary"]
    head = "".join(f"<th>{_esc(mode_title(m, result['modes'][m]))}</th>" for m in modes)
    rows = [f"<tr><th>benchmark</th><th>group</th><th>n</th>{head}</tr>"]
    for kind, name, _ in table_rows(first):
        if kind == "benchmark":
            info = first["benchmarks"][name]
            group, n = info["group"], info["n"]
        else:
            group, n = "", ""
        cells = "".join(
            f"<td>{pct(row_value(result['modes'][m]['summary'], kind, name))}</td>" for m in modes
        )
        label = f"{name} (macro)" if kind == "group" else name
        rows.append(
            f"<tr class='{kind}'><td>{_esc(label)}</td><td>{_esc(group)}</td><td>{n}</td>"
            f"{cells}</tr>"
        )
    return "<table>" + "".join(rows) + "</table>"


def probe_html(result: dict, folder: Path) -> str:
    """The probe summary table and its histograms (embedded)."""
    rows = [
        "<tr><th>benchmark</th><th>n</th><th>KL masked</th><th>KL no image</th>"
        "<th>changed, masked</th><th>changed, no image</th></tr>"
    ]
    images = []
    for name, info in result["benchmarks"].items():
        s = info["summary"]
        rows.append(
            f"<tr><td>{_esc(name)}</td><td>{s['n']}</td><td>{s['kl_mask_mean']:.4g}</td>"
            f"<td>{s['kl_blank_mean']:.4g}</td><td>{100 * s['frac_changed_mask']:.1f}%</td>"
            f"<td>{100 * s['frac_changed_blank']:.1f}%</td></tr>"
        )
        png = folder / info.get("histogram", "")
        if info.get("histogram") and png.is_file():
            uri = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
            images.append(f"<img class='probe-hist' src='{uri}' alt='probe {_esc(name)}'>")
    return "<table>" + "".join(rows) + "</table>" + "".join(images)


def token_spans(
    tokens: Sequence[str], kl: np.ndarray, selected: np.ndarray | None, scale: float
) -> str:
    """Response tokens as ``<span>``s shaded by KL (alpha = KL / scale, capped at 1) and
    outlined (class ``sel``) where CPPO selects them; the title shows the values."""
    parts = []
    for i, tok in enumerate(tokens):
        value = float(kl[i])
        alpha = 0.0 if scale <= 0 else min(1.0, max(0.0, value / scale))
        cls = "tok sel" if selected is not None and bool(selected[i]) else "tok"
        title = f"KL {value:.4g}" + (" | CPPO-selected" if "sel" in cls else "")
        parts.append(
            f"<span class='{cls}' style='background:rgba(66,133,244,{alpha:.3f})' "
            f"title='{_esc(title)}'>{_esc(tok)}</span>"
        )
    return "".join(parts)


def sample_html(analysis, scale: float, reward_value: float | None) -> str:
    """One question: its images, question, reference answer and shaded response."""
    figs = []
    for label, imgs in (
        ("original", analysis.images),
        ("masked (PAPO)", analysis.masked),
        ("I- (CPPO)", analysis.negative or []),
    ):
        for im in imgs:
            figs.append(
                f"<figure><img src='{image_data_uri(im)}' alt='{_esc(label)}'>"
                f"<figcaption>{_esc(label)}</figcaption></figure>"
            )
    n_sel = int(analysis.cppo_selected.sum()) if analysis.cppo_selected is not None else 0
    reward = "" if reward_value is None else f" · accuracy {reward_value:.3g}"
    return (
        "<div class='sample'>"
        f"<div class='imgs'>{''.join(figs)}</div>"
        f"<p><b>Q:</b> {_esc(analysis.sample.question)}<br>"
        f"<b>Reference:</b> {_esc(analysis.sample.answer)}"
        f"<span class='muted'> · {len(analysis.tokens)} tokens · mean KL "
        f"{analysis.mean_kl_mask:.4g} · {n_sel} CPPO-selected{reward}</span></p>"
        f"<div class='response'>"
        f"{token_spans(analysis.tokens, analysis.kl_mask, analysis.cppo_selected, scale)}"
        "</div></div>"
    )


# --------------------------------------------------------------------------------------------
# Re-scoring samples with the run's checkpoint
# --------------------------------------------------------------------------------------------


def rescore_samples(
    run_dir: str | Path,
    *,
    n_samples: int = 4,
    max_new_tokens: int | None = None,
    seed: int = 0,
    loaded=None,
):
    """Generate and analyse ``n_samples`` held-out questions with the run's latest checkpoint.

    Returns ``(analyses, rewards, notes)``: per question its :class:`TokenAnalysis`, the
    accuracy of its response under the run's reward (None if unavailable), and a line
    describing the settings used.
    """
    from vispo.data import get_template
    from vispo.eval.accuracy import correctness, reward_inputs
    from vispo.eval.loading import load_model_spec
    from vispo.eval.probe import ProbeSettings, analyse_batch
    from vispo.train.batch import image_budget
    from vispo.train.setup import load_reward, load_split

    loaded = loaded or load_model_spec(str(run_dir))
    cfg = loaded.config
    try:
        data = load_split(cfg.data, cfg.data.eval_split, n_samples)
    except (ValueError, OSError):  # no held-out split in a user's data: use train
        data = load_split(cfg.data, cfg.data.split, n_samples)
    samples = [data[i] for i in range(min(n_samples, len(data)))]
    obj = cfg.objective
    papo = obj.gamma > 0 or obj.eta_mask > 0
    settings = ProbeSettings(
        mask_ratio=obj.mask_ratio if papo else 0.6,
        patch_size=obj.mask_patch_size if papo else 14,
        seed=seed,
        sample=True,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
    ).validate()
    top_frac = obj.cpl_top_frac if obj.cpl_lambda > 0 else 0.5
    max_new = max_new_tokens or cfg.rollout.max_new_tokens
    analyses, _ = analyse_batch(
        loaded.model,
        loaded.processor,
        samples,
        get_template(cfg.data.template),
        settings,
        max_new_tokens=max_new,
        budget=image_budget(loaded.processor),
        batch_seed=seed,
        with_cppo=True,
        cppo_top_frac=top_frac,
    )
    rewards: list[float | None] = [None] * len(analyses)
    try:
        with load_reward(cfg.reward) as reward:
            texts = [a.response for a in analyses]
            rewards = correctness(
                reward,
                texts,
                [a.sample.answer for a in analyses],
                **reward_inputs([a.sample for a in analyses], texts, loaded.processor),
            )
    except (ValueError, ImportError, AttributeError, FileNotFoundError, TypeError):
        pass  # a reward file that moved: the page still shows the responses
    kind = "the run's PAPO mask settings" if papo else "a fresh PAPO mask"
    note = (
        f"Checkpoint {loaded.checkpoint.name}; {len(analyses)} held-out questions, one response "
        f"each sampled at T={settings.temperature:g} (seed {seed}), max {max_new} tokens. "
        f"Shading: per-token perception KL against {kind} (ratio {settings.mask_ratio:g}, "
        f"{settings.patch_size} px). Outlined: tokens CPPO selects (top "
        f"{100 * top_frac:.0f}% by entropy rise under I-, no advantage gating)."
    )
    return analyses, rewards, note


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------


def build_report(
    run_dir: str | Path,
    out_path: str | Path | None = None,
    *,
    n_samples: int = 4,
    rescore: bool = True,
    max_new_tokens: int | None = None,
    seed: int = 0,
) -> Path:
    """Write the HTML report of ``run_dir`` (default ``RUN_DIR/report.html``); returns its path."""
    run = Path(run_dir)
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a vispo run folder (no config.json)")
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    config_tree = json.loads(cfg_path.read_text())
    metrics = read_metrics(run)
    events = guard_events(run, metrics)
    curves = curve_images(metrics, [e["step"] for e in events])
    train_steps = [m["step"] for m in metrics if "reward/mean" in m]
    ckpts = checkpoint_dirs(run)

    objective = config_tree.get("objective", {}).get("name", "?")
    model_name = config_tree.get("model", {}).get("name_or_path", "?")
    data_name = config_tree.get("data", {}).get("name", "?")
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>vispo report: {_esc(run.resolve().name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>vispo report: {_esc(run.resolve().name)}</h1>",
        f"<p class='sub'>objective <b>{_esc(objective)}</b> · model <b>{_esc(model_name)}</b>"
        f" · data <b>{_esc(data_name)}</b> · {len(train_steps)} logged steps · "
        f"{len(ckpts)} checkpoint(s)"
        + (f" (latest {_esc(ckpts[-1].name)})" if ckpts else "")
        + "</p>",
        "<h2>Training curves</h2>",
    ]
    if curves:
        parts.append("<section id='curves' class='curves'>")
        parts += [f"<img class='curve' alt='{_esc(title)}' src='{uri}'>" for title, uri in curves]
        parts.append("</section>")
    else:
        parts.append("<p class='muted' id='curves'>No metrics logged yet.</p>")
    if events:
        items = "".join(
            f"<li>step {e['step']}: {_esc(e['action'] or 'event')}"
            + (
                " (" + ", ".join(f"{_esc(k)} z={v:.1f}" for k, v in e["signals"].items()) + ")"
                if e["signals"]
                else ""
            )
            + "</li>"
            for e in events
        )
        parts.append(
            f"<div class='events'><b>Collapse-guard events</b> (red dashed lines):<ul>{items}"
            "</ul></div>"
        )
    else:
        parts.append("<p class='muted'>No collapse-guard event.</p>")

    eval_json = run / "eval" / "eval.json"
    if eval_json.is_file():
        parts.append("<h2>Evaluation</h2><section id='eval'>")
        parts.append(eval_table_html(json.loads(eval_json.read_text())))
        parts.append("</section>")
    probe_json = run / "probe" / "probe.json"
    if probe_json.is_file():
        parts.append("<h2>Vision-dependence probe</h2><section id='probe'>")
        parts.append(probe_html(json.loads(probe_json.read_text()), probe_json.parent))
        parts.append("</section>")

    parts.append("<h2>Sample completions</h2><section id='samples'>")
    if rescore and n_samples > 0 and ckpts:
        analyses, rewards, note = rescore_samples(
            run, n_samples=n_samples, max_new_tokens=max_new_tokens, seed=seed
        )
        all_kl = np.concatenate([a.kl_mask for a in analyses]) if analyses else np.zeros(0)
        scale = float(np.quantile(all_kl, 0.95)) if all_kl.size else 0.0
        scale = scale if scale > 0 else float(all_kl.max()) if all_kl.size else 0.0
        parts.append(f"<p class='muted'>{_esc(note)}</p>")
        parts.append(
            "<p class='legend'><span><span class='tok' style='background:rgba(66,133,244,1)'>"
            f"&nbsp;tok&nbsp;</span> KL ≥ {scale:.3g} (95th percentile)</span>"
            "<span><span class='tok' style='background:rgba(66,133,244,0.3)'>&nbsp;tok&nbsp;"
            "</span> lower KL</span><span><span class='tok sel'>&nbsp;tok&nbsp;</span> "
            "CPPO-selected perception token</span></p>"
        )
        parts += [sample_html(a, scale, r) for a, r in zip(analyses, rewards)]
    elif not ckpts:
        parts.append("<p class='muted'>No checkpoint: nothing to re-score.</p>")
    else:
        parts.append("<p class='muted'>Re-scoring skipped.</p>")
    parts.append("</section>")

    parts.append("<h2>Config</h2>")
    parts.append(
        f"<pre class='config' id='config'>{html.escape(json.dumps(config_tree, indent=2), quote=False)}</pre>"
    )
    parts.append("</body></html>")

    out = Path(out_path) if out_path is not None else run / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
