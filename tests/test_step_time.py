"""benchmarks/step_time.py's arithmetic and workload definitions (the timings are the script's).

The floor of each objective is checked against a hand sum of the passes algorithms.md says it
needs, and both workloads are checked to be valid configs of the stated sizes.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

from vispo.algos import requirements
from vispo.train.config import load_config

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "step_time.py"


@pytest.fixture(scope="module")
def st():
    spec = importlib.util.spec_from_file_location("step_time_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return module


def _cfg(st, preset, workload="cpu"):
    return load_config(None, st.workload_overrides(preset, Path("unused"), 0, workload=workload))


# Rollout 7, reward 0.5, F 2, F_mask 3, U 5, U_views 4 (seconds): the floor by hand.
MEASURED = {"time/rollout": 7.0, "time/reward": 0.5}
COSTS = {"F": 2.0, "F_mask": 3.0, "U": 5.0, "U_views": 4.0}
EXPECTED_FLOOR = {
    "grpo": 7.5 + 5 + 2,  # update + reference pass (beta 0.01)
    "dapo": 7.5 + 5,  # beta 0: no reference pass
    "papo_g": 7.5 + 5 + 2 + 3,  # + the detached masked branch
    "papo_d": 7.5 + 5 + 3,  # beta 0, masked branch
    "cppo": 7.5 + 5 + 2 + 4,  # + I+/I- forward and backward on the positive rows
}


@pytest.mark.parametrize("preset", sorted(EXPECTED_FLOOR))
def test_floor_is_the_sum_of_the_passes_the_objective_needs(st, preset):
    cfg = _cfg(st, preset)
    assert st.floor(MEASURED, COSTS, cfg) == pytest.approx(EXPECTED_FLOOR[preset])


def test_cppo_floor_costs_include_the_selection_entropies(st):
    """CPPO's token selection needs the original's and I-'s full-vocabulary entropies, so the
    passes timed for its floor compute them (pass_costs reads the same requirements)."""
    req = requirements(_cfg(st, "cppo").objective)
    assert req.entropy == frozenset({"orig", "neg"})
    assert requirements(_cfg(st, "grpo").objective).entropy == frozenset()


def test_workloads_are_valid_configs_of_the_stated_sizes(st):
    cpu, gpu = _cfg(st, "grpo", "cpu"), _cfg(st, "grpo", "gpu")
    for cfg in (cpu, gpu):
        assert (cfg.train.prompts_per_step, cfg.rollout.n, cfg.rollout.temperature) == (16, 5, 1.0)
        assert cfg.optim.lr == 1e-6
    assert (cpu.rollout.min_new_tokens, cpu.rollout.max_new_tokens) == (64, 64)
    assert (cpu.train.device, cpu.micro_batch) == ("cpu", 80)
    assert (gpu.rollout.min_new_tokens, gpu.rollout.max_new_tokens) == (512, 512)
    assert (gpu.train.device, gpu.train.autocast, gpu.micro_batch) == ("cuda", "bf16", 20)
    assert st.MODELS["cpu"]["vocab_size"] == 19008 and st.MODELS["gpu"]["vocab_size"] == 151936


def test_report_ratios(st):
    row = {
        "time/rollout": 1.0,
        "time/reward": 0.0,
        "time/score": 0.5,
        "time/update": 2.5,
        "floor": 4.0,
        "rounds": 1,
        "peak_rss_gib": 2.0,
        "peak_gpu_gib": 10.0,
    }
    rows = {
        "grpo": dict(row, **{"time/step": 4.0}),
        "cppo": dict(row, **{"time/step": 5.0, "peak_gpu_gib": 15.0}),
    }
    args = argparse.Namespace(workload="gpu", steps=3, threads=2)
    text = st.report(rows, {}, args)
    assert (
        "| cppo | 1.00 | 0.000 | 0.50 | 2.50 | 5.00 | 1.25 | 4.00 | 1.25 | 15.00 | 1.50 | 1 |"
        in text
    )
    assert "CPPO / GRPO step time: 1.25" in text
