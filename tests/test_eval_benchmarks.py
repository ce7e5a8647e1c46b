"""The benchmark registry: built-in sets and their vision-dependent subsets, local PAPO files."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vispo.data import easy_vqa, text_prior
from vispo.eval.benchmarks import (
    BENCHMARKS,
    GENERAL,
    VISION_DEPENDENT,
    Benchmark,
    BenchmarkError,
    get_benchmark,
    parse_benchmarks,
    register_benchmark,
)


def test_easy_vqa_vision_dependent_subset_is_where_the_text_prior_is_wrong():
    full = BENCHMARKS["easy-vqa"].load()
    vd = BENCHMARKS["easy-vqa-vd"].load()
    assert len(full) == 9673
    # Independent route: the prior from the package's train split (vispo's train and
    # validation splits, in the package's row order), applied to the test split.
    rows = [*easy_vqa("train"), *easy_vqa("validation")]
    prior = text_prior(sorted(rows, key=lambda s: int(s.id.rsplit("/", 1)[1])))
    expected = [s.id for s in full if prior.get(s.question) != s.answer]
    assert [s.id for s in vd] == expected
    assert len(vd) == 3192  # 1 - 3192/9673 = 67.0% prior accuracy (design.md)
    assert BENCHMARKS["easy-vqa-vd"].group == VISION_DEPENDENT
    assert BENCHMARKS["easy-vqa"].group == GENERAL
    assert [s.id for s in BENCHMARKS["easy-vqa-vd"].load(limit=5)] == expected[:5]


def test_synthetic_subsets_and_defaults():
    full = BENCHMARKS["synthetic"].load(limit=60)
    vd = BENCHMARKS["synthetic-vd"].load(limit=60)
    assert len(full) == 60 and len(vd) == 60
    assert all(s.meta["vision_dependent"] for s in vd)
    expected = [s.id for s in BENCHMARKS["synthetic"].load() if s.meta["vision_dependent"]][:60]
    assert [s.id for s in vd] == expected
    assert BENCHMARKS["synthetic-hard"].load(limit=1)[0].meta["difficulty"] == 3
    assert BENCHMARKS["synthetic"].template == "short"
    assert BENCHMARKS["synthetic"].max_new_tokens == 16
    assert BENCHMARKS["geometry3k"].max_new_tokens == 1024


def _papo_record(question, answer, image):
    return {
        "messages": [
            {"role": "user", "content": f"<image>{question}"},
            {"role": "assistant", "content": answer},
        ],
        "images": [image],
    }


def test_local_papo_layout_is_found_and_loaded(tmp_path):
    (tmp_path / "papo").mkdir()
    (tmp_path / "images" / "geo").mkdir(parents=True)
    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "images/geo/0.png")
    Image.new("RGB", (10, 20), (0, 0, 255)).save(tmp_path / "images/geo/1.png")
    records = [
        _papo_record("Find x.", "12", "images/geo/0.png"),
        _papo_record("Find the angle.", "30", "images/geo/1.png"),
    ]
    (tmp_path / "papo" / "hiyouga_geometry3k.json").write_text(json.dumps(records))
    bench = get_benchmark("geometry3k", tmp_path)
    assert bench.group == GENERAL and bench.local
    data = bench.load(tmp_path)
    assert [s.answer for s in data] == ["12", "30"]
    assert data[0].question == "<image>Find x."
    (img,) = data[1].load_images()
    assert img.size == (10, 20) and img.getpixel((0, 0)) == (0, 0, 255)
    assert len(bench.load(tmp_path, limit=1)) == 1


def test_a_users_own_file_by_name_and_folder_layout(tmp_path):
    folder = tmp_path / "mybench"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "data.json").write_text(json.dumps([_papo_record("How many?", "3", "a.png")]))
    bench = get_benchmark("mybench", tmp_path)
    assert bench.group == GENERAL
    (sample,) = bench.load(tmp_path)
    assert sample.answer == "3" and sample.load_images()[0].size == (8, 8)


def test_clear_errors_for_unknown_names_and_missing_files(tmp_path):
    with pytest.raises(BenchmarkError, match="unknown benchmark 'nope'"):
        parse_benchmarks("easy-vqa,nope")
    with pytest.raises(BenchmarkError, match="--data-root"):
        BENCHMARKS["mathvista"].load(None)
    with pytest.raises(BenchmarkError, match="AI4Math_MathVista.json"):
        BENCHMARKS["mathvista"].load(tmp_path)
    with pytest.raises(BenchmarkError, match="no benchmark named"):
        parse_benchmarks(" , ")
    # A record whose image is missing names the sample.
    (tmp_path / "lscpku_LogicVista.json").write_text(
        json.dumps([_papo_record("Which?", "A", "missing.png")])
    )
    with pytest.raises(BenchmarkError, match="unusable"):
        BENCHMARKS["logicvista"].load(tmp_path)


def test_parse_keeps_order_and_drops_duplicates():
    names = [b.name for b in parse_benchmarks("synthetic-vd, easy-vqa,synthetic_vd,easy-vqa")]
    assert names == ["synthetic-vd", "easy-vqa"]


def test_register_benchmark_validates():
    bench = Benchmark("x", "other", lambda root, limit: None)
    with pytest.raises(BenchmarkError, match="group"):
        register_benchmark(bench)
    with pytest.raises(BenchmarkError, match="already registered"):
        register_benchmark(BENCHMARKS["easy-vqa"])
