"""Running the plan: each run a subprocess (one thread), ``--jobs`` at a time, resumable.

A run whose record exists (made with the same spec, settings and resolved values) is skipped;
an interrupted one resumes from its last checkpoint. A main run starts once the records it
reads exist: the tuning runs (its learning rate) and, for GRPO at equal rollouts, DAPO's run
of the same seed (its prompts per step).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .plan import (
    ARM_BY_KEY,
    ROOT,
    ReproError,
    RunSpec,
    Settings,
    chosen_lr,
)
from .records import load_records, spec_document, write_json

#: Wall-time model of one run, one thread per run, two runs on 2 cores (``--dry-run``).
#: GRPO's seconds per step measured by the smoke run under load; the other arms scaled by their
#: step time relative to GRPO (benchmarks/results/step_time*.md; DAPO and PAPO-D with ~3.3
#: rollout rounds per step, measured in the previous reproduction).
GRPO_STEP_S = 0.9
STEP_FACTOR = {"grpo": 1.0, "dapo": 2.0, "papo_g": 1.17, "papo_d": 2.4, "cppo": 1.6,
               "vppo": 1.16, "noisyrollout": 1.21}  # fmt: skip
EQR_FACTOR = 2.6  # GRPO with ~3.3x the prompts per step
OVERHEAD_S = 20.0  # interpreter, imports, data and model loading (5 + 10-15 s measured)
EVAL_S_PER_Q = 0.005  # greedy, 64-px images, 4 new tokens, batch 128 (3.5-5 ms measured)
CF_SIZE = 856  # easy-vqa-cf's questions (8 per question string)


def resolve(spec: RunSpec, settings: Settings, records: Mapping[str, Mapping]) -> dict | None:
    """The values a run's config reads from other runs' records (None: not available yet)."""
    if spec.kind != "main":
        return {}
    tuning: dict[float, dict[int, float]] = {}
    for lr in settings.tune_lrs:
        for s in settings.tune_seeds:
            rec = records.get(f"tune-lr{lr:g}-s{s}")
            if rec is None:
                return None
            tuning.setdefault(lr, {})[s] = rec["final"]["val"]
    out: dict = {"lr": chosen_lr(tuning), "prompts_per_step": None}
    other = ARM_BY_KEY[spec.arm].equal_rollouts_of
    if other:
        rec = records.get(f"{other}-s{spec.seed}")
        if rec is None:
            return None
        per_step = rec["config"]["train"]["prompts_per_step"]
        out["prompts_per_step"] = int(round(per_step * rec["train"]["ds_rounds"]))
    return out


def job_document(spec: RunSpec, settings: Settings, resolved: dict, record: Path) -> dict:
    return {**spec_document(spec, settings), "resolved": resolved, "record": str(record)}


def is_done(spec: RunSpec, settings: Settings, records: Mapping[str, Mapping]) -> bool:
    rec = records.get(spec.name)
    if rec is None:
        return False
    doc = spec_document(spec, settings)
    if rec["spec"] != doc["run"] or rec["settings"] != doc["settings"]:
        raise ReproError(
            f"the record of {spec.name} was made with another plan; delete it (and its run "
            "folder) to rerun, or choose another --records"
        )
    want = resolve(spec, settings, records)
    if want is not None and rec["resolved"] != want:
        raise ReproError(
            f"{spec.name} ran with {rec['resolved']} but the records now give {want}; delete "
            "its record and run folder to rerun it"
        )
    return True


def estimate_run_s(spec: RunSpec, settings: Settings) -> float:
    """Expected wall time of one run (the model above)."""
    n_test = 9673 if settings.test_limit is None else min(settings.test_limit, 9673)
    n_cf = CF_SIZE if settings.cf_limit is None else min(settings.cf_limit, CF_SIZE)
    final = (3 * n_test + n_cf) * EVAL_S_PER_Q
    if spec.kind == "before":
        return OVERHEAD_S / 2 + final
    arm = ARM_BY_KEY[spec.arm]
    factor = EQR_FACTOR if arm.equal_rollouts_of else STEP_FACTOR[arm.preset]
    curve = (settings.steps // settings.eval_every + 2) * settings.curve_size * EVAL_S_PER_Q
    train = OVERHEAD_S + settings.steps * GRPO_STEP_S * factor + curve
    return train if spec.kind == "tune" else train + final


def estimate_wall_s(plan: Sequence[RunSpec], settings: Settings, jobs: int) -> float:
    """Makespan on ``jobs`` workers, runs taken in plan order (dependencies ignored)."""
    workers = [0.0] * max(1, jobs)
    for spec in plan:
        i = workers.index(min(workers))
        workers[i] += estimate_run_s(spec, settings)
    return max(workers)


def _worker_env() -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", COLUMNS="120")
    return env


def _steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return path.read_text().count('"reward/mean"')


def execute(
    plan: Sequence[RunSpec],
    settings: Settings,
    out: Path,
    records_dir: Path,
    *,
    jobs: int,
    log=print,
) -> list[str]:
    """Run the plan's unfinished runs; returns the names that failed or could not start.

    Ctrl-C or SIGTERM stops the runs this call started (a rerun resumes them).
    """
    import signal

    def _terminated(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminated)
    running: dict[str, tuple[subprocess.Popen, object, float]] = {}
    failed: list[str] = []
    try:
        records = load_records(records_dir)
        queue = [s for s in plan if not is_done(s, settings, records)]
        log(f"{len(plan) - len(queue)} of {len(plan)} runs already have a record")
        last_report = 0.0
        while queue or running:
            records = load_records(records_dir)
            for spec in list(queue):
                if len(running) >= jobs:
                    break
                if any(n in failed for n in spec.needs(settings)):
                    queue.remove(spec)
                    failed.append(spec.name)
                    log(f"SKIPPED {spec.name}: a run it reads failed")
                    continue
                resolved = resolve(spec, settings, records)
                if resolved is None:
                    continue
                queue.remove(spec)
                running[spec.name] = _start(spec, settings, resolved, out, records_dir)
            if queue and not running:
                missing = sorted({n for s in queue for n in s.needs(settings) if n not in records})
                raise ReproError(
                    f"{queue[0].name} and {len(queue) - 1} more need records that this plan "
                    f"does not make: {', '.join(missing[:4])} (drop --only, or run them first)"
                )
            for name, (proc, fh, started) in list(running.items()):
                if proc.poll() is None:
                    continue
                fh.close()
                del running[name]
                wall = time.perf_counter() - started
                if proc.returncode == 0 and (records_dir / f"{name}.json").exists():
                    log(_done_line(records_dir / f"{name}.json", wall))
                else:
                    failed.append(name)
                    tail = (out / name / "log.txt").read_text(errors="replace").splitlines()
                    log(f"FAILED {name} (exit {proc.returncode}); end of its log:")
                    log("\n".join(tail[-15:]))
            if running and time.perf_counter() - last_report > 60:
                last_report = time.perf_counter()
                log(
                    "running: "
                    + ", ".join(f"{n} ({_phase(out / n)})" for n in running)
                    + f"; {len(queue)} queued"
                )
            time.sleep(0.5)
    except KeyboardInterrupt:
        for proc, _, _ in running.values():
            proc.terminate()
        for proc, fh, _ in running.values():
            proc.wait()
            fh.close()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return failed


def _phase(run_dir: Path) -> str:
    path = run_dir / "phase.txt"
    text = path.read_text() if path.exists() else "start"
    return f"{text}, step {_steps_logged(run_dir)}" if text == "train" else text


def _start(spec: RunSpec, settings: Settings, resolved: dict, out: Path, records_dir: Path):
    run_dir = out / spec.name
    run_dir.mkdir(parents=True, exist_ok=True)
    job = job_document(spec, settings, resolved, records_dir / f"{spec.name}.json")
    path = run_dir / "job.json"
    if path.exists():
        old = json.loads(path.read_text())
        if {k: old.get(k) for k in ("run", "settings", "resolved")} != {
            k: job[k] for k in ("run", "settings", "resolved")
        }:
            raise ReproError(f"{run_dir} holds a run made with another plan; delete that folder")
    write_json(path, job)
    fh = open(run_dir / "log.txt", "a")
    fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {spec.name} {resolved} ===\n")
    fh.flush()
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.reproduce", "--worker", str(run_dir)],
        stdout=fh,
        stderr=subprocess.STDOUT,
        env=_worker_env(),
        cwd=ROOT,
    )
    return proc, fh, time.perf_counter()


def _done_line(path: Path, wall: float) -> str:
    rec = json.loads(path.read_text())
    f = rec["final"]

    def pct(key):
        return "—" if f.get(key) is None else f"{100 * f[key]:.1f}"

    return (
        f"done {rec['name']} ({wall:.0f} s): val {pct('val')}, test {pct('test/real')}, "
        f"gray {pct('test/gray')}, other {pct('test/other')}, cf {pct('cf')}"
    )
