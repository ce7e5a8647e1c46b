"""Evaluation with the real image, a uniform gray one, or another question's image."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from types import SimpleNamespace

import pytest
from PIL import Image

from vispo import cli
from vispo.data import Sample, SampleDataset, get_template, synthetic_vqa
from vispo.eval import runner as runner_module
from vispo.eval.accuracy import generate_answers
from vispo.eval.benchmarks import GENERAL, Benchmark
from vispo.eval.image_modes import derangement, donor_seed, with_image
from vispo.eval.loading import LoadedModel
from vispo.eval.probe import BLANK_FILL
from vispo.eval.runner import EvalSettings, evaluate_model, read_results

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "teal": (0, 128, 128)}


def _colour_bench(answers: list[str]) -> Benchmark:
    """Question i: a solid image of colour answers[i]; the answer is that colour's name."""
    samples = [
        Sample(
            id=f"c/{i}",
            images=[Image.new("RGB", (40 + i, 32), COLORS[a])],
            question="what color is the image?",
            answer=a,
        )
        for i, a in enumerate(answers)
    ]
    return Benchmark(
        "colours", GENERAL, lambda root, limit: SampleDataset(samples)[:limit], template="short"
    )


def _seeing_stub(seen: list):
    """A stand-in for generate_batch that answers the colour of the image it is shown (gray
    for the blank) and records each image's size and corner pixel."""
    names = {rgb: name for name, rgb in COLORS.items()}
    names[(BLANK_FILL,) * 3] = "gray"

    def stub(model, processor, samples, template, *, k, **kw):
        out = []
        for s in samples:
            (img,) = s.load_images()
            seen.append((s.id, img.size, img.getpixel((0, 0))))
            out.append([names[img.getpixel((0, 0))]] * k)
        return out

    return stub


@pytest.fixture
def loaded(tiny_vlm):
    model, processor = tiny_vlm("qwen2_vl")
    return LoadedModel(model, processor, "tiny:qwen2_vl", "tiny")


ANSWERS = ["red", "green", "blue", "teal", "red", "green", "blue", "teal", "red", "blue"]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("real", 1.0), ("gray", 0.0), ("other", 0.0)],
)
def test_each_mode_shows_the_intended_image(loaded, tmp_path, monkeypatch, mode, expected):
    seen: list = []
    monkeypatch.setattr(runner_module, "generate_batch", _seeing_stub(seen))
    bench = _colour_bench(ANSWERS)
    settings = EvalSettings(k=0, batch_size=4, max_new_tokens=3, reward="math", image_mode=mode)
    result = evaluate_model(loaded, [bench], tmp_path, settings, progress=False)
    score = result["modes"]["greedy"]["summary"]["benchmarks"]["colours"]["score"]
    # real: every answer right; gray: no question's answer is "gray"; other: each question is
    # shown an image of another colour (no colour is held by more than half), so all wrong.
    assert score == pytest.approx(expected)
    samples = bench.load()
    by_id = {s.id: s for s in samples}
    recs = {r["id"]: r for r in read_results(tmp_path / "results.jsonl")}
    assert result["settings"]["image_mode"] == mode
    for sid, size, corner in seen:
        own = by_id[sid].load_images()[0]
        if mode == "real":
            assert (size, corner) == (own.size, own.getpixel((0, 0)))
            assert "image_mode" not in recs[sid] and "image_of" not in recs[sid]
        elif mode == "gray":
            assert (size, corner) == (own.size, (BLANK_FILL,) * 3)  # same size, uniform gray
            assert recs[sid]["image_mode"] == "gray"
        else:
            donor = by_id[recs[sid]["image_of"]]
            assert donor.id != sid and donor.answer != by_id[sid].answer
            assert (size, corner) == (donor.images[0].size, donor.images[0].getpixel((0, 0)))
    if mode == "other":
        expected_donors = derangement(ANSWERS, donor_seed(0, "colours"))
        assert [recs[s.id]["image_of"] for s in samples] == [samples[j].id for j in expected_donors]


def test_image_mode_keeps_results_apart_and_real_keeps_old_signatures(
    loaded, tmp_path, monkeypatch
):
    seen: list = []
    monkeypatch.setattr(runner_module, "generate_batch", _seeing_stub(seen))
    bench = _colour_bench(ANSWERS)
    real = EvalSettings(k=0, batch_size=4, max_new_tokens=3, reward="math")
    evaluate_model(loaded, [bench], tmp_path, real, progress=False)
    n_real = len(seen)
    gray = EvalSettings(**{**real.__dict__, "image_mode": "gray"})
    result = evaluate_model(loaded, [bench], tmp_path, gray, progress=False)
    assert len(seen) == 2 * n_real  # the stored real answers were not reused for gray
    assert result["modes"]["greedy"]["summary"]["benchmarks"]["colours"]["score"] == 0.0
    # The signature of "real" is the one computed before this option existed (results stored
    # then are still reused); gray's differs.
    params = {"k": 1, "temperature": 0.0, "top_p": 1.0}
    resolved = {"template": "short", "reward": "math", "max_new_tokens": 3}
    payload = {
        "model": loaded.identity,
        "benchmark": "colours",
        "mode": params,
        "seed": 0,
        "batch_size": 4,
        **resolved,
    }
    old = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    assert runner_module._mode_signature(loaded, bench, params, real, resolved) == old
    assert runner_module._mode_signature(loaded, bench, params, gray, resolved) != old
    with pytest.raises(ValueError, match="image_mode must be one of"):
        EvalSettings(image_mode="noise").validate()


def test_gray_mode_reaches_a_real_model(loaded, tmp_path):
    """On the tiny random VLM, greedy answers under 'gray' equal those of the same questions
    with their images replaced by hand, and differ from the real-image answers somewhere."""
    data = synthetic_vqa(12, seed=3, image_size=64, split="test")
    bench = Benchmark("syn", GENERAL, lambda root, limit: data[:limit], template="short")
    out = {}
    for mode in ("real", "gray"):
        settings = EvalSettings(k=0, batch_size=6, max_new_tokens=4, image_mode=mode)
        evaluate_model(loaded, [bench], tmp_path / mode, settings, progress=False)
        recs = {r["id"]: r["responses"] for r in read_results(tmp_path / mode / "results.jsonl")}
        out[mode] = [recs[s.id] for s in data]
    by_hand = [
        Sample(
            id=s.id,
            images=[Image.new("RGB", s.load_images()[0].size, (BLANK_FILL,) * 3)],
            question=s.question,
            answer=s.answer,
        )
        for s in data
    ]
    expected = generate_answers(
        loaded.model,
        loaded.processor,
        by_hand,
        get_template("short"),
        max_new_tokens=4,
        batch_size=6,
    )
    assert out["gray"] == expected
    assert out["gray"] != out["real"]


def test_derangement_has_no_fixed_points_and_prefers_other_answers():
    for n in range(2, 40):
        for seed in range(5):
            answers = [str((i * 7 + seed) % 5) for i in range(n)]
            donor = derangement(answers, seed)
            assert sorted(donor) == list(range(n))  # a permutation
            assert all(donor[i] != i for i in range(n))  # no fixed point
            largest = max(Counter(answers).values())
            same = sum(answers[i] == answers[donor[i]] for i in range(n))
            # No equal-answer pair when no answer holds more than half, else the minimum.
            assert same == max(0, 2 * largest - n)
    assert derangement(["a", "a", "a"], 0) != [0, 1, 2]
    assert all(d != i for i, d in enumerate(derangement(["yes"] * 9, 1)))
    # Fixed by the seed, and the seed matters.
    answers = [str(i % 3) for i in range(30)]
    assert derangement(answers, 4) == derangement(answers, 4)
    assert derangement(answers, 4) != derangement(answers, 5)
    with pytest.raises(ValueError, match="at least 2 questions"):
        derangement(["x"], 0)


def test_with_image_by_hand():
    s = Sample(id="a", images=[Image.new("RGB", (7, 5), (1, 2, 3))], question="q", answer="x")
    d = Sample(id="b", images=[Image.new("RGB", (3, 3), (9, 9, 9))], question="q", answer="y")
    assert with_image(s, "real") is s
    (g,) = with_image(s, "gray").load_images()
    assert g.size == (7, 5) and g.getcolors() == [(35, (BLANK_FILL,) * 3)]
    o = with_image(s, "other", d)
    assert (o.id, o.answer, o.images) == ("a", "x", d.images)
    assert s.images[0].getpixel((0, 0)) == (1, 2, 3)  # the original is untouched


def test_cli_images_flag(monkeypatch, tmp_path):
    captured = {}

    def fake_evaluate(loaded, benchmarks, out, settings, **kw):
        captured["settings"] = settings
        raise ValueError("stop here")

    import vispo.eval as eval_pkg

    monkeypatch.setattr(eval_pkg, "evaluate_model", fake_evaluate)
    monkeypatch.setattr(
        eval_pkg, "load_model_spec", lambda spec, step=None: SimpleNamespace(config=None, label="x")
    )
    code = cli.main(
        ["eval", "x", "--benchmarks", "easy-vqa-cf", "--images", "other", "--out", str(tmp_path)]
    )
    assert code == 2 and captured["settings"].image_mode == "other"
    with pytest.raises(SystemExit):
        cli.main(["eval", "x", "--images", "noise"])
