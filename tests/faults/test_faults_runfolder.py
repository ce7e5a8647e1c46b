"""A run folder belongs to one run, and a checkpoint is good or is not used.

Each test drives ``vispo train`` (``vispo.cli.main``, in this process unless a second process
is the point) on the tiny random Qwen2-VL and checks the folder afterwards:

- a rerun into a used folder without ``--resume`` is refused and changes no byte; with
  ``--overwrite`` the new run is exactly a fresh run;
- a second training on a folder in use is refused naming the holder (a real second process);
  the lock of a ``kill -9``-ed process does not block;
- ``--resume`` with no usable checkpoint leaves the folder byte for byte as it was, unless the
  run never got as far as its first checkpoint (then it starts over, keeping the old
  metrics.jsonl byte for byte under another name);
- bytes overwritten inside a checkpoint's tensor data (the file still parses), or an edited
  ``state.json``: ``--resume`` says which checkpoint failed and why, resumes from the newest
  good one, and ends with exactly the metrics of an uninterrupted run;
- ``--resume N`` / ``--resume PATH``, resumes with changed settings (``resumes.jsonl``),
  checkpoints of LoRA runs, non-finite weights at save time, non-finite config numbers.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import time
import typing
from pathlib import Path

import pytest
import torch
from faultkit import TINY, file_digests, max_metric_diff, start_training

from vispo.cli import main
from vispo.train.checkpoint import CheckpointError, checkpoint_dirs, verify_checkpoint
from vispo.train.config import Config, ConfigError, load_config
from vispo.train.logging import read_metrics
from vispo.train.runfolder import LOCK_NAME, read_resumes

pytestmark = pytest.mark.faults

STEPS = 4


def _args(out: Path, *extra: str) -> list[str]:
    return [
        *TINY,
        f"train.steps={STEPS}",
        "train.save_every=1",
        "train.keep_last=4",
        f"train.out_dir={out}",
        *extra,
    ]


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # rich would wrap long paths in the text we search


def _train(capsys, *args: str) -> tuple[int, str]:
    """``vispo train ARGS`` in this process: (exit code, its output on one line)."""
    capsys.readouterr()
    code = main(["train", *args])
    out = capsys.readouterr()
    return code, " ".join((out.out + out.err).split())


def _digests(run: Path) -> dict[str, str]:
    """sha256 of every file of a run folder but the lock (which records who holds it)."""
    return {k: v for k, v in file_digests(run).items() if k != LOCK_NAME}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """An uninterrupted run of STEPS steps with a checkpoint after every step."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", *_args(out)]) == 0
    assert [r["step"] for r in read_metrics(out)] == list(range(1, STEPS + 1))
    assert [p.name for p in checkpoint_dirs(out)] == [f"step-{s:06d}" for s in range(1, 5)]
    return out


def _copy(base: Path, dst: Path) -> Path:
    shutil.copytree(base, dst, ignore=shutil.ignore_patterns(LOCK_NAME))
    return dst


def _tensor_data_offset(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _overwrite_tensor_bytes(path: Path, n: int = 64) -> None:
    """Overwrite ``n`` bytes in the middle of a safetensors file's tensor data: the header is
    intact, the file still parses, only the numbers change."""
    raw = bytearray(path.read_bytes())
    start = _tensor_data_offset(path)
    mid = start + (len(raw) - start) // 2
    raw[mid : mid + n] = bytes((b + 77) % 256 for b in raw[mid : mid + n])
    path.write_bytes(bytes(raw))


# --- class 1: a run folder belongs to one run ---------------------------------------------------


def test_rerun_into_a_used_folder_is_refused_and_overwrite_starts_clean(
    base, tmp_path, capsys, fault_table
):
    run = _copy(base, tmp_path / "run")
    before = _digests(run)
    tried, held, detail = 0, 0, []
    for extra in ([], ["train.steps=2", "train.seed=1"]):  # the same run again; another run
        code, text = _train(capsys, *_args(run, *extra))
        tried += 1
        ok = (
            code == 2
            and "error: train.out_dir" in text
            and "already holds a run (4 checkpoint folders, metrics.jsonl (steps up to 4))" in text
            and "--resume" in text
            and "--overwrite" in text
            and "Traceback" not in text
            and _digests(run) == before
        )
        held += ok
        detail.append(f"exit {code}")
    # --overwrite: the old run is gone, the new one is exactly a fresh 2-step run.
    code, text = _train(capsys, *_args(run, "train.steps=2"), "--overwrite")
    fresh = tmp_path / "fresh"
    assert main(["train", *_args(fresh, "train.steps=2")]) == 0
    tried += 1
    clean = (
        code == 0
        and [p.name for p in checkpoint_dirs(run)] == ["step-000001", "step-000002"]
        and max_metric_diff(read_metrics(fresh), read_metrics(run)) == 0.0
        and not (run / "resumes.jsonl").exists()
        and "--overwrite: deleted the old run" in text
    )
    held += clean
    fault_table(
        "run folder",
        "rerun into a used folder (no --resume); then --overwrite",
        tried,
        held,
        lost="0 bytes changed by the refused reruns",
        detail=f"refused: {', '.join(detail)}; overwrite gives a fresh run: {clean}",
    )
    assert held == tried, text


def test_a_second_training_on_a_folder_in_use_is_refused_and_a_dead_lock_does_not_block(
    tmp_path, capsys, fault_table
):
    run = tmp_path / "run"
    args = _args(run, "train.steps=3")
    proc = start_training(args, tmp_path / "marks", tmp_path / "first.log", hold="update", at=1)
    deadline = time.monotonic() + 180
    while "HOLD" not in (tmp_path / "marks").read_text():
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the first training never reached its update"
        time.sleep(0.05)
    results = []
    try:
        for extra in ([], ["--resume"]):
            code, text = _train(capsys, *args, *extra)
            results.append(
                code == 2
                and f"is in use by another training (pid {proc.pid} on host" in text
                and "Traceback" not in text
            )
        # What the second training would have clobbered: nothing was written.
        untouched = not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    record = json.loads((run / LOCK_NAME).read_text())
    stale = record["pid"] == proc.pid  # the dead process's record is still in the lock file
    code, text = _train(capsys, *args, "--resume")
    after_kill = code == 0 and [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    fault_table(
        "run folder",
        "second training while one runs; then kill -9 and --resume",
        3,
        sum(results) + after_kill,
        lost="0: nothing written by the refused one",
        detail=f"refused {sum(results)}/2 naming pid; stale lock left by kill -9 did not block: "
        f"{after_kill}",
    )
    assert all(results) and untouched, text
    assert stale and after_kill, text


def test_resume_without_a_usable_checkpoint_leaves_the_folder_as_it_was(
    base, tmp_path, capsys, fault_table
):
    def no_checkpoints(run: Path) -> None:
        shutil.rmtree(run / "checkpoints")

    def incomplete(run: Path) -> None:  # e.g. a rotation or a disk that lost the last files
        for ckpt in checkpoint_dirs(run):
            (ckpt / "state.json").unlink()

    def all_corrupt(run: Path) -> None:
        for ckpt in checkpoint_dirs(run):
            _overwrite_tensor_bytes(ckpt / "weights.safetensors")

    rows = []
    for name, damage in (
        ("no checkpoints", no_checkpoints),
        ("only incomplete", incomplete),
        ("all corrupt", all_corrupt),
    ):
        run = _copy(base, tmp_path / name.replace(" ", "-"))
        damage(run)
        metrics = (run / "metrics.jsonl").read_bytes()
        before = _digests(run)
        code, text = _train(capsys, *_args(run), "--resume")
        rows.append(
            (
                name,
                code == 2
                and "nothing was changed" in text
                and "metrics.jsonl records steps up to 4" in text
                and (run / "metrics.jsonl").read_bytes() == metrics
                and _digests(run) == before,
                text,
            )
        )
    # A run killed before its first checkpoint was due (save_every=3), or while writing it
    # (save_every=2: step 2 is logged before its checkpoint is written): --resume starts over,
    # and the old metrics.jsonl is kept byte for byte under another name.
    reference = tmp_path / "reference"
    assert main(["train", *_args(reference, "train.steps=6")]) == 0
    for every in (3, 2):
        run = _copy(base, tmp_path / f"early-{every}")
        shutil.rmtree(run / "checkpoints")
        lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
        (run / "metrics.jsonl").write_text("".join(lines[:2]))  # it got to step 2 of 6
        old = (run / "metrics.jsonl").read_bytes()
        longer = ["train.steps=6", f"train.save_every={every}"]
        code, text = _train(capsys, *_args(run, *longer), "--resume")
        kept = run / "metrics.before-restart-1.jsonl"
        rows.append(
            (
                f"stopped at step 2, first checkpoint due at {every}",
                code == 0
                and "no checkpoint in" in text
                and kept.is_file()
                and kept.read_bytes() == old
                and max_metric_diff(read_metrics(reference), read_metrics(run)) == 0.0,
                text,
            )
        )
    fault_table(
        "run folder",
        "--resume with no usable checkpoint",
        len(rows),
        sum(ok for _, ok, _ in rows),
        lost="0: metrics.jsonl byte-identical (or kept aside byte-identical)",
        detail="; ".join(f"{n}: {'held' if ok else 'FAILED'}" for n, ok, _ in rows),
    )
    for name, ok, text in rows:
        assert ok, (name, text)


def test_resume_records_changed_settings(base, tmp_path, capsys, fault_table):
    run = _copy(base, tmp_path / "run")
    changed = ["train.steps=5", "optim.lr=0.0005", "rollout.temperature=0.9"]
    code, text = _train(capsys, *_args(run, *changed), "--resume")
    code2, text2 = _train(capsys, *_args(run, *changed), "--resume")
    resumes = read_resumes(run)
    expected = {
        "optim.lr": [0.001, 0.0005],
        "rollout.temperature": [1.0, 0.9],
        "train.steps": [4, 5],
        "train.out_dir": [str(base), str(run)],  # the copy is a moved run folder
    }
    recorded = (
        code == 0
        and code2 == 0
        and len(resumes) == 2
        and resumes[0]["changed"] == expected
        and resumes[0]["from"].endswith("step-000004")
        and resumes[0]["step"] == 4
        and resumes[1]["changed"] == {}
        and resumes[1]["step"] == 5
        and "optim.lr 0.001 -> 0.0005" in text
        and "no config field changed" in text2
    )
    # Data that changed under the run cannot be resumed: one line, nothing recorded.
    other = _copy(base, tmp_path / "other")
    code3, text3 = _train(capsys, *_args(other, "data.limit=20"), "--resume")
    refused = (
        code3 == 2
        and "error: --resume from" in text3
        and "saved n_items=24 differs" in text3
        and "Traceback" not in text3
        and read_resumes(other) == []
    )
    fault_table(
        "run folder",
        "--resume with changed settings",
        3,
        2 * recorded + refused,
        lost="-",
        detail="changed fields recorded in resumes.jsonl and printed; changed data refused",
    )
    assert recorded, (resumes, text)
    assert refused, text3


def test_resume_from_a_named_checkpoint(base, tmp_path, capsys, fault_table):
    run = _copy(base, tmp_path / "run")
    old_metrics = (run / "metrics.jsonl").read_bytes()
    code, text = _train(capsys, *_args(run), "--resume", "2")
    same_run = (
        code == 0
        and "resumed from" in text
        and "step-000002 (step 2)" in text
        and sorted(p.name for p in (run / "checkpoints").iterdir())
        == [
            "step-000001",
            "step-000002",
            "step-000003",
            "step-000003.abandoned",
            "step-000004",
            "step-000004.abandoned",
        ]
        and (run / "metrics.before-resume-1.jsonl").read_bytes() == old_metrics
        and max_metric_diff(read_metrics(base), read_metrics(run)) == 0.0
    )
    # Another run's checkpoint, into a new folder: a branch that starts at its step.
    branch = tmp_path / "branch"
    source = base / "checkpoints" / "step-000003"
    code2, text2 = _train(capsys, *_args(branch), "--resume", str(source))
    other_run = (
        code2 == 0
        and [r["step"] for r in read_metrics(branch)] == [4]
        and max_metric_diff(read_metrics(base)[3:], read_metrics(branch)) == 0.0
        and read_resumes(branch)[0]["from"] == str(source)
    )
    fault_table(
        "run folder",
        "--resume N / --resume PATH (named checkpoint)",
        2,
        int(same_run) + int(other_run),
        lost="0: newer checkpoints set aside, old metrics kept",
        detail="metrics equal to the uninterrupted run's",
    )
    assert same_run, text
    assert other_run, text2


# --- class 2: a checkpoint is good or is not used ------------------------------------------------


def test_corrupted_checkpoint_resumes_from_the_newest_good_one(base, tmp_path, capsys, fault_table):
    def state_edit(ckpt: Path) -> None:
        state = json.loads((ckpt / "state.json").read_text())
        state["sampler"] = dict(state["sampler"], epoch=state["sampler"].get("epoch", 0) + 1)
        (ckpt / "state.json").write_text(json.dumps(state))

    cases = {
        "weights tensor bytes": (["step-000004"], "weights.safetensors"),
        "optimizer tensor bytes": (["step-000004"], "optimizer.safetensors"),
        "rng tensor bytes": (["step-000004"], "rng-rank0.safetensors"),
        "state.json value edited": (["step-000004"], "state.json"),
        "two newest: weights + optimizer": (["step-000004", "step-000003"], None),
    }
    rows = []
    for name, (victims, target) in cases.items():
        run = _copy(base, tmp_path / name.replace(" ", "-").replace(":", ""))
        for i, victim in enumerate(victims):
            ckpt = run / "checkpoints" / victim
            what = target or ("weights.safetensors", "optimizer.safetensors")[i]
            if what == "state.json":
                state_edit(ckpt)
            else:
                _overwrite_tensor_bytes(ckpt / what)
        good = 4 - len(victims)
        code, text = _train(capsys, *_args(run), "--resume")
        set_aside = sorted(p.name for p in (run / "checkpoints").glob("*.corrupt"))
        ok = (
            code == 0
            and all(
                f"resume: skipping checkpoint {run}/checkpoints/{v} is corrupt" in text
                for v in victims
            )
            and f"step-{good:06d} (step {good})" in text
            and set_aside == sorted(f"{v}.corrupt" for v in victims)
            and max_metric_diff(read_metrics(base), read_metrics(run)) == 0.0
            and all(verify_checkpoint(p)["step"] == int(p.name[5:]) for p in checkpoint_dirs(run))
        )
        rows.append((name, ok, text))
    fault_table(
        "checkpoint",
        "bytes overwritten inside a checkpoint (still parses), then --resume",
        len(rows),
        sum(ok for _, ok, _ in rows),
        lost="steps after the newest good checkpoint, redone; metrics = uninterrupted run",
        detail="sha256 per file in state.json; bad ones set aside as .corrupt",
    )
    for name, ok, text in rows:
        assert ok, (name, text)


def test_non_finite_weights_are_never_saved(base, tmp_path, capsys, fault_table):
    from vispo.rewards import RewardRunner
    from vispo.train.trainer import Trainer

    run = _copy(base, tmp_path / "run")
    cfg = load_config(None, _args(run, "train.steps=5"))
    trainer = Trainer(cfg, resume=True, reward_fn=RewardRunner("math", num_workers=0))
    before = _digests(run)
    tried = held = 0
    for value in (float("nan"), float("inf")):
        name, param = next(iter(trainer.model.named_parameters()))
        keep = param.detach().clone()
        with torch.no_grad():
            param.view(-1)[0] = value
        trainer.step_count = 5
        tried += 1
        try:
            trainer.save()
            refused = False
        except CheckpointError as e:
            refused = "refused to write" in str(e) and name in str(e)
        held += refused and _digests(run) == before
        with torch.no_grad():
            param.copy_(keep)
    trainer.release_run_folder()
    fault_table(
        "checkpoint",
        "NaN / inf weights at save time",
        tried,
        held,
        lost="0: nothing written, every checkpoint on disk unchanged",
    )
    assert held == tried


def test_lora_checkpoints_hold_the_adapters_and_resume_exactly(tmp_path, capsys, fault_table):
    from safetensors import safe_open

    lora = ["model.lora=true", "model.lora_r=2", "model.lora_alpha=4", "train.steps=3"]
    full_run, run = tmp_path / "full", tmp_path / "lora"
    assert main(["train", *_args(full_run, "train.steps=1")]) == 0
    assert main(["train", *_args(run, *lora)]) == 0
    reference = read_metrics(run)
    with safe_open(str(run / "checkpoints" / "step-000003" / "weights.safetensors"), "pt") as f:
        names = list(f.keys())
    small = (run / "checkpoints" / "step-000003" / "weights.safetensors").stat().st_size
    big = (full_run / "checkpoints" / "step-000001" / "weights.safetensors").stat().st_size
    code, text = _train(capsys, *_args(run, *lora), "--resume", "1")
    ok = (
        bool(names)
        and all("lora_" in n for n in names)
        and small < big / 5
        and code == 0
        and max_metric_diff(reference, read_metrics(run)) == 0.0
    )
    fault_table(
        "checkpoint",
        "LoRA run: adapter-only checkpoints, resumed",
        1,
        int(ok),
        lost="-",
        detail=f"{len(names)} adapter tensors, {small / 1e3:.0f} kB vs {big / 1e3:.0f} kB full; "
        "resumed metrics = uninterrupted",
    )
    assert ok, text


def test_non_finite_config_numbers_are_refused_naming_the_field(tmp_path, fault_table):
    fields = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        for name, tp in typing.get_type_hints(cls).items():
            if tp is float or float in typing.get_args(tp):
                fields.append((section.name, name))
    tried = held = 0
    bad = []
    for section, name in fields:
        for value in (".inf", "-.inf", ".nan", "1e400"):
            for route in ("override", "yaml"):
                tried += 1
                try:
                    if route == "override":
                        load_config(None, [f"{section}.{name}={value}"])
                    else:
                        path = tmp_path / "c.yaml"
                        path.write_text(f"{section}:\n  {name}: {value}\n")
                        load_config(path)
                except ConfigError as e:
                    # the message starts with the field (objective.ds_low/ds_high: both)
                    if str(e).startswith(f"{section}.") and name in str(e).split(" ")[0]:
                        held += 1
                        continue
                bad.append(f"{section}.{name}={value} ({route})")
    fault_table(
        "config",
        "every float field set to inf / -inf / NaN / 1e400",
        tried,
        held,
        lost="-",
        detail=f"{len(fields)} float fields, override and YAML; ConfigError naming the field",
    )
    assert not bad, bad[:10]
