"""Markdown tables of evaluation results: one run, or several models side by side with deltas.

Scores are printed in percent with two decimals, as the papers do; deltas against the first
model (the baseline) are absolute, in percentage points, and relative, in percent of the
baseline ("+2.00 (+4.2%)").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from vispo.eval.metrics import deltas, merge_row_names, row_value, table_rows


def pct(x: float | None) -> str:
    """A fraction as a percentage with two decimals ("—" for a missing value)."""
    return "—" if x is None else f"{100.0 * x:.2f}"


def delta_text(baseline: float | None, value: float | None) -> str:
    """``"+2.00 (+4.2%)"``: absolute change in points, relative change in percent."""
    if baseline is None or value is None:
        return "—"
    absolute, relative = deltas(baseline, value)
    rel = "n/a" if relative is None else f"{100.0 * relative:+.1f}%"
    return f"{100.0 * absolute:+.2f} ({rel})"


def _label(kind: str, name: str) -> str:
    if kind == "group":
        return f"**{name} (macro)**"
    if kind == "overall":
        return f"**{name}**" if "macro" in name else name
    return name


def mode_title(mode: str, info: Mapping) -> str:
    """A column title such as ``avg@8 (T=1.0, top_p=1.0)`` or ``greedy``."""
    if mode == "greedy":
        return "greedy"
    return f"{mode} (T={info['temperature']:g}, top_p={info['top_p']:g})"


def run_table(result: Mapping) -> str:
    """Markdown for one model: a row per benchmark, group and overall; a column per mode."""
    modes = list(result["modes"])
    if not modes:
        raise ValueError("the result has no evaluation mode")
    first = result["modes"][modes[0]]["summary"]
    header = ["benchmark", "group", "n"] + [mode_title(m, result["modes"][m]) for m in modes]
    lines = [
        f"## vispo eval: {result['label']}",
        "",
        f"Model: `{result['model']['spec']}`"
        + (
            f" (checkpoint {result['model']['checkpoint']})"
            if result["model"].get("checkpoint")
            else ""
        )
        + ". Scores in %; groups are macro averages of their benchmarks.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---", "---", "---:"] + ["---:"] * len(modes)) + "|",
    ]
    for kind, name, _ in table_rows(first):
        if kind == "benchmark":
            info = first["benchmarks"][name]
            group, n = info["group"], str(info["n"])
        elif kind == "group":
            group, n = (
                "",
                str(sum(first["benchmarks"][b]["n"] for b in first["groups"][name]["benchmarks"])),
            )
        else:
            group, n = "", str(first["overall"]["n"])
        values = [pct(row_value(result["modes"][m]["summary"], kind, name)) for m in modes]
        lines.append("| " + " | ".join([_label(kind, name), group, n, *values]) + " |")
    return "\n".join(lines) + "\n"


def comparison_table(results: Sequence[Mapping], mode: str) -> str:
    """Markdown comparing several models' ``mode`` scores; deltas are against ``results[0]``."""
    if len(results) < 2:
        raise ValueError("a comparison needs at least two results")
    present = [r for r in results if mode in r["modes"]]
    if len(present) != len(results):
        missing = [r["label"] for r in results if mode not in r["modes"]]
        raise ValueError(f"mode {mode!r} is missing from the results of {missing}")
    summaries = [r["modes"][mode]["summary"] for r in results]
    base = results[0]
    header = ["benchmark", base["label"]]
    for r in results[1:]:
        header += [r["label"], f"Δ vs {base['label']}"]
    lines = [
        f"### {mode_title(mode, results[0]['modes'][mode])}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for kind, name in merge_row_names(summaries):
        base_value = row_value(summaries[0], kind, name)
        cells = [_label(kind, name), pct(base_value)]
        for summary in summaries[1:]:
            value = row_value(summary, kind, name)
            cells += [pct(value), delta_text(base_value, value)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison_markdown(results: Sequence[Mapping]) -> str:
    """Side-by-side tables for every mode that all results share."""
    shared = [m for m in results[0]["modes"] if all(m in r["modes"] for r in results)]
    if not shared:
        raise ValueError("the results share no evaluation mode")
    labels = ", ".join(f"`{r['label']}`" for r in results)
    parts = [
        "## vispo eval: comparison",
        "",
        f"Models: {labels}. Scores in %; Δ = absolute change in points (relative change).",
        "",
    ]
    parts += [comparison_table(results, m) for m in shared]
    return "\n".join(parts)
