"""The manifest: one Parquet file per shard with one row per input sample, and a completion marker.

``DIR/NNNNN.parquet`` holds a :class:`ManifestRow` per input sample of shard ``NNNNN``: ``ok`` rows were
written to the shard, ``error`` rows name the stage and reason they were rejected at. ``DIR/NNNNN_stats.json``
is written last, after the shard's tar and parquet, so it marks a finished shard (img2dataset's rule): a
shard without it is redone. :func:`read_manifest` reads every shard's rows as one table with
``pyarrow.dataset``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from . import fs
from .errors import SgaError

MANIFEST_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),        # "ok" | "error"
    pa.field("stage", pa.string()),                         # where an error happened, else null
    pa.field("reason", pa.string()),                        # why, else null
    pa.field("n_phrases", pa.int32()),
    pa.field("n_regions", pa.int32()),
    pa.field("n_positives", pa.int32()),                    # true entries of the alignment matrix
])
OK = "ok"
ERROR = "error"


@dataclass
class ManifestRow:
    """One input sample's outcome; counts are 0 for samples that failed before they were known."""

    key: str
    shard: str
    status: str
    stage: str | None = None
    reason: str | None = None
    n_phrases: int = 0
    n_regions: int = 0
    n_positives: int = 0


def manifest_uri(dir_uri: str, shard: str) -> str:
    return fs.join(dir_uri, f"{shard}.parquet")


def marker_uri(dir_uri: str, shard: str) -> str:
    return fs.join(dir_uri, f"{shard}_stats.json")


def write_manifest(dir_uri: str, shard: str, rows: list[ManifestRow]) -> None:
    """Write ``DIR/NNNNN.parquet`` atomically (rows in the given order)."""
    bad = [r.key for r in rows if r.status not in (OK, ERROR)]
    if bad:
        raise ValueError(f"manifest status must be {OK!r} or {ERROR!r} (keys {bad[:5]})")
    table = pa.Table.from_pylist([asdict(r) for r in rows], schema=MANIFEST_SCHEMA)
    with fs.atomic_output(manifest_uri(dir_uri, shard)) as f:
        pq.write_table(table, f)


def write_marker(dir_uri: str, shard: str, stats: dict[str, Any]) -> None:
    """Write ``DIR/NNNNN_stats.json`` atomically. Call it last, once the shard's other files are in place."""
    fs.write_json(marker_uri(dir_uri, shard), stats)


def read_marker(dir_uri: str, shard: str) -> dict[str, Any] | None:
    """The shard's stats, or ``None`` when the shard is not finished (no marker, or an unreadable one)."""
    try:
        stats = fs.read_json(marker_uri(dir_uri, shard))
    except (FileNotFoundError, ValueError):
        return None
    return stats if isinstance(stats, dict) else None


def read_manifest(dir_uri: str) -> pa.Table:
    """Every ``DIR/*.parquet`` as one table with :data:`MANIFEST_SCHEMA` (empty when there are none)."""
    names = fs.list_dir(dir_uri, ".parquet")
    if not names:
        return MANIFEST_SCHEMA.empty_table()
    filesystem, path = fs.resolve(dir_uri)
    files = [f"{path.rstrip('/')}/{name}" for name in names]
    try:
        return pads.dataset(files, schema=MANIFEST_SCHEMA, format="parquet", filesystem=filesystem).to_table()
    except (pa.ArrowException, OSError) as exc:
        raise SgaError(f"cannot read the manifest under {dir_uri}: {exc}; delete the damaged NNNNN.parquet "
                       "and its NNNNN_stats.json, then rerun to redo that shard") from exc
