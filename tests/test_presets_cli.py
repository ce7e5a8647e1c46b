"""Objective presets vs recipes, ``vispo train NAME``, the help that shows the values a run
uses, and objective terms from plugins (a module, a file, an entry point)."""

from __future__ import annotations

import dataclasses
import re
import sys
import textwrap

import pytest
import yaml

from vispo import cli
from vispo.algos import OBJECTIVE_TERMS, PRESETS, objective_preset
from vispo.train.config import ConfigError, build_config, load_config
from vispo.train.presets import (
    CONFIG_DIR,
    DEFAULT_CONFIG,
    config_tree,
    load_named_config,
    named_configs,
    resolve_config,
)

OBJECTIVES = ("grpo", "dapo", "dr_grpo", "papo_g", "papo_d", "cppo")


def test_objective_presets_hold_only_the_objective_and_recipes_are_complete():
    for name in OBJECTIVES:
        obj = yaml.safe_load((CONFIG_DIR / "objectives" / f"{name}.yaml").read_text())
        assert list(obj) == ["objective"] and obj["objective"]["name"] == name
        recipe = yaml.safe_load((CONFIG_DIR / "recipes" / f"{name}.yaml").read_text())
        assert {"model", "objective", "rollout", "reward", "data", "optim"} <= set(recipe)
        assert recipe["objective"] == obj["objective"]  # the same objective, in full context
        cfg = load_config(CONFIG_DIR / "recipes" / f"{name}.yaml")
        assert cfg.model.name_or_path == "Qwen/Qwen2.5-VL-3B-Instruct"
        assert cfg.optim.lr == 1e-6 and cfg.rollout.max_new_tokens == 2048
        assert cfg.objective.name == name


@pytest.mark.parametrize("name", OBJECTIVES)
def test_an_objective_preset_runs_on_the_embedded_default(name):
    """The quickstart with its objective replaced by the preset's, keeping only the model's
    patch size: the layering docs/results.md measured (benchmarks/reproduce.py run_tree)."""
    default = yaml.safe_load(DEFAULT_CONFIG.read_text())
    cfg = load_named_config(name)
    by_hand = dict(default)
    by_hand["objective"] = {"name": name, "mask_patch_size": 16}
    expected = build_config(by_hand)
    assert cfg == expected
    file_values = yaml.safe_load((CONFIG_DIR / "objectives" / f"{name}.yaml").read_text())
    for k, v in file_values["objective"].items():
        assert getattr(cfg.objective, k) == v
    preset = objective_preset(name, mask_patch_size=16)
    if preset.agg == "seq-mean-token-sum-norm":  # Dr. GRPO divides by the configured max length
        preset.horizon = cfg.rollout.max_new_tokens
    assert cfg.objective == preset
    assert cfg.model.name_or_path == "builtin:vispo-tiny" and cfg.optim.lr == 1e-4
    assert cfg.objective.gamma == PRESETS[name].get("gamma", 0.0)  # no PAPO term leaks in


@pytest.mark.parametrize("name", OBJECTIVES)
def test_an_objective_preset_is_the_config_docs_results_measured(name, tmp_path):
    """benchmarks/reproduce built the runs of docs/results.md; `vispo train NAME` differs
    from its config only in bookkeeping and the curve's held-out set (validation)."""
    root = str(CONFIG_DIR.parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.reproduce import plan

    run = plan.RunSpec(name=f"{name}-s0", kind="main", arm=name, seed=0)
    measured = build_config(
        plan.run_tree(run, plan.Settings(), tmp_path, lr=1e-4)
    )  # the tuned rate
    ours = load_named_config(name)
    assert ours.objective == measured.objective
    for section in ("model", "data", "rollout", "reward", "optim"):
        mine, theirs = getattr(ours, section), getattr(measured, section)
        diff = {
            f.name
            for f in dataclasses.fields(mine)
            if getattr(mine, f.name) != getattr(theirs, f.name)
        }
        assert diff <= {"eval_size", "eval_split"}, (section, diff)  # the curve's held-out set


def test_names_paths_and_suggestions():
    names = named_configs()
    assert names["cppo"] == CONFIG_DIR / "objectives" / "cppo.yaml"
    assert names["recipes/cppo"] == CONFIG_DIR / "recipes" / "cppo.yaml"
    assert resolve_config("quickstart") == DEFAULT_CONFIG
    assert resolve_config("recipes/dapo.yaml") == CONFIG_DIR / "recipes" / "dapo.yaml"
    assert resolve_config("configs/recipes/dapo.yaml").resolve() == names["recipes/dapo"]
    assert resolve_config(str(DEFAULT_CONFIG)) == DEFAULT_CONFIG
    with pytest.raises(ConfigError, match="did you mean 'cppo'"):
        resolve_config("cpo")


def test_config_may_come_after_overrides(capsys):
    assert cli._split_train_args(["train.steps=3", "cppo", "optim.lr=1e-3"]) == (
        "cppo",
        ["train.steps=3", "optim.lr=1e-3"],
    )
    tree = config_tree("cppo", ["train.steps=3"])
    assert tree["train"]["steps"] == 3 and tree["objective"]["name"] == "cppo"
    assert cli.main(["train", "train.steps=0", "cppo"]) == 2
    assert "train.steps: must be >= 1" in capsys.readouterr().err
    assert cli.main(["train", "cppo", "dapo"]) == 2
    assert "two configs given" in capsys.readouterr().err


def _help_values(text: str) -> dict[str, str]:
    return dict(re.findall(r"^  ([a-z_]+\.[a-z_0-9]+) = (.*)$", text, flags=re.M))


def test_train_help_shows_the_values_the_run_uses_each_field_once(capsys):
    assert cli.main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    fields = re.findall(r"^  ([a-z_]+\.[a-z_0-9]+) = ", text, flags=re.M)
    assert len(fields) == len(set(fields)), "a field is listed twice"
    cfg = load_named_config(None)
    expected = {
        f"{section}.{f.name}": repr(getattr(getattr(cfg, section), f.name))
        for section in ("objective", "model", "data", "rollout", "reward", "optim", "train")
        for f in dataclasses.fields(getattr(cfg, section))
    }
    values = _help_values(text)
    for k, v in expected.items():
        assert values[k] == v, k
    assert values["train.steps"] == "60" and values["objective.name"] == "'papo_g'"
    assert values["model.name_or_path"] == "'builtin:vispo-tiny'"

    assert cli.main(["train", "optim.lr=0.001", "cppo", "--help"]) == 0
    values = _help_values(capsys.readouterr().out)
    assert values["objective.name"] == "'cppo'" and values["objective.cpl_lambda"] == "0.01"
    assert values["optim.lr"] == "0.001" and values["objective.mask_patch_size"] == "16"


def test_eval_and_probe_help_show_defaults(capsys):
    for command, expected in (
        ("eval", ["(default: 8)", "(default: 16)", "(default: easy-vqa,easy-vqa-vd)"]),
        ("probe", ["(default: 200)", "(default: 128)", "(default: 0)"]),
    ):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for e in expected:
            assert e in text, (command, e)


TERM_MODULE = """
import torch
from vispo.algos import register_term

@register_term("{name}")
def term(x, scale=1.0):
    return scale * x.logp.mean() * 0.0 + torch.tensor(0.25), {{}}
"""


def test_objective_plugins_a_module_and_a_file(tmp_path, monkeypatch):
    (tmp_path / "ux_terms_mod.py").write_text(TERM_MODULE.format(name="ux_mod_term"))
    monkeypatch.syspath_prepend(str(tmp_path))
    file_plugin = tmp_path / "elsewhere.py"
    file_plugin.write_text(TERM_MODULE.format(name="ux_file_term"))
    try:
        with pytest.raises(ConfigError, match="unknown term 'ux_mod_term'"):
            load_config(None, ["objective.extra_terms={ux_mod_term: {weight: 0.5}}"])
        cfg = load_config(
            None,
            [
                f"objective.plugins=[ux_terms_mod, {file_plugin}]",
                "objective.extra_terms={ux_mod_term: {weight: 0.5}, ux_file_term: {weight: 2}}",
            ],
        )
        assert cfg.objective.plugins == ["ux_terms_mod", str(file_plugin)]
        monkeypatch.chdir(tmp_path)  # a relative file path is saved absolute
        relative = load_config(None, ["objective.plugins=[elsewhere.py]"])
        assert relative.objective.plugins == [str(file_plugin.resolve())]
        assert set(cfg.objective.extra_terms) == {"ux_mod_term", "ux_file_term"}
        assert {"ux_mod_term", "ux_file_term"} <= set(OBJECTIVE_TERMS)
        with pytest.raises(ConfigError, match="objective.plugins: cannot import 'no_such_mod'"):
            load_config(None, ["objective.plugins=[no_such_mod]"])
    finally:
        for k in ("ux_mod_term", "ux_file_term"):
            OBJECTIVE_TERMS.pop(k, None)
        sys.modules.pop("ux_terms_mod", None)


def test_objective_terms_from_an_entry_point(tmp_path, monkeypatch):
    pkg = tmp_path / "ux_ep_pkg.py"
    pkg.write_text(
        textwrap.dedent(
            """
            import torch

            def my_term(x, scale=1.0):
                return torch.tensor(scale), {}
            """
        )
    )
    dist = tmp_path / "ux_ep_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ux-ep-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[vispo.terms]\nux_ep_term = ux_ep_pkg:my_term\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        cfg = load_config(None, ["objective.extra_terms={ux_ep_term: {weight: 1.0, scale: 3}}"])
        assert cfg.objective.extra_terms == {"ux_ep_term": {"weight": 1.0, "scale": 3}}
        x = type("X", (), {})()
        assert float(OBJECTIVE_TERMS["ux_ep_term"](x, scale=3)[0]) == 3.0
    finally:
        OBJECTIVE_TERMS.pop("ux_ep_term", None)
        sys.modules.pop("ux_ep_pkg", None)


def test_help_text_lists_objective_name_once():
    from vispo.train.config import help_text

    text = help_text()
    assert len(re.findall(r"^  objective\.name = ", text, flags=re.M)) == 1
    assert "objective.name = 'grpo'\n      Preset the objective starts from: grpo, dapo" in text


def test_a_preset_named_on_the_command_line_drops_the_configs_objective_values():
    # The embedded default is PAPO-G (gamma 0.02, mask ratio 0.6): `objective.name=grpo` must
    # give GRPO's preset, not GRPO with PAPO's gamma (which would silently be PAPO-G).
    from vispo.algos import objective_preset

    cfg = load_named_config(None, ["objective.name=grpo"])
    grpo = objective_preset("grpo", mask_patch_size=cfg.objective.mask_patch_size)
    assert cfg.objective == grpo
    assert cfg.objective.gamma == 0.0 and cfg.objective.mask_patch_size == 16
    # The same as the objective file, whatever else is overridden beside it.
    by_name = load_named_config(None, ["objective.name=cppo", "objective.cpl_lambda=0.5"])
    by_file = load_named_config("cppo", ["objective.cpl_lambda=0.5"])
    assert by_name.objective == by_file.objective and by_name.objective.cpl_lambda == 0.5
    # Overriding a field of the same preset keeps the config's other values.
    same = load_named_config(None, ["objective.name=papo_g", "objective.gamma=0.01"])
    assert same.objective.gamma == 0.01 and same.objective.mask_ratio == 0.6
