"""Resolving a config into objects: the policy, the data, the reward; and :func:`preflight`,
the checks that ``vispo train`` runs before the model loads."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import tempfile
from pathlib import Path

from vispo.data import (
    BUILTIN_DATASETS,
    DataError,
    filter_by_prompt_length,
    load_builtin,
    load_samples,
)
from vispo.rewards import REWARDS, RewardRunner
from vispo.train.config import ConfigError

BUILTIN_MODELS_DIR = Path(__file__).resolve().parent.parent / "assets"


def load_model(mcfg):
    """(model, processor) for ``model.name_or_path``, with freezing / LoRA / checkpointing."""
    from vispo.models.adapt import apply_lora, enable_gradient_checkpointing, freeze_vision_tower
    from vispo.models.loading import load_policy
    from vispo.models.tiny import build_tiny_vlm

    name = mcfg.name_or_path
    if name.startswith("tiny:"):
        model, processor = build_tiny_vlm(name.split(":", 1)[1], seed=mcfg.seed)
    elif name.startswith("builtin:"):
        path = BUILTIN_MODELS_DIR / name.split(":", 1)[1]
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model.name_or_path={name!r}: the built-in model is missing at {path}; "
                "rebuild it with `make tiny-model`"
            )
        model, processor = load_policy(str(path), dtype=mcfg.dtype)
    else:
        model, processor = load_policy(
            name, dtype=mcfg.dtype, trust_remote_code=mcfg.trust_remote_code
        )
    if mcfg.freeze_vision:
        freeze_vision_tower(model)
    if mcfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if mcfg.lora:
        model = apply_lora(model, r=mcfg.lora_r, alpha=mcfg.lora_alpha)
    return model, processor


def _split_key(dcfg, split: str, limit) -> tuple:
    return (repr(sorted(dataclasses.asdict(dcfg).items())), split, limit)


#: Splits loaded by :func:`preflight`, handed once to the next identical :func:`load_split`.
_PRELOADED: dict[tuple, object] = {}


def clear_preloaded() -> None:
    """Drop what :func:`preflight` loaded and no trainer took (the run ended before)."""
    _PRELOADED.clear()


def load_split(dcfg, split: str, limit):
    """Samples of ``split`` from a built-in data set or a local source (``data.*`` fields)."""
    preloaded = _PRELOADED.pop(_split_key(dcfg, split, limit), None)
    if preloaded is not None:
        return preloaded
    if dcfg.name in BUILTIN_DATASETS:
        options = {"n": dcfg.synthetic_size} if dcfg.name == "synthetic" else {}
        return load_builtin(dcfg.name, split=split, limit=limit, **options)
    # validate_images: an undecodable image (corrupt, truncated, empty, over the pixel guard)
    # is a bad sample, skipped and counted or raised per data.on_error, not a crash later on.
    return load_samples(
        dcfg.name,
        split=split,
        columns=dcfg.columns or None,
        image_root=dcfg.image_root,
        on_error=dcfg.on_error,
        limit=limit,
        validate_images=True,
    )


def load_train_data(dcfg, processor, template, *, log=print):
    data = load_split(dcfg, dcfg.split, dcfg.limit)
    if getattr(data, "n_skipped", 0):
        log(f"data: skipped {data.n_skipped} bad samples ({dict(data.skipped)})")
    kept, dropped = filter_by_prompt_length(data, processor, template, dcfg.max_prompt_length)
    if dropped:
        log(f"data: dropped {dropped} prompts longer than {dcfg.max_prompt_length} tokens")
    if len(kept) == 0:
        raise DataError(
            f"data.name={dcfg.name!r}: no usable training samples "
            f"({len(data)} loaded, {dropped} longer than data.max_prompt_length="
            f"{dcfg.max_prompt_length} tokens)"
        )
    return kept


def load_eval_data(dcfg):
    if dcfg.eval_size <= 0:
        return None
    return load_split(dcfg, dcfg.eval_split, dcfg.eval_size)


def load_reward(rcfg) -> RewardRunner:
    """The run's reward; user reward files run sandboxed in a worker unless
    ``reward.num_workers`` says otherwise (a hang or crash there must not stop training)."""
    workers = rcfg.num_workers
    if workers is None:
        workers = 0 if rcfg.name in REWARDS else 1
    try:
        return RewardRunner(rcfg.name, num_workers=workers, timeout_s=rcfg.timeout_s)
    except (ValueError, OSError, ImportError, AttributeError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"reward.name={rcfg.name!r}: {e}") from None


# --- checks before the model loads ----------------------------------------------------------


def preflight(cfg) -> None:
    """Everything about a run that can be refused before the model loads, refused with a
    ConfigError / DataError naming the field: the reward (unknown name, missing file, a file
    that is not Python or has no such top-level function: read, never executed), the logging
    packages, the run folder (a file, or not writable), and a local training set with no
    usable sample (its samples are kept for the trainer, not loaded twice)."""
    check_reward_spec(cfg.reward.name)
    check_logging_packages(cfg.logging)
    check_out_dir(cfg.train.out_dir)
    dcfg = cfg.data
    if dcfg.name not in BUILTIN_DATASETS:
        data = load_split(dcfg, dcfg.split, dcfg.limit)
        if len(data) == 0:
            skipped = getattr(data, "n_skipped", 0)
            raise DataError(
                f"data.name={dcfg.name!r}: no usable training samples"
                + (f" (all {skipped} skipped as bad: {dict(data.skipped)})" if skipped else "")
            )
        _PRELOADED[_split_key(dcfg, dcfg.split, dcfg.limit)] = data


#: Which extra of vispo installs each optional logging package.
LOGGING_EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_logging_packages(lcfg) -> None:
    for field, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if getattr(lcfg, field) and importlib.util.find_spec(package) is None:
            raise ConfigError(logging_package_message(field, package))


def logging_package_message(field: str, package: str) -> str:
    return (
        f"logging.{field}=true needs the {package} package, which is not installed: "
        f"pip install 'vispo[{LOGGING_EXTRAS[field]}]' (or set logging.{field}=false)"
    )


def check_out_dir(out_dir: str) -> None:
    """``train.out_dir`` must be a folder (or creatable as one) that this process can write."""
    path = Path(out_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"train.out_dir: {path} exists and is not a folder")
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"train.out_dir: {path} cannot be created: {parent} is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".vispo-write-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"train.out_dir: cannot write to {path}: {e.strerror or e}") from None


def check_reward_spec(spec: str) -> None:
    """A reward name must be built in or ``path/to/file.py:function``, and that file must
    exist, parse as Python and bind ``function`` at its top level. The file is parsed, not run."""
    if spec in REWARDS:
        return
    if ":" not in spec:
        close = difflib.get_close_matches(spec, list(REWARDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"reward.name: unknown reward {spec!r}{hint}; use one of "
            f"{', '.join(sorted(REWARDS))} or 'path/to/file.py:function'"
        )
    path_text, _, name = spec.rpartition(":")
    if not path_text or not name.isidentifier():
        raise ConfigError(f"reward.name: {spec!r} must look like 'path/to/file.py:function'")
    path = Path(path_text).expanduser()
    if path.suffix != ".py":
        raise ConfigError(f"reward.name: {spec!r}: {path} is not a .py file")
    if not path.is_file():
        raise ConfigError(f"reward.name: reward file not found: {path}")
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except SyntaxError as e:
        raise ConfigError(
            f"reward.name: {path} is not valid Python (line {e.lineno}: {e.msg})"
        ) from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"reward.name: cannot read {path}: {e}") from None
    bound, dynamic = _top_level_names(tree)
    if name not in bound and not dynamic:
        defined = sorted(n for n in bound if not n.startswith("_"))
        raise ConfigError(
            f"reward.name: {path} defines no {name!r} at its top level; "
            f"names there: {', '.join(defined) or '(none)'}"
        )


def _top_level_names(tree: ast.Module) -> tuple[set[str], bool]:
    """Names a module binds at its top level (also inside top-level if/try/with/for blocks),
    and whether it may bind others in ways a parse cannot see (``import *``, ``globals()``)."""
    names: set[str] = set()
    dynamic = False

    def targets(node) -> None:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name):
                names.add(sub.id)

    def visit(body) -> None:
        nonlocal dynamic
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                for t in node.targets:
                    targets(t)
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                targets(node.target)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    if alias.name == "*":
                        dynamic = True
                    names.add(alias.asname or alias.name.split(".")[0])
            elif isinstance(node, (ast.For, ast.AsyncFor)):
                targets(node.target)
            elif isinstance(node, (ast.With, ast.AsyncWith)):
                for item in node.items:
                    if item.optional_vars is not None:
                        targets(item.optional_vars)
            for field in ("body", "orelse", "finalbody"):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    visit(getattr(node, field, []) or [])
            for handler in getattr(node, "handlers", []) or []:
                visit(handler.body)
        return None

    visit(tree.body)
    for sub in ast.walk(tree):
        if isinstance(sub, ast.NamedExpr):
            targets(sub.target)
        if isinstance(sub, ast.Name) and sub.id in ("globals", "setattr", "exec", "__import__"):
            dynamic = True
    return names, dynamic
