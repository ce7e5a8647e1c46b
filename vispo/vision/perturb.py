"""Image perturbations for CPPO (algorithms.md 7.1) and NoisyRollout-style noise.

Every function here is pure (the input is never modified), keeps the image size (so the
perturbed image gives the same image tokens as the original), and draws all randomness
from a passed ``numpy.random.Generator``: the same generator state gives the same output.
Each accepts an RGB PIL image or a uint8 HxWx3 array and returns the same type.

CPPO draws, per prompt, one *information-preserving* image ``I+`` (the answer is still
visible: colour jitter, a mild perspective warp, a small rotation, optionally a blur) and
one *information-removing* image ``I-`` (content hidden: 50 noise rectangles, or a zoom
into 60-70% of the image). The constants follow the CPPO recipe, which uses torchvision;
vispo re-implements the torchvision definitions with PIL and NumPy (no torchvision
dependency). The random draws differ from torchvision's; the distributions do not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from vispo.vision._common import (
    ImageLike,
    check_rng,
    from_array,
    image_hw,
    rgb_triple,
    to_array,
)
from vispo.vision.masks import random_patch_mask, saliency_patch_mask

Perturbation = Callable[..., ImageLike]

# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma, as torchvision rounds them).
_GRAY_WEIGHTS = np.array([0.2989, 0.587, 0.114])


def _check_range(
    name: str, value: Any, low: float = 0.0, high: float = float("inf")
) -> tuple[float, float]:
    """Validate a ``(min, max)`` sampling range inside ``[low, high]``."""
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"{name} must be a (min, max) pair, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not low <= lo <= hi <= high:
        raise ValueError(f"{name} must satisfy {low} <= min <= max <= {high}, got {value!r}")
    return lo, hi


def _check_prob(name: str, value: Any) -> float:
    """Validate a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return float(value)


def _as_pil(image: ImageLike) -> tuple[Image.Image, bool]:
    """The image as an RGB PIL image (no copy when it already is one) and whether it was."""
    if isinstance(image, Image.Image):
        image_hw(image)  # raises a clear error for non-RGB or empty images
        return image, True
    arr, _ = to_array(image)
    return Image.fromarray(arr), False


def _from_pil(image: Image.Image, was_pil: bool) -> ImageLike:
    """Return a PIL result as the caller's type."""
    return image if was_pil else from_array(np.asarray(image), False)


# --------------------------------------------------------------------------------------
# Information-preserving operations (I+)
# --------------------------------------------------------------------------------------


def adjust_color(
    image: ImageLike,
    *,
    brightness: float = 1.0,
    contrast: float = 1.0,
    saturation: float = 1.0,
    order: Sequence[str] = ("brightness", "contrast", "saturation"),
) -> ImageLike:
    """Apply brightness, contrast and saturation factors (torchvision definitions).

    Each is a blend ``factor * img + (1 - factor) * other``, clamped to [0, 255]:
      * brightness: ``other`` = black;
      * contrast: ``other`` = the mean grey level of the whole image;
      * saturation: ``other`` = the pixel's own grey level
    (grey = 0.2989 R + 0.587 G + 0.114 B). A factor of 1 is the identity. The ops run in
    ``order`` in float and the result is rounded once at the end.
    """
    arr, was_pil = to_array(image)
    out = arr.astype(np.float64)
    factors = {"brightness": brightness, "contrast": contrast, "saturation": saturation}
    if sorted(order) != sorted(factors):
        raise ValueError(f"order must be a permutation of {sorted(factors)}, got {order!r}")
    for name in order:
        factor = float(factors[name])
        if factor < 0:
            raise ValueError(f"{name} factor must be >= 0, got {factor}")
        if name == "brightness":
            other: np.ndarray | float = 0.0
        elif name == "contrast":
            other = float((out @ _GRAY_WEIGHTS).mean())
        else:
            other = (out @ _GRAY_WEIGHTS)[..., None]
        out = np.clip(factor * out + (1.0 - factor) * other, 0.0, 255.0)
    return from_array(np.rint(out).astype(np.uint8), was_pil)


def color_jitter(
    image: ImageLike,
    rng: np.random.Generator,
    *,
    brightness: tuple[float, float] = (0.2, 1.3),
    contrast: tuple[float, float] = (0.2, 1.8),
    saturation: tuple[float, float] = (0.2, 1.8),
) -> ImageLike:
    """Random colour jitter: factors drawn uniformly from the ranges, applied in random order.

    Draw order: the op order (``rng.permutation(3)``), then the brightness, contrast and
    saturation factors, as torchvision's ``ColorJitter`` does.
    """
    check_rng(rng)
    ranges = {
        "brightness": _check_range("brightness", brightness),
        "contrast": _check_range("contrast", contrast),
        "saturation": _check_range("saturation", saturation),
    }
    names = list(ranges)
    order = [names[i] for i in rng.permutation(len(names))]
    factors = {name: rng.uniform(*ranges[name]) for name in names}
    return adjust_color(image, order=order, **factors)


def perspective_coefficients(
    startpoints: Sequence[Sequence[float]], endpoints: Sequence[Sequence[float]]
) -> tuple[float, ...]:
    """Coefficients ``(a, b, c, d, e, f, g, h)`` of the homography taking each endpoint to
    its startpoint: ``x_in = (a x + b y + c) / (g x + h y + 1)``,
    ``y_in = (d x + e y + f) / (g x + h y + 1)``.

    This is the output-to-input map that ``PIL.Image.transform(..., PERSPECTIVE)`` wants,
    so the image content at ``startpoints`` moves to ``endpoints``. Solves the 8x8 linear
    system given by the four point pairs.
    """
    start = np.asarray(startpoints, dtype=np.float64)
    end = np.asarray(endpoints, dtype=np.float64)
    if start.shape != (4, 2) or end.shape != (4, 2):
        raise ValueError("startpoints and endpoints must each be 4 (x, y) points")
    system = np.zeros((8, 8))
    rhs = np.zeros(8)
    for i, ((xs, ys), (xe, ye)) in enumerate(zip(start, end)):
        system[2 * i] = [xe, ye, 1, 0, 0, 0, -xs * xe, -xs * ye]
        system[2 * i + 1] = [0, 0, 0, xe, ye, 1, -ys * xe, -ys * ye]
        rhs[2 * i], rhs[2 * i + 1] = xs, ys
    try:
        coeffs = np.linalg.solve(system, rhs)
    except np.linalg.LinAlgError as err:
        raise ValueError(f"degenerate perspective points: {endpoints!r}") from err
    # Drop float noise (~1e-16): PIL truncates interpolated values to uint8, so a
    # coefficient of 0.9999999999999999 instead of 1 shifts many pixels down by one level.
    # 12 decimals keep sub-1e-8-pixel accuracy on any realistic image size.
    return tuple(float(c) for c in np.round(coeffs, 12))


def perspective(
    image: ImageLike,
    startpoints: Sequence[Sequence[float]],
    endpoints: Sequence[Sequence[float]],
    *,
    fill: int | tuple[int, int, int] = 0,
) -> ImageLike:
    """Warp ``image`` so that the four ``startpoints`` land on ``endpoints`` (bilinear).

    Points are ``(x, y)`` pixel coordinates; uncovered pixels get ``fill``.
    """
    pil, was_pil = _as_pil(image)
    coeffs = perspective_coefficients(startpoints, endpoints)
    out = pil.transform(
        pil.size,
        Image.Transform.PERSPECTIVE,
        coeffs,
        Image.Resampling.BILINEAR,
        fillcolor=rgb_triple(fill, "fill"),
    )
    return _from_pil(out, was_pil)


def random_perspective(
    image: ImageLike,
    rng: np.random.Generator,
    *,
    distortion: float = 0.2,
    p: float = 0.5,
    fill: int | tuple[int, int, int] = 0,
) -> ImageLike:
    """torchvision ``RandomPerspective(distortion_scale=0.2, p=0.5)``.

    With probability ``p`` each corner moves inwards by a random integer amount up to
    ``distortion`` times half the image side (independently in x and y); otherwise the
    image is returned unchanged (a copy). The coin is always drawn, then the 8 offsets.
    """
    check_rng(rng)
    distortion = _check_prob("distortion", distortion)
    p = _check_prob("p", p)
    height, width = image_hw(image)
    apply = rng.random() < p
    if not apply:
        arr, was_pil = to_array(image)
        return from_array(arr.copy(), was_pil)
    max_dx = int(distortion * (width // 2)) + 1
    max_dy = int(distortion * (height // 2)) + 1
    dx = rng.integers(0, max_dx, size=4)
    dy = rng.integers(0, max_dy, size=4)
    right, bottom = width - 1, height - 1
    startpoints = [(0, 0), (right, 0), (right, bottom), (0, bottom)]
    endpoints = [
        (dx[0], dy[0]),
        (right - dx[1], dy[1]),
        (right - dx[2], bottom - dy[2]),
        (dx[3], bottom - dy[3]),
    ]
    return perspective(image, startpoints, endpoints, fill=fill)


def rotate(image: ImageLike, angle: float, *, fill: int | tuple[int, int, int] = 0) -> ImageLike:
    """Rotate counter-clockwise by ``angle`` degrees about the centre (bilinear, no expand).

    Corners that rotate in from outside get ``fill`` (black by default).
    """
    pil, was_pil = _as_pil(image)
    out = pil.rotate(
        float(angle),
        resample=Image.Resampling.BILINEAR,
        expand=False,
        fillcolor=rgb_triple(fill, "fill"),
    )
    return _from_pil(out, was_pil)


def random_rotation(
    image: ImageLike,
    rng: np.random.Generator,
    *,
    degrees: float = 10.0,
    fill: int | tuple[int, int, int] = 0,
) -> ImageLike:
    """Rotate by an angle drawn from U(-degrees, degrees); no expand, black fill."""
    check_rng(rng)
    if degrees < 0:
        raise ValueError(f"degrees must be >= 0, got {degrees}")
    return rotate(image, rng.uniform(-degrees, degrees), fill=fill)


def gaussian_kernel1d(kernel_size: int, sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps at offsets ``-(k-1)/2 .. (k-1)/2`` (torchvision's)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    half = (kernel_size - 1) / 2
    x = np.linspace(-half, half, kernel_size)
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


def gaussian_blur(
    image: ImageLike,
    rng: np.random.Generator | None = None,
    *,
    kernel_size: int = 3,
    sigma: float = 1.0,
) -> ImageLike:
    """Separable Gaussian blur with reflect padding (torchvision ``gaussian_blur``).

    Deterministic; ``rng`` is accepted (and ignored) so the function fits the
    ``(image, rng)`` perturbation interface.
    """
    arr, was_pil = to_array(image)
    taps = gaussian_kernel1d(kernel_size, sigma)
    pad = kernel_size // 2
    out = arr.astype(np.float64)
    for axis in (0, 1):
        n = out.shape[axis]
        padding = [(0, 0)] * 3
        padding[axis] = (pad, pad)
        # "reflect" (torchvision's mode) needs more pixels than the pad; tiny images fall
        # back to "symmetric", which repeats the edge pixel.
        padded = np.pad(out, padding, mode="reflect" if n > pad else "symmetric")
        out = sum(w * np.take(padded, np.arange(i, i + n), axis=axis) for i, w in enumerate(taps))
    return from_array(np.clip(np.rint(out), 0, 255).astype(np.uint8), was_pil)


INFO_PRESERVING_OPS: tuple[str, ...] = ("color_jitter", "perspective", "rotation")


def info_preserving(
    image: ImageLike, rng: np.random.Generator, *, include_blur: bool = False
) -> tuple[ImageLike, str]:
    """CPPO's ``I+``: one of colour jitter, random perspective (p=0.5), random rotation
    (and Gaussian blur when ``include_blur``), chosen uniformly. Returns ``(image, op_name)``.
    """
    check_rng(rng)
    ops = INFO_PRESERVING_OPS + (("blur",) if include_blur else ())
    name = ops[int(rng.integers(len(ops)))]
    return PERTURBATIONS[name](image, rng), name


# --------------------------------------------------------------------------------------
# Information-removing operations (I-)
# --------------------------------------------------------------------------------------


def random_occlusion(
    image: ImageLike,
    rng: np.random.Generator,
    *,
    n_rects: int = 50,
    size_range: tuple[float, float] = (0.05, 0.15),
) -> ImageLike:
    """Paint ``n_rects`` rectangles of uniform RGB noise at uniform positions.

    Each rectangle has width ``round(U(size_range) * W)`` and height
    ``round(U(size_range) * H)`` (at least 1 pixel), lies fully inside the image, and may
    overlap the others. Per rectangle the draws are: width fraction, height fraction,
    x, y, then the noise pixels.
    """
    check_rng(rng)
    if n_rects < 0:
        raise ValueError(f"n_rects must be >= 0, got {n_rects}")
    lo, hi = _check_range("size_range", size_range, 0.0, 1.0)
    arr, was_pil = to_array(image)
    height, width = arr.shape[:2]
    out = arr.copy()
    for _ in range(n_rects):
        w = min(width, max(1, round(rng.uniform(lo, hi) * width)))
        h = min(height, max(1, round(rng.uniform(lo, hi) * height)))
        x0 = int(rng.integers(0, width - w + 1))
        y0 = int(rng.integers(0, height - h + 1))
        out[y0 : y0 + h, x0 : x0 + w] = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return from_array(out, was_pil)


def zoom_crop(
    image: ImageLike,
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] = (0.6, 0.7),
) -> ImageLike:
    """Crop a random window and resize it back to the full size (bilinear).

    The window's sides are ``round(s * W)`` and ``round(s * H)`` with one side factor
    ``s ~ U(scale)``; its position is uniform. Draws: ``s``, x, y.
    """
    check_rng(rng)
    lo, hi = _check_range("scale", scale, 0.0, 1.0)
    if lo <= 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    pil, was_pil = _as_pil(image)
    width, height = pil.size
    s = rng.uniform(lo, hi)
    crop_w = min(width, max(1, round(s * width)))
    crop_h = min(height, max(1, round(s * height)))
    x0 = int(rng.integers(0, width - crop_w + 1))
    y0 = int(rng.integers(0, height - crop_h + 1))
    box = (x0, y0, x0 + crop_w, y0 + crop_h)
    out = pil.resize((width, height), Image.Resampling.BILINEAR, box=box)
    return _from_pil(out, was_pil)


INFO_REMOVING_OPS: tuple[str, ...] = ("occlusion", "zoom_crop")


def info_removing(image: ImageLike, rng: np.random.Generator) -> tuple[ImageLike, str]:
    """CPPO's ``I-``: occlusion or zoom-crop, chosen uniformly. Returns ``(image, op_name)``."""
    check_rng(rng)
    name = INFO_REMOVING_OPS[int(rng.integers(len(INFO_REMOVING_OPS)))]
    return PERTURBATIONS[name](image, rng), name


# --------------------------------------------------------------------------------------
# Noise (NoisyRollout-style)
# --------------------------------------------------------------------------------------


def gaussian_noise(
    image: ImageLike, rng: np.random.Generator, *, strength: float = 0.1
) -> ImageLike:
    """Add i.i.d. N(0, (255 * strength)^2) noise to every pixel and channel, round, clip.

    ``strength=0`` returns an identical copy (and draws nothing).
    """
    check_rng(rng)
    if not strength >= 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    arr, was_pil = to_array(image)
    if strength == 0:
        return from_array(arr.copy(), was_pil)
    noisy = arr + rng.normal(0.0, 255.0 * strength, size=arr.shape)
    return from_array(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), was_pil)


# --------------------------------------------------------------------------------------
# Registry and batch helper
# --------------------------------------------------------------------------------------


def _mask(image: ImageLike, rng: np.random.Generator, **opts: Any) -> ImageLike:
    return random_patch_mask(image, rng=rng, **opts)


def _saliency_mask(image: ImageLike, rng: np.random.Generator, **opts: Any) -> ImageLike:
    return saliency_patch_mask(image, rng=rng, **opts)


def _cppo_pos(image: ImageLike, rng: np.random.Generator, **opts: Any) -> ImageLike:
    return info_preserving(image, rng, **opts)[0]


def _cppo_neg(image: ImageLike, rng: np.random.Generator, **opts: Any) -> ImageLike:
    return info_removing(image, rng, **opts)[0]


# name -> callable(image, rng, **opts) -> image, so a config can name a perturbation.
PERTURBATIONS: dict[str, Perturbation] = {
    "mask": _mask,
    "saliency_mask": _saliency_mask,
    "cppo_pos": _cppo_pos,
    "cppo_neg": _cppo_neg,
    "noise": gaussian_noise,
    "color_jitter": color_jitter,
    "perspective": random_perspective,
    "rotation": random_rotation,
    "blur": gaussian_blur,
    "occlusion": random_occlusion,
    "zoom_crop": zoom_crop,
}


def get_perturbation(name: str) -> Perturbation:
    """Look up a perturbation by name, with an error listing the known names."""
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}; available: {sorted(PERTURBATIONS)}")
    return PERTURBATIONS[name]


def apply_to_images(
    fn: Callable[..., ImageLike],
    images: Sequence[ImageLike],
    rng: np.random.Generator,
    **opts: Any,
) -> list[ImageLike]:
    """Apply ``fn(image, rng, **opts)`` to each image of a multi-image prompt, in order.

    One generator stream serves all images, so the result depends only on the generator
    state and the image order.
    """
    check_rng(rng)
    if isinstance(images, (Image.Image, np.ndarray)) or not isinstance(images, Sequence):
        raise TypeError(
            f"images must be a list of images, got {type(images).__name__}; "
            "wrap a single image in a list"
        )
    return [fn(image, rng, **opts) for image in images]
