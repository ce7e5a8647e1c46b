"""Named configs and how ``vispo train`` layers them.

``vispo/configs`` (``configs/`` in a checkout) holds three kinds of YAML file:

* ``quickstart.yaml``: the embedded default (the shipped model on easy-vqa), what
  ``vispo train`` runs without a config;
* ``objectives/<name>.yaml``: an objective only (one per preset of ``vispo.algos.PRESETS``). It
  runs on the embedded default: the default's objective section is replaced by the file's,
  keeping only ``objective.mask_patch_size`` (the default model's patch size);
* ``recipes/<name>.yaml``: a paper's full recipe (model, data, lengths, learning rate), run on
  the built-in field defaults like any complete config.

A config is named by a path, or by a name: ``cppo`` (an objective), ``quickstart``,
``objectives/cppo`` or ``recipes/cppo``. Any file whose only section is ``objective`` is
layered on the embedded default as an objective preset is. An ``objective.name=X`` override that
changes the preset does the same to the config it overrides: the config's objective values
are dropped (but for the model-bound ones) and X's preset values apply, with the other
overrides on top.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path

import yaml

from vispo.train.config import (
    SECTIONS,
    Config,
    ConfigError,
    _merge,
    build_config,
    parse_overrides,
)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "quickstart.yaml"
#: Objective fields that belong to the model: kept from the default under an objective preset.
MODEL_BOUND_OBJECTIVE_FIELDS = ("mask_patch_size",)


def named_configs() -> dict[str, Path]:
    """Every name ``vispo train NAME`` accepts -> its file."""
    out: dict[str, Path] = {"quickstart": DEFAULT_CONFIG}
    for kind in ("objectives", "recipes"):
        for p in sorted((CONFIG_DIR / kind).glob("*.yaml")):
            out[f"{kind}/{p.stem}"] = p
    for p in sorted((CONFIG_DIR / "objectives").glob("*.yaml")):
        out.setdefault(p.stem, p)  # a bare name is the objective preset
    return out


def resolve_config(name: str) -> Path:
    """The file for a config path or name; ``ConfigError`` listing the names otherwise."""
    p = Path(name).expanduser()
    if p.is_file():
        return p
    names = named_configs()
    key = name[:-5] if name.endswith(".yaml") else name
    key = key.removeprefix("configs/")
    if key in names:
        return names[key]
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(
        f"config {name!r} is neither a file nor a preset{hint}; presets: "
        + ", ".join(k for k in names if "/" not in k)
        + "; recipes: "
        + ", ".join(k for k in names if k.startswith("recipes/"))
    )


def read_tree(path: Path) -> dict:
    """A YAML config file as a dict (``ConfigError`` for bad YAML or layout)."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())  # safe_load: a config never runs code
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return loaded or {}


def is_objective_only(tree: dict) -> bool:
    return bool(tree) and set(tree) == {"objective"}


def config_tree(config: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """The config tree ``vispo train`` runs: the embedded default (no config, or an
    objective-only file layered on it) or the named file, then the overrides."""
    default = read_tree(DEFAULT_CONFIG)
    if config is None:
        tree = default
    else:
        path = resolve_config(str(config))
        tree = read_tree(path)
        if is_objective_only(tree):
            tree = {**default, "objective": {**_model_bound(default), **(tree["objective"] or {})}}
    extra = parse_overrides(overrides or [])
    name = (extra.get("objective") or {}).get("name")
    if name is not None and name != (tree.get("objective") or {}).get("name", "grpo"):
        # Another preset on the command line starts from that preset, as an objective file
        # would: the config's own objective values (PAPO's gamma in the embedded default) are
        # the old preset's and must not carry over into the new one.
        tree = {**tree, "objective": _model_bound(tree)}
    return _merge(tree, extra)


def _model_bound(tree: dict) -> dict:
    """The objective fields of `tree` that belong to its model (kept across presets)."""
    objective = tree.get("objective") or {}
    return {k: v for k, v in objective.items() if k in MODEL_BOUND_OBJECTIVE_FIELDS}


def load_named_config(
    config: str | Path | None = None, overrides: list[str] | None = None
) -> Config:
    """The validated config of ``vispo train [CONFIG] [overrides]``."""
    return build_config(config_tree(config, overrides))


def _value(v) -> str:
    return repr(v)


def effective_help(cfg: Config) -> str:
    """Every field with the value ``cfg`` gives it (what the run would use) and its help,
    grouped by section; each field once."""
    lines = []
    for name, sec in SECTIONS.items():
        cls = typing.get_type_hints(Config)[name]
        lines.append(f"{name}: {sec.metadata['help']}")
        section = getattr(cfg, name)
        for f in dataclasses.fields(cls):
            help_ = f.metadata.get("help", "")
            if name == "objective" and f.name == "name":
                help_ = "Preset the objective starts from: " + ", ".join(_presets()) + "."
            lines.append(f"  {name}.{f.name} = {_value(getattr(section, f.name))}")
            lines.append(f"      {help_}")
    return "\n".join(lines)


def _presets() -> list[str]:
    from vispo.algos import PRESETS

    return list(PRESETS)
