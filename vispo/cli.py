"""``vispo train | export`` (``eval``, ``probe``, ``report`` arrive with the evaluation tools)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TRAIN_EPILOG = """Overrides are section.field=value, e.g.
  vispo train configs/papo_g.yaml optim.lr=2e-6 objective.gamma=0.01
With no config file and no overrides, `vispo train` runs the embedded default (configs/quickstart.yaml).
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
        "--resume", action="store_true", help="continue from the run's last checkpoint"
    )
    parser.add_argument("-h", "--help", action="store_true", help="list every config field")
    args = parser.parse_args(argv)
    if args.help:
        parser.print_help()
        print("\nConfig fields (default, then help):\n")
        print(help_text())
        return 0
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)
        config = None
    if config is None and not overrides:
        config = str(default_config_path())
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        print(f"vispo train: invalid config: {e}", file=sys.stderr)
        return 2
    from vispo.train.run import run_training

    return run_training(cfg, resume=args.resume)


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


COMMANDS = {"train": _train, "export": _export}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: vispo {" + ",".join(COMMANDS) + "} ...\n\n"
            "  train   run RL (vispo train --help lists every config field)\n"
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
