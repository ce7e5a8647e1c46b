"""docs/data.md's runnable example, run exactly as written (its code blocks are read from the
page), and the held-out rules it states."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from vispo.cli import main

DOC = Path(__file__).resolve().parent.parent / "docs" / "data.md"


def _example_blocks() -> tuple[str, list[list[str]]]:
    """(the Python script, the shell commands) of the page's "A runnable example" section."""
    text = DOC.read_text(encoding="utf-8").split("## A runnable example", 1)[1]
    python = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    bash = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = [shlex.split(c) for c in bash.replace("\\\n", " ").strip().splitlines()]
    return python, commands


def test_the_data_page_example_runs_as_written(tmp_path, monkeypatch, capsys):
    python, commands = _example_blocks()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "250")  # the summary table on one line per row
    (tmp_path / "make_data.py").write_text(python)
    assert commands[0] == ["python", "make_data.py"]
    subprocess.run([sys.executable, "make_data.py"], check=True, cwd=tmp_path)
    pngs = sorted((tmp_path / "my_shapes" / "images").glob("*.png"))
    assert len(pngs) == 12
    train_rows = (tmp_path / "my_shapes" / "train.jsonl").read_text().splitlines()
    assert len(train_rows) == 9

    train, eval_own, eval_file = commands[1:]
    assert train[0] == eval_own[0] == eval_file[0] == "vispo"
    assert main(train[1:]) == 0
    out = capsys.readouterr().out
    assert "held-out set: 3 questions of my_shapes/test.jsonl (split test)" in out
    assert "held-out accuracy (3 questions of my_shapes/test.jsonl (split test); greedy)" in out
    run = tmp_path / "runs" / "my_shapes"
    state = json.loads((run / "checkpoints" / "step-000003" / "state.json").read_text())

    assert main(eval_own[1:]) == 0
    result = json.loads((run / "eval" / "eval.json").read_text())
    assert list(result["benchmarks"]) == ["held-out"]
    assert result["benchmarks"]["held-out"]["n"] == 3
    records = [json.loads(x) for x in (run / "eval" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == ["shape-10", "shape-11", "shape-9"]
    # The same questions, weights, template, reward and greedy decoding as training's final
    # held-out evaluation: the same accuracy.
    score = result["modes"]["greedy"]["summary"]["benchmarks"]["held-out"]["score"]
    assert score == state["eval"]["accuracy_after"]

    assert main(eval_file[1:]) == 0
    result = json.loads((run / "eval" / "eval.json").read_text())
    assert list(result["benchmarks"]) == ["train.jsonl"]
    assert result["benchmarks"]["train.jsonl"]["n"] == 9
