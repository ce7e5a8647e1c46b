"""Shared helpers: accept a PIL RGB image or a uint8 HxWx3 array, return the same kind."""

from __future__ import annotations

from typing import Any, TypeAlias

import numpy as np
from PIL import Image

ImageLike: TypeAlias = Image.Image | np.ndarray


def to_array(image: ImageLike) -> tuple[np.ndarray, bool]:
    """Return ``(pixels, was_pil)``: a uint8 HxWx3 view of ``image`` that must not be written.

    Perturbations work on 8-bit RGB only; anything else (other PIL modes, other dtypes or
    layouts) is a caller error, best fixed by passing the image through ``load_image``.
    """
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(
                f"expected an RGB PIL image, got mode {image.mode!r}; convert it with "
                "vispo.vision.load_image first"
            )
        arr = np.asarray(image)
        was_pil = True
    elif isinstance(image, np.ndarray):
        arr = image
        was_pil = False
    else:
        raise TypeError(f"expected a PIL image or a NumPy array, got {type(image).__name__}")
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(
            f"expected a uint8 HxWx3 RGB array, got dtype={arr.dtype} shape={arr.shape}; "
            "convert it with vispo.vision.load_image first"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image has zero size: shape={arr.shape}")
    return arr, was_pil


def from_array(arr: np.ndarray, was_pil: bool) -> ImageLike:
    """Wrap a freshly computed uint8 HxWx3 array as the caller's type.

    ``arr`` must be a new array (not the caller's input); it is handed over, not copied.
    """
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    if was_pil:
        return Image.fromarray(arr)
    if not arr.flags.writeable:  # e.g. np.asarray of a PIL image
        arr = arr.copy()
    return arr


def image_hw(image: ImageLike) -> tuple[int, int]:
    """``(height, width)`` of a PIL image or HxWx3 array (validated like ``to_array``)."""
    if isinstance(image, Image.Image) and image.mode == "RGB":
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image has zero size: {image.width}x{image.height}")
        return image.height, image.width
    arr, _ = to_array(image)
    return arr.shape[0], arr.shape[1]


def rgb_triple(value: Any, name: str) -> tuple[int, int, int]:
    """Normalise a colour option (a grey level or an RGB triple of ints in [0, 255])."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        rgb = (int(value),) * 3
    elif isinstance(value, (tuple, list)) and len(value) == 3:
        rgb = tuple(int(v) for v in value)
    else:
        raise ValueError(f"{name} must be an int or an RGB triple, got {value!r}")
    if not all(0 <= v <= 255 for v in rgb):
        raise ValueError(f"{name} values must lie in [0, 255], got {value!r}")
    return rgb  # type: ignore[return-value]


def check_rng(rng: Any) -> np.random.Generator:
    """Return ``rng`` if it is a NumPy ``Generator``; seeds are not accepted on purpose.

    One run-level generator drives every mask and perturbation (reproducibility); silently
    accepting an int seed would make every call draw the same mask.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy.random.Generator (e.g. np.random.default_rng(seed)), "
            f"got {type(rng).__name__}"
        )
    return rng
