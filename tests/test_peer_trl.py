"""benchmarks/peer_trl.py without TRL: what makes its comparison fair, and its arithmetic.

The loss equivalence itself needs TRL and is the script's own check. These tests pin the
set-up it claims: TRL is fed exactly the prompts vispo's trainer draws, step by step, with the
same 56x56 images and prompt text (image item first, as TRL inserts it), and the difference
metrics and phase split it reports are computed as documented.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from vispo.rewards import RewardRunner
from vispo.train.trainer import Trainer

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "peer_trl.py"


@pytest.fixture(scope="module")
def peer():
    spec = importlib.util.spec_from_file_location("peer_trl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trl_gets_the_prompts_the_vispo_trainer_draws(peer, tmp_path):
    cfg = peer.vispo_config(0.01, tmp_path, seed=3, steps=2)
    model, processor = peer.standard_model(0, quick=True)
    trainer = Trainer(
        cfg,
        model=model,
        processor=processor,
        reward_fn=RewardRunner(peer.BernoulliReward(3), num_workers=0),
    )
    batches = peer.prompt_batches(cfg, processor, 2)
    assert [len(b) for b in batches] == [16, 16]
    for batch in batches:  # the trainer's own sampler, one batch per step
        drawn = [trainer.train_data[i] for i in next(trainer.sampler)]
        assert [row["sample"].id for row in batch] == [s.id for s in drawn]
    assert batches[0][0]["sample"].id != batches[1][0]["sample"].id

    row = batches[0][0]
    text = row["sample"].question + " Answer in one word."  # the "short" template
    assert row["text"] == text
    assert row["image"].size == (56, 56)  # easy-vqa's 64x64 on the 4-token grid
    assert row["messages"] == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
    ]
    assert peer.trl_row(row) == {
        "prompt": [{"role": "user", "content": text}],
        "image": row["image"],
    }


def test_compare_reports_differences_against_their_scales(peer):
    r = peer.compare(
        torch.tensor(1.0),
        [torch.tensor([1.0, -4.0]), torch.tensor([0.5])],
        torch.tensor(1.5),
        [torch.tensor([1.5, -4.0]), torch.tensor([0.25])],
        2.0,
    )
    assert r["loss_abs_diff"] == 0.5
    assert r["loss_rel_diff"] == 0.25  # 0.5 / term scale 2
    assert r["grad_max_abs"] == 4.0
    assert r["grad_max_abs_diff"] == 0.5
    assert r["grad_rel_diff"] == 0.125


def test_trl_phases_split_each_measured_step(peer):
    # Three steps (the first is the warm-up) ending at t = 0, 10, 25.
    steps, phases = peer.trl_phases(
        [0.0, 10.0, 25.0], gen=[3.0, 4.0, 5.0], prep=[4.0, 6.0, 7.0], loss=[2.0, 3.0, 4.0]
    )
    assert steps == [10.0, 15.0]
    assert phases == [
        {"generate": 4.0, "score": 2.0, "policy_forward": 3.0, "backward_optimizer_other": 1.0},
        {"generate": 5.0, "score": 2.0, "policy_forward": 4.0, "backward_optimizer_other": 4.0},
    ]


def test_vision_heavy_workload_and_report(peer):
    """The vision-heavy workload's sizes reach TRL's config, and its report (matched
    equivalence rows only) gives the rollout ratio and the targets."""
    import argparse

    peer.set_workload("vision-heavy")
    try:
        assert (peer.PROMPTS, peer.N) == (8, 8)
        assert peer.configs("off", [0.01]) == [("vispo", 0.01, False), ("trl", 0.01, False)]
        run = {"threads": 2, "setup_rss_mib": 100.0, "mean_length": 64.0}
        vispo = dict(run, steps=[10.0], peak_rss_mib=1000.0)
        vispo["phases"] = [{"rollout": 4.0, "reward": 0.0, "score": 2.0, "update": 4.0}]
        trl = dict(run, steps=[40.0], peak_rss_mib=4000.0)
        trl["phases"] = [
            {"generate": 5.0, "score": 5.0, "policy_forward": 10.0, "backward_optimizer_other": 20}
        ]
        timing = {("vispo", 0.01, False): vispo, ("trl", 0.01, False): trl}
        row = {k: 1e-9 for k in ("loss_abs_diff", "loss_rel_diff", "grad_max_abs_diff")}
        row.update(check="beta 0.01", trl_loss=0.1, vispo_loss=0.1, grad_max_abs=1.0)
        row.update(grad_rel_diff=1e-9, note="")
        equiv = {
            "rows": [row],
            "same_prompt_tokens": True,
            "advantages_max_abs_diff": 0.0,
            "ref_logp_max_abs_diff": 1e-7,
            "k3_mean": 0.1,
            "k3_clamped_tokens": 0,
        }
        args = argparse.Namespace(
            quick=False, threads=2, steps=1, betas=[0.01], note="", trl_set={}
        )
        text = peer.report(args, equiv, timing)
    finally:
        peer.set_workload("standard")
    assert (peer.PROMPTS, peer.N) == (16, 5)
    assert "8 easy-vqa prompts x 8 completions" in text
    assert "`per_device_train_batch_size=64`, `num_generations=8`" in text
    assert "| off | 0.01 | 10.00 | 40.00 | **0.25** | 1000 | 4000 | **0.25** |" in text
    assert "| off | 0.01 | 4.00 | 5.00 | **0.80** |" in text  # rollout vs TRL's generate
    assert "off-policy check" not in text  # the matched rows only
