"""benchmarks/step_time.py's arithmetic and workload definitions (the timings are the script's).

The floor of each objective is checked against a hand sum of the passes algorithms.md says it
needs, and both workloads are checked to be valid configs of the stated sizes.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

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


class _Batch(SimpleNamespace):
    def __len__(self):
        return len(self.prompt_index)


def _step():
    """Two prompts (5 and 7 real tokens, one 4x4-patch image each), two responses each of 3
    and 2 tokens; advantages positive on sequences 0 and 3 (one per prompt)."""
    prompts = SimpleNamespace(
        attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]),
        pixels={"image_grid_thw": torch.tensor([[1, 4, 4], [1, 4, 4]])},
        num_images=[1, 1],
    )
    batch = _Batch(
        prompts=prompts,
        prompt_index=torch.tensor([0, 0, 1, 1]),
        response_mask=torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 0]]),
    )
    return SimpleNamespace(batch=batch, advantages=torch.tensor([1.0, -1.0, -1.0, 1.0]))


# The no-gradient passes each objective needs beyond the update (algorithms.md): the
# reference model (beta > 0) and PAPO's detached masked branch.
SCORE_PASSES = {"grpo": 1, "dapo": 0, "papo_g": 2, "papo_d": 1, "cppo": 1}


@pytest.mark.parametrize("preset", sorted(SCORE_PASSES))
def test_floor_counts_the_passes_the_objective_needs(st, preset):
    fl = sys.modules["flops"]
    s = fl.Shapes(4, 2, 2, 1, 2, 6, 10, 4, 2, 8, 12, 2, window=1, v_full=(1,))
    step, cfg = _step(), _cfg(st, preset)
    cfg.train.micro_batch_size = 4
    groups = [fl.Group(5, ((1, 4, 4),), (3, 2)), fl.Group(7, ((1, 4, 4),), (3, 2))]
    one = fl.forward(s, groups)
    got = fl.phase_flops(s, step, cfg, requirements(cfg.objective))
    assert got["rollout"] == one
    assert got["score"] == SCORE_PASSES[preset] * one
    update = fl.forward_backward(s, groups)
    if preset == "cppo":  # I+ and I- over the positive rows: sequence 0 and sequence 3
        pos = [fl.Group(5, ((1, 4, 4),), (3,)), fl.Group(7, ((1, 4, 4),), (2,))]
        update += 2 * fl.forward_backward(s, pos)
    assert got["update"] == update


def test_floor_fraction_and_seconds(st):
    row = {"time/update": 2.0, "flops/update": 4e9, "matmul_flops": 1e10}
    assert st.fraction(row, "update") == pytest.approx(0.2)
    row.update({"flops/rollout": 1e9, "flops/score": 5e9})
    assert st.floor_seconds(row) == pytest.approx(1.0)
    assert math.isnan(st.fraction({"time/update": 1.0}, "update"))


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
    vision = _cfg(st, "grpo", "vision-heavy")
    assert (vision.train.prompts_per_step, vision.rollout.n, vision.micro_batch) == (8, 8, 64)
    assert (vision.rollout.min_new_tokens, vision.rollout.max_new_tokens) == (64, 64)
    # 448 x 448 pixels: 32 x 32 patches of 14, merged 2 x 2: 256 image tokens
    assert st.MODELS["vision-heavy"]["max_pixels"] == st.pixels_for(256) == 448 * 448
    assert {**st.MODELS["vision-heavy"], "min_pixels": 0, "max_pixels": 0} == {
        **st.MODELS["cpu"],
        "min_pixels": 0,
        "max_pixels": 0,
    }


def test_report_ratios(st):
    row = {
        "time/rollout": 1.0,
        "time/reward": 0.0,
        "time/score": 0.5,
        "time/update": 2.5,
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
        "| cppo | 1.00 | 0.000 | 0.50 | 2.50 | 5.00 | 1.25 | - | - | - | - | 15.00 | 1.50 | 1 |"
        in text
    )
    assert "cppo / GRPO step time: 1.25" in text


def test_vision_heavy_report_gives_the_targets(st):
    floor = {"flops/rollout": 2e9, "flops/score": 1e9, "flops/update": 6e9, "matmul_flops": 1e10}
    row = dict(floor, **{"time/reward": 0.0, "rounds": 1, "peak_rss_gib": 2.0})
    phases = ("time/rollout", "time/score", "time/update", "time/step")
    rows = {
        "grpo": dict(row, **dict(zip(phases, (2.0, 1.0, 3.0, 6.0)))),
        "papo_g": dict(row, **dict(zip(phases, (2.0, 2.0, 3.0, 6.6)))),
        st.PREFIX_OFF: dict(row, **dict(zip(phases, (4.0, 4.0, 16.0, 24.0)))),
    }
    args = argparse.Namespace(workload="vision-heavy", steps=1, threads=2)
    text = st.report(rows, {}, args)
    # floor s = 9e9 / 1e10; rollout 2e9 / (2 s x 1e10) = 10%, score 10%, update 20%
    assert "| grpo | 2.00 | 0.000 | 1.00 | 3.00 | 6.00 | 1.00 | 0.90 | 10% | 10% | 20% |" in text
    assert "papo_g / GRPO step time: 1.10 (target <= 1.15)" in text
    assert "shared prefix on / off: 4.00 / 20.00 s = 0.20 (target <= 0.3)" in text
    assert "no GPU was available for this run" in text or "GPU:" in text
