"""shards.fs, shards.tario and shards.boxes: round trips, atomicity under killed writers, damaged tars,
pickle-bearing tars, box geometry on hand-made cases, and pyarrow.fs URIs."""

import io
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest

from shards import boxes as B
from shards import fs
from shards.errors import ShardReadError
from shards.tario import TarShardReader, TarShardWriter, check_key, iter_tar, read_pax_headers


def _write_samples(uri, n, pax=None, size=100):
    with TarShardWriter(uri, pax_headers=pax) as w:
        for i in range(n):
            w.write(f"{i:06d}", {"a.bin": bytes([i % 256]) * size, "txt": f"caption {i}".encode()})


def test_tar_round_trip_is_deterministic_and_keeps_pax(tmp_path):
    one, two = str(tmp_path / "one.tar"), str(tmp_path / "two.tar")
    _write_samples(one, 4, pax={"sga.schema": "1"})
    _write_samples(two, 4, pax={"sga.schema": "1"})
    assert fs.read_bytes(one) == fs.read_bytes(two)
    samples = list(iter_tar(one))
    assert [s.key for s in samples] == [f"{i:06d}" for i in range(4)]
    assert samples[2].members == {"a.bin": b"\x02" * 100, "txt": b"caption 2"}
    assert all(not s.problems for s in samples)
    assert read_pax_headers(one) == {"sga.schema": "1"}
    reader = TarShardReader(one)
    next(iter(reader))
    assert reader.pax_headers == {"sga.schema": "1"}


@pytest.mark.parametrize("compress", [False, True])
def test_writer_bytes_equal_tarfile_s_own(tmp_path, compress):
    """Members with short ASCII names get a hand-built header; it must be tarfile's, byte for byte, and
    names or sizes outside that path must still go through tarfile."""
    import gzip

    members = [("k0", {"labels.json": b"x" * 490}), ("k1", {"a": b"", "b": b"y" * 511, "c": b"z" * 512}),
               ("k2", {"d" * 97: b"w" * 513}),                      # a 100-byte name: the longest plain one
               ("k3", {"e" * 98: b"v"}),                            # 101 bytes: tarfile's PAX path
               ("k4", {"caf\u00e9": b"u" * 7})]                     # non-ASCII: likewise
    pax = {"sga.schema": "1"}
    ours = tmp_path / ("ours.tar.gz" if compress else "ours.tar")
    with TarShardWriter(str(ours), pax_headers=pax, gzip=compress) as w:
        for key, sample in members:
            w.write(key, sample)
    ref = io.BytesIO()
    stream = gzip.GzipFile(filename="", mode="wb", fileobj=ref, mtime=0, compresslevel=6) if compress else ref
    with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT, pax_headers=pax) as tar:
        for key, sample in members:
            for ext in sorted(sample):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(sample[ext]), 0, 0o444
                tar.addfile(info, io.BytesIO(sample[ext]))
    if compress:
        stream.close()
    assert ours.read_bytes() == ref.getvalue()
    assert [(s.key, s.members) for s in iter_tar(str(ours))] == members


def test_tar_is_a_plain_webdataset_shard(tmp_path):
    import webdataset as wds

    uri = str(tmp_path / "00000.tar")
    _write_samples(uri, 3, pax={"sga.labelset": "{}"})
    got = list(wds.WebDataset(uri, shardshuffle=False))
    assert [s["__key__"] for s in got] == ["000000", "000001", "000002"]
    assert got[1]["txt"] == b"caption 1"


def test_repeated_member_is_reported_not_merged(tmp_path):
    uri = tmp_path / "dup.tar"
    with tarfile.open(uri, "w") as tar:
        for data in (b"first", b"second"):
            info = tarfile.TarInfo("k1.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (sample,) = list(iter_tar(str(uri)))
    assert sample.members == {"txt": b"first"}
    assert sample.problems == ["repeated member k1.txt"]


@pytest.mark.parametrize("key", ["a.b", "a/b", "", "ü"])
def test_check_key_rejects_unsafe_keys(key):
    with pytest.raises(Exception, match="invalid sample key"):
        check_key(key)


def test_writer_exception_leaves_nothing(tmp_path):
    uri = str(tmp_path / "00000.tar")
    with pytest.raises(RuntimeError), TarShardWriter(uri) as w:
        w.write("000001", {"txt": b"x"})
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from shards.tario import TarShardWriter
    with TarShardWriter(sys.argv[1]) as w:
        for i in range(10_000):
            w.write(f"{i:06d}", {"bin": bytes(4096)})
            if i == 50:
                print("ready", flush=True)
                time.sleep(120)
""")


def test_sigkilled_writer_leaves_no_visible_file(tmp_path):
    uri = str(tmp_path / "00007.tar")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, uri], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        leftovers = os.listdir(tmp_path)
        assert len(leftovers) == 1 and leftovers[0].startswith("00007.tar" + fs.TMP_MARK)
        assert os.path.getsize(tmp_path / leftovers[0]) > 0  # the writer really was mid-write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not fs.exists(uri)
    assert fs.list_dir(str(tmp_path)) == []
    with pytest.raises(ShardReadError) as err:
        list(iter_tar(uri))
    assert err.value.samples_read == 0
    assert fs.clean_tmp(str(tmp_path)) == 1
    assert os.listdir(tmp_path) == []


def _member_offset(uri, name):
    with tarfile.open(uri) as tar:
        return tar.getmember(name).offset_data


def test_truncated_tar_yields_complete_samples_then_raises(tmp_path):
    uri = str(tmp_path / "00000.tar")
    _write_samples(uri, 6, size=2000)
    cut = _member_offset(uri, "000004.txt") + 3  # inside the second member of sample 4
    with open(uri, "r+b") as f:
        f.truncate(cut)
    got = []
    with pytest.raises(ShardReadError) as err:
        for sample in iter_tar(uri):
            got.append(sample)
    assert [s.key for s in got] == ["000000", "000001", "000002", "000003"]
    assert all(s.members["a.bin"] == bytes([i]) * 2000 for i, s in enumerate(got))
    assert err.value.samples_read == 4
    assert "00000.tar" in str(err.value)


def test_damage_in_first_member_still_yields_previous_sample(tmp_path):
    uri = str(tmp_path / "00000.tar")
    _write_samples(uri, 6, size=2000)
    cut = _member_offset(uri, "000004.a.bin") + 3  # inside the first member of sample 4
    with open(uri, "r+b") as f:
        f.truncate(cut)
    keys = []
    with pytest.raises(ShardReadError) as err:
        for sample in iter_tar(uri):
            keys.append(sample.key)
    assert keys == ["000000", "000001", "000002", "000003"] and err.value.samples_read == 4


# tarfile's stream reader treats a bad or missing header after the first one as the end of the archive;
# TarShardReader must not report such a shard as complete.
@pytest.mark.parametrize("damage", ["cut_at_header", "garbage_header"])
def test_damage_at_a_member_header_is_detected(tmp_path, damage):
    uri = str(tmp_path / "00000.tar")
    _write_samples(uri, 6)
    data = bytearray(fs.read_bytes(uri))
    header = _member_offset(uri, "000003.a.bin") - 512
    if damage == "cut_at_header":
        del data[header:]
    else:
        data[header: header + 512] = b"\x7f" * 512
    fs.write_bytes(uri, bytes(data))
    keys = []
    with pytest.raises(ShardReadError) as err:
        for sample in iter_tar(uri):
            keys.append(sample.key)
    # Sample 000002 may have had more members behind the damaged header, so it is withheld (the caller
    # records it as unread) rather than yielded possibly incomplete.
    assert keys == ["000000", "000001"] and err.value.samples_read == 2


class _Boom:
    """Unpickling this creates a directory: proof that someone unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_pickle_members_are_returned_as_bytes_never_unpickled(tmp_path):
    marker = str(tmp_path / "UNPICKLED")
    payload = pickle.dumps(_Boom(marker))
    uri = str(tmp_path / "evil.tar")
    with TarShardWriter(uri) as w:
        w.write("000000000", {"pyd": payload, "pkl": payload, "txt": b"hello"})
    (sample,) = list(iter_tar(uri))
    assert sample.members["pyd"] == payload and sample.members["pkl"] == payload
    assert not os.path.exists(marker)
    # The same bytes would have run the payload: the test can fail.
    pickle.loads(payload)
    assert os.path.exists(marker)


def test_file_uri_round_trip(tmp_path):
    root = tmp_path.as_uri()                      # file:///...
    assert root.startswith("file://")
    fs.write_json(fs.join(root, "a", "info.json"), {"x": 1})
    assert fs.read_json(fs.join(root, "a", "info.json")) == {"x": 1}
    assert fs.is_dir(fs.join(root, "a")) and fs.list_subdirs(root) == ["a"]
    tar_uri = fs.join(root, "a", "00000.tar")
    _write_samples(tar_uri, 2, pax={"k": "v"})
    assert [s.key for s in iter_tar(tar_uri)] == ["000000", "000001"]
    assert read_pax_headers(tar_uri) == {"k": "v"}
    assert fs.list_dir(fs.join(root, "a"), ".tar") == ["00000.tar"]
    assert (tmp_path / "a" / "00000.tar").stat().st_size > 0
    with pytest.raises(ValueError), fs.atomic_output(fs.join(root, "a", "never.bin")) as f:
        f.write(b"partial")
        raise ValueError("writer failed")
    assert not fs.exists(fs.join(root, "a", "never.bin"))
    assert sorted(os.listdir(tmp_path / "a")) == ["00000.tar", "info.json"]
    fs.remove(tar_uri)
    assert not fs.exists(tar_uri)


def test_missing_directory_lists_empty_and_join_keeps_scheme(tmp_path):
    assert fs.list_dir(str(tmp_path / "nope")) == []
    assert fs.join("s3://bucket/root", "00000.tar") == "s3://bucket/root/00000.tar"
    assert fs.basename("s3://bucket/root/") == "root"


# ---- box geometry -------------------------------------------------------------------------------------

def test_box_iou_hand_made_cases():
    a = np.array([[0, 0, 10, 10]], np.float32)
    cases = {
        (0, 0, 10, 10): 1.0,            # identical
        (5, 0, 15, 10): 50 / 150,       # half overlap
        (2, 2, 4, 4): 4 / 100,          # contained
        (10, 0, 20, 10): 0.0,           # touching edge
        (20, 20, 30, 30): 0.0,          # disjoint
    }
    b = np.array(list(cases), np.float32)
    iou = B.box_iou(a, b)
    assert iou.shape == (1, 5) and iou.dtype == np.float32
    np.testing.assert_allclose(iou[0], list(cases.values()), rtol=1e-6)
    np.testing.assert_allclose(B.box_iou(b, a)[:, 0], list(cases.values()), rtol=1e-6)
    degenerate = np.array([[3, 3, 3, 3]], np.float32)
    assert B.box_iou(degenerate, degenerate)[0, 0] == 0.0
    assert B.box_iou(np.zeros((0, 4)), a).shape == (0, 1)


def test_box_conversions_and_validity():
    xyxy = np.array([[0, 0, 10, 20], [4, 6, 8, 10]], np.float32)
    cxcywh = B.xyxy_to_cxcywh(xyxy)
    np.testing.assert_array_equal(cxcywh, [[5, 10, 10, 20], [6, 8, 4, 4]])
    np.testing.assert_array_equal(B.cxcywh_to_xyxy(cxcywh), xyxy)
    np.testing.assert_array_equal(B.box_area(xyxy), [200, 16])
    norm = np.array([[0.5, 0.25, 1.0, 1.0]], np.float32)
    np.testing.assert_array_equal(B.scale_boxes(norm, 200, 100), [[100, 25, 200, 100]])
    np.testing.assert_array_equal(B.clip_boxes(np.array([[-5, 3, 250, 120]], np.float32), 200, 100),
                                  [[0, 3, 200, 100]])
    boxes = np.array([[0, 0, 10, 10], [5, 5, 5, 9], [0, 0, np.nan, 1], [-3, 0, 5, 5], [0, 0, 200.5, 100]],
                     np.float32)
    assert B.valid_boxes(boxes, 200, 100).tolist() == [True, False, False, False, True]


def test_join_and_basename_keep_uri_query():
    uri = "s3://bucket/labels?endpoint_override=127.0.0.1:9000&scheme=http"
    joined = fs.join(uri, "abc", "00000.tar")
    assert joined == "s3://bucket/labels/abc/00000.tar?endpoint_override=127.0.0.1:9000&scheme=http"
    assert fs.basename(joined) == "00000.tar"
    assert fs.join("/tmp/x", "a") == "/tmp/x/a" and fs.basename("/tmp/x/a/") == "a"
