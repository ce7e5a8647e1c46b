"""Reward functions as the trainer sees them: batch callables, composition, loading, registry.

The user API (TRL-style) is a plain callable::

    def my_reward(completions: list[str], answers: list[str], **columns) -> list[float | dict]:
        ...

returning one value per completion: a float, or a dict of named components (summed with weight
1 each unless weights are configured, and each logged as ``reward/{name}/mean``). ``columns``
are the other dataset columns of the batch, one list per column. Such a function can live in
any file and be named in a config as ``"path/to/file.py:function"`` (:func:`load_reward_fn`).

TRL's signature is accepted too (:func:`reward_style` tells them apart from the parameters)::

    def my_reward(prompts, completions, completion_ids, **kwargs) -> list[float | None]:
        ...

called with conversational ``prompts``/``completions`` (``[{"role": ..., "content": ...}]``
lists, as TRL passes them for image-text data), the completions' token ids, and the dataset's
columns as keywords (the ground truth as ``solution`` and ``answer``). :class:`MultiReward`
combines several functions with weights, each one logged as its own component
(``reward.funcs`` / ``reward.weights`` in a config). :func:`reward_columns` builds the columns
of a batch of samples, the same in training, evaluation, probe and report.

Built-ins are per-sample verifiers ``(completion, answer) -> float`` combined with weights by
:class:`CompositeReward`; :data:`REWARDS` names the ready-made ones for configs.
"""

from __future__ import annotations

import hashlib
import inspect
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
    "MultiReward",
    "RESERVED_COLUMNS",
    "RewardResult",
    "TRLReward",
    "combine_outputs",
    "load_reward_fn",
    "parse_reward_file",
    "reference_reward",
    "resolve_reward",
    "reward_columns",
    "reward_style",
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
        self.style = reward_style(fn)
        self._call = TRLReward(fn, name) if self.style == "trl" else _wrap_vispo(fn)
        self.__name__ = getattr(fn, "__name__", name)
        self.__doc__ = getattr(fn, "__doc__", None)

    @property
    def weights(self) -> Mapping[str, float] | None:
        """The loaded callable's ``weights`` attribute, if it has one (e.g. a CompositeReward)."""
        return getattr(self.fn, "weights", None)

    def __call__(self, completions: Sequence[str], answers: Sequence[str], **columns: Any) -> Any:
        return self._call(completions, answers, **columns)

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


def resolve_reward(spec: str | Callable[..., Any] | Sequence[Any]) -> Callable[..., Any]:
    """A reward callable from a config value: a :data:`REWARDS` name, a file spec, a callable
    (a TRL-style one is wrapped in :class:`TRLReward`), or a list of these (a
    :class:`MultiReward` with weight 1 each)."""
    if callable(spec):
        return TRLReward(spec) if reward_style(spec) == "trl" else _wrap_vispo(spec)
    if isinstance(spec, (list, tuple)):
        return MultiReward(spec)
    if isinstance(spec, str):
        if spec in REWARDS:
            return REWARDS[spec]()
        if ":" in spec:
            return load_reward_fn(spec)
        raise ValueError(
            f"unknown reward {spec!r}: use one of {sorted(REWARDS)} or 'path/to/file.py:function'"
        )
    raise TypeError(f"reward must be a name, 'file.py:function' or a callable, got {spec!r}")


# --------------------------------------------------------------------------------------------
# TRL-style functions, several functions with weights, and the columns a reward receives
# --------------------------------------------------------------------------------------------

#: Names a dataset column cannot take in a reward call (they are the call's own arguments);
#: such columns are left out of ``columns``.
RESERVED_COLUMNS = frozenset(
    {"completions", "answers", "sample_ids", "prompts", "completion_ids", "trainer_state"}
)

_TRL_ONLY = {"prompts", "completion_ids", "trainer_state"}


def _keyword_names(fn: Callable[..., Any]) -> frozenset[str] | None:
    """The keyword names ``fn`` accepts, or None when it takes ``**kwargs`` (or has no
    readable signature): columns it does not name are then not passed to it."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )


def _only_accepted(names: frozenset[str] | None, columns: dict[str, Any]) -> dict[str, Any]:
    return columns if names is None else {k: v for k, v in columns.items() if k in names}


class _NamedColumns:
    """A vispo-style function without ``**columns``: called with the columns it names only
    (e.g. ``f(completions, answers, question)`` gets ``question`` and nothing else)."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.names = _keyword_names(fn)
        self.__name__ = _fn_name(fn)

    @property
    def weights(self) -> Mapping[str, float] | None:
        return getattr(self.fn, "weights", None)

    def __call__(self, completions, answers, **columns):
        return self.fn(completions, answers, **_only_accepted(self.names, columns))

    def __repr__(self) -> str:
        return repr(self.fn)


def reward_style(fn: Callable[..., Any]) -> str:
    """``"trl"`` or ``"vispo"``: how ``fn`` wants to be called, read from its parameters.

    TRL style: a parameter named ``prompts``, ``completion_ids`` or ``trainer_state``, or a
    first parameter named ``completions`` not followed by a positional ``answers`` (e.g.
    ``f(completions, **kwargs)``, ``f(completions, solution, **kwargs)``). Anything else
    (``f(completions, answers, **columns)``, ``f(c, a, **kw)``, a :class:`CompositeReward`)
    is called the vispo way, ``f(completions, answers, **columns)``.
    """
    if isinstance(fn, (CompositeReward, FileReward, TRLReward, MultiReward, _NamedColumns)):
        return "vispo"
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return "vispo"
    if _TRL_ONLY & set(params):
        return "trl"
    positional = [
        p
        for p in params.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if positional and positional[0].name == "completions":
        if len(positional) < 2 or positional[1].name != "answers":
            return "trl"
    return "vispo"


def _wrap_vispo(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` itself, or wrapped so that it gets only the columns it names (no ``**columns``)."""
    if not (inspect.isfunction(fn) or inspect.ismethod(fn)):  # objects handle their own
        return fn
    return fn if _keyword_names(fn) is None else _NamedColumns(fn)


def _is_file_spec(spec: Any) -> bool:
    return isinstance(spec, str) and spec not in REWARDS and ":" in spec


class _DeferredFile:
    """A ``"file.py:function"`` reward read here but executed only when first used.

    Inside :class:`MultiReward` this keeps a reward file's code out of the trainer process:
    the runner sends the object (with the file's text) to its workers, which execute it. Its
    component is named after the function; a ``weights`` mapping the function may carry is not
    expanded (a dict value from it is summed, as for any function).
    """

    def __init__(self, spec: str, source: str | None = None):
        path, self.name = parse_reward_file(spec)
        self.spec, self.path = spec, path
        self.source = path.read_text(encoding="utf-8") if source is None else source
        self.__name__ = self.name
        self._fn: FileReward | None = None

    def load(self) -> FileReward:
        if self._fn is None:
            self._fn = FileReward(self.path, self.name, self.source)
        return self._fn

    def __call__(self, completions: Sequence[str], answers: Sequence[str], **columns: Any) -> Any:
        return self.load()(completions, answers, **columns)

    def __reduce__(self):
        # Rebuilt from the text: a worker may run as a user that cannot read the file.
        return (_restore_deferred, (self.spec, str(self.path), self.name, self.source))


def _restore_deferred(spec: str, path: str, name: str, source: str) -> _DeferredFile:
    deferred = _DeferredFile.__new__(_DeferredFile)
    deferred.spec, deferred.path, deferred.name, deferred.source = spec, Path(path), name, source
    deferred.__name__, deferred._fn = name, None
    return deferred


def _fn_name(fn: Any) -> str:
    return str(getattr(fn, "__name__", None) or type(fn).__name__)


class TRLReward:
    """A TRL-style reward function called through vispo's API.

    ``fn(prompts=..., completions=..., completion_ids=..., **kwargs)`` receives
    ``prompts[i] = [{"role": "user", "content": question}]``, ``completions[i] =
    [{"role": "assistant", "content": text}]`` (conversational, as TRL passes them for
    image-text data), ``completion_ids`` (the column of that name, else ``None`` per
    completion), and every other column as a keyword, plus the ground truth as ``solution``
    and ``answer`` unless the data has columns of those names. Its values (float, or ``None``
    for "does not apply", counted as 0) become the component named ``name`` (default: the
    function's name), so it is logged as ``reward/{name}/mean``.
    """

    def __init__(self, fn: Callable[..., Any], name: str | None = None):
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        self.fn = fn
        self.name = name or _fn_name(fn)
        self.__name__ = self.name
        self.names = _keyword_names(fn)

    def __call__(
        self, completions: Sequence[str], answers: Sequence[str], **columns: Any
    ) -> list[Any]:
        _check_batch(completions, answers)
        n = len(completions)
        columns = dict(columns)
        questions = columns.get("question", [""] * n)
        ids = columns.pop("completion_ids", None) or [None] * n
        columns.setdefault("solution", list(answers))
        columns.setdefault("answer", list(answers))
        kwargs = {
            "prompts": [[{"role": "user", "content": q}] for q in questions],
            "completions": [[{"role": "assistant", "content": c}] for c in completions],
            "completion_ids": list(ids),
            "trainer_state": None,  # TRL passes its TrainerState; vispo has none to give
            **columns,
        }
        if self.names is None:
            kwargs.pop("trainer_state")
        out = self.fn(**_only_accepted(self.names, kwargs))
        if hasattr(out, "tolist") and getattr(out, "ndim", None) == 1:
            out = out.tolist()
        if not isinstance(out, (list, tuple)):
            return out  # the runner reports the wrong type
        return [
            {self.name: 0.0 if v is None else v} if not isinstance(v, Mapping) else v for v in out
        ]

    def __repr__(self) -> str:
        return f"TRLReward({self.name})"


class MultiReward:
    """Several reward functions with weights, each kept as its own component.

    ``funcs``: reward specs as :func:`resolve_reward` takes them (a :data:`REWARDS` name, a
    ``"file.py:function"``, a callable of either signature). A function that carries
    ``weights`` (a :class:`CompositeReward`, e.g. ``"reference"``) contributes its own
    components, each weighted by ``weight * its inner weight``; any other function is one
    component named after it (a dict value from it is summed), weighted by ``weight``. A
    repeated name gets a suffix ``_2``, ``_3``... The total is the weighted sum, as in TRL's
    ``reward_weights``.
    """

    def __init__(self, funcs: Sequence[Any], weights: Sequence[float] | None = None):
        funcs = list(funcs)
        if not funcs:
            raise ValueError("reward.funcs: name at least one reward function")
        if weights is None or len(weights) == 0:
            weights = [1.0] * len(funcs)
        if len(weights) != len(funcs):
            raise ValueError(
                f"reward.weights has {len(weights)} values for {len(funcs)} reward.funcs"
            )
        self.specs = funcs
        self.func_weights = [float(w) for w in weights]
        for w in self.func_weights:
            if not math.isfinite(w):
                raise ValueError(f"reward.weights: {w} is not finite")
        self.fns = [_DeferredFile(f) if _is_file_spec(f) else resolve_reward(f) for f in funcs]
        self.parts: list[tuple[Callable[..., Any], dict[str, str] | str]] = []
        self._weights: dict[str, float] = {}
        for spec, fn, w in zip(funcs, self.fns, self.func_weights):
            inner = getattr(fn, "weights", None)
            if isinstance(inner, Mapping) and inner:
                mapping = {k: self._claim(k, w * float(v)) for k, v in inner.items()}
                self.parts.append((fn, mapping))
            else:
                base = spec if isinstance(spec, str) and spec in REWARDS else _fn_name(fn)
                self.parts.append((fn, self._claim(base, w)))
        self.__name__ = "+".join(_fn_name(f) for f in self.fns)

    def _claim(self, name: str, weight: float) -> str:
        final, k = name, 1
        while final in self._weights:
            k += 1
            final = f"{name}_{k}"
        self._weights[final] = weight
        return final

    @property
    def weights(self) -> dict[str, float]:
        """Component name -> weight in the total."""
        return dict(self._weights)

    def load(self) -> None:
        """Execute the reward files now (a sandbox worker calls this under its load timeout)."""
        for fn in self.fns:
            if isinstance(fn, _DeferredFile):
                fn.load()

    def __call__(
        self, completions: Sequence[str], answers: Sequence[str], **columns: Any
    ) -> list[dict[str, float]]:
        _check_batch(completions, answers)
        n = len(completions)
        rows: list[dict[str, float]] = [{} for _ in range(n)]
        for fn, naming in self.parts:
            values = fn(list(completions), list(answers), **columns)
            if hasattr(values, "tolist") and getattr(values, "ndim", None) == 1:
                values = values.tolist()
            if not isinstance(values, (list, tuple)) or len(values) != n:
                raise ValueError(
                    f"reward {_fn_name(fn)} returned {type(values).__name__} "
                    f"{'of length ' + str(len(values)) if hasattr(values, '__len__') else ''}"
                    f" for {n} completions"
                )
            for row, v in zip(rows, values):
                if isinstance(naming, dict):
                    if not isinstance(v, Mapping):
                        raise TypeError(f"reward {_fn_name(fn)} returned {v!r}, expected a dict")
                    for k, x in v.items():
                        row[naming.get(k, k)] = x
                elif isinstance(v, Mapping):
                    row[naming] = sum(float(x) for x in v.values())
                else:
                    row[naming] = 0.0 if v is None else v
        return rows

    def __repr__(self) -> str:
        parts = ", ".join(f"{s}*{w:g}" for s, w in zip(self.specs, self.func_weights))
        return f"MultiReward({parts})"


def reward_columns(
    samples: Sequence[Any], repeat: int = 1, completion_ids: Sequence[Any] | None = None
) -> dict[str, list[Any]]:
    """The keyword columns a reward receives for ``samples`` (each repeated ``repeat`` times,
    one per completion): ``question``, every other column of the data row
    (``Sample.meta``: e.g. ``task``, ``source``, the file's extra columns; ``None`` where a
    row lacks one) and ``completion_ids`` when given. Names in :data:`RESERVED_COLUMNS` are
    left out. Training, evaluation, probe and report all call this, so a reward sees the
    same columns everywhere.
    """
    keys: dict[str, None] = {}
    for s in samples:
        keys.update(dict.fromkeys(k for k in s.meta if k not in RESERVED_COLUMNS))
    keys.pop("question", None)
    cols: dict[str, list[Any]] = {"question": [s.question for s in samples for _ in range(repeat)]}
    for k in keys:
        cols[k] = [s.meta.get(k) for s in samples for _ in range(repeat)]
    if completion_ids is not None:
        ids = [list(map(int, x)) for x in completion_ids]
        if len(ids) != len(cols["question"]):
            raise ValueError(f"{len(ids)} completion_ids for {len(cols['question'])} completions")
        cols["completion_ids"] = ids
    return cols
