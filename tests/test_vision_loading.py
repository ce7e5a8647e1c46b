"""Tests for vispo.vision loading and resizing.

Malformed files are built in a tmp dir (truncated PNG/JPEG, random bytes, empty file, PNG
headers claiming huge sizes written chunk by chunk). Expected pixels are computed by hand
or by an independent route (NumPy rotation of the raw decode, transformers' smart_resize).
"""

from __future__ import annotations

import ast
import importlib.util
import io
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vispo.vision import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageLoadError,
    load_image,
    resize_to_budget,
    smart_resize,
)

# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """A PNG file written by hand: IHDR, one IDAT holding zlib(raw), IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(5, 6, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------
# every input kind
# --------------------------------------------------------------------------------------


def test_every_source_kind_gives_the_same_pixels(tmp_path: Path, rgb: np.ndarray):
    png = _encode(Image.fromarray(rgb), "PNG")  # lossless: every route must give `rgb`
    path = tmp_path / "img.png"
    path.write_bytes(png)
    sources = {
        "str path": str(path),
        "Path": path,
        "bytes": png,
        "bytearray": bytearray(png),
        "memoryview": memoryview(png),
        "PIL": Image.fromarray(rgb),
        "lazy PIL": Image.open(path),
        "array": rgb,
        "hf dict bytes": {"bytes": png, "path": "ignored.png"},
        "hf dict path": {"bytes": None, "path": str(path)},
    }
    for name, src in sources.items():
        out = load_image(src, sample_id=name)
        assert isinstance(out, Image.Image), name
        assert out.size == (6, 5), name
        np.testing.assert_array_equal(_pixels(out), rgb, err_msg=name)


def test_gray_arrays_are_replicated_to_three_channels():
    gray = np.array([[0, 17], [200, 255]], dtype=np.uint8)
    expected = np.stack([gray] * 3, axis=-1)
    np.testing.assert_array_equal(_pixels(load_image(gray)), expected)
    np.testing.assert_array_equal(_pixels(load_image(gray[..., None])), expected)


def test_uint16_and_float_arrays_are_scaled_to_8_bit():
    u16 = np.array([[0, 257 * 100, 65535, 1000]], dtype=np.uint16)
    # 1000 / 257 = 3.89 -> 4
    np.testing.assert_array_equal(_pixels(load_image(u16))[..., 0], [[0, 100, 255, 4]])
    floats = np.array([[0.0, 0.5, 1.0, 0.2]], dtype=np.float32)
    # 0.5 * 255 = 127.5 -> 128 (round half to even); 0.2 * 255 = 51
    np.testing.assert_array_equal(_pixels(load_image(floats))[..., 1], [[0, 128, 255, 51]])
    rgb_f = np.full((2, 2, 3), 0.4, dtype=np.float64)
    np.testing.assert_array_equal(_pixels(load_image(rgb_f)), np.full((2, 2, 3), 102))


def test_rgba_array_is_composited_on_the_background():
    rgba = np.array([[[200, 100, 0, 51], [10, 20, 30, 255], [10, 20, 30, 0]]], dtype=np.uint8)
    # (fg * a + bg * (255 - a)) / 255 with a = 51, bg = 255: (10200 + 52020) / 255 = 244, ...
    expected_white = [[[244, 224, 204], [10, 20, 30], [255, 255, 255]]]
    np.testing.assert_array_equal(_pixels(load_image(rgba)), expected_white)
    expected_black = [[[40, 20, 0], [10, 20, 30], [0, 0, 0]]]
    np.testing.assert_array_equal(_pixels(load_image(rgba, background=0)), expected_black)
    expected_green = [[[40, 224, 0], [10, 20, 30], [0, 255, 0]]]
    np.testing.assert_array_equal(_pixels(load_image(rgba, background=(0, 255, 0))), expected_green)


# --------------------------------------------------------------------------------------
# PIL modes and file formats
# --------------------------------------------------------------------------------------


def test_simple_pil_modes_convert_like_pil():
    gray = Image.fromarray(np.array([[0, 90], [180, 255]], dtype=np.uint8))
    np.testing.assert_array_equal(_pixels(load_image(gray))[..., 2], [[0, 90], [180, 255]])
    bilevel = gray.convert("1")  # Floyd-Steinberg dither, but 0 and 255 stay exact
    out = _pixels(load_image(bilevel))
    assert out[0, 0].tolist() == [0, 0, 0] and out[1, 1].tolist() == [255, 255, 255]


def test_palette_with_transparency_is_composited(tmp_path: Path):
    pal = Image.new("P", (3, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    pal.putdata([0, 1, 0])
    path = tmp_path / "pal.png"
    pal.save(path, transparency=0)  # index 0 (red) fully transparent via tRNS
    assert Image.open(path).mode == "P" and "transparency" in Image.open(path).info
    np.testing.assert_array_equal(
        _pixels(load_image(path)), [[[255, 255, 255], [0, 0, 255], [255, 255, 255]]]
    )
    np.testing.assert_array_equal(
        _pixels(load_image(path, background=(0, 255, 0))),
        [[[0, 255, 0], [0, 0, 255], [0, 255, 0]]],
    )
    # a palette image without transparency keeps its colours
    opaque = tmp_path / "opaque.png"
    pal.save(opaque)
    np.testing.assert_array_equal(
        _pixels(load_image(opaque)), [[[255, 0, 0], [0, 0, 255], [255, 0, 0]]]
    )


def test_la_and_rgba_pil_images_are_composited():
    la = Image.fromarray(np.array([[[100, 51], [100, 255]]], dtype=np.uint8), mode="LA")
    # 100 * 51 + 255 * 204 = 57120; / 255 = 224
    np.testing.assert_array_equal(_pixels(load_image(la)), [[[224] * 3, [100] * 3]])
    rgba = Image.fromarray(np.array([[[200, 100, 0, 51]]], dtype=np.uint8), mode="RGBA")
    np.testing.assert_array_equal(_pixels(load_image(rgba)), [[[244, 224, 204]]])


def test_cmyk_jpeg_is_converted(tmp_path: Path):
    # PIL: R = (255 - K) * (1 - C / 255), etc. C=0, M=128, Y=255, K=64 -> (191, 95, 0).
    cmyk = Image.new("CMYK", (16, 16), (0, 128, 255, 64))
    path = tmp_path / "cmyk.jpg"
    cmyk.save(path, quality=98)
    assert Image.open(path).mode == "CMYK"
    out = _pixels(load_image(path)).astype(int)
    assert np.abs(out - np.array([191, 95, 0])).max() <= 3


def test_16_bit_gray_png_is_scaled_not_clipped(tmp_path: Path):
    values = np.array([[0, 1000, 257 * 77], [30000, 65535, 257 * 200]], dtype=np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    # round(v / 257): 1000 -> 4, 30000 -> 116.7 -> 117
    expected = np.array([[0, 4, 77], [117, 255, 200]])
    np.testing.assert_array_equal(_pixels(load_image(path))[..., 0], expected)
    # the same through a 32-bit "I" PIL image
    as_i = Image.fromarray(values.astype(np.int32))
    assert as_i.mode == "I"
    np.testing.assert_array_equal(_pixels(load_image(as_i))[..., 1], expected)


def test_16_bit_rgb_png(tmp_path: Path):
    # Hand-written 2x1 RGB PNG with 16-bit samples 257*k (high byte k): filter byte 0, then
    # big-endian samples.
    samples = [257 * 10, 257 * 20, 257 * 30, 65535, 0, 257 * 128]
    raw = b"\x00" + struct.pack(">6H", *samples)
    path = tmp_path / "rgb16.png"
    path.write_bytes(_png(2, 1, 16, 2, raw))
    np.testing.assert_array_equal(_pixels(load_image(path)), [[[10, 20, 30], [255, 0, 128]]])


def test_float_pil_image_is_read_as_unit_interval():
    f = Image.fromarray(np.array([[0.0, 0.2, 1.0]], dtype=np.float32))
    assert f.mode == "F"
    np.testing.assert_array_equal(_pixels(load_image(f))[..., 0], [[0, 51, 255]])


@pytest.mark.parametrize(("orientation", "rot90_k"), [(1, 0), (3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, rot90_k: int):
    # Stored 32 wide x 16 high: left half red, right half blue.
    stored = np.zeros((16, 32, 3), dtype=np.uint8)
    stored[:, :16] = (255, 0, 0)
    stored[:, 16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif.tobytes())

    raw = np.asarray(Image.open(path).convert("RGB"))  # decoded, not rotated
    out = _pixels(load_image(path))
    # Pixel-wise: the loaded image is exactly the raw decode rotated by NumPy.
    np.testing.assert_array_equal(out, np.rot90(raw, k=rot90_k))
    # And by hand: orientation 6 (rotate 90 clockwise to display) puts the left (red)
    # half on top; 8 puts it at the bottom; 3 moves it to the right.
    red, blue = np.array([255, 0, 0]), np.array([0, 0, 255])
    red_at, blue_at = {
        1: ((8, 4), (8, 28)),
        3: ((8, 28), (8, 4)),
        6: ((4, 8), (28, 8)),
        8: ((28, 8), (4, 8)),
    }[orientation]
    first, second = out[red_at], out[blue_at]
    assert np.abs(first.astype(int) - red).max() <= 8
    assert np.abs(second.astype(int) - blue).max() <= 8


# --------------------------------------------------------------------------------------
# errors: each names the sample and the cause
# --------------------------------------------------------------------------------------


def _noise_image(size: int = 64) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _bad_sources(tmp_path: Path) -> dict[str, tuple[object, dict, str]]:
    """name -> (source, extra kwargs, expected fragment of the cause)."""
    png = _encode(_noise_image(), "PNG")
    jpg = _encode(_noise_image(), "JPEG", quality=90)
    files = {
        "empty.png": b"",
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpg[: len(jpg) // 2],
        "random.png": np.random.default_rng(2).bytes(500),
        # IHDR claims 100000 x 100000: PIL's own DecompressionBombError (> 2x its limit)
        "bomb.png": _png(100_000, 100_000, 8, 2, b"\x00"),
        # 9000 x 9000 = 81M: under PIL's warning limit, over vispo's default guard
        "big.png": _png(9000, 9000, 8, 2, b"\x00"),
        # 10000 x 10000 = 100M: between PIL's warning and error limits
        "warn.png": _png(10_000, 10_000, 8, 2, b"\x00"),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {
        "missing": (tmp_path / "nope.png", {}, "file not found"),
        "empty file": (tmp_path / "empty.png", {}, "empty file"),
        "empty bytes": (b"", {}, "0 bytes"),
        "truncated png path": (tmp_path / "truncated.png", {}, "cannot decode"),
        "truncated png bytes": (png[: len(png) // 2], {}, "cannot decode"),
        "truncated jpeg": (tmp_path / "truncated.jpg", {}, "truncated"),
        "random bytes": (tmp_path / "random.png", {}, "cannot identify"),
        "header bomb": (tmp_path / "bomb.png", {}, "DecompressionBomb"),
        "over vispo limit": (tmp_path / "big.png", {}, "decompression-bomb guard"),
        "pil warning": (tmp_path / "warn.png", {"max_pixels": None}, "DecompressionBomb"),
        "small limit": (png, {"max_pixels": 64 * 63}, "over the limit of 4032"),
        "array limit": (np.zeros((10, 10, 3), np.uint8), {"max_pixels": 99}, "over the limit"),
        "dict no payload": ({"bytes": None, "path": None}, {}, "bytes=None and path=None"),
        "dict wrong keys": ({"image": png}, {}, "neither 'bytes' nor 'path'"),
        "dict truncated": ({"bytes": png[:100], "path": None}, {}, "cannot decode"),
        "wrong type": (12345, {}, "unsupported image source type int"),
        "url": ("https://example.com/a.png", {}, "example.com/a.png): URLs are not fetched"),
        "zero-size array": (
            np.zeros((0, 4, 3), np.uint8),
            {},
            "zero-size image (width 4, height 0)",
        ),
        "zero-size PIL": (Image.new("RGB", (0, 3)), {}, "(width 0, height 3)"),
        "float out of range": (np.full((2, 2), 1.5), {}, "[0, 1]"),
        "float nan": (np.full((2, 2), np.nan), {}, "NaN"),
        "int64 array": (np.zeros((2, 2, 3), np.int64), {}, "dtype"),
        "two channels": (np.zeros((2, 2, 2), np.uint8), {}, "HxWx4"),
        "4-d array": (np.zeros((1, 2, 2, 3), np.uint8), {}, "HxWx4"),
    }


def test_every_malformed_input_raises_image_load_error_naming_the_sample(tmp_path: Path):
    assert DEFAULT_MAX_IMAGE_PIXELS < 9000 * 9000 < Image.MAX_IMAGE_PIXELS
    for i, (name, (src, kwargs, cause)) in enumerate(_bad_sources(tmp_path).items()):
        sample_id = f"sample-{i}"
        with pytest.raises(ImageLoadError) as info:
            load_image(src, sample_id=sample_id, **kwargs)
        message = str(info.value)
        assert f"sample {sample_id!r}" in message, (name, message)
        assert cause in message, (name, message)
        assert info.value.sample_id == sample_id
        assert isinstance(info.value, ValueError)


def test_error_without_sample_id_names_the_source(tmp_path: Path):
    with pytest.raises(ImageLoadError, match="nope.png.*file not found"):
        load_image(tmp_path / "nope.png")


def test_bad_options_raise_value_error():
    img = np.zeros((2, 2, 3), np.uint8)
    with pytest.raises(ValueError, match="background"):
        load_image(img, background=(0, 0, 300))
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(img, max_pixels=0)


# --------------------------------------------------------------------------------------
# purity
# --------------------------------------------------------------------------------------


def test_load_image_never_mutates_its_input():
    rng = np.random.default_rng(3)
    arrays = [
        rng.integers(0, 256, (4, 5, 4), dtype=np.uint8),
        rng.integers(0, 65536, (4, 5), dtype=np.uint16),
        rng.random((4, 5, 3)),
        rng.integers(0, 256, (4, 5, 3), dtype=np.uint8),
    ]
    for arr in arrays:
        before = arr.copy()
        out = load_image(arr)
        np.testing.assert_array_equal(arr, before)
        out.putpixel((0, 0), (1, 2, 3))  # the result is independent of the input
        np.testing.assert_array_equal(arr, before)

    for mode in ("RGB", "RGBA", "LA", "P"):
        pil = Image.fromarray(arrays[3]).convert(mode)
        before, info_before = np.asarray(pil).copy(), dict(pil.info)
        out = load_image(pil)
        assert out is not pil
        out.putpixel((0, 0), (1, 2, 3))
        assert pil.mode == mode and pil.info == info_before
        np.testing.assert_array_equal(np.asarray(pil), before)


def test_exif_pil_input_is_not_transposed_in_place(tmp_path: Path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "o6.jpg"
    Image.new("RGB", (8, 4), (10, 200, 30)).save(path, exif=exif.tobytes())
    pil = Image.open(path)
    out = load_image(pil)
    assert out.size == (4, 8)
    assert pil.size == (8, 4) and pil.getexif()[0x0112] == 6


# --------------------------------------------------------------------------------------
# smart_resize and resize_to_budget
# --------------------------------------------------------------------------------------


def test_smart_resize_hand_cases():
    # round(100 / 28) = 4 -> 112, round(200 / 28) = 7 -> 196; 21952 px is within budget
    assert smart_resize(100, 200) == (112, 196)
    # already fine
    assert smart_resize(56, 56) == (56, 56)
    # 2800 x 2800: round gives 2800^2 > 1003520; sqrt(2800^2 / 1003520) = 2.795,
    # 2800 / 2.795 / 28 = 35.78 -> 35 * 28 = 980
    assert smart_resize(2800, 2800) == (980, 980)
    # 20 x 40 is under 56*56: scale by sqrt(3136 / 800) = 1.98 -> 39.6, 79.2 -> ceil to 56, 84
    assert smart_resize(20, 40) == (56, 84)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2100)
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 10)
    with pytest.raises(ValueError, match="min_pixels"):
        smart_resize(10, 10, min_pixels=100, max_pixels=50)


def _transformers_smart_resize():
    """transformers' own Qwen2-VL ``smart_resize``, taken from its source file.

    Importing the module pulls in torch and the image-processing stack (~5 s on these
    machines); the function itself needs only ``math``, so its definition is compiled
    from the installed file instead. Same code, same behaviour.
    """
    spec = importlib.util.find_spec("transformers")  # locates, does not import
    assert spec is not None and spec.origin is not None
    source_file = Path(spec.origin).parent / "models/qwen2_vl/image_processing_pil_qwen2_vl.py"
    tree = ast.parse(source_file.read_text())
    (func,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "smart_resize"]
    namespace: dict = {"math": math}
    exec(compile(ast.Module(body=[func], type_ignores=[]), str(source_file), "exec"), namespace)
    return namespace["smart_resize"]


def test_smart_resize_matches_transformers():
    hf_smart_resize = _transformers_smart_resize()
    rng = np.random.default_rng(4)
    sizes = [(h, w) for h in (1, 13, 27, 28, 29, 55, 56, 57, 100, 333) for w in (1, 14, 50, 640)]
    sizes += [tuple(int(v) for v in rng.integers(1, 5000, size=2)) for _ in range(400)]
    budgets = [
        dict(factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280),  # Qwen2/2.5-VL
        dict(factor=32, min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 1024),  # Qwen3-VL-like
        dict(factor=28, min_pixels=128 * 28 * 28, max_pixels=256 * 28 * 28),  # small budget
    ]
    checked = 0
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            with pytest.raises(ValueError):
                hf_smart_resize(h, w)
            with pytest.raises(ValueError):
                smart_resize(h, w)
            continue
        for budget in budgets:
            assert smart_resize(h, w, **budget) == hf_smart_resize(h, w, **budget), (h, w, budget)
            checked += 1
    assert checked > 1000


def test_smart_resize_output_is_a_fixed_point_within_budget():
    # So the processor's own resize does nothing after resize_to_budget.
    for h in range(20, 3000, 37):
        for w in range(20, 3000, 53):
            if max(h, w) / min(h, w) > 200:
                continue
            new_h, new_w = smart_resize(h, w)
            assert new_h % 28 == 0 and new_w % 28 == 0
            assert 56 * 56 <= new_h * new_w <= 28 * 28 * 1280
            assert smart_resize(new_h, new_w) == (new_h, new_w)


def test_resize_to_budget():
    const = np.full((20, 40, 3), 77, dtype=np.uint8)
    out = resize_to_budget(const)
    assert isinstance(out, np.ndarray) and out.shape == (56, 84, 3) and out.dtype == np.uint8
    assert (out == 77).all()  # bicubic of a constant is the constant
    pil = Image.fromarray(np.random.default_rng(5).integers(0, 256, (100, 200, 3), np.uint8))
    before = np.asarray(pil).copy()
    out_pil = resize_to_budget(pil)
    assert isinstance(out_pil, Image.Image) and out_pil.size == (196, 112)
    np.testing.assert_array_equal(
        np.asarray(out_pil), np.asarray(pil.resize((196, 112), Image.Resampling.BICUBIC))
    )
    np.testing.assert_array_equal(np.asarray(pil), before)
    # already at the right size: an equal copy, not the same object
    right = np.random.default_rng(6).integers(0, 256, (56, 84, 3), np.uint8)
    same = resize_to_budget(right)
    assert same is not right and not np.shares_memory(same, right)
    np.testing.assert_array_equal(same, right)
    # Qwen3-VL-style factor
    assert resize_to_budget(const, factor=32, min_pixels=32 * 32).shape == (32, 32, 3)
