"""A small-scale reproduction of the PAPO and CPPO papers' tables on CPU (issue 8).

Every run starts from the small VLM that vispo ships (``builtin:vispo-tiny``) with the embedded
default's settings (``vispo/configs/quickstart.yaml``: steps, learning rate, group size, prompts
per step, answer length, template, reward, guard) and changes only the objective:

* main runs: the presets grpo, dapo, papo_g, papo_d and cppo, seeds 0, 1, 2 (``--seeds``);
* ablations (seed 0 unless ``--ablation-seeds``): PAPO-G mask ratio 0.4/0.6/0.8/1.0, gamma
  0.01/0.02/0.04, ``masked_grad`` off/on, double entropy off/on; CPPO advantage gating off,
  all response tokens instead of perception tokens, the k1 instead of the k3 estimator. The
  default value of each ablation is the main run of the same seed, not a second run.

After training, each final checkpoint is evaluated greedily on the easy-vqa test split (overall,
"general" = questions the text prior answers right, "vision-dependent" = those it answers
wrong, vispo's ``meta["vision_dependent"]``) and on vispo's synthetic set (all, and its
vision-dependent items), then probed (``vispo probe``'s API) for the perception KL and the
ignore-image rate (the answer is unchanged when the image is replaced by a blank one, and wrong).
The starting checkpoint is evaluated the same way once (the "before RL" row).

    python benchmarks/reproduce.py                 # the full CPU suite (--dry-run: plan + time)
    python benchmarks/reproduce.py --quick         # smoke test: ~2 CPU-minutes, 7 short runs
    python benchmarks/reproduce.py --report        # only rebuild tables, plot and docs
    python benchmarks/reproduce.py --only 'papo_g-*' --ablation-seeds 0,1,2

Each run is a subprocess of this script (``--worker RUN_DIR``, one thread, ``OMP_NUM_THREADS=1``)
calling vispo's own entry points (``run_training`` as ``vispo train --resume`` does,
``evaluate_model``, ``probe_model``); ``--jobs`` of them run in parallel. Resumable: a run whose
``result.json`` exists is skipped, an interrupted one continues from its last checkpoint
(``train.save_every``) and its evaluation from the batches already on file.

Outputs: ``OUT/<run>/`` (vispo's run folder plus ``spec.json``, ``log.txt``, ``eval/``,
``probe/``, ``result.json``), ``OUT/plan.json``, ``OUT/results.json`` (every run's numbers),
and ``DOCS/results.md`` + ``DOCS/results_curves.png``. The Markdown's discussion blocks
(``<!-- discussion:NAME -->`` ... ``<!-- /discussion:NAME -->``) are kept when it is rewritten.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "vispo" / "configs" / "quickstart.yaml"
DEFAULT_OUT = ROOT / "runs" / "reproduce"
QUICK_OUT = ROOT / "runs" / "reproduce-quick"
DEFAULT_DOCS = ROOT / "docs"
RESULTS_MD = "results.md"
CURVES_PNG = "results_curves.png"

OBJECTIVES = ("grpo", "dapo", "papo_g", "papo_d", "cppo")
LABELS = {"grpo": "GRPO", "dapo": "DAPO", "papo_g": "PAPO-G", "papo_d": "PAPO-D", "cppo": "CPPO"}
BEFORE = "before-rl"
#: The probe's instrument, fixed for every run: the quickstart's PAPO mask (ratio 0.6, 16-px
#: patches = the model's vision patch), and a uniform gray image as "no image" (full masking).
PROBE_MASK_RATIO = 0.6
PROBE_PATCH = 16
#: Comparisons in the gains table: (baseline, objectives compared with it).
GAIN_BASELINES = (("grpo", ("dapo", "papo_g", "papo_d", "cppo")), ("dapo", ("papo_d", "cppo")))
#: Wall-time model of one run on a quiet 2-core machine, one thread per run (``--dry-run``).
#: Seconds per step: PAPO-G anchored at 2.0 s (the quickstart's 1.5-2.5 s at one thread), the
#: others scaled by their cost relative to PAPO-G measured side by side on the shared machine
#: (GRPO 0.7, DAPO 1.0 with its extra rollout rounds, PAPO-D 1.3, CPPO 1.3).
STEP_S = {"grpo": 1.4, "dapo": 2.0, "papo_g": 2.0, "papo_d": 2.6, "cppo": 2.6}
MASKED_GRAD_STEP_FACTOR = 1.3  # one more forward + backward, on the masked images
OVERHEAD_S = 15.0  # interpreter, imports, data and model loading (train, then eval)
EVAL_S_PER_Q = 0.005  # greedy, easy-vqa (64 px images, 4 new tokens; 7 ms measured under load)
SYNTHETIC_S_PER_Q = 0.015  # greedy, 128 px synthetic images
PROBE_S_PER_Q = 0.03  # greedy answer, 3 scored variants, 2 re-answers


class ReproError(RuntimeError):
    """The reproduction cannot go on; the message names the run or file and what to do."""


# --- the plan ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of an ablation table.

    Attributes:
        label: the row label.
        tag: the part of the run name after the preset; None for the family's default, which
            is the main run of the same preset and seed.
        overrides: ``objective.*`` fields changed from the preset.
    """

    label: str
    tag: str | None
    overrides: tuple[tuple[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class Family:
    """An ablation table: variants of one preset that differ in one choice."""

    key: str
    title: str
    base: str
    variants: tuple[Variant, ...]
    note: str = ""


def _variant(label: str, tag: str | None = None, **overrides: Any) -> Variant:
    return Variant(label, tag, tuple(sorted(overrides.items())))


ABLATIONS: tuple[Family, ...] = (
    Family(
        "papo_mask_ratio",
        "PAPO-G: mask ratio",
        "papo_g",
        (
            _variant("0.4", "mask0.4", mask_ratio=0.4),
            _variant("0.6 (default)"),
            _variant("0.8", "mask0.8", mask_ratio=0.8),
            _variant("1.0 (whole image)", "mask1.0", mask_ratio=1.0),
        ),
    ),
    Family(
        "papo_gamma",
        "PAPO-G: perception-KL weight gamma",
        "papo_g",
        (
            _variant("0.01", "gamma0.01", gamma=0.01),
            _variant("0.02 (default)"),
            _variant("0.04 (collapses in the paper)", "gamma0.04", gamma=0.04),
        ),
        note="Guard: collapse-guard events (vispo's `guard`, quickstart settings: 3 of 4 "
        "signals, action warn) in the run's metrics.jsonl; k/n = seeds with at least one event.",
    ),
    Family(
        "papo_masked_grad",
        "PAPO-G: gradient through the masked branch (`masked_grad`)",
        "papo_g",
        (
            _variant("off (reference code, default)"),
            _variant("on (the paper's equation)", "maskedgrad", masked_grad=True),
        ),
    ),
    Family(
        "papo_double_entropy",
        "PAPO-G: double entropy (`eta_orig`, `eta_mask`)",
        "papo_g",
        (
            _variant("off (default)"),
            _variant("on, 0.05/0.05 (PAPO-G 7B recipe)", "entropy", eta_orig=0.05, eta_mask=0.05),
            _variant(
                "on, 0.05/0.05, masked_grad on",
                "entropy-maskedgrad",
                eta_orig=0.05,
                eta_mask=0.05,
                masked_grad=True,
            ),
        ),
        note="With `masked_grad` off (the reference code) the masked-image entropy is scored "
        "without gradient, so only H(original) acts; the last row makes H(masked) a real term.",
    ),
    Family(
        "cppo_gate",
        "CPPO: advantage gating (`cpl_gate`)",
        "cppo",
        (_variant("on (default)"), _variant("off", "nogate", cpl_gate=False)),
    ),
    Family(
        "cppo_select",
        "CPPO: tokens carrying the contrastive loss (`cpl_select`)",
        "cppo",
        (
            _variant("perception tokens (default)"),
            _variant("all response tokens", "alltokens", cpl_select="all"),
        ),
    ),
    Family(
        "cppo_estimator",
        "CPPO: divergence estimator (`cpl_estimator`)",
        "cppo",
        (_variant("k3 (default)"), _variant("k1", "k1", cpl_estimator="k1")),
    ),
)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of the plan.

    Attributes:
        name: the run folder's name, ``<key>-s<seed>`` (``before-rl`` for the start point).
        kind: ``before`` (evaluate the starting checkpoint), ``main`` or ``ablation``.
        objective: the preset (None for ``before``).
        seed: ``train.seed`` (None for ``before``).
        overrides: ``objective.*`` fields changed from the preset.
    """

    name: str
    kind: str
    objective: str | None = None
    seed: int | None = None
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> str:
        """The configuration without its seed: ``papo_g``, ``papo_g-gamma0.04``..."""
        return self.name if self.seed is None else self.name.rsplit("-s", 1)[0]

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "overrides": dict(self.overrides)}

    @classmethod
    def from_json(cls, d: Mapping) -> RunSpec:
        return cls(
            name=d["name"],
            kind=d["kind"],
            objective=d.get("objective"),
            seed=d.get("seed"),
            overrides=tuple(sorted(dict(d.get("overrides") or {}).items())),
        )


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every run of one output folder shares (a different value needs another --out).

    Attributes:
        steps: RL steps per run.
        eval_limit: first N easy-vqa test questions of the final evaluation (None: all 9,673).
        synthetic_limit: first N questions of vispo's ``synthetic`` benchmark (500 items).
        probe_limit: first N easy-vqa test questions probed.
        curve_eval_size: held-out questions the trainer scores every ``eval_every`` steps
            (the learning curve; ``data.eval_size``).
        eval_every: steps between the learning curve's held-out evaluations.
        save_every: steps between checkpoints (what an interrupted run resumes from).
        eval_batch: questions per ``generate`` call in the evaluation and the probe.
        model_sha256: hash of the starting checkpoint's weights (the shipped model may be
            rebuilt: results of different starting points are never mixed).
        quickstart_sha256: hash of the embedded default's settings.
        quick: the smoke configuration (``--quick``): its numbers are not results.
    """

    steps: int = 60
    eval_limit: int | None = None
    synthetic_limit: int = 500
    probe_limit: int = 1000
    curve_eval_size: int = 500
    eval_every: int = 10
    save_every: int = 20
    eval_batch: int = 64
    model_sha256: str = ""
    quickstart_sha256: str = ""
    quick: bool = False

    def validate(self) -> Settings:
        for name in ("steps", "synthetic_limit", "probe_limit", "eval_every", "eval_batch"):
            if getattr(self, name) < 1:
                raise ReproError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ReproError(f"--eval-limit must be >= 1 (or omitted: all), got {self.eval_limit}")
        if self.curve_eval_size < 0 or self.save_every < 0:
            raise ReproError("--curve-eval-size and save_every must be >= 0")
        return self


def quickstart_tree() -> dict:
    """The embedded default config (``vispo train`` with no arguments) as a nested dict."""
    return yaml.safe_load(QUICKSTART.read_text())


def quickstart_sha256() -> str:
    return hashlib.sha256(json.dumps(quickstart_tree(), sort_keys=True).encode()).hexdigest()


def model_sha256(name: str) -> str:
    """Hash of a ``builtin:`` model's weights (``""`` for other specs)."""
    if not name.startswith("builtin:"):
        return ""
    from vispo.train.setup import BUILTIN_MODELS_DIR

    path = BUILTIN_MODELS_DIR / name.split(":", 1)[1] / "model.safetensors"
    if not path.is_file():
        raise ReproError(f"{name}: no weights at {path}; rebuild them with `make tiny-model`")
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)`` (order kept, duplicates dropped)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ReproError(f"seed list {text!r}: expected integers separated by commas") from None
    if any(s < 0 for s in seeds):
        raise ReproError(f"seed list {text!r}: seeds must be >= 0")
    return tuple(dict.fromkeys(seeds))


def main_run(objective: str, seed: int) -> RunSpec:
    return RunSpec(f"{objective}-s{seed}", "main", objective, seed)


def build_plan(
    seeds: Sequence[int],
    ablation_seeds: Sequence[int],
    *,
    families: Sequence[Family] = ABLATIONS,
    only: str | None = None,
) -> list[RunSpec]:
    """The runs, in execution order: before RL, the main runs seed by seed, the ablations.

    An ablation seed that is not a main seed adds the main runs its defaults need. ``only``:
    comma-separated patterns matched against run names (glob; a pattern without ``*?[``
    matches as a substring).
    """
    plan: dict[str, RunSpec] = {BEFORE: RunSpec(BEFORE, "before")}
    for seed in seeds:
        for objective in OBJECTIVES:
            plan.setdefault(f"{objective}-s{seed}", main_run(objective, seed))
    for seed in ablation_seeds:
        for family in families:
            for v in family.variants:
                if v.tag is None:
                    plan.setdefault(f"{family.base}-s{seed}", main_run(family.base, seed))
                else:
                    name = f"{family.base}-{v.tag}-s{seed}"
                    plan.setdefault(name, RunSpec(name, "ablation", family.base, seed, v.overrides))
    runs = list(plan.values())
    if only:
        patterns = [p.strip() for p in only.split(",") if p.strip()]
        runs = [r for r in runs if any(_matches(r.name, p) for p in patterns)]
        if not runs:
            raise ReproError(
                f"--only {only!r} matches no run; names look like {main_run('grpo', 0).name}"
            )
    return runs


def _matches(name: str, pattern: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def run_tree(spec: RunSpec, settings: Settings, run_dir: Path) -> dict:
    """The run's config: the quickstart's with the objective replaced by the preset.

    Only ``objective.mask_patch_size`` (16 = the model's vision patch) is kept from the
    quickstart's objective section; every other objective field is the preset's, plus the
    run's overrides. The rest differs from the quickstart only in bookkeeping: seed, steps,
    output folder, checkpoints, the learning curve's held-out evaluations, one thread.
    """
    if spec.kind == "before":
        raise ReproError(f"{spec.name}: the before-RL row has no training config")
    tree = quickstart_tree()
    tree["objective"] = {
        "name": spec.objective,
        "mask_patch_size": tree["objective"]["mask_patch_size"],
        **dict(spec.overrides),
    }
    tree["train"].update(
        steps=settings.steps,
        seed=spec.seed,
        out_dir=str(run_dir),
        save_every=settings.save_every,
        keep_last=1,
        samples_every=0,
        eval_every=settings.eval_every if settings.curve_eval_size > 0 else 0,
        threads=1,
    )
    tree["data"]["eval_size"] = settings.curve_eval_size
    tree.setdefault("logging", {})["progress"] = False
    return tree


def eval_options() -> dict:
    """Template, reward and answer length of every evaluation: the quickstart's."""
    tree = quickstart_tree()
    return {
        "template": tree["data"]["template"],
        "reward": tree["reward"]["name"],
        "max_new_tokens": int(tree["rollout"]["max_new_tokens"]),
        "model": tree["model"]["name_or_path"],
    }


def validate_plan(plan: Sequence[RunSpec], settings: Settings, out: Path) -> None:
    """Build every run's config now, so that a wrong field name fails before any compute."""
    import warnings

    from vispo.train.config import ConfigError, build_config

    for spec in plan:
        if spec.kind == "before":
            continue
        try:
            with warnings.catch_warnings():  # notes on valid configs belong in the run's log
                warnings.simplefilter("ignore")
                build_config(run_tree(spec, settings, out / spec.name))
        except ConfigError as e:
            raise ReproError(f"{spec.name}: invalid config: {e}") from None


# --- resumability -----------------------------------------------------------------------------


def spec_document(spec: RunSpec, settings: Settings) -> dict:
    """What ``spec.json`` holds: a finished run is reused only if this is unchanged."""
    return {"run": spec.to_json(), "settings": dataclasses.asdict(settings)}


def _differences(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def run_state(run_dir: Path, spec: RunSpec, settings: Settings) -> str:
    """``new`` (nothing on disk), ``resume`` (started, not finished) or ``done``.

    Raises :class:`ReproError` when the folder holds a run made with another spec or settings
    (its numbers would be mixed with this plan's).
    """
    spec_path = run_dir / "spec.json"
    if not spec_path.exists():
        if (run_dir / "result.json").exists() or (run_dir / "checkpoints").exists():
            raise ReproError(f"{run_dir}: a run folder without spec.json; delete it to rerun")
        return "new"
    try:
        old = json.loads(spec_path.read_text())
    except json.JSONDecodeError:
        raise ReproError(f"{spec_path}: not valid JSON; delete {run_dir} to rerun") from None
    diff = _differences(old, spec_document(spec, settings))
    if diff:
        raise ReproError(
            f"{run_dir} was made with another plan ({'; '.join(diff)}); delete that folder or "
            "choose another --out"
        )
    return "done" if (run_dir / "result.json").exists() else "resume"


def check_plan_file(out: Path, settings: Settings) -> None:
    """``OUT/plan.json`` records the settings; one output folder holds one configuration."""
    path = out / "plan.json"
    current = dataclasses.asdict(settings)
    if path.exists():
        diff = _differences(json.loads(path.read_text())["settings"], current)
        if diff:
            raise ReproError(
                f"{out} holds runs made with other settings ({'; '.join(diff)}); use another "
                "--out, or delete the folder"
            )
    out.mkdir(parents=True, exist_ok=True)
    _write_json(path, {"settings": current})


def _stale_quick_folder(out: Path, settings: Settings) -> bool:
    """True when ``out`` holds a smoke test (``--quick``) made with other settings, e.g.
    before the shipped model was rebuilt: such a folder is disposable."""
    path = out / "plan.json"
    if not path.exists():
        return False
    old = json.loads(path.read_text())["settings"]
    return bool(old.get("quick")) and old != dataclasses.asdict(settings)


def read_plan_settings(out: Path) -> Settings:
    path = out / "plan.json"
    if not path.exists():
        raise ReproError(f"{out}: no plan.json (nothing has been run there yet)")
    return Settings(**json.loads(path.read_text())["settings"])


def _write_json(path: Path, data: Any) -> None:
    """Write atomically (a crash leaves the old file or the new one, never half of it)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# --- pure metric helpers (unit-tested) ---------------------------------------------------------


def split_accuracy(correct: Mapping[str, float], vision_dependent: Mapping[str, bool]) -> dict:
    """Greedy accuracy overall, on the general and on the vision-dependent questions.

    Args:
        correct: question id -> correctness in [0, 1].
        vision_dependent: question id -> True when the question needs the image.
    """
    missing = [q for q in correct if q not in vision_dependent]
    if missing:
        raise ReproError(f"no vision-dependence flag for question(s) {missing[:3]}")
    if not correct:
        raise ReproError("no scored question")
    vd = [v for q, v in correct.items() if vision_dependent[q]]
    general = [v for q, v in correct.items() if not vision_dependent[q]]
    return {
        "overall": sum(correct.values()) / len(correct),
        "general": sum(general) / len(general) if general else None,
        "vd": sum(vd) / len(vd) if vd else None,
        "n": len(correct),
        "n_general": len(general),
        "n_vd": len(vd),
    }


def per_question_correct(records: Iterable[Mapping], benchmark: str, ids: Sequence[str]) -> dict:
    """Question id -> greedy correctness, from ``vispo eval``'s ``results.jsonl`` records."""
    wanted = set(ids)
    found: dict[str, float] = {}
    sigs = set()
    for rec in records:
        if rec.get("benchmark") != benchmark or rec.get("mode") != "greedy":
            continue
        if rec["id"] in wanted:
            found[rec["id"]] = float(rec["correct"][0])
            sigs.add(rec["sig"])
    if len(sigs) > 1:
        raise ReproError(f"{benchmark}: results of several evaluation settings are on file")
    missing = [i for i in ids if i not in found]
    if missing:
        raise ReproError(f"{benchmark}: {len(missing)} question(s) not scored, e.g. {missing[0]}")
    return {i: found[i] for i in ids}


def probe_summary(records: Sequence[Mapping], vision_dependent: Mapping[str, bool]) -> dict:
    """Perception KL and ignore-image rate from ``vispo probe``'s per-question records.

    A question *ignores the image* when the greedy answer with a blank (uniform gray) image
    equals the one with the real image and that answer is wrong.
    """
    if not records:
        raise ReproError("no probe records")

    def mean(rows: Sequence[Mapping], fn) -> float | None:
        return sum(fn(r) for r in rows) / len(rows) if rows else None

    def ignored(r: Mapping) -> float:
        return float(not r["changed_blank"] and float(r["correct_orig"]) < 1.0)

    vd = [r for r in records if vision_dependent[r["id"]]]
    return {
        "kl_mask": mean(records, lambda r: r["kl_mask"]),
        "kl_blank": mean(records, lambda r: r["kl_blank"]),
        "kl_mask_vd": mean(vd, lambda r: r["kl_mask"]),
        "changed_blank": mean(records, lambda r: float(r["changed_blank"])),
        "ignore": mean(records, ignored),
        "ignore_vd": mean(vd, ignored),
        "n": len(records),
        "n_vd": len(vd),
    }


def train_summary(rows: Sequence[Mapping], guard_events: Sequence[Mapping] | None = None) -> dict:
    """Curves and totals from a run's ``metrics.jsonl`` rows.

    The held-out curve: step 0 from ``eval/accuracy_before``, then every ``eval/accuracy`` (the
    trainer's ``eval_every``), and ``eval/accuracy_after`` at the last step when that step has
    no periodic value. Guard events: the checkpoint's list (with their signals) when given,
    else the steps whose row has ``guard/event``.
    """
    steps = [r for r in rows if "reward/mean" in r]
    heldout: dict[int, float] = {}
    final = {}
    for r in rows:
        if "eval/accuracy_before" in r:
            heldout[0] = float(r["eval/accuracy_before"])
        if "eval/accuracy" in r:
            heldout[int(r["step"])] = float(r["eval/accuracy"])
        if "eval/accuracy_after" in r:
            final = {int(r["step"]): float(r["eval/accuracy_after"])}
    for step, value in final.items():
        heldout.setdefault(step, value)
    if guard_events is None:
        guard_events = [
            {"step": int(r["step"]), "signals": {}} for r in steps if r.get("guard/event")
        ]
    last = steps[-max(1, len(steps) // 6) :] if steps else []
    return {
        "reward": {
            "step": [int(r["step"]) for r in steps],
            "value": [float(r["reward/mean"]) for r in steps],
        },
        "heldout": {"step": sorted(heldout), "value": [heldout[s] for s in sorted(heldout)]},
        "guard_events": [dict(e) for e in guard_events],
        "step_time_s": sum(float(r.get("time/step", 0.0)) for r in steps),
        "ds_rounds": statistics.fmean(float(r.get("dynamic_sampling/rounds", 1.0)) for r in steps)
        if steps
        else None,
        "reward_last": statistics.fmean(float(r["reward/mean"]) for r in last) if last else None,
        "perception_kl_last": statistics.fmean(float(r["perception/kl_mean"]) for r in last)
        if last and all("perception/kl_mean" in r for r in last)
        else None,
        "steps_done": len(steps),
    }


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std is None for fewer than two values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def paired_gain(
    base: Mapping[int, float], other: Mapping[int, float]
) -> tuple[float | None, float | None, float | None, int]:
    """Gain of ``other`` over ``base`` on the seeds both have (same seed = same data order).

    Returns ``(mean of the per-seed differences, their sample std, relative gain = mean
    difference / mean baseline on those seeds, number of seeds)``; Nones when no seed is shared.
    """
    seeds = sorted(s for s in base if s in other and base[s] is not None and other[s] is not None)
    if not seeds:
        return None, None, None, 0
    diffs = [other[s] - base[s] for s in seeds]
    mean_diff, std_diff = mean_std(diffs)
    base_mean = statistics.fmean(base[s] for s in seeds)
    relative = None if base_mean == 0 else mean_diff / base_mean
    return mean_diff, std_diff, relative, len(seeds)


def fmt_pm(values: Sequence[float], *, scale: float = 100.0, digits: int = 1) -> str:
    """``"67.2 ± 0.4"`` (mean ± sample std, times ``scale``); one value alone; ``—`` for none."""
    mean, std = mean_std(values)
    if mean is None:
        return "—"
    text = f"{mean * scale:.{digits}f}"
    return text if std is None else f"{text} ± {std * scale:.{digits}f}"


def fmt_gain(base: Mapping[int, float], other: Mapping[int, float], *, digits: int = 1) -> str:
    """``"+1.2 ± 0.5 (+1.8%)"``: paired gain in points (± std over seeds), relative gain."""
    mean, std, rel, n = paired_gain(base, other)
    if mean is None:
        return "—"
    text = f"{100 * mean:+.{digits}f}"
    if std is not None:
        text += f" ± {100 * std:.{digits}f}"
    return text + (" (n/a)" if rel is None else f" ({100 * rel:+.1f}%)")


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out


def curve_over_seeds(curves: Sequence[Mapping]) -> tuple[list[int], list[float], list[float]]:
    """Mean and std (population, 0 for one seed) at each step present in every curve."""
    if not curves:
        return [], [], []
    common = set(curves[0]["step"])
    for c in curves[1:]:
        common &= set(c["step"])
    steps = sorted(common)
    maps = [dict(zip(c["step"], c["value"])) for c in curves]
    means = [statistics.fmean(m[s] for m in maps) for s in steps]
    stds = [statistics.pstdev([m[s] for m in maps]) for s in steps]
    return steps, means, stds


# --- the worker: one run in its own process ----------------------------------------------------


def _phase(run_dir: Path, text: str) -> None:
    """What the run is doing now (read by the parent's progress display)."""
    (run_dir / "phase.txt").write_text(text)


def _checkpoint_step(path: Path) -> int:
    return int(path.name.split("-", 1)[1])


def _add_time(run_dir: Path, key: str, seconds: float) -> None:
    path = run_dir / "timing.json"
    timing = json.loads(path.read_text()) if path.exists() else {}
    timing[key] = timing.get(key, 0.0) + seconds
    _write_json(path, timing)


def worker(run_dir: Path) -> int:
    """Train (unless done), evaluate, probe, and write ``result.json`` for one run."""
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    doc = json.loads((run_dir / "spec.json").read_text())
    spec, settings = RunSpec.from_json(doc["run"]), Settings(**doc["settings"])
    opts = eval_options()
    status = "ok"
    if spec.kind != "before":
        status = _train_phase(spec, settings, run_dir)
    from vispo.eval import load_model_spec

    loaded = load_model_spec(str(run_dir) if spec.kind != "before" else opts["model"])
    accuracy = _eval_phase(loaded, settings, run_dir, opts)
    probe = _probe_phase(loaded, settings, run_dir, opts)
    train = {}
    if spec.kind != "before":
        from vispo.train.logging import read_metrics

        train = train_summary(read_metrics(run_dir), _guard_events(run_dir))
    _add_time(run_dir, "worker_s", time.perf_counter() - start)
    timing = json.loads((run_dir / "timing.json").read_text())
    result = {
        "name": spec.name,
        "spec": spec.to_json(),
        "status": status,
        "checkpoint": loaded.identity["checkpoint"],
        "accuracy": accuracy,
        "probe": probe,
        "train": train,
        "timing": timing,
        "metrics": flat_metrics(accuracy, probe, train, timing),
    }
    _write_json(run_dir / "result.json", result)
    _phase(run_dir, "done")
    return 0


def _train_phase(spec: RunSpec, settings: Settings, run_dir: Path) -> str:
    from vispo.train.checkpoint import latest_checkpoint
    from vispo.train.config import build_config
    from vispo.train.run import run_training

    stopped = run_dir / "stopped.txt"
    if stopped.exists():
        return "stopped"
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and _checkpoint_step(ckpt) >= settings.steps:
        return "ok"
    _phase(run_dir, "train")
    # A model that trains again must not be judged by results stored for an earlier one.
    for sub in ("eval", "probe"):
        shutil.rmtree(run_dir / sub, ignore_errors=True)
    cfg = build_config(run_tree(spec, settings, run_dir))
    start = time.perf_counter()
    code = run_training(cfg, resume=True)
    _add_time(run_dir, "train_s", time.perf_counter() - start)
    if code == 3:  # TrainingStopped: a checkpoint was written first
        ckpt = latest_checkpoint(run_dir)
        at = "?" if ckpt is None else _checkpoint_step(ckpt)
        stopped.write_text(f"training stopped at step {at} (see log.txt)\n")
        return "stopped"
    if code != 0:
        raise ReproError(f"{spec.name}: training failed (exit code {code}); see {run_dir}/log.txt")
    return "ok"


def _guard_events(run_dir: Path) -> list[dict] | None:
    """The collapse guard's events (step, surging signals) from the latest checkpoint."""
    from vispo.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    state_path = None if ckpt is None else ckpt / "state.json"
    if state_path is None or not state_path.exists():
        return None
    events = json.loads(state_path.read_text()).get("guard", {}).get("events")
    if events is None:
        return None
    return [{"step": int(e["step"]), "signals": e.get("signals", {})} for e in events]


def _eval_phase(loaded, settings: Settings, run_dir: Path, opts: dict) -> dict:
    from vispo.eval import EvalSettings, evaluate_model, get_benchmark
    from vispo.eval.runner import RESULTS_FILE, read_results

    out = {}
    for name, limit in (("easy-vqa", settings.eval_limit), ("synthetic", settings.synthetic_limit)):
        _phase(run_dir, f"eval {name}")
        bench = get_benchmark(name)
        folder = run_dir / "eval" / name
        es = EvalSettings(
            k=0,
            greedy=True,
            batch_size=settings.eval_batch,
            max_new_tokens=opts["max_new_tokens"],
            template=opts["template"],
            reward=opts["reward"],
            limit=limit,
        )
        start = time.perf_counter()
        summary = evaluate_model(loaded, [bench], folder, es, progress=False, log=print)
        _add_time(run_dir, "eval_s", time.perf_counter() - start)
        samples = bench.load(None, limit)
        ids = [s.id for s in samples]
        correct = per_question_correct(read_results(folder / RESULTS_FILE), name, ids)
        split = split_accuracy(correct, {s.id: bool(s.meta["vision_dependent"]) for s in samples})
        reported = summary["modes"]["greedy"]["summary"]["overall"]["micro"]
        if not math.isclose(split["overall"], reported, abs_tol=1e-9):
            raise ReproError(
                f"{name}: per-question results ({split['overall']}) disagree with "
                f"vispo eval's summary ({reported})"
            )
        out[name] = split
    return out


def _probe_phase(loaded, settings: Settings, run_dir: Path, opts: dict) -> dict:
    from vispo.eval import ProbeSettings, get_benchmark, probe_model

    _phase(run_dir, "probe")
    bench = get_benchmark("easy-vqa")
    ps = ProbeSettings(
        mask_ratio=PROBE_MASK_RATIO,
        patch_size=PROBE_PATCH,
        seed=0,
        max_new_tokens=opts["max_new_tokens"],
        batch_size=settings.eval_batch,
        limit=settings.probe_limit,
        template=opts["template"],
        reward=opts["reward"],
    )
    folder = run_dir / "probe"
    stored = folder / "probe.json"
    result = json.loads(stored.read_text()) if stored.exists() else None
    wanted_model = {**loaded.identity, "step": loaded.step}
    if (
        result is None
        or result["settings"] != dataclasses.asdict(ps)
        or result["model"] != wanted_model
    ):
        start = time.perf_counter()
        result = probe_model(loaded, [bench], folder, ps, progress=False, log=print)
        _add_time(run_dir, "probe_s", time.perf_counter() - start)
    samples = bench.load(None, settings.probe_limit)
    vd = {s.id: bool(s.meta["vision_dependent"]) for s in samples}
    return probe_summary(result["benchmarks"][bench.name]["samples"], vd)


def flat_metrics(accuracy: Mapping, probe: Mapping, train: Mapping, timing: Mapping) -> dict:
    """The numbers the tables aggregate, under short flat keys (fractions, seconds, counts)."""
    easy, syn = accuracy.get("easy-vqa", {}), accuracy.get("synthetic", {})
    out = {
        "easy/overall": easy.get("overall"),
        "easy/general": easy.get("general"),
        "easy/vd": easy.get("vd"),
        "syn/overall": syn.get("overall"),
        "syn/vd": syn.get("vd"),
        "probe/kl_mask": probe.get("kl_mask"),
        "probe/kl_blank": probe.get("kl_blank"),
        "probe/kl_mask_vd": probe.get("kl_mask_vd"),
        "probe/changed_blank": probe.get("changed_blank"),
        "probe/ignore": probe.get("ignore"),
        "probe/ignore_vd": probe.get("ignore_vd"),
        "time/train_s": timing.get("train_s"),
        "time/total_s": timing.get("worker_s"),
    }
    if train:
        out.update(
            {
                "guard/events": float(len(train["guard_events"])),
                "train/step_time_s": train["step_time_s"],
                "train/ds_rounds": train["ds_rounds"],
                "train/reward_last": train["reward_last"],
            }
        )
    return out


# --- the scheduler -----------------------------------------------------------------------------


def steps_done(run_dir: Path) -> int:
    """Training steps logged so far (the per-run progress bar)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    last = 0
    for line in path.read_text().splitlines():
        if '"reward/mean"' in line:
            try:
                last = max(last, int(json.loads(line)["step"]))
            except (json.JSONDecodeError, KeyError, ValueError):
                continue
    return last


def estimate_run_s(spec: RunSpec, settings: Settings) -> float:
    """Expected wall time of one run on a quiet machine at one thread (the model above)."""
    n_eval = 9673 if settings.eval_limit is None else min(settings.eval_limit, 9673)
    evals = (
        n_eval * EVAL_S_PER_Q
        + min(settings.synthetic_limit, 500) * SYNTHETIC_S_PER_Q
        + settings.probe_limit * PROBE_S_PER_Q
    )
    if spec.kind == "before":
        return OVERHEAD_S / 2 + evals
    step = STEP_S[spec.objective]
    if dict(spec.overrides).get("masked_grad"):
        step *= MASKED_GRAD_STEP_FACTOR
    curve = 0.0
    if settings.curve_eval_size:
        curve = (
            (settings.steps // settings.eval_every + 2) * settings.curve_eval_size * EVAL_S_PER_Q
        )
    return OVERHEAD_S + settings.steps * step + curve + evals


def estimate_wall_s(plan: Sequence[RunSpec], settings: Settings, jobs: int) -> float:
    """Makespan of the plan on ``jobs`` workers, runs taken in plan order (list scheduling)."""
    workers = [0.0] * max(1, jobs)
    for spec in plan:
        i = workers.index(min(workers))
        workers[i] += estimate_run_s(spec, settings)
    return max(workers)


def _worker_env() -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"
    env.update(TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", COLUMNS="120")
    return env


def execute(
    plan: Sequence[RunSpec], settings: Settings, out: Path, *, jobs: int, progress: bool
) -> list[str]:
    """Run the plan's unfinished runs, ``jobs`` at a time; returns the names that failed.

    Ctrl-C or SIGTERM stops the runs this call started (a rerun resumes them).
    """
    import signal

    def _terminated(signum, frame):  # SIGTERM: stop the runs like Ctrl-C does
        raise KeyboardInterrupt

    previous_handler = signal.signal(signal.SIGTERM, _terminated)
    try:
        return _execute(plan, settings, out, jobs=jobs, progress=progress)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def _execute(
    plan: Sequence[RunSpec], settings: Settings, out: Path, *, jobs: int, progress: bool
) -> list[str]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    states = {spec.name: run_state(out / spec.name, spec, settings) for spec in plan}
    todo = [spec for spec in plan if states[spec.name] != "done"]
    failed: list[str] = []
    running: dict[str, tuple[subprocess.Popen, int, Any, float]] = {}
    columns = (
        TextColumn("{task.description:<28}"),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        TextColumn("{task.fields[phase]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not progress, refresh_per_second=2) as bar:
        overall = bar.add_task(
            "overall (runs)", total=len(plan), completed=len(plan) - len(todo), phase=""
        )
        queue = list(todo)
        try:
            while queue or running:
                while queue and len(running) < jobs:
                    spec = queue.pop(0)
                    run_dir = out / spec.name
                    run_dir.mkdir(parents=True, exist_ok=True)
                    _write_json(run_dir / "spec.json", spec_document(spec, settings))
                    log = open(run_dir / "log.txt", "a")  # closed when the run ends
                    log.write(
                        f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {spec.name} "
                        f"({states[spec.name]}) ===\n"
                    )
                    log.flush()
                    proc = subprocess.Popen(
                        [sys.executable, str(Path(__file__).resolve()), "--worker", str(run_dir)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=_worker_env(),
                        cwd=ROOT,
                    )
                    total = settings.steps if spec.kind != "before" else 1
                    task = bar.add_task(spec.name, total=total, phase="start")
                    running[spec.name] = (proc, task, log, time.perf_counter())
                for name, (proc, task, log, started) in list(running.items()):
                    run_dir = out / name
                    phase_path = run_dir / "phase.txt"
                    phase = phase_path.read_text() if phase_path.exists() else "start"
                    done = 0 if name == BEFORE else steps_done(run_dir)
                    bar.update(task, completed=done, phase=phase)
                    code = proc.poll()
                    if code is None:
                        continue
                    log.close()
                    bar.remove_task(task)
                    del running[name]
                    bar.advance(overall)
                    wall = time.perf_counter() - started
                    if code == 0 and (run_dir / "result.json").exists():
                        bar.console.print(_done_line(run_dir, wall))
                    else:
                        failed.append(name)
                        tail = "\n".join(
                            (run_dir / "log.txt").read_text(errors="replace").splitlines()[-15:]
                        )
                        bar.console.print(f"[red]FAILED {name} (exit {code})[/]; end of its log:")
                        bar.console.print(tail, markup=False, highlight=False)
                time.sleep(0.5)
        except KeyboardInterrupt:  # stop the runs this scheduler started; a rerun resumes them
            for proc, _, _, _ in running.values():
                proc.terminate()
            for proc, _, log, _ in running.values():
                proc.wait()
                log.close()
            raise
    return failed


def _done_line(run_dir: Path, wall: float) -> str:
    m = json.loads((run_dir / "result.json").read_text())["metrics"]
    return (
        f"done {run_dir.name} ({wall:.0f} s): easy-vqa {_num(m, 'easy/overall')}, "
        f"vd {_num(m, 'easy/vd')}, synth-vd {_num(m, 'syn/vd')}, "
        f"ignore {_num(m, 'probe/ignore')}"
    )


# --- tables, plot and docs ---------------------------------------------------------------------


def load_results(out: Path, settings: Settings) -> dict[str, dict]:
    """Every finished run in ``out`` made with ``settings`` (by run name)."""
    results = {}
    for path in sorted(out.glob("*/result.json")):
        spec_path = path.parent / "spec.json"
        if not spec_path.exists():
            continue
        doc = json.loads(spec_path.read_text())
        if doc.get("settings") != dataclasses.asdict(settings):
            print(f"note: {path.parent.name} was made with other settings; left out")
            continue
        results[path.parent.name] = json.loads(path.read_text())
    return results


def group_by_config(results: Mapping[str, Mapping]) -> dict[str, dict[int, dict]]:
    """Run key (``papo_g``, ``papo_g-gamma0.04``...) -> seed -> the run's flat metrics."""
    groups: dict[str, dict[int, dict]] = {}
    for r in results.values():
        spec = RunSpec.from_json(r["spec"])
        if spec.kind == "before":
            continue
        groups.setdefault(spec.key, {})[int(spec.seed)] = r["metrics"]
    return groups


def _values(by_seed: Mapping[int, Mapping], key: str) -> dict[int, float]:
    return {s: m[key] for s, m in by_seed.items() if m.get(key) is not None}


ACCURACY_COLUMNS = (
    ("easy/overall", "easy-vqa overall"),
    ("easy/general", "general"),
    ("easy/vd", "vision-dep."),
    ("syn/overall", "synthetic"),
    ("syn/vd", "synthetic vision-dep."),
)


def main_table(groups: Mapping[str, Mapping[int, Mapping]], before: Mapping | None) -> str:
    header = ["objective", "seeds"] + [label for _, label in ACCURACY_COLUMNS]
    lines = [_row(header), _rule(len(header))]
    before = before or {}
    cells = ["before RL (start)", "—" if before else "pending"]
    lines.append(_row(cells + [fmt_pm([before.get(k)]) for k, _ in ACCURACY_COLUMNS]))
    for obj in OBJECTIVES:
        by_seed = groups.get(obj, {})
        cells = [LABELS[obj], str(len(by_seed)) if by_seed else "pending"]
        cells += [fmt_pm(list(_values(by_seed, k).values())) for k, _ in ACCURACY_COLUMNS]
        lines.append(_row(cells))
    return "\n".join(lines) + "\n"


def gains_table(groups: Mapping[str, Mapping[int, Mapping]]) -> str:
    header = ["objective", "vs"] + [label for _, label in ACCURACY_COLUMNS]
    lines = [_row(header), _rule(len(header))]
    for base, others in GAIN_BASELINES:
        for obj in others:
            cells = [LABELS[obj], LABELS[base]]
            for key, _ in ACCURACY_COLUMNS:
                cells.append(
                    fmt_gain(_values(groups.get(base, {}), key), _values(groups.get(obj, {}), key))
                )
            lines.append(_row(cells))
    return "\n".join(lines) + "\n"


PERCEPTION_COLUMNS = (
    ("probe/kl_mask", "KL masked", 1.0, 3),
    ("probe/kl_mask_vd", "KL masked (vision-dep.)", 1.0, 3),
    ("probe/kl_blank", "KL no image", 1.0, 3),
    ("probe/changed_blank", "answer changes w/o image %", 100.0, 1),
    ("probe/ignore", "ignore-image %", 100.0, 1),
    ("probe/ignore_vd", "ignore-image % (vision-dep.)", 100.0, 1),
    ("time/train_s", "train wall s", 1.0, 0),
    ("time/total_s", "run wall s", 1.0, 0),
)


def perception_table(groups: Mapping[str, Mapping[int, Mapping]], before: Mapping | None) -> str:
    header = ["objective"] + [label for _, label, _, _ in PERCEPTION_COLUMNS]
    lines = [_row(header), _rule(len(header))]
    before = before or {}
    cells = ["before RL (start)"]
    for key, _, scale, digits in PERCEPTION_COLUMNS:
        cells.append(fmt_pm([before.get(key)], scale=scale, digits=digits))
    lines.append(_row(cells))
    for obj in OBJECTIVES:
        by_seed = groups.get(obj, {})
        cells = [LABELS[obj]]
        for key, _, scale, digits in PERCEPTION_COLUMNS:
            cells.append(fmt_pm(list(_values(by_seed, key).values()), scale=scale, digits=digits))
        lines.append(_row(cells))
    return "\n".join(lines) + "\n"


def guard_cell(by_seed: Mapping[int, Mapping], events: Mapping[int, Sequence[int]]) -> str:
    """``"1/3 (first at step 34)"``: seeds whose guard fired, of those finished."""
    if not by_seed:
        return "—"
    fired = [s for s in by_seed if events.get(s)]
    first = min((min(events[s]) for s in fired), default=None)
    return f"{len(fired)}/{len(by_seed)}" + ("" if first is None else f" (first at step {first})")


def ablation_table(
    family: Family,
    groups: Mapping[str, Mapping[int, Mapping]],
    events: Mapping[str, Mapping[int, Sequence[int]]],
    seeds: Sequence[int],
) -> str:
    """One family's table on ``seeds`` (the ablation seeds; the default row is the main run)."""
    header = [
        "variant",
        "seeds",
        "easy-vqa overall",
        "vision-dep.",
        "synthetic vision-dep.",
        "KL masked",
        "ignore-image % (vision-dep.)",
        "guard fired",
        "train wall s",
    ]
    lines = [_row(header), _rule(len(header))]
    for v in family.variants:
        key = family.base if v.tag is None else f"{family.base}-{v.tag}"
        by_seed = {s: m for s, m in groups.get(key, {}).items() if s in seeds}
        ev = {s: e for s, e in events.get(key, {}).items() if s in seeds}
        label = v.label + (" = main run" if v.tag is None else "")
        lines.append(
            _row(
                [
                    label,
                    str(len(by_seed)) if by_seed else "pending",
                    _column(by_seed, "easy/overall"),
                    _column(by_seed, "easy/vd"),
                    _column(by_seed, "syn/vd"),
                    _column(by_seed, "probe/kl_mask", 1.0, 3),
                    _column(by_seed, "probe/ignore_vd"),
                    guard_cell(by_seed, ev),
                    _column(by_seed, "time/train_s", 1.0, 0),
                ]
            )
        )
    return "\n".join(lines) + "\n"


def raw_table(results: Mapping[str, Mapping]) -> str:
    header = [
        "run",
        "status",
        "easy-vqa",
        "general",
        "vision-dep.",
        "synthetic",
        "synth. vd",
        "KL masked",
        "ignore %",
        "guard events",
        "DS rounds/step",
        "train s",
    ]
    lines = [_row(header), _rule(len(header))]
    for name in sorted(results, key=lambda n: (n != BEFORE, n)):
        r = results[name]
        m = r["metrics"]
        lines.append(
            _row(
                [
                    name,
                    r["status"],
                    _num(m, "easy/overall"),
                    _num(m, "easy/general"),
                    _num(m, "easy/vd"),
                    _num(m, "syn/overall"),
                    _num(m, "syn/vd"),
                    _num(m, "probe/kl_mask", 1.0, 3),
                    _num(m, "probe/ignore"),
                    _num(m, "guard/events", 1.0, 0),
                    _num(m, "train/ds_rounds", 1.0, 2),
                    _num(m, "time/train_s", 1.0, 0),
                ]
            )
        )
    return "\n".join(lines) + "\n"


def _column(by_seed: Mapping[int, Mapping], key: str, scale: float = 100.0, digits: int = 1):
    """One table cell: mean ± std over seeds of metric ``key``."""
    return fmt_pm(list(_values(by_seed, key).values()), scale=scale, digits=digits)


def _num(metrics: Mapping, key: str, scale: float = 100.0, digits: int = 1) -> str:
    """One run's metric ``key`` times ``scale`` (``—`` when missing)."""
    value = metrics.get(key)
    return "—" if value is None else f"{scale * value:.{digits}f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _rule(n: int) -> str:
    return "|" + "|".join(["---"] + ["---:"] * (n - 1)) + "|"


def guard_events_by_config(results: Mapping[str, Mapping]) -> dict[str, dict[int, list[int]]]:
    out: dict[str, dict[int, list[int]]] = {}
    for r in results.values():
        spec = RunSpec.from_json(r["spec"])
        if spec.kind == "before":
            continue
        steps = [int(e["step"]) for e in r["train"].get("guard_events", [])]
        out.setdefault(spec.key, {})[int(spec.seed)] = steps
    return out


def plot_curves(results: Mapping[str, Mapping], path: Path, *, window: int = 5) -> Path | None:
    """Held-out accuracy and training reward vs step, mean over seeds, one line per objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_obj: dict[str, list[Mapping]] = {}
    for r in results.values():
        spec = RunSpec.from_json(r["spec"])
        if spec.kind == "main":
            by_obj.setdefault(spec.objective, []).append(r["train"])
    if not by_obj:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 3.8))
    colours = dict(zip(OBJECTIVES, ("#555555", "#1f77b4", "#d62728", "#ff7f0e", "#2ca02c")))
    for obj in OBJECTIVES:
        runs = by_obj.get(obj)
        if not runs:
            continue
        label = f"{LABELS[obj]} (n={len(runs)})"
        steps, mean, std = curve_over_seeds([r["heldout"] for r in runs])
        if steps:
            axes[0].plot(
                steps, [100 * m for m in mean], marker="o", ms=3, color=colours[obj], label=label
            )
            axes[0].fill_between(
                steps,
                [100 * (m - s) for m, s in zip(mean, std)],
                [100 * (m + s) for m, s in zip(mean, std)],
                color=colours[obj],
                alpha=0.12,
            )
        steps, mean, _ = curve_over_seeds([r["reward"] for r in runs])
        if steps:
            axes[1].plot(steps, moving_average(mean, window), color=colours[obj], label=label)
    axes[0].set_title("held-out accuracy (easy-vqa test, first questions, greedy)", fontsize=9)
    axes[0].set_ylabel("accuracy %")
    axes[1].set_title(
        f"training reward ({window}-step moving mean; DAPO/PAPO-D: after filtering)", fontsize=9
    )
    axes[1].set_ylabel("mean reward")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


DISCUSSION = re.compile(
    r"<!-- discussion:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /discussion:(?P=name) -->", re.S
)
PENDING = "_Discussion pending: written once the full suite has run._\n"


def discussion_block(name: str, body: str = PENDING) -> str:
    return f"<!-- discussion:{name} -->\n{body}<!-- /discussion:{name} -->"


def merge_discussion(new_text: str, old_text: str | None) -> str:
    """``new_text`` with each discussion block's body taken from ``old_text`` when it has one.

    Blocks of ``old_text`` whose name ``new_text`` lacks are appended at the end, so that no
    hand-written text is lost when the report's layout changes.
    """
    if not old_text:
        return new_text
    old = {m["name"]: m["body"] for m in DISCUSSION.finditer(old_text)}
    names = {m["name"] for m in DISCUSSION.finditer(new_text)}
    text = DISCUSSION.sub(
        lambda m: discussion_block(m["name"], old.get(m["name"], m["body"])), new_text
    )
    orphans = [n for n in old if n not in names]
    if orphans:
        text = text.rstrip("\n") + "\n\n## Notes kept from an earlier version\n\n"
        text += "\n\n".join(discussion_block(n, old[n]) for n in orphans) + "\n"
    return text


def render_report(
    results: Mapping[str, Mapping],
    settings: Settings,
    *,
    out: Path,
    planned: int | None,
    curves: Path | None,
    docs: Path,
) -> str:
    """The whole ``results.md`` (numeric sections generated; discussion blocks empty)."""
    groups = group_by_config(results)
    events = guard_events_by_config(results)
    before = results.get(BEFORE, {}).get("metrics")
    opts = eval_options()
    q = quickstart_tree()
    n_eval = "all 9,673" if settings.eval_limit is None else f"the first {settings.eval_limit:,}"
    ablation_seeds = sorted(
        {
            RunSpec.from_json(r["spec"]).seed
            for r in results.values()
            if r["spec"]["kind"] == "ablation"
        }
    ) or [0]
    main_seeds = sorted({s for obj in OBJECTIVES for s in groups.get(obj, {})})
    seeds_text = (
        f"main runs {', '.join(map(str, main_seeds))}; ablations "
        f"{', '.join(map(str, ablation_seeds))}"
        if results
        else "main runs 0, 1, 2 (`--seeds`); ablations 0 (`--ablation-seeds`)"
    )
    synthetic_text = (
        "all 500" if settings.synthetic_limit >= 500 else f"the first {settings.synthetic_limit}"
    )
    before_acc = results.get(BEFORE, {}).get("accuracy", {}).get("easy-vqa", {})
    rel_out = _relative(out)
    default_settings = dataclasses.replace(Settings(), steps=int(q["train"]["steps"]))
    default_plan = build_plan((0, 1, 2), (0,))
    default_min = estimate_wall_s(default_plan, default_settings, 2) / 60
    extra_min = estimate_wall_s(build_plan((0, 1, 2), (0, 1, 2)), default_settings, 2) / 60
    extra_min -= default_min
    parts = [
        "# Does perception-aware RL help? A small-scale reproduction",
        "",
        "<!-- Generated by benchmarks/reproduce.py: everything outside the discussion blocks is "
        "rewritten by `python benchmarks/reproduce.py --report`; the text between "
        "`<!-- discussion:NAME -->` and `<!-- /discussion:NAME -->` is kept. -->",
        "",
    ]
    if settings.quick:
        parts += [
            "> **Smoke configuration (`--quick`)**: a few steps and a few questions per run. "
            "These numbers test the pipeline; they are not results.",
            "",
        ]
    finished = len(results)
    status = f"{finished} runs finished" + ("" if planned is None else f" of {planned} planned")
    if not results:
        status = "no run has finished yet: the tables fill in as `benchmarks/reproduce.py` runs"
    parts += [
        f"Status: {status} (results in `{rel_out}`).",
        "",
        "The question of issue 8: do PAPO and CPPO raise accuracy over GRPO and DAPO, most on "
        "vision-dependent questions, and does the model rely more on the image? Every run "
        f"starts from the same checkpoint (`{opts['model']}`, weights sha256 "
        f"`{settings.model_sha256[:12]}`), a small VLM that can see but answers easy-vqa near "
        "its text prior, and only the objective differs.",
        "",
        discussion_block("summary"),
        "",
        "## Setup",
        "",
        f"- **Training**: the embedded default (`vispo/configs/quickstart.yaml`) with its "
        f"objective section replaced by a preset: easy-vqa train, template `{opts['template']}`, "
        f"reward `{opts['reward']}`, {q['train']['prompts_per_step']} prompts x "
        f"{q['rollout']['n']} responses per step, at most {opts['max_new_tokens']} new tokens, "
        f"temperature {q['rollout']['temperature']}, AdamW lr {q['optim']['lr']}, "
        f"**{settings.steps} steps** per run, one thread per run. Only "
        "`objective.mask_patch_size: 16` (the model's vision patch) is kept from the "
        "quickstart's objective; every other objective field is the preset's "
        "(`vispo/algos/objective.py`, `PRESETS`): GRPO clip 0.2/0.3, beta 0.01; DAPO clip "
        "0.2/0.28, beta 0, dynamic sampling; PAPO-G = GRPO + gamma 0.02 (mask ratio 0.6, masked "
        "branch without gradient); PAPO-D = DAPO + gamma 0.01 + double entropy 0.03/0.03; CPPO "
        "clip 0.2/0.2, beta 0.01, lambda 0.01, tau 0.1, top 50% perception tokens, gating.",
        f"- **Seeds**: {seeds_text}. `train.seed` seeds the prompt order "
        "(`PromptSampler`: a permutation per epoch from `(seed, epoch)`), the masks and views "
        "(per prompt from `(seed, step, round, position)`) and the sampling, so every objective "
        "sees the same stream of prompts for a given seed. DAPO and PAPO-D's dynamic sampling "
        "draws its extra rounds from that same stream, so their step k uses later batches than "
        "GRPO's step k, and they see more prompts in the same number of steps (the DS rounds per "
        "step are in the table of all runs); their training reward is that of the kept groups.",
        f"- **Held-out accuracy**: greedy answers to {n_eval} easy-vqa test questions "
        "(`vispo.eval.evaluate_model`, same template, reward and answer length as training). "
        '*Vision-dependent* = vispo\'s `meta["vision_dependent"]` (the `easy-vqa-vd` '
        "benchmark's rule): the text prior (each question string's most frequent training "
        "answer, 67.0% on the test split) answers it wrongly; *general* = the rest, which the "
        "prior answers right"
        + (
            f" ({before_acc['n_vd']:,} and {before_acc['n_general']:,} questions)."
            if before_acc
            else "."
        )
        + f" Second held-out set: vispo's `synthetic` benchmark ({synthetic_text} of its 500 "
        "seeded questions, difficulty 1: counting, attributes, positions, lengths, bar "
        "charts, labelled geometry) and its vision-dependent items (`synthetic-vd`: the "
        "question does not state the deciding fact).",
        f"- **Probe** (`vispo.eval.probe_model`, first {settings.probe_limit} test questions): "
        "KL masked = per-question mean token KL(original || masked image) of the greedy "
        f"answer (PAPO's `perception_kl`, mask ratio {PROBE_MASK_RATIO}, {PROBE_PATCH}-px "
        "patches); KL no image = the same against a uniform gray image; *ignore-image rate* = "
        "the answer with the gray image equals the answer with the real image **and** is wrong.",
        f"- **Learning curves**: the trainer's held-out accuracy on the first "
        f"{settings.curve_eval_size} test questions every {settings.eval_every} steps "
        "(`train.eval_every`), and the training reward.",
        "- **Wall time** (one thread per run, two runs in parallel): *train* = `run_training` "
        "(model and data loading, the curve's evaluations and checkpoints included); *run* = "
        "the whole worker process after its imports (train + final evaluation + probe). A "
        "resumed run counts only the invocations that completed their phase.",
        "- Means ± sample standard deviation over seeds; gains are paired by seed (same data "
        "order): mean ± std of the per-seed differences in points, and relative to the "
        "baseline's mean.",
        "",
        "## Main results",
        "",
        "Greedy accuracy in %.",
        "",
        main_table(groups, before),
        "Gains (points, paired by seed) and relative gains:",
        "",
        gains_table(groups),
        discussion_block("main"),
        "",
        "## Does the model look? Perception KL and the ignore-image rate",
        "",
        perception_table(groups, before),
        discussion_block("perception"),
        "",
        "## Learning curves",
        "",
    ]
    if curves is not None:
        parts += [f"![learning curves]({os.path.relpath(curves, docs)})", ""]
    else:
        parts += ["_Pending: no main run has finished._", ""]
    parts += [discussion_block("curves"), "", "## Ablations", ""]
    ablation_text = ", ".join(map(str, ablation_seeds))
    parts += [
        f"Seed(s) {ablation_text}; the default row of each table is the main run of the same seed. "
        "Accuracy and ignore-image rate in %.",
        "",
    ]
    for family in ABLATIONS:
        parts += [f"### {family.title}", ""]
        if family.note:
            parts += [family.note, ""]
        parts += [ablation_table(family, groups, events, ablation_seeds)]
    guarded = [
        (name, r)
        for name, r in results.items()
        if r["spec"]["kind"] != "before" and r["train"].get("guard_events")
    ]
    if guarded:
        parts += ["Collapse-guard events (step: surging signals, robust z-scores):", ""]
        for name, r in sorted(guarded):
            events_text = "; ".join(
                f"step {e['step']}: "
                + (", ".join(f"{k} {v:.1f}" for k, v in e["signals"].items()) or "(signals n/a)")
                for e in r["train"]["guard_events"]
            )
            parts.append(f"- `{name}`: {events_text}")
        parts.append("")
    parts += [discussion_block("ablations"), ""]
    parts += [
        "## Discussion",
        "",
        discussion_block("discussion"),
        "",
        "## How to rerun",
        "",
        "```",
        "make reproduce    # = OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reproduce.py --jobs 2",
        "python benchmarks/reproduce.py --dry-run     # the plan and its estimated wall time",
        "python benchmarks/reproduce.py --quick       # smoke test (~2 CPU-min), runs/reproduce-quick",
        "python benchmarks/reproduce.py --report      # rebuild this page from runs/reproduce",
        "python benchmarks/reproduce.py --only 'cppo-*' --ablation-seeds 0,1,2   # a subset",
        "```",
        "",
        f"The default plan: {len(default_plan)} runs (before RL, {len(OBJECTIVES)} objectives x 3 "
        f"seeds, {sum(r.kind == 'ablation' for r in default_plan)} ablation runs at seed 0), "
        f"estimated at about {default_min:.0f} min "
        "on a quiet 2-core machine with `--jobs 2` (`--dry-run` prints the estimate per run; "
        f"`--ablation-seeds 0,1,2` adds about {extra_min:.0f} min).",
        "",
        "Interrupting is safe: rerunning the same command skips finished runs (their "
        "`result.json`), resumes unfinished ones from their last checkpoint (every "
        f"{settings.save_every} steps) and their evaluation from the batches on file. One "
        "output folder holds one configuration (steps, evaluation sizes, starting weights): "
        "changing one needs another `--out`.",
        "",
        "<details><summary>All runs</summary>",
        "",
        raw_table(results) if results else "_None yet._\n",
        "</details>",
        "",
    ]
    return "\n".join(parts)


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def write_report(out: Path, docs: Path, settings: Settings, planned: int | None = None) -> Path:
    """Aggregate ``out``'s results into ``out/results.json``, the plot and ``docs/results.md``."""
    results = load_results(out, settings) if out.exists() else {}
    if out.exists():
        summary = {"settings": dataclasses.asdict(settings), "runs": results}
        _write_json(out / "results.json", summary)
    curves = plot_curves(results, docs / CURVES_PNG)
    text = render_report(results, settings, out=out, planned=planned, curves=curves, docs=docs)
    md = docs / RESULTS_MD
    md.parent.mkdir(parents=True, exist_ok=True)
    old = md.read_text() if md.exists() else None
    md.write_text(merge_discussion(text, old))
    return md


# --- command line ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Run issue 8's reproduction suite (resumable) and write docs/results.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n"
        + __doc__.split("    python", 1)[1].split("\n\n")[0].join(["    python", ""])
        if __doc__
        else None,
    )
    p.add_argument(
        "--out", type=Path, help="runs folder (default runs/reproduce; quick: runs/reproduce-quick)"
    )
    p.add_argument(
        "--docs", type=Path, help="where results.md and the PNG go (default docs/; quick: OUT)"
    )
    p.add_argument(
        "--jobs", type=int, default=2, help="runs in parallel, one thread each (default 2)"
    )
    p.add_argument("--seeds", help="seeds of the main runs (default 0,1,2; quick: 0)")
    p.add_argument("--ablation-seeds", default="0", help="seeds of the ablations (default 0)")
    p.add_argument(
        "--only",
        help="comma-separated run-name patterns (glob, or substring without *?[), e.g. "
        "'before,grpo-s0,papo_g-*' (before-rl is a run too)",
    )
    p.add_argument("--steps", type=int, help="RL steps per run (default: the quickstart's, 60)")
    p.add_argument("--eval-limit", type=int, help="easy-vqa test questions (default: all 9,673)")
    p.add_argument("--synthetic-limit", type=int, help="synthetic questions (default 500)")
    p.add_argument("--probe-limit", type=int, help="probed test questions (default 1000)")
    p.add_argument("--curve-eval-size", type=int, help="learning-curve questions (default 500)")
    p.add_argument("--eval-every", type=int, help="steps between learning-curve evaluations (10)")
    p.add_argument("--quick", action="store_true", help="smoke configuration (~2 minutes)")
    p.add_argument("--report", action="store_true", help="only rebuild tables, plot and docs")
    p.add_argument("--dry-run", action="store_true", help="print the plan and time estimate")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    base = (
        Settings(
            steps=2,
            eval_limit=48,
            synthetic_limit=24,
            probe_limit=24,
            curve_eval_size=24,
            eval_every=1,
            save_every=1,
            eval_batch=24,
            quick=True,
        )
        if args.quick
        else Settings(steps=int(quickstart_tree()["train"]["steps"]))
    )
    changes = {
        name: getattr(args, name)
        for name in (
            "steps",
            "eval_limit",
            "synthetic_limit",
            "probe_limit",
            "curve_eval_size",
            "eval_every",
        )
        if getattr(args, name) is not None
    }
    return dataclasses.replace(
        base,
        **changes,
        model_sha256=model_sha256(eval_options()["model"]),
        quickstart_sha256=quickstart_sha256(),
    ).validate()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker(args.worker.resolve())
    try:
        return _main(args)
    except ReproError as e:
        print(f"reproduce: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reproduce: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def _main(args: argparse.Namespace) -> int:
    out = (args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)).resolve()
    docs = (args.docs or (out if args.quick else DEFAULT_DOCS)).resolve()
    if args.report:
        if (out / "plan.json").exists():
            settings = read_plan_settings(out)
        else:  # nothing run yet: the page shows the plan with its tables pending
            settings = settings_from_args(args)
            print(f"note: {_relative(out)} has no plan.json; the tables will be pending")
        docs = (args.docs or (out if settings.quick else DEFAULT_DOCS)).resolve()
        print(f"wrote {write_report(out, docs, settings)}")
        return 0
    if args.jobs < 1:
        raise ReproError(f"--jobs must be >= 1, got {args.jobs}")
    settings = settings_from_args(args)
    seeds = parse_seeds(args.seeds) if args.seeds else ((0,) if args.quick else (0, 1, 2))
    plan = build_plan(seeds, parse_seeds(args.ablation_seeds), only=args.only)
    if args.quick and not args.only:
        plan = [r for r in plan if r.kind != "ablation" or r.name in QUICK_ABLATIONS]
    validate_plan(plan, settings, out)
    estimate = estimate_wall_s(plan, settings, args.jobs)
    print(
        f"{len(plan)} runs, {settings.steps} steps each, {args.jobs} in parallel; estimated "
        f"{estimate / 60:.0f} min on a quiet machine ({_relative(out)})"
    )
    if args.dry_run:
        for spec in plan:
            extra = ", ".join(f"{k}={v}" for k, v in spec.overrides)
            print(f"  {spec.name:<32} ~{estimate_run_s(spec, settings):5.0f} s  {extra}")
        return 0
    if settings.quick and _stale_quick_folder(out, settings):
        print(f"note: {_relative(out)} holds an older smoke test; starting it afresh")
        shutil.rmtree(out)
    check_plan_file(out, settings)
    for spec in plan:  # refuse a folder made with another plan before starting anything
        run_state(out / spec.name, spec, settings)
    start = time.perf_counter()
    failed = execute(plan, settings, out, jobs=args.jobs, progress=not args.no_progress)
    print(f"suite wall time {time.perf_counter() - start:.0f} s")
    md = write_report(out, docs, settings, planned=len(plan))
    print(f"wrote {md}, {docs / CURVES_PNG} and {out / 'results.json'}")
    if failed:
        print(
            f"failed runs: {', '.join(failed)} (rerun the command to retry them)", file=sys.stderr
        )
        return 1
    return 0


#: The ablation run --quick includes (one per family would take too long for a smoke test).
QUICK_ABLATIONS = ("papo_g-gamma0.04-s0",)


if __name__ == "__main__":
    sys.exit(main())
