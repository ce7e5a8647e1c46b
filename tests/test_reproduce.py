"""benchmarks/reproduce/: the statistics, records, plan, scheduling logic and report.

Every expected number is computed by hand in the test (t-table values, closed forms, or an
independent numerical integration); nothing here trains a model except the opt-in slow test.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.reproduce import plan as P  # noqa: E402
from benchmarks.reproduce import records as REC  # noqa: E402
from benchmarks.reproduce import report as REP  # noqa: E402
from benchmarks.reproduce import scheduler as SCH  # noqa: E402
from benchmarks.reproduce import stats as S  # noqa: E402
from benchmarks.reproduce.worker import train_summary  # noqa: E402

SETTINGS = P.Settings(model_sha256="abc", quickstart_sha256="def")


# --- the t distribution and paired tests -----------------------------------------------------


@pytest.mark.parametrize(
    "df, t975", [(1, 12.706), (2, 4.303), (4, 2.776), (5, 2.571), (10, 2.228), (30, 2.042)]
)
def test_t_quantile_matches_the_t_table(df, t975):
    assert abs(S.t_quantile(0.975, df) - t975) < 5e-4
    assert math.isclose(S.t_quantile(0.025, df), -S.t_quantile(0.975, df))


@pytest.mark.parametrize("t", [-3.0, -0.4, 0.0, 0.7, 2.5, 40.0])
def test_t_cdf_matches_closed_forms(t):
    # df 1 is the Cauchy distribution; df 2 has F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    assert math.isclose(S.t_cdf(t, 1), 0.5 + math.atan(t) / math.pi, abs_tol=1e-12)
    assert math.isclose(S.t_cdf(t, 2), 0.5 + t / (2 * math.sqrt(2 + t * t)), abs_tol=1e-12)


def _t_tail_by_integration(t: float, df: int) -> float:
    """P(|T| > t) by Simpson's rule on the density (an independent route)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    n, a = 20000, 0.0
    h = (t - a) / n
    f = [c * (1 + (a + i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
    inner = h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))
    return 1.0 - 2.0 * inner


def test_paired_t_by_hand():
    # differences 1..5: mean 3, sd sqrt(2.5), se sqrt(0.5), t = 4.2426, df 4, t_.975 = 2.776445
    r = S.paired_t([1, 2, 3, 4, 5])
    se = math.sqrt(2.5) / math.sqrt(5)
    assert r.n == 5 and math.isclose(r.mean, 3.0) and math.isclose(r.sd, math.sqrt(2.5))
    assert math.isclose(r.lo, 3 - 2.776445 * se, abs_tol=1e-5)
    assert math.isclose(r.hi, 3 + 2.776445 * se, abs_tol=1e-5)
    assert math.isclose(r.p, _t_tail_by_integration(3 / se, 4), abs_tol=1e-6)
    assert abs(r.p - 0.0132) < 1e-4 and r.resolved
    # an interval across zero: unresolved
    r = S.paired_t([0.01, -0.02, 0.03])
    assert r.lo < 0 < r.hi and not r.resolved and r.p > 0.05
    # n = 1: a mean, no interval; n = 0: nothing
    assert S.paired_t([0.2]) == S.Paired(1, 0.2)
    assert S.paired_t([]).mean is None
    # no spread: the interval is the point
    r = S.paired_t([0.1, 0.1, 0.1])
    assert (r.lo, r.hi, r.p) == (pytest.approx(0.1), pytest.approx(0.1), 0.0) and r.resolved


def test_paired_by_seed_uses_shared_seeds_only():
    base = {0: 0.50, 1: 0.60, 2: 0.70}
    other = {0: 0.55, 1: 0.60, 2: 0.80, 3: 0.99}  # seed 3 has no control: left out
    r = S.paired_by_seed(base, other)
    # differences 0.05, 0, 0.10: mean 0.05, sd 0.05, se 0.05/sqrt(3), t_.975(2) = 4.302653
    assert r.n == 3 and math.isclose(r.mean, 0.05) and math.isclose(r.sd, 0.05)
    assert math.isclose(r.hi - r.mean, 4.302653 * 0.05 / math.sqrt(3), abs_tol=1e-6)


def test_mean_band_and_curves_by_step():
    mean, half = S.mean_band([0.6, 0.7, 0.8])  # sd 0.1, se 0.1/sqrt(3), t_.975(2) = 4.302653
    assert math.isclose(mean, 0.7) and math.isclose(
        half, 4.302653 * 0.1 / math.sqrt(3), rel_tol=1e-6
    )
    assert S.mean_band([0.4]) == (0.4, 0.0)
    by_step = S.curves_by_step({0: {0: 0.5, 10: 0.6, 20: 0.7}, 1: {0: 0.4, 10: 0.8}})
    assert by_step == {0: {0: 0.5, 1: 0.4}, 10: {0: 0.6, 1: 0.8}}  # step 20: one seed only
    assert S.moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]


# --- records -----------------------------------------------------------------------------------


def test_bitsets_pack_and_unpack():
    assert REC.pack_bits([1, 0, 1]) == "oA=="  # 0b10100000 = 0xA0
    assert REC.pack_bits([0] * 8 + [1]) == "AIA="  # 0x00 0x80
    rng = random.Random(0)
    values = [rng.randint(0, 1) for _ in range(1001)]
    assert REC.unpack_bits(REC.pack_bits(values), 1001) == values
    with pytest.raises(P.ReproError, match="exactly"):
        REC.unpack_bits(REC.pack_bits(values), 990)
    with pytest.raises(P.ReproError, match="0 or 1"):
        REC.pack_bits([0.5])


def test_train_summary_curve_and_rounds():
    rows = [
        {"step": 0, "eval/accuracy_before": 0.6},
        {"step": 1, "reward/mean": 0.2, "dynamic_sampling/rounds": 3.0},
        {"step": 2, "reward/mean": 0.4, "dynamic_sampling/rounds": 2.0, "eval/accuracy": 0.7},
        {"step": 3, "reward/mean": 0.5, "dynamic_sampling/rounds": 4.0, "guard/event": 1},
        {"step": 3, "eval/accuracy_after": 0.75},
    ]
    s = train_summary(rows)
    assert s["curve"] == {"step": [0, 2, 3], "value": [0.6, 0.7, 0.75]}
    assert s["reward"] == {"step": [1, 2, 3], "value": [0.2, 0.4, 0.5]}
    assert math.isclose(s["ds_rounds"], 3.0) and s["ds_rounds_total"] == 9.0
    assert s["guard_events"] == [{"step": 3, "signals": {}}] and s["steps_done"] == 3


# --- the plan ----------------------------------------------------------------------------------


def test_controls_equal_to_another_arm_reuse_its_runs():
    assert P.aliases() == {"papo_g-off": "grpo", "papo_d-off": "dapo", "noisyrollout-off": "grpo"}
    plan = P.build_plan(range(5), SETTINGS)
    names = [r.name for r in plan]
    # before RL, 3 lrs x 2 seeds of tuning, 10 distinct arms x 5 seeds
    assert len(plan) == 1 + 6 + 10 * 5 and len(set(names)) == len(names)
    assert "papo_g-off-s0" not in names and "cppo-off-s4" in names and "grpo-eqr-s3" in names
    assert [r.name for r in P.build_plan((0,), SETTINGS, only="tune-*,vppo")] == [
        "tune-lr0.0001-s0", "tune-lr0.0001-s1", "tune-lr0.0003-s0", "tune-lr0.0003-s1",
        "tune-lr0.001-s0", "tune-lr0.001-s1", "vppo-s0", "vppo-off-s0",
    ]  # fmt: skip
    with pytest.raises(P.ReproError, match="matches no run"):
        P.build_plan((0,), SETTINGS, only="nothing-like-this")
    assert P.parse_seeds("0-4") == (0, 1, 2, 3, 4) and P.parse_seeds("3,1,3") == (3, 1)


def test_run_configs_differ_from_the_quickstart_only_where_planned(tmp_path):
    from vispo.algos import objective_preset
    from vispo.train.config import build_config, load_config

    quick = load_config(P.QUICKSTART)

    def cfg(arm, **kw):
        spec = P.RunSpec(f"{arm}-s1", "main", arm, 1)
        return build_config(P.run_tree(spec, SETTINGS, tmp_path / arm, **kw))

    grpo = cfg("grpo", lr=1e-3)
    assert grpo.objective == objective_preset("grpo", mask_patch_size=16)
    assert grpo.optim == dataclasses.replace(quick.optim, lr=1e-3)
    assert (grpo.data.eval_split, grpo.data.eval_size) == ("validation", SETTINGS.curve_size)
    for section in ("model", "rollout", "reward", "guard"):
        assert getattr(grpo, section) == getattr(quick, section), section
    cppo, cppo_off = cfg("cppo", lr=3e-4).objective, cfg("cppo-off", lr=3e-4).objective
    assert dataclasses.replace(cppo, cpl_lambda=0.0) == cppo_off  # only the term differs
    assert (cppo_off.clip_low, cppo_off.clip_high) == (0.2, 0.2)
    vppo, vppo_off = cfg("vppo", lr=3e-4).objective, cfg("vppo-off", lr=3e-4).objective
    assert dataclasses.replace(vppo, vppo_top_frac=None, vppo_scale_min=None) == vppo_off
    assert cfg("grpo-eqr", lr=3e-4, prompts_per_step=53).train.prompts_per_step == 53
    with pytest.raises(P.ReproError, match="learning rate"):
        cfg("grpo")


def test_chosen_lr_and_resolve_from_records():
    assert P.chosen_lr({1e-4: {0: 0.7, 1: 0.8}, 3e-4: {0: 0.8, 1: 0.8}}) == 3e-4
    assert P.chosen_lr({1e-4: {0: 0.8}, 1e-3: {0: 0.8}}) == 1e-4  # a tie: the smaller
    with pytest.raises(P.ReproError, match="incomplete"):
        P.chosen_lr({1e-4: {0: 0.8, 1: 0.7}, 1e-3: {0: 0.9}})
    # means: 1e-4 0.70, 3e-4 0.75, 1e-3 0.80 -> 1e-3
    tune = {
        P.tune_name(lr, s): {"final": {"val": v}}
        for lr, vals in ((1e-4, (0.7, 0.7)), (3e-4, (0.8, 0.7)), (1e-3, (0.9, 0.7)))
        for s, v in zip((0, 1), vals)
    }
    grpo = P.RunSpec("grpo-s2", "main", "grpo", 2)
    eqr = P.RunSpec("grpo-eqr-s2", "main", "grpo-eqr", 2)
    assert SCH.resolve(grpo, SETTINGS, {}) is None  # tuning not finished
    assert SCH.resolve(grpo, SETTINGS, tune) == {"lr": 1e-3, "prompts_per_step": None}
    assert SCH.resolve(eqr, SETTINGS, tune) is None  # DAPO's run of seed 2 not finished
    dapo = {"config": {"train": {"prompts_per_step": 16}}, "train": {"ds_rounds": 3.3}}
    got = SCH.resolve(eqr, SETTINGS, {**tune, "dapo-s2": dapo})
    assert got == {"lr": 1e-3, "prompts_per_step": 53}  # round(16 x 3.3 = 52.8)
    assert eqr.needs(SETTINGS)[-1] == "dapo-s2" and len(eqr.needs(SETTINGS)) == 7


def test_estimate_wall_time_schedules_runs_on_workers():
    plan = P.build_plan((0,), SETTINGS)
    one = [SCH.estimate_run_s(s, SETTINGS) for s in plan]
    assert math.isclose(SCH.estimate_wall_s(plan, SETTINGS, jobs=1), sum(one))
    two = SCH.estimate_wall_s(plan, SETTINGS, jobs=2)
    assert max(one) <= two < sum(one)
    tune = next(s for s in plan if s.kind == "tune")
    grpo = next(s for s in plan if s.name == "grpo-s0")
    final = (
        3 * SETTINGS.test_limit + SCH.CF_SIZE
    ) * SCH.EVAL_S_PER_Q  # tuning runs touch no test question
    assert math.isclose(
        SCH.estimate_run_s(grpo, SETTINGS) - SCH.estimate_run_s(tune, SETTINGS), final
    )


# --- the report from records alone ---------------------------------------------------------------


def _record(name, kind, arm, seed, final, *, lr=None, curve=None, settings=SETTINGS):
    spec = P.RunSpec(name, kind, arm, seed, lr)
    bits = [1, 0, 1, 1]
    return {
        "schema": REC.SCHEMA,
        "name": name,
        "spec": spec.to_json(),
        "settings": settings.to_json(),
        "resolved": {} if kind != "main" else {"lr": 1e-3, "prompts_per_step": None},
        "status": "ok",
        "config": None,
        "final": final,
        "train": {
            "curve": curve or {"step": [], "value": []},
            "reward": {"step": [1, 2], "value": [0.3, 0.5]},
            "ds_rounds": 1.0,
            "guard_events": [],
        },
        "questions": {"test/real": {"n": 4, "bits": REC.pack_bits(bits)}},
        "timing": {"train_s": 40.0},
    }


def _main_final(real, gray=0.6, cf=0.3):
    return {"test/real": real, "test/gray": gray, "test/drop": real - gray, "cf": cf, "val": real}


def test_report_is_rebuilt_from_records_alone(tmp_path):
    from benchmarks.reproduce.cli import main

    folder = tmp_path / "records"
    recs = [_record("before-rl", "before", None, None, _main_final(0.7))]
    for lr, vals in ((1e-4, (0.70, 0.72)), (3e-4, (0.80, 0.78)), (1e-3, (0.85, 0.83))):
        for s, v in zip((0, 1), vals):
            recs.append(_record(P.tune_name(lr, s), "tune", "grpo", s, {"val": v}, lr=lr))
    grpo = (0.70, 0.75, 0.72)
    for s, (g, dp, dd) in enumerate(zip(grpo, (0.05, 0.04, 0.06), (0.02, -0.03, 0.01))):
        steps = {"step": [0, 10], "value": [0.6, g]}
        recs.append(_record(f"grpo-s{s}", "main", "grpo", s, _main_final(g), curve=steps))
        papo = {"step": [0, 10], "value": [0.6, g + dp]}
        recs.append(_record(f"papo_g-s{s}", "main", "papo_g", s, _main_final(g + dp), curve=papo))
        recs.append(_record(f"dapo-s{s}", "main", "dapo", s, _main_final(g + dd)))
    for r in recs:
        REC.write_json(folder / f"{r['name']}.json", r)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text(REP.discussion_block("main", "Hand-written, kept.\n") + "\n")
    assert main(["--report", "--records", str(folder), "--docs", str(docs)]) == 0
    md = (docs / "results.md").read_text()
    assert "Chosen learning rate: **0.001**" in md  # means 0.71, 0.79, 0.84
    # PAPO-G - GRPO on test: differences 0.05, 0.04, 0.06 -> mean 5.0 points, sd 1.0 point,
    # half-width 4.302653 x 1.0 / sqrt(3) = 2.484 points; t = 5 sqrt(3) = 8.660 with df 2, so
    # p = 1 - t / sqrt(2 + t^2) (the df-2 closed form) = 0.0132
    t = 5 * math.sqrt(3)
    p = 1 - t / math.sqrt(2 + t * t)
    assert f"**+5.0 [+2.5, +7.5], p {p:.3f}**" in md
    # the same at step 10 of the validation curve (step 0: no difference at all)
    assert f"| 10 | 3 | **+5.0 [+2.5, +7.5], p {p:.3f}** | resolved, higher |" in md
    # DAPO - GRPO: differences 0.02, -0.03, 0.01 -> mean 0, an interval across 0
    dapo_row = next(line for line in md.splitlines() if line.startswith("| DAPO vs GRPO, equal s"))
    assert "+0.0 [" in dapo_row and "**" not in dapo_row
    assert (
        "**DAPO vs GRPO, equal steps** (" in md and "test accuracy (real image): unresolved" in md
    )
    assert "| DAPO vs GRPO, equal rollouts | DAPO | GRPO, DAPO's rollouts | 0 | pending" in md
    # PAPO-G's test accuracy 0.75, 0.79, 0.78: mean 77.3, sample sd sqrt(0.000867 / 2) = 2.1
    assert "| PAPO-G | 3 | 77.3 ± 2.1 |" in md
    assert "Hand-written, kept.\n<!-- /discussion:main -->" in md
    assert (docs / REP.CURVES_PNG).stat().st_size > 10_000


@pytest.mark.slow
def test_quick_run_end_to_end_then_skipped(tmp_path):
    """Two tiny runs through subprocess workers: records, report, and a rerun that skips."""
    from benchmarks.reproduce.cli import main

    out = tmp_path / "runs"
    argv = ["--quick", "--only", "before-rl,tune-lr0.001", "--out", str(out), "--jobs", "2"]
    assert main(argv) == 0
    before = json.loads((out / "records" / "before-rl.json").read_text())
    assert before["questions"]["test/real"]["n"] == 32
    real = REC.correct_vector(before, "test/real")
    assert math.isclose(before["final"]["test/real"], sum(real) / 32)
    assert math.isclose(
        before["final"]["test/drop"], before["final"]["test/real"] - before["final"]["test/gray"]
    )
    tune = json.loads((out / "records" / "tune-lr0.001-s0.json").read_text())
    assert tune["final"].keys() == {"val"} and tune["train"]["curve"]["step"] == [0, 1, 2]
    assert (
        tune["config"]["optim"]["lr"] == 1e-3
        and tune["config"]["data"]["eval_split"] == "validation"
    )
    log = (out / "tune-lr0.001-s0" / "log.txt").read_text()
    assert main(argv) == 0  # finished: not run again
    assert (out / "tune-lr0.001-s0" / "log.txt").read_text() == log


def test_the_quickstart_hash_ignores_only_the_learning_rate_no_run_uses(monkeypatch):
    base = P.quickstart_tree()
    digest = P.quickstart_sha256()

    def with_value(section, field, value):
        tree = json.loads(json.dumps(base))
        tree[section][field] = value
        monkeypatch.setattr(P, "quickstart_tree", lambda: tree)
        return P.quickstart_sha256()

    assert with_value("optim", "lr", 0.5) == digest  # tuned per run, never inherited
    assert with_value("optim", "weight_decay", 0.5) != digest
    assert with_value("rollout", "n", 3) != digest
