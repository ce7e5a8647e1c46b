"""Sampling with the prompt prefilled once per group (``rollout.shared_prefix``).

Hugging Face ``generate`` with ``num_return_sequences=n`` repeats every prompt n times before
the prefill, so the vision tower and the prompt's layers run once per response. Here each
prompt is prefilled once, its KV cache is repeated for its n responses, and the decode loop
samples all rows together. The distribution is exactly the one ``generate`` samples in
:func:`vispo.rollout.hf.generate`, processed in one step per token:

    suppress the image/video placeholders and, before ``min_new_tokens``, the EOS ids;
    non-finite logits made finite (NaN -> 0, +-inf -> the largest finite values);
    divide by the temperature; nucleus (top-p) truncation as transformers does it;
    one ``torch.multinomial`` draw per row from the softmax (greedy: argmax).

The draws are made in the same order and shape as ``generate`` makes them (one multinomial
over all rows per step, finished rows included), so with the same seed both paths give the
same tokens unless float rounding moves a draw across a probability boundary (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vispo.models.prefix import cache_argument, output_cache, prompt_positions, text_positions


def process_logits(
    logits: torch.Tensor,
    *,
    step: int,
    banned: torch.Tensor,
    eos: torch.Tensor,
    min_new_tokens: int,
    temperature: float,
    top_p: float,
) -> torch.Tensor:
    """The sampling scores of one decode step from float32 logits ``[B, V]``."""
    scores = logits.index_fill(-1, banned, float("-inf")) if banned.numel() else logits
    if step < min_new_tokens:
        scores = scores.index_fill(-1, eos, float("-inf"))
    scores = torch.nan_to_num(scores, nan=0.0)
    if temperature != 1.0:
        scores = scores / temperature
    if top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        drop = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1:] = False  # keep at least the most likely token
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


def _any_unfinished(unfinished: torch.Tensor) -> bool:
    """Whether any row (on any rank, when ranks run a sharded forward together) goes on."""
    flag = unfinished.any().to(torch.int64).reshape(1)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = flag.to("cuda" if flag.device.type == "cuda" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


@torch.no_grad()
def sample_shared_prefix(
    model: torch.nn.Module,
    prompts,
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    min_new_tokens: int,
    do_sample: bool,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    banned_token_ids: Sequence[int],
    precision,
) -> torch.Tensor:
    """``[P * n, Lp + T]`` prompt + sampled tokens, the n rows of prompt i consecutive.

    Rows stop at their first EOS (later positions hold ``pad_token_id``); the loop ends when
    every row has stopped or after ``max_new_tokens`` tokens.
    """
    device = next(model.parameters()).device
    P, Lp = prompts.input_ids.shape
    rows = torch.arange(P, device=device).repeat_interleave(n)
    prompt_pos, offsets = prompt_positions(model, prompts)
    inputs = {**prompts.model_inputs(), "position_ids": prompt_pos}
    inputs = {k: v.to(device) for k, v in inputs.items()}
    with precision(device):
        out = model(**inputs, use_cache=True, logits_to_keep=1)
    cache = output_cache(out)
    cache.reorder_cache(rows)
    logits = out.logits[:, -1].float().index_select(0, rows)

    mask = inputs["attention_mask"].index_select(0, rows)
    real = mask.long().sum(-1)
    offsets = offsets.to(device).index_select(0, rows)
    mrope = prompts.layout.model_positions
    eos = torch.tensor(list(eos_token_ids), device=device)
    banned = torch.tensor(list(banned_token_ids), dtype=torch.long, device=device)
    unfinished = torch.ones(len(rows), dtype=torch.bool, device=device)
    tokens = []
    cache_key = cache_argument(model)
    for step in range(max_new_tokens):
        scores = process_logits(
            logits,
            step=step,
            banned=banned,
            eos=eos,
            min_new_tokens=min_new_tokens,
            temperature=temperature if do_sample else 1.0,
            top_p=top_p if do_sample else 1.0,
        )
        if do_sample:
            token = torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)
        else:
            token = scores.argmax(-1)
        token = torch.where(unfinished, token, torch.full_like(token, pad_token_id))
        tokens.append(token)
        unfinished &= ~torch.isin(token, eos)
        if step == max_new_tokens - 1 or not _any_unfinished(unfinished):
            break
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        position = text_positions((real + step)[:, None], offsets, mrope=mrope)
        with precision(device):
            out = model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=position,
                cache_position=torch.tensor([Lp + step], device=device),
                use_cache=True,
                logits_to_keep=1,
                **{cache_key: cache},
            )
        logits = out.logits[:, -1].float()
    prompt_ids = prompts.input_ids.to(device).index_select(0, rows)
    return torch.cat([prompt_ids, torch.stack(tokens, dim=1)], dim=1)
