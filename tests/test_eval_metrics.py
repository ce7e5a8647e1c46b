"""avg@k arithmetic, macro vs micro averaging, deltas and tables on hand-made predictions."""

from __future__ import annotations

import pytest

from vispo.eval.metrics import (
    avg_at_k,
    deltas,
    macro_average,
    micro_average,
    pass_at_least_one,
    question_score,
    summarize,
    table_rows,
)
from vispo.eval.tables import comparison_markdown, comparison_table, delta_text, pct, run_table


def test_avg_at_k_is_the_mean_of_per_question_means():
    # k = 4: question scores 3/4, 0, 1 -> (0.75 + 0 + 1) / 3
    per_question = [[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]]
    assert avg_at_k(per_question) == pytest.approx(1.75 / 3)
    # Not the pooled mean over answers when k differs: [1] and [0, 0, 0] -> (1 + 0) / 2, not 1/4.
    assert avg_at_k([[1.0], [0.0, 0.0, 0.0]]) == pytest.approx(0.5)
    assert question_score([0.5, 1.0]) == pytest.approx(0.75)  # partial credit
    assert pass_at_least_one(per_question) == pytest.approx(2 / 3)


def test_avg_at_k_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        avg_at_k([])
    with pytest.raises(ValueError, match="at least one"):
        avg_at_k([[1.0], []])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        avg_at_k([[1.5]])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        question_score([float("nan")])


def test_macro_weighs_benchmarks_equally_micro_weighs_questions_equally():
    per_benchmark = {
        "a": [[1, 1], [1, 1]],  # 2 questions, avg 1.0
        "b": [[0, 0], [0, 0], [0, 0], [1, 1]],  # 4 questions, avg 0.25
        "c": [[0, 1]],  # 1 question, avg 0.5
    }
    groups = {"a": "general", "b": "general", "c": "vision-dependent"}
    s = summarize(per_benchmark, groups)
    assert s["benchmarks"]["a"]["score"] == 1.0
    assert s["benchmarks"]["b"]["score"] == 0.25
    assert s["benchmarks"]["b"]["n"] == 4 and s["benchmarks"]["b"]["k"] == 2
    assert s["groups"]["general"]["macro"] == pytest.approx((1.0 + 0.25) / 2)
    assert s["groups"]["general"]["micro"] == pytest.approx(3 / 6)
    assert s["groups"]["vision-dependent"]["macro"] == pytest.approx(0.5)
    assert s["overall"]["macro"] == pytest.approx((1.0 + 0.25 + 0.5) / 3)
    assert s["overall"]["micro"] == pytest.approx((2 + 1 + 0.5) / 7)
    assert s["overall"]["n"] == 7
    assert macro_average({"x": 0.2, "y": 0.6}) == pytest.approx(0.4)
    assert micro_average({"x": [[1]], "y": [[0], [0], [0]]}) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="no group"):
        summarize(per_benchmark, {"a": "general"})


def test_deltas_absolute_and_relative_like_the_papers():
    # PAPO-G 3B vs GRPO (algorithms.md section 12): 49.92 vs 47.92.
    absolute, relative = deltas(0.4792, 0.4992)
    assert absolute == pytest.approx(0.02)
    assert relative == pytest.approx(0.02 / 0.4792)
    assert delta_text(0.4792, 0.4992) == "+2.00 (+4.2%)"
    assert delta_text(0.5, 0.25) == "-25.00 (-50.0%)"
    assert deltas(0.0, 0.1) == (0.1, None)
    assert delta_text(0.0, 0.1) == "+10.00 (n/a)"
    assert pct(0.49916) == "49.92" and pct(None) == "—"


def _result(label, per_benchmark, groups, mode="avg@8"):
    return {
        "label": label,
        "model": {"spec": label, "checkpoint": None},
        "modes": {
            mode: {
                "k": 8,
                "temperature": 1.0,
                "top_p": 1.0,
                "summary": summarize(per_benchmark, groups),
            }
        },
    }


def test_tables_render_every_row_and_the_deltas():
    groups = {"geo": "general", "logic": "vision-dependent"}
    base = _result("grpo", {"geo": [[1, 0]] * 2, "logic": [[0, 0], [1, 1]]}, groups)
    papo = _result("papo", {"geo": [[1, 1]] * 2, "logic": [[0, 0], [0, 1]]}, groups)
    rows = table_rows(base["modes"]["avg@8"]["summary"])
    assert [(k, n) for k, n, _ in rows] == [
        ("benchmark", "geo"),
        ("group", "general"),
        ("benchmark", "logic"),
        ("group", "vision-dependent"),
        ("overall", "overall (macro)"),
        ("overall", "overall (micro)"),
    ]
    text = comparison_table([base, papo], "avg@8")
    lines = {line.split(" | ")[0].strip("| *"): line for line in text.splitlines() if "|" in line}
    # geo: 50 -> 100 (+50 points, +100%); logic: 50 -> 25 (-25 points, -50%).
    assert "| geo | 50.00 | 100.00 | +50.00 (+100.0%) |" in text
    assert "| logic | 50.00 | 25.00 | -25.00 (-50.0%) |" in text
    # overall macro: (50 + 50) / 2 = 50 -> (100 + 25) / 2 = 62.5
    assert "50.00 | 62.50 | +12.50 (+25.0%)" in lines["overall (macro)"]
    md = comparison_markdown([base, papo])
    assert md.startswith("## vispo eval: comparison") and "`grpo`, `papo`" in md
    single = run_table(base)
    assert "| geo | general | 2 | 50.00 |" in single
    assert "| **overall (macro)** |  | 4 | 50.00 |" in single
    with pytest.raises(ValueError, match="at least two"):
        comparison_table([base], "avg@8")
    with pytest.raises(ValueError, match="missing"):
        comparison_table([base, _result("g", {"geo": [[1]]}, groups, mode="greedy")], "avg@8")
