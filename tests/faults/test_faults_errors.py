"""Expected failures of ``vispo train``: one ``error: ...`` line, no traceback, and (all but
one) before the model loads.

Each case runs the real CLI entry (``vispo.cli.main``) in this process with the model loader
replaced by one that records the call, so "before the model loads" is observed, not assumed;
the one case that needs the tokenizer (every prompt too long) loads the tiny model for real.
A YAML alias bomb (9 levels of 9 aliases: 387 million strings once expanded) must be refused
within a bounded time and memory, measured with tracemalloc.
"""

from __future__ import annotations

import json
import os
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from faultkit import TINY

from vispo import cli
from vispo.train import setup as train_setup
from vispo.train.config import ConfigError, load_config
from vispo.train.logging import MetricsLog

pytestmark = pytest.mark.faults


def _bomb(levels: int = 9, width: int = 9) -> str:
    """``train.steps`` set to a list of lists whose last element expands to width**levels."""
    parts = ["&a [" + ", ".join(['"lol"'] * width) + "]"]
    names = "abcdefghijklmnopqrstuvwxyz"
    for i in range(1, levels):
        parts.append(f"&{names[i]} [" + ", ".join([f"*{names[i - 1]}"] * width) + "]")
    return "[" + ", ".join(parts) + "]"


def _cases(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(what, extra overrides, text the error line must contain)."""
    no_fn = tmp / "no_fn.py"
    no_fn.write_text("def other(completions, answers, **columns):\n    return [0.0]\n")
    broken = tmp / "broken.py"
    broken.write_text("def parity(completions, answers:\n")
    a_file = tmp / "a_file"
    a_file.write_text("not a folder")
    bad_rows = tmp / "bad.jsonl"
    bad_rows.write_text(
        "".join(json.dumps({"question": f"q{i}", "answer": ""}) + "\n" for i in range(3))
    )
    if os.geteuid() == 0 and Path("/sys").is_dir():  # root ignores permission bits
        unwritable = "/sys/vispo-fault-test/run"
    else:
        locked = tmp / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        unwritable = str(locked / "run")
    return [
        ("reward file missing", [f"reward.name={tmp}/missing.py:parity"], "reward file not found"),
        ("reward function missing", [f"reward.name={no_fn}:parity"], "defines no 'parity'"),
        ("reward file not Python", [f"reward.name={broken}:parity"], "is not valid Python"),
        ("unknown reward name", ["reward.name=mathh"], "did you mean 'math'"),
        ("out_dir is a file", [f"train.out_dir={a_file}"], "exists and is not a folder"),
        ("out_dir below a file", [f"train.out_dir={a_file}/run"], "is not a folder"),
        ("out_dir not writable", [f"train.out_dir={unwritable}"], "cannot write to"),
        (
            "no usable samples (all bad)",
            [f"data.name={bad_rows}"],
            "no usable training samples (all 3 skipped",
        ),
        ("tensorboard missing", ["logging.tensorboard=true"], "pip install 'vispo[tensorboard]'"),
        ("wandb missing", ["logging.wandb=true"], "pip install 'vispo[wandb]'"),
    ]


def _run_cli(args: list[str], capsys) -> tuple[int | None, str, str]:
    try:
        code = cli.main(["train", *args])
    except BaseException as e:  # noqa: BLE001 (a traceback is the failure being tested)
        out = capsys.readouterr()
        return None, out.out, out.err + f"\nTraceback: {type(e).__name__}: {e}"
    out = capsys.readouterr()
    return code, out.out, out.err


def test_expected_failures_are_one_line_before_the_model_loads(
    tmp_path, capsys, monkeypatch, fault_table
):
    loaded = []

    def no_model(mcfg):
        loaded.append(mcfg.name_or_path)
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("vispo.train.trainer.load_model", no_model)
    # Absent packages, also where they happen to be installed (None in sys.modules: not found).
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "wandb", None)
    results = {}
    for what, extra, expected in _cases(tmp_path):
        loaded.clear()
        out_dir = [f"train.out_dir={tmp_path / 'runs' / what.replace(' ', '_')}"]
        code, out, err = _run_cli([*TINY, *out_dir, *extra], capsys)
        lines = [x for x in err.splitlines() if x.strip()]
        results[what] = {
            "code": code,
            "one error line": len(lines) == 1 and lines[0].startswith("error: "),
            "names the cause": expected in err,
            "no traceback": "Traceback" not in out + err,
            "before the model": not loaded,
            "err": err[-500:],
        }
    failed = {
        k: v
        for k, v in results.items()
        if not (v["code"] == 2 and all(x for key, x in v.items() if key not in ("code", "err")))
    }
    fault_table(
        "errors",
        "expected failures: reward, run folder, data, logging packages",
        len(results),
        len(results) - len(failed),
        lost="-",
        detail="exit 2, one 'error:' line, no traceback, model never loaded",
    )
    assert not failed, failed


def test_no_usable_sample_after_the_length_filter_is_one_line(tmp_path, capsys):
    """Every prompt longer than data.max_prompt_length: known only with the tokenizer, so after
    the model loads, but still one line and exit 2."""
    out = tmp_path / "run"
    code, stdout, err = _run_cli(
        [*TINY, "data.max_prompt_length=1", f"train.out_dir={out}"], capsys
    )
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2, stdout + err
    assert len(lines) == 1 and lines[0].startswith("error: data.name='easy-vqa': no usable"), err
    assert "longer than data.max_prompt_length=1 tokens" in lines[0]
    assert "Traceback" not in stdout + err


def test_metrics_log_without_the_package_is_a_config_error(tmp_path, monkeypatch):
    """The library path (a Trainer built in Python) says the same as the CLI."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r"pip install 'vispo\[tensorboard\]'"):
        MetricsLog(tmp_path, tensorboard=True)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"pip install 'vispo\[wandb\]'"):
        MetricsLog(tmp_path, wandb=True)


def test_reward_spec_is_read_not_run(tmp_path):
    """The pre-flight check parses the reward file: module-level code does not run, and names
    bound in any top-level way count (def, assignment, import, inside if/try)."""
    marker = tmp_path / "ran"
    path = tmp_path / "reward.py"
    path.write_text(
        f"open({str(marker)!r}, 'w').write('x')\n"
        "try:\n    from math import fsum as summed\nexcept ImportError:\n    summed = sum\n"
        "if True:\n    def parity(c, a, **k):\n        return [0.0] * len(c)\n"
        "scaled = lambda c, a, **k: [1.0] * len(c)\n"
    )
    for name in ("parity", "summed", "scaled"):
        train_setup.check_reward_spec(f"{path}:{name}")
    assert not marker.exists()
    with pytest.raises(ConfigError, match="names there: parity, scaled, summed"):
        train_setup.check_reward_spec(f"{path}:missing")


@pytest.mark.parametrize("where", ["file", "override"])
def test_yaml_alias_bomb_is_refused_in_bounded_memory(tmp_path, where, fault_table):
    text = _bomb()
    tracemalloc.start()
    start = time.perf_counter()
    try:
        if where == "file":
            path = tmp_path / "bomb.yaml"
            path.write_text(f"train:\n  steps: {text}\n")
            with pytest.raises(ConfigError) as info:
                load_config(path)
        else:
            with pytest.raises(ConfigError) as info:
                load_config(None, [f"train.steps={text}"])
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(info.value)
    held = peak < 20e6 and seconds < 10 and len(message) < 300 and "alias" in message
    fault_table(
        "errors",
        f"YAML alias bomb (9^9 = 387M values) in a config {where}",
        1,
        int(held),
        lost="-",
        detail=f"refused in {seconds:.2f} s, peak {peak / 1e3:.0f} kB",
    )
    assert held, (message, peak, seconds)


def test_error_messages_bound_the_values_they_show():
    """A long or deep value in a wrong place is shown cut short, never in full."""
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.steps=" + "x" * 100_000])
    assert str(info.value).startswith("train.steps: expected an integer")
    assert len(str(info.value)) < 300
    deep = "[" * 50 + "]" * 50
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"train.steps={deep}"])
    assert len(str(info.value)) < 300
