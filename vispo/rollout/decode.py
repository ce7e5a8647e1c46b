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
from transformers.cache_utils import DynamicLayer

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
    inplace: bool = False,
) -> torch.Tensor:
    """The sampling scores of one decode step from float32 logits ``[B, V]``, in one step.

    The same floats as transformers' ``MinNewTokensLength``, ``SuppressTokens``,
    ``InfNanRemove``, ``Temperature`` and ``TopP`` processors applied in that order, but each
    stage works in place on one buffer (``inplace=True``: on ``logits`` itself), so a step
    makes one copy of the ``[B, V]`` scores at most instead of one per stage.
    """
    scores = logits if inplace else logits.clone()
    ids = banned if step >= min_new_tokens else torch.cat([banned, eos.to(banned.dtype)])
    if ids.numel():
        scores.index_fill_(-1, ids, float("-inf"))
    # NaN -> 0 and +inf -> the largest float (InfNanRemove); -inf stays -inf.
    scores.nan_to_num_(nan=0.0, neginf=float("-inf"))
    if temperature != 1.0:
        scores.div_(temperature)
    if top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        drop = ordered.softmax(-1).cumsum_(-1) <= 1 - top_p
        drop[..., -1:] = False  # keep at least the most likely token
        scores.masked_fill_(drop.scatter(-1, order, drop), float("-inf"))
    return scores


def _any_unfinished(unfinished: torch.Tensor) -> bool:
    """Whether any row (on any rank, when ranks run a sharded forward together) goes on."""
    flag = unfinished.any().to(torch.int64).reshape(1)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = flag.to("cuda" if flag.device.type == "cuda" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


class _PreallocatedLayer(DynamicLayer):
    """A KV-cache layer that grows into a buffer sized for the whole decode.

    transformers' ``DynamicLayer`` concatenates every new key and value onto the cache, copying
    all of it at every step (a cost that grows with the prompt: the image tokens); this layer
    writes the step's entry into a preallocated buffer and hands the attention a view of the
    filled part, the same values in the same order.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, room: int):
        super().__init__()
        B, H, L, _ = keys.shape
        self.buffers = []
        for t in (keys, values):
            buf = t.new_empty(len(rows), t.shape[1], L + room, t.shape[3])
            buf[:, :, :L] = t.index_select(0, rows)
            self.buffers.append(buf)
        self.length, self.device, self.is_initialized = L, keys.device, True
        self._views()

    def _views(self) -> None:
        self.keys, self.values = (b[:, :, : self.length] for b in self.buffers)

    def update(self, key_states, value_states, *args, **kwargs):
        q = key_states.shape[-2]
        for buf, new in zip(self.buffers, (key_states, value_states)):
            buf[:, :, self.length : self.length + q] = new
        self.length += q
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def reorder_cache(self, index: torch.Tensor) -> None:
        self.buffers = [b.index_select(0, index) for b in self.buffers]
        self._views()


def _preallocate(cache, rows: torch.Tensor, room: int) -> None:
    """Repeat the prompts' cache rows (``rows``) into preallocated layers, in place; a cache
    with any other kind of layer (sliding window, linear attention) is only repeated."""
    layers = getattr(cache, "layers", None)
    plain = layers and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)
    if not plain:
        cache.reorder_cache(rows)
        return
    cache.layers = [_PreallocatedLayer(la.keys, la.values, rows, room) for la in layers]


def response_counts(n: int | Sequence[int], prompts: int) -> list[int]:
    """Responses per prompt: ``n`` for every prompt, or one count per prompt."""
    counts = [int(n)] * prompts if isinstance(n, int) else [int(c) for c in n]
    if len(counts) != prompts or min(counts, default=1) < 1:
        raise ValueError(f"n must be >= 1 or one count >= 1 per prompt ({prompts}), got {n}")
    return counts


@torch.no_grad()
def sample_shared_prefix(
    model: torch.nn.Module,
    prompts,
    *,
    n: int | Sequence[int],
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
    """``[sum(counts), Lp + T]`` prompt + sampled tokens, the rows of prompt i consecutive.

    ``n``: responses per prompt, the same for all or one count per prompt (NoisyRollout decodes
    a group's clean and noisy prompts together this way).

    Rows stop at their first EOS (later positions hold ``pad_token_id``); the loop ends when
    every row has stopped or after ``max_new_tokens`` tokens. Stopped rows leave the forward
    (their cache rows are dropped once an eighth of the batch has stopped), but every step still
    draws over all rows, so the random stream, and with it every row's tokens, is the one
    ``generate`` draws, which keeps computing the stopped rows to the end.
    """
    device = next(model.parameters()).device
    P, Lp = prompts.input_ids.shape
    counts = torch.tensor(response_counts(n, P), device=device)
    rows = torch.arange(P, device=device).repeat_interleave(counts)
    B = len(rows)
    prompt_pos, offsets = prompt_positions(model, prompts)
    inputs = {**prompts.model_inputs(), "position_ids": prompt_pos}
    inputs = {k: v.to(device) for k, v in inputs.items()}
    with precision(device):
        out = model(**inputs, use_cache=True, logits_to_keep=1)
    cache = output_cache(out)
    _preallocate(cache, rows, max_new_tokens)
    logits = out.logits[:, -1].float().index_select(0, rows)

    mask = inputs["attention_mask"].index_select(0, rows)
    real = mask.long().sum(-1)
    offsets = offsets.to(device).index_select(0, rows)
    mrope = prompts.layout.model_positions
    eos = torch.tensor(list(eos_token_ids), device=device)
    banned = torch.tensor(list(banned_token_ids), dtype=torch.long, device=device)
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    active = torch.arange(B, device=device)  # the rows the forward still computes
    draws = None  # [B, V] probabilities of every row once some rows left the forward
    pad = torch.full((B,), pad_token_id, dtype=torch.long, device=device)
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
            inplace=True,
        )
        if do_sample:
            probs = scores.softmax(-1)
            if draws is not None:  # stopped rows keep a valid dummy distribution
                probs = draws.index_copy_(0, active, probs)
            drawn = torch.multinomial(probs, num_samples=1).squeeze(1)
            if draws is not None:
                drawn = drawn.index_select(0, active)
        else:
            drawn = scores.argmax(-1)
        token = pad.index_copy(0, active, drawn) if len(active) < B else drawn
        token = torch.where(unfinished, token, pad)
        tokens.append(token)
        unfinished &= ~torch.isin(token, eos)
        if step == max_new_tokens - 1 or not _any_unfinished(unfinished):
            break
        going = unfinished.index_select(0, active)
        left = int(going.sum())
        if 0 < left <= len(active) - max(1, len(active) // 8):  # drop the stopped rows
            keep = going.nonzero().squeeze(1)
            cache.reorder_cache(keep)
            active, mask = active.index_select(0, keep), mask.index_select(0, keep)
            if draws is None and do_sample:
                draws = logits.new_zeros(B, logits.shape[-1])
                draws[:, 0] = 1.0
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        index = real.index_select(0, active) + step
        position = text_positions(index[:, None], offsets.index_select(0, active), mrope=mrope)
        with precision(device):
            out = model(
                input_ids=token.index_select(0, active)[:, None],
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
