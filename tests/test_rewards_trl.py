"""Rewards as TRL users write them: several functions with weights, TRL's signature, and the
same columns and timeout in training, evaluation, probe and report."""

from __future__ import annotations

import pytest

from vispo.data import get_template, synthetic_vqa
from vispo.eval.accuracy import greedy_accuracy, reward_inputs
from vispo.rewards import (
    MultiReward,
    RewardRunner,
    TRLReward,
    resolve_reward,
    reward_columns,
    reward_style,
)
from vispo.train.config import ConfigError, load_config
from vispo.train.setup import load_reward

TRL_FILE = '''
def length_bonus(completions, **kwargs):
    """TRL style (only `completions` positional): conversational completions."""
    return [len(c[0]["content"]) / 10.0 for c in completions]


def solution_match(completions, solution, **kwargs):
    """TRL's accuracy_reward shape: the ground truth arrives as `solution`."""
    return [float(c[0]["content"] == s) for c, s in zip(completions, solution)]


def maybe(prompts, completions, completion_ids, **kwargs):
    """None means "does not apply": counted as 0."""
    return [None if c[0]["content"] == "skip" else 1.0 for c in completions]
'''

VISPO_FILE = '''
def starts_with_question_word(completions, answers, question, **columns):
    """vispo style, reading a column: 1 when the completion is the question's first word."""
    return [float(c == q.split()[0]) for c, q in zip(completions, question)]
'''


def test_the_calling_convention_is_read_from_the_parameters():
    def trl_kw(completions, **kwargs): ...
    def trl_solution(completions, solution, **kwargs): ...
    def trl_full(prompts, completions, completion_ids, **kwargs): ...
    def trl_ids(completions, completion_ids): ...
    def vispo_named(completions, answers, **columns): ...
    def vispo_short(c, a, **kw): ...
    def vispo_column(completions, answers, question): ...

    styles = {
        f.__name__: reward_style(f)
        for f in (trl_kw, trl_solution, trl_full, trl_ids, vispo_named, vispo_short, vispo_column)
    }
    assert styles == {
        "trl_kw": "trl",
        "trl_solution": "trl",
        "trl_full": "trl",
        "trl_ids": "trl",
        "vispo_named": "vispo",
        "vispo_short": "vispo",
        "vispo_column": "vispo",
    }
    assert reward_style(resolve_reward("reference")) == "vispo"
    assert isinstance(resolve_reward(trl_kw), TRLReward)
    assert resolve_reward(vispo_named) is vispo_named


def test_a_trl_function_gets_conversations_ids_and_the_dataset_columns():
    seen = {}

    def reward(prompts, completions, completion_ids, **kwargs):
        seen.update(prompts=prompts, completions=completions, ids=completion_ids, kw=kwargs)
        return [1.0, None]

    out = TRLReward(reward)(
        ["yes", "no"],
        ["yes", "yes"],
        question=["Is it red?", "Is it blue?"],
        task=["color", "color"],
        completion_ids=[[5, 6], [7]],
    )
    assert out == [{"reward": 1.0}, {"reward": 0.0}]  # None (does not apply) counts as 0
    assert seen["prompts"] == [
        [{"role": "user", "content": "Is it red?"}],
        [{"role": "user", "content": "Is it blue?"}],
    ]
    assert seen["completions"] == [
        [{"role": "assistant", "content": "yes"}],
        [{"role": "assistant", "content": "no"}],
    ]
    assert seen["ids"] == [[5, 6], [7]]
    kw = seen["kw"]
    assert kw["solution"] == kw["answer"] == ["yes", "yes"]
    assert kw["task"] == ["color", "color"] and kw["question"] == ["Is it red?", "Is it blue?"]


def test_several_functions_with_weights_by_hand(tmp_path):
    trl = tmp_path / "trl_rewards.py"
    trl.write_text(TRL_FILE)
    multi = MultiReward(
        ["reference", f"{trl}:length_bonus", f"{trl}:solution_match", f"{trl}:maybe"],
        [2.0, 0.5, 1.0, 3.0],
    )
    # reference = 0.9 accuracy + 0.1 format, each scaled by 2; then 0.5 length, 1 match, 3 maybe.
    assert multi.weights == {
        "accuracy": pytest.approx(1.8),
        "format": pytest.approx(0.2),
        "length_bonus": 0.5,
        "solution_match": 1.0,
        "maybe": 3.0,
    }
    completions = ["<think>a</think> \\boxed{4}", "skip"]
    answers = ["4", "7"]
    with RewardRunner(multi, num_workers=1, timeout_s=30) as runner:
        result = runner(completions, answers, question=["q1", "q2"])
    assert result.n_errors == 0
    c = result.components
    assert c["accuracy"] == [1.0, 0.0] and c["format"] == [1.0, 0.0]
    assert c["length_bonus"] == pytest.approx([len(completions[0]) / 10, 0.4])
    assert c["solution_match"] == [0.0, 0.0] and c["maybe"] == [1.0, 0.0]
    by_hand = [
        1.8 * 1 + 0.2 * 1 + 0.5 * len(completions[0]) / 10 + 0 + 3 * 1,
        0 + 0 + 0.5 * 0.4 + 0 + 0,
    ]
    assert result.total == pytest.approx(by_hand)
    metrics = result.metrics()
    for name in ("accuracy", "format", "length_bonus", "solution_match", "maybe"):
        assert metrics[f"reward/{name}/mean"] == pytest.approx(sum(c[name]) / 2)


def test_reward_funcs_from_a_config_run_sandboxed_under_its_timeout(tmp_path):
    trl = tmp_path / "trl_rewards.py"
    trl.write_text(TRL_FILE)
    cfg = load_config(
        None, [f"reward.funcs=[math, '{trl}:length_bonus']", "reward.weights=[1, 0.1]"]
    )
    assert cfg.reward.funcs == ["math", f"{trl}:length_bonus"]
    assert cfg.reward.weights == [1.0, 0.1]
    with load_reward(cfg.reward) as runner:
        assert runner.num_workers == 1 and runner.timeout_s == cfg.reward.timeout_s
        result = runner(["cat", "dog!"], ["cat", "cow"])
    assert result.components == {"accuracy": [1.0, 0.0], "length_bonus": [0.3, 0.4]}
    assert result.total == pytest.approx([1.03, 0.04])
    with pytest.raises(ConfigError, match="reward.weights: has 1 values for 2"):
        load_config(None, ["reward.funcs=[math, format]", "reward.weights=[1]"])
    with pytest.raises(ConfigError, match=r"reward.weights\[0\]: expected a number"):
        load_config(None, ["reward.funcs=[math]", "reward.weights=[abc]"])


def _recorder():
    calls = []

    def record(completions, answers, **columns):
        calls.append({k: list(v) for k, v in columns.items()})
        return [{"accuracy": 1.0} for _ in completions]

    return record, calls


def test_a_reward_gets_the_same_columns_in_training_and_evaluation(tmp_path, tiny_vlm):
    from vispo.eval.probe import ProbeSettings, probe_batch
    from vispo.train.trainer import Trainer

    record, calls = _recorder()
    cfg = load_config(
        None,
        [
            "objective.name=grpo",
            "model.name_or_path=tiny:qwen2_vl",
            "data.name=synthetic",
            "data.synthetic_size=8",
            "data.eval_size=0",
            "train.steps=1",
            "train.prompts_per_step=2",
            "rollout.n=2",
            "rollout.max_new_tokens=4",
            "logging.progress=false",
            f"train.out_dir={tmp_path / 'run'}",
        ],
    )
    trainer = Trainer(cfg, reward_fn=RewardRunner(record, num_workers=0))
    trainer.step()
    train_cols = calls[-1]
    groups = trainer._last_step.groups
    texts = [t for g in groups for t in g.texts]
    tok = trainer.processor.tokenizer
    # The generated ids decode to the completions the reward scored.
    assert [tok.decode(ids, skip_special_tokens=True) for ids in train_cols["completion_ids"]] == (
        texts
    )
    assert train_cols["question"] == [g.sample.question for g in groups for _ in g.texts]

    model, processor = tiny_vlm("qwen2_vl")
    samples = list(synthetic_vqa(3, seed=5, image_size=64, split="test"))
    template = get_template("short")
    greedy_accuracy(
        model, processor, samples, template, RewardRunner(record, num_workers=0), max_new_tokens=4
    )
    eval_cols = calls[-1]
    probe_batch(
        model,
        processor,
        samples,
        template,
        ProbeSettings(),
        max_new_tokens=4,
        reward=RewardRunner(record, num_workers=0),
    )
    probe_cols = calls[-1]
    assert set(train_cols) == set(eval_cols) == set(probe_cols)
    assert {"question", "completion_ids", "task", "split"} <= set(train_cols)
    assert eval_cols["question"] == [s.question for s in samples]
    assert eval_cols["task"] == [s.meta["task"] for s in samples]


def test_a_column_reading_reward_file_scores_in_vispo_eval(tmp_path, tiny_vlm):
    """The bug of issue 17: such a reward worked in training and scored 0 in evaluation."""
    from vispo.eval.benchmarks import GENERAL, Benchmark
    from vispo.eval.loading import LoadedModel
    from vispo.eval.runner import EvalSettings, evaluate_model

    path = tmp_path / "qreward.py"
    path.write_text(
        "def r(completions, answers, question, **columns):\n"
        "    return [{'accuracy': float(bool(q) and 'task' in columns)} for q in question]\n"
    )
    model, processor = tiny_vlm("qwen2_vl")
    bench = Benchmark(
        "toy",
        GENERAL,
        lambda root, limit: synthetic_vqa(4, seed=1, image_size=64, split="test")[:limit],
        template="short",
    )
    result = evaluate_model(
        LoadedModel(model, processor, "tiny:qwen2_vl", "tiny"),
        [bench],
        tmp_path / "out",
        EvalSettings(k=1, greedy=False, max_new_tokens=3, reward=f"{path}:r", batch_size=4),
        progress=False,
    )
    summary = next(iter(result["modes"].values()))["summary"]
    assert summary["benchmarks"]["toy"]["score"] == pytest.approx(1.0)


def test_eval_probe_report_build_the_runs_reward_with_its_timeout(tmp_path):
    from vispo.eval.runner import _run_reward, open_reward

    trl = tmp_path / "trl_rewards.py"
    trl.write_text(TRL_FILE)
    cfg = load_config(
        None,
        [f"reward.funcs=[math, '{trl}:solution_match']", "reward.timeout_s=3.5"],
    )
    name = _run_reward(cfg)
    assert name == f"1*math + 1*{trl}:solution_match"
    with open_reward(name, cfg) as runner:
        assert runner.timeout_s == 3.5 and runner.num_workers == 1
        assert isinstance(runner.fn, MultiReward)
        assert runner(["a"], ["a"]).components == {"accuracy": [1.0], "solution_match": [1.0]}
    with open_reward("exact", cfg) as runner:  # another reward: the run's timeout still
        assert runner.timeout_s == 3.5 and runner.num_workers == 0


def test_reward_columns_repeat_and_leave_out_reserved_names():
    from vispo.data.sample import Sample

    a = Sample(id="a", question="qa", answer="1", meta={"task": "t", "answers": "x"})
    b = Sample(id="b", question="qb", answer="2", meta={"extra": 3})
    cols = reward_columns([a, b], repeat=2, completion_ids=[[1], [2], [3], [4]])
    assert cols == {
        "question": ["qa", "qa", "qb", "qb"],
        "task": ["t", "t", None, None],
        "extra": [None, None, 3, 3],
        "completion_ids": [[1], [2], [3], [4]],
    }
    with pytest.raises(ValueError, match="3 completion_ids for 4"):
        reward_columns([a, b], repeat=2, completion_ids=[[1], [2], [3]])
    inputs = reward_inputs([a], ["x y"], None)
    assert inputs["sample_ids"] == ["a"] and "completion_ids" not in inputs


def test_a_function_without_kwargs_gets_only_the_columns_it_names():
    def vispo_fn(completions, answers, question):
        return [float(q == "q") for q in question]

    def trl_fn(completions, solution, trainer_state):
        assert trainer_state is None
        return [float(c[0]["content"] == s) for c, s in zip(completions, solution)]

    cols = {"question": ["q", "x"], "task": ["t", "t"], "completion_ids": [[1], [2]]}
    with RewardRunner(vispo_fn, num_workers=0) as runner:
        assert runner(["a", "b"], ["a", "a"], **cols).total == [1.0, 0.0]
    with RewardRunner(trl_fn, num_workers=0) as runner:
        result = runner(["a", "b"], ["a", "a"], **cols)
        assert result.n_errors == 0 and result.components == {"trl_fn": [1.0, 0.0]}
