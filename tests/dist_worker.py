"""A tiny training run for the distributed tests: `python` (one process) or `torchrun`.

    torchrun --nproc_per_node 2 tests/dist_worker.py OUT --strategy fsdp2 --steps 3

Rank 0 writes OUT/history.json (per-step metrics) and OUT/final.safetensors (the full state
dict). ``--interrupt-after K`` runs K steps, writes a
checkpoint and exits as if killed; ``--resume`` continues from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from vispo.rewards import RewardRunner
from vispo.train.config import load_config
from vispo.train.trainer import Trainer


def parity_reward(completions, answers, **columns):
    return [float(len(c) % 2 == 0) for c in completions]


def worker_config(out, strategy: str, steps: int, preset: str = "papo_g"):
    """The tiny run every distributed test trains (batch-invariant rollouts, a checkpoint
    every step)."""
    return load_config(
        None,
        [
            f"objective.name={preset}",
            "model.name_or_path=tiny:qwen2_vl",
            "data.limit=32",
            "data.eval_size=0",
            f"train.steps={steps}",
            "train.prompts_per_step=4",
            "rollout.n=3",
            "rollout.max_new_tokens=5",
            "rollout.batch_invariant=true",
            f"train.out_dir={out}/run",
            "logging.progress=false",
            "optim.lr=1e-3",
            "train.samples_every=0",
            "train.save_every=1",
            f"train.strategy={strategy}",
            "train.device=cpu",
        ],
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--strategy", default="ddp")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--preset", default="papo_g")
    p.add_argument("--interrupt-after", type=int)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = worker_config(a.out, a.strategy, a.steps, a.preset)
    trainer = Trainer(cfg, resume=a.resume, reward_fn=RewardRunner(parity_reward, num_workers=0))
    if a.interrupt_after:
        history = []
        for _ in range(a.interrupt_after):
            metrics = trainer.step()
            trainer.step_count += 1
            trainer._after_step(metrics)
            history.append({"step": trainer.step_count, **metrics})
    else:
        history = trainer.train()
    weights = get_model_state_dict(
        trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if trainer.dist.main:
        out = Path(a.out)
        (out / "history.json").write_text(json.dumps(history))
        save_file(
            {k: v.contiguous().clone() for k, v in weights.items()}, str(out / "final.safetensors")
        )
    if trainer.dist.active:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
