"""vispo GRPO against TRL's GRPOTrainer on the CPU workloads (issue 7, item 2; issue 18).

Two workloads (``--workload``, both defined in step_time.py): the standard one (16 prompts x 5
completions, 4 image tokens; results in peer_trl.md) and the vision-heavy one (8 prompts x 8
completions, 256 image tokens per prompt; results in peer_trl_vision.md), where vispo computes
each prompt once per group (``train.shared_prefix=auto``; the equivalence check scores with it)
and TRL once per completion. The description below gives the standard workload's sizes.

Fair before fast, in two parts:

1. **Same loss on the same batch.** One fixed batch (16 easy-vqa prompts x 5 completions of 64
   tokens from one vispo rollout, seeded Bernoulli rewards) goes through TRL's own code path
   (``GRPOTrainer._generate_and_score_completions`` with the completions and rewards fixed, then
   ``compute_loss``) and through vispo's (``encode_prompts`` -> ``score`` ->
   ``group_advantages`` -> ``compute_objective`` with the ``grpo`` preset). With the settings
   matched, loss and gradients agree to float32 rounding; the settings whose defaults differ
   are shown one at a time with the difference each makes.
2. **Step time and peak memory.** vispo's ``Trainer`` (as in ``step_time.py``) and TRL's
   ``GRPOTrainer``, each configuration in its own subprocess (peak RSS = that process's
   ``ru_maxrss``), interleaved: vispo b0, TRL b0, vispo b0.01, TRL b0.01. One warm-up step,
   then the median of ``--steps`` steps. Activation checkpointing is off by default in vispo
   and on by default in TRL (``GRPOConfig.gradient_checkpointing``), and it moves peak memory
   by ~1.2 GB here, so the four configurations run in both regimes, with the same setting on
   both sides (``--checkpointing off|on|both``, default both). TRL's phase split comes from
   timing its own methods (generation, scoring, ``compute_loss``), with the peak RSS after
   each.

The matched TRL configuration: ``loss_type="dapo"`` (TRL's global token mean; vispo's ``grpo``
preset aggregates with ``token-mean``; TRL's ``"grpo"`` loss, a per-sequence mean, is vispo's
``seq-mean-token-mean``; with every completion exactly 64 tokens long all three coincide),
``scale_rewards="group"``, ``epsilon=0.2``, ``epsilon_high=0.3``, k3 KL with ``beta``,
``use_bias_correction_kl=False`` (vispo's reference KL is the plain k3 term), temperature 1.0,
top-k off, float32 (``bf16=False``), the same activation-checkpointing setting on both sides,
constant lr 1e-6 with AdamW weight decay 0.01 and gradient clipping 1.0 (vispo's
defaults), one optimizer step per generation batch (``per_device_train_batch_size=80``,
``num_generations=5``, no gradient accumulation), exactly 64 new tokens
(``min_new_tokens=64`` through ``generation_kwargs``) and the same suppressed image-placeholder
tokens as vispo's rollout, the same prompts per step in the same order (vispo's sampler) and
the same seeded reward stream.

    python benchmarks/peer_trl.py                     # standard workload, 3 measured steps
    python benchmarks/peer_trl.py --checkpointing off # only the four configurations, no recompute
    python benchmarks/peer_trl.py --quick --steps 1 --threads 1    # small model, smoke run
    python benchmarks/peer_trl.py --workload vision-heavy --checkpointing off --betas 0.01 \
        --steps 1                                       # issue 18's workload, GRPO's beta

Needs ``trl==1.16.0`` (without its ``vlm`` extra). Writes benchmarks/results/peer_trl.md
(``--quick``: /tmp/peer_trl_quick.md unless ``--results`` says otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import peer_trl_report as _report  # noqa: E402
from peer_trl_report import fmt  # noqa: E402
from step_time import (  # noqa: E402  (the one workload definition)
    BATCH,
    BernoulliReward,
    workload_overrides,
)
from step_time import standard_model as _standard_model  # noqa: E402

from vispo.algos import (  # noqa: E402
    ObjectiveInputs,
    aggregate,
    compute_objective,
    group_advantages,
    kl_estimate,
    objective_preset,
)
from vispo.data import PromptSampler, get_template  # noqa: E402
from vispo.models.adapt import enable_gradient_checkpointing  # noqa: E402
from vispo.models.scoring import build_scoring_batch, encode_prompts, score  # noqa: E402
from vispo.rewards import RewardRunner  # noqa: E402
from vispo.rollout.hf import generate, multimodal_token_ids  # noqa: E402
from vispo.train import batch as B  # noqa: E402
from vispo.train.config import load_config  # noqa: E402
from vispo.train.setup import load_train_data  # noqa: E402
from vispo.train.trainer import Trainer  # noqa: E402

RESULTS = HERE / "results"
PROMPTS, N, TOKENS = 16, 5, 64  # prompts per step, completions per prompt, new tokens
WORKLOAD = "cpu"  # step_time.py's name of the standard workload


def set_workload(name: str) -> None:
    """Select the workload of this process: its prompts per step and completions per prompt
    (``PROMPTS``, ``N``), its model and config (``standard_model``, ``vispo_config``)."""
    global PROMPTS, N, WORKLOAD
    WORKLOAD = "cpu" if name == "standard" else name
    PROMPTS, N = BATCH[WORKLOAD]


def standard_model(seed: int, quick: bool = False):
    """The workload's model (step_time.standard_model)."""
    return _standard_model(seed, quick=quick, workload=WORKLOAD)


CLIP_LOW, CLIP_HIGH = 0.2, 0.3  # vispo's grpo preset
TRL_STD_EPS = 1e-4  # TRL divides by (std + 1e-4); vispo's default adv_eps is 1e-6


def configs(checkpointing: str, betas=(0.0, 0.01)) -> list[tuple[str, float, bool]]:
    """(system, beta, activation checkpointing) in run order: the configurations
    interleaved, without checkpointing (vispo's default) and/or with it (TRL's default)."""
    regimes = {"off": [False], "on": [True], "both": [False, True]}[checkpointing]
    return [(role, beta, ck) for ck in regimes for beta in betas for role in ("vispo", "trl")]


# --- the workload, shared by both sides ------------------------------------------------------


def vispo_config(beta: float, out: Path, seed: int, steps: int):
    """The config of ``step_time.trainer_for`` with the reference-KL weight set."""
    overrides = workload_overrides("grpo", out, seed, steps=max(steps, 2), workload=WORKLOAD)
    return load_config(None, [*overrides, f"objective.beta={beta}"])


def prompt_batches(cfg, processor, n_batches: int) -> list[list[dict]]:
    """The first ``n_batches`` prompt batches exactly as vispo's trainer draws them: the same
    data (easy-vqa, limit, length filter), the same seeded sampler, images resized once to the
    processor's grid (56x56) and the "short" prompt text."""
    template = get_template(cfg.data.template)
    data = load_train_data(cfg.data, processor, template, log=lambda m: None)
    sampler = PromptSampler(len(data), cfg.train.prompts_per_step, cfg.train.seed)
    budget = B.image_budget(processor)
    batches = []
    for _ in range(n_batches):
        rows = []
        for i in next(sampler):
            sample = data[i]
            (image,) = [B.prepare_image(im, budget) for im in sample.load_images()]
            rows.append(
                {
                    "sample": sample,
                    "image": image,
                    "text": template.render_text(sample),
                    "messages": template.render(sample),
                }
            )
        batches.append(rows)
    return batches


def trl_row(row: dict) -> dict:
    """A TRL dataset row: a conversational prompt (TRL inserts the image item first, as vispo's
    template does) and the image."""
    return {"prompt": [{"role": "user", "content": row["text"]}], "image": row["image"]}


def trl_args(out: Path, *, beta: float, steps: int, seed: int, suppress: list[int], **over):
    """TRL's GRPOConfig matched to vispo's run (module docstring)."""
    from trl import GRPOConfig

    kw = dict(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=PROMPTS * N,
        gradient_accumulation_steps=1,
        num_generations=N,
        max_completion_length=TOKENS,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        generation_kwargs={"min_new_tokens": TOKENS, "suppress_tokens": suppress},
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        weight_decay=0.01,
        max_grad_norm=1.0,
        beta=beta,
        loss_type="dapo",
        epsilon=CLIP_LOW,
        epsilon_high=CLIP_HIGH,
        scale_rewards="group",
        use_bias_correction_kl=False,
        max_steps=steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        shuffle_dataset=False,
        seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    kw.update(over)
    return GRPOConfig(**kw)


class TrlReward:
    """TRL reward-function adapter around a batch reward ``f(completions, answers)``."""

    __name__ = "bernoulli"

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, prompts=None, completions=None, **kwargs):
        return self.fn(completions, None)


def reference_dir(model, args, out: Path) -> None:
    """TRL builds its reference model from ``config._name_or_path``: the policy's initial
    weights are saved there (as a user's checkpoint folder would hold them) by a child process,
    so that serialising them does not count in this process's peak memory."""
    path = out / "init"
    cmd = [sys.executable, __file__, "--worker", "save", "--json", str(path), "--seed"]
    cmd += [str(args.seed), "--workload", args.workload] + (["--quick"] if args.quick else [])
    subprocess.run(cmd, check=True, capture_output=True)
    model.config._name_or_path = str(path)


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# --- part 1: same loss on the same batch -----------------------------------------------------


def grads_of(loss: torch.Tensor, params: list[torch.Tensor], retain: bool) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


def compare(trl_loss, trl_grads, vispo_loss, vispo_grads, term_scale) -> dict:
    """Loss difference, absolute and relative to ``term_scale`` (the aggregate of the per-token
    terms' magnitudes: the on-policy GRPO loss is a sum of +-|A| terms that cancel to ~0, so
    its own value is no scale), and the largest gradient difference, absolute and relative to
    the largest gradient entry."""
    a, b = float(trl_loss), float(vispo_loss)
    dg = max(float((g1 - g2).abs().max()) for g1, g2 in zip(trl_grads, vispo_grads))
    gmax = max(float(g.abs().max()) for g in trl_grads)
    return {
        "trl_loss": a,
        "vispo_loss": b,
        "loss_abs_diff": abs(a - b),
        "term_scale": float(term_scale),
        "loss_rel_diff": abs(a - b) / float(term_scale),
        "grad_max_abs": gmax,
        "grad_max_abs_diff": dg,
        "grad_rel_diff": dg / gmax if gmax > 0 else None,
    }


def perturbed_copy(model, seed: int, scale: float = 0.5):
    """A reference model that differs from the policy (so the KL term and its gradient are not
    zero): every weight matrix plus seeded Gaussian noise of ``scale`` times its std."""
    ref = copy.deepcopy(model).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            if p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())
            p.requires_grad_(False)
    return ref


def equivalence(args, out: Path) -> dict:
    """Part 1 (runs in its own subprocess)."""
    from datasets import Dataset
    from trl import GRPOTrainer

    seed = args.seed
    model, processor = standard_model(seed, quick=args.quick)
    cfg = vispo_config(0.01, out / "vispo", seed, 1)
    rows = prompt_batches(cfg, processor, 1)[0]

    # The fixed batch: one vispo rollout (exactly 64 tokens each) and one draw of the rewards.
    prompts = encode_prompts(processor, [r["messages"] for r in rows], [[r["image"]] for r in rows])
    rollout = generate(
        model, processor, prompts, n=N, max_new_tokens=TOKENS, min_new_tokens=TOKENS, seed=seed
    )
    completions = rollout.response_ids  # [80, 64], no EOS (min_new_tokens)
    rewards = torch.tensor(BernoulliReward(seed)(rollout.texts, None), dtype=torch.float32)
    groups = torch.arange(PROMPTS).repeat_interleave(N)
    # A second, variable-length version of the same batch (lengths 16..64), where the
    # aggregation modes differ.
    lengths = torch.from_numpy(np.random.default_rng(seed).integers(16, TOKENS + 1, PROMPTS * N))

    ref = perturbed_copy(model, seed + 1)
    ref_path = out / "ref"
    ref.save_pretrained(ref_path)
    model.config._name_or_path = str(ref_path)  # TRL loads its reference model from here
    suppress = multimodal_token_ids(processor)
    dataset_rows = [trl_row(r) for r in rows]
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=TrlReward(lambda c, a: rewards.tolist()),
        args=trl_args(out / "trl", beta=0.01, steps=1, seed=seed, suppress=suppress),
        train_dataset=Dataset.from_list(dataset_rows),
        processing_class=processor,
    )
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop; no accumulation
    policy = trainer.model
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]

    def trl_inputs(lens: torch.Tensor | None) -> tuple[dict, list]:
        """TRL's own inputs dict for the fixed batch: its prompt tokenisation, padding, pixel
        inputs, reference log-probs and advantages; only generation is replaced by the fixed
        completions (and rewards by the fixed rewards)."""
        fixed = [
            row[: int(n)].tolist() if lens is not None else row.tolist()
            for row, n in zip(completions, lens if lens is not None else [TOKENS] * len(rewards))
        ]
        seen = []

        def fixed_generation(prompt_ids, images, multimodal_fields, num_generations, **kw):
            seen.append(prompt_ids)
            return fixed, None

        trainer._generate_single_turn = fixed_generation
        inputs = [dict(dataset_rows[i // N]) for i in range(PROMPTS * N)]
        out_inputs = trainer._generate_and_score_completions(inputs)
        del trainer._generate_single_turn
        return out_inputs, seen[0]

    def trl_loss(inputs: dict, *, beta=0.01, loss_type="dapo", bias=False, grad=True):
        saved = (trainer.beta, trainer.loss_type, trainer.args.use_bias_correction_kl)
        trainer.beta, trainer.loss_type, trainer.args.use_bias_correction_kl = beta, loss_type, bias
        try:
            with contextlib.nullcontext() if grad else torch.no_grad():
                loss = trainer.compute_loss(policy, inputs)
        finally:
            trainer.beta, trainer.loss_type, trainer.args.use_bias_correction_kl = saved
        return loss.detach(), (grads_of(loss, params, False) if grad else None)

    # vispo's side: its scoring of the same sequences, its advantages, its objective.
    def vispo_batch(lens: torch.Tensor | None):
        mask = torch.ones(completions.shape)
        if lens is not None:
            mask = (torch.arange(TOKENS)[None, :] < lens[:, None]).float()
        return build_scoring_batch(prompts, completions, repeats=N, response_mask=mask)

    def vispo_loss(x: ObjectiveInputs, *, beta=0.01, agg="token-mean", retain=True):
        cfg_obj = objective_preset(
            "grpo", beta=beta, agg=agg, clip_low=CLIP_LOW, clip_high=CLIP_HIGH
        )
        loss, _ = compute_objective(cfg_obj, x)
        with torch.no_grad():
            old = x.logp if x.old_logp is None else x.old_logp
            size = x.advantages.abs()[:, None] * torch.exp(x.logp - old)
            if beta > 0:
                size = size + beta * kl_estimate(x.logp, x.ref_logp, "k3")
            scale = aggregate(size, x.mask, agg)
        return loss.detach(), grads_of(loss, params, retain), scale

    results: dict = {"rows": []}
    full, prompt_ids = trl_inputs(None)
    # The prompts TRL tokenised are vispo's prompts, token for token.
    vispo_prompt_ids = [
        ids[m.bool()].tolist() for ids, m in zip(prompts.input_ids, prompts.attention_mask)
    ]
    trl_prompt_ids = [list(p) for p in prompt_ids]
    results["same_prompt_tokens"] = trl_prompt_ids == [
        vispo_prompt_ids[i // N] for i in range(PROMPTS * N)
    ]
    batch = vispo_batch(None)
    ref_logp = score(ref, batch, [None], shared_prefix=True)[0].logp
    adv_matched = group_advantages(rewards, groups, eps=TRL_STD_EPS)
    adv_default = group_advantages(rewards, groups, eps=1e-6)
    results["advantages_max_abs_diff"] = float((full["advantages"] - adv_matched).abs().max())
    results["ref_logp_max_abs_diff"] = float((full["ref_per_token_logps"] - ref_logp).abs().max())
    logp = score(policy, batch, [None], grad=True, shared_prefix=True)[0].logp
    # vispo clamps k3 (log-ratio to +-20, value to <= 10), TRL does not: the same function
    # wherever the clamp does not bind.
    d = (ref_logp - logp.detach())[batch.response_mask.bool()]
    k3 = torch.exp(d) - d - 1
    results["k3_mean"] = float(k3.mean())
    results["k3_clamped_tokens"] = int(((d.abs() > 20) | (k3 > 10)).sum())
    x = ObjectiveInputs(
        logp=logp, advantages=adv_matched, mask=batch.response_mask, ref_logp=ref_logp
    )

    def row(name, trl_pair, vispo_pair, note=""):
        r = {"check": name, **compare(*trl_pair, *vispo_pair[:2], vispo_pair[2]), "note": note}
        results["rows"].append(r)
        print(json.dumps(r), flush=True)

    t_b1 = trl_loss(full)
    row("beta 0.01: TRL dapo vs vispo grpo (token-mean)", t_b1, vispo_loss(x))
    row(
        "beta 0: TRL dapo vs vispo grpo (token-mean)",
        trl_loss(full, beta=0.0),
        vispo_loss(x, beta=0.0),
        "on-policy loss is 0 by construction (group advantages sum to "
        "0 over equal lengths); compare the gradients",
    )
    if args.equivalence == "matched":  # the matched rows only (the vision-heavy workload)
        return results
    row(
        "beta 0.01: TRL loss_type grpo (loss only)",
        (trl_loss(full, loss_type="grpo", grad=False)[0], t_b1[1]),
        vispo_loss(x),
        "64 tokens each: TRL's per-sequence mean equals the token mean (gradient from dapo)",
    )
    x_def = ObjectiveInputs(
        logp=logp, advantages=adv_default, mask=batch.response_mask, ref_logp=ref_logp
    )
    row(
        "unmatched: vispo adv_eps 1e-6 (TRL std eps 1e-4)",
        t_b1,
        vispo_loss(x_def),
        "vispo default objective.adv_eps=1e-6; set objective.adv_eps=1e-4 to match TRL",
    )
    row(
        "unmatched: TRL use_bias_correction_kl=True (its default)",
        trl_loss(full, bias=True),
        vispo_loss(x),
        "TRL's default multiplies the k3 KL by the (differentiable) ratio: value "
        "unchanged on-policy, gradient not",
    )
    # Off-policy: a fixed old policy (current log-probs + seeded noise in [-0.4, 0.4]) so the
    # ratios spread over [0.67, 1.49] and both clip bounds are active.
    noise = torch.from_numpy(np.random.default_rng(seed + 2).uniform(-0.4, 0.4, logp.shape))
    old = (logp.detach() + noise.float()) * batch.response_mask
    off = dict(full, old_per_token_logps=old)
    x_off = ObjectiveInputs(
        logp=logp, advantages=adv_matched, mask=batch.response_mask, ref_logp=ref_logp, old_logp=old
    )
    ratio = torch.exp(logp.detach() - old)
    results["off_policy_clipped_frac"] = float(
        (
            ((ratio < 1 - CLIP_LOW) & (adv_matched[:, None] < 0))
            | ((ratio > 1 + CLIP_HIGH) & (adv_matched[:, None] > 0))
        )
        .float()
        .mean()
    )
    row(
        "off-policy (clipping active), beta 0.01",
        trl_loss(off),
        vispo_loss(x_off, retain=False),
        "vispo's dual clip (3.0) binds only where ratio > 3 with A < 0: never here",
    )

    # Variable lengths: TRL dapo = vispo token-mean, TRL grpo = vispo seq-mean-token-mean.
    var, _ = trl_inputs(lengths)
    vbatch = vispo_batch(lengths)
    vref = score(ref, vbatch, [None], shared_prefix=True)[0].logp
    vlogp = score(policy, vbatch, [None], grad=True, shared_prefix=True)[0].logp
    vx = ObjectiveInputs(
        logp=vlogp, advantages=adv_matched, mask=vbatch.response_mask, ref_logp=vref
    )
    row("lengths 16-64: TRL dapo vs vispo token-mean", trl_loss(var), vispo_loss(vx))
    row(
        "lengths 16-64: TRL grpo vs vispo seq-mean-token-mean",
        trl_loss(var, loss_type="grpo"),
        vispo_loss(vx, agg="seq-mean-token-mean", retain=False),
    )
    return results


# --- part 2: step time and peak memory -------------------------------------------------------


def run_vispo(args, beta: float, out: Path) -> dict:
    """vispo's Trainer as in step_time.py: one warm-up step, then ``steps`` measured."""
    cfg = vispo_config(beta, out, args.seed, args.steps + 1)
    model, processor = standard_model(args.seed, quick=args.quick)
    if args.ckpt:  # what model.gradient_checkpointing=true does when vispo loads the model
        enable_gradient_checkpointing(model)
    trainer = Trainer(
        cfg,
        model=model,
        processor=processor,
        reward_fn=RewardRunner(BernoulliReward(args.seed), num_workers=0),
    )
    setup_rss = peak_rss_mib()
    trainer.step()  # warm-up
    steps, phases, lengths = [], [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        m = trainer.step()
        steps.append(time.perf_counter() - t0)
        phases.append({k: m[f"time/{k}"] for k in ("rollout", "reward", "score", "update")})
        lengths.append(m["response_length/mean"])
    return {
        "steps": steps,
        "phases": phases,
        "setup_rss_mib": setup_rss,
        "mean_length": statistics.mean(lengths),
    }


class StepMarks(TrainerCallback):
    """Records when each optimizer step ends (a step's time is the gap between consecutive
    ends: data loading, generation, scoring, update and logging) and TRL's logged metrics."""

    def __init__(self, rss: dict):
        self.ends: list[float] = []
        self.logs: list[dict] = []
        self.rss = rss

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())
        self.rss.setdefault("step_end", []).append(peak_rss_mib())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.logs.append(dict(logs))


def timed(fn, bucket: list, rss: dict, name: str):
    """Wrap a bound method so each call's wall time is appended to ``bucket`` and the process's
    peak RSS right after it is appended to ``rss[name]`` (where in a step the peak is reached)."""

    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            bucket.append(time.perf_counter() - t0)
            rss.setdefault(name, []).append(peak_rss_mib())

    return wrapper


def trl_phases(ends: list[float], gen: list[float], prep: list[float], loss: list[float]):
    """Step times (gaps between consecutive step ends, so the warm-up step drops out) and each
    measured step's phases from the per-call timings of TRL's methods (one call per step):
    generate, score (the rest of ``_generate_and_score_completions``), policy forward
    (``compute_loss``) and the remainder (backward, optimizer, data, logging)."""
    steps = [b - a for a, b in zip(ends, ends[1:])]
    phases = [
        {
            "generate": gen[i],
            "score": prep[i] - gen[i],
            "policy_forward": loss[i],
            "backward_optimizer_other": steps[i - 1] - prep[i] - loss[i],
        }
        for i in range(1, len(ends))
    ]
    return steps, phases


def run_trl(args, beta: float, out: Path) -> dict:
    """TRL's GRPOTrainer on the same model, data, prompts per step and reward stream."""
    from datasets import Dataset
    from trl import GRPOTrainer

    model, processor = standard_model(args.seed, quick=args.quick)
    cfg = vispo_config(beta, out / "vispo", args.seed, args.steps + 1)
    batches = prompt_batches(cfg, processor, args.steps + 1)
    dataset = Dataset.from_list([trl_row(r) for rows in batches for r in rows])
    if beta > 0:
        reference_dir(model, args, out)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=TrlReward(BernoulliReward(args.seed)),
        args=trl_args(
            out / "trl",
            beta=beta,
            steps=args.steps + 1,
            seed=args.seed,
            suppress=multimodal_token_ids(processor),
            **{"gradient_checkpointing": args.ckpt, **args.trl_set},
        ),
        train_dataset=dataset,
        processing_class=processor,
    )
    rss: dict = {}
    marks = StepMarks(rss)
    trainer.add_callback(marks)
    gen, prep, loss = [], [], []
    trainer._generate_single_turn = timed(trainer._generate_single_turn, gen, rss, "generate")
    trainer._generate_and_score_completions = timed(
        trainer._generate_and_score_completions, prep, rss, "score"
    )
    trainer.compute_loss = timed(trainer.compute_loss, loss, rss, "policy_forward")
    torch.set_num_threads(args.threads)  # in case anything in the setup changed it
    setup_rss = peak_rss_mib()
    trainer.train()
    steps, phases = trl_phases(marks.ends, gen, prep, loss)
    lengths = [
        lg["completions/mean_length"] for lg in marks.logs if "completions/mean_length" in lg
    ]
    return {
        "steps": steps,
        "phases": phases,
        "setup_rss_mib": setup_rss,
        "rss_after": rss,
        "mean_length": statistics.mean(lengths[1:]) if len(lengths) > 1 else float("nan"),
        "min_length": min(
            lg["completions/min_length"] for lg in marks.logs if "completions/min_length" in lg
        ),
    }


def worker(args) -> None:
    set_workload(args.workload)
    torch.set_num_threads(args.threads)
    if args.worker == "save":  # the initial weights, for TRL's reference model
        standard_model(args.seed, quick=args.quick)[0].save_pretrained(args.json)
        return
    # Run folders and saved weights (TRL's reference model) go to a folder removed afterwards.
    with tempfile.TemporaryDirectory(prefix=f"peer-trl-{args.worker}-") as tmp:
        if args.worker == "equiv":
            result = equivalence(args, Path(tmp))
        elif args.worker == "vispo":
            result = run_vispo(args, args.beta, Path(tmp))
        else:
            result = run_trl(args, args.beta, Path(tmp))
    result["peak_rss_mib"] = peak_rss_mib()
    result["threads"] = torch.get_num_threads()
    Path(args.json).write_text(json.dumps(result))


def spawn(args, role: str, beta: float = 0.0, ckpt: bool = False) -> dict:
    """Run one configuration in a fresh interpreter; its result comes back as JSON."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = (
        [
            sys.executable,
            __file__,
            "--worker",
            role,
            "--beta",
            str(beta),
            "--steps",
            str(args.steps),
            "--threads",
            str(args.threads),
            "--seed",
            str(args.seed),
            "--json",
            path,
            "--workload",
            args.workload,
            "--equivalence",
            args.equivalence,
        ]
        + (["--quick"] if args.quick else [])
        + (["--ckpt"] if ckpt else [])
    )
    for key, value in args.trl_set.items():
        cmd += ["--trl-set", f"{key}={json.dumps(value)}"]
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
        TOKENIZERS_PARALLELISM="false",
    )
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(
            f"{role} (beta {beta}, checkpointing {ckpt}) failed with exit code {proc.returncode}"
        )
    result = json.loads(Path(path).read_text())
    os.unlink(path)
    result["wall_s"] = time.perf_counter() - t0
    return result


# --- report ----------------------------------------------------------------------------------


def report(args, equiv: dict | None, timing: dict) -> str:
    """The markdown report (benchmarks/peer_trl_report.py) of this process's workload."""
    return _report.report(args, equiv, timing, workload=WORKLOAD, prompts=PROMPTS, n=N)


def parse_setting(parser, item: str) -> tuple[str, object]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        parser.error(f"--trl-set expects KEY=VALUE, got {item!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=3, help="measured steps (after 1 warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small model: a smoke run in minutes")
    p.add_argument("--skip-equivalence", action="store_true")
    p.add_argument(
        "--workload",
        choices=("standard", "vision-heavy"),
        default="standard",
        help="standard (peer_trl.md) or vision-heavy (peer_trl_vision.md): step_time.py's",
    )
    p.add_argument(
        "--betas",
        default="0,0.01",
        help="reference-KL weights of the timed configurations (comma-separated; the grpo "
        "preset's is 0.01)",
    )
    p.add_argument(
        "--equivalence",
        choices=("all", "matched"),
        default=None,
        help="the loss/gradient checks: all rows, or only the two matched ones (beta 0.01 and "
        "0; default for the vision-heavy workload, whose TRL passes are slow)",
    )
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--results", default=None, help="markdown output path")
    p.add_argument("--note", default="", help="a line to put at the top of the report")
    p.add_argument("--worker", choices=("equiv", "vispo", "trl", "save"), help=argparse.SUPPRESS)
    p.add_argument("--beta", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--checkpointing",
        choices=("off", "on", "both"),
        default="both",
        help="activation (gradient) checkpointing in the timed runs, on both sides: off (vispo's "
        "default), on (TRL's default), or both regimes one after the other (default)",
    )
    p.add_argument(
        "--trl-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one GRPOConfig field of the timed TRL runs (VALUE is JSON, e.g. "
        "gradient_checkpointing=true); for investigating TRL's defaults, not for the "
        "matched comparison",
    )
    args = p.parse_args()
    if args.steps < 1:
        p.error("--steps must be >= 1")
    args.trl_set = dict(parse_setting(p, item) for item in args.trl_set)
    args.betas = [float(b) for b in args.betas.split(",")]
    if args.equivalence is None:
        args.equivalence = "matched" if args.workload == "vision-heavy" else "all"
    set_workload(args.workload)
    if args.worker:
        worker(args)
        return

    equiv = None
    if not args.skip_equivalence:
        equiv = spawn(args, "equiv")
        for r in equiv["rows"]:
            print(
                f"{r['check']}: loss diff {fmt(r['loss_abs_diff'])}, grad diff / max grad "
                f"{fmt(r['grad_rel_diff'])}",
                flush=True,
            )
    timing: dict = {}
    if not args.skip_timing:
        for role, beta, ckpt in configs(args.checkpointing, args.betas):
            r = spawn(args, role, beta, ckpt)
            timing[(role, beta, ckpt)] = r
            print(
                f"{role} beta {beta:g} checkpointing {ckpt}: median {statistics.median(r['steps']):.2f} s/step, "
                f"peak RSS {r['peak_rss_mib']:.0f} MiB, threads {r['threads']}, "
                f"process wall {r['wall_s']:.0f} s",
                flush=True,
            )
    text = report(args, equiv, timing)
    print(text)
    path = (
        Path(args.results)
        if args.results
        else (
            Path("/tmp/peer_trl_quick.md")
            if args.quick
            else RESULTS / ("peer_trl_vision.md" if WORKLOAD == "vision-heavy" else "peer_trl.md")
        )
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
