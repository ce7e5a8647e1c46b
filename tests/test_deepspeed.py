"""DeepSpeed ZeRO-2/3 on two CPU ranks (gloo) give the one-process update on the same global batch.

The launched runs are tests/ds_worker.py: PAPO-G on a tiny Qwen2-VL, 4 prompts x 3 rollouts per
step, batch-invariant rollouts, as in tests/test_distributed.py. ZeRO-3 runs with
``stage3_param_persistence_threshold: 0`` so that every parameter is partitioned (DeepSpeed
would otherwise keep a model this small whole on every rank). The configuration tests need
neither DeepSpeed nor a launch: they check what vispo makes of the shipped accelerate files.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_distributed import (  # the metrics every distributed run must reproduce
    COMPARED,
    free_port,
)

from vispo.train.config import ConfigError
from vispo.train.deepspeed import DeepSpeedConfigError, deepspeed_config
from vispo.train.dist import resolve_strategy

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("ds_worker.py")
ACCELERATE = ROOT / "vispo" / "configs" / "accelerate"
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed (pip install 'vispo[deepspeed]'; make test installs it)",
)


# --- the shipped accelerate files -> vispo's strategy and DeepSpeed config -----------------


def _launch_env(name: str) -> dict[str, str]:
    """The environment ``accelerate launch --config_file <name>.yaml --num_processes 2`` gives
    its processes, built by accelerate's own launcher code (nothing is started)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    argv = ["--config_file", str(ACCELERATE / f"{name}.yaml"), "--num_processes", "2"]
    args = launch_command_parser().parse_args([*argv, "--main_process_port", "0", "x.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]
    assert args.multi_gpu or args.use_fsdp, name  # both start torchrun with 2 processes
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize("name", ["ddp", "fsdp2", "zero2", "zero3"])
def test_accelerate_config_files_select_their_strategy(name):
    env = _launch_env(name)
    assert resolve_strategy("auto", env) == name
    assert resolve_strategy(name, env) == name
    other = "fsdp2" if name == "ddp" else "ddp"
    if name != "ddp":  # a DDP launch sets nothing that an explicit strategy could contradict
        with pytest.raises(ConfigError, match=f"train.strategy={other} but accelerate"):
            resolve_strategy(other, env)
    if name.startswith("zero"):
        assert deepspeed_config(int(name[-1]), micro_batch=6, grad_clip=0.5, env=env) == {
            "train_micro_batch_size_per_gpu": 6,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.5,
            "zero_optimization": {"stage": int(name[-1])},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
        }


def test_resolve_strategy_without_accelerate_and_fsdp1():
    assert resolve_strategy("auto", {}) == "ddp"
    assert resolve_strategy("zero3", {}) == "zero3"
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        resolve_strategy("auto", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})
    with pytest.raises(ConfigError, match="got 'zero1'"):
        resolve_strategy("zero1", {})
    with pytest.raises(ConfigError, match="zero_stage must be 2 or 3"):
        resolve_strategy(
            "auto", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}
        )


def test_deepspeed_config_file_is_merged_and_vispo_keeps_its_settings(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps(
            {
                "train_batch_size": "auto",
                "gradient_clipping": "auto",
                "bf16": {"enabled": "auto"},
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                "wall_clock_breakdown": False,
            }
        )
    )
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)}
    assert resolve_strategy("auto", env) == "zero3"  # the stage comes from the file
    assert deepspeed_config(3, micro_batch=2, grad_clip=1.0, env=env) == {
        "wall_clock_breakdown": False,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }


@pytest.mark.parametrize(
    ("file", "env", "match"),
    [
        ({"optimizer": {"type": "Adam"}}, {}, "remove 'optimizer'"),
        ({"bf16": {"enabled": True}}, {}, "bf16.enabled"),
        ({"gradient_accumulation_steps": 4}, {}, "gradient_accumulation_steps"),
        ({"gradient_clipping": 2.0}, {}, "gradient_clipping=2.0 differs"),
        ({"zero_optimization": {"stage": 2}}, {}, "stage=2 but train.strategy is zero3"),
        ({"zero_optimization": {"reduce_bucket_size": "auto"}}, {}, "reduce_bucket_size"),
        (
            {"zero_optimization": {"offload_param": {"device": "cpu"}}},
            {},
            "offload_param.device=cpu",
        ),
        (None, {"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, "offload_optimizer"),
        (None, {"ACCELERATE_MIXED_PRECISION": "bf16"}, "mixed_precision=bf16"),
        (None, {"ACCELERATE_DEEPSPEED_ZERO3_INIT": "true"}, "zero3_init_flag"),
        (None, {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2"}, "gradient_accumulation_steps=2"),
        (None, {"ACCELERATE_GRADIENT_CLIPPING": "5.0"}, "gradient_clipping=5.0"),
    ],
)
def test_deepspeed_settings_vispo_cannot_honour_are_refused(tmp_path, file, env, match):
    env = {"ACCELERATE_USE_DEEPSPEED": "true", **env}
    if file is not None:
        (tmp_path / "ds.json").write_text(json.dumps(file))
        env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(tmp_path / "ds.json")
    with pytest.raises(DeepSpeedConfigError, match=match):
        deepspeed_config(3, micro_batch=2, grad_clip=1.0, env=env)


# --- two ranks against one process ---------------------------------------------------------


def _run(out: Path, *args: str, launcher: list[str] | None = None, env=None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [*(launcher or []), str(WORKER), str(out), *args]
    if launcher is None:
        cmd = [sys.executable, *cmd]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _torchrun() -> list[str]:
    return [
        *[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"],
        *["--master_port", str(free_port())],
    ]


def _accelerate(name: str, ds_json: Path) -> list[str]:
    return [
        *[sys.executable, "-m", "accelerate.commands.launch"],
        *["--config_file", str(ACCELERATE / f"{name}.yaml"), "--num_processes", "2"],
        *["--main_process_port", str(free_port()), "--deepspeed_config_file", str(ds_json)],
    ]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    _run(out, "--strategy", "ddp")  # one process: no wrapper at all
    return json.loads((out / "history.json").read_text()), load_file(str(out / "final.safetensors"))


def _assert_same_history(history, ref_history):
    """Same steps, same losses / gradient norms / rewards (float tolerance)."""
    assert [m["step"] for m in history] == [m["step"] for m in ref_history]
    for got, want in zip(history, ref_history):
        for key in COMPARED:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key


def _assert_same_weights(weights, ref_weights):
    assert set(weights) == set(ref_weights)
    for name, w in weights.items():
        # 5% of one AdamW step at lr 1e-3: Adam turns float noise in a near-zero gradient
        # into a visible weight difference (1.0e-5 on 2 of 8192 weights of one layer here).
        assert (w - ref_weights[name]).abs().max().item() < 5e-5, name


@needs_deepspeed
def test_zero2_two_ranks_equal_one_process_and_skip_a_bad_update_together(tmp_path, single):
    # Steps 1-2 as in the one-process run; in step 3 rank 0 alone finds a non-finite input
    # (its loss and gradients stay finite): no rank may update; step 4 updates again.
    args = ["--strategy", "zero2", "--steps", "4", "--distrust-step", "3"]
    _run(tmp_path, *args, launcher=_torchrun())
    # train.shared_prefix=auto: the shared-prefix forward runs under ZeRO too.
    assert json.loads((tmp_path / "info.json").read_text()) == {
        "strategy": "zero2",
        "engine": True,
        "shared_prefix": True,
    }
    history = json.loads((tmp_path / "history.json").read_text())
    _assert_same_history(history[:2], single[0])
    assert [m["skipped_steps"] for m in history] == [0.0, 0.0, 1.0, 1.0]
    assert history[2]["grad_norm"] != history[2]["grad_norm"]  # NaN: no update was applied
    assert history[3]["grad_norm"] > 0
    checkpoints = tmp_path / "run" / "checkpoints"
    after_skip = load_file(str(checkpoints / "step-000003" / "weights.safetensors"))
    _assert_same_weights(after_skip, single[1])  # = the weights after step 2
    final = load_file(str(tmp_path / "final.safetensors"))
    assert max((final[k] - after_skip[k]).abs().max().item() for k in final) > 1e-5


@needs_deepspeed
def test_zero3_accelerate_launch_trains_resumes_and_equals_one_process(tmp_path, single):
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    launcher = _accelerate("zero3", ds_json)
    _run(tmp_path, "--interrupt-after", "1", launcher=launcher)  # train.strategy=auto
    ckpt = tmp_path / "run" / "checkpoints" / "step-000001"
    assert {p.name for p in ckpt.glob("rng-rank*.json")} == {"rng-rank0.json", "rng-rank1.json"}
    assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2
    _run(tmp_path, "--resume", launcher=launcher)
    # train.shared_prefix=auto: the shared-prefix forward runs under ZeRO too.
    assert json.loads((tmp_path / "info.json").read_text()) == {
        "strategy": "zero3",
        "engine": True,
        "shared_prefix": True,
    }
    history = json.loads((tmp_path / "history.json").read_text())
    assert [m["step"] for m in history] == [2]
    _assert_same_history(history, single[0][1:])
    _assert_same_weights(load_file(str(tmp_path / "final.safetensors")), single[1])
    # Every parameter is partitioned outside `gathered`, whole inside it (also after forwards
    # that rank 0 ran alone, which needed no other rank), partitioned again after; the
    # gathered forwards equal the per-layer-gathered one.
    report = json.loads((tmp_path / "zero3.json").read_text())
    n = report["params"]
    assert n == len(single[1])  # the tiny model's state dict holds parameters only
    assert report["empty_outside"] == report["full_inside"] == n
    assert report["full_after_forwards"] == report["empty_after_exit"] == n
    assert report["max_diff_inside_twice"] == 0.0
    assert report["max_diff_inside_outside"] < 1e-6
