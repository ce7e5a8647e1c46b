"""From records to numbers: arms by seed, the tuning choice, paired comparisons per metric
and per evaluated step."""

from __future__ import annotations

from collections.abc import Mapping

from .plan import ARM_BY_KEY, BEFORE, COMPARISONS, Comparison, Settings, aliases, chosen_lr
from .stats import Paired, curves_by_step, paired_by_seed

#: Final metrics compared between arms: key, label, scale of the table (100: points).
METRICS = (
    ("test/real", "test accuracy (real image)"),
    ("test/drop", "real - gray drop (looking)"),
    ("cf", "easy-vqa-cf accuracy"),
    ("test/vd", "test vision-dependent"),
    ("val", "validation, last step"),
)


def by_arm(records: Mapping[str, Mapping]) -> dict[str, dict[int, dict]]:
    """Arm key -> seed -> record, for the main runs; an aliased arm (a control whose config
    equals another arm's) points to the same records."""
    out: dict[str, dict[int, dict]] = {}
    for rec in records.values():
        spec = rec["spec"]
        if spec["kind"] == "main":
            out.setdefault(spec["arm"], {})[int(spec["seed"])] = rec
    for arm, same in aliases().items():
        if same in out:
            out.setdefault(arm, out[same])
    return out


def values(runs: Mapping[int, Mapping], key: str) -> dict[int, float]:
    """Seed -> final metric ``key`` (seeds without it left out)."""
    return {s: r["final"][key] for s, r in runs.items() if r["final"].get(key) is not None}


def tuning_table(
    records: Mapping[str, Mapping], settings: Settings
) -> tuple[dict[float, dict[int, float]], float | None]:
    """lr -> seed -> final validation accuracy of the tuning runs, and the chosen lr (None
    while a tuning run is missing)."""
    table: dict[float, dict[int, float]] = {}
    for rec in records.values():
        spec = rec["spec"]
        if spec["kind"] == "tune" and rec["final"].get("val") is not None:
            table.setdefault(float(spec["lr"]), {})[int(spec["seed"])] = rec["final"]["val"]
    complete = set(table) == set(settings.tune_lrs) and all(
        set(v) == set(settings.tune_seeds) for v in table.values()
    )
    return table, (chosen_lr(table) if complete else None)


def compare(arms: Mapping[str, Mapping[int, Mapping]], c: Comparison, key: str) -> Paired:
    """Paired t over seeds of ``c.arm - c.control`` on final metric ``key``."""
    return paired_by_seed(values(arms.get(c.control, {}), key), values(arms.get(c.arm, {}), key))


def curve(rec: Mapping) -> dict[int, float]:
    c = rec["train"].get("curve", {"step": [], "value": []})
    return dict(zip(c["step"], c["value"]))


def compare_by_step(arms: Mapping[str, Mapping[int, Mapping]], c: Comparison) -> dict[int, Paired]:
    """Step -> paired t of the validation accuracy, at the steps both arms' seeds share."""
    a = {s: curve(r) for s, r in arms.get(c.arm, {}).items()}
    b = {s: curve(r) for s, r in arms.get(c.control, {}).items()}
    shared = sorted(set(a) & set(b))
    if not shared:
        return {}
    steps_a = curves_by_step({s: a[s] for s in shared})
    steps_b = curves_by_step({s: b[s] for s in shared})
    return {
        step: paired_by_seed(steps_b[step], steps_a[step])
        for step in sorted(set(steps_a) & set(steps_b))
    }


def all_comparisons(
    arms: Mapping[str, Mapping[int, Mapping]],
) -> list[tuple[Comparison, str, Paired]]:
    return [(c, key, compare(arms, c, key)) for c in COMPARISONS for key, _ in METRICS]


def before(records: Mapping[str, Mapping]) -> dict | None:
    rec = records.get(BEFORE)
    return None if rec is None else rec["final"]


def arm_label(key: str) -> str:
    """The arm's label; a control run as another arm says which (``... (= GRPO runs)``)."""
    same = aliases().get(key)
    label = ARM_BY_KEY[key].label
    return label if same is None else f"{label} (= {ARM_BY_KEY[same].label} runs)"
