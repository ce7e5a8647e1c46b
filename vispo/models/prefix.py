"""Shared-prefix forward: the image and the prompt computed once for all of a group's responses.

In GRPO-family RL the ``n`` responses of a prompt share its image and its text. A plain
teacher-forced forward repeats them for every sequence, so the vision tower and the prompt's
transformer layers run ``n`` times. Here they run once per distinct prompt (and image variant):

1. forward the distinct prompts with ``use_cache=True``: the vision tower runs once per image,
   the prompt's layers once per prompt; the logits at each prompt's last position predict the
   first response token;
2. select the cache rows along the batch (each sequence takes its prompt's keys and values;
   ``index_select`` is differentiable, so gradients of all of a prompt's responses flow back
   into its prefix once, summed);
3. forward the responses against that cache, with the positions the full sequence would have
   (Qwen's M-RoPE positions from the model's own ``get_rope_index`` on the prompt, continued
   by one per token after it, as for any text after the last image).

The result is the same ``[b, T, V]`` logits as :func:`vispo.models.scoring._response_logits`
up to float rounding (tested on every tiny architecture, gradients included); scoring stays
the one place that turns them into log-probs and entropies.

Under activation checkpointing (transformers' ``GradientCheckpointingLayer``, non-reentrant) the
same three steps run with two caches of this module instead of transformers' ``DynamicCache``,
because a checkpointed layer runs its forward twice (once in the forward pass, once when the
backward pass recomputes it) and a ``DynamicCache`` would append the keys and values a second
time on the recompute:

- the prompt pass writes into a :func:`_prefix_recorder`, which keeps each layer's keys and values
  of its first call and hands a recompute its inputs back without storing anything;
- the response pass reads a :func:`_prefix_server`, whose update returns
  ``cat(prefix[rows], new)`` and stores nothing, so the recompute sees the same inputs.

Both are stateless across the recompute, which is the condition transformers states for letting a
cache through a checkpointed layer (``_can_checkpoint_with_cache``, set on the layer instances only
for the duration of the two forwards; the recompute replays the arguments captured then). The
prompt pass is checkpointed too: its per-layer activations are recomputed, only the keys and
values (needed by the responses anyway) stay. Gradients reach the prompt's keys and values through
``index_select`` and ``cat`` as in the plain route.

Not supported (the caller falls back to the plain forward, with the reason from
:func:`shared_prefix_unsupported`): reentrant checkpointing (``use_reentrant=True`` runs the layer
without autograd, so the recorded keys and values would carry no gradient back to the prompt), a
transformers without ``_can_checkpoint_with_cache`` (it drops any cache in checkpointed layers),
and checkpointing of a model with sliding-window attention layers (the stateless cache holds the
whole prefix).
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from transformers.cache_utils import Cache, DynamicLayer

from vispo.models.layout import concat_pixels, index_pixels


def _checkpointed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer layers of `model` that activation checkpointing recomputes."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [
        m
        for m in model.modules()
        if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing
    ]


def shared_prefix_unsupported(model: torch.nn.Module) -> str | None:
    """Why the shared-prefix forward cannot run on `model` (None: it can)."""
    layers = _checkpointed_layers(model)
    if not layers:
        return None
    if not hasattr(type(layers[0]), "_can_checkpoint_with_cache"):
        return (
            "this transformers drops the KV cache in checkpointed layers "
            "(no GradientCheckpointingLayer._can_checkpoint_with_cache)"
        )
    for layer in layers:
        func = getattr(layer, "_gradient_checkpointing_func", None)
        if getattr(func, "keywords", {}).get("use_reentrant", True) is not False:
            return "reentrant activation checkpointing runs layers without autograd"
    for module in model.modules():
        config = getattr(module, "config", None)
        if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
            return "activation checkpointing with sliding-window attention layers"
    return None


def _recomputes(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The checkpointed layers, when this forward will recompute them in backward (training
    mode, gradients on), else []."""
    if not (model.training and torch.is_grad_enabled()):
        return []
    return _checkpointed_layers(model)


@contextlib.contextmanager
def _cache_through(layers: list[torch.nn.Module]):
    """Let a cache into checkpointed layers: only the stateless caches below are passed while
    this is open, and the recompute replays the arguments captured now."""
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache  # back to the class's False


class _RecordLayer(DynamicLayer):
    """One layer's prompt keys and values, kept at the first call; a recompute gets its inputs
    back and stores nothing."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
        return key_states, value_states


class _ServeLayer(DynamicLayer):
    """One layer's prompt keys and values ``[R, H, Lp, D]``, row ``rows[j]`` serving sequence
    ``j``; an update returns the prefix followed by the new keys and values and stores nothing."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.rows = keys, values, rows
        self.device = keys.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        keys = torch.cat([self.keys.index_select(0, self.rows), key_states], dim=-2)
        values = torch.cat([self.values.index_select(0, self.rows), value_states], dim=-2)
        return keys, values


def _prefix_recorder() -> Cache:
    """A cache for the prompt pass under checkpointing (one :class:`_RecordLayer` per layer)."""
    return Cache(layer_class_to_replicate=_RecordLayer)


def _prefix_server(recorded: Cache, rows: torch.Tensor) -> Cache:
    """A cache for the response pass under checkpointing, from the recorded prompt pass."""
    return Cache(layers=[_ServeLayer(la.keys, la.values, rows) for la in recorded.layers])


def cache_argument(model: torch.nn.Module) -> str:
    """The forward's name for the KV cache: ``cache`` (transformers >= 5.25) or the older
    ``past_key_values``."""
    inner = getattr(model, "module", model)  # DDP
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # PEFT
    return (
        "cache"
        if "cache" in inspect.signature(type(inner).forward).parameters
        else ("past_key_values")
    )


def output_cache(out):
    """The KV cache a forward with ``use_cache=True`` returned (``cache``, formerly
    ``past_key_values``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _rope_index_fn(model: torch.nn.Module):
    """The model's own M-RoPE position function (``get_rope_index``), PEFT-wrapped or not."""
    for module in model.modules():
        fn = getattr(module, "get_rope_index", None)
        if callable(fn):
            return fn
    raise ValueError(
        "the model derives its own positions but has no get_rope_index: the shared-prefix "
        "forward does not know how to continue its positions (set train.shared_prefix=off)"
    )


def prompt_positions(model, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids of left-padded prompts and each prompt's text offset.

    Returns ``(positions, offsets)``: ``[P, Lp]`` (or ``[3, P, Lp]`` for M-RoPE models) and
    ``[P]``. A text token after the prompt, the ``j``-th real token of its sequence (from 0),
    sits at position ``j + offset`` on every axis (:func:`text_positions`).
    """
    mask = prompts.attention_mask.long()
    if not prompts.layout.model_positions:
        return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0), mask.new_zeros(len(mask))
    fn = _rope_index_fn(model)
    kwargs = {"attention_mask": prompts.attention_mask, **prompts.token_inputs, **prompts.pixels}
    accepted = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    positions, deltas = fn(prompts.input_ids, **kwargs)
    return positions, deltas.reshape(-1).long()


def text_positions(index: torch.Tensor, offsets: torch.Tensor, *, mrope: bool) -> torch.Tensor:
    """Positions of text tokens that are real token number ``index [b, t]`` of their sequence,
    given each row's offset ``[b]``: ``[b, t]``, or ``[3, b, t]`` for M-RoPE."""
    positions = index + offsets.to(index.device)[:, None]
    return positions.unsqueeze(0).expand(3, -1, -1) if mrope else positions


def shared_prefix_logits(
    model: torch.nn.Module,
    batch,
    variants,
    *,
    precision,
) -> list[torch.Tensor]:
    """``[b, T, V]`` logits predicting each response token, one tensor per variant.

    Args:
        model: the policy (or reference), any supported VLM, PEFT-wrapped or not.
        batch: a :class:`vispo.models.scoring.ScoringBatch` (any selection of sequences).
        variants: per-prompt pixel dicts of ``batch.prompts`` (already geometry-checked).
        precision: a callable ``device -> context manager`` for the forwards (autocast).
    """
    device = next(model.parameters()).device
    T = batch.response_mask.shape[1]
    Lp = batch.prompt_length
    layout = batch.layout
    uniq, inverse = torch.unique(batch.prompt_index, return_inverse=True)
    prompts = batch.prompts.select(uniq)
    nv, P = len(variants), len(uniq)
    prompt_pos, offsets = prompt_positions(model, prompts)
    real = batch.attention_mask.long()
    index = (real.cumsum(-1) - 1).masked_fill(real == 0, 0)[:, Lp:]
    response_pos = text_positions(index, offsets[inverse], mrope=layout.model_positions)

    # 1. The distinct prompts, every variant stacked along the batch.
    pixels = concat_pixels(
        [index_pixels(v, layout, batch.prompts.num_images, uniq) for v in variants], layout
    )
    inputs = {
        "input_ids": prompts.input_ids.repeat(nv, 1),
        "attention_mask": prompts.attention_mask.repeat(nv, 1),
        "position_ids": torch.cat([prompt_pos] * nv, dim=-2),
        **{k: v.repeat(nv, 1) for k, v in prompts.token_inputs.items()},
        **pixels,
    }
    inputs = {k: v.to(device) for k, v in inputs.items()}
    recomputed = _recomputes(model)
    # Under checkpointing the prompt pass records into a stateless cache (see the module doc).
    prompt_cache = {cache_argument(model): _prefix_recorder()} if recomputed else {}
    with precision(device), _cache_through(recomputed):
        # (``use_cache`` only asks for a new cache; transformers refuses it under checkpointing.)
        out = model(**inputs, **prompt_cache, use_cache=not recomputed, logits_to_keep=1)
    # Row k * P + p of the prefix serves sequence j of variant k when inverse[j] == p.
    rows = (inverse[None, :] + P * torch.arange(nv)[:, None]).reshape(-1).to(device)
    first = out.logits[:, -1:, :].index_select(0, rows)
    if T == 1:
        return list(first.chunk(nv, dim=0))

    # 2. Each sequence takes its prompt's keys and values.
    if recomputed:
        cache = _prefix_server(next(iter(prompt_cache.values())), rows)
    else:
        cache = output_cache(out)
        cache.reorder_cache(rows)

    # 3. The responses against the cache; positions 0 .. T-2 predict tokens 1 .. T-1.
    response = {
        "input_ids": batch.response_ids.repeat(nv, 1),
        "attention_mask": batch.attention_mask.repeat(nv, 1),
        "position_ids": torch.cat([response_pos] * nv, dim=-2),
        **{k: v[:, Lp:].repeat(nv, 1) for k, v in batch.token_inputs.items()},
    }
    response = {k: v.to(device) for k, v in response.items()}
    keep = torch.arange(T - 1, device=device)
    with precision(device), _cache_through(recomputed):
        rest = model(
            **response,
            **{cache_argument(model): cache},
            cache_position=torch.arange(Lp, Lp + T, device=device),
            use_cache=not recomputed,
            logits_to_keep=keep,
        ).logits
    return list(torch.cat([first, rest], dim=1).chunk(nv, dim=0))
