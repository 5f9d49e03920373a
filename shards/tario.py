"""Webdataset tar shards: an atomic, deterministic writer and a tolerant streaming reader.

A sample is a run of adjacent tar members sharing a key: member ``KEY.EXT`` (the key is the base name up to
its first dot, as webdataset splits it). Members are returned as raw bytes; nothing here decodes or
unpickles anything, so a tar holding ``.pyd``/``.pkl`` members is harmless to read.

Provenance (label set, schema version) travels in the tar's PAX global header, which webdataset and every
tar tool ignore, so shards stay plain webdataset shards. The writer can gzip a shard as it writes it
(``NNNNN.tar.gz``, read by webdataset, ``tar`` and this reader alike); a tar of many small members is mostly
512-byte headers and padding, which compression removes.
"""

from __future__ import annotations

import gzip
import io
import re
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from . import fs, tarparse
from .errors import SgaError, ShardReadError

KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
# A fixed mtime keeps shards byte-identical across runs with the same inputs.
_MTIME = 0


@dataclass
class TarSample:
    """One sample of a shard: ``members`` maps extension (``"jpg"``, ``"boxes.npy"``) to raw bytes.

    ``problems`` lists what was wrong with the sample's members (e.g. a repeated extension), for the reader's
    caller to turn into an error row.
    """

    key: str
    members: dict[str, bytes]
    problems: list[str] = field(default_factory=list)


def split_member_name(name: str) -> tuple[str, str]:
    """``"dir/000001.boxes.npy"`` -> ``("000001", "boxes.npy")``; a name without a dot has no extension."""
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    return key, ext


def check_key(key: str) -> str:
    if not KEY_RE.match(key):
        raise SgaError(f"invalid sample key {key!r}: use letters, digits, '_' and '-' (no dots or slashes)")
    return key


# The constant fields of a plain member's ustar header as tarfile writes it (mode 0444, uid/gid 0, mtime
# _MTIME, a regular file, no owner names): see _plain_header.
_MODE_IDS = b"0000444\0" + b"0000000\0" * 2
_MTIME_FIELD = b"%011o\0" % _MTIME
_TAIL = b"0" + tarfile.NUL * 100 + tarfile.POSIX_MAGIC + tarfile.NUL * (tarfile.BLOCKSIZE - 265)
_CHKSUM_BASE = sum(_MODE_IDS) + sum(_MTIME_FIELD) + sum(b" " * 8) + sum(_TAIL)


def _plain_header(name: str, size: int) -> bytes | None:
    """The 512-byte header ``tarfile`` writes for a member with a short ASCII name (the same bytes, a
    tenth of the cost: its general path was half of a label tar's writing time), or None for names and
    sizes that need tarfile's PAX records."""
    if len(name) > 100 or not name.isascii() or size >= 8 ** 11:
        return None
    encoded = name.encode("ascii")
    size_field = b"%011o\0" % size
    chksum = _CHKSUM_BASE + sum(encoded) + sum(size_field)
    return b"".join((encoded.ljust(100, tarfile.NUL), _MODE_IDS, size_field, _MTIME_FIELD,
                     b"%06o\0 " % chksum, _TAIL))


class TarShardWriter:
    """Write one shard atomically; use as a context manager.

    >>> with TarShardWriter("out/00000.tar", pax_headers={"sga.schema": "1"}) as w:
    ...     w.write("000000000", {"txt": b"a caption"})

    The shard appears under its final name only when the ``with`` block exits without an exception. With
    ``gzip=True`` the tar is compressed as it is written (name it ``.tar.gz``); the gzip header carries no
    name and no time, so the same samples still give the same bytes.
    """

    def __init__(self, uri: str, pax_headers: Mapping[str, str] | None = None, gzip: bool = False):
        self.uri = uri
        self.pax_headers = dict(pax_headers or {})
        self.gzip = gzip
        self.count = 0
        self._ctx = None
        self._gz: gzip.GzipFile | None = None
        self._tar: tarfile.TarFile | None = None

    def __enter__(self) -> TarShardWriter:
        self._ctx = fs.atomic_output(self.uri)
        stream = self._ctx.__enter__()
        if self.gzip:
            # filename="" and mtime=0: nothing run-specific (the temp file's name, the clock) in the header.
            # Level 6 (gzip's own default): 2 % larger than 9 on label tars, at 60 % of its CPU time.
            stream = self._gz = gzip.GzipFile(filename="", mode="wb", fileobj=stream, mtime=0,
                                              compresslevel=6)
        self._tar = tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT,
                                 pax_headers=self.pax_headers)
        return self

    def write(self, key: str, members: Mapping[str, bytes]) -> None:
        """Append one sample; members are written in sorted extension order for reproducibility."""
        assert self._tar is not None, "use TarShardWriter as a context manager"
        check_key(key)
        for ext in sorted(members):
            data = members[ext]
            name = f"{key}.{ext}"
            header = _plain_header(name, len(data))
            if header is None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = _MTIME
                info.mode = 0o444
                self._tar.addfile(info, io.BytesIO(data))
                continue
            padding = -len(data) % tarfile.BLOCKSIZE
            self._tar.fileobj.write(b"".join((header, data, tarfile.NUL * padding)))
            self._tar.offset += len(header) + len(data) + padding     # where tarfile's end blocks align
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self._tar is not None and self._ctx is not None
        try:
            if exc_type is None:
                self._tar.close()
                if self._gz is not None:
                    self._gz.close()
            else:
                # Abandon the archive without writing its end blocks (tarfile's stream would otherwise
                # flush them on garbage collection into a closed file); atomic_output deletes the temp file.
                self._tar.fileobj.closed = True  # type: ignore[union-attr]
                if self._gz is not None:
                    self._gz.fileobj = None  # likewise: no gzip trailer into the closed stream
        finally:
            self._ctx.__exit__(exc_type, exc, tb)
        return False


class TarShardReader:
    """Stream the samples of one shard without decoding them.

    Iterating yields :class:`TarSample` objects in tar order. A truncated or corrupt tar raises
    :class:`ShardReadError` after every complete sample before the damage was yielded (the sample being read
    when the damage was hit is not yielded: it may be incomplete). ``pax_headers`` holds the shard's global
    header once iteration has started.
    """

    def __init__(self, uri: str):
        self.uri = uri
        self.pax_headers: dict[str, str] = {}

    def __iter__(self) -> Iterator[TarSample]:
        count = 0
        try:
            with fs.open_input(self.uri) as raw:
                current: TarSample | None = None
                for name, data in tarparse.iter_members(tarparse.open_stream(raw), self.pax_headers):
                    key, ext = split_member_name(name)
                    if current is None or key != current.key:
                        # A new key proves the previous sample complete, even when this member is damaged.
                        if current is not None:
                            count += 1
                            yield current
                        current = TarSample(key, {})
                    if data is None:
                        continue  # a truncated member: the parser raises next
                    if ext in current.members:
                        current.problems.append(f"repeated member {key}.{ext}")
                        continue
                    current.members[ext] = data
                if current is not None:
                    count += 1
                    yield current
        except FileNotFoundError as exc:
            raise ShardReadError(self.uri, "file not found", count) from exc
        except (tarparse.TarFormatError, EOFError, OSError, ValueError) as exc:
            raise ShardReadError(self.uri, f"unreadable tar after {count} samples: {exc}", count) from exc


def iter_tar(uri: str) -> Iterator[TarSample]:
    """Shorthand for iterating a :class:`TarShardReader`."""
    return iter(TarShardReader(uri))


def read_pax_headers(uri: str) -> dict[str, str]:
    """The PAX global header of a shard (empty for shards written without one)."""
    headers: dict[str, str] = {}
    try:
        with fs.open_input(uri) as raw:
            # The global header precedes the first member: stop as soon as one member is read.
            next(tarparse.iter_members(tarparse.open_stream(raw), headers), None)
    except (tarparse.TarFormatError, EOFError, OSError, ValueError) as exc:
        raise ShardReadError(uri, f"unreadable tar header: {exc}") from exc
    return headers
