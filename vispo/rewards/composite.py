"""Reward functions as the trainer sees them: batch callables, composition, loading, registry.

The user API (TRL-style) is a plain callable::

    def my_reward(completions: list[str], answers: list[str], **columns) -> list[float | dict]:
        ...

returning one value per completion: a float, or a dict of named components (summed with weight
1 each unless weights are configured, and each logged as ``reward/{name}/mean``). ``columns``
are the other dataset columns of the batch, one list per column. Such a function can live in
any file and be named in a config as ``"path/to/file.py:function"`` (:func:`load_reward_fn`).

Built-ins are per-sample verifiers ``(completion, answer) -> float`` combined with weights by
:class:`CompositeReward`; :data:`REWARDS` names the ready-made ones for configs.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from vispo.rewards.verifiers import (
    choice_accuracy,
    exact_match,
    format_reward,
    math_accuracy,
    yes_no_accuracy,
)

__all__ = [
    "REWARDS",
    "CompositeReward",
    "FileReward",
    "RewardResult",
    "combine_outputs",
    "load_reward_fn",
    "parse_reward_file",
    "reference_reward",
    "resolve_reward",
]

#: Signature of a per-sample verifier.
SampleFn = Callable[[str, str], float]


@dataclass
class RewardResult:
    """Rewards of one batch.

    ``total[i]`` is the weighted sum that the advantages use; ``components[name][i]`` is the
    unweighted value of each named component (0.0 where the sample's output lacked that
    component or the reward failed for it); ``n_errors`` counts the samples whose reward
    failed and was replaced by 0 (see :class:`vispo.rewards.RewardRunner`).
    """

    total: list[float]
    components: dict[str, list[float]] = field(default_factory=dict)
    n_errors: int = 0

    def metrics(self) -> dict[str, float]:
        """``reward/mean``, ``reward/std`` (population std) and ``reward/{name}/mean``."""
        n = len(self.total)
        if n == 0:
            return {}
        mean = sum(self.total) / n
        out = {
            "reward/mean": mean,
            "reward/std": math.sqrt(sum((r - mean) ** 2 for r in self.total) / n),
        }
        for name, values in self.components.items():
            out[f"reward/{name}/mean"] = sum(values) / n
        return out


def combine_outputs(
    values: Sequence[float | Mapping[str, float] | None], weights: Mapping[str, float] | None = None
) -> RewardResult:
    """Turn validated per-sample outputs into a :class:`RewardResult`.

    A float is a sample's total; a dict's total is ``sum(weights.get(k, 1) * v)``. ``None``
    marks a failed sample: total 0 and every component 0, counted in ``n_errors``. Component
    names are listed in order of first appearance.
    """
    weights = weights or {}
    names: dict[str, None] = {}
    for v in values:
        if isinstance(v, Mapping):
            names.update(dict.fromkeys(v))
    components = {name: [0.0] * len(values) for name in names}
    total = [0.0] * len(values)
    n_errors = 0
    for i, v in enumerate(values):
        if v is None:
            n_errors += 1
        elif isinstance(v, Mapping):
            for name, x in v.items():
                components[name][i] = float(x)
                total[i] += float(weights.get(name, 1.0)) * float(x)
        else:
            total[i] = float(v)
    return RewardResult(total=total, components=components, n_errors=n_errors)


def _check_batch(completions: Sequence[Any], answers: Sequence[Any]) -> None:
    if len(completions) != len(answers):
        raise ValueError(
            f"got {len(completions)} completions but {len(answers)} answers; they must pair up"
        )


class CompositeReward:
    """Weighted sum of per-sample verifiers, every component reported by name.

    ``components`` maps a component name (used in ``reward/{name}/mean``) to
    ``(fn, weight)`` with ``fn(completion, answer) -> float``. Calling the object follows the
    user API and returns one dict of unweighted component values per sample; :meth:`score`
    returns the weighted totals together with the components. ``weights`` is read by
    :class:`vispo.rewards.RewardRunner`, which applies them.

    Example: ``CompositeReward({"accuracy": (math_accuracy, 0.9), "format": (format_reward,
    0.1)})`` is :func:`reference_reward`.
    """

    def __init__(self, components: Mapping[str, tuple[SampleFn, float]]):
        if not components:
            raise ValueError("CompositeReward needs at least one component")
        self.components: dict[str, tuple[SampleFn, float]] = {}
        for name, spec in components.items():
            if not isinstance(name, str) or not name or "/" in name or name.strip() != name:
                raise ValueError(
                    f"component name {name!r} must be a non-empty string without '/' or "
                    "surrounding spaces (it becomes the metric reward/{name}/mean)"
                )
            if not isinstance(spec, tuple) or len(spec) != 2:
                raise TypeError(f"component {name!r} must be (fn, weight), got {spec!r}")
            fn, weight = spec
            if not callable(fn):
                raise TypeError(f"component {name!r}: {fn!r} is not callable")
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
                raise TypeError(f"component {name!r}: weight must be a number, got {weight!r}")
            if not math.isfinite(weight):
                raise ValueError(f"component {name!r}: weight must be finite, got {weight}")
            self.components[name] = (fn, float(weight))

    @property
    def weights(self) -> dict[str, float]:
        """Component name -> weight."""
        return {name: w for name, (_, w) in self.components.items()}

    def __call__(
        self, completions: Sequence[str], answers: Sequence[str], **columns: Any
    ) -> list[dict[str, float]]:
        """Unweighted component values, one dict per sample (extra columns are ignored)."""
        _check_batch(completions, answers)
        return [
            {name: float(fn(c, a)) for name, (fn, _) in self.components.items()}
            for c, a in zip(completions, answers)
        ]

    def score(
        self, completions: Sequence[str], answers: Sequence[str], **columns: Any
    ) -> RewardResult:
        """Weighted totals and components, computed in this process without sandboxing."""
        return combine_outputs(self(completions, answers, **columns), self.weights)

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{name}={getattr(fn, '__name__', repr(fn))}*{w:g}"
            for name, (fn, w) in self.components.items()
        )
        return f"CompositeReward({parts})"


def reference_reward(accuracy_weight: float = 0.9, format_weight: float = 0.1) -> CompositeReward:
    """The PAPO/CPPO recipe reward: ``0.9 * math_accuracy + 0.1 * format_reward``.

    Components are logged as ``reward/accuracy/mean`` and ``reward/format/mean``
    (algorithms.md section 9).
    """
    return CompositeReward(
        {"accuracy": (math_accuracy, accuracy_weight), "format": (format_reward, format_weight)}
    )


def _single(name: str, fn: SampleFn) -> Callable[[], CompositeReward]:
    def factory(weight: float = 1.0) -> CompositeReward:
        return CompositeReward({name: (fn, weight)})

    factory.__doc__ = f"A reward with the single component {name!r} = {fn.__name__}."
    return factory


#: Reward name (config value) -> factory returning a batch reward callable.
REWARDS: dict[str, Callable[..., CompositeReward]] = {
    "reference": reference_reward,
    "math": _single("accuracy", math_accuracy),
    "format": _single("format", format_reward),
    "choice": _single("accuracy", choice_accuracy),
    "yesno": _single("accuracy", yes_no_accuracy),
    "exact": _single("accuracy", exact_match),
}


# --------------------------------------------------------------------------------------------
# Loading user reward functions from a file
# --------------------------------------------------------------------------------------------


def _exec_file(path: Path, source: str | None = None) -> ModuleType:
    """Execute the Python file at ``path`` (or ``source``, its text, when given) as a private
    module (no sys.path search)."""
    module_name = "_vispo_reward_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    module = ModuleType(module_name)
    module.__file__ = str(path)
    # Registered so that dataclasses and similar code inside the file can find their module.
    sys.modules[module_name] = module
    try:
        if source is None:
            source = path.read_text(encoding="utf-8")
        exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102 (the user's file)
    except (Exception, SystemExit) as e:
        sys.modules.pop(module_name, None)
        raise ImportError(
            f"error while executing reward file {path}: {type(e).__name__}: {e}"
        ) from e
    return module


class FileReward:
    """A reward function loaded from ``path`` by name.

    Behaves like the function. It pickles as ``(path, name, source)`` and executes the source
    again when unpickled, which is how it reaches sandbox worker processes (a function from a
    file that is not an importable module cannot be pickled by reference, and the worker may
    run as a user that cannot read the file).
    """

    def __init__(self, path: str | Path, name: str, source: str | None = None):
        self.path = Path(path)
        self.name = name
        if source is None:
            source = self.path.read_text(encoding="utf-8")
        self.source = source
        module = _exec_file(self.path, source)
        if not hasattr(module, name):
            available = sorted(
                k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
            )
            raise AttributeError(
                f"reward file {self.path} defines no {name!r}; callables there: "
                f"{', '.join(available) or '(none)'}"
            )
        fn = getattr(module, name)
        if not callable(fn):
            raise TypeError(f"{self.path}:{name} is a {type(fn).__name__}, not a callable")
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", name)
        self.__doc__ = getattr(fn, "__doc__", None)

    @property
    def weights(self) -> Mapping[str, float] | None:
        """The loaded callable's ``weights`` attribute, if it has one (e.g. a CompositeReward)."""
        return getattr(self.fn, "weights", None)

    def __call__(self, completions: Sequence[str], answers: Sequence[str], **columns: Any) -> Any:
        return self.fn(completions, answers, **columns)

    def __reduce__(self):
        return (FileReward, (str(self.path), self.name, self.source))

    def __repr__(self) -> str:
        return f"FileReward('{self.path}:{self.name}')"


def parse_reward_file(spec: str) -> tuple[Path, str]:
    """``(absolute path, function name)`` of a ``"path/to/file.py:function"`` spec, checked
    without executing anything: ``ValueError`` for a malformed spec, ``FileNotFoundError`` for
    a missing file."""
    if not isinstance(spec, str):
        raise TypeError(f"reward spec must be a str 'path/to/file.py:function', got {spec!r}")
    path_text, sep, name = spec.rpartition(":")
    if not sep or not path_text or not name.isidentifier():
        raise ValueError(f"reward spec must look like 'path/to/file.py:function', got {spec!r}")
    path = Path(path_text).expanduser()
    if path.suffix != ".py":
        raise ValueError(f"reward spec {spec!r}: {path} is not a .py file")
    if not path.is_file():
        raise FileNotFoundError(f"reward file not found: {path} (from spec {spec!r})")
    return path.resolve(), name


def load_reward_fn(spec: str) -> FileReward:
    """Load the reward callable named by ``"path/to/file.py:function"`` from exactly that file.

    The file is executed as a private module *in this process*: nothing is looked up on
    ``sys.path`` and no module is imported by name. (A :class:`vispo.rewards.RewardRunner`
    given the spec string instead executes the file only inside its worker processes.) Raises
    ``ValueError`` for a malformed spec, ``FileNotFoundError`` for a missing file,
    ``ImportError`` if executing the file fails, ``AttributeError`` if it has no such name,
    ``TypeError`` if the name is not callable.
    """
    path, name = parse_reward_file(spec)
    return FileReward(path, name)


def resolve_reward(spec: str | Callable[..., Any]) -> Callable[..., Any]:
    """A reward callable from a config value: a :data:`REWARDS` name, a file spec, or a callable."""
    if callable(spec):
        return spec
    if isinstance(spec, str):
        if spec in REWARDS:
            return REWARDS[spec]()
        if ":" in spec:
            return load_reward_fn(spec)
        raise ValueError(
            f"unknown reward {spec!r}: use one of {sorted(REWARDS)} or 'path/to/file.py:function'"
        )
    raise TypeError(f"reward must be a name, 'file.py:function' or a callable, got {spec!r}")
