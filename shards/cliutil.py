"""Helpers every package's ``cli.py`` uses to declare its ``sga`` subcommands.

A package's ``cli.py`` exposes ``register(subparsers)`` and imports nothing heavy at module level, so
``sga --help`` stays fast. A handler takes the parsed ``argparse.Namespace`` and returns a JSON-serialisable
summary dict, which the root prints (one JSON object on stdout with ``--json``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from .errors import SgaError

Handler = Callable[[argparse.Namespace], dict[str, Any]]


def add_command(subparsers, name: str, handler: Handler, help: str, description: str,
                epilog: str | None = None) -> argparse.ArgumentParser:
    """Add subcommand ``name`` with the shared ``--json`` flag; returns its parser for more arguments."""
    parser = subparsers.add_parser(
        name, help=help, description=description, epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true",
                        help="print one machine-readable JSON summary object on stdout at the end")
    parser.set_defaults(handler=handler)
    return parser


def add_group(subparsers, name: str, help: str, description: str):
    """A subcommand with subcommands of its own (``sga regions import``); returns its subparsers."""
    parser = subparsers.add_parser(name, help=help, description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(handler=None, group_parser=parser)
    return parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND")


def exit_with_launcher() -> None:
    """Have the kernel kill this process when its parent (the torchrun agent that started this rank) dies.

    torchrun starts ranks in sessions of their own, so killing the launcher would leave them running;
    orphaned ranks would keep writing checkpoints into a run directory that may be resumed meanwhile.
    Linux only (``prctl(PR_SET_PDEATHSIG)``); elsewhere a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def rank_main(argv: list[str] | None, command: str, config_help: str, run: Callable[[str], Any]) -> int:
    """Entry point of one rank that ``command`` started under torchrun: ``--config FILE`` goes to ``run``;
    the rank dies with its launcher, and an :class:`SgaError` becomes one line on stderr and exit status 2."""
    parser = argparse.ArgumentParser(description=f"One rank of `{command}` (started by it).")
    parser.add_argument("--config", required=True, help=config_help)
    args = parser.parse_args(argv)
    exit_with_launcher()
    try:
        run(args.config)
    except SgaError as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 2
    return 0
