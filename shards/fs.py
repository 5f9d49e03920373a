"""Paths that may be local or any ``pyarrow.fs`` URI (``s3://``, ``gs://``, ``hdfs://``, ``file://``).

Every write in sga goes through :func:`atomic_output`: bytes land under a temporary name beside the target
and are moved into place only when the writer closed cleanly, so a reader never sees a partial file. On a
local disk the move is a ``rename`` (atomic); on object stores an object only becomes visible once its
upload completes, and the move copies a finished object, so a reader still never sees a partial one.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from typing import IO, Any

import pyarrow.fs as pafs

from .errors import SgaError

TMP_MARK = ".tmp-"


def _has_scheme(uri: str) -> bool:
    return "://" in uri


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a local path or a URI understood by ``pyarrow.fs``."""
    if not _has_scheme(uri):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pafs.ArrowInvalid, OSError, ValueError) as exc:
        raise SgaError(f"cannot open {uri!r}: {exc}. Use a local path or a URI pyarrow.fs supports.") from exc


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a path or URI, keeping its scheme and query (``s3://b/p?region=x``)."""
    if _has_scheme(uri):
        base, sep, query = uri.partition("?")
        return posixpath.join(base, *parts) + sep + query
    return os.path.join(uri, *parts)


def basename(uri: str) -> str:
    if _has_scheme(uri):
        return posixpath.basename(uri.partition("?")[0].rstrip("/"))
    return os.path.basename(uri.rstrip(os.sep))


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def list_dir(uri: str, suffix: str = "") -> list[str]:
    """Sorted base names of the files directly under ``uri`` ending in ``suffix``.

    Temporary files of unfinished writes are never listed. A missing directory lists as empty.
    """
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    names = (posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File)
    return sorted(n for n in names if n.endswith(suffix) and TMP_MARK not in n)


def list_subdirs(uri: str) -> list[str]:
    """Sorted base names of the directories directly under ``uri``."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)


@contextlib.contextmanager
def open_input(uri: str) -> Iterator[IO[bytes]]:
    """A readable binary stream of the bytes as stored. Raises ``FileNotFoundError`` naming the URI when it
    is missing.

    ``compression=None``: pyarrow would otherwise decompress by file extension (``.gz``); readers that
    accept compressed data (the tar parser) detect it from the content instead.
    """
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise FileNotFoundError(uri)
    with fs.open_input_stream(path, compression=None) as stream:
        yield stream


def read_bytes(uri: str) -> bytes:
    with open_input(uri) as f:
        return f.read()


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


@contextlib.contextmanager
def atomic_output(uri: str) -> Iterator[IO[bytes]]:
    """Write ``uri`` atomically: a temporary sibling is moved into place only on a clean exit.

    On any exception the temporary file is deleted and the target is left as it was.
    """
    fs, path = resolve(uri)
    parent = posixpath.dirname(path) if _has_scheme(uri) else os.path.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex[:12]}"
    try:
        with fs.open_output_stream(tmp, compression=None) as stream:  # bytes as given, whatever the name
            yield stream
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError, FileNotFoundError):
            fs.delete_file(tmp)
        raise


def write_bytes(uri: str, data: bytes) -> None:
    with atomic_output(uri) as f:
        f.write(data)


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=1, sort_keys=True).encode())


def remove(uri: str) -> None:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def clean_tmp(uri: str) -> int:
    """Delete temporary files left under ``uri`` by writers that were killed. Returns how many."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return 0
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    stale = [i.path for i in infos if i.type == pafs.FileType.File and TMP_MARK in posixpath.basename(i.path)]
    for p in stale:
        with contextlib.suppress(FileNotFoundError, OSError):
            fs.delete_file(p)
    return len(stale)
