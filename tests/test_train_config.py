"""Config loading and validation: every bad value fails before any model is loaded."""

import pytest
import yaml

from vispo.train.config import ConfigError, help_text, load_config


def test_defaults_and_overrides_are_typed():
    cfg = load_config(
        None,
        [
            "objective.name=papo_g",
            "optim.lr=2e-6",
            "objective.gamma=0.01",
            "rollout.n=8",
            "train.mini_batch_size=16",
            "objective.gamma_end=none",
        ],
    )
    assert cfg.objective.name == "papo_g"
    assert cfg.objective.gamma == 0.01 and cfg.objective.clip_high == 0.3  # preset kept
    assert cfg.optim.lr == 2e-6 and isinstance(cfg.rollout.n, int) and cfg.rollout.n == 8
    assert cfg.objective.gamma_end is None
    assert cfg.sequences_per_step == 16 * 8 and cfg.mini_batch == 16 and cfg.micro_batch == 16


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"objective": {"name": "cppo"}, "train": {"steps": 7}}))
    cfg = load_config(path, ["train.steps=9"])
    assert cfg.objective.cpl_lambda == 0.01 and cfg.train.steps == 9


@pytest.mark.parametrize(
    "override,match",
    [
        ("optim.lrr=1", r"unknown config key optim.lrr \(did you mean 'lr'\?\)"),
        ("optimm.lr=1", r"unknown config section 'optimm' \(did you mean 'optim'\?\)"),
        ("objective.gama=0.1", r"did you mean 'gamma'"),
        ("objective.name=papo", r"objective.name: unknown preset 'papo'"),
        ("train.mini_batch_size=7", r"train.mini_batch_size: 7 must divide"),
        ("train.micro_batch_size=3", r"train.micro_batch_size: 3 must divide"),
        ("objective.mask_ratio=0", r"objective.mask_ratio must be in \(0, 1\]"),
        ("objective.mask_ratio=1.2", r"objective.mask_ratio"),
        ("objective.gamma=-0.1", r"objective.gamma must be >= 0"),
        ("objective.eta_orig=-1", r"objective.eta_orig must be >= 0"),
        ("rollout.n=1", r"rollout.n: group-relative advantages need n >= 2"),
        ("rollout.top_p=0", r"rollout.top_p"),
        ("optim.lr=-1", r"optim.lr: must be > 0"),
        ("rollout.n=abc", r"rollout.n: expected an integer"),
        ("rollout.n=2.5", r"rollout.n: expected an integer"),
        ("train.stack_variants=maybe", r"train.stack_variants: expected true/false"),
        ("guard.action=panic", r"guard.action"),
        ("model.dtype=int8", r"model.dtype"),
        ("steps=3", r"must name section.field"),
    ],
)
def test_bad_values_name_the_field(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_help_lists_every_field_with_help():
    text = help_text()
    for field in (
        "objective.gamma",
        "objective.masked_grad",
        "objective.cpl_tau",
        "optim.lr",
        "train.micro_batch_norm",
        "guard.action",
        "rollout.top_p",
        "model.lora",
    ):
        assert field in text
    assert "0.04 collapses" in text  # PAPO's gamma help cites the paper's finding


def test_shipped_presets_load():
    for name in (
        "grpo",
        "dapo",
        "dr_grpo",
        "papo_g",
        "papo_d",
        "cppo",
        "gspo",
        "sapo",
        "cispo",
        "noisyrollout",
        "vppo",
    ):
        cfg = load_config(f"configs/recipes/{name}.yaml")
        assert cfg.objective.name == name
