"""How each architecture lays out its processor outputs along the batch, and how to index them.

Processors return pixel inputs in different layouts, and getting this wrong is silent (TRL's
PAPO trainer masked Qwen's flattened ``pixel_values`` as if they were per-sample images, which
did nothing). vispo names the layout of every key once, per architecture:

- ``per_sample``: leading dim = prompts (Idefics3/SmolVLM ``pixel_values [P, N, C, H, W]``,
  padded with all-zero images up to the largest image count ``N``).
- ``per_image``: leading dim = images of all prompts, concatenated in prompt order
  (Qwen ``image_grid_thw [n_images, 3]``).
- ``per_patch``: leading dim = patch rows of all images, concatenated in image order; the
  rows of image ``i`` are ``prod(counts_key[i])`` (Qwen ``pixel_values [sum t*h*w, C*T*P*P]``).
- ``per_token``: ``[P, L]`` aligned with ``input_ids`` (Qwen ``mm_token_type_ids``), padded
  like the text.

:func:`index_pixels` gathers the pixel inputs of any list of samples (repeats allowed), and
:func:`concat_pixels` stacks several pixel dicts along the batch, both correct for every
layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class PixelLayout:
    """Which processor-output keys are laid out how (see the module docstring)."""

    name: str
    per_sample: tuple[str, ...] = ()
    per_image: tuple[str, ...] = ()
    per_patch: tuple[str, ...] = ()
    patch_counts_key: str | None = None  # per-image key whose row product = patch rows
    per_token: tuple[str, ...] = ()
    # True: the model derives its own (multimodal) position ids from input_ids and the
    # attention mask (Qwen M-RoPE). False: vispo passes 1-D positions from the attention mask,
    # exactly as `generate` does, so scoring and generation see the same positions.
    model_positions: bool = False

    @property
    def pixel_keys(self) -> tuple[str, ...]:
        return self.per_sample + self.per_image + self.per_patch


QWEN_LAYOUT = PixelLayout(
    name="qwen",
    per_image=("image_grid_thw",),
    per_patch=("pixel_values",),
    patch_counts_key="image_grid_thw",
    per_token=("mm_token_type_ids",),
    model_positions=True,
)
IDEFICS3_LAYOUT = PixelLayout(
    name="idefics3",
    per_sample=("pixel_values", "pixel_attention_mask"),
    per_token=("mm_token_type_ids",),
)

# Keyed by processor class name (any class in the processor's MRO).
LAYOUTS_BY_PROCESSOR: dict[str, PixelLayout] = {
    "Qwen2VLProcessor": QWEN_LAYOUT,
    "Qwen2_5_VLProcessor": QWEN_LAYOUT,
    "Qwen3VLProcessor": QWEN_LAYOUT,
    "Idefics3Processor": IDEFICS3_LAYOUT,
    "SmolVLMProcessor": IDEFICS3_LAYOUT,
}


def register_layout(processor_class_name: str, layout: PixelLayout) -> None:
    """Teach vispo the layout of another processor class (e.g. a new architecture)."""
    LAYOUTS_BY_PROCESSOR[processor_class_name] = layout


def layout_for(processor) -> PixelLayout:
    """The :class:`PixelLayout` of `processor` (looked up along its class hierarchy)."""
    for cls in type(processor).__mro__:
        if cls.__name__ in LAYOUTS_BY_PROCESSOR:
            return LAYOUTS_BY_PROCESSOR[cls.__name__]
    raise ValueError(
        f"no pixel layout known for processor {type(processor).__name__}; known: "
        f"{sorted(LAYOUTS_BY_PROCESSOR)} (add one with vispo.models.layout.register_layout)"
    )


def _image_ranges(num_images: Sequence[int]) -> list[range]:
    """Image indices of each sample, given per-sample image counts."""
    ranges, start = [], 0
    for count in num_images:
        ranges.append(range(start, start + count))
        start += count
    return ranges


def index_pixels(
    pixels: Mapping[str, torch.Tensor],
    layout: PixelLayout,
    num_images: Sequence[int],
    index: Sequence[int] | torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Pixel inputs of samples ``index`` (in that order, repeats allowed).

    Args:
        pixels: pixel inputs of ``len(num_images)`` samples, laid out as `layout` says.
        layout: the architecture's layout.
        num_images: images per sample of `pixels`.
        index: which samples to take.

    Returns an empty dict when the chosen samples have no image at all.
    """
    index = [int(i) for i in (index.tolist() if torch.is_tensor(index) else index)]
    n = len(num_images)
    if any(i < 0 or i >= n for i in index):
        raise IndexError(f"sample index out of range for {n} samples: {index}")
    image_ranges = _image_ranges(num_images)
    image_index = [j for i in index for j in image_ranges[i]]
    if not image_index:
        return {}  # text-only samples: the model must get no pixel inputs at all
    out: dict[str, torch.Tensor] = {}
    for key, value in pixels.items():
        if key in layout.per_sample:
            out[key] = value[torch.as_tensor(index, dtype=torch.long, device=value.device)]
        elif key in layout.per_image:
            out[key] = value[torch.as_tensor(image_index, dtype=torch.long, device=value.device)]
        elif key in layout.per_patch:
            counts = pixels[layout.patch_counts_key].prod(-1).to(value.device)
            starts = torch.cumsum(counts, 0) - counts
            chosen = torch.as_tensor(image_index, dtype=torch.long, device=value.device)
            lengths = counts[chosen]
            # rows of image j are starts[j] ... starts[j] + counts[j] - 1, image after image
            offsets = torch.arange(int(lengths.sum()), device=value.device)
            offsets = offsets - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
            rows = torch.repeat_interleave(starts[chosen], lengths) + offsets
            out[key] = value[rows]
        else:
            raise KeyError(f"pixel key {key!r} has no layout in {layout.name!r}")
    return out


def _pad_dim1(value: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad dim 1 (the image slot of per-sample layouts) up to `size`."""
    missing = size - value.shape[1]
    if missing == 0:
        return value
    pad = [0, 0] * (value.dim() - 2) + [0, missing]
    return F.pad(value, pad)


def concat_pixels(
    parts: Sequence[Mapping[str, torch.Tensor]], layout: PixelLayout
) -> dict[str, torch.Tensor]:
    """Concatenate the pixel inputs of consecutive sample groups along the batch.

    Per-sample tensors with different image slot counts (dim 1) are zero-padded, which is how
    the Idefics3 processor itself pads (all-zero images are dropped by the model).
    """
    if not parts:
        return {}
    keys = set(parts[0])
    for part in parts[1:]:
        if set(part) != keys:
            raise ValueError(f"pixel dicts have different keys: {sorted(keys)} vs {sorted(part)}")
    out: dict[str, torch.Tensor] = {}
    for key in parts[0]:
        values = [part[key] for part in parts]
        if key in layout.per_sample and values[0].dim() >= 2:
            slots = max(v.shape[1] for v in values)
            values = [_pad_dim1(v, slots) for v in values]
        out[key] = torch.cat(values, dim=0)
    return out
