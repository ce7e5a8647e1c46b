"""PAPO's masked image ``I_mask`` (algorithms.md 6.1) and pluggable mask strategies.

The image is cut into a raster grid of ``patch_size x patch_size`` pixel blocks starting at
the top-left corner; blocks on the right and bottom edges are clipped to the image. Each
block is blacked out (every channel set to ``fill``) independently with probability
``ratio`` (Bernoulli per block, the PAPO reference behaviour), or, with ``exact=True``,
exactly ``round(ratio * n_blocks)`` blocks are chosen without replacement.

Masking happens on the raw RGB image, before the processor, so the masked image has the
same size as the original: same image tokens, same ``input_ids``, same position ids.
(Masking the processor's flattened ``pixel_values`` instead is the bug that made TRL's PAPO
trainer silently do nothing on Qwen.)

A mask *strategy* is any callable ``(image, rng) -> image``. ``MASK_STRATEGIES`` maps a
name to a factory that builds one from keyword options; ``get_mask_strategy`` looks one up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from vispo.vision._common import (
    ImageLike,
    check_rng,
    from_array,
    image_hw,
    rgb_triple,
    to_array,
)

MaskStrategy = Callable[[ImageLike, np.random.Generator], ImageLike]
Fill = int | tuple[int, int, int]


def _check_mask_args(patch_size: Any, ratio: Any) -> None:
    """Validate the options shared by every block-mask strategy."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)):
        raise TypeError(f"patch_size must be an int, got {patch_size!r}")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.floating)):
        raise TypeError(f"ratio must be a number in [0, 1], got {ratio!r}")
    if not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"ratio must lie in [0, 1], got {ratio}")


def patch_grid_shape(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Number of block rows and columns covering ``height x width`` (edge blocks clipped)."""
    return -(-height // patch_size), -(-width // patch_size)


def draw_block_mask(
    grid_shape: tuple[int, int],
    *,
    ratio: float,
    rng: np.random.Generator,
    exact: bool = False,
) -> np.ndarray:
    """Draw which blocks to mask: a bool array of ``grid_shape``, True = masked.

    Bernoulli mode draws ``rng.random(grid_shape) < ratio`` (raster order); exact mode
    masks ``round(ratio * n_blocks)`` blocks (Python's ``round``: halves go to even) picked
    by ``rng.choice(n_blocks, k, replace=False)``.
    """
    rng = check_rng(rng)
    n_blocks = grid_shape[0] * grid_shape[1]
    if not exact:
        return rng.random(grid_shape) < ratio
    k = round(ratio * n_blocks)
    flat = np.zeros(n_blocks, dtype=bool)
    flat[rng.choice(n_blocks, size=k, replace=False)] = True
    return flat.reshape(grid_shape)


def expand_block_mask(
    block_mask: np.ndarray, height: int, width: int, patch_size: int
) -> np.ndarray:
    """Turn a block mask into a ``height x width`` pixel mask (edge blocks clipped)."""
    pixels = np.repeat(np.repeat(block_mask, patch_size, axis=0), patch_size, axis=1)
    return pixels[:height, :width]


def apply_block_mask(
    image: ImageLike, block_mask: np.ndarray, *, patch_size: int, fill: Fill = 0
) -> ImageLike:
    """Set every pixel of the masked blocks to ``fill``; returns a new image of the same type."""
    arr, was_pil = to_array(image)
    height, width = arr.shape[:2]
    expected = patch_grid_shape(height, width, patch_size)
    if block_mask.shape != expected:
        raise ValueError(
            f"block_mask has shape {block_mask.shape}, expected {expected} for a "
            f"{height}x{width} image with patch_size={patch_size}"
        )
    out = arr.copy()
    out[expand_block_mask(block_mask, height, width, patch_size)] = rgb_triple(fill, "fill")
    return from_array(out, was_pil)


def random_patch_mask(
    image: ImageLike,
    *,
    patch_size: int = 14,
    ratio: float = 0.6,
    fill: Fill = 0,
    rng: np.random.Generator,
    exact: bool = False,
) -> ImageLike:
    """PAPO's random patch mask (algorithms.md 6.1); returns a new image of the same type.

    Args:
        image: RGB PIL image or uint8 HxWx3 array (not modified).
        patch_size: block side in pixels (14, the Qwen-VL ViT patch, by default).
        ratio: probability that a block is masked (exact mode: fraction of blocks).
            The PAPO ablation found 0.6-0.8 best; 1.0 (all black) worst.
        fill: value written to every channel of masked pixels (or an RGB triple).
        rng: the run's NumPy generator; the same generator state gives the same mask.
        exact: mask exactly ``round(ratio * n_blocks)`` blocks instead of Bernoulli.
    """
    _check_mask_args(patch_size, ratio)
    check_rng(rng)
    rgb_triple(fill, "fill")
    grid = patch_grid_shape(*image_hw(image), patch_size)
    block_mask = draw_block_mask(grid, ratio=float(ratio), rng=rng, exact=exact)
    return apply_block_mask(image, block_mask, patch_size=patch_size, fill=fill)


def block_gradient_energy(image: ImageLike, patch_size: int) -> np.ndarray:
    """Mean squared luminance gradient of each block, shape ``patch_grid_shape(...)``.

    Luminance is ITU-R 601 (0.299 R + 0.587 G + 0.114 B); gradients are forward
    differences (zero past the last row/column). Edge blocks are averaged over their
    clipped area, so a small edge block is not favoured or penalised for its size.
    """
    arr, _ = to_array(image)
    lum = arr.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    gx = np.zeros_like(lum)
    gy = np.zeros_like(lum)
    gx[:, :-1] = np.diff(lum, axis=1)
    gy[:-1, :] = np.diff(lum, axis=0)
    energy = gx**2 + gy**2
    height, width = lum.shape
    rows = np.arange(0, height, patch_size)
    cols = np.arange(0, width, patch_size)
    sums = np.add.reduceat(np.add.reduceat(energy, rows, axis=0), cols, axis=1)
    counts = np.add.reduceat(np.add.reduceat(np.ones_like(energy), rows, axis=0), cols, axis=1)
    return sums / counts


def saliency_patch_mask(
    image: ImageLike,
    *,
    patch_size: int = 14,
    ratio: float = 0.6,
    fill: Fill = 0,
    rng: np.random.Generator,
) -> ImageLike:
    """Example *semantic* strategy: mask the ``round(ratio * n_blocks)`` most detailed blocks.

    Detail is the block's mean squared luminance gradient (``block_gradient_energy``),
    a cheap stand-in for "where the content is". Ties (e.g. flat regions) are broken
    uniformly at random with ``rng``. This is an illustration of the strategy interface:
    the PAPO ablation found random masking better than semantic masking.
    """
    _check_mask_args(patch_size, ratio)
    check_rng(rng)
    rgb_triple(fill, "fill")
    energy = block_gradient_energy(image, patch_size).ravel()
    n_blocks = energy.size
    k = round(float(ratio) * n_blocks)
    shuffled = rng.permutation(n_blocks)  # random tie-breaking
    ranked = shuffled[np.argsort(-energy[shuffled], kind="stable")]
    flat = np.zeros(n_blocks, dtype=bool)
    flat[ranked[:k]] = True
    grid = patch_grid_shape(*image_hw(image), patch_size)
    return apply_block_mask(image, flat.reshape(grid), patch_size=patch_size, fill=fill)


def _random_factory(
    *, patch_size: int = 14, ratio: float = 0.6, fill: Fill = 0, exact: bool = False
) -> MaskStrategy:
    """Build the ``"random"`` strategy (PAPO's default mask)."""
    _check_mask_args(patch_size, ratio)
    rgb_triple(fill, "fill")

    def strategy(image: ImageLike, rng: np.random.Generator) -> ImageLike:
        return random_patch_mask(
            image, patch_size=patch_size, ratio=ratio, fill=fill, rng=rng, exact=exact
        )

    return strategy


def _saliency_factory(*, patch_size: int = 14, ratio: float = 0.6, fill: Fill = 0) -> MaskStrategy:
    """Build the ``"saliency"`` example strategy."""
    _check_mask_args(patch_size, ratio)
    rgb_triple(fill, "fill")

    def strategy(image: ImageLike, rng: np.random.Generator) -> ImageLike:
        return saliency_patch_mask(image, patch_size=patch_size, ratio=ratio, fill=fill, rng=rng)

    return strategy


# name -> factory(**options) -> strategy(image, rng) -> image.
# Register a custom strategy by adding a factory here.
MASK_STRATEGIES: dict[str, Callable[..., MaskStrategy]] = {
    "random": _random_factory,
    "saliency": _saliency_factory,
}


def get_mask_strategy(name: str, **kwargs: Any) -> MaskStrategy:
    """Build the mask strategy registered as ``name`` with options ``kwargs``.

    Options are validated here, so a bad config fails before any compute.
    """
    if name not in MASK_STRATEGIES:
        raise ValueError(f"unknown mask strategy {name!r}; available: {sorted(MASK_STRATEGIES)}")
    try:
        return MASK_STRATEGIES[name](**kwargs)
    except TypeError as err:
        raise TypeError(f"mask strategy {name!r}: {err}") from err
