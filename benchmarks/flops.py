"""An implementation-independent floor: the FLOPs each phase of a step must do, and this
machine's dense matmul throughput to divide them by.

What is counted (multiply-adds count 2 FLOPs; everything else, i.e. norms, activations,
softmax, rotary embeddings, sampling and the loss, counts 0):

- **Linear layers**: ``2 * in * out`` per token for every weight matrix, biases ignored. Per
  text token and layer: the query, key, value and output projections and the gated MLP
  (gate, up, down). The vision tower: the patch embedding (``2 * C*T*p*p * hidden`` per
  patch), per block the fused qkv, the output projection and the gated MLP, and the patch
  merger's two layers per merged token.
- **Attention**: scores ``Q K^T`` and the weighted values ``A V``, ``2 * d`` each per
  (query, key) pair and head, so ``4 * heads * head_dim`` per pair. Text attention is causal:
  only the keys at or before the query count (a token appended after ``c`` positions
  attends to ``c + 1``). Vision attention is bidirectional: per image for the full-attention
  blocks, per window for Qwen2.5-VL's windowed blocks (windows of ``window_size // merge //
  patch`` merged tokens a side, cut at the image's edge as the model cuts them).
- **LM head**: ``2 * hidden * vocab`` only at the positions whose logits are needed: the
  last prompt position once per group and each response position that predicts a
  further response token.
- **Only the tokens that must be processed, with the prefix once per group**: a group's
  prompt (image included) runs once; each of its responses runs against it. A response of
  ``r`` tokens feeds ``r - 1`` positions (the last sampled token is never an input) and
  needs the head at those ``r - 1`` positions plus the prompt's last one (shared).
- **Phases.** Rollout: one such forward per group (prefill) and per response (decode).
  Score: one forward per no-gradient pass the objective needs (reference model, old policy,
  fixed image variants). Update: forward + backward per gradient pass (the original image,
  PAPO's masked image with gradient, CPPO's two views over the positive-advantage rows).
  **Backward = 2 x forward** (the gradients of the activations and of the weights), for
  the vision tower too unless it is frozen (then its backward counts 0).

A scoring forward therefore counts exactly what generating the same tokens counts: the
floor does not charge scoring for re-reading what generation already computed, since a
different policy (or image) must recompute it.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence

import torch


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The matmul shapes of a Qwen2-VL / Qwen2.5-VL model (text + vision tower)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    v_hidden: int
    v_depth: int
    v_intermediate: int
    v_patch_dim: int  # in_channels * temporal_patch * patch * patch
    merge: int
    window: int = 0  # merged tokens per window side; 0: every block attends the whole image
    v_full: tuple[int, ...] = ()  # blocks with full attention when window > 0
    v_gated: bool = True  # Qwen2.5-VL's gated vision MLP (Qwen2-VL: fc1, fc2)

    @classmethod
    def of(cls, model) -> Shapes:
        cfg = model.config
        t, v = cfg.get_text_config(), cfg.vision_config
        heads = t.num_attention_heads
        gated = hasattr(v, "intermediate_size")  # Qwen2.5-VL; Qwen2-VL has mlp_ratio
        window = 0
        if getattr(v, "window_size", None):
            window = v.window_size // v.spatial_merge_size // v.patch_size
        return cls(
            hidden=t.hidden_size,
            layers=t.num_hidden_layers,
            heads=heads,
            kv_heads=t.num_key_value_heads,
            head_dim=getattr(t, "head_dim", None) or t.hidden_size // heads,
            intermediate=t.intermediate_size,
            vocab=t.vocab_size,
            v_hidden=v.hidden_size if gated else v.embed_dim,
            v_depth=v.depth,
            v_intermediate=v.intermediate_size if gated else v.embed_dim * v.mlp_ratio,
            v_patch_dim=v.in_channels * v.temporal_patch_size * v.patch_size**2,
            merge=v.spatial_merge_size,
            window=window,
            v_full=tuple(getattr(v, "fullatt_block_indexes", ()) or ()),
            v_gated=gated,
        )


def text_linear(s: Shapes, tokens: int) -> int:
    """Linear-layer FLOPs of `tokens` positions through every text layer."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    per_layer = s.hidden * (q + 2 * kv) + q * s.hidden + 3 * s.hidden * s.intermediate
    return 2 * per_layer * s.layers * tokens


def text_attention(s: Shapes, pairs: int) -> int:
    """Attention FLOPs of `pairs` (query, key) pairs in every text layer."""
    return 4 * s.heads * s.head_dim * pairs * s.layers


def causal_pairs(tokens: int, context: int) -> int:
    """(query, key) pairs of `tokens` positions appended after `context` positions."""
    return tokens * context + tokens * (tokens + 1) // 2


def text_forward(s: Shapes, tokens: int, context: int = 0) -> int:
    return text_linear(s, tokens) + text_attention(s, causal_pairs(tokens, context))


def head(s: Shapes, positions: int) -> int:
    return 2 * s.hidden * s.vocab * positions


def _windows(s: Shapes, h: int, w: int) -> list[int]:
    """Patches per attention window of an ``h x w``-patch image (windowed blocks)."""
    mh, mw = h // s.merge, w // s.merge
    sizes = []
    for i in range(0, mh, s.window):
        for j in range(0, mw, s.window):
            sizes.append(min(s.window, mh - i) * min(s.window, mw - j) * s.merge**2)
    return sizes


def vision_attention(s: Shapes, grids: Sequence[Sequence[int]]) -> int:
    """The vision tower's attention FLOPs on images of ``(t, h, w)`` patch grids."""
    total = 0
    for t, h, w in grids:
        n = t * h * w
        for block in range(s.v_depth):
            if s.window and block not in s.v_full:
                total += 4 * s.v_hidden * t * sum(k * k for k in _windows(s, h, w))
            else:
                total += 4 * s.v_hidden * n * n
    return total


def vision_forward(s: Shapes, grids: Sequence[Sequence[int]]) -> int:
    """The vision tower on images of ``(t, h, w)`` patch grids (``image_grid_thw`` rows)."""
    vh, total = s.v_hidden, vision_attention(s, grids)
    mlp = (3 if s.v_gated else 2) * vh * s.v_intermediate
    for t, h, w in grids:
        n = t * h * w
        total += 2 * s.v_patch_dim * vh * n  # patch embedding
        total += 2 * (vh * 3 * vh + vh * vh + mlp) * n * s.v_depth  # qkv, proj, MLP
        merged, width = n // s.merge**2, vh * s.merge**2
        total += 2 * (width * width + width * s.hidden) * merged  # patch merger
    return total


@dataclasses.dataclass(frozen=True)
class Group:
    """One prompt (its real tokens, image tokens included, and its images' patch grids) and
    the lengths of the responses that share it."""

    prompt_tokens: int
    grids: tuple[tuple[int, int, int], ...]
    responses: tuple[int, ...]


def forward(s: Shapes, groups: Sequence[Group]) -> int:
    """One forward over the groups with the prefix once per group: the work of generating
    the responses, and of one scoring pass over them."""
    total = 0
    for g in groups:
        total += vision_forward(s, g.grids) + text_forward(s, g.prompt_tokens) + head(s, 1)
        for r in g.responses:
            fed = max(r - 1, 0)
            total += text_forward(s, fed, g.prompt_tokens) + head(s, fed)
    return total


def forward_backward(s: Shapes, groups: Sequence[Group], vision_trainable: bool = True) -> int:
    """Forward + backward (backward = 2 x forward; the vision tower's backward only when it
    is trained)."""
    fwd = forward(s, groups)
    frozen = 0 if vision_trainable else sum(vision_forward(s, g.grids) for g in groups)
    return 3 * fwd - 2 * frozen


def groups_of(batch, rows: torch.Tensor | None = None) -> list[Group]:
    """The groups of a :class:`vispo.models.scoring.ScoringBatch` (or of its `rows`)."""
    rows = torch.arange(len(batch)) if rows is None else rows
    prompts = batch.prompts
    real = prompts.attention_mask.sum(-1).tolist()
    lengths = batch.response_mask.sum(-1).long().tolist()
    grid = prompts.pixels.get("image_grid_thw")
    grid_rows = [] if grid is None else [tuple(r) for r in grid.tolist()]
    starts = [sum(prompts.num_images[:i]) for i in range(len(prompts.num_images))]
    out = []
    for p in sorted(set(batch.prompt_index[rows].tolist())):
        mine = [int(lengths[b]) for b in rows.tolist() if int(batch.prompt_index[b]) == p]
        images = tuple(grid_rows[starts[p] : starts[p] + prompts.num_images[p]])
        out.append(Group(int(real[p]), images, tuple(mine)))
    return out


def phase_flops(s: Shapes, step, cfg, req) -> dict[str, float]:
    """The floor FLOPs of a trainer step's rollout, score and update phases (the batch it
    trains on: dynamic sampling's dropped groups and refill rounds are not charged).

    `step`: the trainer's step batch (``batch``, ``advantages``); `cfg`: its config; `req`:
    its objective's :class:`vispo.algos.Requirements`."""
    batch = step.batch
    groups = groups_of(batch)
    one = forward(s, groups)
    images = 1 + (cfg.objective.noisy_frac > 0)  # NoisyRollout: a noisy copy of each image
    rollout = one + (images - 1) * sum(
        vision_forward(s, g.grids) + text_forward(s, g.prompt_tokens) for g in groups
    )
    fixed = [name for name, mode in req.variants.items() if mode == "fixed"]
    score_passes = len(fixed) + int(req.ref)
    if req.kl or (req.old_logp and cfg.micro_batch < len(batch)):
        score_passes += 1  # the old policy's log-probs, needed before the update
    trainable = not cfg.model.freeze_vision
    update = forward_backward(s, groups, trainable)
    update *= 1 + sum(mode == "grad" and name == "mask" for name, mode in req.variants.items())
    if "pos" in req.variants:
        rows = torch.nonzero(step.advantages > 0).squeeze(-1)
        if len(rows):
            update += 2 * forward_backward(s, groups_of(batch, rows), trainable)
    return {"rollout": float(rollout), "score": float(score_passes * one), "update": float(update)}


def matmul_shapes(s: Shapes, tokens: int = 1024) -> list[tuple[int, int, int]]:
    """``(m, k, n)`` of the model's largest matmuls over `tokens` rows: the MLP's up and
    down projections, the LM head and the vision block's fused qkv."""
    return [
        (tokens, s.hidden, s.intermediate),
        (tokens, s.intermediate, s.hidden),
        (tokens, s.hidden, s.vocab),
        (tokens, s.v_hidden, 3 * s.v_hidden),
    ]


def matmul_throughput(shapes: Sequence[tuple[int, int, int]], repeats: int = 5) -> dict:
    """This process's dense float32 ``torch.matmul`` throughput (FLOP/s) at the current
    thread count: per shape the median of `repeats` timed calls after one warm-up; the
    figure used as the peak is the best shape's."""
    per_shape = {}
    gen = torch.Generator().manual_seed(0)
    for m, k, n in shapes:
        a = torch.randn(m, k, generator=gen)
        b = torch.randn(k, n, generator=gen)
        torch.matmul(a, b)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - t0)
        per_shape[f"{m}x{k}x{n}"] = 2 * m * k * n / statistics.median(times)
    return {"peak": max(per_shape.values()), "per_shape": per_shape}
