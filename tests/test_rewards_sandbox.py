"""RewardRunner: worker pool, timeouts, validation, per-sample isolation, clean shutdown.

The misbehaving reward lives in a file written by a fixture and is loaded with
``load_reward_fn`` (which is also how it reaches the spawned workers). It scores a completion
by its length, and misbehaves on a few magic completions. One pool runner is shared by the
module (spawning workers is the slow part); tests compare error-count differences.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import time

import pytest

from vispo.rewards import (
    ERROR_KINDS,
    Limits,
    RewardError,
    RewardRunner,
    load_reward_fn,
    reference_reward,
)

BAD_REWARD = """
import math, os, time

def reward(completions, answers, **columns):
    out = []
    for c in completions:
        if c == "raise":
            raise ValueError("boom")
        if c == "hang":
            time.sleep(3600)
        if c == "exit":
            os._exit(3)
        if c == "print":
            print("x" * 5_000_000)
            os.write(1, b"y" * 1_000_000)
        if c == "wronglen":
            return [1.0] * (len(completions) + 1)
        if c == "nan":
            out.append(math.nan)
        elif c == "inf":
            out.append({"acc": 1.0, "fmt": math.inf})
        elif c == "str":
            out.append("1.0")
        else:
            out.append(float(len(c)))
    return out

def components(completions, answers, **columns):
    return [{"acc": float(c == a), "fmt": float(c.startswith("<"))} for c, a in zip(completions, answers)]

def echo_column(completions, answers, weight):
    return list(weight)

def not_a_list(completions, answers, **columns):
    return 1.0
"""

TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards") / "bad_rewards.py"
    path.write_text(BAD_REWARD)
    return path


@pytest.fixture(scope="module")
def runner(reward_file):
    fn = load_reward_fn(f"{reward_file}:reward")
    with RewardRunner(fn, num_workers=2, timeout_s=TIMEOUT_S, chunk_size=3) as r:
        yield r


def _errors_since(runner: RewardRunner, before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in runner.errors.items() if v - before.get(k, 0)}


def test_good_batch(runner):
    completions = ["a", "bb", "ccc", "dddd", "eeeee", "ffffff", "g"]
    result = runner(completions, ["x"] * 7)
    assert result.total == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1.0]
    assert result.components == {}
    assert result.n_errors == 0


def test_every_failure_zeroes_only_its_sample(runner, capfd):
    completions = [
        "a",
        "raise",
        "ccc",
        "nan",
        "str",
        "hang",
        "wronglen",
        "print",
        "exit",
        "ee",
        "inf",
    ]
    before = dict(runner.errors)
    t0 = time.perf_counter()
    result = runner(completions, ["x"] * len(completions))
    elapsed = time.perf_counter() - t0
    # len("print") = 5: printing is not an error. "inf" is a dict whose component is infinite.
    assert result.total == [1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0, 2.0, 0.0]
    assert result.n_errors == 7
    assert _errors_since(runner, before) == {
        "exception": 1,
        "nan": 2,
        "bad_type": 1,
        "timeout": 1,
        "wrong_length": 1,
        "crash": 1,
    }
    # One chunk times out (1 s), its samples are retried alone and the hang times out again
    # (1 s); replacement workers start in well under a second each.
    assert elapsed < 2 * TIMEOUT_S + 4.0
    # 6 MB were printed; none of it reached this process's stdout or stderr.
    out, err = capfd.readouterr()
    assert len(out) + len(err) < 10_000


def test_runner_keeps_working_after_failures(runner):
    assert runner(["abc", "de"], ["x", "y"]).total == [3.0, 2.0]
    assert len(runner.worker_pids) == 2


def test_hang_alone_finishes_within_the_timeout_budget(runner):
    before = dict(runner.errors)
    t0 = time.perf_counter()
    result = runner(["hang"], ["x"])  # a single sample: no retry
    elapsed = time.perf_counter() - t0
    assert result.total == [0.0] and result.n_errors == 1
    assert _errors_since(runner, before) == {"timeout": 1}
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 2.0


def test_retry_budget_bounds_a_batch_of_hangs(reward_file):
    fn = load_reward_fn(f"{reward_file}:reward")
    with RewardRunner(fn, num_workers=1, timeout_s=0.5, chunk_size=4, retry_budget_s=0.0) as r:
        t0 = time.perf_counter()
        result = r(["hang", "a", "hang", "bb"], ["x"] * 4)
        elapsed = time.perf_counter() - t0
    # The chunk times out; with no retry budget its samples are not retried.
    assert result.total == [0.0, 0.0, 0.0, 0.0]
    assert r.errors == {"timeout": 4}
    assert elapsed < 0.5 + 3.0


def test_columns_are_sliced_with_their_samples(reward_file):
    fn = load_reward_fn(f"{reward_file}:echo_column")
    with RewardRunner(fn, num_workers=2, timeout_s=5.0, chunk_size=2) as r:
        weights = [0.5, 1.5, 2.5, 3.5, 4.5]
        result = r(["a"] * 5, ["b"] * 5, weight=weights)
        pids = r.worker_pids
    assert result.total == weights
    _assert_gone(pids)


def _assert_gone(pids: list[int]) -> None:
    assert pids
    assert not [p for p in mp.active_children() if p.pid in pids]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_close_leaves_no_processes(reward_file):
    fn = load_reward_fn(f"{reward_file}:reward")
    r = RewardRunner(fn, num_workers=2, timeout_s=TIMEOUT_S)
    assert r(["ab"], ["x"]).total == [2.0]
    pids = r.worker_pids
    assert len(pids) == 2
    r(["exit"], ["x"])  # a crashed worker is reaped and replaced
    pids += r.worker_pids
    r.close()
    r.close()  # idempotent
    _assert_gone(pids)
    with pytest.raises(RuntimeError, match="closed"):
        r(["a"], ["b"])


def test_composite_reward_by_name_uses_its_weights():
    with RewardRunner("reference", num_workers=1, timeout_s=10.0) as r:
        assert r.weights == {"accuracy": 0.9, "format": 0.1}
        result = r(
            ["<think>t</think>\\boxed{5}", "\\boxed{5}", "<think>t</think>\\boxed{6}"],
            ["5", "5", "5"],
            question=["q1", "q2", "q3"],
        )
    assert result.total == pytest.approx([1.0, 0.9, 0.1])
    assert result.components == {"accuracy": [1.0, 1.0, 0.0], "format": [1.0, 0.0, 1.0]}


def test_a_reward_that_cannot_load_is_a_clear_error_at_construction(tmp_path):
    path = tmp_path / "r.py"
    path.write_text("def f(c, a, **kw):\n    return [0.0] * len(c)\n")
    with pytest.raises(RewardError, match=r"defines no 'g'; callables there: f"):
        RewardRunner(f"{path}:g", num_workers=1, timeout_s=5.0)
    (tmp_path / "bad.py").write_text("import no_such_module_xyz\n")
    with pytest.raises(RewardError, match="No module named 'no_such_module_xyz'"):
        RewardRunner(f"{tmp_path / 'bad.py'}:f", num_workers=1, timeout_s=5.0)
    with pytest.raises(FileNotFoundError, match="reward file not found"):
        RewardRunner(f"{tmp_path / 'missing.py'}:f", num_workers=1)


def test_unpicklable_reward_is_refused_before_spawning():
    with pytest.raises(TypeError, match="cannot be sent to worker processes"):
        RewardRunner(lambda c, a, **kw: [0.0] * len(c), num_workers=1)


# --------------------------------------------------------------------------------------------
# In-process mode: same validation, no processes
# --------------------------------------------------------------------------------------------


def test_in_process_mode_validates_like_the_pool(reward_file):
    fn = load_reward_fn(f"{reward_file}:reward")
    r = RewardRunner(fn, num_workers=0)
    result = r(["a", "raise", "nan", "wronglen", "str", "bbb", "inf"], ["x"] * 7)
    assert result.total == [1.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0]
    assert r.errors == {"exception": 1, "nan": 2, "wrong_length": 1, "bad_type": 1}
    assert r.n_errors == 5
    assert r.error_metrics()["reward/errors/nan"] == 2
    assert set(r.error_metrics()) == {f"reward/errors/{k}" for k in ERROR_KINDS}
    assert r.worker_pids == []


def test_in_process_printing_is_capped(reward_file, capsys):
    fn = load_reward_fn(f"{reward_file}:reward")
    r = RewardRunner(fn, num_workers=0, output_limit=100)
    assert r(["print"], ["x"]).total == [5.0]
    out, err = capsys.readouterr()
    assert "x" * 200 not in out + err


def test_dict_outputs_with_configured_weights(reward_file):
    fn = load_reward_fn(f"{reward_file}:components")
    r = RewardRunner(fn, num_workers=0, weights={"acc": 0.9})  # fmt keeps weight 1
    result = r(["<5", "5", "<4"], ["<5", "5", "5"])
    assert result.components == {"acc": [1.0, 1.0, 0.0], "fmt": [1.0, 0.0, 1.0]}
    assert result.total == pytest.approx([1.9, 0.9, 1.0])


def test_non_list_result_is_bad_type_for_every_sample(reward_file):
    r = RewardRunner(load_reward_fn(f"{reward_file}:not_a_list"), num_workers=0)
    result = r(["a", "b"], ["x", "y"])
    assert result.total == [0.0, 0.0]
    assert r.errors == {"bad_type": 2}


def test_each_kind_is_logged_once_with_the_sample_id(reward_file, caplog):
    r = RewardRunner(load_reward_fn(f"{reward_file}:reward"), num_workers=0)
    with caplog.at_level(logging.WARNING, logger="vispo.rewards.sandbox"):
        r(["a", "raise", "nan"], ["x"] * 3, sample_ids=["s0", "s1", "s2"])
        r(["raise", "nan", "nan"], ["x"] * 3, sample_ids=["t0", "t1", "t2"])
    messages = [rec.getMessage() for rec in caplog.records]
    assert len(messages) == 2
    assert any("exception on sample s1" in m and "boom" in m for m in messages)
    assert any("nan on sample s2" in m for m in messages)
    assert r.errors == {"exception": 2, "nan": 3}


def test_bad_arguments_are_clear_errors(reward_file):
    fn = load_reward_fn(f"{reward_file}:reward")
    r = RewardRunner(fn, num_workers=0)
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        r(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="column 'weight' has 1 values"):
        r(["a", "b"], ["x", "y"], weight=[1.0])
    with pytest.raises(TypeError, match="column 'weight'"):
        r(["a", "b"], ["x", "y"], weight="ab")
    with pytest.raises(ValueError, match="sample_ids"):
        r(["a"], ["x"], sample_ids=[1, 2])
    assert r([], []).total == []
    for kwargs, field in [
        ({"num_workers": -1}, "num_workers"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"mp_context": "fork"}, "mp_context"),
        ({"retry_budget_s": -1.0}, "retry_budget_s"),
    ]:
        with pytest.raises(ValueError, match=field):
            RewardRunner(fn, **kwargs)


def test_in_process_reference_reward_matches_direct_scoring():
    completions = ["<think>a</think>\\boxed{\\frac{1}{2}}", "\\boxed{0.4}", "0.5"]
    direct = reference_reward().score(completions, ["0.5"] * 3)
    via_runner = RewardRunner("reference", num_workers=0)(completions, ["0.5"] * 3)
    assert via_runner == direct
    assert direct.total == pytest.approx([1.0, 0.0, 0.9])
    assert not math.isnan(sum(direct.total))


# --------------------------------------------------------------------------------------------
# Rewards the trainer cannot use, isolation defaults
# --------------------------------------------------------------------------------------------


def test_values_that_overflow_float32_are_nan_errors():
    def overflow(completions, answers, **columns):
        return [{"big": 1e39}, 2.0, {"a": 3e38, "b": 3e38}, -3.5e38, 10**400]

    r = RewardRunner(overflow, num_workers=0, max_consecutive_failures=0)
    result = r(["a"] * 5, ["x"] * 5)
    assert result.total == [0.0, 2.0, 0.0, 0.0, 0.0]
    assert r.errors == {"nan": 4}


def test_a_reward_failing_on_every_call_stops_after_the_configured_count(reward_file):
    r = RewardRunner(
        load_reward_fn(f"{reward_file}:reward"), num_workers=0, max_consecutive_failures=3
    )
    r(["raise"], ["x"])
    r(["raise"], ["x"])
    r(["ok", "raise"], ["x", "x"])  # one sample scored: the count starts again
    r(["raise"], ["x"])
    r(["raise"], ["x"])
    with pytest.raises(RewardError, match=r"failed on every sample of 3 calls in a row .*boom"):
        r(["raise"], ["x"])
    with pytest.raises(RuntimeError, match="closed"):
        r(["a"], ["x"])


def test_a_file_reward_in_workers_reports_its_weights(tmp_path):
    path = tmp_path / "weighted.py"
    path.write_text(
        "from vispo.rewards import CompositeReward\n"
        "def acc(c, a):\n    return float(c == a)\n"
        "r = CompositeReward({'acc': (acc, 0.25), 'len': (lambda c, a: float(len(c)), 1.0)})\n"
    )
    with RewardRunner(f"{path}:r", num_workers=1, timeout_s=10.0) as runner:
        assert runner.weights == {"acc": 0.25, "len": 1.0}
        assert runner(["x", "yy"], ["x", "x"]).total == [1.25, 2.0]


def test_the_config_sets_the_worker_limits(monkeypatch, tmp_path):
    from vispo.train import setup as train_setup
    from vispo.train.config import RewardConfig

    made = {}

    class Recorder:
        def __init__(self, name, **kwargs):
            made.update(kwargs)

    monkeypatch.setattr(train_setup, "RewardRunner", Recorder)
    cfg = RewardConfig(name=f"{tmp_path / 'r.py'}:f", env=["HF_TOKEN"], memory_mb=100, network=True)
    train_setup.load_reward(cfg)
    assert made["limits"] == Limits(env=("HF_TOKEN",), memory_mb=100, network=True)
    assert made["max_consecutive_failures"] == 5
    default = RewardConfig()
    assert (default.env, default.user, default.network) == ([], "nobody", False)


def test_what_the_os_refuses_is_logged_once_and_the_reward_still_runs(reward_file, caplog):
    limits = Limits(user="no_such_user_vispo")
    with caplog.at_level(logging.WARNING, logger="vispo.rewards.sandbox"):
        with RewardRunner(
            load_reward_fn(f"{reward_file}:reward"), num_workers=2, timeout_s=5.0, limits=limits
        ) as r:
            assert r(["ab", "exit", "abc"], ["x"] * 3).total == [2.0, 0.0, 3.0]  # + a restart
    refused = [n for n in r.isolation_notes if "no_such_user_vispo" in n]
    assert len(refused) == 1 and "cannot switch to user" in refused[0]
    warnings = [m for m in caplog.messages if "refused part of the isolation" in m]
    assert len(warnings) == 1 and "no_such_user_vispo" in warnings[0]
