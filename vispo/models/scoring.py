"""Scoring: the one place that computes per-token log-probs (and entropies) of responses.

The flow, for one RL step::

    prompts = encode_prompts(processor, messages, images)        # left-padded prompts
    rollout = generate(model, processor, prompts, n=5, ...)      # vispo.rollout.hf
    batch = build_scoring_batch(prompts, rollout.response_ids, repeats=5,
                                response_mask=rollout.response_mask)
    masked = pixel_inputs(processor, masked_images, reference=prompts)   # PAPO I_mask
    orig, mask = score(model, batch, [None, masked], entropy=[True, False])

A sequence is ``[prompt, left-padded | response, right-padded]``. Image variants (PAPO's
masked image, CPPO's I+ and I-) have the original image size, so they share ``input_ids``,
the attention mask and position ids (Qwen's M-RoPE positions depend only on the token ids
and ``image_grid_thw``); only the pixel inputs change. Variants are given per prompt, exactly
as :func:`pixel_inputs` returns them; the batch repeats them for each prompt's rollouts, and
``ScoringBatch.select`` keeps that mapping, so the same variant dict serves every mini-batch.

Logits are computed only at the response positions (``logits_to_keep``), divided by the
rollout temperature, and reduced with the chunked ``selective_log_softmax`` of
:mod:`vispo.algos`, or ``logp_and_entropy`` when entropies are wanted too (float32, no float32
``[B, T, V]`` copy).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping, Sequence

import torch
from PIL import Image

from vispo.algos import full_kl_from_logits, logp_and_entropy, selective_log_softmax
from vispo.models.layout import PixelLayout, concat_pixels, index_pixels, layout_for
from vispo.models.prefix import shared_prefix_logits

PixelDict = dict[str, torch.Tensor]


@dataclasses.dataclass
class PromptBatch:
    """Encoded, left-padded prompts with their pixel inputs.

    Attributes:
        input_ids: ``[P, Lp]`` token ids, left-padded.
        attention_mask: ``[P, Lp]`` 1 for real tokens.
        pixels: the processor's pixel inputs (layout: ``layout``), e.g. ``pixel_values`` and
            ``image_grid_thw`` (Qwen) or ``pixel_values`` and ``pixel_attention_mask``
            (Idefics3).
        num_images: images per prompt.
        layout: how the architecture lays out pixel keys along the batch.
        pad_token_id: the padding id.
        eos_token_ids: ids that end a response.
        token_inputs: other ``[P, Lp]`` inputs aligned with the tokens (Qwen
            ``mm_token_type_ids``).
        texts: the chat-templated prompt strings (before image-token expansion).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixels: PixelDict
    num_images: list[int]
    layout: PixelLayout
    pad_token_id: int
    eos_token_ids: tuple[int, ...] = ()
    token_inputs: PixelDict = dataclasses.field(default_factory=dict)
    texts: list[str] | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``model(...)`` / ``model.generate(...)`` on these prompts."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            **self.token_inputs,
            **self.pixels,
        }

    def left_padded(self) -> PromptBatch:
        """The same prompts with all padding moved to the left (a no-op if already so).

        Right-padded prompts (e.g. built by another tool) would put padding between prompt
        and response, and the token before the response would be a pad; generation and
        scoring therefore always work on left-padded prompts.
        """
        mask = self.attention_mask
        if not bool((mask[:, -1] == 0).any()):
            return self
        # Stable sort on the mask: pads (0) first, real tokens (1) after, in their order.
        order = torch.sort(mask.long(), dim=1, stable=True).indices
        return dataclasses.replace(
            self,
            input_ids=self.input_ids.gather(1, order),
            attention_mask=mask.gather(1, order),
            token_inputs={k: v.gather(1, order) for k, v in self.token_inputs.items()},
        )

    def select(self, index: Sequence[int] | torch.Tensor) -> PromptBatch:
        """The prompts ``index`` (in that order), pixel inputs included."""
        idx = _as_index(index)
        return dataclasses.replace(
            self,
            input_ids=self.input_ids[idx],
            attention_mask=self.attention_mask[idx],
            token_inputs={k: v[idx] for k, v in self.token_inputs.items()},
            pixels=index_pixels(self.pixels, self.layout, self.num_images, idx),
            num_images=[self.num_images[i] for i in idx.tolist()],
            texts=None if self.texts is None else [self.texts[i] for i in idx.tolist()],
        )


@dataclasses.dataclass
class ScoringBatch:
    """Sequences (prompt + sampled response) ready for teacher-forced scoring.

    Sequence ``b`` comes from prompt ``prompt_index[b]`` of ``prompts``; its pixel inputs (of
    any variant) are gathered from the per-prompt pixel dict at forward time.

    Attributes:
        prompts: the prompt batch the sequences come from.
        prompt_index: ``[B]`` prompt of each sequence.
        input_ids: ``[B, Lp + T]`` prompt (left-padded) + response (right-padded).
        attention_mask: ``[B, Lp + T]``.
        token_inputs: other per-token inputs, ``[B, Lp + T]`` (response part filled with 0).
        response_mask: ``[B, T]`` float, 1 for real response tokens.
        pixels: per-prompt pixel inputs used for ``variant=None`` (default: the prompts').
    """

    prompts: PromptBatch
    prompt_index: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_inputs: PixelDict
    response_mask: torch.Tensor
    pixels: PixelDict | None = None

    @property
    def prompt_length(self) -> int:
        return self.prompts.input_ids.shape[1]

    @property
    def response_ids(self) -> torch.Tensor:
        """``[B, T]`` response token ids (padding positions hold the pad id)."""
        return self.input_ids[:, self.prompt_length :]

    @property
    def layout(self) -> PixelLayout:
        return self.prompts.layout

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def prompt_pixels(self) -> PixelDict:
        """Per-prompt pixel inputs of this batch's own image (``variant=None``)."""
        return self.prompts.pixels if self.pixels is None else self.pixels

    def select(self, index: Sequence[int] | torch.Tensor) -> ScoringBatch:
        """The sub-batch of sequences ``index`` (mini-batches; correct for every layout)."""
        idx = _as_index(index)
        return dataclasses.replace(
            self,
            prompt_index=self.prompt_index[idx],
            input_ids=self.input_ids[idx],
            attention_mask=self.attention_mask[idx],
            token_inputs={k: v[idx] for k, v in self.token_inputs.items()},
            response_mask=self.response_mask[idx],
        )

    def with_pixels(self, prompt_pixels: Mapping[str, torch.Tensor]) -> ScoringBatch:
        """The same sequences with another image variant as their own pixels.

        ``prompt_pixels`` is per prompt (as :func:`pixel_inputs` returns it for all of
        ``self.prompts``) and must have the original geometry.
        """
        checked = check_same_geometry(self.prompts.pixels, prompt_pixels, self.layout)
        return dataclasses.replace(self, pixels=checked)

    def sequence_pixels(self, variant: Mapping[str, torch.Tensor] | None = None) -> PixelDict:
        """Pixel inputs of every sequence, in batch order, for `variant` (None: own pixels)."""
        pixels = self.prompt_pixels if variant is None else variant
        return index_pixels(pixels, self.layout, self.prompts.num_images, self.prompt_index)

    def model_inputs(self, variant: Mapping[str, torch.Tensor] | None = None) -> dict:
        """Full keyword arguments of a plain ``model(...)`` forward over these sequences."""
        inputs = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            **self.token_inputs,
            **self.sequence_pixels(variant),
        }
        if not self.layout.model_positions:
            inputs["position_ids"] = positions_from_mask(self.attention_mask)
        return inputs


@dataclasses.dataclass
class Scores:
    """Per-token scores of one image variant.

    ``logp``: ``[B, T]`` float32 log-probs of the response tokens (0 where the response mask
    is 0). ``entropy``: ``[B, T]`` float32 full-vocabulary entropies (0 where masked), or None.
    ``kl``: ``[B, T]`` float32 full-vocabulary KL(first variant || this one) (VPPO), or None.
    """

    logp: torch.Tensor
    entropy: torch.Tensor | None = None
    kl: torch.Tensor | None = None


def _as_index(index: Sequence[int] | torch.Tensor) -> torch.Tensor:
    idx = torch.as_tensor(index, dtype=torch.long)
    if idx.dim() != 1:
        raise ValueError(f"index must be 1-D, got shape {tuple(idx.shape)}")
    return idx


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """1-D position ids that skip padding, exactly as ``generate`` builds them."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def _count_image_items(conversation: Sequence[Mapping]) -> int:
    count = 0
    for message in conversation:
        content = message.get("content")
        if isinstance(content, list):
            count += sum(1 for item in content if item.get("type") == "image")
    return count


def encode_prompts(
    processor,
    messages: Sequence[Sequence[Mapping]],
    images: Sequence[Sequence[Image.Image]],
    *,
    add_generation_prompt: bool = True,
) -> PromptBatch:
    """Chat-template and process a batch of conversations with their images, left-padded.

    Args:
        processor: a multimodal processor (e.g. from ``load_policy`` or ``build_tiny_vlm``).
        messages: one conversation per prompt, HF content items (``{"type": "image"}``,
            ``{"type": "text", "text": ...}``).
        images: per prompt, its images in the order of its image items.
        add_generation_prompt: end with the assistant turn header (default).

    Raises:
        ValueError: mismatched lengths or image counts (naming the sample), or processor
            outputs without a known layout.
    """
    if len(messages) != len(images):
        raise ValueError(
            f"messages and images must have one entry per prompt: {len(messages)} vs {len(images)}"
        )
    if not messages:
        raise ValueError("encode_prompts needs at least one prompt")
    layout = layout_for(processor)
    num_images = []
    for i, (conversation, imgs) in enumerate(zip(messages, images)):
        expected = _count_image_items(conversation)
        if expected != len(imgs):
            raise ValueError(
                f"sample {i}: its messages have {expected} image item(s) but {len(imgs)} "
                "image(s) were given"
            )
        for j, img in enumerate(imgs):
            if not isinstance(img, Image.Image):
                raise ValueError(
                    f"sample {i}, image {j}: expected a PIL image, got {type(img).__name__}"
                )
        num_images.append(len(imgs))
    texts = [
        processor.apply_chat_template(
            list(conversation), tokenize=False, add_generation_prompt=add_generation_prompt
        )
        for conversation in messages
    ]
    has_images = sum(num_images) > 0
    encoded = processor(
        text=texts,
        images=[list(imgs) for imgs in images] if has_images else None,
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
    encoded = dict(encoded)
    input_ids, attention_mask = encoded.pop("input_ids"), encoded.pop("attention_mask")
    if bool((attention_mask[:, -1] == 0).any()):
        raise RuntimeError("the processor did not left-pad the prompts")
    token_inputs = {k: encoded.pop(k) for k in list(encoded) if k in layout.per_token}
    pixels = {k: encoded.pop(k) for k in list(encoded) if k in layout.pixel_keys}
    if encoded:
        raise ValueError(
            f"processor returned inputs with no known layout: {sorted(encoded)} "
            f"(layout {layout.name!r}); register one with vispo.models.layout.register_layout"
        )
    tokenizer = processor.tokenizer
    eos = tokenizer.eos_token_id
    return PromptBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixels=pixels,
        num_images=num_images,
        layout=layout,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        eos_token_ids=() if eos is None else (int(eos),),
        token_inputs=token_inputs,
        texts=texts,
    )


def check_same_geometry(
    reference: Mapping[str, torch.Tensor],
    variant: Mapping[str, torch.Tensor],
    layout: PixelLayout,
) -> PixelDict:
    """Check that `variant` pixel inputs can replace `reference` (same keys, shapes, grids).

    A perturbed image must keep its size, so that it yields the same number of image tokens
    (and the same ``image_grid_thw``) and the token ids and positions can be reused.
    Returns `variant` as a plain dict; raises ``ValueError`` naming the offending key.
    """
    if set(reference) != set(variant):
        raise ValueError(
            f"variant pixel keys {sorted(variant)} differ from the original's {sorted(reference)}"
        )
    for key, ref in reference.items():
        value = variant[key]
        if tuple(value.shape) != tuple(ref.shape):
            raise ValueError(
                f"variant {key!r} has shape {tuple(value.shape)} but the original has "
                f"{tuple(ref.shape)}: perturbed images must keep the original size"
            )
        if key in layout.per_image and not torch.equal(value, ref):
            bad = (value != ref).reshape(value.shape[0], -1).any(-1).nonzero().flatten().tolist()
            raise ValueError(
                f"variant {key!r} differs from the original at image(s) {bad}: perturbed images "
                "must keep the original size (same image tokens)"
            )
    return dict(variant)


def pixel_inputs(
    processor,
    images: Sequence[Sequence[Image.Image]],
    *,
    reference: PromptBatch | Mapping[str, torch.Tensor] | None = None,
) -> PixelDict:
    """Image-processor outputs only, e.g. for a perturbed variant of a batch's images.

    Args:
        processor: the processor used for the prompts.
        images: per prompt, its images (same structure as given to :func:`encode_prompts`).
        reference: the original prompts (or their pixel dict); when given, the result is
            checked to have the same geometry (:func:`check_same_geometry`).

    Returns:
        The pixel inputs (only the layout's pixel keys), per prompt, as the processor would
        produce them inside :func:`encode_prompts`.
    """
    layout = layout_for(processor)
    nested = [list(imgs) for imgs in images]
    if sum(len(imgs) for imgs in nested) == 0:
        raise ValueError("pixel_inputs needs at least one image")
    # Qwen image processors take the flat image list; per-sample layouts take the nesting.
    batch_images = nested if layout.per_sample else [img for imgs in nested for img in imgs]
    processed = processor.image_processor(images=batch_images, return_tensors="pt")
    pixels = {k: v for k, v in processed.items() if k in layout.pixel_keys}
    if reference is not None:
        ref_pixels = reference.pixels if isinstance(reference, PromptBatch) else reference
        pixels = check_same_geometry(ref_pixels, pixels, layout)
    return pixels


def response_mask_from_ids(
    response_ids: torch.Tensor, eos_token_ids: Sequence[int], pad_token_id: int | None
) -> torch.Tensor:
    """``[B, T]`` float mask of real response tokens: up to and including the first EOS; rows
    without EOS end at their last non-pad token."""
    ids = response_ids
    T = ids.shape[1]
    if T == 0:
        return torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    positions = torch.arange(T, device=ids.device).expand_as(ids)
    is_eos = torch.zeros_like(ids, dtype=torch.bool)
    for eos in eos_token_ids:
        is_eos |= ids == eos
    first_eos = torch.where(is_eos, positions, T).min(-1).values  # T when no EOS
    if pad_token_id is None:
        last_real = torch.full_like(first_eos, T - 1)
    else:
        last_real = torch.where(ids != pad_token_id, positions, -1).max(-1).values
    end = torch.where(first_eos < T, first_eos, last_real)  # inclusive
    return (positions <= end[:, None]).float()


def build_scoring_batch(
    prompts: PromptBatch,
    response_ids: torch.Tensor,
    *,
    repeats: int,
    response_mask: torch.Tensor | None = None,
) -> ScoringBatch:
    """Pair every prompt with its `repeats` responses (consecutive rows of `response_ids`).

    Args:
        prompts: the prompts (right-padded ones are converted to left padding).
        response_ids: ``[len(prompts) * repeats, T]`` right-padded responses; rows
            ``i * repeats ... (i + 1) * repeats - 1`` belong to prompt ``i``.
        repeats: responses per prompt (the group size n).
        response_mask: ``[B, T]`` 1 for real tokens; default: derived from the ids (up to and
            including the first EOS, else up to the last non-pad token).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if response_ids.dim() != 2:
        raise ValueError(f"response_ids must be [B, T], got shape {tuple(response_ids.shape)}")
    B = len(prompts) * repeats
    if response_ids.shape[0] != B:
        raise ValueError(
            f"response_ids has {response_ids.shape[0]} rows but {len(prompts)} prompts x "
            f"{repeats} repeats = {B}"
        )
    if response_mask is None:
        response_mask = response_mask_from_ids(
            response_ids, prompts.eos_token_ids, prompts.pad_token_id
        )
    else:
        if tuple(response_mask.shape) != tuple(response_ids.shape):
            raise ValueError(
                f"response_mask shape {tuple(response_mask.shape)} must equal response_ids "
                f"shape {tuple(response_ids.shape)}"
            )
        if bool(((response_mask != 0) & (response_mask != 1)).any()):
            raise ValueError("response_mask must contain only 0 and 1")
    response_mask = response_mask.float()
    prompts = prompts.left_padded()
    prompt_index = torch.arange(len(prompts)).repeat_interleave(repeats)
    real = response_mask.bool()
    response_ids = torch.where(
        real, response_ids, torch.full_like(response_ids, prompts.pad_token_id)
    )
    input_ids = torch.cat([prompts.input_ids[prompt_index], response_ids.long()], dim=1)
    attention_mask = torch.cat(
        [prompts.attention_mask[prompt_index], real.to(prompts.attention_mask.dtype)], dim=1
    )
    token_inputs = {
        k: torch.cat([v[prompt_index], torch.zeros_like(response_ids, dtype=v.dtype)], dim=1)
        for k, v in prompts.token_inputs.items()
    }
    return ScoringBatch(
        prompts=prompts,
        prompt_index=prompt_index,
        input_ids=input_ids,
        attention_mask=attention_mask,
        token_inputs=token_inputs,
        response_mask=response_mask,
    )


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def forward_precision(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to `dtype` around a model forward (None: the parameters' dtype).

    Only the forward runs under it (backward follows the forward's casts, as torch
    recommends); log-probs and entropies upcast their chunks to float32 either way.
    """
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _response_logits(
    model: torch.nn.Module,
    batch: ScoringBatch,
    variants: Sequence[PixelDict],
    *,
    stack: bool,
    autocast: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """``[b, T, V]`` logits predicting each response token, one tensor per variant."""
    T = batch.response_mask.shape[1]
    L = batch.input_ids.shape[1]
    device = _model_device(model)
    text = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    text.update(batch.token_inputs)
    if not batch.layout.model_positions:
        text["position_ids"] = positions_from_mask(batch.attention_mask)
    per_variant = [batch.sequence_pixels(v) for v in variants]
    groups = [list(range(len(variants)))] if stack else [[k] for k in range(len(variants))]
    logits: list[torch.Tensor] = []
    for group in groups:
        inputs = {k: torch.cat([v] * len(group), dim=0) for k, v in text.items()}
        inputs.update(concat_pixels([per_variant[k] for k in group], batch.layout))
        inputs = {k: v.to(device) for k, v in inputs.items()}
        # Positions L-T-1 .. L-2 predict the T response tokens. Keeping exactly those (rather
        # than the last T+1 and slicing) gives contiguous [b, T, V] logits: no copy of them in
        # the reductions and no [b, T+1, V] gradient buffer in the backward.
        keep = torch.arange(L - T - 1, L - 1, device=device)
        with forward_precision(device, autocast):
            out = model(**inputs, logits_to_keep=keep, use_cache=False)
        logits.extend(out.logits.chunk(len(group), dim=0))
    return logits


def _logits(model, batch, variants, stack: bool, autocast, shared_prefix: bool):
    if not shared_prefix:
        return _response_logits(model, batch, variants, stack=stack, autocast=autocast)
    groups = [list(variants)] if stack else [[v] for v in variants]
    return [
        logits
        for group in groups
        for logits in shared_prefix_logits(
            model, batch, group, precision=lambda device: forward_precision(device, autocast)
        )
    ]


def score(
    model: torch.nn.Module,
    batch: ScoringBatch,
    variants: Sequence[Mapping[str, torch.Tensor] | None] = (None,),
    *,
    temperature: float = 1.0,
    entropy: bool | Sequence[bool] = False,
    grad: bool = False,
    stack: bool = True,
    chunk_size: int | None = None,
    micro_batch_size: int | None = None,
    autocast: torch.dtype | None = None,
    shared_prefix: bool = False,
    kl_to_first: Sequence[bool] | None = None,
) -> list[Scores]:
    """Teacher-forced per-token log-probs (and entropies) of the responses, per image variant.

    Args:
        model: the policy (or reference / old policy), any supported VLM, PEFT-wrapped or not.
        batch: from :func:`build_scoring_batch` (or a ``select``-ed sub-batch).
        variants: per-prompt pixel dicts (as :func:`pixel_inputs` returns them for all of
            ``batch.prompts``), ``None`` meaning the batch's own pixels.
        temperature: the rollout temperature; logits are divided by it.
        entropy: compute full-vocabulary entropies, for all variants or one flag per variant.
        grad: keep the autograd graph (policy update); otherwise run under ``torch.no_grad``
            (not inference mode, so the results can be mixed with graph tensors later).
        stack: concatenate the variants along the batch into one forward call (faster, more
            memory); False runs one forward per variant.
        chunk_size: rows per chunk of the log-softmax/entropy reductions (default: 2**24
            floats per chunk, 2**22 on CPU).
        micro_batch_size: run the forward over at most this many sequences at a time
            (before stacking); None = all at once.
        autocast: run the model forward under ``torch.autocast`` to this dtype (e.g.
            ``torch.bfloat16`` on GPU); None = the parameters' own dtype.
        shared_prefix: run each distinct prompt (image included) once per variant and the
            responses against its KV cache (:mod:`vispo.models.prefix`) instead of repeating
            the prompt for every sequence. Same scores up to float rounding.
        kl_to_first: one flag per variant: also return the full-vocabulary KL from the first
            variant's distribution to this one's (no gradient; VPPO's visual dependency).

    Returns:
        One :class:`Scores` per variant, in order; masked positions hold 0.
    """
    if not variants:
        raise ValueError("variants must name at least one image variant (None = original)")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    flags = [entropy] * len(variants) if isinstance(entropy, bool) else list(entropy)
    if len(flags) != len(variants):
        raise ValueError(f"entropy has {len(flags)} flags for {len(variants)} variants")
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    resolved = [
        batch.prompt_pixels
        if v is None
        else check_same_geometry(batch.prompts.pixels, v, batch.layout)
        for v in variants
    ]
    size = len(batch) if micro_batch_size is None else micro_batch_size
    logps: list[list[torch.Tensor]] = [[] for _ in variants]
    kl_flags = [False] * len(variants) if kl_to_first is None else list(kl_to_first)
    if len(kl_flags) != len(variants):
        raise ValueError(f"kl_to_first has {len(kl_flags)} flags for {len(variants)} variants")
    kls: list[list[torch.Tensor]] = [[] for _ in variants]
    ents: list[list[torch.Tensor]] = [[] for _ in variants]
    context = contextlib.nullcontext() if grad else torch.no_grad()
    with context:
        for start in range(0, len(batch), size):
            stop = min(start + size, len(batch))
            sub = batch if stop - start == len(batch) else batch.select(range(start, stop))
            mask = sub.response_mask.to(_model_device(model)).bool()
            targets = sub.response_ids.to(mask.device)
            logits = _logits(model, sub, resolved, stack, autocast, shared_prefix)
            for k, variant_logits in enumerate(logits):
                kw = dict(temperature=temperature, chunk_size=chunk_size)
                if flags[k]:
                    logp, ent = logp_and_entropy(variant_logits, targets, **kw)
                    ents[k].append(torch.where(mask, ent, torch.zeros_like(ent)))
                else:
                    logp = selective_log_softmax(variant_logits, targets, **kw)
                logps[k].append(torch.where(mask, logp, torch.zeros_like(logp)))
                if kl_flags[k]:
                    kl = full_kl_from_logits(logits[0].detach(), variant_logits.detach(), **kw)
                    kls[k].append(torch.where(mask, kl, torch.zeros_like(kl)))
    return [
        Scores(
            logp=torch.cat(logps[k], dim=0),
            entropy=torch.cat(ents[k], dim=0) if flags[k] else None,
            kl=torch.cat(kls[k], dim=0) if kl_flags[k] else None,
        )
        for k in range(len(variants))
    ]
