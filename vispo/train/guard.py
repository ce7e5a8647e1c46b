"""Collapse guard for KL_prcp hacking (algorithms.md 6.4).

Maximising an unbounded perception KL lets the policy emit image-unrelated tokens. Its
precursors: the perception KL rises sharply, the high-side clip fraction keeps rising, and the
entropy of both the original and the masked path surges. The guard compares each of these to
its recent history with a robust z-score ``(x - median) / (1.4826 * MAD)``; when at least
``min_signals`` of them surge in the same step it acts: warn, halve gamma, or stop.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

WATCHED = ("perception/kl_mean", "clip/high", "entropy/orig", "entropy/mask")


@dataclass
class GuardEvent:
    step: int
    signals: dict[str, float]  # metric -> z-score
    action: str


@dataclass
class CollapseGuard:
    window: int = 20
    min_history: int = 10
    z_threshold: float = 4.0
    min_signals: int = 2
    action: str = "warn"
    gamma_scale: float = 1.0
    history: dict[str, deque] = field(default_factory=dict)
    events: list[GuardEvent] = field(default_factory=list)

    def zscores(self, metrics: dict[str, float]) -> dict[str, float]:
        out = {}
        for key in WATCHED:
            hist = self.history.get(key)
            if key not in metrics or hist is None or len(hist) < self.min_history:
                continue
            med = statistics.median(hist)
            mad = statistics.median(abs(h - med) for h in hist)
            scale = max(1.4826 * mad, 1e-3 * max(abs(med), 1e-3))
            out[key] = (metrics[key] - med) / scale
        return out

    def observe(self, step: int, metrics: dict[str, float]) -> GuardEvent | None:
        """Judge this step against the history, then add it to the history."""
        surging = {k: z for k, z in self.zscores(metrics).items() if z > self.z_threshold}
        event = None
        if len(surging) >= self.min_signals:
            event = GuardEvent(step=step, signals=surging, action=self.action)
            if self.action == "halve_gamma":
                self.gamma_scale *= 0.5
            self.events.append(event)
        for key in WATCHED:
            if key in metrics:
                self.history.setdefault(key, deque(maxlen=self.window)).append(metrics[key])
        return event

    def state_dict(self) -> dict:
        return {
            "gamma_scale": self.gamma_scale,
            "history": {k: list(v) for k, v in self.history.items()},
            "events": [e.__dict__ for e in self.events],
        }

    def load_state_dict(self, state: dict) -> None:
        self.gamma_scale = state["gamma_scale"]
        self.history = {k: deque(v, maxlen=self.window) for k, v in state["history"].items()}
        self.events = [GuardEvent(**e) for e in state["events"]]
