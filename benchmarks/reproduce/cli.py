"""Command line of the reproduction (``python -m benchmarks.reproduce``)."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from . import report
from .plan import (
    ROOT,
    ReproError,
    Settings,
    build_plan,
    eval_options,
    model_sha256,
    parse_seeds,
    quickstart_sha256,
    quickstart_tree,
    run_tree,
)
from .records import RECORDS_DIR, load_records, record_settings
from .scheduler import estimate_run_s, estimate_wall_s, execute

DEFAULT_OUT = ROOT / "runs" / "reproduce"
QUICK_OUT = ROOT / "runs" / "reproduce-quick"
DEFAULT_DOCS = ROOT / "docs"
#: The smoke run: short runs that still exercise tuning -> main, DAPO -> GRPO at equal
#: rollouts, and paired statistics (two seeds of GRPO and PAPO-G).
QUICK_SETTINGS = dict(steps=2, test_limit=32, cf_limit=32, curve_size=16, eval_every=1,
                      save_every=1, eval_batch=32, tune_lrs=(3e-4, 1e-3), tune_seeds=(0,),
                      quick=True)  # fmt: skip
QUICK_RUNS = "before-rl,tune-*,grpo-s0,grpo-s1,papo_g-s0,papo_g-s1,dapo-s0,grpo-eqr-s0"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.reproduce",
        description="Issue 20's reproduction suite (resumable): tuning on validation, a control "
        "per term, paired statistics over seeds; writes per-run records and docs/results.md.",
    )
    p.add_argument("--out", type=Path, help="run folders (default runs/reproduce)")
    p.add_argument("--records", type=Path, help="result records (default "
                   "benchmarks/results/reproduce; quick: OUT/records)")  # fmt: skip
    p.add_argument("--docs", type=Path, help="results.md and its PNG (default docs/; quick: OUT)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each (2)")
    p.add_argument("--seeds", default="0-4", help="seeds of every arm (default 0-4)")
    p.add_argument("--only", help="comma-separated run-name patterns (glob, or substring), e.g. "
                   "'before-rl,tune-*,grpo-*'")  # fmt: skip
    p.add_argument("--steps", type=int, help="RL steps per run (default: the quickstart's, 60)")
    p.add_argument("--test-limit", type=int, help="easy-vqa test questions per mode (2000)")
    p.add_argument("--curve-size", type=int, help="validation questions of the curve (500)")
    p.add_argument("--eval-every", type=int, help="steps between validation evaluations (10)")
    p.add_argument("--quick", action="store_true", help="smoke run: 9 runs of 2 steps")
    p.add_argument("--report", action="store_true", help="only rebuild docs from the records")
    p.add_argument("--dry-run", action="store_true", help="print the plan and time estimate")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    base = Settings(**QUICK_SETTINGS) if args.quick else Settings()
    if not args.quick:
        base = dataclasses.replace(base, steps=int(quickstart_tree()["train"]["steps"]))
    changes = {
        name: getattr(args, name)
        for name in ("steps", "test_limit", "curve_size", "eval_every")
        if getattr(args, name) is not None
    }
    return dataclasses.replace(
        base,
        **changes,
        model_sha256=model_sha256(eval_options()["model"]),
        quickstart_sha256=quickstart_sha256(),
    ).validate()


def validate_plan(plan, settings: Settings, out: Path) -> None:
    """Build every run's config now, so that a wrong field fails before any compute."""
    from vispo.train.config import ConfigError, build_config

    for spec in plan:
        if spec.kind == "before":
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                build_config(run_tree(spec, settings, out / spec.name, lr=3e-4))
        except ConfigError as e:
            raise ReproError(f"{spec.name}: invalid config: {e}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        from .worker import worker

        return worker(args.worker.resolve())
    try:
        return _main(args)
    except ReproError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reproduce: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def _main(args: argparse.Namespace) -> int:
    out = (args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)).resolve()
    records_dir = (args.records or (out / "records" if args.quick else RECORDS_DIR)).resolve()
    docs = (args.docs or (out if args.quick else DEFAULT_DOCS)).resolve()
    if args.report:
        records = load_records(records_dir)
        settings = record_settings(records) or settings_from_args(args)
        records = {n: r for n, r in records.items() if r["settings"] == settings.to_json()}
        print(f"wrote {report.write_report(records, settings, docs)} from {len(records)} records")
        return 0
    if args.jobs < 1:
        raise ReproError(f"--jobs must be >= 1, got {args.jobs}")
    settings = settings_from_args(args)
    seeds = (0, 1) if args.quick else parse_seeds(args.seeds)
    plan = build_plan(seeds, settings, only=QUICK_RUNS if args.quick else args.only)
    if args.quick and args.only:
        plan = build_plan(seeds, settings, only=args.only)
    validate_plan(plan, settings, out)
    estimate = estimate_wall_s(plan, settings, args.jobs)
    print(
        f"{len(plan)} runs ({sum(r.kind == 'main' for r in plan)} main, seeds "
        f"{','.join(map(str, seeds))}), {settings.steps} steps each, test subset "
        f"{settings.test_limit or 9673} x 3 image modes, {args.jobs} in parallel; estimated "
        f"{estimate / 60:.0f} min ({report.relative(out)}, records in "
        f"{report.relative(records_dir)})"
    )
    if args.dry_run:
        for spec in plan:
            extra = "" if spec.lr is None else f"lr={spec.lr:g}"
            print(f"  {spec.name:<24} ~{estimate_run_s(spec, settings):5.0f} s  {extra}")
        return 0
    if settings.quick and out.exists():
        old = load_records(records_dir) if records_dir.exists() else {}
        if any(r["settings"] != settings.to_json() for r in old.values()):
            print(f"note: {report.relative(out)} holds an older smoke run; starting afresh")
            shutil.rmtree(out)
    start = time.perf_counter()
    failed = execute(plan, settings, out, records_dir, jobs=args.jobs)
    print(f"suite wall time {time.perf_counter() - start:.0f} s")
    records = {
        n: r for n, r in load_records(records_dir).items() if r["settings"] == settings.to_json()
    }
    print(f"wrote {report.write_report(records, settings, docs)}")
    if failed:
        print(f"failed runs: {', '.join(failed)} (rerun the command to retry)", file=sys.stderr)
        return 1
    return 0
