"""``reward.funcs`` with a reward file: the file's code runs only in the sandbox workers."""

from __future__ import annotations

from vispo.rewards import MultiReward, RewardRunner

SOURCE = """
import os

if os.environ.get("VISPO_TEST_WHERE") == "trainer":
    raise RuntimeError("the reward file was executed in the trainer process")


def length_bonus(completions, answers, **columns):
    return [0.5 if len(c) > 3 else 0.0 for c in completions]
"""


def test_a_reward_file_in_reward_funcs_runs_only_in_the_worker(tmp_path, monkeypatch):
    path = tmp_path / "bonus.py"
    path.write_text(SOURCE)
    path.chmod(0o644)
    tmp_path.chmod(0o755)
    # Set here, not passed to the worker (its environment is minimal): executing the file in
    # this process raises.
    monkeypatch.setenv("VISPO_TEST_WHERE", "trainer")
    multi = MultiReward(["reference", f"{path}:length_bonus"], [1.0, 2.0])
    assert multi.weights == {"accuracy": 0.9, "format": 0.1, "length_bonus": 2.0}
    with RewardRunner(multi, num_workers=1, timeout_s=20) as runner:
        result = runner(["\\\\boxed{4}", "no"], ["4", "4"])
    # accuracy 1 / 0, format 0 (no <think>), length_bonus 0.5 / 0 weighted by 2.
    assert result.components["length_bonus"] == [0.5, 0.0]
    assert result.components["accuracy"] == [1.0, 0.0]
    assert result.total == [0.9 * 1.0 + 2.0 * 0.5, 0.0]
