"""Region shards: round trips, validation of bad content (never unpickling), the set description."""

import io
import json
import os
import pickle

import numpy as np
import pytest

from shards import fs
from shards.errors import SampleError, SgaError
from shards.regions import (
    RegionRecord,
    RegionShardWriter,
    decode_regions,
    encode_regions,
    iter_region_shard,
    read_regions_info,
    write_regions_info,
)
from shards.tario import TarSample, TarShardWriter, iter_tar


def _record(key="000000000", r=5, d=16, c=4, seed=0):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 100, (r, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 50, (r, 2))], axis=1).astype(np.float32)
    features = rng.normal(size=(r, d)).astype(np.float16)
    cls_prob = None
    if c:
        logits = rng.normal(size=(r, c))
        cls_prob = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float16)
    return RegionRecord(key, boxes, features, cls_prob, 160, 120, {"source_id": "img_1"})


def _npy(arr, allow_pickle=False):
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def test_round_trip_through_a_shard(tmp_path):
    recs = [_record("000000000"), _record("000000001", r=0, seed=1), _record("000000002", c=0, seed=2)]
    with RegionShardWriter(str(tmp_path), "00000") as w:
        for rec in recs:
            w.write(rec)
    assert w.count == 3
    raw = list(iter_tar(fs.join(str(tmp_path), "00000.tar")))
    assert sorted(raw[0].members) == ["boxes.npy", "cls_prob.npy", "features.npy", "json"]
    assert "cls_prob.npy" not in raw[2].members   # no class distribution: the member is omitted
    assert json.loads(raw[0].members["json"]) == {"image_w": 160, "image_h": 120, "num_boxes": 5,
                                                  "source_id": "img_1"}
    got = list(iter_region_shard(str(tmp_path), "00000"))
    for want, have in zip(recs, got, strict=True):
        assert have.key == want.key and (have.image_w, have.image_h) == (160, 120)
        assert have.boxes.dtype == np.float32 and have.features.dtype == np.float16
        np.testing.assert_array_equal(have.boxes, want.boxes)
        np.testing.assert_array_equal(have.features, want.features)
        if want.cls_prob is None:
            assert have.cls_prob is None
        else:
            assert have.cls_prob.dtype == np.float16
            np.testing.assert_array_equal(have.cls_prob, want.cls_prob)
        assert have.meta == {"source_id": "img_1"}
    assert got[1].boxes.shape == (0, 4) and got[1].features.shape == (0, 16)


def _bad(members_update, drop=()):
    members = encode_regions(_record())
    members.update(members_update)
    for name in drop:
        members.pop(name)
    return TarSample("000000000", members)


class _Boom:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


BAD_CONTENT = {
    "float64 boxes": ({"boxes.npy": _npy(np.zeros((5, 4)))}, (), "float32"),
    "boxes not [R, 4]": ({"boxes.npy": _npy(np.zeros((5, 3), np.float32))}, (), "shape"),
    "float32 features": ({"features.npy": _npy(np.zeros((5, 16), np.float32))}, (), "float16"),
    "row mismatch": ({"features.npy": _npy(np.zeros((4, 16), np.float16))}, (), "rows"),
    "nan boxes": ({"boxes.npy": _npy(np.full((5, 4), np.nan, np.float32))}, (), "non-finite"),
    "cls_prob above 1": ({"cls_prob.npy": _npy(np.full((5, 4), 2, np.float16))}, (), "outside"),
    "garbage npy": ({"features.npy": b"\x93NUMPY garbage"}, (), "not a plain"),
    "num_boxes lies": ({"json": b'{"image_w": 160, "image_h": 120, "num_boxes": 7}'}, (), "num_boxes=7"),
    "float image size": ({"json": b'{"image_w": 160.5, "image_h": 120, "num_boxes": 5}'}, (), "image_w"),
    "json not json": ({"json": b"{nope"}, (), "not JSON"),
    "json lacks size": ({"json": b'{"num_boxes": 5}'}, (), "lacks"),
    "missing features": ({}, ("features.npy",), "missing members"),
}


@pytest.mark.parametrize("name", list(BAD_CONTENT))
def test_bad_content_raises_sample_error(name):
    update, drop, message = BAD_CONTENT[name]
    with pytest.raises(SampleError, match=message) as err:
        decode_regions(_bad(update, drop))
    assert err.value.stage == "read_regions" and err.value.key == "000000000"


def test_pickled_arrays_are_rejected_not_loaded(tmp_path):
    marker = str(tmp_path / "UNPICKLED")
    evil = np.array([_Boom(marker)], dtype=object)
    with pytest.raises(SampleError, match=r"not a plain \.npy") as err:
        decode_regions(_bad({"boxes.npy": _npy(evil, allow_pickle=True)}))
    assert "pickle" in err.value.reason
    assert not os.path.exists(marker)
    # A .pyd member beside the arrays is ignored, never unpickled.
    rec = decode_regions(_bad({"pyd": pickle.dumps(_Boom(marker))}))
    assert rec.num_boxes == 5 and not os.path.exists(marker)


def test_repeated_members_are_rejected():
    sample = _bad({})
    sample.problems.append("repeated member 000000000.boxes.npy")
    with pytest.raises(SampleError, match="repeated"):
        decode_regions(sample)


def test_writer_rejects_bad_records_and_iterator_can_skip(tmp_path):
    bad = _record("000000001")
    bad.features = bad.features.astype(np.float32)
    with RegionShardWriter(str(tmp_path), "00000") as w:
        w.write(_record("000000000"))
        with pytest.raises(SampleError) as err:
            w.write(bad)
        assert err.value.stage == "write_regions"
        w.write(_record("000000002"))
    # Corrupt one sample after the fact: the iterator raises, or skips it with on_error.
    uri = fs.join(str(tmp_path), "00001.tar")
    with TarShardWriter(uri) as tw:
        tw.write("000000000", encode_regions(_record("000000000")))
        tw.write("000000001", {**encode_regions(_record("000000001")), "json": b"[]"})
        tw.write("000000002", encode_regions(_record("000000002")))
    with pytest.raises(SampleError):
        list(iter_region_shard(str(tmp_path), "00001"))
    errors = []
    keys = [r.key for r in iter_region_shard(str(tmp_path), "00001", on_error=errors.append)]
    assert keys == ["000000000", "000000002"] and [e.key for e in errors] == ["000000001"]
    assert [r.key for r in iter_region_shard(str(tmp_path), "00000")] == ["000000000", "000000002"]


def test_regions_info_round_trip_and_errors(tmp_path):
    root = str(tmp_path / "regions")
    write_regions_info(root, 2048, 3, ["bg", "dog", "cat"], {"format": "butd-tsv"})
    info = read_regions_info(root)
    assert info == {"feature_dim": 2048, "num_classes": 3, "class_names": ["bg", "dog", "cat"],
                    "source": {"format": "butd-tsv"}, "schema_version": 1}
    with pytest.raises(ValueError):
        write_regions_info(root, 8, 2, ["only one"], "x")
    with pytest.raises(SgaError, match=r"regions\.json is missing"):
        read_regions_info(str(tmp_path / "nowhere"))
    fs.write_json(fs.join(root, "regions.json"), {"feature_dim": 8, "schema_version": 99})
    with pytest.raises(SgaError, match="upgrade"):
        read_regions_info(root)


def test_file_uri(tmp_path):
    root = (tmp_path / "regions").as_uri()
    with RegionShardWriter(root, "00000") as w:
        w.write(_record())
    write_regions_info(root, 16, 4, None, "test")
    (rec,) = iter_region_shard(root, "00000")
    assert rec.num_boxes == 5 and read_regions_info(root)["num_classes"] == 4
