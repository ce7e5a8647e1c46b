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
from vispo.rewards import REWARDS, Limits, MultiReward, RewardRunner, parse_reward_file
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
    """Training samples; where the held-out set is a slice of them (see :func:`held_out`), that
    slice is removed here and kept on the result as ``.held_out`` for :func:`load_eval_data`."""
    data = load_split(dcfg, dcfg.split, dcfg.limit)
    if getattr(data, "n_skipped", 0):
        log(f"data: skipped {data.n_skipped} bad samples ({dict(data.skipped)})")
    held, keep = held_out(dcfg, data)
    if keep is not None:
        data = data.select(keep)
    if held is not None:
        log(f"data: held-out set: {held.description}")
    kept, dropped = filter_by_prompt_length(
        data, processor, template, dcfg.max_prompt_length, on_error=dcfg.on_error
    )
    refused = kept.skipped.get("processor_error", 0)
    if refused:
        log(f"data: skipped {refused} samples the processor refuses ({kept.errors[-1]})")
    if kept.neutralised:
        log(
            f"data: neutralised chat-control/image tokens in the text of {len(kept.neutralised)}"
            " samples (now plain text)"
        )
    if dropped:
        log(f"data: dropped {dropped} prompts longer than {dcfg.max_prompt_length} tokens")
    if len(kept) == 0:
        raise DataError(
            f"data.name={dcfg.name!r}: no usable training samples "
            f"({len(data)} loaded, {dropped} longer than data.max_prompt_length="
            f"{dcfg.max_prompt_length} tokens)"
        )
    kept.held_out = held
    return kept


#: The held-out slice of a local data set without a held-out split: a fixed seed (the same
#: questions whatever train.seed is), at most this fraction of the rows.
HELD_OUT_SEED = 0
HELD_OUT_FRACTION = 0.2


def _image_key(src) -> str:
    """A cheap identity of an image source (path, or digest of its bytes)."""
    import hashlib

    import numpy as np
    from PIL import Image

    if isinstance(src, dict):
        if src.get("bytes"):
            return hashlib.sha1(src["bytes"]).hexdigest()
        return str(src.get("path"))
    if isinstance(src, (bytes, bytearray)):
        return hashlib.sha1(src).hexdigest()
    if isinstance(src, np.ndarray):
        return hashlib.sha1(src.tobytes()).hexdigest()
    if isinstance(src, Image.Image):
        return hashlib.sha1(src.tobytes()).hexdigest()
    return str(src)


def sample_key(sample) -> tuple:
    """What makes two samples the same question: question, answer and images (not the id,
    which a loader may derive from the split name)."""
    return (sample.question, sample.answer, tuple(_image_key(i) for i in sample.images))


def _membership(train):
    """``is_in(sample)``: whether a sample with the same :func:`sample_key` is in ``train``.
    Images are hashed only for training rows whose question and answer match one asked about."""
    by_text: dict[tuple, list] = {}
    for s in train:
        by_text.setdefault((s.question, s.answer), []).append(s)
    cache: dict[tuple, set] = {}

    def is_in(sample) -> bool:
        text = (sample.question, sample.answer)
        if text not in by_text:
            return False
        if text not in cache:
            cache[text] = {sample_key(s) for s in by_text[text]}
        return sample_key(sample) in cache[text]

    return is_in


def held_out_slice(n_rows: int, eval_size: int) -> tuple[list[int], list[int]]:
    """``(held, keep)`` row indices: ``min(eval_size, HELD_OUT_FRACTION * n_rows)`` rows drawn
    with :data:`HELD_OUT_SEED`, in row order, and the rest."""
    import numpy as np

    n = min(eval_size, int(n_rows * HELD_OUT_FRACTION))
    order = np.random.default_rng(HELD_OUT_SEED).permutation(n_rows)
    held = sorted(int(i) for i in order[:n])
    chosen = set(held)
    return held, [i for i in range(n_rows) if i not in chosen]


def held_out(dcfg, train=None):
    """The held-out set of a data config: ``(eval_data or None, keep)``.

    ``keep`` is None, or the indices of ``train`` to train on when the held-out set is a slice
    of it. Which set, in order:

    1. ``data.eval_name`` (a built-in name or a path): its ``data.eval_split``;
    2. a built-in ``data.name``: its ``data.eval_split``;
    3. a local ``data.name`` whose ``data.eval_split`` holds other questions than the training
       split (a DatasetDict folder, a JSON object with that key, split-named parquet files);
    4. otherwise a fixed-seed slice of the training rows (:func:`held_out_slice`), removed from
       training: the training file itself is never evaluated on.

    The result has ``.description`` (what the summary prints). ``train`` is the loaded training
    split (loaded here when None). ``data.eval_size`` 0 means no held-out set.
    """
    if dcfg.eval_size <= 0:
        return None, None
    eval_name = getattr(dcfg, "eval_name", None)
    if eval_name:
        source = dataclasses.replace(dcfg, name=eval_name)  # read like the training set
        data = load_split(source, dcfg.eval_split, dcfg.eval_size)
        data.description = f"{len(data)} questions of {eval_name} (split {dcfg.eval_split})"
        return data, None
    if dcfg.name in BUILTIN_DATASETS:
        data = load_split(dcfg, dcfg.eval_split, dcfg.eval_size)
        data.description = f"{len(data)} questions of {dcfg.name} split {dcfg.eval_split}"
        return data, None
    if train is None:
        train = load_split(dcfg, dcfg.split, dcfg.limit)
    in_train = _membership(train)
    reason = f"{dcfg.name} has no split {dcfg.eval_split!r} apart from its training rows"
    try:
        named = load_split(dcfg, dcfg.eval_split, dcfg.eval_size)
    except DataError as e:
        named, reason = None, f"{e}"
    shared = sum(in_train(s) for s in named) if named is not None else 0
    if named is not None and len(named) and shared < len(named):
        named.description = f"{len(named)} questions of {dcfg.name} split {dcfg.eval_split}"
        if shared:
            named.description += f" ({shared} of them also in the training split)"
        return named, None
    held, keep = held_out_slice(len(train), dcfg.eval_size)
    if not held:
        return None, None
    data = train.select(held)
    data.description = (
        f"{len(held)} questions held out of the training data ({reason}): a fixed-seed slice "
        f"(seed {HELD_OUT_SEED}), not trained on"
    )
    return data, keep


def load_eval_data(dcfg, train=None):
    """The held-out set (:func:`held_out`), or None. ``train``: what :func:`load_train_data`
    returned, whose ``.held_out`` is reused (it was removed from training there)."""
    if dcfg.eval_size <= 0:
        return None
    if train is not None and hasattr(train, "held_out"):
        return train.held_out
    return held_out(dcfg)[0]


def describe_eval_data(eval_data, eval_size: int) -> str:
    """``"N questions of ..."``: the real number of held-out questions scored and where they
    come from (for the summary table)."""
    n = min(eval_size, len(eval_data)) if eval_data is not None else 0
    text = getattr(eval_data, "description", None)
    if text is None or n != len(eval_data):
        return f"{n} questions"
    return text


def load_reward(rcfg) -> RewardRunner:
    """The run's reward (``reward.funcs`` with ``reward.weights`` when given, else
    ``reward.name``); user reward files run sandboxed in a worker unless
    ``reward.num_workers`` says otherwise (a hang or crash there must not stop training).
    Evaluation, probe and report build their reward here too, so it runs under the same
    timeout everywhere."""
    funcs = list(getattr(rcfg, "funcs", None) or [])
    specs = funcs or [rcfg.name]
    workers = rcfg.num_workers
    if workers is None:
        workers = 0 if all(isinstance(f, str) and f in REWARDS for f in specs) else 1
    limits = Limits(
        env=tuple(rcfg.env),
        memory_mb=rcfg.memory_mb,
        cpu_s=rcfg.cpu_s,
        file_size_mb=rcfg.file_size_mb,
        max_processes=rcfg.max_processes,
        user=rcfg.user,
        network=rcfg.network,
    )
    try:
        fn = MultiReward(funcs, list(rcfg.weights or []) or None) if funcs else rcfg.name
        return RewardRunner(
            fn,
            num_workers=workers,
            timeout_s=rcfg.timeout_s,
            limits=limits,
            max_consecutive_failures=rcfg.max_consecutive_failures,
        )
    except (ValueError, OSError, ImportError, AttributeError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        where = "reward.funcs" if funcs else f"reward.name={rcfg.name!r}"
        raise ConfigError(f"{where}: {e}") from None


# --- checks before the model loads ----------------------------------------------------------


def preflight(cfg) -> None:
    """Everything about a run that can be refused before the model loads, refused with a
    ConfigError / DataError naming the field: the reward (unknown name, missing file, a file
    that is not Python or has no such top-level function: read, never executed), the logging
    packages, the run folder (a file, or not writable), and a local training set with no
    usable sample (its samples are kept for the trainer, not loaded twice)."""
    for spec in cfg.reward.funcs or [cfg.reward.name]:
        if isinstance(spec, str):
            check_reward_spec(spec)
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
    try:
        path, name = parse_reward_file(spec)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"reward.name: {e}") from None
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
