"""``vispo train | eval | probe | report | export``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TRAIN_EPILOG = """CONFIG is a YAML file or a name: an objective preset (grpo, dapo, dr_grpo, papo_g,
papo_d, cppo: run on the embedded default, the shipped model on easy-vqa), quickstart, or a
paper's full recipe for a GPU (recipes/grpo, recipes/cppo, ...). It may come before or after
the overrides, which are section.field=value:
  vispo train cppo train.steps=30
  vispo train optim.lr=2e-6 recipes/papo_g model.name_or_path=/models/Qwen2.5-VL-3B-Instruct
Without CONFIG, `vispo train` runs the embedded default (configs/quickstart.yaml), with any
overrides applied on top of it. `vispo train CONFIG --help` lists the values that run uses.
"""


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends each option with its default, where it has a value to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            "%(default)" not in text
            and action.default is not None
            and action.default is not False
            and action.default != argparse.SUPPRESS
            and action.option_strings
        ):
            text += " (default: %(default)s)" if "(default:" not in text else ""
        return text


def _split_train_args(items: list[str]) -> tuple[str | None, list[str]]:
    """(config, overrides) from the positional arguments, in any order: an item with '=' that
    is not an existing file is an override; at most one other item, the config."""
    config, overrides = None, []
    for item in items:
        if "=" in item and not Path(item).exists():
            overrides.append(item)
        elif config is None:
            config = item
        else:
            raise ValueError(
                f"two configs given ({config!r} and {item!r}); name one, and write "
                "settings as section.field=value"
            )
    return config, overrides


def _train(argv: list[str]) -> int:
    from vispo.train.config import ConfigError, build_config
    from vispo.train.presets import config_tree, effective_help

    parser = argparse.ArgumentParser(
        prog="vispo train",
        usage="vispo train [CONFIG] [section.field=value ...] [--resume [CHECKPOINT]] [--overwrite] "
        "[-h]",
        description="Run RL on a VLM.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    parser.add_argument(
        "args",
        nargs="*",
        metavar="CONFIG / section.field=value",
        help="a config file or preset name, and overrides, in any order",
    )
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
    parser.add_argument(
        "-h", "--help", action="store_true", help="list every config field with its value"
    )
    args, unknown = parser.parse_known_args(argv)
    bad = [u for u in unknown if u.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    resume, positional = args.resume, list(args.args)
    if isinstance(resume, str) and not _names_checkpoint(resume):
        # `--resume cppo` or `--resume a.b=c`: the flag followed by the usual arguments.
        positional, resume = [resume, *positional], True
    try:
        config, overrides = _split_train_args(positional + unknown)
        cfg = build_config(config_tree(config, overrides))
    except (ConfigError, ValueError) as e:
        print(f"vispo train: invalid config: {e}", file=sys.stderr)
        return 2
    if args.help:
        parser.print_help()
        what = f"{config} with the overrides" if config else "the embedded default"
        if config and not overrides:
            what = config
        elif not config and overrides:
            what = "the embedded default with the overrides"
        print(f"\nConfig fields: the values `vispo train` uses here ({what}), then help:\n")
        print(effective_help(cfg))
        return 0
    from vispo.train.run import run_training

    return run_training(cfg, resume=resume, overwrite=args.overwrite)


def _names_checkpoint(value: str) -> bool:
    """``--resume VALUE``: a step number, a folder, or a ``step-NNNNNN`` path names a
    checkpoint; anything else (a config file or preset name, an override) is not one."""
    return value.isdigit() or Path(value).is_dir() or Path(value).name.startswith("step-")


def default_config_path() -> Path:
    """The embedded default: PAPO-G on easy-vqa from the shipped small VLM."""
    from vispo.train.presets import DEFAULT_CONFIG

    return DEFAULT_CONFIG


def _export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vispo export",
        description="Write a run's checkpoint (latest by default) as a Hugging Face model folder "
        "that plain transformers loads (AutoProcessor + AutoModelForImageTextToText, no vispo, "
        "no torchvision): safetensors, processor, chat template, generation config (greedy, "
        "the run's length cap) and a model card README.md.",
    )
    parser.add_argument("run_dir", help="the vispo run folder")
    parser.add_argument("out_dir", help="the folder to write")
    parser.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    parser.add_argument(
        "--adapter-only",
        action="store_true",
        help="LoRA runs: write only the adapter, in PEFT format (PeftModel.from_pretrained)",
    )
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="then upload the folder to the Hugging Face Hub repository owner/name",
    )
    parser.add_argument("--private", action="store_true", help="create the hub repo as private")
    args = parser.parse_args(argv)
    from vispo.train.checkpoint import CheckpointError
    from vispo.train.config import ConfigError
    from vispo.train.export import ExportError, export_run, push_to_hub

    try:
        result = export_run(
            args.run_dir, args.out_dir, step=args.step, adapter_only=args.adapter_only
        )
        what = "adapter (PEFT)" if result.adapter_only else "model"
        print(f"exported the {what} of step {result.step} ({result.checkpoint}) to {result.path}")
        if args.push_to_hub:
            url = push_to_hub(result.path, args.push_to_hub, private=args.private)
            print(f"uploaded to {url}")
    except (FileNotFoundError, CheckpointError, ConfigError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


DEFAULT_BENCHMARKS = "easy-vqa,easy-vqa-vd"


def _add_model_options(parser: argparse.ArgumentParser, limit: int | None = None) -> None:
    """Options shared by ``vispo eval`` and ``vispo probe``."""
    parser.add_argument(
        "--benchmarks",
        default=None,
        help="comma-separated benchmark names (vispo eval --list shows them) (default: "
        f"{DEFAULT_BENCHMARKS}), for a run folder without --data its own held-out set",
    )
    parser.add_argument(
        "--data-root", help="folder of local benchmark files (docs/evaluation.md: layout)"
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=limit,
        help="first N questions of each benchmark" + (" (default: all)" if limit is None else ""),
    )
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
    parser.add_argument(
        "--out",
        help="output folder (default: RUN_DIR/eval or /probe for a run folder, else "
        "evals/LABEL or probes/LABEL)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _eval(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vispo eval",
        formatter_class=_DefaultsFormatter,
        description="avg@k and greedy accuracy of models on benchmarks (resumable). MODEL is a "
        "vispo run folder (its latest checkpoint), a Hugging Face model folder, "
        "builtin:vispo-tiny or tiny:<arch>. Several models give one side-by-side table. "
        "Without --data or --benchmarks, a run folder is evaluated on its own held-out set "
        f"(the one training scored) and other models on {DEFAULT_BENCHMARKS}.",
    )
    parser.add_argument("models", nargs="*", metavar="MODEL")
    _add_model_options(parser)
    parser.add_argument(
        "--data",
        action="append",
        metavar="FILE",
        help="evaluate on a data file or folder, any layout training accepts (docs/data.md); "
        "repeatable",
    )
    parser.add_argument("--data-split", default="test", help="split of --data where it has several")
    parser.add_argument("--k", type=int, default=8, help="samples per question (0: greedy only)")
    parser.add_argument("--temperature", type=float, default=1.0, help="avg@k temperature")
    parser.add_argument("--top-p", type=float, default=1.0, help="avg@k nucleus mass")
    parser.add_argument("--no-greedy", action="store_true", help="skip greedy accuracy")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per generate call")
    parser.add_argument("--overwrite", action="store_true", help="discard earlier results")
    parser.add_argument(
        "--no-responses", action="store_true", help="do not store answer texts in results.jsonl"
    )
    parser.add_argument(
        "--images",
        choices=("real", "gray", "other"),
        default="real",
        help="ask each question with its real image, a uniform gray one of the same size, or "
        "another question's (a fixed seeded derangement within the benchmark); real - gray is "
        "how much a model uses the image",
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
        data_file_benchmark,
        describe_benchmarks,
        evaluate_model,
        held_out_benchmark,
        load_model_spec,
        load_result,
        parse_benchmarks,
        unique_labels,
        write_comparison,
    )
    from vispo.train.checkpoint import CheckpointError

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
            image_mode=args.images,
        ).validate()
        named = []
        if args.benchmarks:
            named += parse_benchmarks(args.benchmarks, args.data_root)
        for path in args.data or []:
            named.append(data_file_benchmark(path, split=args.data_split))
        results = []
        for spec in args.models:
            loaded = load_model_spec(spec, step=args.step)
            if named:
                benchmarks = named
            elif loaded.config is not None:  # a run: its own held-out set
                benchmarks = [held_out_benchmark(loaded.config)]
            else:
                benchmarks = parse_benchmarks(DEFAULT_BENCHMARKS, args.data_root)
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
    except (BenchmarkError, ModelSpecError, FileNotFoundError, ValueError, CheckpointError) as e:
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
        formatter_class=_DefaultsFormatter,
        description="How much does the model look? Per question, KL(original || masked) and "
        "KL(original || no image) of the model's own response (PAPO's perception_kl), and how "
        "often the answer changes; per benchmark JSON, Markdown and histogram PNG.",
    )
    parser.add_argument("model", metavar="MODEL")
    _add_model_options(parser, limit=200)
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
        benchmarks = parse_benchmarks(args.benchmarks or DEFAULT_BENCHMARKS, args.data_root)
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
    from vispo.quiet import quiet_console

    quiet_console()
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
