"""The collapse guard on synthetic metric traces."""

import math

from vispo.train.guard import CollapseGuard


def _stable(step):
    # Small deterministic wiggle around fixed levels.
    w = 0.01 * math.sin(step)
    return {
        "perception/kl_mean": 0.05 + w,
        "clip/high": 0.02 + 0.1 * w,
        "entropy/orig": 1.0 + w,
        "entropy/mask": 1.1 + w,
    }


def test_guard_flags_the_surge_step_only():
    guard = CollapseGuard(window=20, min_history=10, z_threshold=4.0, min_signals=2)
    events = []
    for step in range(1, 31):
        m = _stable(step)
        if step == 25:  # KL_prcp hacking: KL and both entropies jump
            m.update({"perception/kl_mean": 0.6, "entropy/orig": 3.0, "entropy/mask": 3.5})
        e = guard.observe(step, m)
        if e:
            events.append(e)
    assert [e.step for e in events] == [25]
    assert set(events[0].signals) == {"perception/kl_mean", "entropy/orig", "entropy/mask"}


def test_one_signal_is_not_enough_and_history_is_required():
    guard = CollapseGuard(min_history=10, min_signals=2)
    for step in range(1, 20):
        m = _stable(step)
        if step == 15:
            m["clip/high"] = 0.9
        assert guard.observe(step, m) is None
    early = CollapseGuard(min_history=10)
    surge = {
        "perception/kl_mean": 100.0,
        "clip/high": 1.0,
        "entropy/orig": 9.0,
        "entropy/mask": 9.0,
    }
    for step in range(1, 10):  # fewer than min_history steps seen: no judgement
        assert early.observe(step, surge if step == 9 else _stable(step)) is None


def test_halve_gamma_action_and_state_round_trip():
    guard = CollapseGuard(min_history=5, action="halve_gamma")
    for step in range(1, 8):
        guard.observe(step, _stable(step))
    spike = {"perception/kl_mean": 5.0, "clip/high": 0.9, "entropy/orig": 1.0, "entropy/mask": 1.1}
    assert guard.observe(8, spike).action == "halve_gamma"
    assert guard.gamma_scale == 0.5
    restored = CollapseGuard(min_history=5, action="halve_gamma")
    restored.load_state_dict(guard.state_dict())
    assert restored.gamma_scale == 0.5 and restored.events[0].step == 8
    assert {k: list(v) for k, v in restored.history.items()} == {
        k: list(v) for k, v in guard.history.items()
    }
