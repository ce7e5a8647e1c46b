"""Rollouts with Hugging Face ``generate``: n sampled responses per prompt, one batched call.

The prompts are left-padded (:func:`vispo.models.scoring.encode_prompts`) and generated with
``num_return_sequences=n`` and the KV cache, so the n responses of prompt i are rows
``i*n ... i*n + n - 1``. Sampling is exactly ``softmax(logits / temperature)`` with optional
nucleus (top-p) truncation: the checkpoint's own ``generation_config`` sampling defaults
(top-k, repetition penalty, ...) are deliberately ignored, because the RL objective scores
the responses under the plain tempered distribution and any other warping biases it.

Seeding: with ``seed`` given, generation runs inside ``torch.random.fork_rng`` after
``torch.manual_seed(seed)`` (``generate`` draws from the global torch RNG and takes no
``torch.Generator``), so the same seed gives the same responses and the caller's global RNG
state is left untouched. ``seed=None`` draws from (and advances) the global RNG.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList

from vispo.models.scoring import PromptBatch, forward_precision, response_mask_from_ids
from vispo.rollout.decode import process_logits, response_counts, sample_shared_prefix


@dataclasses.dataclass
class Rollout:
    """Responses of one rollout (``B = len(prompts) * n`` rows, n consecutive per prompt).

    Attributes:
        response_ids: ``[B, T]`` token ids, right-padded with the pad id (T = the longest
            response, at most ``max_new_tokens``).
        response_mask: ``[B, T]`` float, 1 for real tokens (EOS included, nothing after it).
        lengths: ``[B]`` number of real tokens.
        stopped: ``[B]`` bool, True if the response ended with EOS; False if it hit the
            length cap (truncated).
        texts: decoded responses (special tokens skipped).
        n: responses per prompt (0 when prompts were given different counts).
        prompt_index: ``[B]`` the prompt of each row.
    """

    response_ids: torch.Tensor
    response_mask: torch.Tensor
    lengths: torch.Tensor
    stopped: torch.Tensor
    texts: list[str]
    n: int
    prompt_index: torch.Tensor

    @property
    def truncated(self) -> torch.Tensor:
        """``[B]`` bool: hit the length cap without EOS."""
        return ~self.stopped

    def __len__(self) -> int:
        return self.response_ids.shape[0]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The underlying transformers model (PEFT wrappers expose it via ``get_base_model``)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _as_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def stop_token_ids(model: torch.nn.Module, processor) -> list[int]:
    """EOS ids: the model's generation config's plus the tokenizer's, deduplicated."""
    ids = _as_list(getattr(_unwrap(model).generation_config, "eos_token_id", None))
    ids += _as_list(getattr(processor.tokenizer, "eos_token_id", None))
    return list(dict.fromkeys(ids))


def finish_responses(
    sequences: torch.Tensor,
    prompt_length: int,
    *,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    tokenizer,
    n: int | Sequence[int],
) -> Rollout:
    """Turn ``generate`` output ``[B, Lp + T]`` into a :class:`Rollout`.

    A response ends at its first EOS (kept, and counted as stopped); everything after it is
    masked and overwritten with the pad id. A response without EOS is truncated at the cap.
    """
    response = sequences[:, prompt_length:]
    is_eos = torch.zeros_like(response, dtype=torch.bool)
    for eos in eos_token_ids:
        is_eos |= response == eos
    stopped = is_eos.any(-1)
    # `generate` runs until every row has an EOS or the cap is reached, so a row without EOS
    # is full length: the pad id plays no part in finding where a response ends.
    mask = response_mask_from_ids(response, eos_token_ids, None)
    response = torch.where(mask.bool(), response, torch.full_like(response, pad_token_id))
    texts = tokenizer.batch_decode(
        [row[: int(length)].tolist() for row, length in zip(response, mask.sum(-1))],
        skip_special_tokens=True,
    )
    counts = torch.tensor([n] * (response.shape[0] // n) if isinstance(n, int) else list(n))
    return Rollout(
        response_ids=response,
        response_mask=mask,
        lengths=mask.sum(-1).long(),
        stopped=stopped,
        texts=texts,
        n=_uniform(counts),
        prompt_index=torch.arange(len(counts)).repeat_interleave(counts),
    )


def _uniform(counts: torch.Tensor) -> int:
    """The responses per prompt when every prompt has the same count, else 0."""
    return int(counts[0]) if len(counts) and bool((counts == counts[0]).all()) else 0


_MULTIMODAL_TOKEN_ATTRS = (
    "image_token",
    "video_token",
    "vision_start_token",
    "vision_end_token",
    "fake_image_token",
    "global_image_token",
    "boi_token",
    "eoi_token",
    "image_start_token",
    "image_end_token",
)


def multimodal_token_ids(processor) -> list[int]:
    """Ids of the processor's image/video placeholder tokens.

    A response must never contain one: the next forward would count it as an image slot
    ("image features and image tokens do not match"). ``generate`` suppresses them; their
    probability under a trained model is negligible, so the sampled distribution is the
    tempered softmax up to that mass.
    """
    tokenizer = processor.tokenizer
    ids = set()
    for attr in _MULTIMODAL_TOKEN_ATTRS:
        token = getattr(processor, attr, None) or getattr(tokenizer, attr, None)
        if isinstance(token, str) and token:
            tid = tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                ids.add(tid)
    for attr in ("image_token_id", "video_token_id"):
        tid = getattr(processor, attr, None)
        if isinstance(tid, int):
            ids.add(tid)
    return sorted(ids)


class FusedLogitsProcessor(LogitsProcessor):
    """:func:`vispo.rollout.decode.process_logits` as ``generate``'s one logits processor.

    It replaces transformers' ``MinNewTokensLength``, ``SuppressTokens``, ``InfNanRemove``,
    ``Temperature`` and ``TopP`` processors with the same floats (tested), processed in place
    on the step's scores (``generate`` hands each step a fresh float32 copy of the logits).
    Set ``prompt_length`` (the left-padded prompt width) before the call.
    """

    def __init__(self, *, banned, eos, min_new_tokens, temperature, top_p):
        self.banned = torch.tensor(list(banned), dtype=torch.long)
        self.eos = torch.tensor(list(eos), dtype=torch.long)
        self.min_new_tokens, self.temperature, self.top_p = min_new_tokens, temperature, top_p
        self.prompt_length = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.banned.device != scores.device:
            self.banned, self.eos = self.banned.to(scores.device), self.eos.to(scores.device)
        return process_logits(
            scores,
            step=input_ids.shape[1] - self.prompt_length,
            banned=self.banned,
            eos=self.eos,
            min_new_tokens=self.min_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            inplace=True,
        )


@contextlib.contextmanager
def _only_generation_config(model: torch.nn.Module, config: GenerationConfig):
    """Temporarily make `config` the model's generation config, so no checkpoint default
    (top-k, repetition penalty, suppressed tokens, ...) leaks into sampling."""
    base = _unwrap(model)
    saved = base.generation_config
    base.generation_config = config
    try:
        yield
    finally:
        base.generation_config = saved


def generate(
    model: torch.nn.Module,
    processor,
    prompts: PromptBatch,
    *,
    n: int | Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    min_new_tokens: int = 0,
    seed: int | None = None,
    do_sample: bool = True,
    eos_token_ids: Sequence[int] | None = None,
    autocast: torch.dtype | None = None,
    shared_prefix: bool = False,
) -> Rollout:
    """Sample `n` responses per prompt with one batched ``model.generate`` call.

    Args:
        model: the policy (PEFT-wrapped or not).
        processor: its processor (for the tokenizer: decoding, EOS and pad ids).
        prompts: left-padded prompts from ``encode_prompts``.
        n: responses per prompt: one number, or one count per prompt (the rows of prompt i
            still consecutive; NoisyRollout decodes clean and noised prompts in one call so).
        max_new_tokens: length cap.
        temperature: sampling temperature (> 0); ignored when ``do_sample=False``.
        top_p: nucleus sampling mass (1.0 = off).
        min_new_tokens: EOS is suppressed before this many tokens.
        seed: makes the call reproducible without touching the global RNG (module docstring).
        do_sample: False = greedy decoding (the n responses of a prompt are then identical).
        eos_token_ids: stop tokens (default: :func:`stop_token_ids`).
        autocast: generate under ``torch.autocast`` to this dtype (None: the parameters').
        shared_prefix: prefill each prompt once and decode its n responses from one KV cache
            (:mod:`vispo.rollout.decode`) instead of ``generate``'s n prefills: the same
            distribution, processed identically.
    """
    counts = response_counts(n, len(prompts))
    uniform = len(set(counts)) <= 1
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(
            f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens}"
        )
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    tokenizer = processor.tokenizer
    eos = list(eos_token_ids) if eos_token_ids is not None else stop_token_ids(model, processor)
    if not eos:
        raise ValueError("no EOS token id: pass eos_token_ids or set one on the tokenizer")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    banned = multimodal_token_ids(processor)
    # Temperature, top-p, the EOS ban before min_new_tokens, the placeholder ban and the
    # NaN/inf guard in one processor (FusedLogitsProcessor): generate adds none of its own.
    fused = FusedLogitsProcessor(
        banned=banned,
        eos=eos,
        min_new_tokens=min_new_tokens,
        temperature=temperature if do_sample else 1.0,
        top_p=top_p if do_sample else 1.0,
    )
    config = GenerationConfig(
        do_sample=do_sample,
        **({"temperature": 1.0, "top_p": 1.0, "top_k": 0} if do_sample else {}),
        max_new_tokens=max_new_tokens,
        # Greedy decoding gives n identical responses: decode once, repeat the rows.
        # Different counts per prompt: the prompts are repeated before the call instead.
        num_return_sequences=counts[0] if do_sample and uniform and counts else 1,
        num_beams=1,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=None,
        use_cache=True,
    )
    prompts = prompts.left_padded()
    device = next(model.parameters()).device
    each = counts if do_sample and not uniform else [1] * len(counts)
    if shared_prefix or max(each, default=1) == 1:
        expanded = prompts
    else:  # `generate` repeats every prompt by one number: repeat them here
        expanded = prompts.select(torch.arange(len(counts)).repeat_interleave(torch.tensor(each)))
    inputs = {k: v.to(device) for k, v in expanded.model_inputs().items()}
    fused.prompt_length = expanded.input_ids.shape[1]
    if seed is None:
        rng = contextlib.nullcontext()
    else:
        devices = [torch.cuda.current_device()] if device.type == "cuda" else []
        rng = torch.random.fork_rng(devices=devices)
    precision = forward_precision(device, autocast)
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        if shared_prefix:
            sequences = sample_shared_prefix(
                model,
                prompts,
                n=counts if do_sample else 1,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                min_new_tokens=min_new_tokens,
                do_sample=do_sample,
                eos_token_ids=eos,
                pad_token_id=pad,
                banned_token_ids=banned,
                precision=lambda device: forward_precision(device, autocast),
            )
        else:
            with _only_generation_config(model, config), torch.no_grad(), precision:
                sequences = model.generate(
                    **inputs,
                    generation_config=config,
                    logits_processor=LogitsProcessorList([fused]),
                )
    if not do_sample:
        sequences = sequences.repeat_interleave(torch.tensor(counts), dim=0)
    return finish_responses(
        sequences.cpu(),
        prompts.input_ids.shape[1],
        eos_token_ids=eos,
        pad_token_id=pad,
        tokenizer=tokenizer,
        n=counts,
    )


def concat_rollouts(rollouts: Sequence[Rollout], pad_token_id: int) -> Rollout:
    """One rollout from several (in order), right-padding responses to the longest."""
    if not rollouts:
        raise ValueError("concat_rollouts needs at least one rollout")
    T = max(r.response_ids.shape[1] for r in rollouts)

    def pad(t: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, T - t.shape[1]), value=value)

    sizes = [int(r.prompt_index.max()) + 1 if len(r) else 0 for r in rollouts]
    offsets = torch.cumsum(torch.tensor([0] + sizes[:-1]), 0)
    prompt_index = torch.cat([r.prompt_index + o for r, o in zip(rollouts, offsets.tolist())])
    return Rollout(
        response_ids=torch.cat([pad(r.response_ids, pad_token_id) for r in rollouts]),
        response_mask=torch.cat([pad(r.response_mask, 0.0) for r in rollouts]),
        lengths=torch.cat([r.lengths for r in rollouts]),
        stopped=torch.cat([r.stopped for r in rollouts]),
        texts=[t for r in rollouts for t in r.texts],
        n=_uniform(torch.bincount(prompt_index)),
        prompt_index=prompt_index,
    )
