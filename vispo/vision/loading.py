"""Load any image a dataset can hand us and return a plain 8-bit RGB PIL image.

Datasets deliver images as file paths, raw bytes, PIL images, NumPy arrays, or the
``{"bytes": ..., "path": ...}`` dicts that Hugging Face ``datasets`` produces from parquet
(the PAPO reference code crashes on those). Every later stage (resizing, perturbation, the
processor) wants one thing: an RGB image whose pixels are fully decoded. ``load_image`` is
the single gate that turns all of the above into that, and turns every way it can fail
(missing file, truncated or corrupt data, zero size, decompression bomb, unsupported array)
into one exception type, :class:`ImageLoadError`, whose message names the sample.

Conversions (all documented because each one silently goes wrong with plain
``Image.convert("RGB")``):

* palette (``P``/``PA``) with transparency and ``LA``/``RGBA``/``RGBa`` are composited on a
  background (white by default) instead of having their alpha dropped, which would reveal
  whatever colour happens to sit under transparent pixels;
* 16-bit images (``I;16*``, ``I``) are scaled from [0, 65535] to [0, 255]; PIL would clip
  every value above 255 to white;
* ``F`` (float) images are read as intensities in [0, 1], like float arrays;
* ``CMYK``, ``YCbCr``, ``L``, ``1`` etc. go through PIL's own conversion;
* the EXIF orientation tag is applied (``ImageOps.exif_transpose``), so a phone photo is
  upright, as a human annotator saw it.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from vispo.vision._common import rgb_triple

# 8192 x 8192 pixels (~200 MB as RGB). Larger images are refused before decoding: no
# VLM input needs them (Qwen-VL's default budget is ~1M pixels) and a malicious or broken
# header can otherwise make the decoder allocate gigabytes.
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192

Background = int | tuple[int, int, int]

# Exceptions that PIL's decoders raise on bad data. PIL has no common base class for them.
_DECODE_ERRORS = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    SyntaxError,  # raised by several plugins on malformed headers
    ValueError,
    EOFError,
    IndexError,
    struct.error,
    zlib.error,
    MemoryError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,  # turned into an exception by the filter below
)


class ImageLoadError(ValueError):
    """An image could not be loaded or validated.

    The message names the sample (``sample_id``, or the source when no id was given) and
    the cause. The attributes ``sample_id`` and ``cause`` hold the same information for
    programs that want to log or skip the sample.
    """

    def __init__(self, cause: str, *, sample_id: Any = None, source: str | None = None):
        self.cause = cause
        self.sample_id = sample_id
        self.source = source
        where = f"sample {sample_id!r}" if sample_id is not None else "image"
        if source is not None:
            where += f" ({source})"
        super().__init__(f"{where}: {cause}")


def load_image(
    src: Any,
    *,
    sample_id: Any = None,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    background: Background = (255, 255, 255),
) -> Image.Image:
    """Load ``src`` and return a fully decoded, upright, 8-bit ``RGB`` PIL image.

    Args:
        src: a path (``str`` or ``os.PathLike``), encoded bytes (``bytes``, ``bytearray``,
            ``memoryview``), a ``PIL.Image.Image``, a NumPy array (``HxW``, ``HxWx1``,
            ``HxWx3`` or ``HxWx4``; dtype ``uint8``, ``uint16`` or float with values in
            [0, 1]), or a Hugging Face ``{"bytes": b | None, "path": p | None}`` dict
            (bytes win when both are present).
        sample_id: identifier put in error messages so a bad sample can be found.
        max_pixels: refuse images with more than this many pixels, checked on the header
            before decoding; ``None`` disables this check (PIL's own global limit,
            ``PIL.Image.MAX_IMAGE_PIXELS``, still applies and also raises ImageLoadError).
        background: colour (grey level or RGB triple) under transparent pixels.

    Returns:
        A new image; ``src`` is never modified.

    Raises:
        ImageLoadError: for missing, empty, truncated, corrupt, zero-size or too large
            images and for unsupported input types or array layouts.
    """
    bg = rgb_triple(background, "background")
    if max_pixels is not None and (not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1):
        raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")

    if isinstance(src, Mapping):
        src, source = _unpack_hf_dict(src, sample_id)
    else:
        source = None

    if isinstance(src, Image.Image):
        _check_size(src.size, max_pixels, sample_id, source or "PIL image")
        return _decode(src, bg, sample_id, source or "PIL image")
    if isinstance(src, np.ndarray):
        return _from_array(src, bg, max_pixels, sample_id)
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        source = source or f"{len(data)} bytes"
        if not data:
            raise ImageLoadError("empty image data (0 bytes)", sample_id=sample_id, source=source)
        return _open_and_decode(io.BytesIO(data), bg, max_pixels, sample_id, source)
    if isinstance(src, (str, os.PathLike)):
        if str(src).startswith(("http://", "https://")):
            raise ImageLoadError(
                "URLs are not fetched (vispo never downloads at run time); "
                "download the file and pass its path",
                sample_id=sample_id,
                source=str(src),
            )
        path = Path(src)
        source = str(path)
        if not path.is_file():
            raise ImageLoadError("file not found", sample_id=sample_id, source=source)
        if path.stat().st_size == 0:
            raise ImageLoadError("empty file (0 bytes)", sample_id=sample_id, source=source)
        return _open_and_decode(path, bg, max_pixels, sample_id, source)
    raise ImageLoadError(
        f"unsupported image source type {type(src).__name__}; expected a path, bytes, "
        "a PIL image, a NumPy array or a {'bytes', 'path'} dict",
        sample_id=sample_id,
    )


def _unpack_hf_dict(d: Mapping, sample_id: Any) -> tuple[Any, str]:
    """Pick the payload of a Hugging Face ``{"bytes", "path"}`` image dict."""
    if "bytes" not in d and "path" not in d:
        raise ImageLoadError(
            f"image dict has neither 'bytes' nor 'path' (keys: {sorted(map(str, d))})",
            sample_id=sample_id,
        )
    data, path = d.get("bytes"), d.get("path")
    if data is not None:
        return data, f"dict bytes, path={path!r}"
    if path is not None:
        return path, str(path)
    raise ImageLoadError("image dict has bytes=None and path=None", sample_id=sample_id)


def _check_size(size: tuple[int, int], max_pixels: int | None, sample_id: Any, source: str) -> None:
    """Reject zero-size images and images over the pixel limit (from the header alone)."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageLoadError(
            f"zero-size image (width {width}, height {height})", sample_id=sample_id, source=source
        )
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels} (decompression-bomb guard; raise max_pixels if it is genuine)",
            sample_id=sample_id,
            source=source,
        )


def _open_and_decode(
    fp: Path | io.BytesIO,
    bg: tuple[int, int, int],
    max_pixels: int | None,
    sample_id: Any,
    source: str,
) -> Image.Image:
    """Open encoded data, check the header size, then decode fully and convert."""
    try:
        with warnings.catch_warnings():
            # PIL warns (rather than raises) between MAX_IMAGE_PIXELS and twice that.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as im:
                _check_size(im.size, max_pixels, sample_id, source)
                return _decode(im, bg, sample_id, source)
    except ImageLoadError:
        raise
    except _DECODE_ERRORS as err:
        raise ImageLoadError(
            f"cannot decode image: {type(err).__name__}: {err}",
            sample_id=sample_id,
            source=source,
        ) from err


def _decode(im: Image.Image, bg: tuple[int, int, int], sample_id: Any, source: str) -> Image.Image:
    """Fully decode ``im`` (detects truncation), apply EXIF orientation, convert to RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
            upright = ImageOps.exif_transpose(im)  # always a new image
            assert upright is not None  # only None with in_place=True
            return _to_rgb(upright, bg)
    except _DECODE_ERRORS as err:
        raise ImageLoadError(
            f"cannot decode image: {type(err).__name__}: {err}",
            sample_id=sample_id,
            source=source,
        ) from err


def _composite(rgba: np.ndarray, bg: tuple[int, int, int]) -> np.ndarray:
    """Alpha-composite a uint8 HxWx4 array over an opaque background colour.

    ``out = (fg * a + bg * (255 - a)) / 255``, rounded half up, per channel.
    """
    fg = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:4].astype(np.uint32)
    back = np.asarray(bg, dtype=np.uint32)
    out = (fg * alpha + back * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


def _to_rgb(im: Image.Image, bg: tuple[int, int, int]) -> Image.Image:
    """Convert a decoded PIL image of any mode to an 8-bit RGB image (a new object)."""
    mode = im.mode
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
        mode in ("P", "L", "RGB") and "transparency" in im.info
    )
    if has_alpha:
        rgba = np.asarray(im.convert("RGBA"))
        return Image.fromarray(_composite(rgba, bg))
    if mode == "RGB":
        return im.copy()
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        gray = np.asarray(im, dtype=np.float64) / 257.0  # 65535 -> 255
        return _gray_to_rgb(np.clip(np.rint(gray), 0, 255).astype(np.uint8))
    if mode == "F":
        gray = np.asarray(im, dtype=np.float64)
        if not np.isfinite(gray).all():
            raise ValueError("float image contains NaN or infinity")
        return _gray_to_rgb(np.clip(np.rint(gray * 255.0), 0, 255).astype(np.uint8))
    return im.convert("RGB")


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    """Stack an HxW uint8 array into an RGB image."""
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))


def _from_array(
    arr: np.ndarray, bg: tuple[int, int, int], max_pixels: int | None, sample_id: Any
) -> Image.Image:
    """Convert a NumPy image array (see ``load_image``) to an RGB PIL image."""
    source = f"array shape={arr.shape} dtype={arr.dtype}"
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ImageLoadError(
            "array must be HxW, HxWx1, HxWx3 or HxWx4", sample_id=sample_id, source=source
        )
    _check_size((arr.shape[1], arr.shape[0]), max_pixels, sample_id, source)

    if arr.dtype == np.uint8:
        u8 = arr
    elif arr.dtype == np.uint16:
        u8 = np.rint(arr / 257.0).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        values = arr.astype(np.float64)
        if not np.isfinite(values).all():
            raise ImageLoadError(
                "float array contains NaN or infinity", sample_id=sample_id, source=source
            )
        if values.min() < 0.0 or values.max() > 1.0:
            raise ImageLoadError(
                f"float array values must lie in [0, 1], got [{values.min()}, {values.max()}]",
                sample_id=sample_id,
                source=source,
            )
        u8 = np.rint(values * 255.0).astype(np.uint8)
    else:
        raise ImageLoadError(
            "unsupported array dtype; use uint8, uint16 or float in [0, 1]",
            sample_id=sample_id,
            source=source,
        )

    if u8.ndim == 2:
        return _gray_to_rgb(u8)
    if u8.shape[2] == 4:
        return Image.fromarray(_composite(u8, bg))
    return Image.fromarray(np.ascontiguousarray(u8).copy())
