"""Image shards: our writer against img2dataset's layout, and the reader on img2dataset-style output written
by webdataset's own TarWriter (failed rows, missing images, empty captions, no parquet, damaged tars)."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from shards import fs
from shards.errors import ShardReadError
from shards.images import ImageShardWriter, iter_image_shard, list_image_keys, list_shards, read_image_rows
from shards.tario import iter_tar

IMG2DATASET_COLUMNS = ["url", "caption", "key", "status", "error_message", "width", "height",
                       "original_width", "original_height", "exif", "sha256"]


def _jpeg(colour, size=(24, 16)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def _img2dataset_shard(root, shard, rows, images, drop_from_tar=(), write_parquet=True):
    """Write a shard the way img2dataset does: webdataset's TarWriter for successes (jpg, txt, json with
    indent=4) in row order, a parquet of every row, and NNNNN_stats.json."""
    os.makedirs(root, exist_ok=True)
    with wds.TarWriter(os.path.join(root, f"{shard}.tar")) as tar:
        for row in rows:
            if row["status"] == "success" and row["key"] not in drop_from_tar:
                tar.write({"__key__": row["key"], "jpg": images[row["key"]], "txt": row["caption"] or "",
                           "json": json.dumps(row, indent=4)})
    if write_parquet:
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(root, f"{shard}.parquet"))
    with open(os.path.join(root, f"{shard}_stats.json"), "w") as f:
        json.dump({"count": len(rows), "successes": sum(r["status"] == "success" for r in rows)}, f)


def _row(key, status="success", caption="a photo", error=None, size=(24, 16)):
    ok = status == "success"
    return {"url": f"https://example.com/{key}.jpg", "caption": caption, "key": key, "status": status,
            "error_message": error, "width": size[0] if ok else None, "height": size[1] if ok else None,
            "original_width": 48 if ok else None, "original_height": 32 if ok else None, "exif": None,
            "sha256": None}


def test_writer_matches_img2dataset_layout_and_round_trips(tmp_path):
    root = str(tmp_path / "images")
    jpg = _jpeg("red")
    with ImageShardWriter(root, "00003") as w:
        w.write("000030000", "a red square", jpg, {"url": "https://x/a.jpg", "width": 24, "height": 16})
        w.write("000030001", "a dog", None, {"url": "https://x/b.jpg"}, status="failed_to_download",
                error_message="HTTP Error 404")
        w.write("000030002", "", jpg, {"url": "https://x/c.jpg", "width": 24, "height": 16, "licence": "cc"})
        w.write("000030003", "x", None, {"url": "https://x/d.jpg"}, status="failed_to_resize",
                error_message="image too small")
    assert sorted(os.listdir(root)) == ["00003.parquet", "00003.tar", "00003_stats.json"]
    assert list_shards(root) == ["00003"]
    # The tar holds only successes, each with jpg, txt and json.
    tar = list(iter_tar(fs.join(root, "00003.tar")))
    assert [(s.key, sorted(s.members)) for s in tar] == [
        ("000030000", ["jpg", "json", "txt"]), ("000030002", ["jpg", "json", "txt"])]
    assert json.loads(tar[0].members["json"])["caption"] == "a red square"
    # The parquet holds every row with img2dataset's columns (extra columns after url, caption).
    table = pq.read_table(fs.join(root, "00003.parquet"))
    assert table.column_names == ["url", "caption", "licence", *IMG2DATASET_COLUMNS[2:]]
    assert table.schema.field("width").type == pa.int32()
    assert table.column("status").to_pylist() == ["success", "failed_to_download", "success",
                                                  "failed_to_resize"]
    stats = fs.read_json(fs.join(root, "00003_stats.json"))
    assert (stats["count"], stats["successes"], stats["failed_to_download"], stats["failed_to_resize"]) == \
        (4, 2, 1, 1)
    assert stats["status_dict"] == {"success": 2, "HTTP Error 404": 1, "image too small": 1}
    assert stats["end_time"] >= stats["start_time"]

    samples = list(iter_image_shard(root, "00003"))
    assert [s.key for s in samples] == ["000030000", "000030001", "000030002", "000030003"]
    assert [s.status for s in samples] == ["success", "failed_to_download", "success", "failed_to_resize"]
    assert samples[0].jpg == jpg and samples[0].caption == "a red square"
    assert samples[1].jpg is None and samples[1].caption == "a dog"
    assert samples[1].error_message == "HTTP Error 404"
    assert samples[2].caption == "" and samples[2].meta["licence"] == "cc"
    assert samples[0].meta["width"] == 24 and len(samples[0].meta["sha256"]) == 64


def test_writer_rejects_inconsistent_rows(tmp_path):
    with ImageShardWriter(str(tmp_path), "00000") as w:
        with pytest.raises(ValueError):
            w.write("000000000", "c", None)                       # success without an image
        with pytest.raises(ValueError):
            w.write("000000001", "c", b"x", status="failed_to_download")
        with pytest.raises(Exception, match="invalid sample key"):
            w.write("bad.key", "c", b"x")
    assert [s.key for s in iter_image_shard(str(tmp_path), "00000")] == []


def test_writer_exception_makes_nothing_visible(tmp_path):
    with pytest.raises(RuntimeError), ImageShardWriter(str(tmp_path), "00000") as w:
        w.write("000000000", "c", b"jpg")
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from shards.images import ImageShardWriter
    with ImageShardWriter(sys.argv[1], "00000") as w:
        for i in range(10_000):
            w.write(f"{i:09d}", "a caption", bytes(4096))
            if i == 50:
                print("ready", flush=True)
                time.sleep(120)
""")


def test_killed_writer_leaves_no_shard(tmp_path):
    root = str(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, root], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert list_shards(root) == [] and fs.list_dir(root) == []
    assert fs.clean_tmp(root) == 1 and os.listdir(tmp_path) == []


def test_reads_img2dataset_output_as_is(tmp_path):
    root = str(tmp_path / "cc3m")
    rows = [_row("000000000", caption="a red car"),
            _row("000000001", "failed_to_download", error="<urlopen error timed out>"),
            _row("000000002", caption=""),                          # empty caption
            _row("000000003", caption="lost image"),                # success but absent from the tar
            _row("000000004", "failed_to_resize", error="image decoding error"),
            _row("000000005", caption="last one")]
    images = {r["key"]: _jpeg((i * 40, 0, 0)) for i, r in enumerate(rows)}
    _img2dataset_shard(root, "00000", rows, images, drop_from_tar={"000000003"})
    samples = list(iter_image_shard(root, "00000"))
    assert [s.key for s in samples] == [r["key"] for r in rows]
    assert [s.status for s in samples] == [r["status"] for r in rows]
    assert [s.jpg is not None for s in samples] == [True, False, True, False, False, True]
    assert samples[0].jpg == images["000000000"] and samples[5].jpg == images["000000005"]
    assert [s.caption for s in samples] == ["a red car", "a photo", "", "lost image", "a photo", "last one"]
    assert samples[1].error_message == "<urlopen error timed out>"
    assert samples[4].meta["url"] == "https://example.com/000000004.jpg"
    assert samples[5].meta["original_width"] == 48
    assert list_image_keys(root, "00000") == [r["key"] for r in rows]


def test_reads_a_shard_without_parquet_from_the_tar(tmp_path):
    root = str(tmp_path)
    rows = [_row("000000000", caption="one"), _row("000000001", "failed_to_download", error="404"),
            _row("000000002", caption="")]
    images = {r["key"]: _jpeg("blue") for r in rows}
    _img2dataset_shard(root, "00000", rows, images, write_parquet=False)
    assert read_image_rows(root, "00000") is None
    samples = list(iter_image_shard(root, "00000"))
    assert [(s.key, s.status, s.caption) for s in samples] == [("000000000", "success", "one"),
                                                               ("000000002", "success", "")]
    assert samples[0].meta["width"] == 24 and samples[0].jpg == images["000000000"]
    assert list_image_keys(root, "00000") == ["000000000", "000000002"]


def test_tar_samples_missing_from_the_parquet_are_reported_last(tmp_path):
    root = str(tmp_path)
    rows = [_row("000000000"), _row("000000001"), _row("000000002")]
    images = {r["key"]: _jpeg("green") for r in rows}
    _img2dataset_shard(root, "00000", rows, images)
    pq.write_table(pa.Table.from_pylist([rows[0], rows[2]]), os.path.join(root, "00000.parquet"))
    samples = list(iter_image_shard(root, "00000"))
    assert [s.key for s in samples] == ["000000000", "000000002", "000000001"]
    assert all(s.jpg is not None for s in samples) and samples[2].meta["key"] == "000000001"


def test_truncated_tar_yields_rows_then_raises_with_count(tmp_path):
    root = str(tmp_path)
    rows = [_row(f"{i:09d}") for i in range(6)]
    images = {r["key"]: bytes([i]) * 3000 for i, r in enumerate(rows)}
    _img2dataset_shard(root, "00000", rows, images)
    tar_path = os.path.join(root, "00000.tar")
    with tarfile.open(tar_path) as tar:
        cut = tar.getmember("000000003.json").offset_data + 10   # inside the last member of row 3
    with open(tar_path, "r+b") as f:
        f.truncate(cut)
    got = []
    with pytest.raises(ShardReadError) as err:
        for sample in iter_image_shard(root, "00000"):
            got.append(sample)
    assert [s.key for s in got] == [r["key"] for r in rows[:3]] and err.value.samples_read == 3
    assert all(s.jpg == images[s.key] for s in got)
    assert list_image_keys(root, "00000")[len(got):] == [r["key"] for r in rows[len(got):]]


def test_missing_tar_and_bad_parquet_raise_shard_read_error(tmp_path):
    root = str(tmp_path)
    with pytest.raises(ShardReadError):
        list(iter_image_shard(root, "00000"))
    _img2dataset_shard(root, "00001", [_row("000010000")], {"000010000": b"x"})
    with open(os.path.join(root, "00001.parquet"), "wb") as f:
        f.write(b"not parquet")
    with pytest.raises(ShardReadError, match="parquet"):
        list(iter_image_shard(root, "00001"))


def test_list_shards_ignores_temp_files_and_other_files(tmp_path):
    for name in ("00001.tar", "00000.tar", "00002.tar.tmp-abc123", "00000.parquet", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert list_shards(str(tmp_path)) == ["00000", "00001"]
    assert list_shards(str(tmp_path / "missing")) == []


def test_file_uri(tmp_path):
    root = (tmp_path / "images").as_uri()
    with ImageShardWriter(root, "00000") as w:
        w.write("000000000", "uri caption", b"jpg-bytes", {"width": 2, "height": 2})
    assert list_shards(root) == ["00000"]
    (sample,) = iter_image_shard(root, "00000")
    assert (sample.caption, sample.jpg) == ("uri caption", b"jpg-bytes")
    assert os.path.exists(tmp_path / "images" / "00000_stats.json")
