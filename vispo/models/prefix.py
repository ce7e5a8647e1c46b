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

Not supported (the caller falls back to the plain forward): activation checkpointing, which
transformers runs without a cache.
"""

from __future__ import annotations

import inspect

import torch

from vispo.models.layout import concat_pixels, index_pixels


def shared_prefix_unsupported(model: torch.nn.Module) -> str | None:
    """Why the shared-prefix forward cannot run on `model` (None: it can)."""
    new = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.2x
    if new if new is not None else getattr(model, "is_gradient_checkpointing", False):
        return "activation checkpointing recomputes layers without a KV cache"
    return None


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
    with precision(device):
        out = model(**inputs, use_cache=True, logits_to_keep=1)
    # Row k * P + p of the prefix serves sequence j of variant k when inverse[j] == p.
    rows = (inverse[None, :] + P * torch.arange(nv)[:, None]).reshape(-1).to(device)
    first = out.logits[:, -1:, :].index_select(0, rows)
    if T == 1:
        return list(first.chunk(nv, dim=0))

    # 2. Each sequence takes its prompt's keys and values.
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
    with precision(device):
        rest = model(
            **response,
            **{cache_argument(model): cache},
            cache_position=torch.arange(Lp, Lp + T, device=device),
            use_cache=True,
            logits_to_keep=keep,
        ).logits
    return list(torch.cat([first, rest], dim=1).chunk(nv, dim=0))
