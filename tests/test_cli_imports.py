"""`sga --help` and every subcommand's `--help` load no heavy library: torch, Ray, spaCy and friends are
imported by the handlers that need them, so asking for help costs about as much as importing pyarrow."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "ray", "spacy", "transformers", "matplotlib", "scipy")

# Runs the CLI in a fresh interpreter and prints which heavy modules were loaded (help exits via SystemExit).
PROBE = """
import json, sys
from pipeline.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
sys.stdout = sys.__stdout__
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


def _commands() -> list[list[str]]:
    from pipeline.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    commands = [[]]
    for name, p in sub.choices.items():
        nested = [a for a in p._actions if getattr(a, "choices", None) and a.dest.endswith("_command")]
        if nested:
            commands += [[name, child] for child in nested[0].choices]
        else:
            commands.append([name])
    return commands


@pytest.mark.parametrize("command", _commands(), ids=lambda c: " ".join(c) or "sga")
def test_help_imports_nothing_heavy(command):
    code = PROBE.format(heavy=HEAVY)
    proc = subprocess.run([sys.executable, "-c", code, *command, "--help"], capture_output=True, text=True,
                          timeout=120, check=True)
    assert proc.stdout.strip().splitlines()[-1] == json.dumps([]), proc.stdout[-500:]
    assert "usage:" in proc.stdout
