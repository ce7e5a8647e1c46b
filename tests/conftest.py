"""Shared, session-scoped fixtures: tiny offline VLMs, their processors, and test images.

The cached models are shared by every test that asks for them: treat them as read-only
(no training steps, no LoRA wrapping, no weight edits). A test that changes a model builds
its own with ``vispo.models.build_tiny_vlm`` (about 0.05 s).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

TINY_ARCHS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3")

_COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 60, 220),
    "yellow": (230, 210, 40),
}


def draw_shape(shape: str, color: str, *, size: int = 64, seed: int = 0) -> Image.Image:
    """A 64x64 easy-vqa-like image: one shape on a lightly noisy white background."""
    rng = np.random.default_rng(seed)
    background = 235 + rng.integers(0, 20, size=(size, size, 3), dtype=np.uint8)
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)
    box = (size // 6, size // 6, size - size // 6, size - size // 6)
    fill = _COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "rectangle":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon(
            [(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill
        )
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image


@pytest.fixture(scope="session")
def sample_images() -> list[Image.Image]:
    """Four distinct, deterministic 64x64 RGB images (shape + colour on a noisy background)."""
    specs = [("circle", "red"), ("rectangle", "blue"), ("triangle", "green"), ("circle", "yellow")]
    return [draw_shape(shape, color, seed=i) for i, (shape, color) in enumerate(specs)]


@pytest.fixture(scope="session")
def tiny_vlm():
    """Factory ``tiny_vlm(arch, seed=0) -> (model, processor)``, cached for the session.

    Shared objects: read-only use only (see the module docstring).
    """
    from vispo.models import build_tiny_vlm

    cache: dict[tuple[str, int], tuple] = {}

    def get(arch: str, seed: int = 0):
        key = (arch, seed)
        if key not in cache:
            cache[key] = build_tiny_vlm(arch, seed=seed)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def make_conversation():
    """Factory ``make_conversation(n_images, text)`` -> a one-turn user conversation."""

    def make(n_images: int, text: str) -> list[dict]:
        content = [{"type": "image"} for _ in range(n_images)]
        content.append({"type": "text", "text": text})
        return [{"role": "user", "content": content}]

    return make


@pytest.fixture(scope="session")
def one_step_config():
    """Factory ``one_step_config(out_dir, preset, *extra, arch=...)``: see :func:`_one_step`."""
    return _one_step


def _one_step(out_dir, preset: str, *extra: str, arch: str = "qwen2_vl"):
    """The config of a one-step run of a tiny model (2 prompts x 2 responses of at most 4
    tokens, no held-out set, no checkpoints): the shared settings, then ``extra`` overrides."""
    from vispo.train.config import load_config

    return load_config(
        None,
        [
            f"objective.name={preset}",
            f"model.name_or_path=tiny:{arch}",
            "data.eval_size=0",
            "train.steps=1",
            "train.prompts_per_step=2",
            "rollout.n=2",
            "rollout.max_new_tokens=4",
            f"train.out_dir={out_dir}",
            "logging.progress=false",
            "train.samples_every=0",
            "train.save_every=0",
            *extra,
        ],
    )
