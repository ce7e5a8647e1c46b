"""Resize images to the pixel budget that Qwen-VL-style processors expect, once.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL processors resize every image so that both sides are
multiples of the vision patch factor (patch size x spatial merge size: 28, or 32 for
Qwen3-VL) and the pixel count lies in ``[min_pixels, max_pixels]``. vispo applies the same
rule itself, once, before any perturbation: every variant of an image (original, PAPO
mask, CPPO I+ and I-) then has the same size, the processor leaves it alone, and the
variants produce the same number of image tokens, so ``input_ids`` can be reused.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from vispo.vision._common import ImageLike, from_array, to_array

DEFAULT_FACTOR = 28
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int,
    width: int,
    *,
    factor: int = DEFAULT_FACTOR,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """Return the ``(height, width)`` a Qwen-VL processor resizes a ``height x width`` image to.

    The rule:
      1. round each side to the nearest multiple of ``factor``;
      2. if that has more than ``max_pixels`` pixels, scale both sides of the *original*
         by ``sqrt(max_pixels / (height * width))`` and round each side *down* to a
         multiple of ``factor`` (at least ``factor``);
      3. else if it has fewer than ``min_pixels``, scale by
         ``sqrt(min_pixels / (height * width))`` and round each side *up*.
    The aspect ratio is kept as closely as the rounding allows.

    Raises:
        ValueError: for non-positive sizes or budgets, or an aspect ratio over 200 (the
            processors refuse those too).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    if factor < 1 or min_pixels < 1 or max_pixels < min_pixels:
        raise ValueError(
            f"need factor >= 1 and 1 <= min_pixels <= max_pixels, got factor={factor}, "
            f"min_pixels={min_pixels}, max_pixels={max_pixels}"
        )
    aspect = max(height, width) / min(height, width)
    if aspect > MAX_ASPECT_RATIO:
        raise ValueError(
            f"aspect ratio {aspect:.1f} of a {height}x{width} image exceeds {MAX_ASPECT_RATIO}"
        )

    new_h = factor * round(height / factor)
    new_w = factor * round(width / factor)
    if new_h * new_w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        new_h = max(factor, factor * math.floor(height / shrink / factor))
        new_w = max(factor, factor * math.floor(width / shrink / factor))
    elif new_h * new_w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        new_h = factor * math.ceil(height * grow / factor)
        new_w = factor * math.ceil(width * grow / factor)
    return new_h, new_w


def resize_to_budget(
    image: ImageLike,
    *,
    factor: int = DEFAULT_FACTOR,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ImageLike:
    """Resize an RGB image (bicubic) to ``smart_resize`` of its size; same type as given.

    Do this once, before drawing perturbations, with the same ``factor``/``min_pixels``/
    ``max_pixels`` as the model's processor, so the processor's own resize is a no-op.
    Returns a copy when the size is already right; never modifies ``image``.
    """
    arr, was_pil = to_array(image)
    height, width = arr.shape[:2]
    new_h, new_w = smart_resize(
        height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels
    )
    if (new_h, new_w) == (height, width):
        return from_array(arr.copy(), was_pil)
    resized = Image.fromarray(arr).resize((new_w, new_h), Image.Resampling.BICUBIC)
    return from_array(np.asarray(resized), was_pil)
