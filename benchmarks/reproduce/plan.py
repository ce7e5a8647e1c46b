"""What the reproduction runs: arms, controls, comparisons, the tuning stage, settings, configs.

Every run starts from the shipped ``builtin:vispo-tiny`` with the embedded default's settings
(``vispo/configs/quickstart.yaml``) and changes only the objective (plus, for the main runs, the
learning rate chosen by the tuning stage, and for GRPO at equal rollouts its prompts per step).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "vispo" / "configs" / "quickstart.yaml"
BEFORE = "before-rl"
#: The tuning stage: GRPO at these learning rates and seeds, scored on validation only.
TUNE_LRS = (1e-4, 3e-4, 1e-3)
TUNE_SEEDS = (0, 1)
#: Image modes of the final test evaluation (vispo's ``EvalSettings.image_mode``).
IMAGE_MODES = ("real", "gray", "other")


class ReproError(RuntimeError):
    """The reproduction cannot go on; the message names the run or file and what to do."""


@dataclasses.dataclass(frozen=True)
class Arm:
    """One configuration run at every seed.

    Attributes:
        key: the run-name prefix (``papo_g``, ``cppo-off``...).
        label: the table label.
        preset: the objective preset.
        overrides: ``objective.*`` fields changed from the preset.
        equal_rollouts_of: for GRPO at equal rollouts: the arm whose prompts consumed per step
            (``prompts_per_step`` x mean ``dynamic_sampling/rounds`` of the same seed) become this
            run's ``train.prompts_per_step``.
    """

    key: str
    label: str
    preset: str
    overrides: tuple[tuple[str, Any], ...] = ()
    equal_rollouts_of: str | None = None


def _arm(key, label, preset, equal_rollouts_of=None, **overrides) -> Arm:
    return Arm(key, label, preset, tuple(sorted(overrides.items())), equal_rollouts_of)


ARMS: tuple[Arm, ...] = (
    _arm("grpo", "GRPO", "grpo"),
    _arm("dapo", "DAPO", "dapo"),
    _arm("papo_g", "PAPO-G", "papo_g"),
    _arm("papo_g-off", "PAPO-G, gamma 0", "papo_g", gamma=0.0),
    _arm("papo_d", "PAPO-D", "papo_d"),
    _arm("papo_d-off", "PAPO-D, gamma 0, no double entropy", "papo_d", gamma=0.0, eta_orig=0.0,
         eta_mask=0.0),
    _arm("cppo", "CPPO", "cppo"),
    _arm("cppo-off", "CPPO, lambda 0", "cppo", cpl_lambda=0.0),
    _arm("vppo", "VPPO", "vppo"),
    _arm("vppo-off", "VPPO off (no token mask, no advantage scaling)", "vppo",
         vppo_top_frac=None, vppo_scale_min=None),
    _arm("noisyrollout", "NoisyRollout", "noisyrollout"),
    _arm("noisyrollout-off", "NoisyRollout, noisy share 0", "noisyrollout", noisy_frac=0.0),
    _arm("grpo-eqr", "GRPO, DAPO's rollouts", "grpo", equal_rollouts_of="dapo"),
)  # fmt: skip
ARM_BY_KEY = {a.key: a for a in ARMS}


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A paired comparison: ``arm`` minus ``control``, seed by seed."""

    key: str
    title: str
    arm: str
    control: str
    what: str


COMPARISONS: tuple[Comparison, ...] = (
    Comparison("papo_g", "PAPO-G term", "papo_g", "papo_g-off", "perception KL (gamma 0.02)"),
    Comparison("papo_d", "PAPO-D terms", "papo_d", "papo_d-off",
               "perception KL (gamma 0.01) + double entropy"),
    Comparison("cppo", "CPPO term", "cppo", "cppo-off", "contrastive loss (lambda 0.01)"),
    Comparison("vppo", "VPPO", "vppo", "vppo-off", "token mask + advantage scaling"),
    Comparison("noisyrollout", "NoisyRollout", "noisyrollout", "noisyrollout-off",
               "half of each group on noised images"),
    Comparison("dapo-steps", "DAPO vs GRPO, equal steps", "dapo", "grpo",
               "DAPO recipe (clips, no KL, dynamic sampling); DAPO sees more rollouts"),
    Comparison("dapo-rollouts", "DAPO vs GRPO, equal rollouts", "dapo", "grpo-eqr",
               "DAPO recipe; GRPO given as many prompts per step as DAPO consumed"),
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run: ``before`` (the start model), ``tune`` (GRPO at one lr) or ``main`` (an arm).

    ``name`` is ``<arm>-s<seed>``, ``tune-lr<lr>-s<seed>`` or ``before-rl``.
    """

    name: str
    kind: str
    arm: str | None = None
    seed: int | None = None
    lr: float | None = None  # tuning runs only; main runs take the tuned value

    def needs(self, settings: Settings) -> tuple[str, ...]:
        """Records that must exist before this run can start (its config reads them)."""
        if self.kind != "main":
            return ()
        deps = tuple(tune_name(lr, s) for lr in settings.tune_lrs for s in settings.tune_seeds)
        other = ARM_BY_KEY[self.arm].equal_rollouts_of
        return deps + ((f"{other}-s{self.seed}",) if other else ())

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def tune_name(lr: float, seed: int) -> str:
    return f"tune-lr{lr:g}-s{seed}"


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every run of one plan shares.

    Attributes:
        steps: RL steps per run.
        test_limit: first N easy-vqa test questions of the final evaluation (each image mode).
        cf_limit: first N questions of ``easy-vqa-cf`` (None: all).
        curve_size: validation questions the trainer scores every ``eval_every`` steps.
        eval_every: steps between the validation curve's evaluations.
        save_every: steps between checkpoints (what an interrupted run resumes from).
        eval_batch: questions per ``generate`` call in the final evaluation.
        tune_lrs, tune_seeds: the tuning stage's grid (GRPO, scored on validation).
        model_sha256: hash of the start model's weights.
        quickstart_sha256: hash of the embedded default's settings.
        quick: the smoke configuration (its numbers are not results).
    """

    steps: int = 60
    test_limit: int | None = 2000
    cf_limit: int | None = None
    curve_size: int = 500
    eval_every: int = 10
    save_every: int = 20
    eval_batch: int = 128
    tune_lrs: tuple[float, ...] = TUNE_LRS
    tune_seeds: tuple[int, ...] = TUNE_SEEDS
    model_sha256: str = ""
    quickstart_sha256: str = ""
    quick: bool = False

    def __post_init__(self):  # JSON gives lists
        object.__setattr__(self, "tune_lrs", tuple(float(x) for x in self.tune_lrs))
        object.__setattr__(self, "tune_seeds", tuple(int(x) for x in self.tune_seeds))

    def to_json(self) -> dict:
        """The settings as JSON gives them back (tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def validate(self) -> Settings:
        for name in ("steps", "curve_size", "eval_every", "eval_batch"):
            if getattr(self, name) < 1:
                raise ReproError(
                    f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        for name in ("test_limit", "cf_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ReproError(f"--{name.replace('_', '-')} must be >= 1 (or omitted: all)")
        if self.save_every < 0:
            raise ReproError("save_every must be >= 0")
        return self


def quickstart_tree() -> dict:
    return yaml.safe_load(QUICKSTART.read_text())


def quickstart_sha256() -> str:
    """Hash of the embedded default's settings that the runs inherit. Its learning rate is left
    out: no run uses it (the tuning runs set theirs, the others take the tuned value)."""
    tree = quickstart_tree()
    tree["optim"] = {k: v for k, v in (tree.get("optim") or {}).items() if k != "lr"}
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()


def model_sha256(name: str) -> str:
    """Hash of a ``builtin:`` model's weights (``""`` for other specs)."""
    if not name.startswith("builtin:"):
        return ""
    from vispo.train.setup import BUILTIN_MODELS_DIR

    path = BUILTIN_MODELS_DIR / name.split(":", 1)[1] / "model.safetensors"
    if not path.is_file():
        raise ReproError(f"{name}: no weights at {path}; rebuild them with `make tiny-model`")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def eval_options() -> dict:
    """Template, reward, answer length and model of every evaluation: the quickstart's."""
    tree = quickstart_tree()
    return {
        "template": tree["data"]["template"],
        "reward": tree["reward"]["name"],
        "max_new_tokens": int(tree["rollout"]["max_new_tokens"]),
        "model": tree["model"]["name_or_path"],
    }


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` or ``"0-4"`` -> seeds (order kept, duplicates dropped)."""
    seeds: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                seeds += range(a, b + 1)
            else:
                seeds.append(int(part))
    except ValueError:
        raise ReproError(f"seed list {text!r}: expected e.g. 0,1,2 or 0-4") from None
    if not seeds or any(s < 0 for s in seeds):
        raise ReproError(f"seed list {text!r}: seeds must be >= 0 and at least one")
    return tuple(dict.fromkeys(seeds))


def build_plan(
    seeds: Sequence[int],
    settings: Settings,
    *,
    arms: Sequence[str] | None = None,
    only: str | None = None,
) -> list[RunSpec]:
    """The runs, in execution order: before RL, tuning, then the arms seed by seed.

    Arms whose config equals another arm's in every field but the preset's name (e.g. PAPO-G
    with gamma 0 and GRPO) are run once, under the first arm's name (:func:`aliases`). ``only``:
    comma-separated patterns on run names (glob, or a substring without ``*?[``).
    """
    alias = aliases()
    keys = [a.key for a in ARMS] if arms is None else list(arms)
    runs = [RunSpec(BEFORE, "before")]
    runs += [RunSpec(tune_name(lr, s), "tune", "grpo", s, lr) for lr in settings.tune_lrs
             for s in settings.tune_seeds]  # fmt: skip
    for seed in seeds:
        for key in dict.fromkeys(alias.get(k, k) for k in keys):
            runs.append(RunSpec(f"{key}-s{seed}", "main", key, seed))
    if only:
        patterns = [p.strip() for p in only.split(",") if p.strip()]
        runs = [r for r in runs if any(_matches(r.name, p) for p in patterns)]
        if not runs:
            raise ReproError(f"--only {only!r} matches no run; names look like grpo-s0")
    return runs


def _matches(name: str, pattern: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def objective_tree(arm: Arm) -> dict:
    """The arm's ``objective`` section: preset, its overrides, the model's 16-px patch."""
    return {"name": arm.preset, "mask_patch_size": 16, **dict(arm.overrides)}


def aliases() -> dict[str, str]:
    """Arm -> an earlier arm with the same built objective config (the preset name aside)."""
    return dict(_aliases())


@functools.cache
def _aliases() -> dict[str, str]:
    """Arm -> an earlier arm with the same built objective config (the preset name aside)."""
    import warnings

    from vispo.train.config import build_config

    seen: list[tuple[str, Any]] = []
    out = {}
    for arm in ARMS:
        if arm.equal_rollouts_of:
            continue
        with warnings.catch_warnings():  # notes on valid presets belong in the runs' logs
            warnings.simplefilter("ignore")
            obj = build_config({"objective": objective_tree(arm)}).objective
        obj = dataclasses.replace(obj, name="")
        match = next((k for k, o in seen if o == obj), None)
        if match is None:
            seen.append((arm.key, obj))
        else:
            out[arm.key] = match
    return out


def run_tree(
    spec: RunSpec,
    settings: Settings,
    run_dir: Path,
    *,
    lr: float | None = None,
    prompts_per_step: int | None = None,
) -> dict:
    """The run's training config: the quickstart's with the objective replaced by the arm's.

    ``lr``: the tuned learning rate (main runs; tuning runs carry theirs). ``prompts_per_step``:
    GRPO at equal rollouts. The curve is scored on the validation split; bookkeeping (seed,
    steps, folder, checkpoints, one thread) is the rest.
    """
    if spec.kind == "before":
        raise ReproError(f"{spec.name}: the before-RL row has no training config")
    tree = quickstart_tree()
    # a preset that is no arm of the plan runs as itself (no overrides)
    tree["objective"] = objective_tree(ARM_BY_KEY.get(spec.arm) or Arm(spec.arm, "", spec.arm))
    tree["train"].update(
        steps=settings.steps,
        seed=spec.seed,
        out_dir=str(run_dir),
        save_every=settings.save_every,
        keep_last=1,
        samples_every=0,
        eval_every=settings.eval_every,
        threads=1,
    )
    if prompts_per_step is not None:
        tree["train"]["prompts_per_step"] = int(prompts_per_step)
    rate = spec.lr if spec.kind == "tune" else lr
    if rate is None:
        raise ReproError(f"{spec.name}: no learning rate (the tuning stage has not finished)")
    tree["optim"]["lr"] = float(rate)
    tree["data"]["eval_split"] = "validation"
    tree["data"]["eval_size"] = settings.curve_size
    tree.setdefault("logging", {})["progress"] = False
    return tree


def chosen_lr(tuning: Mapping[float, Mapping[int, float]]) -> float:
    """The learning rate with the highest mean final validation accuracy (ties: the smaller).

    Args:
        tuning: lr -> seed -> final validation accuracy; every lr needs every seed the others
            have, else the choice would compare different seed sets.
    """
    if not tuning:
        raise ReproError("no tuning result")
    seed_sets = {frozenset(v) for v in tuning.values()}
    if len(seed_sets) != 1 or not next(iter(seed_sets)):
        raise ReproError(f"tuning runs incomplete: seeds per lr {dict(tuning)}")
    means = {lr: sum(v.values()) / len(v) for lr, v in tuning.items()}
    return min(means, key=lambda lr: (-means[lr], lr))
