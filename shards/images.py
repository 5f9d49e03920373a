"""Image shards in img2dataset's webdataset layout: write them like img2dataset, read real img2dataset output.

One shard ``NNNNN`` of a root is three files (``shards/FORMAT.md`` has the details):

- ``NNNNN.tar``: successes only, members ``KEY.jpg`` (image bytes), ``KEY.txt`` (caption, UTF-8) and
  ``KEY.json`` (the row's metadata);
- ``NNNNN.parquet``: every row of the shard, failed ones included, with img2dataset's columns
  (``url, caption, key, status, error_message, width, height, original_width, original_height, exif,
  sha256`` plus any extra columns);
- ``NNNNN_stats.json``: img2dataset's per-shard statistics, written last.

The reader reports what it finds and does not judge it: failed rows, images missing from the tar, empty
captions and shards without a parquet file all come back as :class:`ImageSample` objects.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import fs
from .errors import ShardReadError
from .tario import TarSample, TarShardWriter, check_key, iter_tar

SUCCESS = "success"
# img2dataset's output columns after the input columns (url, caption, save_additional_columns).
_TYPED_COLUMNS: dict[str, pa.DataType] = {
    "url": pa.string(),
    "caption": pa.string(),
    "key": pa.string(),
    "status": pa.string(),
    "error_message": pa.string(),
    "width": pa.int32(),
    "height": pa.int32(),
    "original_width": pa.int32(),
    "original_height": pa.int32(),
    "exif": pa.string(),
    "sha256": pa.string(),
}
_LEADING = ("url", "caption")
_TRAILING = tuple(c for c in _TYPED_COLUMNS if c not in _LEADING)
# img2dataset's ``encode_format`` may be any of these; the contract calls the image member ``jpg``.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class ImageSample:
    """One row of an image shard (every parquet row, in parquet order).

    ``jpg`` holds the encoded image bytes, or ``None`` when the row failed or the tar lacks its image.
    ``caption`` is the ``KEY.txt`` text for rows in the tar, else the parquet's ``caption`` (may be ``""``
    or ``None``). ``meta`` is the parquet row updated with the sample's ``KEY.json``.
    """

    key: str
    status: str
    caption: str | None
    jpg: bytes | None
    meta: dict
    error_message: str | None


def shard_uris(root_uri: str, shard: str) -> dict[str, str]:
    """``{"tar", "parquet", "stats"}`` -> the URIs of one shard's three files."""
    return {"tar": fs.join(root_uri, f"{shard}.tar"), "parquet": fs.join(root_uri, f"{shard}.parquet"),
            "stats": fs.join(root_uri, f"{shard}_stats.json")}


def list_shards(root_uri: str) -> list[str]:
    """Shard names (``["00000", "00001", ...]``) of the ``*.tar`` files directly under ``root_uri``."""
    return [name[: -len(".tar")] for name in fs.list_dir(root_uri, ".tar")]


class ImageShardWriter:
    """Write one image shard like img2dataset; use as a context manager.

    >>> with ImageShardWriter("world/images", "00000") as w:
    ...     w.write("000000000", "a red ball", jpg_bytes, {"url": "...", "width": 64, "height": 48})
    ...     w.write("000000001", "a dog", None, status="failed_to_download", error_message="HTTP 404")

    On a clean exit the parquet is written, then the tar is moved into place, then ``NNNNN_stats.json``
    (the completion marker). On an exception nothing becomes visible.
    """

    def __init__(self, root_uri: str, shard: str):
        self.root_uri = root_uri
        self.shard = shard
        self.uris = shard_uris(root_uri, shard)
        self.rows: list[dict[str, Any]] = []
        self._tar = TarShardWriter(self.uris["tar"])
        self._start = time.time()

    def __enter__(self) -> ImageShardWriter:
        self._start = time.time()
        self._tar.__enter__()
        return self

    def write(self, key: str, caption: str | None, jpg: bytes | None, meta: dict | None = None,
              status: str = SUCCESS, error_message: str | None = None) -> None:
        """Add one row; a success goes to the tar and the parquet, any other status to the parquet only.

        ``meta`` adds columns (``url``, ``width``, ``height``, ...); ``key``, ``caption``, ``status`` and
        ``error_message`` come from the arguments, and ``sha256`` of ``jpg`` is added as img2dataset does.
        """
        check_key(key)
        if (status == SUCCESS) != (jpg is not None):
            raise ValueError(f"{key}: status {status!r} needs jpg {'bytes' if status == SUCCESS else 'None'}")
        row: dict[str, Any] = {"url": None, "caption": caption}
        row.update(meta or {})
        row.update(key=key, status=status, error_message=error_message)
        if jpg is not None:
            row.setdefault("sha256", hashlib.sha256(jpg).hexdigest())
            self._tar.write(key, {"jpg": jpg, "txt": (caption or "").encode(),
                                  "json": json.dumps(row, indent=4).encode()})
        self.rows.append(row)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                with fs.atomic_output(self.uris["parquet"]) as f:
                    pq.write_table(_rows_to_table(self.rows), f)
            except BaseException as err:
                self._tar.__exit__(type(err), err, err.__traceback__)
                raise
        self._tar.__exit__(exc_type, exc, tb)
        if exc_type is None:
            fs.write_json(self.uris["stats"], _stats(self.rows, self._start, time.time()))
        return False


def _rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows -> a table with img2dataset's column order and types; extra columns keep inferred types."""
    names = list(_LEADING)
    for row in rows:
        names.extend(n for n in row if n not in names and n not in _TRAILING)
    names.extend(_TRAILING)
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        columns[name] = pa.array(values, type=_TYPED_COLUMNS.get(name))
    return pa.table(columns)


def _stats(rows: list[dict[str, Any]], start: float, end: float) -> dict[str, Any]:
    """img2dataset's ``NNNNN_stats.json``: counts per status, and ``status_dict`` counting successes
    and each distinct error message."""
    counts: dict[str, int] = {}
    status_dict: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
        label = SUCCESS if row["status"] == SUCCESS else str(row.get("error_message") or row["status"])
        status_dict[label] = status_dict.get(label, 0) + 1
    return {"count": len(rows), "successes": counts.get(SUCCESS, 0),
            "failed_to_download": counts.get("failed_to_download", 0),
            "failed_to_resize": counts.get("failed_to_resize", 0),
            "duration": end - start, "start_time": start, "end_time": end, "status_dict": status_dict}


def read_image_rows(root_uri: str, shard: str) -> list[dict[str, Any]] | None:
    """The shard's parquet rows (every row, images excluded), or ``None`` when it has no parquet file."""
    uri = shard_uris(root_uri, shard)["parquet"]
    if not fs.exists(uri):
        return None
    filesystem, path = fs.resolve(uri)
    try:
        schema = pq.read_schema(path, filesystem=filesystem)
        # img2dataset's parquet output format also stores the image column; the metadata never needs it.
        columns = [n for n in schema.names if n not in IMAGE_EXTS]
        return pq.read_table(path, columns=columns, filesystem=filesystem).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise ShardReadError(uri, f"unreadable parquet: {exc}") from exc


def list_image_keys(root_uri: str, shard: str) -> list[str]:
    """Every key of a shard in order: the parquet's rows, or the tar's samples when there is no parquet."""
    rows = read_image_rows(root_uri, shard)
    if rows is not None:
        return [str(r["key"]) for r in rows]
    return [s.key for s in iter_tar(shard_uris(root_uri, shard)["tar"])]


def _sample(tar_sample: TarSample | None, row: dict[str, Any] | None) -> ImageSample:
    """Combine a tar sample and its parquet row (either may be missing) into an :class:`ImageSample`."""
    meta = dict(row or {})
    members = tar_sample.members if tar_sample is not None else {}
    try:
        sample_json = json.loads(members["json"]) if "json" in members else None
    except (ValueError, UnicodeDecodeError):
        sample_json = None
    if isinstance(sample_json, dict):
        meta.update(sample_json)
    jpg = next((members[ext] for ext in IMAGE_EXTS if ext in members), None)
    caption = members["txt"].decode("utf-8", errors="replace") if "txt" in members else meta.get("caption")
    key = tar_sample.key if tar_sample is not None else str(meta["key"])
    default_status = SUCCESS if tar_sample is not None else "unknown"
    return ImageSample(key=key, status=str(meta.get("status") or default_status), caption=caption,
                       jpg=jpg, meta=meta, error_message=meta.get("error_message"))


def iter_image_shard(root_uri: str, shard: str) -> Iterator[ImageSample]:
    """Yield every row of one image shard.

    With a parquet file: one sample per parquet row in parquet order, each success joined with its tar
    sample by key (``jpg=None`` when the tar lacks it); tar samples absent from the parquet follow at the
    end. Without one: the tar's samples in tar order, metadata from ``KEY.json``.

    Raises :class:`ShardReadError` (``samples_read`` = samples yielded) when the tar is missing, truncated or
    corrupt, after yielding every row before the damage; :func:`list_image_keys` gives the keys not reached.
    """
    uris = shard_uris(root_uri, shard)
    rows = read_image_rows(root_uri, shard)
    yielded = 0
    try:
        if rows is None:
            for tar_sample in iter_tar(uris["tar"]):
                yield _sample(tar_sample, None)
                yielded += 1
            return
        for sample in _join(rows, iter_tar(uris["tar"])):
            yield sample
            yielded += 1
    except ShardReadError as exc:
        raise ShardReadError(exc.uri, exc.reason, yielded) from exc


def _join(rows: list[dict[str, Any]], tar: Iterator[TarSample]) -> Iterator[ImageSample]:
    """Join parquet rows with tar samples by key.

    img2dataset writes the tar and the parquet in the same order, so the tar is a subsequence of the rows
    and a one-sample look-ahead suffices.
    """
    position = {str(row["key"]): i for i, row in enumerate(rows)}
    pending: dict[str, TarSample] = {}
    exhausted = False
    for i, row in enumerate(rows):
        key = str(row["key"])
        while key not in pending and not exhausted:
            nxt = next(tar, None)
            if nxt is None:
                exhausted = True
                break
            pending[nxt.key] = nxt
            if position.get(nxt.key, -1) > i:
                break  # the tar has moved past this row: its image is missing
        yield _sample(pending.pop(key, None), row)
    # Samples the parquet lacks, then any that came after their row had passed (only in tars not written
    # in parquet order; that row was already reported without its image).
    for tar_sample in itertools.chain(list(pending.values()), tar):
        known = position.get(tar_sample.key)
        yield _sample(tar_sample, rows[known] if known is not None else None)
