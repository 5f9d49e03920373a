"""A lean streaming tar parser: ``(name, bytes)`` for every regular member, and the PAX global header.

Why not ``tarfile``: its stream reader costs tens of microseconds per member (generic ``TarInfo`` objects,
file wrappers), which dominated the student loader, and it treats a damaged header after the first member
as the end of the archive. This parser reads POSIX ustar, PAX (``x``/``g``) and GNU long names (``L``), the
formats tarfile, webdataset and GNU tar write, from gzip/bz2/xz-compressed or plain streams; every header
checksum is verified, and only the zero block a writer puts at the end means "end".
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import zlib
from collections.abc import Iterator
from typing import IO

BLOCK = 512
_CHUNK = 1 << 20
_REGULAR = (b"0", b"\0", b"7")
_COMPRESSED = (
    (b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")),
    (b"BZh", bz2.BZ2File),
    (b"\xfd7zXZ\x00", lzma.LZMAFile),
)


class TarFormatError(ValueError):
    """The stream is not a well-formed tar: damaged header, truncated member, missing end."""


class _Buffered:
    """Exact-size reads over a raw stream, fetched in large chunks (pyarrow streams are unbuffered)."""

    def __init__(self, raw: IO[bytes], head: bytes = b""):
        self.raw = raw
        self.buf = head
        self.pos = 0
        self.offset = 0  # bytes consumed so far, for error messages

    def read(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            parts = [self.buf[self.pos:]]
            have = len(parts[0])
            while have < n:
                chunk = self.raw.read(max(_CHUNK, n - have))
                if not chunk:
                    break
                parts.append(chunk)
                have += len(chunk)
            self.buf, self.pos, end = b"".join(parts), 0, n
        out = self.buf[self.pos:end]
        self.pos = end
        self.offset += len(out)
        return out


def open_stream(raw: IO[bytes]) -> _Buffered:
    """Wrap ``raw``, transparently decompressing gzip, bz2 or xz tars."""
    head = raw.read(BLOCK)
    for magic, opener in _COMPRESSED:
        if head.startswith(magic):
            return _Buffered(opener(_Buffered(raw, head)))  # type: ignore[arg-type]
    return _Buffered(raw, head)


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    return int(text, 8) if text else 0


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    """Parse ``"<len> <key>=<value>\\n"`` records."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        if length <= 0:
            raise TarFormatError("bad PAX record length")
        key, _, value = data[space + 1: pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def byte_sum(data: bytes) -> int:
    """The exact sum of ``data``'s bytes, ~10x faster than ``sum(data)`` on a 512-byte header.

    adler32's low 16 bits are ``(1 + sum of bytes) mod 65521``; over at most 256 bytes that sum is at most
    65,280, so no reduction happens and each 256-byte piece gives its sum exactly.
    """
    if len(data) <= 512:     # a header: two pieces, without the loop's overhead
        return (zlib.adler32(data[:256]) & 0xFFFF) + (zlib.adler32(data[256:]) & 0xFFFF) - 2
    return sum((zlib.adler32(data[i: i + 256]) & 0xFFFF) - 1 for i in range(0, len(data), 256))


def _check(header: bytes, offset: int) -> None:
    stored = _number(header[148:156])
    unsigned = byte_sum(header) - sum(header[148:156]) + 8 * 32
    if stored != unsigned:
        raise TarFormatError(f"damaged header at byte {offset} (checksum mismatch)")


def iter_members(stream: _Buffered, global_headers: dict[str, str]) -> Iterator[tuple[str, bytes | None]]:
    """Yield ``(name, data)`` for every regular member, in order; updates ``global_headers`` in place.

    Raises :class:`TarFormatError` on a damaged header, a truncated member (after yielding its name with
    ``data=None``) or a stream that ends without the end-of-archive block.
    """
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        offset = stream.offset
        header = stream.read(BLOCK)
        if len(header) < BLOCK:
            raise TarFormatError(f"archive ends at byte {offset} without its end-of-archive block")
        if header.count(0) == BLOCK:
            return
        _check(header, offset)
        kind = header[156:157]
        size = int(pax["size"]) if "size" in pax else _number(header[124:136])
        name = pax.get("path") or long_name or _text(header[0:100])
        if not (pax.get("path") or long_name) and header[257:263] == b"ustar\0" and header[345]:
            name = f"{_text(header[345:500])}/{name}"
        data = stream.read(size)
        if len(data) < size:
            if kind in _REGULAR:
                # Name the damaged member first: its key tells the caller the previous sample was whole.
                yield name, None
            raise TarFormatError(f"member {name} at byte {offset} is truncated ({len(data)} of {size} bytes)")
        stream.read(-size % BLOCK)
        if kind == b"x":
            pax = _pax_records(data)
        elif kind == b"g":
            global_headers.update(_pax_records(data))
        elif kind == b"L":
            long_name = _text(data)
        else:
            long_name, pax = None, {}
            if kind in _REGULAR:
                yield name, data
