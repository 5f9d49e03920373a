"""The ``sga`` command: one entry point, one subcommand per job.

Each package registers its own subcommands (``<package>/cli.py``); this module only wires them together,
runs the chosen handler and prints its summary.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

from shards.errors import JOB_FAILED_EXIT, JobFailed, SgaError

# Order is the order of ``sga --help``: data flows from the world to the student.
COMMAND_MODULES = (
    "shards.synthetic.cli", "shards.cli", "teacher.cli", "pipeline.label_cli", "student.cli",
    "student.finetune.cli", "student.experiment.cli",
)

DESCRIPTION = """\
Semi-supervised grounding alignment: label captions with a phrase-grounding teacher, then pretrain a
vision-language BERT student on the pseudo labels.

Data flow: image shards + region shards -> `sga label` -> label shards + manifest -> `sga pretrain`
-> checkpoints -> `sga finetune`. Every command runs with no downloads on the embedded synthetic world.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sga", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _print_human(summary: dict[str, Any]) -> None:
    width = max((len(k) for k in summary), default=0)
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, dict | list):
            value = json.dumps(value)
        print(f"{key:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        (getattr(args, "group_parser", None) or parser).print_help()
        return 0 if args.command is None else 2
    try:
        summary = handler(args)
    except JobFailed as exc:
        _print_summary(args, exc.summary)
        print(f"sga {args.command}: failed: {exc}", file=sys.stderr)
        return JOB_FAILED_EXIT
    except SgaError as exc:
        print(f"sga {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sga {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    _print_summary(args, summary)
    return 0


def _print_summary(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(summary, sort_keys=True, default=str))
    else:
        _print_human(summary)


if __name__ == "__main__":
    sys.exit(main())
