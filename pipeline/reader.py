"""Read one image shard and its region shard in lockstep, one item per image-parquet row.

The image shard drives: every row of ``NNNNN.parquet`` (failed downloads included) yields exactly one
:class:`ShardItem`, so the manifest gets one row per input sample. Region samples are pulled from
``regions/NNNNN.tar`` as far as needed to find each key; in the normal case both shards are in the same order
and nothing is buffered. A damaged shard never ends the job: a duplicate key, a truncated image tar or an
unreadable shard turns the affected samples into ``read`` errors, and a truncated region shard turns the
remaining samples into ``regions`` errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from shards import fs
from shards.errors import SampleError, ShardReadError
from shards.images import ImageSample, iter_image_shard, list_image_keys
from shards.regions import RegionRecord, decode_regions
from shards.tario import iter_tar


@dataclass
class ShardItem:
    """One input sample: its image row, its decoded regions (None if absent) or the reason it failed."""

    key: str
    image: ImageSample | None
    regions: RegionRecord | None
    error: SampleError | None = None


class RegionStream:
    """Region samples of one shard, looked up by key while reading forward.

    ``find(key)`` returns the decoded record, None when the shard has no such key, or raises the
    ``SampleError`` of an undecodable entry. Entries skipped over wait in a buffer until asked for. While the
    shard's keys ascend (img2dataset's always do) a key smaller than the next one unread is known to be
    missing without reading on, so a missing entry never pulls the rest of the shard into memory.
    """

    def __init__(self, uri: str):
        self.uri = uri
        self._it = iter_tar(uri)
        self._peek = None
        self._last_key: str | None = None
        self._ascending = True
        self._buffer: dict = {}
        self.read_error: str | None = None

    def _fill(self) -> bool:
        if self._peek is None and self._it is not None:
            try:
                self._peek = next(self._it)
            except StopIteration:
                self._it = None
            except ShardReadError as exc:
                self.read_error = exc.reason
                self._it = None
            if self._peek is not None:
                if self._last_key is not None and self._peek.key <= self._last_key:
                    self._ascending = False
                self._last_key = self._peek.key
        return self._peek is not None

    def find(self, key: str) -> RegionRecord | None:
        sample = self._buffer.pop(key, None)
        while sample is None:
            if not self._fill() or (self._ascending and self._peek.key > key):
                return None
            nxt, self._peek = self._peek, None
            if nxt.key == key:
                sample = nxt
            else:
                self._buffer.setdefault(nxt.key, nxt)
        return decode_regions(sample)

    def missing_reason(self) -> str:
        if self.read_error:
            return f"no region entry (region shard {fs.basename(self.uri)} is damaged: {self.read_error})"
        return "no region entry for this key in the region shard"


def _remaining_keys(images_uri: str, shard: str) -> list[str] | None:
    """Every key of a damaged image shard (from its parquet, else its tar), or None when unreadable."""
    try:
        return list_image_keys(images_uri, shard)
    except ShardReadError:
        return None


def iter_shard(images_uri: str, regions_uri: str, shard: str) -> Iterator[ShardItem]:
    """Yield one :class:`ShardItem` per input sample of ``shard`` (see the module doc)."""
    regions = RegionStream(fs.join(regions_uri, f"{shard}.tar"))
    seen: set[str] = set()
    try:
        for image in iter_image_shard(images_uri, shard):
            key = image.key
            if key in seen:
                error = SampleError(key, "read", "duplicate key in the image shard")
                yield ShardItem(key, image, None, error)
                continue
            seen.add(key)
            if image.status != "success":
                yield ShardItem(key, image, None)  # rejected by validation; no regions expected
                continue
            try:
                rec = regions.find(key)
            except SampleError as exc:
                yield ShardItem(key, image, None, SampleError(key, "regions", exc.reason))
                continue
            if rec is None:
                yield ShardItem(key, image, None, SampleError(key, "regions", regions.missing_reason()))
                continue
            yield ShardItem(key, image, rec)
    except ShardReadError as exc:
        # Samples after the damage are lost to this run: name each one we can still find in the parquet.
        keys = _remaining_keys(images_uri, shard)
        if keys is None:
            if not seen:
                yield ShardItem(shard, None, None,
                                SampleError(shard, "read", f"unreadable shard, no sample keys: {exc.reason}"))
            return
        for key in keys:
            if key not in seen:
                seen.add(key)
                error = SampleError(key, "read", f"image shard damaged: {exc.reason}")
                yield ShardItem(key, None, None, error)
