"""One run in its own process: train (unless done), evaluate, write the run's record.

Evaluation of a trained run (and of the start model): greedy answers to the first
``test_limit`` easy-vqa test questions with the real image, a uniform gray image and another
sample's image (``EvalSettings.image_mode``), and to ``easy-vqa-cf``. Tuning runs touch no test
question: their score is the trainer's validation accuracy at the last step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from .plan import IMAGE_MODES, ReproError, RunSpec, Settings, eval_options, run_tree
from .records import SCHEMA, code_version, pack_bits, write_json

TEST_BENCH = "easy-vqa"
CF_BENCH = "easy-vqa-cf"


def phase(run_dir: Path, text: str) -> None:
    """What the run is doing now (read by the scheduler's progress display)."""
    (run_dir / "phase.txt").write_text(text)


def _add_time(run_dir: Path, key: str, seconds: float) -> None:
    path = run_dir / "timing.json"
    timing = json.loads(path.read_text()) if path.exists() else {}
    timing[key] = timing.get(key, 0.0) + seconds
    write_json(path, timing)


def worker(run_dir: Path) -> int:
    """Run the job described by ``run_dir/job.json`` and write its record."""
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    job = json.loads((run_dir / "job.json").read_text())
    spec, settings = RunSpec(**job["run"]), Settings(**job["settings"])
    opts = eval_options()
    status, tree, train = "ok", None, {}
    if spec.kind != "before":
        tree = run_tree(spec, settings, run_dir, **job["resolved"])
        status = _train(spec, settings, run_dir, tree)
        from vispo.train.logging import read_metrics

        train = train_summary(read_metrics(run_dir), _guard_events(run_dir))
    final, questions = {}, {}
    if spec.kind != "tune":
        from vispo.eval import load_model_spec

        loaded = load_model_spec(str(run_dir) if spec.kind != "before" else opts["model"])
        final, questions = _evaluate(loaded, settings, run_dir, opts)
    if train.get("curve", {}).get("value"):
        final["val"] = train["curve"]["value"][-1]
    _add_time(run_dir, "worker_s", time.perf_counter() - start)
    if tree is not None:
        tree["train"]["out_dir"] = f"runs/reproduce/{spec.name}"  # no machine-specific path
    record = {
        "schema": SCHEMA,
        "name": spec.name,
        "spec": spec.to_json(),
        "settings": settings.to_json(),
        "resolved": job["resolved"],
        "status": status,
        "code": code_version(),
        "config": tree,
        "final": final,
        "train": train,
        "questions": questions,
        "timing": json.loads((run_dir / "timing.json").read_text()),
    }
    write_json(Path(job["record"]), record)
    phase(run_dir, "done")
    return 0


def _train(spec: RunSpec, settings: Settings, run_dir: Path, tree: dict) -> str:
    from vispo.train.checkpoint import latest_checkpoint
    from vispo.train.config import build_config
    from vispo.train.run import run_training

    stopped = run_dir / "stopped.txt"
    if stopped.exists():
        return "stopped"
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and int(ckpt.name.split("-", 1)[1]) >= settings.steps:
        return "ok"
    phase(run_dir, "train")
    shutil.rmtree(run_dir / "eval", ignore_errors=True)  # results of an earlier model
    start = time.perf_counter()
    code = run_training(build_config(tree), resume=True)
    _add_time(run_dir, "train_s", time.perf_counter() - start)
    if code == 3:  # TrainingStopped: a checkpoint was written first
        stopped.write_text("training stopped (see log.txt)\n")
        return "stopped"
    if code != 0:
        raise ReproError(f"{spec.name}: training failed (exit code {code}); see {run_dir}/log.txt")
    return "ok"


def _guard_events(run_dir: Path) -> list[dict] | None:
    from vispo.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    path = None if ckpt is None else ckpt / "state.json"
    if path is None or not path.exists():
        return None
    events = json.loads(path.read_text()).get("guard", {}).get("events")
    if events is None:
        return None
    return [{"step": int(e["step"]), "signals": e.get("signals", {})} for e in events]


def eval_settings(settings: Settings, opts: Mapping, limit: int | None, image_mode: str):
    """vispo's ``EvalSettings`` for one greedy pass in one image mode."""
    from vispo.eval import EvalSettings

    if "image_mode" not in {f.name for f in dataclasses.fields(EvalSettings)}:
        raise ReproError("this vispo has no EvalSettings.image_mode (issue 20's gray/other images)")
    return EvalSettings(
        k=0,
        greedy=True,
        batch_size=settings.eval_batch,
        max_new_tokens=opts["max_new_tokens"],
        template=opts["template"],
        reward=opts["reward"],
        limit=limit,
        image_mode=image_mode,
        keep_responses=False,
    )


def _evaluate(loaded, settings: Settings, run_dir: Path, opts: Mapping) -> tuple[dict, dict]:
    from vispo.eval import evaluate_model, get_benchmark
    from vispo.eval.runner import RESULTS_FILE, read_results

    final, questions = {}, {}
    jobs = [(TEST_BENCH, settings.test_limit, mode, f"test/{mode}") for mode in IMAGE_MODES]
    jobs.append((CF_BENCH, settings.cf_limit, "real", "cf"))
    for bench_name, limit, mode, key in jobs:
        phase(run_dir, f"eval {key}")
        bench = get_benchmark(bench_name)
        folder = run_dir / "eval" / key.replace("/", "-")
        es = eval_settings(settings, opts, limit, mode)
        start = time.perf_counter()
        summary = evaluate_model(loaded, [bench], folder, es, progress=False, log=print)
        _add_time(run_dir, "eval_s", time.perf_counter() - start)
        samples = bench.load(None, limit)
        ids = [s.id for s in samples]
        correct = per_question_correct(read_results(folder / RESULTS_FILE), bench.name, ids)
        values = [correct[i] for i in ids]
        acc = sum(values) / len(values)
        reported = summary["modes"]["greedy"]["summary"]["overall"]["micro"]
        if not math.isclose(acc, reported, abs_tol=1e-9):
            raise ReproError(f"{key}: per-question accuracy {acc} != vispo eval's {reported}")
        final[key] = acc
        questions[key] = {
            "n": len(ids),
            "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16],
            "bits": pack_bits(values),
        }
        if key == "test/real":
            vd = [bool(s.meta.get("vision_dependent")) for s in samples]
            questions["test/vision_dependent"] = {"n": len(vd), "bits": pack_bits(vd)}
            final.update(split_accuracy(values, vd))
    final["test/drop"] = final["test/real"] - final["test/gray"]
    return final, questions


def split_accuracy(values: Sequence[float], vision_dependent: Sequence[bool]) -> dict:
    """Accuracy on the general (text prior right) and vision-dependent questions."""
    general = [v for v, d in zip(values, vision_dependent) if not d]
    vd = [v for v, d in zip(values, vision_dependent) if d]
    return {
        "test/general": sum(general) / len(general) if general else None,
        "test/vd": sum(vd) / len(vd) if vd else None,
    }


def per_question_correct(records: Iterable[Mapping], benchmark: str, ids: Sequence[str]) -> dict:
    """Question id -> greedy correctness (0/1), from ``vispo eval``'s ``results.jsonl``."""
    wanted = set(ids)
    found: dict[str, int] = {}
    sigs = set()
    for rec in records:
        if rec.get("benchmark") != benchmark or rec.get("mode") != "greedy":
            continue
        if rec["id"] in wanted:
            found[rec["id"]] = int(float(rec["correct"][0]) >= 1.0)
            sigs.add(rec["sig"])
    if len(sigs) > 1:
        raise ReproError(f"{benchmark}: results of several evaluation settings are on file")
    missing = [i for i in ids if i not in found]
    if missing:
        raise ReproError(f"{benchmark}: {len(missing)} question(s) not scored, e.g. {missing[0]}")
    return found


def train_summary(rows: Sequence[Mapping], guard_events: Sequence[Mapping] | None = None) -> dict:
    """Curves and totals from a run's ``metrics.jsonl`` rows.

    The validation curve: step 0 from ``eval/accuracy_before``, every ``eval/accuracy`` (the
    trainer's ``eval_every``), and ``eval/accuracy_after`` at the last step when that step has
    no periodic value.
    """
    steps = [r for r in rows if "reward/mean" in r]
    curve: dict[int, float] = {}
    after: dict[int, float] = {}
    for r in rows:
        if "eval/accuracy_before" in r:
            curve[0] = float(r["eval/accuracy_before"])
        if "eval/accuracy" in r:
            curve[int(r["step"])] = float(r["eval/accuracy"])
        if "eval/accuracy_after" in r:
            after = {int(r["step"]): float(r["eval/accuracy_after"])}
    for step, value in after.items():
        curve.setdefault(step, value)
    if guard_events is None:
        guard_events = [
            {"step": int(r["step"]), "signals": {}} for r in steps if r.get("guard/event")
        ]
    rounds = [float(r.get("dynamic_sampling/rounds", 1.0)) for r in steps]
    return {
        "curve": {"step": sorted(curve), "value": [curve[s] for s in sorted(curve)]},
        "reward": {
            "step": [int(r["step"]) for r in steps],
            "value": [round(float(r["reward/mean"]), 5) for r in steps],
        },
        "guard_events": [dict(e) for e in guard_events],
        "step_time_s": sum(float(r.get("time/step", 0.0)) for r in steps),
        "ds_rounds": statistics.fmean(rounds) if rounds else None,
        "ds_rounds_total": sum(rounds),
        "steps_done": len(steps),
    }
