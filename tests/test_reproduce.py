"""benchmarks/reproduce.py: the aggregation and table arithmetic, the plan, and resumability.

Every expected number is computed by hand in the test (or by an independent route through
vispo's own config loader); nothing here trains a model.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_module():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


R = _load_module()
SETTINGS = R.Settings(model_sha256="abc", quickstart_sha256="def")


# --- means, stds, gains ------------------------------------------------------------------------


def test_mean_std_and_format():
    # mean 0.7; sample std sqrt((0.01 + 0 + 0.01) / 2) = 0.1
    mean, std = R.mean_std([0.6, 0.7, 0.8])
    assert math.isclose(mean, 0.7) and math.isclose(std, 0.1)
    assert R.fmt_pm([0.6, 0.7, 0.8]) == "70.0 ± 10.0"
    assert R.fmt_pm([0.5]) == "50.0"  # one seed: no spread to report
    assert R.fmt_pm([]) == "—"
    assert R.fmt_pm([0.123, 0.125], scale=1.0, digits=3) == "0.124 ± 0.001"
    assert R.mean_std([None, 0.4]) == (0.4, None)


def test_paired_gain_uses_shared_seeds():
    base = {0: 0.50, 1: 0.60, 2: 0.70}
    other = {0: 0.55, 1: 0.60, 2: 0.80, 3: 0.99}  # seed 3 has no baseline: left out
    mean, std, rel, n = R.paired_gain(base, other)
    # differences 0.05, 0.00, 0.10: mean 0.05, sample std sqrt((0 + .0025 + .0025) / 2) = 0.05
    assert n == 3
    assert math.isclose(mean, 0.05) and math.isclose(std, 0.05)
    assert math.isclose(rel, 0.05 / 0.60)  # relative to the baseline's mean on those seeds
    assert R.fmt_gain(base, other) == "+5.0 ± 5.0 (+8.3%)"
    assert R.fmt_gain({0: 0.4}, {0: 0.3}) == "-10.0 (-25.0%)"
    assert R.fmt_gain({0: 0.0}, {0: 0.1}) == "+10.0 (n/a)"
    assert R.fmt_gain({0: 0.5}, {1: 0.6}) == "—"


def test_moving_average_and_curves_over_seeds():
    assert R.moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert R.moving_average([2.0, 4.0], 5) == [2.0, 3.0]
    with pytest.raises(ValueError):
        R.moving_average([1.0], 0)
    curves = [
        {"step": [0, 10, 20], "value": [0.6, 0.7, 0.8]},
        {"step": [0, 10], "value": [0.4, 0.9]},  # a shorter run: only shared steps count
    ]
    steps, means, stds = R.curve_over_seeds(curves)
    assert steps == [0, 10]
    assert all(math.isclose(a, b) for a, b in zip(means, [0.5, 0.8]))
    assert all(math.isclose(a, b) for a, b in zip(stds, [0.1, 0.1]))  # population std of two


# --- per-run metrics ---------------------------------------------------------------------------


def test_split_accuracy_by_vision_dependence():
    correct = {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0, "e": 1.0}
    vd = {"a": True, "b": True, "c": False, "d": False, "e": False}
    split = R.split_accuracy(correct, vd)
    assert math.isclose(split["overall"], 3 / 5)
    assert math.isclose(split["general"], 2 / 3)  # c, d, e
    assert math.isclose(split["vd"], 1 / 2)  # a, b
    assert (split["n"], split["n_general"], split["n_vd"]) == (5, 3, 2)
    assert R.split_accuracy({"c": 1.0}, vd)["vd"] is None
    with pytest.raises(R.ReproError, match="z"):
        R.split_accuracy({"z": 1.0}, vd)


def test_per_question_correct_reads_greedy_records_of_one_setting():
    records = [
        {"benchmark": "easy-vqa", "mode": "greedy", "id": "q1", "correct": [1.0], "sig": "s"},
        {"benchmark": "easy-vqa", "mode": "greedy", "id": "q2", "correct": [0.0], "sig": "s"},
        {"benchmark": "easy-vqa", "mode": "avg@8", "id": "q2", "correct": [1.0] * 8, "sig": "t"},
        {"benchmark": "synthetic", "mode": "greedy", "id": "q1", "correct": [0.0], "sig": "u"},
    ]
    assert R.per_question_correct(records, "easy-vqa", ["q1", "q2"]) == {"q1": 1.0, "q2": 0.0}
    with pytest.raises(R.ReproError, match="not scored"):
        R.per_question_correct(records, "easy-vqa", ["q1", "q3"])
    stale = records + [
        {"benchmark": "easy-vqa", "mode": "greedy", "id": "q1", "correct": [0.0], "sig": "old"}
    ]
    with pytest.raises(R.ReproError, match="several"):
        R.per_question_correct(stale, "easy-vqa", ["q1", "q2"])


def test_probe_summary_ignore_image_rate():
    def rec(i, kl, changed, correct):
        return {
            "id": i,
            "kl_mask": kl,
            "kl_blank": kl / 2,
            "changed_blank": changed,
            "correct_orig": correct,
        }

    records = [
        rec("a", 0.4, False, 0.0),  # unchanged and wrong: ignores the image
        rec("b", 0.2, False, 1.0),  # unchanged but right
        rec("c", 0.1, True, 0.0),  # wrong, but the answer moved with the image
        rec("d", 0.3, False, 0.0),  # ignores the image
    ]
    vd = {"a": True, "b": False, "c": True, "d": False}
    s = R.probe_summary(records, vd)
    assert math.isclose(s["ignore"], 2 / 4)
    assert math.isclose(s["ignore_vd"], 1 / 2)  # a of (a, c)
    assert math.isclose(s["kl_mask"], (0.4 + 0.2 + 0.1 + 0.3) / 4)
    assert math.isclose(s["kl_mask_vd"], (0.4 + 0.1) / 2)
    assert math.isclose(s["kl_blank"], 0.5 / 4)
    assert math.isclose(s["changed_blank"], 1 / 4)
    assert (s["n"], s["n_vd"]) == (4, 2)


def _metrics_rows():
    rows = []
    for step in range(1, 7):
        row = {
            "step": step,
            "reward/mean": step / 10,
            "time/step": 2.0,
            "dynamic_sampling/rounds": 1.0 if step % 2 else 3.0,
        }
        if step == 3:
            row["eval/accuracy"] = 0.70
            row["guard/event"] = 1.0
        rows.append(row)
    rows.append({"step": 6, "eval/accuracy_before": 0.65, "eval/accuracy_after": 0.72})
    return rows


def test_train_summary_curves_and_totals():
    s = R.train_summary(_metrics_rows())
    assert s["reward"]["step"] == [1, 2, 3, 4, 5, 6]
    assert s["heldout"] == {"step": [0, 3, 6], "value": [0.65, 0.70, 0.72]}
    assert s["guard_events"] == [{"step": 3, "signals": {}}]
    assert math.isclose(s["step_time_s"], 12.0)
    assert math.isclose(s["ds_rounds"], 2.0)  # (1 + 3 + 1 + 3 + 1 + 3) / 6
    assert math.isclose(s["reward_last"], 0.6)  # last sixth of 6 steps = step 6
    assert s["perception_kl_last"] is None and s["steps_done"] == 6
    # the checkpoint's own list of events (with signals) wins over the metrics' flags
    events = [{"step": 3, "signals": {"perception/kl_mean": 5.1}}]
    assert R.train_summary(_metrics_rows(), events)["guard_events"] == events


def test_steps_done_counts_logged_steps(tmp_path):
    lines = [json.dumps(r) for r in _metrics_rows()[:4]] + ['{"step": 5, "reward/me']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    assert R.steps_done(tmp_path) == 4  # a half-written line is not a step
    assert R.steps_done(tmp_path / "missing") == 0


# --- tables ------------------------------------------------------------------------------------


def _metrics(overall, vd, ignore=0.3):
    return {
        "easy/overall": overall,
        "easy/general": overall + 0.1,
        "easy/vd": vd,
        "syn/overall": 0.1,
        "syn/vd": 0.1,
        "probe/ignore": ignore,
    }


def test_main_and_gains_tables():
    groups = {
        "grpo": {0: _metrics(0.60, 0.10), 1: _metrics(0.70, 0.20)},
        "papo_g": {0: _metrics(0.65, 0.20), 1: _metrics(0.70, 0.30)},
    }
    table = R.main_table(groups, before=_metrics(0.67, 0.0))
    rows = table.splitlines()
    assert rows[2] == "| before RL (start) | — | 67.0 | 77.0 | 0.0 | 10.0 | 10.0 |"
    # GRPO: mean 65.0, sample std of (60, 70) = 7.07; vision-dep. 15.0 ± 7.1
    assert (
        rows[3] == "| GRPO | 2 | 65.0 ± 7.1 | 75.0 ± 7.1 | 15.0 ± 7.1 | 10.0 ± 0.0 | 10.0 ± 0.0 |"
    )
    assert rows[4].startswith("| DAPO | pending | — |")
    gains = R.gains_table(groups).splitlines()
    papo = next(r for r in gains if r.startswith("| PAPO-G | GRPO"))
    # overall: differences +5, 0 -> +2.5 ± 3.5, relative 2.5 / 65 = 3.8%;
    # vision-dep.: +10, +10 -> +10.0 ± 0.0, relative 10 / 15 = 66.7%
    assert papo.split(" | ")[2] == "+2.5 ± 3.5 (+3.8%)"
    assert papo.split(" | ")[4] == "+10.0 ± 0.0 (+66.7%)"
    assert next(r for r in gains if r.startswith("| CPPO | DAPO")).count("—") == 5


def test_ablation_table_uses_main_run_as_default_and_counts_guard_events():
    family = next(f for f in R.ABLATIONS if f.key == "papo_gamma")
    groups = {
        "papo_g": {0: _metrics(0.6, 0.1), 1: _metrics(0.8, 0.3)},
        "papo_g-gamma0.04": {0: _metrics(0.5, 0.0)},
    }
    events = {"papo_g": {0: [], 1: [7]}, "papo_g-gamma0.04": {0: [34, 40]}}
    rows = R.ablation_table(family, groups, events, seeds=[0]).splitlines()
    default = next(r for r in rows if "(default)" in r)
    assert default.startswith("| 0.02 (default) = main run | 1 | 60.0 | 10.0 |")  # seed 1 left out
    assert default.endswith("| 0/1 | — |")
    collapse = next(r for r in rows if r.startswith("| 0.04"))
    assert "| 1/1 (first at step 34) |" in collapse
    assert next(r for r in rows if r.startswith("| 0.01")).startswith("| 0.01 | pending |")
    assert R.guard_cell({0: {}, 1: {}, 2: {}}, {0: [34, 40], 1: [], 2: [20]}) == (
        "2/3 (first at step 20)"
    )


# --- the discussion blocks survive a rewrite ---------------------------------------------------


def test_merge_discussion_keeps_hand_written_text():
    old = (
        "# old\n"
        + R.discussion_block("main", "PAPO helps on vision-dependent questions.\n")
        + "\n"
        + R.discussion_block("retired", "A note on a table that no longer exists.\n")
        + "\n"
    )
    new = "# new\n| a |\n" + R.discussion_block("main") + "\n" + R.discussion_block("summary")
    merged = R.merge_discussion(new, old)
    assert merged.startswith("# new\n| a |\n")
    assert R.discussion_block("main", "PAPO helps on vision-dependent questions.\n") in merged
    assert R.discussion_block("summary") in merged  # new block: the placeholder
    assert R.discussion_block("retired", "A note on a table that no longer exists.\n") in merged
    assert R.merge_discussion(new, None) == new
    assert R.merge_discussion(merged, merged) == merged  # idempotent


# --- the plan ----------------------------------------------------------------------------------


def test_build_plan_runs_and_filters():
    plan = R.build_plan((0, 1, 2), (0,))
    names = [r.name for r in plan]
    assert len(names) == len(set(names))
    assert names[0] == R.BEFORE
    main = [r for r in plan if r.kind == "main"]
    ablations = [r for r in plan if r.kind == "ablation"]
    assert len(main) == 5 * 3
    # variants with a tag: mask 3, gamma 2, masked_grad 1, double entropy 2, CPPO 3
    assert len(ablations) == 11
    assert {r.name for r in ablations} >= {"papo_g-gamma0.04-s0", "cppo-k1-s0", "cppo-nogate-s0"}
    assert dict(next(r for r in ablations if r.name == "cppo-alltokens-s0").overrides) == {
        "cpl_select": "all"
    }
    # an ablation seed without main runs brings the defaults it needs
    extra = R.build_plan((0,), (1,))
    assert {"papo_g-s1", "cppo-s1"} <= {r.name for r in extra}
    assert "grpo-s1" not in {r.name for r in extra}
    assert [r.name for r in R.build_plan((0,), (0,), only="grpo,cppo-k1*")] == [
        "grpo-s0",
        "cppo-k1-s0",
    ]
    with pytest.raises(R.ReproError, match="matches no run"):
        R.build_plan((0,), (0,), only="nothing-like-this")
    assert R.parse_seeds("2, 0,2") == (2, 0)
    with pytest.raises(R.ReproError):
        R.parse_seeds("a")


def test_run_config_changes_only_the_objective(tmp_path):
    """A main run's config is the quickstart's with the preset's objective (and bookkeeping)."""
    from vispo.algos import objective_preset
    from vispo.train.config import build_config, load_config

    quick = load_config(R.QUICKSTART)
    for spec in (R.main_run("papo_g", 1), R.main_run("grpo", 2), R.main_run("dapo", 0)):
        cfg = build_config(R.run_tree(spec, SETTINGS, tmp_path / spec.name))
        assert cfg.objective == objective_preset(spec.objective, mask_patch_size=16)
        for section in ("model", "rollout", "reward", "optim", "guard"):
            assert getattr(cfg, section) == getattr(quick, section), section
        assert dataclasses.replace(cfg.data, eval_size=0) == dataclasses.replace(
            quick.data, eval_size=0
        )
        assert (cfg.train.steps, cfg.train.prompts_per_step) == (60, 16)
        assert (cfg.train.seed, cfg.train.out_dir) == (spec.seed, str(tmp_path / spec.name))
    # the PAPO-G main run is the embedded default's objective exactly
    papo = build_config(R.run_tree(R.main_run("papo_g", 0), SETTINGS, tmp_path))
    assert papo.objective == quick.objective
    ablation = next(r for r in R.build_plan((0,), (0,)) if r.name == "papo_g-entropy-maskedgrad-s0")
    cfg = build_config(R.run_tree(ablation, SETTINGS, tmp_path))
    assert (cfg.objective.eta_orig, cfg.objective.eta_mask, cfg.objective.masked_grad) == (
        0.05,
        0.05,
        True,
    )
    assert cfg.objective.gamma == quick.objective.gamma


def test_estimate_wall_time_schedules_runs_on_workers():
    plan = R.build_plan((0,), ())
    one = [R.estimate_run_s(s, SETTINGS) for s in plan]
    assert math.isclose(R.estimate_wall_s(plan, SETTINGS, jobs=1), sum(one))
    two = R.estimate_wall_s(plan, SETTINGS, jobs=2)
    assert max(one) <= two < sum(one) and two >= sum(one) / 2
    grpo, papo = R.main_run("grpo", 0), R.main_run("papo_g", 0)
    # 60 more steps at PAPO-G's 2.0 s/step versus GRPO's 1.4 s/step
    assert math.isclose(
        R.estimate_run_s(papo, SETTINGS) - R.estimate_run_s(grpo, SETTINGS), 60 * (2.0 - 1.4)
    )


# --- resumability ------------------------------------------------------------------------------


def test_run_state_new_resume_done_and_changed_plan(tmp_path):
    spec = R.main_run("grpo", 0)
    run = tmp_path / spec.name
    assert R.run_state(run, spec, SETTINGS) == "new"
    run.mkdir()
    (run / "spec.json").write_text(json.dumps(R.spec_document(spec, SETTINGS)))
    assert R.run_state(run, spec, SETTINGS) == "resume"
    (run / "result.json").write_text("{}")
    assert R.run_state(run, spec, SETTINGS) == "done"
    other = dataclasses.replace(SETTINGS, steps=30)
    with pytest.raises(R.ReproError, match=r"steps: 60 -> 30"):
        R.run_state(run, spec, other)
    with pytest.raises(R.ReproError, match="gamma"):
        R.run_state(run, dataclasses.replace(spec, overrides=(("gamma", 0.04),)), SETTINGS)
    orphan = tmp_path / "orphan"
    (orphan / "checkpoints").mkdir(parents=True)
    with pytest.raises(R.ReproError, match="without spec.json"):
        R.run_state(orphan, spec, SETTINGS)


def test_plan_file_pins_one_configuration_per_folder(tmp_path):
    R.check_plan_file(tmp_path, SETTINGS)
    R.check_plan_file(tmp_path, SETTINGS)  # the same settings: fine
    assert R.read_plan_settings(tmp_path) == SETTINGS
    with pytest.raises(R.ReproError, match="eval_limit"):
        R.check_plan_file(tmp_path, dataclasses.replace(SETTINGS, eval_limit=1000))
    with pytest.raises(R.ReproError, match="no plan.json"):
        R.read_plan_settings(tmp_path / "empty")
    # a smoke-test folder made with other settings is disposable; a real one never is
    assert not R._stale_quick_folder(tmp_path, dataclasses.replace(SETTINGS, steps=5))
    quick = tmp_path / "quick"
    R.check_plan_file(quick, dataclasses.replace(SETTINGS, quick=True))
    assert not R._stale_quick_folder(quick, dataclasses.replace(SETTINGS, quick=True))
    assert R._stale_quick_folder(quick, dataclasses.replace(SETTINGS, quick=True, steps=5))


def test_report_from_stored_results(tmp_path):
    """--report: finished runs with this folder's settings are aggregated, others left out."""
    out = tmp_path / "runs"

    def store(spec, metrics, settings=SETTINGS):
        run = out / spec.name
        run.mkdir(parents=True)
        (run / "spec.json").write_text(json.dumps(R.spec_document(spec, settings)))
        train = {
            "reward": {"step": [1, 2], "value": [0.5, 0.6]},
            "heldout": {"step": [0, 2], "value": [0.6, 0.7]},
            "guard_events": [],
        }
        result = {"name": spec.name, "spec": spec.to_json(), "status": "ok", "train": train}
        (run / "result.json").write_text(json.dumps({**result, "metrics": metrics}))

    store(R.main_run("grpo", 0), _metrics(0.60, 0.10))
    store(R.main_run("grpo", 1), _metrics(0.70, 0.20))
    store(R.main_run("cppo", 0), _metrics(0.9, 0.9), dataclasses.replace(SETTINGS, steps=5))
    docs = tmp_path / "docs"
    md = R.write_report(out, docs, SETTINGS)
    text = md.read_text()
    assert "| GRPO | 2 | 65.0 ± 7.1 |" in text
    assert "| CPPO | pending |" in text  # made with other settings: not mixed in
    assert (docs / R.CURVES_PNG).stat().st_size > 0
    stored = json.loads((out / "results.json").read_text())
    assert sorted(stored["runs"]) == ["grpo-s0", "grpo-s1"]
    # a hand-written discussion survives the next rebuild
    md.write_text(text.replace(R.PENDING, "Measured, then explained.\n", 1))
    R.write_report(out, docs, SETTINGS)
    assert "Measured, then explained." in md.read_text()


@pytest.mark.slow
def test_quick_run_end_to_end_then_skipped(tmp_path):
    """One --quick run in a subprocess worker: result, report, and a rerun that skips it."""
    out = tmp_path / "runs"
    argv = ["--quick", "--only", "grpo-s0", "--out", str(out), "--no-progress", "--jobs", "1"]
    assert R.main(argv) == 0
    result = json.loads((out / "grpo-s0" / "result.json").read_text())
    assert result["status"] == "ok" and result["checkpoint"] == "step-000002"
    acc = result["accuracy"]["easy-vqa"]
    assert acc["n"] == 48 and acc["n_general"] + acc["n_vd"] == 48
    assert math.isclose(
        acc["overall"], (acc["general"] * acc["n_general"] + acc["vd"] * acc["n_vd"]) / 48
    )
    assert result["train"]["reward"]["step"] == [1, 2]
    assert result["train"]["heldout"]["step"] == [0, 1, 2]
    assert 0.0 <= result["metrics"]["probe/ignore"] <= 1.0
    assert "| GRPO | 1 |" in (out / R.RESULTS_MD).read_text()
    log = (out / "grpo-s0" / "log.txt").read_text()
    assert R.main(argv) == 0  # finished: not run again
    assert (out / "grpo-s0" / "log.txt").read_text() == log
