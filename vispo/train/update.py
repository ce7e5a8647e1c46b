"""Scoring passes and the policy update for one step (no math: it calls vispo.algos).

1. ``score_fixed``: the no-gradient passes, once per rollout batch: the pre-update policy
   (skipped when the update is exactly on-policy: one epoch, one mini-batch), the masked image
   when PAPO's masked branch is detached, and the reference model when beta > 0.
2. ``ppo_update``: for each epoch and mini-batch, forward with gradient on the original image
   and on whichever variants carry gradient (CPPO's views only for sequences with positive
   advantage when gating is on), compose the objective, backward, clip, step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch

from vispo.algos import (
    ObjectiveInputs,
    Requirements,
    aggregate_total,
    compute_objective,
    cppo_selection,
    shaped_advantages,
)
from vispo.models.scoring import ScoringBatch, score
from vispo.train import deepspeed as ds
from vispo.train.dist import Dist, unwrap
from vispo.train.optim import lr_factor


@dataclasses.dataclass
class FixedScores:
    old_logp: torch.Tensor | None  # None: on-policy, use the current log-probs detached
    ref_logp: torch.Tensor | None
    variant_logp: dict[str, torch.Tensor]  # "fixed" variants
    variant_entropy: dict[str, torch.Tensor]
    variant_kl: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # VPPO 'full'


def score_fixed(
    model,
    ref_model,
    batch: ScoringBatch,
    variants: dict[str, dict],
    req: Requirements,
    *,
    on_policy: bool,
    temperature: float,
    micro_batch: int,
    stack: bool,
    ref_context=contextlib.nullcontext,
    autocast: torch.dtype | None = None,
    shared_prefix: bool = False,
) -> FixedScores:
    fixed = [name for name, mode in req.variants.items() if mode == "fixed"]
    # VPPO: the reweighting needs the pre-update log-probs of the whole mini-batch before its
    # first micro-batch (one micro-batch computes it itself); the full KL needs the original pass.
    on_policy = on_policy and not req.kl and not (req.old_logp and micro_batch < len(batch))
    passes: list = ([] if on_policy else [None]) + [variants[name] for name in fixed]
    flags = ([] if on_policy else [False]) + [name in req.entropy for name in fixed]
    kl_flags = ([] if on_policy else [False]) + [name in req.kl for name in fixed]
    old_logp, variant_logp, variant_entropy, variant_kl = None, {}, {}, {}
    if passes:
        was_training = model.training
        model.eval()
        out = score(
            model,
            batch,
            passes,
            temperature=temperature,
            entropy=flags,
            grad=False,
            stack=stack,
            micro_batch_size=micro_batch,
            autocast=autocast,
            shared_prefix=shared_prefix,
            kl_to_first=kl_flags,
        )
        model.train(was_training)
        if not on_policy:
            old_logp = out.pop(0).logp
        for name, s in zip(fixed, out):
            variant_logp[name] = s.logp
            if s.entropy is not None:
                variant_entropy[name] = s.entropy
            if s.kl is not None:
                variant_kl[name] = s.kl
    ref_logp = None
    if req.ref:
        with ref_context():
            ref_logp = score(
                ref_model,
                batch,
                [None],
                temperature=temperature,
                grad=False,
                micro_batch_size=micro_batch,
                autocast=autocast,
                shared_prefix=shared_prefix,
            )[0].logp
    return FixedScores(old_logp, ref_logp, variant_logp, variant_entropy, variant_kl)


class MetricSums:
    """Averages per-micro-batch metric tensors over a step without host syncs until the end.

    ``loss/*`` values are parts of their mini-batch's loss: they are summed within a
    mini-batch (scaled like the loss) and averaged over mini-batches. Other metrics are
    token-weighted means.
    """

    def __init__(self):
        self.loss: dict[str, torch.Tensor] = {}
        self.other: dict[str, torch.Tensor] = {}
        self.tokens = 0.0
        self.minibatches = 0
        self._weights: dict[str, float] = {}

    def add(self, metrics: dict[str, torch.Tensor], *, loss_scale: float, tokens: float) -> None:
        for k, v in metrics.items():
            v = v.detach().float()
            if k.startswith("loss/"):
                self.loss[k] = self.loss.get(k, 0.0) + v * loss_scale
            else:
                self.other[k] = self.other.get(k, 0.0) + v * tokens
                self._weights[k] = self._weights.get(k, 0.0) + tokens

    def result(self) -> dict[str, float]:
        out = {k: (v / max(self.minibatches, 1)).item() for k, v in self.loss.items()}
        out.update({k: (v / max(self._weights[k], 1e-8)).item() for k, v in self.other.items()})
        return out


@dataclasses.dataclass
class UpdateState:
    """Counters the update carries across steps (checkpointed)."""

    updates: int = 0
    skipped: int = 0
    skipped_in_row: int = 0


def ppo_update(
    model,
    optimizer,
    step,
    fixed: FixedScores,
    req: Requirements,
    ocfg,
    *,
    dist: Dist,
    state: UpdateState,
    epochs: int,
    mini_batch: int,
    micro_batch: int,
    micro_norm: str,
    temperature: float,
    stack: bool,
    grad_clip: float,
    lr: float,
    warmup: int,
    total_updates: int,
    schedule: str,
    progress: float,
    gamma_scale: float,
    autocast: torch.dtype | None = None,
    shared_prefix: bool = False,
) -> dict[str, float]:
    """Run the PPO epochs over one step's batch; returns averaged metrics."""
    batch, adv = step.batch, step.advantages
    grad_variants = [
        name for name, mode in req.variants.items() if mode == "grad" and name == "mask"
    ]
    cppo = "pos" in req.variants
    # The optimizer's parameters, not model.parameters(): after a forward FSDP2 leaves the root
    # unit's parameters unsharded, and those temporary tensors never receive a gradient.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sums = MetricSums()
    grad_norms = []
    model.train()
    for _ in range(epochs):
        order = epoch_order(batch.prompt_index, mini_batch)
        for mb in order.split(mini_batch):
            mb_batch = batch.select(mb)
            micro = list(mb.split(micro_batch))
            mb_adv = shaped_advantages(  # VPPO: per-trajectory reweighting over the mini-batch
                ocfg,
                adv,
                mb,
                fixed.old_logp,
                fixed.variant_logp.get("mask"),
                batch.response_mask,
                dependency=fixed.variant_kl.get("mask"),
            )
            # The denominators of the whole mini-batch, over every rank's share of it.
            total = token_total = cpl_total = None
            selections: list = [None] * len(micro)
            if micro_norm == "global":
                total = dist.all_reduce(
                    aggregate_total(mb_batch.response_mask, ocfg.agg, ocfg.horizon)
                )
                token_total = (
                    total
                    if ocfg.agg == "token-mean"
                    else dist.all_reduce(aggregate_total(mb_batch.response_mask, "token-mean"))
                )
                if cppo and ocfg.agg == "token-mean" and len(micro) > 1:
                    selections = _cppo_selections(
                        model,
                        batch,
                        micro,
                        mb_adv,
                        step.variants,
                        req,
                        ocfg,
                        temperature=temperature,
                        stack=stack,
                        autocast=autocast,
                        shared_prefix=shared_prefix,
                    )
                    count = sum(aggregate_total(sel, "token-mean") for sel in selections)
                    cpl_total = dist.all_reduce(torch.as_tensor(count, dtype=torch.float32))
            optimizer.zero_grad(set_to_none=True)
            loss_ok = torch.tensor(True)
            for k, idx in enumerate(micro):
                sub = batch.select(idx)
                x, anchor = _forward(
                    model,
                    sub,
                    idx,
                    mb_adv,
                    step.variants,
                    fixed,
                    req,
                    grad_variants,
                    cppo,
                    temperature=temperature,
                    stack=stack,
                    autocast=autocast,
                    shared_prefix=shared_prefix,
                    selected=selections[k],
                )
                if cppo and micro_norm == "global" and ocfg.agg == "token-mean" and len(micro) == 1:
                    # One micro-batch: select from this forward's entropies, count over ranks.
                    x.cppo_selected = _select_rows(ocfg, x)
                    cpl_total = dist.all_reduce(aggregate_total(x.cppo_selected, "token-mean"))
                loss, metrics = compute_objective(
                    ocfg,
                    x,
                    progress=progress,
                    gamma_scale=gamma_scale,
                    total=total,
                    token_total=token_total,
                    cpl_total=cpl_total,
                )
                if anchor is not None:
                    loss = loss + anchor
                # DDP / FSDP2 average gradients over ranks; with the global denominator each
                # rank's loss is its share of the sum, so scale it back by the world size.
                scale = 1.0 if micro_norm == "global" else 1.0 / len(micro)
                world_scale = dist.world if micro_norm == "global" else 1.0
                loss_ok &= torch.isfinite(loss) & _finite_inputs(x)
                last = k == len(micro) - 1
                if ds.is_engine(model):  # DeepSpeed ZeRO: the engine's backward
                    ds.backward(model, loss * scale * world_scale, last=last, ok=loss_ok)
                else:
                    sync = last or not hasattr(model, "no_sync")
                    with contextlib.nullcontext() if sync else model.no_sync():
                        (loss * scale * world_scale).backward()
                sums.add(
                    metrics, loss_scale=scale * world_scale / dist.world, tokens=float(len(idx))
                )
            sums.minibatches += 1
            factor = lr_factor(state.updates, warmup=warmup, total=total_updates, schedule=schedule)
            if ds.is_engine(model):
                # DeepSpeed clips with the global norm, steps, and skips (on every rank) a
                # step whose norm is not finite; ds.backward poisoned it if the loss was not.
                _set_lr(optimizer, lr, factor)
                applied, grad_norm = ds.step(model)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    params, grad_clip if grad_clip > 0 else math.inf
                )
                if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
                    grad_norm = grad_norm.full_tensor()
                # One host sync per optimizer step: skip it (on every rank) if the loss or the
                # gradient is not finite anywhere.
                ok = loss_ok & torch.isfinite(grad_norm.detach().cpu())
                applied = int(dist.all_reduce((~ok).long().reshape(1))[0]) == 0
                if applied:
                    _set_lr(optimizer, lr, factor)
                    optimizer.step()
                else:
                    optimizer.zero_grad(set_to_none=True)
            if applied:
                state.updates += 1
                state.skipped_in_row = 0
                grad_norms.append(float(grad_norm))
            else:
                state.skipped += 1
                state.skipped_in_row += 1
    out = sums.result()
    out["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
    out["lr"] = lr * lr_factor(
        max(state.updates - 1, 0), warmup=warmup, total=total_updates, schedule=schedule
    )
    out["skipped_steps"] = float(state.skipped)
    return out


def epoch_order(prompt_index: torch.Tensor, mini_batch: int) -> torch.Tensor:
    """The order of a PPO epoch's sequences: whole groups shuffled, each group's sequences
    together and in their order (the identity when one mini-batch holds the step).

    Mini-batches and their micro-batches are consecutive runs of this order, so when their sizes
    are multiples of ``rollout.n`` each holds whole groups: with the shared prefix a group's
    prompt runs once per micro-batch that holds it, i.e. once. (Shuffling single sequences
    would scatter a group over the micro-batches and run its prompt in each.)
    """
    B = len(prompt_index)
    if B <= mini_batch:
        return torch.arange(B)
    groups, group = torch.unique(prompt_index, return_inverse=True)
    place = torch.randperm(len(groups))[group.cpu()]  # each sequence's group's new place
    return torch.argsort(place * B + torch.arange(B))


def _set_lr(optimizer, lr: float, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0) * factor


def _finite_inputs(x: ObjectiveInputs) -> torch.Tensor:
    """True (a 0-dim tensor, no host sync) iff every per-token log-prob and entropy the objective
    reads is finite on response tokens. The losses clamp log-ratios and KL terms, so an infinite
    logit (e.g. a float16 overflow) would otherwise give a finite, meaningless loss and update."""
    mask = x.mask.bool()
    rows = mask if x.cppo_rows is None else mask[x.cppo_rows]
    ok = torch.ones((), dtype=torch.bool, device=mask.device)
    for values, m in (
        (x.logp, mask),
        (x.old_logp, mask),
        (x.ref_logp, mask),
        (x.logp_mask, mask),
        (x.entropy, mask),
        (x.entropy_mask, mask),
        (x.logp_pos, rows),
        (x.logp_neg, rows),
        (x.entropy_pos, rows),
        (x.entropy_neg, rows),
    ):
        if values is not None and values.numel():
            ok = ok & torch.isfinite(values.detach().masked_fill(~m, 0.0)).all()
    return ok


def _cppo_rows(a: torch.Tensor, req: Requirements) -> torch.Tensor:
    """The rows of a micro-batch whose CPPO views are scored (positive advantage when gated)."""
    return torch.nonzero(a > 0).squeeze(-1) if req.cppo_positive_only else torch.arange(len(a))


def _select_rows(ocfg, x: ObjectiveInputs) -> torch.Tensor:
    """CPPO's tokens of a micro-batch's CPPO rows, from the entropies of its own forward."""
    rows = x.cppo_rows
    ent = None if x.entropy is None else x.entropy.index_select(0, rows)
    return cppo_selection(
        ocfg,
        ent,
        x.entropy_neg,
        x.advantages.index_select(0, rows),
        x.mask.index_select(0, rows),
    )


def _cppo_selections(
    model,
    batch: ScoringBatch,
    micro: list,
    adv,
    variants,
    req: Requirements,
    ocfg,
    *,
    temperature: float,
    stack: bool,
    autocast: torch.dtype | None = None,
    shared_prefix: bool = False,
) -> list[torch.Tensor]:
    """CPPO's selected tokens for every micro-batch of a mini-batch, before any backward, so
    that its token-mean can divide by the mini-batch-wide count whatever the micro-batch size.

    The selection reads only no-gradient entropies of the current policy, which do not change
    within a mini-batch (the optimizer steps after it): one no-grad pass over the original and
    ``I-`` images of the rows that can carry the loss, per micro-batch as the update will split
    it. The update then uses these selections instead of selecting again. ``cpl_select: all``
    needs no pass. The passes run through the unwrapped model (DDP: no collective); a sharded
    model's forward gathers weights on every rank, so a micro-batch without CPPO rows still
    runs one (discarded) row, and every rank runs the same number of forwards.
    """
    out = []
    scorer = unwrap(model)
    with torch.no_grad():
        for idx in micro:
            sub, a = batch.select(idx), adv[idx]
            rows = _cppo_rows(a, req)
            mask = sub.response_mask.index_select(0, rows)
            ent = ent_neg = None
            if ocfg.cpl_select == "perception":
                scored = rows if rows.numel() > 0 else torch.zeros(1, dtype=torch.long)
                orig, neg = score(
                    scorer,
                    sub.select(scored),
                    [None, variants["neg"]],
                    entropy=[True, True],
                    temperature=temperature,
                    grad=False,
                    stack=stack,
                    autocast=autocast,
                    shared_prefix=shared_prefix,
                )
                if rows.numel() == 0:
                    out.append(mask.bool())
                    continue
                ent, ent_neg = orig.entropy, neg.entropy
            out.append(cppo_selection(ocfg, ent, ent_neg, a.index_select(0, rows), mask))
    return out


def _forward(
    model,
    sub: ScoringBatch,
    idx,
    adv,
    variants,
    fixed: FixedScores,
    req: Requirements,
    grad_variants,
    cppo: bool,
    *,
    temperature: float,
    stack: bool,
    autocast: torch.dtype | None = None,
    shared_prefix: bool = False,
    selected: torch.Tensor | None = None,
) -> tuple[ObjectiveInputs, torch.Tensor | None]:
    """Forward passes with gradient for one micro-batch -> (the objective's inputs, a zero
    tensor to add to the loss when a forward ran only to keep ranks in step, else None).

    ``selected``: CPPO's tokens for this micro-batch's CPPO rows, chosen beforehand."""
    passes = [None] + [variants[name] for name in grad_variants]
    flags = ["orig" in req.entropy] + [name in req.entropy for name in grad_variants]
    kw = dict(
        temperature=temperature,
        grad=True,
        stack=stack,
        autocast=autocast,
        shared_prefix=shared_prefix,
    )
    out = score(model, sub, passes, entropy=flags, **kw)
    orig = out[0]
    anchor = None
    by_name = dict(zip(grad_variants, out[1:]))
    a = adv[idx]

    def fixed_rows(d: dict, name: str):
        return d[name][idx] if name in d else None

    logp_mask = (
        by_name["mask"].logp if "mask" in by_name else fixed_rows(fixed.variant_logp, "mask")
    )
    entropy_mask = (
        by_name["mask"].entropy if "mask" in by_name else fixed_rows(fixed.variant_entropy, "mask")
    )
    x = ObjectiveInputs(
        logp=orig.logp,
        advantages=a,
        mask=sub.response_mask,
        old_logp=None if fixed.old_logp is None else fixed.old_logp[idx],
        ref_logp=None if fixed.ref_logp is None else fixed.ref_logp[idx],
        logp_mask=logp_mask,
        entropy=orig.entropy,
        entropy_mask=entropy_mask,
        dependency=fixed_rows(fixed.variant_kl, "mask"),
    )
    if cppo:
        rows = _cppo_rows(a, req)
        T = sub.response_mask.shape[1]
        if rows.numel() > 0:
            pos, neg = score(
                model,
                sub.select(rows),
                [variants["pos"], variants["neg"]],
                entropy=[False, "neg" in req.entropy],
                **kw,
            )
            x.logp_pos, x.logp_neg, x.entropy_neg = pos.logp, neg.logp, neg.entropy
        else:
            # No row carries the contrastive loss here, but a wrapped model's forward holds
            # collectives (DDP buffer broadcasts, FSDP2 / ZeRO-3 gathers) that every rank must
            # run alike: score one row anyway and add it to the loss with weight 0.
            pos, neg = score(
                model,
                sub.select(torch.zeros(1, dtype=torch.long)),
                [variants["pos"], variants["neg"]],
                **kw,
            )
            anchor = 0.0 * (pos.logp.sum() + neg.logp.sum())
            empty = orig.logp.new_zeros(0, T)
            x.logp_pos, x.logp_neg, x.entropy_neg = empty, empty, empty
        x.cppo_rows = rows
        x.cppo_selected = selected
    return x, anchor
