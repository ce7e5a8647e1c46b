"""Run folder lock, checkpoint checksums and rotation, LoRA checkpoints, finite config numbers.

Fast unit tests (default suite); tests/faults/test_faults_runfolder.py drives the same logic
through whole runs.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vispo.models import build_tiny_vlm
from vispo.models.adapt import apply_lora
from vispo.train import runfolder as RF
from vispo.train.checkpoint import (
    CheckpointCorrupt,
    CheckpointError,
    checkpoint_dirs,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
    verify_checkpoint,
)
from vispo.train.config import ConfigError, _numbers, load_config
from vispo.train.optim import build_optimizer


def _model_and_opt(seed: int = 0, lora: bool = False):
    model, _ = build_tiny_vlm("qwen2_vl", seed=seed)
    if lora:
        model = apply_lora(model, r=2, alpha=4)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999))
    return model, opt


def _one_step(model, opt, seed: int = 1) -> None:
    """A real AdamW step, so the optimizer holds state."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=g) * 1e-2
    opt.step()
    opt.zero_grad()


def _save(run: Path, step: int, model, opt, keep_last: int = 3) -> Path:
    return save_checkpoint(run, step, model=model, optimizer=opt, state={}, keep_last=keep_last)


def _tensor_data_offset(path: Path) -> int:
    """First byte of a safetensors file's tensor data (after the 8-byte length + JSON header)."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


# --- checksums -------------------------------------------------------------------------------


def test_state_json_records_the_sha256_of_every_file(tmp_path):
    model, opt = _model_and_opt()
    _one_step(model, opt)
    ckpt = _save(tmp_path, 1, model, opt)
    state = json.loads((ckpt / "state.json").read_text())
    on_disk = sorted(p.name for p in ckpt.iterdir() if p.name != "state.json")
    assert (
        sorted(state["files"])
        == on_disk
        == [
            "optimizer.json",
            "optimizer.safetensors",
            "rng-rank0.json",
            "rng-rank0.safetensors",
            "weights.safetensors",
        ]
    )
    for name, digest in state["files"].items():  # an independent route: hashlib over bytes
        assert digest == hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    assert state["weights"] == "full"
    assert verify_checkpoint(ckpt)["step"] == 1


@pytest.mark.parametrize("target", ["weights.safetensors", "optimizer.safetensors"])
def test_bytes_overwritten_inside_tensor_data_are_caught_before_loading(tmp_path, target):
    model, opt = _model_and_opt()
    _one_step(model, opt)
    ckpt = _save(tmp_path, 1, model, opt)
    path = ckpt / target
    raw = bytearray(path.read_bytes())
    start = _tensor_data_offset(path)
    mid = start + (len(raw) - start) // 2
    raw[mid : mid + 4] = bytes(b ^ 0x5A for b in raw[mid : mid + 4])  # still parses
    path.write_bytes(bytes(raw))
    fresh, fresh_opt = _model_and_opt(seed=7)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointCorrupt, match=f"{target} does not match its recorded sha256"):
        load_checkpoint(ckpt, model=fresh, optimizer=fresh_opt)
    after = fresh.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a corrupt load touched weights"


def test_an_edited_state_json_is_caught(tmp_path):
    model, opt = _model_and_opt()
    ckpt = _save(tmp_path, 1, model, opt)
    state = json.loads((ckpt / "state.json").read_text())
    state["step"] = 2  # parses, looks plausible
    (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointCorrupt, match="state.json does not match"):
        verify_checkpoint(ckpt)
    (ckpt / "state.json").write_text("{")
    with pytest.raises(CheckpointCorrupt, match="state.json is unreadable"):
        verify_checkpoint(ckpt)


def test_a_clean_checkpoint_round_trips_exactly(tmp_path):
    model, opt = _model_and_opt()
    _one_step(model, opt)
    ckpt = _save(tmp_path, 1, model, opt)
    fresh, fresh_opt = _model_and_opt(seed=7)
    load_checkpoint(ckpt, model=fresh, optimizer=fresh_opt)
    a, b = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- non-finite weights, rotation --------------------------------------------------------------


def test_non_finite_weights_are_never_saved(tmp_path):
    model, opt = _model_and_opt()
    first = _save(tmp_path, 1, model, opt)
    good = (first / "weights.safetensors").read_bytes()
    name, param = next(iter(model.named_parameters()))
    with torch.no_grad():
        param.view(-1)[3] = float("nan")
    with pytest.raises(CheckpointError, match=f"refused to write.*{name}.*NaN or inf.*step-000001"):
        _save(tmp_path, 2, model, opt)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-000001"]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    assert (first / "weights.safetensors").read_bytes() == good


def test_rotation_never_deletes_the_checkpoint_it_just_wrote(tmp_path):
    """A stray newer folder (another run's, an abandoned branch) must not make rotation delete
    the checkpoint that was just written and verified; older ones rotate as usual."""
    model, opt = _model_and_opt()
    _save(tmp_path, 9, model, opt)  # the stray "newer" checkpoint
    _save(tmp_path, 1, model, opt, keep_last=1)
    _save(tmp_path, 2, model, opt, keep_last=1)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-000002", "step-000009"]
    _save(tmp_path, 3, model, opt, keep_last=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == [
        "step-000002",
        "step-000003",
        "step-000009",
    ]


# --- LoRA: trainable weights only ----------------------------------------------------------


def test_lora_checkpoints_hold_only_the_trainable_weights_and_load_back(tmp_path):
    model, opt = _model_and_opt(lora=True)
    _one_step(model, opt)
    ckpt = _save(tmp_path, 1, model, opt)
    from safetensors.torch import load_file

    stored = load_file(str(ckpt / "weights.safetensors"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    total = len(model.state_dict())
    assert set(stored) == trainable and 0 < len(stored) < total
    assert all("lora_" in n for n in stored)
    assert json.loads((ckpt / "state.json").read_text())["weights"] == "trainable"
    # A fresh LoRA model of the same base (other adapter init) gets every weight back.
    fresh, fresh_opt = _model_and_opt(lora=True)
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.add_(1.0)
    load_checkpoint(ckpt, model=fresh, optimizer=fresh_opt)
    a, b = model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert fresh_opt.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    # The export/eval loader too, on a plain model.
    plain, _ = _model_and_opt(lora=True)
    load_model_weights(ckpt, plain)
    c = plain.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)
    # A full model is not an adapter checkpoint's model.
    full, full_opt = _model_and_opt()
    with pytest.raises(CheckpointError, match="adapter weights do not match"):
        load_checkpoint(ckpt, model=full, optimizer=full_opt)


# --- the lock -------------------------------------------------------------------------------

# Another process holding the lock the plain way (flock + its record), without vispo.
_HOLDER = """
import fcntl, json, os, socket, sys, time
os.makedirs(sys.argv[1], exist_ok=True)
fd = os.open(os.path.join(sys.argv[1], sys.argv[2]), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
record = {"pid": os.getpid(), "host": socket.gethostname(), "started": "then", "command": "c"}
os.write(fd, json.dumps(record).encode())
print("locked", flush=True)
time.sleep(60)
"""


def _hold_in_child(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(folder), RF.LOCK_NAME],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_is_refused_naming_the_holder_and_a_dead_one_never_blocks(tmp_path):
    run = tmp_path / "run"
    proc = _hold_in_child(run)
    try:
        with pytest.raises(
            RF.RunFolderError, match=f"in use by another training \\(pid {proc.pid} "
        ):
            RF.lock_run_folder(run)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    record = json.loads((run / RF.LOCK_NAME).read_text())
    assert record["pid"] == proc.pid  # the dead holder's record is still there...
    lock = RF.lock_run_folder(run)  # ...and does not block
    assert json.loads((run / RF.LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert (run / RF.LOCK_NAME).read_text() == ""


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    a = RF.lock_run_folder(tmp_path)
    b = RF.lock_run_folder(tmp_path)
    a.release()
    a.release()  # idempotent: b still holds it
    assert json.loads((tmp_path / RF.LOCK_NAME).read_text())["pid"] == os.getpid()
    b.release()
    assert str(tmp_path.resolve()) not in RF._HELD


def test_without_flock_a_live_holder_blocks_and_a_dead_one_does_not(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        import socket

        for pid, blocks in ((sleeper.pid, True), (dead.pid, False)):
            record = {"pid": pid, "host": socket.gethostname(), "started": "x", "command": ""}
            (tmp_path / RF.LOCK_NAME).write_text(json.dumps(record))
            if blocks:
                with pytest.raises(RF.RunFolderError, match=f"pid {sleeper.pid}.*delete"):
                    RF.lock_run_folder(tmp_path)
            else:
                RF.lock_run_folder(tmp_path).release()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_out_dir_that_is_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RF.RunFolderError, match="is a file"):
        RF.lock_run_folder(tmp_path / "f")


# --- folder contents, overwrite, resume records ---------------------------------------------


def test_refuse_reuse_and_overwrite(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (run / "samples").mkdir()
    (run / "config.json").write_text("{}")
    with pytest.raises(
        RF.RunFolderError, match=r"1 checkpoint folder, metrics.jsonl \(steps up to 2\)"
    ):
        RF.refuse_reuse(run)
    (run / RF.LOCK_NAME).write_text("")
    removed = RF.clear_run_folder(run)
    assert sorted(removed) == ["checkpoints", "config.json", "metrics.jsonl", "samples"]
    assert [p.name for p in run.iterdir()] == [RF.LOCK_NAME]
    RF.refuse_reuse(run)  # nothing left to refuse
    monkeypatch.chdir(run)
    with pytest.raises(RF.RunFolderError, match="working directory"):
        RF.clear_run_folder(run)


def test_config_changes_are_listed_field_by_field():
    old = {"optim": {"lr": 0.001}, "objective": {"name": "grpo", "extra_terms": {}}, "x": {"y": 1}}
    new = {"optim": {"lr": 0.0005}, "objective": {"name": "dapo", "extra_terms": {}}, "x": {"y": 1}}
    assert RF.config_changes(old, new) == {
        "objective.name": ["grpo", "dapo"],
        "optim.lr": [0.001, 0.0005],
    }
    assert RF.config_changes(old, old) == {}
    same = {"train": {"out_dir": "runs/a"}}
    assert RF.config_changes(same, {"train": {"out_dir": "./runs/a/"}}) == {}
    text = RF.describe_changes({"optim.lr": [0.001, 0.0005]})
    assert text == "changed: optim.lr 0.001 -> 0.0005"


# --- config numbers --------------------------------------------------------------------------


def _float_fields() -> list[str]:
    """Every field typed float (or float | None), from the dataclasses' annotations."""
    import dataclasses
    import typing

    from vispo.train.config import Config

    names = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        for name, tp in typing.get_type_hints(cls).items():
            if tp is float or float in typing.get_args(tp):
                names.append(f"{section.name}.{name}")
    return names


def test_every_float_field_must_be_finite():
    fields = _float_fields()
    assert len(fields) >= 25
    assert {"optim.lr", "reward.timeout_s", "objective.gamma_end", "guard.z_threshold"} <= set(
        fields
    )
    for name in fields:
        for value in (".inf", "-.inf", ".nan"):
            section, short = name.split(".")
            # (objective.ds_low/ds_high share one message naming both)
            with pytest.raises(ConfigError, match=rf"^{section}\.\S*{short}\b"):
                load_config(None, [f"{name}={value}"])
    assert {n for n, _ in _numbers(load_config(None, []))} <= set(fields)


@pytest.mark.parametrize(
    "override, match",
    [
        ("optim.lr=2", "optim.lr: must be <= 1"),
        ("reward.timeout_s=1e9", "reward.timeout_s: must be <= 86400"),
        ("rollout.temperature=1e6", "rollout.temperature: must be <= 100"),
        ("optim.weight_decay=5", "optim.weight_decay"),
        ("optim.vision_lr_scale=1e9", "optim.vision_lr_scale"),
        ("reward.overlong_penalty=-1", "reward.overlong_penalty"),
        ("guard.z_threshold=0", "guard.z_threshold"),
    ],
)
def test_absurd_numbers_name_their_field(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


# --- the CLI's --resume / --overwrite ----------------------------------------------------------


def test_train_cli_resume_takes_a_checkpoint_or_leaves_config_and_overrides_alone(
    tmp_path, monkeypatch
):
    import vispo.train.run as run_module
    from vispo import cli

    calls = []
    monkeypatch.setattr(run_module, "run_training", lambda cfg, **kw: calls.append((cfg, kw)) or 0)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("optim:\n  lr: 0.002\n")
    ckpt = tmp_path / "run" / "checkpoints" / "step-000004"
    ckpt.mkdir(parents=True)
    cases = [
        (["--resume"], True, 1e-4),  # the embedded default's lr
        (["--resume", str(cfg_file), "rollout.n=3"], True, 0.002),
        (["--resume", "rollout.n=3", "optim.lr=0.003"], True, 0.003),
        ([str(cfg_file), "--resume", "4"], "4", 0.002),
        (["--resume", str(ckpt), str(cfg_file)], str(ckpt), 0.002),
        (["--overwrite", "optim.lr=0.004"], False, 0.004),
        (
            ["--resume", str(tmp_path / "gone" / "step-000007")],
            str(tmp_path / "gone" / "step-000007"),
            1e-4,
        ),
    ]
    for argv, resume, lr in cases:
        assert cli.main(["train", *argv]) == 0
        cfg, kw = calls[-1]
        assert kw["resume"] == resume, argv
        assert cfg.optim.lr == lr, argv
        assert kw["overwrite"] == ("--overwrite" in argv)
    assert calls[2][0].rollout.n == 3


def test_lock_file_holds_who_and_when(tmp_path):
    import socket

    lock = RF.lock_run_folder(tmp_path)
    try:
        record = json.loads((tmp_path / RF.LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert time.strptime(record["started"], "%Y-%m-%d %H:%M:%S UTC")
    finally:
        lock.release()
