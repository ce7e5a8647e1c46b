"""The RL loop. One step reads top to bottom as design.md's "one training step":

    rollout -> rewards -> advantages -> perturb -> score -> objective -> update

The trainer orchestrates; every formula lives in :mod:`vispo.algos`. Under ``torchrun`` each
rank rolls out its slice of the step's prompts and the update runs through DDP or FSDP2
(:mod:`vispo.train.dist`); single-process runs take the same code path with one rank.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import random
import time
import weakref
from pathlib import Path

import numpy as np
import torch

from vispo.algos import noisy_rollout_plan, overlong_penalty, refill_size, requirements
from vispo.data import PromptSampler, get_template
from vispo.models.prefix import shared_prefix_unsupported
from vispo.models.scoring import encode_prompts
from vispo.rewards import reward_columns
from vispo.rollout import concat_rollouts, load_backend
from vispo.train import batch as B
from vispo.train import runfolder as RF
from vispo.train.checkpoint import (
    CheckpointCorrupt,
    checkpoint_dirs,
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    set_aside,
)
from vispo.train.config import Config, ConfigError, config_to_dict
from vispo.train.deepspeed import gathered
from vispo.train.dist import (
    resolve_strategy,
    setup_distributed,
    unwrap,
    wrap_model,
    wrap_optimizer,
)
from vispo.train.guard import CollapseGuard
from vispo.train.logging import MetricsLog, write_samples_page
from vispo.train.optim import build_optimizer
from vispo.train.setup import load_eval_data, load_model, load_reward, load_train_data
from vispo.train.stopping import (
    NO_STOP,
    GracefulStop,
    StepAbandoned,
    TrainingInterrupted,
    kill_tree,
    process_tree,
    signal_name,
)
from vispo.train.stopping import restore as restore_step_start
from vispo.train.stopping import snapshot as snapshot_step_start
from vispo.train.update import FixedScores, UpdateState, ppo_update, score_fixed


def _on(group: B.Group, device: torch.device) -> B.Group:
    """``group`` with its token tensors on ``device`` (to send it to another rank)."""
    return dataclasses.replace(
        group,
        response_ids=[r.to(device) for r in group.response_ids],
        truncated=group.truncated.to(device),
    )


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (non-finite steps in a row, collapse guard); a checkpoint
    was written first."""


class Trainer:
    def __init__(
        self,
        cfg: Config,
        *,
        resume: bool | str | Path = False,
        overwrite: bool = False,
        model=None,
        processor=None,
        train_data=None,
        eval_data=None,
        reward_fn=None,
        console=None,
    ):
        self.cfg = cfg.validate()
        self.out = Path(cfg.train.out_dir)
        self.console = console
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.dist = setup_distributed(cfg.train.device)
        if cfg.train.prompts_per_step % self.dist.world:
            raise ConfigError(
                f"train.prompts_per_step: {cfg.train.prompts_per_step} must be divisible by the "
                f"number of ranks ({self.dist.world}): each rank rolls out whole groups"
            )
        self._claim_run_folder(resume, overwrite)  # before any model is loaded
        self._seed(cfg.train.seed)
        self.req = requirements(cfg.objective)
        self.autocast = torch.bfloat16 if cfg.train.autocast == "bf16" else None

        model, self.processor = (model, processor) if model is not None else load_model(cfg.model)
        model.to(self.dist.device)
        self.ref_model, self.ref_context = self._reference(model)
        # ``train_model`` runs the update (a DDP wrapper, or the FSDP2-sharded model);
        # ``model`` generates and scores without gradient.
        self.strategy = resolve_strategy(cfg.train.strategy)
        self.train_model = wrap_model(model, self.strategy, self.dist)
        self.model = unwrap(self.train_model)
        self.shared_prefix = self._shared_prefix(cfg.train.shared_prefix)
        self.rollout_backend = load_backend(
            cfg.rollout.backend,
            self.model,
            self.processor,
            autocast=self.autocast,
            shared_prefix=self.shared_prefix,
        )
        self.template = get_template(cfg.data.template)
        self.train_data = (
            train_data
            if train_data is not None
            else load_train_data(cfg.data, self.processor, self.template, log=self.log)
        )
        self.eval_data = (
            eval_data if eval_data is not None else load_eval_data(cfg.data, self.train_data)
        )
        self.reward = reward_fn if reward_fn is not None else load_reward(cfg.reward)
        self.budget = B.image_budget(self.processor)

        self.optimizer = build_optimizer(
            self.model,
            lr=cfg.optim.lr,
            weight_decay=cfg.optim.weight_decay,
            betas=(cfg.optim.beta1, cfg.optim.beta2),
            vision_lr_scale=cfg.optim.vision_lr_scale,
        )
        # DeepSpeed ZeRO wraps the policy together with its optimizer.
        self.train_model, self.optimizer = wrap_optimizer(
            self.train_model,
            self.optimizer,
            self.strategy,
            self.dist,
            micro_batch=cfg.micro_batch,
            grad_clip=cfg.optim.grad_clip,
        )
        self.sampler = PromptSampler(
            len(self.train_data), cfg.train.prompts_per_step, cfg.train.seed
        )
        self.guard = CollapseGuard(
            window=cfg.guard.window,
            min_history=cfg.guard.min_history,
            z_threshold=cfg.guard.z_threshold,
            min_signals=cfg.guard.min_signals,
            action=cfg.guard.action,
        )
        self.updates = UpdateState()
        self.step_count = 0
        self._last_saved = -1
        self.history: list[dict] = []
        self.eval_results: dict[str, float] = {}

        resume_from = self._resume(resume) if resume is not False else None
        self.metrics_log = None
        if self.dist.main:  # rank 0 writes the run folder's logs
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
            self.metrics_log = MetricsLog(
                self.out,
                resume_step=self.step_count if resume_from is not None else None,
                tensorboard=cfg.logging.tensorboard,
                wandb=cfg.logging.wandb,
                wandb_project=cfg.logging.wandb_project,
                config=config_to_dict(cfg),
            )

    # --- the run folder ------------------------------------------------------------------

    def _claim_run_folder(self, resume, overwrite: bool) -> None:
        """Rank 0 locks the run folder; a new run refuses a folder that holds another run
        unless ``overwrite`` (which deletes it first). Every rank learns the verdict."""
        self._lock = None
        problem = None
        if self.dist.main:
            try:
                if resume is not False and overwrite:
                    raise RF.RunFolderError("--resume and --overwrite exclude each other")
                self._lock = RF.lock_run_folder(self.out)
                weakref.finalize(self, self._lock.release)
                named = (
                    None if isinstance(resume, bool) else RF.resolve_checkpoint(self.out, resume)
                )
                if resume is False or (named is not None and not RF.belongs_to(named, self.out)):
                    if overwrite and RF.run_contents(self.out):
                        removed = RF.clear_run_folder(self.out)
                        self.log(
                            f"--overwrite: deleted the old run in {self.out} ({len(removed)} entries)"
                        )
                    RF.refuse_reuse(self.out)
            except RF.RunFolderError as e:
                problem = e
        if not RF.agree(self.dist, problem is None):
            self.release_run_folder()
            raise problem or RF.RunFolderError("rank 0 could not take the run folder")

    def release_run_folder(self) -> None:
        """Let other trainings use the run folder (also done at the end of :meth:`train`)."""
        if getattr(self, "_lock", None) is not None:
            self._lock.release()

    def _resume(self, resume) -> Path | None:
        """Restore the named checkpoint, or the newest one that passes its checks (saying which
        failed). Without one: start from scratch if the run never got as far as a checkpoint,
        else refuse, leaving metrics.jsonl as it is. Records the resume in resumes.jsonl."""
        named = None if isinstance(resume, bool) else RF.resolve_checkpoint(self.out, resume)
        candidates = [named] if named is not None else list(reversed(checkpoint_dirs(self.out)))
        old_cfg = RF.previous_config(named.parent.parent if named is not None else self.out)
        bad: list[tuple[Path, str]] = []
        chosen = None
        for path in candidates:
            try:
                self._restore(path)
            except CheckpointCorrupt as e:
                if named is not None:
                    raise
                bad.append((path, str(e)))
                self.log(f"resume: skipping {RF.first_line(str(e))}")
                continue
            chosen = path
            break
        if chosen is None:
            self._start_over(bad)
        set_aside_now = []
        if self.dist.main:
            mine = chosen is None or RF.belongs_to(chosen, self.out)
            newer = [
                p
                for p in checkpoint_dirs(self.out)
                if mine and (chosen is None or checkpoint_step(p) > self.step_count)
            ]
            bad_paths = {p for p, _ in bad}
            if newer or bad:
                kept = RF.keep_metrics(self.out, "before-resume", move=False)
                if kept is not None:
                    self.log(f"resume: metrics.jsonl as it was is kept in {kept}")
            for p in sorted(set(newer) | bad_paths):
                if p.exists():
                    suffix = "corrupt" if p in bad_paths else "abandoned"
                    set_aside_now.append(str(set_aside(p, suffix)))
                    self.log(f"resume: set {p.name} aside as {Path(set_aside_now[-1]).name}")
            changes = (
                None if old_cfg is None else RF.config_changes(old_cfg, config_to_dict(self.cfg))
            )
            self.log(f"resume: {RF.describe_changes(changes)} (recorded in {RF.RESUMES})")
            RF.record_resume(
                self.out,
                {
                    "from": None if chosen is None else str(chosen),
                    "step": self.step_count,
                    "changed": changes,
                    "skipped": [{"checkpoint": str(p), "reason": r} for p, r in bad],
                    "set_aside": set_aside_now,
                    "pid": os.getpid(),
                },
            )
        self.dist.barrier()
        return chosen

    def _start_over(self, bad: list[tuple[Path, str]]) -> None:
        """``--resume`` found no usable checkpoint."""
        cfg = self.cfg.train
        logged = RF.last_logged_step(self.out)
        first_save = min(cfg.save_every or cfg.steps, cfg.steps)
        where = f"{self.out}/checkpoints"
        # The checkpoint of step s is written after step s is logged and before step s+1 runs:
        # a step logged after the first scheduled save means that checkpoint existed.
        if bad or logged < 0 or logged > first_save:
            why = (
                f"every checkpoint failed its checks ({len(bad)}; the newest: "
                f"{RF.first_line(bad[0][1])})"
                if bad
                else "no complete checkpoint"
            )
            raise RF.RunFolderError(
                f"--resume: {where}: {why}, but metrics.jsonl records "
                f"{'unreadable steps' if logged < 0 else f'steps up to {logged}'}, so a "
                "checkpoint should exist; nothing was changed. Start the run again with "
                "--overwrite, or train into another train.out_dir"
            )
        self.log(f"no checkpoint in {where}: starting from scratch")
        if self.dist.main and (self.out / RF.METRICS).is_file():
            if (self.out / RF.METRICS).stat().st_size > 0:
                kept = RF.keep_metrics(self.out, "before-restart", move=True)
                self.log(f"resume: the {logged} step(s) logged before are kept in {kept}")

    # --- setup helpers -------------------------------------------------------------------

    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _reference(self, model):
        if not self.req.ref:
            return None, contextlib.nullcontext
        if hasattr(model, "disable_adapter"):  # LoRA: the base weights are the reference
            return model, model.disable_adapter
        ref = copy.deepcopy(model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref, contextlib.nullcontext

    def _shared_prefix(self, setting: str) -> bool:
        """Whether prompts run once per group (``train.shared_prefix``), with the reason when
        ``auto`` falls back."""
        if setting == "off":
            return False
        reason = shared_prefix_unsupported(self.model)
        if reason is None:
            return True
        if setting == "on":
            raise ConfigError(f"train.shared_prefix=on is not possible here: {reason}")
        self.log(f"shared prefix off: {reason}")
        return False

    def log(self, message: str) -> None:
        if not self.dist.main:
            return
        if self.console is not None:
            self.console.print(message)
        else:
            print(message, flush=True)

    # --- one step ------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        """rollout -> rewards -> advantages -> perturb -> score -> objective -> update."""
        cfg, t = self.cfg, {}
        t0 = time.perf_counter()
        with getattr(self, "_stop", NO_STOP).abandonable():  # a first SIGTERM/SIGINT abandons
            step, sampling = self._collect(t)  # rollout, rewards, advantages
        B.draw_variants(
            step,
            self.processor,
            list(self.req.variants),
            cfg.train.seed,  # perturb
            mask_ratio=cfg.objective.mask_ratio,
            mask_patch_size=cfg.objective.mask_patch_size,
            include_blur=cfg.objective.cpl_blur,
            mask_order=cfg.objective.mask_order,
            budget=self.budget,
        )
        t1 = time.perf_counter()
        fixed = score_fixed(  # score (no-grad passes)
            self.model,
            self.ref_model,
            step.batch,
            step.variants,
            self.req,
            on_policy=cfg.train.ppo_epochs == 1 and self._n_mini(step) == 1,
            temperature=cfg.rollout.temperature,
            micro_batch=cfg.micro_batch,
            stack=cfg.train.stack_variants,
            ref_context=self.ref_context,
            autocast=self.autocast,
            shared_prefix=self.shared_prefix,
        )
        self.dist.synchronize()  # the scoring passes run asynchronously on a GPU
        t2 = time.perf_counter()
        metrics = self._update(step, fixed)  # objective + update
        self.rollout_backend.sync_weights(self.model)
        t3 = time.perf_counter()
        metrics.update(
            {k: float(v) for k, v in B.rollout_metrics(step, cfg.rollout.max_new_tokens).items()}
        )
        metrics.update(
            {
                **sampling,
                "time/rollout": t["rollout"],
                "time/reward": t["reward"],
                "time/score": t2 - t1,
                "time/update": t3 - t2,
                "time/step": t3 - t0,
                "reward/errors": float(getattr(self.reward, "n_errors", 0)),
            }
        )
        tokens = float(self.dist.all_reduce(step.batch.response_mask.sum()))
        metrics = self.dist.reduce_metrics(metrics)
        metrics["throughput/tokens_per_s"] = tokens / metrics["time/step"]
        self._last_step = step
        return metrics

    def _collect(self, t: dict) -> tuple[B.StepBatch, dict[str, float]]:
        """Roll out and reward this rank's prompts; with dynamic sampling, more rounds until
        ``prompts_per_step`` informative groups are found over all ranks.

        The rounds are global: every rank runs the same number (so the samplers stay in step),
        the kept groups are the first informative ones in the order of the global batches (what
        a one-process run keeps), and each rank trains on an even share of them, which may hold
        groups another rank rolled out. Round 1 rolls out the full batch, a later round only
        :func:`refill_size` prompts (the deficit over the informative fraction so far), the
        first of the sampler's next batch, split evenly over the ranks. When ``ds_max_rounds``
        runs out first, the step trains on the informative groups found (cut to a multiple of
        the rank count); when there are fewer than one per rank, on the last full round's
        groups. Either way a warning is logged and ``dynamic_sampling/groups_short`` counts the
        informative groups the step lacks.
        """
        cfg, ocfg = self.cfg, self.cfg.objective
        world, rank = self.dist.world, self.dist.rank
        asked = cfg.train.prompts_per_step
        target = asked // world
        max_rounds = ocfg.ds_max_rounds if ocfg.dynamic_sampling else 1
        mine: dict[tuple[int, ...], B.Group] = {}  # informative groups rolled out here, by key
        chosen: list[tuple[int, ...]] = []  # keys of the informative groups, in global order
        rounds = seen = seen_informative = 0
        size = asked  # prompts of this round over all ranks
        sizes: dict[int, int] = {}  # prompts per rank, by round
        t["rollout"] = t["reward"] = 0.0
        while len(chosen) < asked and rounds < max_rounds:
            rounds += 1
            sizes[rounds] = per = size // world
            first = rank * per  # every rank draws the same global batch and keeps its slice
            indices = next(self.sampler)[first : first + per]
            keys = [(self.step_count, rounds, first + i) for i in range(len(indices))]
            samples = [self.train_data[i] for i in indices]
            images = [[B.prepare_image(im, self.budget) for im in s.load_images()] for s in samples]
            messages = [self.template.render(s) for s in samples]
            ta = time.perf_counter()
            prompts = encode_prompts(self.processor, messages, images)
            with gathered(self.model):  # ZeRO-3: full weights to generate
                rollout = B.mixed_rollout(  # NoisyRollout: a share of each group on noised images
                    self._rollout,
                    self.processor,
                    prompts,
                    messages,
                    images,
                    keys,
                    seed=cfg.train.seed,
                    n=cfg.rollout.n,
                    **noisy_rollout_plan(ocfg, cfg.rollout.n, self.step_count / cfg.train.steps),
                    one_decode=cfg.rollout.batch_invariant
                    or getattr(self.rollout_backend, "per_prompt_counts", False),
                )
            tb = time.perf_counter()
            per_seq = [s for s in samples for _ in range(cfg.rollout.n)]
            result = self.reward(
                rollout.texts,
                [s.answer for s in per_seq],
                sample_ids=[s.id for s in per_seq],
                **reward_columns(
                    samples,
                    cfg.rollout.n,
                    [
                        ids[:k]
                        for ids, k in zip(rollout.response_ids.tolist(), rollout.lengths.tolist())
                    ],
                ),
            )
            rewards = torch.tensor(result.total, dtype=torch.float32)
            if cfg.reward.overlong_buffer > 0:
                rewards = rewards + overlong_penalty(
                    rollout.lengths,
                    max_length=cfg.rollout.max_new_tokens,
                    buffer=cfg.reward.overlong_buffer,
                    factor=cfg.reward.overlong_penalty,
                )
            components = {
                k: torch.tensor(v, dtype=torch.float32) for k, v in result.components.items()
            }
            t["rollout"] += tb - ta
            t["reward"] += time.perf_counter() - tb
            groups = B.groups_from_rollout(
                samples, images, messages, rollout, rewards, components, keys
            )
            keep = (
                B.keep_informative(groups, ocfg.ds_low, ocfg.ds_high)
                if ocfg.dynamic_sampling
                else [True] * len(groups)
            )
            mine.update({g.key: g for g, k in zip(groups, keep) if k})
            flags = torch.zeros(size)
            flags[first : first + per] = torch.tensor(keep, dtype=torch.float32)
            flags = self.dist.all_reduce(flags)  # every rank's keep flags of this round
            if per == target:  # a full round: the fallback when too few are informative
                full_groups, last_informative = groups, int(flags.sum())
            found = [(self.step_count, rounds, j) for j in range(size) if flags[j] > 0]
            chosen += found[: asked - len(chosen)]
            seen, seen_informative = seen + size, seen_informative + len(found)
            size = refill_size(asked - len(chosen), seen_informative, seen, asked, world)
        per_rank = len(chosen) // world
        if per_rank == 0:  # no informative group (or fewer than one per rank) in any round
            kept, informative = full_groups, last_informative
        else:
            kept = self._share_groups(mine, chosen[: per_rank * world], per_rank, sizes, groups)
            informative = per_rank * world
        short = asked - informative
        if short and ocfg.dynamic_sampling:
            fallback = (
                f"trains on {per_rank * world} informative groups"
                if per_rank
                else "trains on the last full round's groups, "
                f"{informative} of them informative (the rest have zero advantage)"
            )
            self.log(
                f"warning: dynamic sampling at step {self.step_count + 1}: {len(chosen)} "
                f"informative groups of the {asked} asked after {rounds} rounds "
                f"(objective.ds_max_rounds={ocfg.ds_max_rounds}); the step {fallback}"
            )
        # The round-1 prompts are reused when the step trains on exactly that round's groups.
        full_round = rounds == 1 and [g.key for g in kept] == [g.key for g in groups]
        step = B.assemble(
            self.processor,
            kept,
            prompts=prompts if full_round else None,
            scale=ocfg.adv_scale,
            eps=ocfg.adv_eps,
            estimator=ocfg.advantage,
            gather_rows=self.dist.gather_rows,
        )
        metrics = {
            "dynamic_sampling/rounds": float(rounds),
            "dynamic_sampling/kept_frac": informative / seen,
            "dynamic_sampling/groups_short": float(short),
        }
        return step, metrics

    def _share_groups(self, mine, share, per_rank, sizes, local):
        """This rank's ``per_rank`` groups of the global list of kept keys ``share``; groups
        rolled out on another rank are sent over (collective: every rank calls it). ``sizes``:
        the prompts per rank of each round."""
        rank = self.dist.rank
        owner = {key: key[2] // sizes[key[1]] for key in share}  # the rank that rolled it out
        wanted = share[rank * per_rank : (rank + 1) * per_rank]
        moves = [
            k
            for r in range(self.dist.world)
            for k in share[r * per_rank : (r + 1) * per_rank]
            if owner[k] != r
        ]
        if moves:  # the same list on every rank: all of them exchange, or none
            device = local[0].response_ids[0].device
            outgoing = [_on(mine[k], torch.device("cpu")) for k in moves if owner[k] == rank]
            received: list[list[B.Group]] = [None] * self.dist.world
            torch.distributed.all_gather_object(received, outgoing)
            mine = {**mine, **{g.key: _on(g, device) for part in received for g in part}}
        return [mine[k] for k in wanted]

    def _rollout(self, prompts, keys, n=None):
        """n responses per prompt (or one count per prompt); batch-invariant mode seeds each
        prompt on its own."""
        r = self.cfg.rollout
        kw = dict(
            n=r.n if n is None else n,
            max_new_tokens=r.max_new_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            min_new_tokens=r.min_new_tokens,
        )
        if not r.batch_invariant:
            return self.rollout_backend.generate(prompts, **kw)
        counts = [kw.pop("n")] * len(keys) if isinstance(kw["n"], int) else kw.pop("n")
        parts = [
            self.rollout_backend.generate(
                B.trim_left_padding(prompts.select([i])),
                seed=int(B.prompt_rng(self.cfg.train.seed, key, 1).integers(2**62)),
                n=count,
                **kw,
            )
            for i, (key, count) in enumerate(zip(keys, counts))
        ]
        return concat_rollouts(parts, prompts.pad_token_id)

    def _n_mini(self, step: B.StepBatch) -> int:
        """Mini-batches per epoch: the global mini-batch size, split evenly across ranks."""
        return max(1, self.cfg.sequences_per_step // self.cfg.mini_batch)

    def _update(self, step: B.StepBatch, fixed: FixedScores) -> dict[str, float]:
        cfg = self.cfg
        n_mini = self._n_mini(step)
        mini = -(-len(step.batch) // n_mini)
        micro = min(cfg.micro_batch, mini)
        return ppo_update(
            self.train_model,
            self.optimizer,
            step,
            fixed,
            self.req,
            cfg.objective,
            dist=self.dist,
            state=self.updates,
            epochs=cfg.train.ppo_epochs,
            mini_batch=mini,
            micro_batch=micro,
            micro_norm=cfg.train.micro_batch_norm,
            temperature=cfg.rollout.temperature,
            stack=cfg.train.stack_variants,
            grad_clip=cfg.optim.grad_clip,
            lr=cfg.optim.lr,
            warmup=cfg.optim.warmup_steps,
            total_updates=cfg.train.steps * cfg.train.ppo_epochs * n_mini,
            schedule=cfg.optim.schedule,
            progress=self.step_count / cfg.train.steps,
            gamma_scale=self.guard.gamma_scale,
            autocast=self.autocast,
            shared_prefix=self.shared_prefix,
        )

    # --- the loop ------------------------------------------------------------------------

    def train(self) -> list[dict]:
        """Run the remaining steps; returns the metrics of the steps run now.

        On a first SIGTERM/SIGINT the run stops after (or abandons) the current step, writes a
        checkpoint, stops the reward workers and raises :class:`TrainingInterrupted`; a second
        signal exits at once (:mod:`vispo.train.stopping`)."""
        self._stop = GracefulStop(can_abandon=self.dist.world == 1, on_second=self._kill_rewards)
        try:
            with self._stop:
                return self._train()
        finally:
            self._stop = NO_STOP

    def _train(self) -> list[dict]:
        from vispo.train.progress import StepProgress

        cfg, stop = self.cfg, self._stop
        if self.step_count == 0 and self.eval_data is not None and cfg.data.eval_size > 0:
            self.eval_results["accuracy_before"] = self.evaluate()
            self.log(f"held-out accuracy before RL: {self.eval_results['accuracy_before']:.3f}")
        run: list[dict] = []
        progress = cfg.logging.progress and self.dist.main
        stopping = False
        with StepProgress(cfg.train.steps, start=self.step_count, enabled=progress) as bar:
            while self.step_count < cfg.train.steps:
                if self._stop_agreed():
                    stopping = True
                    break
                start = snapshot_step_start(self.sampler) if stop.can_abandon else None
                try:
                    metrics = self.step()
                except StepAbandoned:  # nothing of the model changed: back to the step's start
                    restore_step_start(self.sampler, start)
                    stopping = True
                    break
                self.step_count += 1
                self._after_step(metrics)
                run.append({"step": self.step_count, **metrics})
                bar.advance(metrics)
        if stopping or self._stop_agreed():  # the final evaluation is skipped too
            self._interrupted(stop.signum)
        if self.eval_data is not None and cfg.data.eval_size > 0:
            last = self.history[-1] if self.history else {}
            done = last.get("step") == self.step_count and "eval/accuracy" in last
            # The last step's periodic evaluation is the final one: no second identical pass.
            self.eval_results["accuracy_after"] = last["eval/accuracy"] if done else self.evaluate()
            self.log(f"held-out accuracy after RL: {self.eval_results['accuracy_after']:.3f}")
            if self.metrics_log is not None:
                self.metrics_log.log(
                    self.step_count, {f"eval/{k}": v for k, v in self.eval_results.items()}
                )
        if self._last_saved != self.step_count:
            self.save()
        if self.metrics_log is not None:
            self.metrics_log.close()
        self.release_run_folder()
        return run

    def _stop_agreed(self) -> bool:
        """Whether a stop was requested (under torchrun: on any rank, so all stop together)."""
        if self.dist.world == 1:
            return self._stop.requested
        flag = torch.tensor([1.0 if self._stop.requested else 0.0])
        return float(self.dist.all_reduce(flag)[0]) > 0

    def _interrupted(self, signum: int | None) -> None:
        """Checkpoint (unless the last finished step is saved already), stop the reward workers
        and raise TrainingInterrupted."""
        signum = signum if signum is not None else 15  # another rank was signalled
        path = None
        if self.step_count > 0 and self._last_saved != self.step_count:
            path = self.save()
        elif self.step_count > 0:
            path = latest_checkpoint(self.out)
        self.close()
        name = signal_name(signum)
        if path is not None:
            where = f"checkpoint at {path} (step {self.step_count})"
        else:
            where = "no step had finished, nothing to save"
        raise TrainingInterrupted(
            f"{name}: stopped after step {self.step_count} of {self.cfg.train.steps}; {where}; "
            "continue with the same command and --resume",
            signum=signum,
            step=self.step_count,
            path=path,
        )

    def close(self) -> None:
        """Stop the reward workers (and any processes they started) and close the logs.
        Idempotent; the trainer cannot train afterwards."""
        tree = process_tree(list(getattr(self.reward, "worker_pids", []) or []))
        closer = getattr(self.reward, "close", None)
        if callable(closer):
            closer()
        kill_tree(tree)
        if self.metrics_log is not None:
            self.metrics_log.close()
        self.release_run_folder()

    def _kill_rewards(self, signum: int) -> None:
        """Second signal: kill the reward workers and their children at once (no waiting)."""
        kill_tree(process_tree(list(getattr(self.reward, "worker_pids", []) or [])))

    def _after_step(self, metrics: dict[str, float]) -> None:
        cfg, step = self.cfg, self.step_count
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and self.eval_data is not None:
            metrics["eval/accuracy"] = self.evaluate()
        event = self.guard.observe(step, metrics) if cfg.guard.enabled else None
        if event is not None:
            metrics["guard/event"] = 1.0
            self.log(f"collapse guard at step {step}: {event.signals} -> {event.action}")
        metrics["guard/gamma_scale"] = self.guard.gamma_scale
        if self.metrics_log is not None:
            self.metrics_log.log(step, metrics)
        self.history.append({"step": step, **metrics})
        page_due = cfg.train.samples_every and step % cfg.train.samples_every == 0
        stopping = self.updates.skipped_in_row >= cfg.train.max_skipped_in_row or (
            event is not None and event.action == "stop"
        )
        if (page_due or step == cfg.train.steps or stopping) and self.dist.main:
            self._write_samples(step)  # always one at the end of a run, a stopped one too
        if self.updates.skipped_in_row >= cfg.train.max_skipped_in_row:
            path = self.save()
            raise TrainingStopped(
                f"{self.updates.skipped_in_row} consecutive updates had a non-finite loss or "
                f"gradient norm (train.max_skipped_in_row={cfg.train.max_skipped_in_row}); "
                f"stopped at step {step} with a checkpoint at {path}. Lower optim.lr or inspect "
                "the rewards and inputs."
            )
        if event is not None and event.action == "stop":
            path = self.save()
            raise TrainingStopped(
                f"collapse guard: perception-KL hacking suspected at step {step} ({event.signals});"
                f" stopped with a checkpoint at {path}. Consider a smaller objective.gamma."
            )
        if cfg.train.save_every and step % cfg.train.save_every == 0:
            self.save()

    def _write_samples(self, step: int) -> None:
        last = self._last_step
        rows = [
            {
                "images": g.images,
                "question": g.sample.question,
                "answer": g.sample.answer,
                "completions": g.texts,
                "rewards": g.rewards.tolist(),
                "components": {k: v.tolist() for k, v in g.components.items()},
            }
            for g in last.groups[: self.cfg.logging.samples_per_page]
        ]
        write_samples_page(self.out / "samples" / f"step-{step:06d}.html", step, rows)

    def evaluate(self) -> float:
        """Greedy accuracy on the first ``data.eval_size`` held-out questions (each rank
        scores its share; the mean is all-reduced)."""
        from vispo.eval.accuracy import greedy_accuracy

        n = min(self.cfg.data.eval_size, len(self.eval_data))
        mine = [self.eval_data[i] for i in range(self.dist.rank, n, self.dist.world)]
        with gathered(self.model):  # ZeRO-3: full weights to generate
            acc = (
                greedy_accuracy(
                    self.model,
                    self.processor,
                    mine,
                    self.template,
                    self.reward,
                    max_new_tokens=self.cfg.rollout.max_new_tokens,
                    budget=self.budget,
                )
                if mine
                else 0.0
            )
        total = self.dist.all_reduce(torch.tensor([acc * len(mine)], dtype=torch.float64))
        return float(total[0]) / n

    # --- checkpoints ---------------------------------------------------------------------

    def save(self) -> Path:
        """Checkpoint the run (collective: every rank calls it)."""
        state = {
            "sampler": self.sampler.state_dict(),
            "guard": self.guard.state_dict(),
            "updates": self.updates.__dict__,
            "eval": self.eval_results,
        }
        path = save_checkpoint(
            self.out,
            self.step_count,
            model=self.model,
            optimizer=self.optimizer,
            state=state,
            keep_last=self.cfg.train.keep_last,
            dist=self.dist,
        )
        self._last_saved = self.step_count
        return path

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path, model=self.model, optimizer=self.optimizer, dist=self.dist)
        self.rollout_backend.sync_weights(self.model)
        self.step_count = self._last_saved = state["step"]
        try:
            self.sampler.load_state_dict(state["sampler"])
        except ValueError as e:  # the data or its batching changed since the checkpoint
            raise RF.RunFolderError(
                f"--resume from {path}: {e} (data.*, data.limit or train.prompts_per_step "
                "changed); resume with the run's own settings, or start a new run"
            ) from None
        self.guard.load_state_dict(state["guard"])
        self.updates = UpdateState(**state["updates"])
        self.eval_results = state.get("eval", {})
        self.log(f"resumed from {path} (step {self.step_count})")
