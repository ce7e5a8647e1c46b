"""The held-out set is never the training file; ``vispo eval --data`` reads every layout."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vispo.train.config import load_config
from vispo.train.setup import held_out, load_eval_data, load_split, sample_key


def _images(root, n):
    (root / "img").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        Image.new("RGB", (32, 32), (i * 20 % 256, 100, 200)).save(root / "img" / f"{i}.png")
        paths.append(f"img/{i}.png")
    return paths


def _rows(paths, offset=0):
    return [
        {"image": p, "problem": f"What is item {i + offset}?", "answer": str(i + offset)}
        for i, p in enumerate(paths)
    ]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _dcfg(*overrides):
    return load_config(None, list(overrides)).data


def test_a_single_file_holds_out_a_fixed_seed_slice_not_trained_on(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", _rows(_images(tmp_path, 12)))
    dcfg = _dcfg(f"data.name={data}", "data.eval_size=300")
    train = load_split(dcfg, dcfg.split, None)
    held, keep = held_out(dcfg, train)
    assert len(held) == 2 and len(keep) == 10  # 20% of 12 rows, rounded down
    held_keys = {sample_key(s) for s in held}
    kept_keys = {sample_key(train[i]) for i in keep}
    assert not held_keys & kept_keys
    assert held_keys | kept_keys == {sample_key(s) for s in train}
    assert "held out of the training data" in held.description and "seed 0" in held.description
    # Fixed: the same rows whatever the run seed, and when rebuilt later (vispo eval).
    again = load_eval_data(_dcfg(f"data.name={data}", "data.eval_size=300", "train.seed=5"))
    assert [s.id for s in again] == [s.id for s in held]
    # eval_size caps the slice; 0 means none.
    assert len(held_out(_dcfg(f"data.name={data}", "data.eval_size=1"), train)[0]) == 1
    assert held_out(_dcfg(f"data.name={data}", "data.eval_size=0"), train) == (None, None)


def test_load_train_data_removes_the_slice(tmp_path, tiny_vlm):
    from vispo.data import get_template
    from vispo.train.setup import load_train_data

    data = _jsonl(tmp_path / "d.jsonl", _rows(_images(tmp_path, 10)))
    dcfg = _dcfg(f"data.name={data}", "data.eval_size=300")
    _, processor = tiny_vlm("qwen2_vl")
    logs = []
    train = load_train_data(dcfg, processor, get_template("short"), log=logs.append)
    held = load_eval_data(dcfg, train)
    assert len(train) == 8 and len(held) == 2
    assert not {s.id for s in train} & {s.id for s in held}
    assert any("held-out set: 2 questions held out of the training data" in x for x in logs)


def test_named_splits_and_eval_name_are_used_as_they_are(tmp_path):
    paths = _images(tmp_path, 9)
    split_json = tmp_path / "splits.json"
    split_json.write_text(json.dumps({"train": _rows(paths[:6]), "test": _rows(paths[6:], 6)}))
    held, keep = held_out(_dcfg(f"data.name={split_json}"))
    assert keep is None and sorted(s.answer for s in held) == ["6", "7", "8"]
    assert held.description == f"3 questions of {split_json} split test"
    # A test split sharing a row with the training split is still used, and the overlap said.
    leaky = tmp_path / "leaky.json"
    leaky.write_text(json.dumps({"train": _rows(paths[:6]), "test": _rows(paths[5:], 5)}))
    held, keep = held_out(_dcfg(f"data.name={leaky}"))
    assert keep is None and len(held) == 4
    assert held.description.endswith("(1 of them also in the training split)")

    import datasets

    rows = _rows(paths)
    folder = tmp_path / "hf"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:7]),
            "test": datasets.Dataset.from_list(rows[7:]),
        }
    ).save_to_disk(str(folder))
    held, keep = held_out(_dcfg(f"data.name={folder}", f"data.image_root={tmp_path}"))
    assert keep is None and sorted(s.answer for s in held) == ["7", "8"]

    train = _jsonl(tmp_path / "train.jsonl", _rows(paths[:5]))
    other = _jsonl(tmp_path / "other.jsonl", _rows(paths[5:], 5))
    held, keep = held_out(_dcfg(f"data.name={train}", f"data.eval_name={other}"))
    assert keep is None and [s.answer for s in held] == ["5", "6", "7", "8"]
    assert held.description == f"4 questions of {other} (split test)"

    # A DatasetDict without the split: the slice, and the reason says which splits exist.
    only_train = tmp_path / "only"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(only_train))
    held, keep = held_out(_dcfg(f"data.name={only_train}", f"data.image_root={tmp_path}"))
    assert len(held) == 1 and len(keep) == 8 and "no split 'test'" in held.description


def test_summary_counts_the_questions_really_scored(tmp_path):
    from vispo.rewards import RewardRunner
    from vispo.train.run import summary_table
    from vispo.train.trainer import Trainer

    data = _jsonl(tmp_path / "d.jsonl", _rows(_images(tmp_path, 15)))
    cfg = load_config(
        None,
        [
            "model.name_or_path=tiny:qwen2_vl",
            f"data.name={data}",
            "data.eval_size=300",
            "train.steps=1",
            "train.prompts_per_step=2",
            "rollout.n=2",
            "rollout.max_new_tokens=3",
            f"train.out_dir={tmp_path / 'run'}",
            "logging.progress=false",
            "train.samples_every=0",
        ],
    )
    trainer = Trainer(cfg, reward_fn=RewardRunner("exact", num_workers=0))
    trainer.train()
    assert len(trainer.eval_data) == 3 and len(trainer.train_data) == 12
    from rich.console import Console

    console = Console(width=250, record=True)
    console.print(summary_table(trainer, [], 1.0))
    text = console.export_text()
    assert "held-out accuracy (3 questions held out of the training data" in text
    assert "300 questions" not in text


def _layouts(tmp_path):
    """The same four questions in each accepted layout."""
    paths = _images(tmp_path, 4)
    qa = [(f"Colour {i}?", f"c{i}") for i in range(4)]
    layouts = {
        "trl.jsonl": [{"prompt": q, "image": p, "solution": a} for (q, a), p in zip(qa, paths)],
        "trl_conv.jsonl": [
            {
                "prompt": [
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": q}],
                    }
                ],
                "images": [p],
                "solution": a,
            }
            for (q, a), p in zip(qa, paths)
        ],
        "easyr1.json": [
            {"problem": "<image>" + q, "images": [p], "answer": a} for (q, a), p in zip(qa, paths)
        ],
        "sharegpt.json": [
            {
                "conversations": [
                    {"from": "human", "value": "<image>" + q},
                    {"from": "gpt", "value": a},
                ],
                "images": [p],
            }
            for (q, a), p in zip(qa, paths)
        ],
        "messages.jsonl": [
            {
                "messages": [
                    {"role": "user", "content": "<image>" + q},
                    {"role": "assistant", "content": a},
                ],
                "images": [p],
            }
            for (q, a), p in zip(qa, paths)
        ],
    }
    files = {}
    for name, rows in layouts.items():
        path = tmp_path / name
        if name.endswith(".jsonl"):
            _jsonl(path, rows)
        else:
            path.write_text(json.dumps(rows))
        files[name] = path
    import pandas as pd

    pd.DataFrame(layouts["easyr1.json"]).to_parquet(tmp_path / "easyr1.parquet")
    files["easyr1.parquet"] = tmp_path / "easyr1.parquet"
    return files, qa


def test_eval_data_reads_every_layout(tmp_path):
    from vispo.eval import data_file_benchmark

    files, qa = _layouts(tmp_path)
    for name, path in files.items():
        data = data_file_benchmark(path).load()
        assert [s.answer for s in data] == [a for _, a in qa], name
        assert [s.question.replace("<image>", "") for s in data] == [q for q, _ in qa], name
        assert all(len(s.images) == 1 for s in data), name
        assert data[0].load_images()[0].size == (32, 32), name


def test_vispo_eval_data_flag_and_errors(tmp_path, capsys):
    from vispo.cli import main

    files, _ = _layouts(tmp_path)
    code = main(
        [
            "eval",
            "tiny:qwen2_vl",
            "--data",
            str(files["trl.jsonl"]),
            "--data",
            str(files["sharegpt.json"]),
            "--k",
            "0",
            "--max-new-tokens",
            "2",
            "--out",
            str(tmp_path / "ev"),
            "--no-progress",
        ]
    )
    assert code == 0
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert {k: v["n"] for k, v in result["benchmarks"].items()} == {
        "trl.jsonl": 4,
        "sharegpt.json": 4,
    }
    capsys.readouterr()
    assert main(["eval", "tiny:qwen2_vl", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


@pytest.mark.parametrize("rows", [[{"question": "q?"}]])
def test_eval_data_without_answers_is_a_clear_error(tmp_path, rows):
    from vispo.eval import BenchmarkError, data_file_benchmark

    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(BenchmarkError, match="no answer column"):
        data_file_benchmark(path).load()
