"""The shipped small VLM (``builtin:vispo-tiny``) and the script that builds it.

What the demo relies on: the folder loads offline through vispo's own loaders in float32,
stays within 20 MB, answers easy-vqa prompts in the one-word format, and already names
colours of drawn shapes (its perception was pretrained). And the build script is seeded:
the same seed gives bitwise the same weights.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

from vispo.data import easy_vqa, get_template
from vispo.data.sample import Sample
from vispo.data.templates import PromptTemplate
from vispo.eval.accuracy import generate_answers
from vispo.models import load_policy
from vispo.models.processors import Qwen2VLImageOnlyProcessor
from vispo.models.scoring import encode_prompts
from vispo.rewards import math_accuracy
from vispo.train.batch import image_budget
from vispo.train.config import ModelConfig
from vispo.train.setup import BUILTIN_MODELS_DIR, load_model

ROOT = Path(__file__).resolve().parent.parent
FOLDER = BUILTIN_MODELS_DIR / "vispo-tiny"
EASY_VQA_ANSWERS = {
    "yes_no": {"yes", "no"},
    "shape": {"circle", "rectangle", "triangle"},
    "color": {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"},
}
# The same named CSS colours easy-vqa draws with (written out here, not imported from the
# build script, so the check does not share code with what it checks).
CSS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "yellow": (255, 255, 0),
}


@pytest.fixture(scope="module")
def tiny():
    """The shipped model and processor, loaded once for this module (read-only)."""
    return load_policy(FOLDER)


def _load_build_script():
    spec = importlib.util.spec_from_file_location(
        "build_tiny_model", ROOT / "scripts" / "build_tiny_model.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_tiny_model"] = module
    spec.loader.exec_module(module)
    return module


def test_folder_has_the_files_and_fits_in_20_mb():
    names = {p.name for p in FOLDER.iterdir()}
    for required in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "processor_config.json",
        "chat_template.jinja",
        "train_log.jsonl",
        "README.md",
    ):
        assert required in names, f"{required} missing from {FOLDER}"
    total = sum(p.stat().st_size for p in FOLDER.rglob("*") if p.is_file())
    assert total <= 20 * 1024 * 1024, f"{total / 1e6:.1f} MB"
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)


def test_loads_offline_in_float32_with_vispos_processor(tiny):
    model, processor = tiny
    assert model.config.model_type == "qwen2_vl"
    assert isinstance(processor, Qwen2VLImageOnlyProcessor)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    # Parameter count by an independent route: the shapes in the safetensors header.
    with safe_open(FOLDER / "model.safetensors", framework="pt") as f:
        stored = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    n_stored = sum(torch.Size(shape).numel() for shape, _ in stored.values())
    assert sum(p.numel() for p in model.parameters()) == n_stored
    assert {dtype for _, dtype in stored.values()} == {"F32"}
    # The trainer resolves builtin:vispo-tiny to this folder.
    resolved, _ = load_model(ModelConfig(name_or_path="builtin:vispo-tiny"))
    first = next(iter(model.state_dict()))
    assert torch.equal(resolved.state_dict()[first], model.state_dict()[first])


def test_64px_image_gives_the_documented_number_of_image_tokens(tiny):
    model, processor = tiny
    ip = processor.image_processor
    # easy-vqa's 64x64 images are kept at 64x64 (the processor's pixel budget is exactly that).
    assert image_budget(processor) == (ip.patch_size * ip.merge_size, 64 * 64, 64 * 64)
    image = Image.new("RGB", (64, 64), (240, 240, 240))
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]]
    prompts = encode_prompts(processor, messages, [[image]])
    side = 64 // ip.patch_size
    assert prompts.pixels["image_grid_thw"].tolist() == [[1, side, side]]
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    n_tokens = int((prompts.input_ids == image_pad).sum())
    assert n_tokens == side * side // ip.merge_size**2


def test_answers_easy_vqa_in_the_one_word_format(tiny):
    model, processor = tiny
    data = easy_vqa("test", limit=24)
    samples = [data[i] for i in range(len(data))]
    texts = generate_answers(
        model,
        processor,
        samples,
        get_template("short"),
        max_new_tokens=4,
        budget=image_budget(processor),
    )
    for sample, (text,) in zip(samples, texts):
        allowed = EASY_VQA_ANSWERS[sample.meta["question_type"]]
        assert text.strip() in allowed, f"{sample.question!r} -> {text!r}"


def _drawn(color: str, shape: str, seed: int) -> Image.Image:
    """One shape of a CSS colour on a light background, drawn independently of the build."""
    g = torch.Generator().manual_seed(seed)
    bg = tuple(int(v) for v in torch.randint(225, 256, (3,), generator=g))
    image = Image.new("RGB", (64, 64), bg)
    draw = ImageDraw.Draw(image)
    x, y = (int(v) for v in torch.randint(14, 50, (2,), generator=g))
    r = 11
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=CSS[color])
    elif shape == "rectangle":
        draw.rectangle((x - r, y - r + 3, x + r, y + r - 3), fill=CSS[color])
    else:
        draw.polygon([(x - r, y + r), (x + r, y + r), (x, y - r)], fill=CSS[color])
    return image


def test_names_the_colour_of_drawn_shapes(tiny):
    """Perception is present: the shipped model names the colour of a shape it is shown."""
    model, processor = tiny
    template = PromptTemplate("{{ question }}", name="plain")
    samples = [
        Sample(
            id=f"{color}-{shape}",
            images=[_drawn(color, shape, seed=i)],
            question="Name the colour of the figure. Answer in one word.",
            answer=color,
        )
        for i, (color, shape) in enumerate(
            (c, s) for c in CSS for s in ("circle", "rectangle", "triangle")
        )
    ]
    texts = generate_answers(
        model, processor, samples, template, max_new_tokens=4, budget=image_budget(processor)
    )
    correct = [math_accuracy(t[0], s.answer) for t, s in zip(texts, samples)]
    assert sum(correct) / len(correct) >= 0.9, list(zip([s.id for s in samples], texts))


def test_training_log_records_both_stages_and_the_final_measurements():
    records = [json.loads(line) for line in (FOLDER / "train_log.jsonl").read_text().splitlines()]
    config = records[0]
    assert config["event"] == "config"
    train = [r for r in records if r["event"] == "train"]
    assert {"perception", "format"} <= {r["stage"] for r in train}
    perception = [r["loss"] for r in train if r["stage"] == "perception"]
    assert perception[-1] < perception[0] / 4  # the naming loss fell
    final = [r for r in records if r["event"] == "eval"][-1]
    assert final["stage"] == "format"
    # Near easy-vqa's text prior (0.67) with the real images, and below the 0.77 the RL demo
    # must reach, so the demo's gain is RL's (the shipped model: 0.736; see its README) ...
    assert 0.60 <= final["easy_vqa_real/accuracy"] <= 0.75
    # ... while colours are named from the image.
    assert final["perception/color"] >= 0.9


def test_build_script_same_seed_same_weights(tmp_path):
    """Two quick builds with the same seed give bitwise-identical weights; another seed differs."""
    script = _load_build_script()
    threads = torch.get_num_threads()
    try:
        outs = []
        for name, seed in (("a", 0), ("b", 0), ("c", 1)):
            cfg = script.quick_config(seed=seed, threads=1)
            script.build(cfg, tmp_path / name)
            outs.append(tmp_path / name / "model.safetensors")
    finally:
        torch.set_num_threads(threads)
    with (
        safe_open(outs[0], "pt") as a,
        safe_open(outs[1], "pt") as b,
        safe_open(outs[2], "pt") as c,
    ):
        keys = sorted(a.keys())
        assert keys == sorted(b.keys()) == sorted(c.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in keys)
        assert not all(torch.equal(a.get_tensor(k), c.get_tensor(k)) for k in keys)
