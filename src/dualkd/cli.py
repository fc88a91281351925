"""The `dualkd` command. Thin: parse arguments, call the library, print errors as one clear message.

    dualkd train CONFIG [key.sub=value ...] [--resume]
    dualkd config CONFIG [key.sub=value ...]        print the resolved config
    dualkd demo [--output-dir runs/demo]            tiny teacher -> student distillation on CPU
"""

from __future__ import annotations

import argparse
import os
import sys

from dualkd import __version__
from dualkd.errors import DualKDError


def _cmd_train(args: argparse.Namespace) -> int:
    from dualkd.config import load_config
    from dualkd.train.loop import TrainingStopped, train

    cfg = load_config(args.config, args.overrides)
    try:
        run_dir = train(cfg, resume=args.resume)
    except TrainingStopped as e:
        print(f"dualkd: {e}", file=sys.stderr)
        return 128 + e.signum
    print(run_dir)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from dualkd.config import load_config

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True), end="")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from dualkd.demo import run_demo

    run_demo(args.output_dir, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dualkd", description="Knowledge distillation for language models.")
    parser.add_argument("--version", action="version", version=f"dualkd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a student (SFT or distillation) from a YAML config",
                       description="Train from a YAML config. Overrides such as `optimization.lr=1e-3` or "
                                   "`objective.name=kd` are applied on top of the file.")
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides (values parsed as YAML)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest complete checkpoint in output_dir (exactly, on CPU)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("config", help="validate a config and print it with every default filled in",
                       description="Validate a config (with overrides) and print the resolved YAML.")
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("demo", help="the main job: a tiny teacher -> student distillation on CPU",
                       description="Train a tiny teacher from scratch on generated tasks, distill it into a smaller "
                                   "student, train the same student without a teacher, and compare them.")
    p.add_argument("--output-dir", default="runs/demo", help="where the three runs go (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="a few steps only (a smoke test)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DualKDError as e:
        print(f"dualkd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
