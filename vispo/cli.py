"""``vispo train | eval | probe | report | export``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TRAIN_EPILOG = """Overrides are section.field=value, e.g.
  vispo train configs/papo_g.yaml optim.lr=2e-6 objective.gamma=0.01
Without a config file, `vispo train` runs the embedded default (configs/quickstart.yaml),
with any overrides applied on top of it.
"""


def _train(argv: list[str]) -> int:
    from vispo.train.config import ConfigError, help_text, load_config

    parser = argparse.ArgumentParser(
        prog="vispo train",
        description="Run RL on a VLM.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    parser.add_argument("config", nargs="?", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue the run in train.out_dir from its newest good checkpoint, or from "
        "CHECKPOINT (a checkpoint folder, or a step number of the run)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run already in train.out_dir (checkpoints, metrics, ...) first",
    )
    parser.add_argument("-h", "--help", action="store_true", help="list every config field")
    args = parser.parse_args(argv)
    if args.help:
        parser.print_help()
        print("\nConfig fields (default, then help):\n")
        print(help_text())
        return 0
    config, overrides = args.config, list(args.overrides)
    resume = args.resume
    if isinstance(resume, str) and not _names_checkpoint(resume):
        # `--resume cfg.yaml` or `--resume a.b=c`: a flag followed by the usual arguments.
        overrides = [x for x in (config, *overrides) if x is not None]
        config, resume = resume, True
        if overrides and "=" not in overrides[0] and "=" in config:
            config, overrides = overrides[0], [config, *overrides[1:]]
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)
        config = None
    if config is None:  # the embedded default, with any overrides applied on top
        config = str(default_config_path())
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        print(f"vispo train: invalid config: {e}", file=sys.stderr)
        return 2
    from vispo.train.run import run_training

    return run_training(cfg, resume=resume, overwrite=args.overwrite)


def _names_checkpoint(value: str) -> bool:
    """``--resume VALUE``: a step number, a folder, or a ``step-NNNNNN`` path names a
    checkpoint; anything else (a config file or preset name, an override) is not one."""
    return value.isdigit() or Path(value).is_dir() or Path(value).name.startswith("step-")


def default_config_path() -> Path:
    """The embedded default: PAPO-G on easy-vqa from the shipped small VLM."""
    return Path(__file__).resolve().parent / "configs" / "quickstart.yaml"


def _export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vispo export",
        description="Write a run's latest checkpoint as a Hugging Face model folder "
        "(safetensors + processor + chat template), loadable with from_pretrained.",
    )
    parser.add_argument("run_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    args = parser.parse_args(argv)
    from vispo.train.export import export_run

    path = export_run(args.run_dir, args.out_dir, step=args.step)
    print(f"exported to {path}")
    return 0


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``vispo eval`` and ``vispo probe``."""
    parser.add_argument(
        "--benchmarks",
        default="easy-vqa,easy-vqa-vd",
        help="comma-separated benchmark names (vispo eval --list shows them)",
    )
    parser.add_argument(
        "--data-root", help="folder of local benchmark files (docs/evaluation.md: layout)"
    )
    parser.add_argument("--limit", type=int, help="first N questions of each benchmark")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling and masks")
    parser.add_argument(
        "--max-new-tokens", type=int, help="answer length cap (default: run's, else benchmark's)"
    )
    parser.add_argument("--template", help="prompt template (default: run's, else benchmark's)")
    parser.add_argument(
        "--reward", help="reward whose accuracy is scored (default: run's, else 'math')"
    )
    parser.add_argument(
        "--step", type=int, help="checkpoint step of a run folder (default: latest)"
    )
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _eval(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vispo eval",
        description="avg@k and greedy accuracy of models on benchmarks (resumable). MODEL is a "
        "vispo run folder (its latest checkpoint), a Hugging Face model folder, "
        "builtin:vispo-tiny or tiny:<arch>. Several models give one side-by-side table.",
    )
    parser.add_argument("models", nargs="*", metavar="MODEL")
    _add_model_options(parser)
    parser.add_argument("--k", type=int, default=8, help="samples per question (0: greedy only)")
    parser.add_argument("--temperature", type=float, default=1.0, help="avg@k temperature")
    parser.add_argument("--top-p", type=float, default=1.0, help="avg@k nucleus mass")
    parser.add_argument("--no-greedy", action="store_true", help="skip greedy accuracy")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per generate call")
    parser.add_argument("--overwrite", action="store_true", help="discard earlier results")
    parser.add_argument(
        "--no-responses", action="store_true", help="do not store answer texts in results.jsonl"
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="EVAL_JSON",
        help="only compare earlier results (eval.json files or their folders)",
    )
    args = parser.parse_args(argv)
    from vispo.eval import (
        BenchmarkError,
        EvalSettings,
        ModelSpecError,
        describe_benchmarks,
        evaluate_model,
        load_model_spec,
        load_result,
        parse_benchmarks,
        unique_labels,
        write_comparison,
    )

    if args.list:
        print("Benchmarks (group, description):\n" + describe_benchmarks())
        return 0
    if args.compare:
        results = [load_result(p) for p in args.compare]
        for r, label in zip(results, unique_labels([r["label"] for r in results])):
            r["label"] = label
        print(write_comparison(results, Path(args.out or "evals")))
        return 0
    if not args.models:
        parser.error("name at least one MODEL (or use --list / --compare)")
    try:
        settings = EvalSettings(
            k=args.k,
            temperature=args.temperature,
            top_p=args.top_p,
            greedy=not args.no_greedy,
            seed=args.seed,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            template=args.template,
            reward=args.reward,
            limit=args.limit,
            keep_responses=not args.no_responses,
        ).validate()
        benchmarks = parse_benchmarks(args.benchmarks, args.data_root)
        results = []
        for spec in args.models:
            loaded = load_model_spec(spec, step=args.step)
            out = _output_dir(args.out, loaded, len(args.models), "eval", "evals")
            result = evaluate_model(
                loaded,
                benchmarks,
                out,
                settings,
                data_root=args.data_root,
                progress=not args.no_progress,
                overwrite=args.overwrite,
            )
            print((out / "eval.md").read_text())
            print(f"wrote {out / 'eval.json'} and {out / 'eval.md'}")
            results.append(result)
            del loaded
    except (BenchmarkError, ModelSpecError, FileNotFoundError, ValueError) as e:
        print(f"vispo eval: {e}", file=sys.stderr)
        return 2
    if len(results) > 1:
        for r, label in zip(results, unique_labels([r["label"] for r in results])):
            r["label"] = label
        base = Path(args.out or "evals")
        print(write_comparison(results, base))
        print(f"wrote {base / 'comparison.md'} and {base / 'comparison.json'}")
    return 0


def _output_dir(out: str | None, loaded, n_models: int, sub: str, default_root: str) -> Path:
    """A model's output folder: ``--out`` (or ``--out/<label>`` for several models); by
    default ``RUN_DIR/<sub>`` for a run folder, else ``<default_root>/<label>``."""
    if out is not None:
        return Path(out) if n_models == 1 else Path(out) / loaded.label
    if loaded.config is not None:
        return Path(loaded.spec) / sub
    return Path(default_root) / loaded.label


def _probe(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vispo probe",
        description="How much does the model look? Per question, KL(original || masked) and "
        "KL(original || no image) of the model's own response (PAPO's perception_kl), and how "
        "often the answer changes; per benchmark JSON, Markdown and histogram PNG.",
    )
    parser.add_argument("model", metavar="MODEL")
    _add_model_options(parser)
    parser.set_defaults(limit=200)
    parser.add_argument(
        "--mask-ratio",
        type=float,
        default=None,
        help="PAPO mask ratio (default: the run's objective.mask_ratio, else 0.6)",
    )
    parser.add_argument(
        "--patch-size",
        type=int,
        default=None,
        help="PAPO mask patch side in px (default: the run's objective.mask_patch_size, else 14)",
    )
    parser.add_argument(
        "--blank-fill", type=int, default=128, help="gray level of the 'no image' stand-in"
    )
    parser.add_argument(
        "--sample", action="store_true", help="score a sampled response (default: greedy)"
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--top-p", type=float, default=1.0, help="sampling nucleus mass")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per batch")
    args = parser.parse_args(argv)
    from vispo.eval import (
        BenchmarkError,
        ModelSpecError,
        ProbeSettings,
        load_model_spec,
        parse_benchmarks,
        probe_model,
    )

    try:
        loaded = load_model_spec(args.model, step=args.step)
        run_objective = loaded.config.objective if loaded.config is not None else None

        def run_value(given, field: str, default):
            if given is not None:
                return given
            return getattr(run_objective, field) if run_objective is not None else default

        settings = ProbeSettings(
            mask_ratio=run_value(args.mask_ratio, "mask_ratio", 0.6),
            patch_size=run_value(args.patch_size, "mask_patch_size", 14),
            blank_fill=args.blank_fill,
            seed=args.seed,
            sample=args.sample,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            limit=args.limit,
            template=args.template,
            reward=args.reward,
        ).validate()
        benchmarks = parse_benchmarks(args.benchmarks, args.data_root)
        out = _output_dir(args.out, loaded, 1, "probe", "probes")
        probe_model(
            loaded,
            benchmarks,
            out,
            settings,
            data_root=args.data_root,
            progress=not args.no_progress,
        )
    except (BenchmarkError, ModelSpecError, FileNotFoundError, ValueError) as e:
        print(f"vispo probe: {e}", file=sys.stderr)
        return 2
    print((out / "probe.md").read_text())
    return 0


def _report(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vispo report",
        description="One self-contained HTML page about a run: curves with collapse-guard "
        "events, config, eval table, and sample completions re-scored with the latest "
        "checkpoint (tokens shaded by perception KL, CPPO-selected tokens outlined).",
    )
    parser.add_argument("run_dir")
    parser.add_argument("--out", help="HTML file (default: RUN_DIR/report.html)")
    parser.add_argument("--samples", type=int, default=4, help="questions to re-score")
    parser.add_argument(
        "--no-rescore", action="store_true", help="skip re-scoring (no model is loaded)"
    )
    parser.add_argument("--max-new-tokens", type=int, help="default: the run's rollout length")
    parser.add_argument("--seed", type=int, default=0, help="seed of masks and sampling")
    args = parser.parse_args(argv)
    from vispo.eval import build_report

    try:
        path = build_report(
            args.run_dir,
            args.out,
            n_samples=args.samples,
            rescore=not args.no_rescore,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"vispo report: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


COMMANDS = {
    "train": _train,
    "eval": _eval,
    "probe": _probe,
    "report": _report,
    "export": _export,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: vispo {" + ",".join(COMMANDS) + "} ...\n\n"
            "  train   run RL (vispo train --help lists every config field)\n"
            "  eval    avg@k and greedy accuracy on benchmarks (vispo eval --list)\n"
            "  probe   how much a model looks: perception KL, answer changes\n"
            "  report  one self-contained HTML page about a run\n"
            "  export  write a run's checkpoint as a Hugging Face model folder"
        )
        return 0
    if argv[0] not in COMMANDS:
        print(
            f"vispo: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
