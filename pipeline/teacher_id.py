"""Which teacher a job runs, known before loading it: the spec check and the fingerprint cache.

A teacher's fingerprint names the label set, so it is needed to find finished shards. Loading a teacher to
learn it costs torch and the weights, and the fingerprint depends on where the teacher runs (inference
precision differs between CPU and GPU), so the job takes it from its teacher actors and records it in
``OUT/_teachers.json``, keyed by the spec, the teacher folder's file listing (relative path, size,
modification time of every file), the same listing of the ``teacher`` package's source (a new version of the
inference code may ground differently, so it may change the fingerprint), the device and the inference
settings. The next run with an unchanged teacher folder and code finds the fingerprint there: a finished job
reruns as a no-op without starting Ray or torch. Teachers that are not a folder (other registered names) are
never cached.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from shards import fs
from shards.errors import SgaError

CACHE_NAME = "_teachers.json"
# teacher.base.TINY_DIR, found without importing the teacher package (it imports torch).
TINY_RELATIVE = ("assets", "tiny")


def _package_dir() -> Path | None:
    found = importlib.util.find_spec("teacher")
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


def teacher_dir(spec: str) -> Path | None:
    """The folder behind ``spec``: ``tiny``'s bundled folder or a local path; None otherwise."""
    if spec == "tiny":
        package = _package_dir()
        return package.joinpath(*TINY_RELATIVE) if package is not None else None
    path = Path(spec).expanduser()
    return path.resolve() if path.is_dir() else None


def check_teacher_spec(spec: str) -> None:
    """Refuse a spec that names neither a registered teacher nor a local folder (before starting Ray)."""
    if teacher_dir(spec) is not None:
        return
    from teacher.base import registered_teachers

    if spec not in registered_teachers():
        names = ", ".join(registered_teachers())
        raise SgaError(f"unknown teacher {spec!r}: not a registered name ({names}) and not a local folder; "
                       "pass --teacher tiny or --teacher PATH to a teacher folder (write one with "
                       "`sga teacher train` or `sga teacher convert`)")


def folder_signature(path: Path, suffix: str = "") -> str | None:
    """sha256 over the relative path, size and mtime of every file (ending in ``suffix``); None when the
    folder is missing or holds no such file."""
    if not path.is_dir():
        return None
    entries = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(f for f in files if f.endswith(suffix)):
            full = Path(root) / name
            st = full.stat()
            entries.append([str(full.relative_to(path)), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest() if entries else None


def cache_key(spec: str, device: str, score_floor: float, top_k: int) -> str | None:
    path = teacher_dir(spec)
    signature = folder_signature(path) if path is not None else None
    if signature is None:
        return None
    package = _package_dir()
    ident = {"spec": spec, "dir": str(path), "files": signature, "device": device,
             "code": folder_signature(package, ".py") if package is not None else None,
             "score_floor": score_floor, "top_k": top_k}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def lookup(out: str, key: str | None) -> dict[str, str] | None:
    """``{"name", "fingerprint"}`` recorded under ``key`` in ``OUT/_teachers.json``, or None."""
    if key is None:
        return None
    try:
        entry = fs.read_json(fs.join(out, CACHE_NAME)).get(key)
    except (FileNotFoundError, ValueError, AttributeError):
        return None
    if isinstance(entry, dict) and {"name", "fingerprint"} <= entry.keys():
        return {"name": str(entry["name"]), "fingerprint": str(entry["fingerprint"])}
    return None


def record(out: str, key: str | None, name: str, fingerprint: str) -> None:
    if key is None:
        return
    uri = fs.join(out, CACHE_NAME)
    try:
        table = fs.read_json(uri)
        table = table if isinstance(table, dict) else {}
    except (FileNotFoundError, ValueError):
        table = {}
    table[key] = {"name": name, "fingerprint": fingerprint}
    fs.write_json(uri, table)
