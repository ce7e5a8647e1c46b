"""avg@k arithmetic, benchmark groups, and model-vs-model deltas (pure Python, no model).

The papers' protocol (algorithms.md section 12):

1. each question gets ``k`` sampled answers, each scored 0 or 1 (or a partial credit in
   [0, 1]); the question's score is their mean;
2. a benchmark's avg@k is the mean of its questions' scores;
3. a group (``general``, ``vision-dependent``) is the **macro** average of its benchmarks'
   avg@k: every benchmark weighs the same, however many questions it has. The pooled
   **micro** average (every question weighs the same) is reported beside it.

Greedy accuracy is the same computation with ``k = 1`` at temperature 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence


def question_score(correct: Sequence[float]) -> float:
    """Mean correctness of one question's ``k`` answers."""
    if len(correct) == 0:
        raise ValueError("a question needs at least one scored answer")
    for c in correct:
        if not (isinstance(c, (int, float)) and math.isfinite(c) and 0.0 <= c <= 1.0):
            raise ValueError(f"correctness values must be in [0, 1], got {c!r}")
    return sum(correct) / len(correct)


def avg_at_k(per_question: Sequence[Sequence[float]]) -> float:
    """avg@k of one benchmark: the mean over questions of each question's mean correctness.

    Questions may have different numbers of answers (each is averaged on its own first).
    """
    if len(per_question) == 0:
        raise ValueError("avg@k of an empty benchmark is undefined")
    return sum(question_score(c) for c in per_question) / len(per_question)


def pass_at_least_one(per_question: Sequence[Sequence[float]]) -> float:
    """Fraction of questions with at least one fully correct answer among their ``k``."""
    if len(per_question) == 0:
        raise ValueError("an empty benchmark has no pass rate")
    return sum(any(c >= 1.0 for c in q) for q in per_question) / len(per_question)


def macro_average(scores: Mapping[str, float]) -> float:
    """Unweighted mean of benchmark scores (every benchmark counts once)."""
    if not scores:
        raise ValueError("macro average of no benchmark is undefined")
    return sum(scores.values()) / len(scores)


def micro_average(per_benchmark: Mapping[str, Sequence[Sequence[float]]]) -> float:
    """Mean question score over the pooled questions of all benchmarks."""
    pooled = [q for questions in per_benchmark.values() for q in questions]
    return avg_at_k(pooled)


def summarize(
    per_benchmark: Mapping[str, Sequence[Sequence[float]]],
    groups: Mapping[str, str],
) -> dict:
    """Scores of one evaluation mode.

    Args:
        per_benchmark: benchmark name -> per question, its answers' correctness.
        groups: benchmark name -> group name (e.g. ``"general"``, ``"vision-dependent"``).

    Returns:
        ``{"benchmarks": {name: {"score", "n", "k", "pass_any", "group"}},
        "groups": {group: {"macro", "micro", "benchmarks"}},
        "overall": {"macro", "micro", "n"}}``, scores as fractions in [0, 1].
    """
    missing = [b for b in per_benchmark if b not in groups]
    if missing:
        raise ValueError(f"no group for benchmark(s) {missing}")
    benchmarks = {}
    for name, questions in per_benchmark.items():
        ks = sorted({len(q) for q in questions})
        benchmarks[name] = {
            "score": avg_at_k(questions),
            "n": len(questions),
            "k": ks[0] if len(ks) == 1 else ks,
            "pass_any": pass_at_least_one(questions),
            "group": groups[name],
        }
    by_group: dict[str, list[str]] = {}
    for name in per_benchmark:
        by_group.setdefault(groups[name], []).append(name)
    group_scores = {
        group: {
            "macro": macro_average({n: benchmarks[n]["score"] for n in names}),
            "micro": micro_average({n: per_benchmark[n] for n in names}),
            "benchmarks": names,
        }
        for group, names in by_group.items()
    }
    overall = {
        "macro": macro_average({n: b["score"] for n, b in benchmarks.items()}),
        "micro": micro_average(per_benchmark),
        "n": sum(b["n"] for b in benchmarks.values()),
    }
    return {"benchmarks": benchmarks, "groups": group_scores, "overall": overall}


def deltas(baseline: float, value: float) -> tuple[float, float | None]:
    """``(absolute, relative)`` change from ``baseline`` to ``value``.

    Absolute is ``value - baseline`` (in the scores' unit); relative is that change divided
    by the baseline (None when the baseline is 0), as the papers' "+x.x%" columns.
    """
    absolute = value - baseline
    relative = None if baseline == 0 else absolute / baseline
    return absolute, relative


def table_rows(summary: Mapping) -> list[tuple[str, str, float]]:
    """``(kind, name, score)`` rows of a summary in display order: benchmarks group by
    group, each group's macro average after its benchmarks, then the overall averages."""
    rows: list[tuple[str, str, float]] = []
    for group, info in summary["groups"].items():
        for name in info["benchmarks"]:
            rows.append(("benchmark", name, summary["benchmarks"][name]["score"]))
        if len(summary["groups"]) > 1 or len(info["benchmarks"]) > 1:
            rows.append(("group", group, info["macro"]))
    rows.append(("overall", "overall (macro)", summary["overall"]["macro"]))
    rows.append(("overall", "overall (micro)", summary["overall"]["micro"]))
    return rows


def merge_row_names(summaries: Iterable[Mapping]) -> list[tuple[str, str]]:
    """The union of ``(kind, name)`` rows of several summaries, first-seen order."""
    seen: dict[tuple[str, str], None] = {}
    for summary in summaries:
        for kind, name, _ in table_rows(summary):
            seen.setdefault((kind, name), None)
    # Overall rows last whatever order the summaries listed them in.
    rows = [r for r in seen if r[0] != "overall"] + [r for r in seen if r[0] == "overall"]
    return rows


def row_value(summary: Mapping, kind: str, name: str) -> float | None:
    """The score of row ``(kind, name)`` in ``summary`` (None if absent)."""
    for k, n, v in table_rows(summary):
        if (k, n) == (kind, name):
            return v
    return None
