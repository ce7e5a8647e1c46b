"""docs/results.md and its curves, from the records alone.

Generated sections are rewritten on every build; the text between ``<!-- discussion:NAME -->``
and ``<!-- /discussion:NAME -->`` is kept from the page being replaced.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from . import analyse as A
from .plan import (
    ARM_BY_KEY,
    ARMS,
    COMPARISONS,
    IMAGE_MODES,
    ROOT,
    Settings,
    aliases,
    quickstart_tree,
)
from .stats import Paired, mean_band, mean_std, moving_average

RESULTS_MD = "results.md"
CURVES_PNG = "results_curves.png"
DISCUSSION = re.compile(
    r"<!-- discussion:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /discussion:(?P=name) -->", re.S
)
PENDING = "_Discussion pending: written once the full suite has run._\n"


def discussion_block(name: str, body: str = PENDING) -> str:
    return f"<!-- discussion:{name} -->\n{body}<!-- /discussion:{name} -->"


def merge_discussion(new_text: str, old_text: str | None) -> str:
    """``new_text`` with each discussion block's body taken from ``old_text`` when it has one;
    blocks whose name ``new_text`` lacks are appended, so no hand-written text is lost."""
    if not old_text:
        return new_text
    old = {m["name"]: m["body"] for m in DISCUSSION.finditer(old_text)}
    names = {m["name"] for m in DISCUSSION.finditer(new_text)}
    text = DISCUSSION.sub(
        lambda m: discussion_block(m["name"], old.get(m["name"], m["body"])), new_text
    )
    orphans = [n for n in old if n not in names]
    if orphans:
        text = text.rstrip("\n") + "\n\n## Notes kept from an earlier version\n\n"
        text += "\n\n".join(discussion_block(n, old[n]) for n in orphans) + "\n"
    return text


def pct(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{100 * value:.{digits}f}"


def fmt_pm(values, digits: int = 1) -> str:
    """``"67.2 ± 0.4"``: mean ± sample std over seeds, in %."""
    mean, std = mean_std(list(values))
    if mean is None:
        return "—"
    return pct(mean, digits) + ("" if std is None else f" ± {100 * std:.{digits}f}")


def fmt_p(p: float | None) -> str:
    if p is None:
        return "—"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def paired_cell(r: Paired) -> str:
    """``"+1.2 [-0.5, +2.9], p 0.120"`` (points; bold when the interval excludes 0)."""
    if r.mean is None:
        return "pending"
    if r.lo is None:
        return f"{100 * r.mean:+.1f} (n = {r.n}: no interval)"
    text = f"{100 * r.mean:+.1f} [{100 * r.lo:+.1f}, {100 * r.hi:+.1f}], p {fmt_p(r.p)}"
    return f"**{text}**" if r.resolved else text


def verdict(r: Paired) -> str:
    if r.mean is None:
        return "pending"
    if not r.resolved:
        return "unresolved" + ("" if r.lo is not None else f" (n = {r.n})")
    return "resolved, higher" if r.lo > 0 else "resolved, lower"


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header, rows) -> str:
    lines = [_row(header), "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(lines + [_row(r) for r in rows]) + "\n"


def tuning_section(records: Mapping[str, Mapping], settings: Settings) -> list[str]:
    table, lr = A.tuning_table(records, settings)
    rows = []
    for rate in settings.tune_lrs:
        by_seed = table.get(rate, {})
        cells = [f"{rate:g}", fmt_pm(by_seed.values())]
        cells += [pct(by_seed.get(s)) for s in settings.tune_seeds]
        rows.append(cells + ["**chosen**" if rate == lr else ""])
    header = (
        ["learning rate", "validation acc. %"] + [f"seed {s}" for s in settings.tune_seeds] + [""]
    )
    q_lr = float(quickstart_tree()["optim"]["lr"])
    if lr is None:
        verdict = "_Pending: the tuning runs have not all finished._"
    else:
        mains = [r for r in records.values() if r["spec"]["kind"] == "main"]
        other = sorted(r["name"] for r in mains if r["resolved"].get("lr") != lr)
        verdict = (
            f"Chosen learning rate: **{lr:g}** (highest mean validation accuracy; the "
            f"quickstart's is {q_lr:g}). "
            + (
                f"Every main run below ({len(mains)}) uses {lr:g} (its record's `resolved.lr`)."
                if not other
                else f"**Warning**: {len(other)} main run(s) used another rate: "
                + ", ".join(other[:5])
            )
        )
    return [_table(header, rows), verdict, ""]


def comparisons_section(arms) -> list[str]:
    """One row per comparison, one column per metric, and the verdicts in words."""
    header = ["comparison", "arm", "control", "seeds"] + [label for _, label in A.METRICS]
    rows, lines = [], []
    for c in COMPARISONS:
        results = [(label, A.compare(arms, c, key)) for key, label in A.METRICS]
        n = max(r.n for _, r in results)
        rows.append(
            [c.title, A.arm_label(c.arm), A.arm_label(c.control), str(n)]
            + [paired_cell(r) for _, r in results]
        )
        said = [f"{label}: {verdict(r)}" for label, r in results[:3]]
        lines.append(f"- **{c.title}** ({c.what}): " + "; ".join(said) + ".")
    resolved = sum(
        A.compare(arms, c, key).resolved for c in COMPARISONS for key, _ in A.METRICS[:3]
    )
    return [
        "Each cell: mean of the per-seed differences in points, its 95% t-interval and the "
        "two-sided paired t p-value; **bold** = resolved (the interval excludes 0). "
        f"{resolved} of {3 * len(COMPARISONS)} headline comparisons (test accuracy, real - gray "
        "drop, easy-vqa-cf) are resolved; every other one is **not resolved**: the data do "
        "not tell its sign.",
        "",
        *lines,
        "",
        _table(header, rows),
    ]


def arms_section(arms, before: Mapping | None) -> list[str]:
    keys = [("test/real", "test real"), ("test/gray", "gray image"), ("test/other", "other image"),
            ("test/drop", "real - gray"), ("cf", "easy-vqa-cf"), ("test/general", "general"),
            ("test/vd", "vision-dep."), ("val", "validation")]  # fmt: skip
    header = ["arm", "seeds"] + [label for _, label in keys] + ["DS rounds/step", "train s"]
    rows = []
    if before:
        rows.append(["start model (before RL)", "—"] + [pct(before.get(k)) for k, _ in keys]
                    + ["—", "—"])  # fmt: skip
    alias = aliases()
    for arm in ARMS:
        if arm.key in alias:
            continue
        runs = arms.get(arm.key, {})
        cells = [arm.label, str(len(runs)) if runs else "pending"]
        cells += [fmt_pm(A.values(runs, k).values()) for k, _ in keys]
        rounds = [r["train"]["ds_rounds"] for r in runs.values()]
        secs = [r["timing"].get("train_s") for r in runs.values()]
        m_r, m_s = mean_std(rounds)[0], mean_std(secs)[0]
        cells += ["—" if m_r is None else f"{m_r:.2f}", "—" if m_s is None else f"{m_s:.0f}"]
        rows.append(cells)
    return [_table(header, rows)]


def by_step_section(arms) -> list[str]:
    parts = []
    for c in COMPARISONS:
        steps = A.compare_by_step(arms, c)
        if not steps:
            continue
        rows = [[str(s), str(r.n), paired_cell(r), verdict(r)] for s, r in steps.items()]
        parts += [f"**{c.title}** ({A.arm_label(c.arm)} minus {A.arm_label(c.control)}), "
                  "validation accuracy:", ""]  # fmt: skip
        parts += [_table(["step", "seeds", "diff [95% CI], p", "verdict"], rows)]
    return parts or ["_Pending._", ""]


def _band(ax, runs, label, color, ls="-") -> None:
    by_step = A.curves_by_step({s: A.curve(r) for s, r in runs.items()})
    if not by_step:
        return
    steps = list(by_step)
    bands = [mean_band(list(by_step[s].values())) for s in steps]
    ax.plot(steps, [100 * m for m, _ in bands], marker="o", ms=3, color=color, ls=ls,
            label=f"{label} (n={len(runs)})")  # fmt: skip
    lo = [100 * (m - h) for m, h in bands]
    hi = [100 * (m + h) for m, h in bands]
    ax.fill_between(steps, lo, hi, color=color, alpha=0.15)


def plot_curves(arms, path: Path, *, window: int = 5) -> Path | None:
    """One panel per comparison (validation accuracy of the arm and its control, mean and 95%
    t band over seeds), and the training reward of every arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(arms.values()):
        return None
    fig, axes = plt.subplots(2, 4, figsize=(15.0, 7.0))
    flat = list(axes.flat)
    for ax, c in zip(flat, COMPARISONS):
        _band(ax, arms.get(c.arm, {}), A.arm_label(c.arm), "#d62728")
        _band(ax, arms.get(c.control, {}), A.arm_label(c.control), "#555555", "--")
        ax.set_title(c.title, fontsize=9)
        ax.set_ylabel("validation accuracy %", fontsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="lower right")
    ax = flat[len(COMPARISONS)]
    cmap = plt.get_cmap("tab10")
    alias = aliases()
    for i, arm in enumerate(a for a in ARMS if a.key not in alias and arms.get(a.key)):
        runs = arms[arm.key]
        rewards = A.curves_by_step(
            {s: dict(zip(r["train"]["reward"]["step"], r["train"]["reward"]["value"]))
             for s, r in runs.items()}
        )  # fmt: skip
        if rewards:
            mean = [sum(v.values()) / len(v) for v in rewards.values()]
            ax.plot(list(rewards), moving_average(mean, window), color=cmap(i % 10),
                    label=arm.label[:24])  # fmt: skip
    ax.set_title(f"training reward, seed mean, {window}-step moving mean", fontsize=9)
    ax.legend(fontsize=5, loc="lower right")
    for ax in flat:
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _setup(settings: Settings, records) -> list[str]:
    q = quickstart_tree()
    n_test = "all 9,673" if settings.test_limit is None else f"the first {settings.test_limit:,}"
    seeds = sorted({r["spec"]["seed"] for r in records.values() if r["spec"]["kind"] == "main"})
    eqr = [r["resolved"].get("prompts_per_step") for r in records.values()
           if r["spec"]["kind"] == "main" and r["resolved"].get("prompts_per_step")]  # fmt: skip
    alias = aliases()
    same = "; ".join(f"{ARM_BY_KEY[a].label} = {ARM_BY_KEY[b].label}" for a, b in alias.items())
    return [
        f"- **Training**: the embedded default (`vispo/configs/quickstart.yaml`: easy-vqa train "
        f"less the validation images, template `{q['data']['template']}`, reward "
        f"`{q['reward']['name']}`, {q['train']['prompts_per_step']} prompts x {q['rollout']['n']} "
        f"responses per step, at most {q['rollout']['max_new_tokens']} new tokens) with its "
        f"objective replaced by a preset (`vispo/algos/objective.py`, `PRESETS`, plus "
        f"`mask_patch_size: 16`), **{settings.steps} steps**, one thread per run; the learning "
        "rate is the tuning stage's choice.",
        f"- **Seeds**: {', '.join(map(str, seeds)) or 'pending'} per arm. `train.seed` seeds "
        "the prompt order, masks, perturbations and sampling: two arms at one seed see the same "
        "prompt stream, so comparisons are paired by seed.",
        "- **Controls**: each term is compared with a run identical in every field but the term. "
        "Where that control's built config equals another arm's in every field but the preset's "
        f"name, that arm's runs serve (checked by `plan.aliases()` when the plan is built): {same}.",
        "- **DAPO at equal rollouts**: GRPO is given DAPO's prompts consumed per step (16 x the "
        "mean `dynamic_sampling/rounds` of DAPO's run of the same seed) as its "
        "`train.prompts_per_step`, so both generate as many rollouts in the same number of "
        "updates" + (f" (here {min(eqr)}-{max(eqr)} prompts per step)." if eqr else "."),
        f"- **Validation** (all tuning and all curves): the trainer's greedy accuracy on the "
        f"first {settings.curve_size} questions of the validation split (`data.eval_split: "
        f"validation`: images carved from easy-vqa's train split, never trained on) every "
        f"{settings.eval_every} steps.",
        f"- **Test** (once per run, at the end): greedy answers to {n_test} easy-vqa test "
        f"questions in three image modes ({', '.join(IMAGE_MODES)}: the real image, a uniform "
        "gray image, another test sample's image); the **real - gray drop** is the headline "
        "measure of looking. *Vision-dependent* = the text prior (67.0% on test) answers it "
        "wrongly. **easy-vqa-cf**: drawn images whose answer contradicts each question's text "
        "prior (a model that answers from the text alone scores 0).",
        "- **Statistics**: per comparison, the per-seed differences (arm minus control); their "
        "mean, 95% t-interval and two-sided paired t p-value. *Resolved* = the interval "
        "excludes 0. Means ± sample std over seeds in the arm table.",
    ]


def render_report(records: Mapping[str, Mapping], settings: Settings, *, curves, docs) -> str:
    arms = A.by_arm(records)
    parts = [
        "# Does perception-aware RL help? A small-scale reproduction",
        "",
        "<!-- Generated by `python -m benchmarks.reproduce --report` from the records in "
        "benchmarks/results/reproduce/; only the discussion blocks are hand-written. -->",
        "",
    ]
    if settings.quick:
        parts += ["> **Smoke configuration (`--quick`)**: these numbers test the pipeline; "
                  "they are not results.", ""]  # fmt: skip
    n_main = sum(r["spec"]["kind"] == "main" for r in records.values())
    parts += [
        f"Records: {len(records)} runs ({n_main} main runs), start model weights sha256 "
        f"`{settings.model_sha256[:12]}`.",
        "",
        discussion_block("summary"),
        "",
        "## Comparisons (arm minus its control, paired by seed)",
        "",
        *comparisons_section(arms),
        discussion_block("main"),
        "",
        "## Every arm: accuracy by image mode and on the counterfactual set",
        "",
        "Greedy accuracy in %, mean ± sample std over seeds.",
        "",
        *arms_section(arms, A.before(records)),
        discussion_block("perception"),
        "",
        "## Tuning (validation only)",
        "",
        f"GRPO at each learning rate, seeds {', '.join(map(str, settings.tune_seeds))}, scored by the "
        "validation accuracy at the last step; no test question is evaluated in these runs.",
        "",
        *tuning_section(records, settings),
        "## Learning curves and the comparison at every evaluated step",
        "",
    ]
    if curves is not None:
        parts += [f"![learning curves]({os.path.relpath(curves, docs)})", ""]
    parts += by_step_section(arms)
    parts += [discussion_block("curves"), "", "## Setup", "", *_setup(settings, records), ""]
    parts += ["## Discussion", "", discussion_block("discussion"), "", *_rerun(settings)]
    parts += ["<details><summary>All runs</summary>", "", _all_runs(records), "</details>", ""]
    return "\n".join(parts)


def _rerun(settings: Settings) -> list[str]:
    return [
        "## How to rerun",
        "",
        "```",
        "make reproduce                              # = python -m benchmarks.reproduce --jobs 2",
        "python -m benchmarks.reproduce --dry-run    # the plan and its estimated wall time",
        "python -m benchmarks.reproduce --quick      # smoke run, runs/reproduce-quick",
        "python -m benchmarks.reproduce --report     # this page from the committed records",
        "```",
        "",
        "Each run writes `benchmarks/results/reproduce/<run>.json` (config, final and per-eval "
        "metrics, per-question correctness as base64 bitsets in benchmark order); this page is "
        "built from those files alone. Interrupting is safe: a rerun skips runs with a record "
        f"and resumes the others from their last checkpoint (every {settings.save_every} steps).",
        "",
    ]


def _all_runs(records) -> str:
    rows = []
    for name in sorted(records):
        r = records[name]
        f = r["final"]
        lr = r["spec"].get("lr") or r["resolved"].get("lr")
        rows.append([name, r["status"], "—" if lr is None else f"{lr:g}",
                     str(r["resolved"].get("prompts_per_step") or ""), pct(f.get("val")),
                     pct(f.get("test/real")), pct(f.get("test/gray")), pct(f.get("test/other")),
                     pct(f.get("cf")), str(len(r["train"].get("guard_events", []) or [])),
                     f"{r['train'].get('ds_rounds') or 0:.2f}",
                     f"{r['timing'].get('train_s', 0):.0f}"])  # fmt: skip
    header = ["run", "status", "lr", "prompts/step", "val", "test", "gray", "other", "cf",
              "guard events", "DS rounds", "train s"]  # fmt: skip
    return _table(header, rows)


def write_report(records: Mapping[str, Mapping], settings: Settings, docs: Path) -> Path:
    """Write ``docs/results.md`` and the curves PNG from ``records``."""
    curves = plot_curves(A.by_arm(records), docs / CURVES_PNG)
    text = render_report(records, settings, curves=curves, docs=docs)
    md = docs / RESULTS_MD
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(merge_discussion(text, md.read_text() if md.exists() else None))
    return md


def relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)
