"""vispo.data loading: every supported source and schema, column mapping, bad rows."""

from __future__ import annotations

import io
import json
from collections import Counter

import datasets
import numpy as np
import pytest
from PIL import Image

from vispo.data import DataError, Sample, SampleDataset, load_samples

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _png(color, size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _write_png(path, color, size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png(color, size))
    return path


def _pixel(sample: Sample, k: int = 0) -> tuple[int, int, int]:
    return sample.load_images()[k].getpixel((0, 0))


# ---------------------------------------------------------------------------------------------
# JSON / JSONL with an image folder
# ---------------------------------------------------------------------------------------------


def test_json_relative_paths_resolve_against_the_file_folder(tmp_path):
    _write_png(tmp_path / "imgs" / "a.png", RED)
    _write_png(tmp_path / "imgs" / "b.png", BLUE, size=(5, 7))
    records = [
        {"id": "q1", "images": ["imgs/a.png"], "problem": "<image>What colour?", "answer": "red"},
        {"id": "q2", "image": "imgs/b.png", "question": "Which?", "answer": 3},
    ]
    # Mixed column names in one file: each row uses the first default name it has.
    (tmp_path / "data.json").write_text(json.dumps(records))
    ds = load_samples(tmp_path / "data.json", split="test")
    assert isinstance(ds, SampleDataset) and len(ds) == 2 and ds.n_skipped == 0
    a, b = ds[0], ds[1]
    assert a.id == "q1" and a.question == "<image>What colour?" and a.answer == "red"
    assert a.images == [str(tmp_path / "imgs" / "a.png")]
    assert _pixel(a) == RED
    assert b.answer == "3" and b.question == "Which?"
    assert b.load_images()[0].size == (5, 7) and _pixel(b) == BLUE
    assert a.meta["split"] == "test" and a.meta["source"] == "data"
    assert a.meta["vision_dependent"] is None


def test_jsonl_with_explicit_image_root_and_extra_columns_in_meta(tmp_path):
    root = tmp_path / "pictures"
    _write_png(root / "x.png", GREEN)
    lines = [
        json.dumps({"image": "x.png", "prompt": "Is it green?", "ground_truth": "yes", "level": 2}),
        "",  # blank lines are ignored
        json.dumps({"image": "x.png", "prompt": "Shade?", "ground_truth": "green", "level": 5}),
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    ds = load_samples(str(tmp_path / "d.jsonl"), image_root=root)
    assert [s.question for s in ds] == ["Is it green?", "Shade?"]
    assert [s.answer for s in ds] == ["yes", "green"]
    assert [s.meta["level"] for s in ds] == [2, 5]
    # No id column: ids are source/split/row and unique.
    assert [s.id for s in ds] == ["d/train/0", "d/train/1"]
    assert _pixel(ds[1]) == GREEN


def test_json_object_keyed_by_split(tmp_path):
    splits = {"train": [{"question": "a", "answer": 1}], "test": [{"question": "b", "answer": 2}]}
    (tmp_path / "d.json").write_text(json.dumps(splits))
    assert [s.question for s in load_samples(tmp_path / "d.json", split="test")] == ["b"]
    with pytest.raises(DataError, match="an object with a 'dev' list"):
        load_samples(tmp_path / "d.json", split="dev")


def test_json_object_holding_one_list_and_limit(tmp_path):
    rows = [{"question": f"q{i}", "answer": i} for i in range(10)]
    (tmp_path / "d.json").write_text(json.dumps({"data": rows}))
    ds = load_samples(tmp_path / "d.json", limit=4)
    assert [s.question for s in ds] == ["q0", "q1", "q2", "q3"]
    assert [s.answer for s in ds] == ["0", "1", "2", "3"]
    assert ds[0].images == []  # text-only rows are allowed


# ---------------------------------------------------------------------------------------------
# The three schemas named in the issue
# ---------------------------------------------------------------------------------------------


def _virl_like_dataset() -> datasets.Dataset:
    """ViRL39K / PAPO training schema: `images` list, `problem` with <image>, `answer`."""
    features = datasets.Features(
        {
            "images": [datasets.Image()],
            "problem": datasets.Value("string"),
            "answer": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "images": [
                [Image.new("RGB", (4, 4), RED)],
                [Image.new("RGB", (4, 4), GREEN), Image.new("RGB", (6, 2), BLUE)],
            ],
            "problem": ["<image>How many sides?", "Compare <image> with <image>."],
            "answer": ["4", "\\frac{1}{2}"],
        },
        features=features,
    )


def test_virl39k_schema_from_hub_style_parquet(tmp_path):
    path = tmp_path / "train-00000-of-00001.parquet"
    _virl_like_dataset().to_parquet(str(path))
    ds = load_samples(path)
    assert len(ds) == 2
    assert ds[1].question == "Compare <image> with <image>." and ds[1].answer == "\\frac{1}{2}"
    # Images stay encoded ({"bytes", "path"} dicts) until asked for.
    assert all(isinstance(src, dict) and src["bytes"] for src in ds[1].images)
    imgs = ds[1].load_images()
    assert [im.size for im in imgs] == [(4, 4), (6, 2)]
    assert [im.getpixel((0, 0)) for im in imgs] == [GREEN, BLUE]


def test_saved_dataset_dict_picks_the_split_geometry3k_schema(tmp_path):
    geo_test = datasets.Dataset.from_dict(
        {
            "images": [[Image.new("RGB", (3, 3), BLUE)]],
            "problem": ["<image>Find x."],
            "answer": ["12"],
        },
        features=datasets.Features(
            {
                "images": [datasets.Image()],
                "problem": datasets.Value("string"),
                "answer": datasets.Value("string"),
            }
        ),
    )
    dd = datasets.DatasetDict({"train": _virl_like_dataset(), "test": geo_test})
    dd.save_to_disk(str(tmp_path / "geo3k"))
    test = load_samples(tmp_path / "geo3k", split="test")
    assert len(test) == 1 and test[0].question == "<image>Find x." and test[0].answer == "12"
    assert _pixel(test[0]) == BLUE and test[0].meta["split"] == "test"
    train = load_samples(tmp_path / "geo3k", split="train")
    assert [s.answer for s in train] == ["4", "\\frac{1}{2}"]
    with pytest.raises(DataError, match=r"no split 'validation'.*\['test', 'train'\]"):
        load_samples(tmp_path / "geo3k", split="validation")


def test_in_memory_hf_dataset_is_a_source():
    ds = load_samples(_virl_like_dataset(), limit=1)
    assert len(ds) == 1 and ds[0].answer == "4" and _pixel(ds[0]) == RED
    # A single `image` column (Image feature, not a list) gives a one-image sample.
    single = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (2, 2), GREEN)], "question": ["Colour?"], "answer": [1.5]},
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "question": datasets.Value("string"),
                "answer": datasets.Value("float64"),
            }
        ),
    )
    (s,) = load_samples(single)
    assert len(s.images) == 1 and _pixel(s) == GREEN and s.answer == "1.5"


def test_papo_eval_sharegpt_format(tmp_path):
    _write_png(tmp_path / "images" / "p0.png", RED)
    _write_png(tmp_path / "images" / "p1.png", GREEN)
    records = [
        {
            "messages": [
                {"role": "user", "content": "<image>What is the area? Choices: A. 3 B. 4"},
                {"role": "assistant", "content": "B"},
            ],
            "images": ["images/p0.png"],
        },
        {  # ShareGPT 'conversations' / from / value with a system turn
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Colour of <image>?"},
                {"from": "gpt", "value": "green"},
            ],
            "images": ["images/p1.png"],
        },
    ]
    (tmp_path / "mathvista.json").write_text(json.dumps(records))
    ds = load_samples(tmp_path / "mathvista.json")
    assert [s.question for s in ds] == [
        "<image>What is the area? Choices: A. 3 B. 4",
        "Colour of <image>?",
    ]
    assert [s.answer for s in ds] == ["B", "green"]
    assert ds[1].meta["system"] == "Be brief."
    assert "messages" not in ds[0].meta and "conversations" not in ds[1].meta
    assert [_pixel(s) for s in ds] == [RED, GREEN]


def test_conversation_with_hf_content_items():
    rows = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": "Name it."}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "circle"}]},
            ],
            "images": [_png(RED)],
        }
    ]
    (s,) = load_samples(rows)
    assert s.question == "<image>Name it." and s.answer == "circle" and _pixel(s) == RED


# ---------------------------------------------------------------------------------------------
# Folders, globs, column mapping
# ---------------------------------------------------------------------------------------------


def test_parquet_folder_prefers_files_named_after_the_split(tmp_path):
    data = tmp_path / "repo" / "data"
    data.mkdir(parents=True)
    for split, answers in (("train", ["1", "2", "3"]), ("test", ["9"])):
        datasets.Dataset.from_dict(
            {"question": [f"q{a}" for a in answers], "answer": answers}
        ).to_parquet(str(data / f"{split}-00000-of-00001.parquet"))
    assert [s.answer for s in load_samples(tmp_path / "repo", split="test")] == ["9"]
    assert [s.answer for s in load_samples(tmp_path / "repo")] == ["1", "2", "3"]
    # A glob takes exactly the files it matches, in sorted order.
    both = load_samples(str(data / "*.parquet"))
    assert [s.answer for s in both] == ["9", "1", "2", "3"]
    assert len({s.id for s in both}) == 4


def test_column_override_and_its_errors(tmp_path):
    rows = [{"q_text": "What?", "gold": "x", "pic": None, "key": "k1"}]
    (s,) = load_samples(rows, columns={"question": "q_text", "answer": "gold", "id": "key"})
    assert (s.id, s.question, s.answer, s.images) == ("k1", "What?", "x", [])
    assert "pic" in s.meta and "q_text" not in s.meta
    with pytest.raises(DataError, match=r"columns\['answer'\] = 'golden' is not a column"):
        load_samples(rows, columns={"question": "q_text", "answer": "golden"})
    with pytest.raises(DataError, match=r"unknown field\(s\) \['label'\]"):
        load_samples(rows, columns={"label": "gold"})
    with pytest.raises(DataError, match=r"no question column.*available: \['gold', 'key'"):
        load_samples(rows)


def test_answers_are_stringified():
    values = [3, 2.5, 4.0, -0.125, np.int64(7), np.float32(1.5), True, ["C"], "  12 "]
    rows = [{"question": f"q{i}", "answer": v} for i, v in enumerate(values)]
    ds = load_samples(rows)
    assert [s.answer for s in ds] == ["3", "2.5", "4", "-0.125", "7", "1.5", "true", "C", "12"]


# ---------------------------------------------------------------------------------------------
# Bad rows: skipped and counted, or raised with the sample named
# ---------------------------------------------------------------------------------------------


def _bad_rows(tmp_path) -> list[dict]:
    _write_png(tmp_path / "ok.png", RED)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return [
        {"id": "good1", "question": "<image>Q?", "answer": "1", "images": ["ok.png"]},
        {"id": "noq", "question": None, "answer": "1", "images": []},
        {"id": "emptyq", "question": "   ", "answer": "1", "images": []},
        {"id": "noa", "question": "Q?", "answer": None, "images": []},
        {"id": "emptya", "question": "Q?", "answer": "", "images": []},
        {"id": "dicta", "question": "Q?", "answer": {"value": 1}, "images": []},
        {"id": "nana", "question": "Q?", "answer": float("nan"), "images": []},
        {"id": "multia", "question": "Q?", "answer": ["A", "B"], "images": []},
        {"id": "gone", "question": "Q?", "answer": "1", "images": ["missing.png"]},
        {"id": "mismatch", "question": "<image><image>Q?", "answer": "1", "images": ["ok.png"]},
        {"id": "good1", "question": "dup?", "answer": "1", "images": []},
        {"id": "broken", "question": "Q?", "answer": "1", "images": ["broken.png"]},
        {"id": "good2", "question": "Q2?", "answer": 2, "images": ["ok.png"]},
    ]


def test_bad_rows_are_skipped_and_counted_by_reason(tmp_path):
    rows = _bad_rows(tmp_path)
    (tmp_path / "d.json").write_text(json.dumps(rows, allow_nan=True))
    ds = load_samples(tmp_path / "d.json")
    # Without validate_images, the corrupt file is only detected when decoded.
    assert [s.id for s in ds] == ["good1", "broken", "good2"]
    expected = Counter(
        missing_question=2,
        missing_answer=2,
        bad_answer=3,
        missing_image=1,
        image_count_mismatch=1,
        duplicate_id=1,
    )
    assert ds.skipped == expected
    assert any("'dicta'" in e and "dict" in e for e in ds.errors)
    validated = load_samples(tmp_path / "d.json", validate_images=True)
    assert [s.id for s in validated] == ["good1", "good2"]
    assert validated.skipped == expected + Counter(bad_image=1)


def test_on_error_raise_names_the_sample(tmp_path):
    rows = _bad_rows(tmp_path)
    with pytest.raises(DataError, match=r"sample 'noq': missing or empty question"):
        load_samples(rows, image_root=tmp_path, on_error="raise")
    with pytest.raises(DataError, match=r"sample 'dicta': answer \{'value': 1\}"):
        load_samples([rows[0], rows[5]], image_root=tmp_path, on_error="raise")
    with pytest.raises(ValueError, match="on_error"):
        load_samples(rows, on_error="ignore")


def test_invalid_jsonl_line_is_a_bad_row(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"question": "a", "answer": "b"}\n{oops\n')
    ds = load_samples(tmp_path / "d.jsonl")
    assert len(ds) == 1 and ds.skipped == Counter(invalid_json=1)
    assert "line 2" in ds.errors[0]
    with pytest.raises(DataError, match="line 2: invalid JSON"):
        load_samples(tmp_path / "d.jsonl", on_error="raise")


def test_sources_that_do_not_exist_never_reach_the_network(tmp_path):
    with pytest.raises(
        DataError, match=r"does not exist \(hub data sets are named 'hub:org/name'\)"
    ):
        load_samples("some-org/some-dataset")
    with pytest.raises(DataError, match="'hub:' must be followed"):
        load_samples("hub:")
    with pytest.raises(DataError, match="matches no file"):
        load_samples(str(tmp_path / "*.parquet"))
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type 'notes.csv'"):
        load_samples(tmp_path / "notes.csv")
    with pytest.raises(DataError, match="holds no saved dataset"):
        (tmp_path / "e").mkdir()
        load_samples(tmp_path / "e")


def test_dataset_is_list_like():
    ds = load_samples([{"question": f"q{i}", "answer": str(i)} for i in range(5)])
    assert ds[-1].answer == "4"
    sub = ds[1:3]
    assert isinstance(sub, SampleDataset) and [s.answer for s in sub] == ["1", "2"]
    assert [s.answer for s in ds.select([4, 0])] == ["4", "0"]
    assert [s.answer for s in ds.filter(lambda s: int(s.answer) % 2 == 0)] == ["0", "2", "4"]
