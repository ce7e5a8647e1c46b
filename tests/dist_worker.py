"""A tiny training run for the distributed tests: `python` (one process) or `torchrun`.

    torchrun --nproc_per_node 2 tests/dist_worker.py OUT --strategy fsdp2 --steps 3
    python tests/dist_worker.py OUT --preset dapo --reward scripted

Rank 0 writes OUT/history.json (per-step metrics) and OUT/final.safetensors (the full state
dict); each rank writes OUT/trained-rank{R}.json (the keys of the groups it trained on). ``--interrupt-after K`` runs K steps, writes a
checkpoint and exits as if killed; ``--resume`` continues from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from vispo.data import PromptSampler
from vispo.rewards import RewardRunner
from vispo.train.config import load_config
from vispo.train.trainer import Trainer


def parity_reward(completions, answers, **columns):
    return [float(len(c) % 2 == 0) for c in completions]


class ScriptedReward:
    """Dynamic sampling with groups that cross ranks: in the k-th batch the sampler draws, the
    prompts at positions ``PATTERN[k % 2]`` are informative (rewards 1, 0, 0), the others get
    0. With 4 prompts per step and 2 ranks, round 1 keeps positions 0, 2, 3 and round 2 adds its
    position 1: rank 0 trains on 0 and 2 (rolled out by rank 1), rank 1 on 3 and round 2's 1
    (rolled out by rank 0)."""

    PATTERN = ({0, 2, 3}, {1, 3})

    def __init__(self):
        self.runner = RewardRunner(self.fn, num_workers=0)
        self.informative: set[str] = set()
        self.n_errors = 0

    def script(self, trainer, draws: int) -> None:
        cfg = trainer.cfg.train
        sampler = PromptSampler(len(trainer.train_data), cfg.prompts_per_step, cfg.seed)
        for k in range(draws):
            ids = [trainer.train_data[i].id for i in next(sampler)]
            self.informative.update(ids[j] for j in self.PATTERN[k % 2])

    def fn(self, completions, answers, sid, **columns):
        seen: set[str] = set()
        out = []
        for s in sid:
            out.append(1.0 if s not in seen and s in self.informative else 0.0)
            seen.add(s)
        return out

    def __call__(self, texts, answers, *, sample_ids, **columns):
        return self.runner(texts, answers, sample_ids=sample_ids, sid=sample_ids)


def worker_config(out, strategy: str, steps: int, preset: str = "papo_g", extra=()):
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
            *extra,
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
    p.add_argument("--reward", choices=("parity", "scripted"), default="parity")
    p.add_argument("--override", action="append", default=[], help="section.field=value")
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = worker_config(a.out, a.strategy, a.steps, a.preset, a.override)
    reward = (
        ScriptedReward() if a.reward == "scripted" else RewardRunner(parity_reward, num_workers=0)
    )
    trainer = Trainer(cfg, resume=a.resume, reward_fn=reward)
    if a.reward == "scripted":
        reward.script(trainer, 2 * a.steps)
    trained = []  # per step, the (step, round, position) keys of the groups this rank trained on
    real_after_step = trainer._after_step

    def after_step(metrics):
        trained.append([list(g.key) for g in trainer._last_step.groups])
        real_after_step(metrics)

    trainer._after_step = after_step
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
    out = Path(a.out)
    (out / f"trained-rank{trainer.dist.rank}.json").write_text(json.dumps(trained))
    (out / f"shared-prefix-rank{trainer.dist.rank}.json").write_text(
        json.dumps(trainer.shared_prefix)
    )
    if trainer.dist.main:
        (out / "history.json").write_text(json.dumps(history))
        save_file(
            {k: v.contiguous().clone() for k, v in weights.items()}, str(out / "final.safetensors")
        )
    if trainer.dist.active:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        # Known, not root-caused: after everything above has finished and been written, a rank
        # of a 2-rank FSDP2 run sometimes aborts in the interpreter's teardown ("terminate
        # called without an active exception", no Python frame; about 1 in 10 runs on a loaded
        # 2-core machine, 0 of 8 before the issue-15/16/17 merges). The results are complete,
        # so the worker leaves without the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
