"""A tiny training run for the DeepSpeed tests: `python` (one process) or `torchrun`.

    torchrun --nproc_per_node 2 tests/ds_worker.py OUT --strategy zero3 --steps 2

The same run as tests/dist_worker.py (PAPO-G on a tiny Qwen2-VL, 4 prompts x 3 batch-invariant
rollouts per step), with ``--strategy`` any of vispo's strategies. Rank 0 writes
OUT/history.json (per-step metrics) and OUT/final.safetensors (the full weights, gathered
from the partitions by vispo's checkpoint code). ``--interrupt-after K`` runs K steps,
writes a checkpoint and exits as if killed; ``--resume`` continues from the last checkpoint.
``--distrust-step K`` makes the update's finiteness check fail on rank 0 only during step K,
with finite losses and gradients everywhere: the update must be skipped on every rank. Under ZeRO-3, OUT/zero3.json records how the parameters are held outside and
inside ``vispo.train.deepspeed.gathered`` and whether a forward there needs other ranks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from dist_worker import parity_reward, worker_config  # the same tiny run

from vispo.models.scoring import score
from vispo.rewards import RewardRunner
from vispo.train import deepspeed as ds
from vispo.train import update
from vispo.train.trainer import Trainer


def distrust(step: int, rank: int) -> dict:
    """Make ``update._finite_inputs`` (is every log-prob the loss reads finite?) answer False
    on ``rank`` during step ``step``; returns the dict whose "step" the caller keeps current."""
    original = update._finite_inputs
    current = {"step": 0}

    def finite_inputs(x):
        ok = original(x)
        if current["step"] == step and torch.distributed.get_rank() == rank:
            ok = ok & False
        return ok

    update._finite_inputs = finite_inputs
    return current


def zero3_report(trainer) -> dict:
    """How ZeRO-3 holds the parameters, and a forward inside ``gathered`` on rank 0 alone.

    Rank 0 scores one sequence twice inside ``gathered`` while rank 1 waits at a barrier: that
    only finishes if the forward needs no collective (hooks lifted, weights kept whole). Both
    ranks then score it outside, through ZeRO-3's per-layer gathers: the log-probs must agree.
    """
    model, rank = trainer.model, trainer.dist.rank
    params = list(model.parameters())
    one = trainer._last_step.batch.select([0])
    report = {
        "params": len(params),
        "empty_outside": sum(p.numel() == 0 for p in params),
    }
    with ds.gathered(model):
        report["full_inside"] = sum(p.numel() == p.ds_numel > 0 for p in params)
        if rank == 0:
            inside = [score(model, one, [None], temperature=1.0, grad=False)[0].logp]
            inside.append(score(model, one, [None], temperature=1.0, grad=False)[0].logp)
            report["full_after_forwards"] = sum(p.numel() == p.ds_numel > 0 for p in params)
        torch.distributed.barrier()
    report["empty_after_exit"] = sum(p.numel() == 0 for p in params)
    outside = score(model, one, [None], temperature=1.0, grad=False)[0].logp
    if rank == 0:
        report["max_diff_inside_twice"] = (inside[0] - inside[1]).abs().max().item()
        report["max_diff_inside_outside"] = (inside[0] - outside).abs().max().item()
    return report


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--strategy", default="auto")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--interrupt-after", type=int)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--distrust-step", type=int)
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = worker_config(a.out, a.strategy, a.steps)
    trainer = Trainer(cfg, resume=a.resume, reward_fn=RewardRunner(parity_reward, num_workers=0))
    current = distrust(a.distrust_step, rank=0) if a.distrust_step else {}
    history = []
    stop = a.interrupt_after or cfg.train.steps
    while trainer.step_count < stop:
        current["step"] = trainer.step_count + 1
        metrics = trainer.step()
        trainer.step_count += 1
        trainer._after_step(metrics)
        history.append({"step": trainer.step_count, **metrics})
    if trainer._last_saved != trainer.step_count:
        trainer.save()
    last = trainer.out / "checkpoints" / f"step-{trainer.step_count:06d}" / "weights.safetensors"
    if trainer.dist.main:
        out = Path(a.out)
        (out / "history.json").write_text(json.dumps(history))
        (out / "final.safetensors").write_bytes(last.read_bytes())
        (out / "info.json").write_text(
            json.dumps(
                {
                    "strategy": trainer.strategy,
                    "engine": ds.is_engine(trainer.train_model),
                    "shared_prefix": trainer.shared_prefix,
                }
            )
        )
    if trainer.strategy == "zero3" and ds.is_engine(trainer.train_model):
        report = zero3_report(trainer)
        if trainer.dist.main:
            (Path(a.out) / "zero3.json").write_text(json.dumps(report))
    if trainer.dist.active:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
