"""The manifest: per-shard Parquet read back as one table, the completion marker, atomicity."""

import os
import signal
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from shards import fs
from shards.errors import SgaError
from shards.manifest import (
    MANIFEST_SCHEMA,
    ManifestRow,
    read_manifest,
    read_marker,
    write_manifest,
    write_marker,
)


def _rows(shard, n, errors=()):
    rows = []
    for i in range(n):
        key = f"{shard}{i:04d}"
        if i in errors:
            rows.append(ManifestRow(key, shard, "error", "ground", f"teacher failed on {key}"))
        else:
            rows.append(ManifestRow(key, shard, "ok", n_phrases=i % 3, n_regions=36, n_positives=i))
    return rows


def test_schema_is_the_contract():
    assert MANIFEST_SCHEMA.names == ["key", "shard", "status", "stage", "reason", "n_phrases", "n_regions",
                                     "n_positives"]
    assert [MANIFEST_SCHEMA.field(n).type for n in ("n_phrases", "n_regions", "n_positives")] == \
        [pa.int32()] * 3
    assert all(MANIFEST_SCHEMA.field(n).type == pa.string() for n in ("key", "shard", "status", "stage"))


def test_shards_read_back_as_one_table(tmp_path):
    root = str(tmp_path)
    write_manifest(root, "00001", _rows("00001", 3, errors={1}))
    write_manifest(root, "00000", _rows("00000", 4))
    write_manifest(root, "00002", [])                      # a shard whose inputs were all empty
    assert pq.read_table(fs.join(root, "00001.parquet")).schema.equals(MANIFEST_SCHEMA)
    table = read_manifest(root)
    assert table.schema.equals(MANIFEST_SCHEMA) and table.num_rows == 7
    by_key = {r["key"]: r for r in table.to_pylist()}
    assert by_key["000010001"] == {"key": "000010001", "shard": "00001", "status": "error", "stage": "ground",
                                   "reason": "teacher failed on 000010001", "n_phrases": 0, "n_regions": 0,
                                   "n_positives": 0}
    assert by_key["000000003"]["n_positives"] == 3 and by_key["000000003"]["status"] == "ok"
    errors = table.filter(pc.equal(table["status"], "error"))
    assert errors.column("key").to_pylist() == ["000010001"]


def test_empty_or_missing_directory_reads_as_empty_table(tmp_path):
    assert read_manifest(str(tmp_path)).num_rows == 0
    assert read_manifest(str(tmp_path / "nope")).schema.equals(MANIFEST_SCHEMA)


def test_bad_status_is_refused():
    with pytest.raises(ValueError, match="status"):
        write_manifest("unused", "00000", [ManifestRow("k", "00000", "done")])


def test_marker_semantics(tmp_path):
    root = str(tmp_path)
    assert read_marker(root, "00000") is None
    write_manifest(root, "00000", _rows("00000", 2))
    assert read_marker(root, "00000") is None              # manifest alone: shard not finished
    write_marker(root, "00000", {"count": 2, "ok": 2, "errors": 0})
    assert read_marker(root, "00000") == {"count": 2, "ok": 2, "errors": 0}
    (tmp_path / "00001_stats.json").write_text("{truncated")
    assert read_marker(root, "00001") is None              # unreadable marker: redo the shard
    assert sorted(os.listdir(tmp_path)) == ["00000.parquet", "00000_stats.json", "00001_stats.json"]


KILLED = textwrap.dedent("""
    import sys, time
    from shards import fs
    with fs.atomic_output(fs.join(sys.argv[1], "00003.parquet")) as f:
        f.write(b"PAR1" + bytes(100_000))
        f.flush()
        print("ready", flush=True)
        time.sleep(120)
""")


def test_killed_manifest_writer_leaves_nothing_readable(tmp_path):
    root = str(tmp_path)
    write_manifest(root, "00000", _rows("00000", 2))
    proc = subprocess.Popen([sys.executable, "-c", KILLED, root], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert any(fs.TMP_MARK in n for n in os.listdir(tmp_path))     # the partial file exists...
    assert read_manifest(root).num_rows == 2                        # ...but is never read
    assert read_marker(root, "00003") is None


def test_damaged_manifest_names_the_fix(tmp_path):
    (tmp_path / "00000.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SgaError, match=r"_stats\.json"):
        read_manifest(str(tmp_path))


def test_file_uri(tmp_path):
    root = tmp_path.as_uri()
    write_manifest(root, "00000", _rows("00000", 3, errors={0}))
    write_marker(root, "00000", {"count": 3})
    assert read_manifest(root).num_rows == 3 and read_marker(root, "00000") == {"count": 3}
