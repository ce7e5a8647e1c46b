"""Bad training data: broken images and broken records, with ``data.on_error`` skip and raise.

The data set (JSONL + image folder, as users ship them) mixes good samples with a corrupt, a
truncated, a zero-size and a huge (81 Mpixel) image, records with a missing, an empty or a
non-string answer, and empty questions. CMYK and 16-bit images are *not* bad: they must be
kept and converted correctly (checked against the conversion formulas), and a numeric answer
is kept as its string. With ``skip`` every bad sample is dropped and counted by reason and the
rest trains; with ``raise`` the run fails before any compute, naming the first bad sample.
"""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
from faultkit import TINY, parity_reward
from PIL import Image, ImageDraw

from vispo.data import DataError
from vispo.rewards import RewardRunner
from vispo.train.config import load_config
from vispo.train.logging import read_metrics
from vispo.train.trainer import Trainer
from vispo.vision import load_image

pytestmark = pytest.mark.faults

SHAPES = ("circle", "rectangle", "triangle")


def _shape_png(shape: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray((235 + rng.integers(0, 20, (64, 64, 3))).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    color = tuple(int(c) for c in rng.integers(0, 200, 3))
    if shape == "circle":
        draw.ellipse((10, 10, 54, 54), fill=color)
    elif shape == "rectangle":
        draw.rectangle((10, 10, 54, 54), fill=color)
    else:
        draw.polygon([(10, 54), (54, 54), (32, 10)], fill=color)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _cmyk() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, (48, 48, 4), dtype=np.uint8)


def _gray16() -> np.ndarray:
    ramp = np.linspace(0, 65535, 56 * 56).round().astype(np.uint16)
    return ramp.reshape(56, 56)


def make_dataset(folder) -> tuple[dict, list[str], Counter]:
    """Write data.jsonl + images; returns (records by id, good ids, expected skip counts)."""
    images = folder / "images"
    images.mkdir(parents=True)
    records: list[dict] = []

    def add(sample_id, image, question="What shape is in the image?", **answer):
        rec = {"id": sample_id, "image": image, "question": question}
        rec.update(answer)
        records.append(rec)

    good = []
    for i in range(8):
        shape = SHAPES[i % 3]
        (images / f"good{i}.png").write_bytes(_shape_png(shape, i))
        add(f"good{i}", f"images/good{i}.png", answer=shape)
        good.append(f"good{i}")
    # Unusual but valid: kept and converted.
    Image.fromarray(_cmyk(), "CMYK").save(images / "cmyk.tiff")
    add("cmyk", "images/cmyk.tiff", answer="rectangle")
    Image.fromarray(_gray16()).save(images / "gray16.png")
    add("gray16", "images/gray16.png", answer="circle")
    (images / "numeric.png").write_bytes(_shape_png("circle", 99))
    add("numeric-answer", "images/numeric.png", question="How many shapes?", answer=1)
    good += ["cmyk", "gray16", "numeric-answer"]

    # Bad images.
    valid = _shape_png("circle", 123)
    (images / "corrupt.png").write_bytes(np.random.default_rng(0).bytes(2000))
    (images / "truncated.png").write_bytes(valid[: len(valid) // 2])
    (images / "zero.png").write_bytes(b"")
    Image.new("1", (9000, 9000)).save(images / "huge.png")  # 81 Mpixel > the 67 Mpixel guard
    for name in ("corrupt", "truncated", "zero", "huge"):
        add(f"bad-{name}", f"images/{name}.png", answer="circle")
    # Bad records.
    (images / "ok.png").write_bytes(_shape_png("triangle", 5))
    add("no-answer", "images/ok.png")
    add("empty-answer", "images/ok.png", answer="  ")
    add("dict-answer", "images/ok.png", answer={"shape": "triangle"})
    add("list-answer", "images/ok.png", answer=["triangle", "circle"])
    add("empty-question", "images/ok.png", question="", answer="triangle")
    add("blank-question", "images/ok.png", question=" \n ", answer="triangle")

    rng = np.random.default_rng(3)
    order = rng.permutation(len(records))
    with open(folder / "data.jsonl", "w") as f:
        for i in order:
            f.write(json.dumps(records[i]) + "\n")
    expected = Counter(bad_image=4, missing_answer=2, bad_answer=2, missing_question=2)
    return {r["id"]: r for r in records}, good, expected


def _config(tmp_path, data, on_error: str):
    return load_config(
        None,
        [
            "objective.name=grpo",
            *[o for o in TINY if not o.startswith("data.limit")],
            f"data.name={data}",
            f"data.on_error={on_error}",
            "train.steps=3",
            "train.save_every=0",
            f"train.out_dir={tmp_path / ('run-' + on_error)}",
        ],
    )


def test_bad_samples_are_skipped_and_counted_and_the_rest_trains(tmp_path, fault_table):
    records, good, expected = make_dataset(tmp_path / "data")
    trainer = Trainer(
        _config(tmp_path, tmp_path / "data" / "data.jsonl", "skip"),
        reward_fn=RewardRunner(parity_reward, num_workers=0),
    )
    kept = sorted(s.id for s in trainer.train_data)
    skipped = Counter(trainer.train_data.skipped)
    history = trainer.train()
    trained = len(history) == 3 and [r["step"] for r in read_metrics(trainer.out)] == [1, 2, 3]

    # CMYK and 16-bit images are decoded with the textbook conversions.
    by_id = {s.id: s for s in trainer.train_data}
    cmyk = _cmyk().astype(np.float64)
    rgb = (255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255
    got = np.asarray(by_id["cmyk"].load_images()[0], dtype=np.float64)
    gray = np.rint(_gray16() / 257.0)
    got16 = np.asarray(by_id["gray16"].load_images()[0], dtype=np.float64)
    converted = (
        np.abs(got - rgb).max() <= 1.0
        and all(np.array_equal(got16[..., c], gray) for c in range(3))
        and by_id["numeric-answer"].answer == "1"
    )
    n_bad = sum(expected.values())
    fault_table(
        "data",
        "bad samples with on_error=skip",
        n_bad,
        sum(min(skipped[k], v) for k, v in expected.items()) if kept == sorted(good) else 0,
        lost=f"0 good samples ({len(kept)} of {len(good)} kept)",
        detail=", ".join(f"{k}={v}" for k, v in sorted(skipped.items()))
        + "; CMYK, 16-bit, numeric answer kept",
    )
    assert kept == sorted(good)
    assert skipped == expected
    assert trained
    assert converted
    assert trainer.train_data.errors and all("sample '" in e for e in trainer.train_data.errors)


def test_on_error_raise_fails_fast_naming_the_first_bad_sample(tmp_path, fault_table):
    records, good, _ = make_dataset(tmp_path / "data")
    path = tmp_path / "data" / "data.jsonl"
    first_bad = next(
        json.loads(line)["id"]
        for line in path.read_text().splitlines()
        if json.loads(line)["id"] not in good
    )
    held = 0
    tried = 0
    messages = []
    # Each kind of bad sample alone: the run must refuse it by name.
    for bad_id in [k for k in records if k not in good]:
        tried += 1
        single = tmp_path / f"only-{bad_id}.jsonl"
        rows = [records[g] for g in good[:3]] + [records[bad_id]]
        single.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = _config(tmp_path, single, "raise")
        cfg.data.image_root = str(tmp_path / "data")
        try:
            Trainer(cfg, reward_fn=RewardRunner(parity_reward, num_workers=0))
        except DataError as e:
            messages.append(str(e))
            held += int(f"sample {bad_id!r}" in str(e))
    with pytest.raises(DataError) as info:
        Trainer(
            _config(tmp_path, path, "raise"), reward_fn=RewardRunner(parity_reward, num_workers=0)
        )
    fault_table(
        "data",
        "bad samples with on_error=raise",
        tried,
        held,
        lost="run refused before any step",
        detail="DataError names the sample",
    )
    assert held == tried, messages
    assert f"sample {first_bad!r}" in str(info.value)
    assert not (tmp_path / "run-raise" / "metrics.jsonl").exists()


def test_cmyk_and_16_bit_loader_route_is_independent_of_pil_convert(tmp_path):
    """The 16-bit expectation above is not PIL's own convert('RGB'), which clips at 255."""
    Image.fromarray(_gray16()).save(tmp_path / "g.png")
    clipped = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    ours = np.asarray(load_image(tmp_path / "g.png"))
    assert (clipped == 255).mean() > 0.9  # PIL's route saturates almost everything
    assert ours.max() == 255 and ours.min() == 0 and (ours == 255).mean() < 0.01
