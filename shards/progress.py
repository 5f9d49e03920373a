"""Progress bars on stderr (stdout stays clean for ``--json``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_enabled() -> bool:
    """Bars are shown on an interactive stderr unless ``SGA_PROGRESS=0``; ``SGA_PROGRESS=1`` forces them."""
    flag = os.environ.get("SGA_PROGRESS")
    if flag is not None:
        return flag not in ("0", "false", "")
    return sys.stderr.isatty()


def progress(iterable: Iterable[T] | None = None, **kwargs) -> tqdm:
    """``tqdm`` on stderr, disabled where :func:`progress_enabled` says so."""
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("disable", not progress_enabled())
    return tqdm(iterable, **kwargs)
