"""`sga regions import` on small fixture files: bottom-up-attention and LXMERT TSVs, per-image .npz."""

import base64
import json
import os
import random

import numpy as np
import pytest
from pipeline_fixtures import truncate, write_good_shard

from shards import fs
from shards.errors import JobFailed, SgaError, ShardReadError
from shards.images import ImageShardWriter
from shards.importers import ImportConfig, import_regions
from shards.regions import iter_region_shard, read_regions_info
from shards.tario import iter_tar

D = 12


def _images(root, shards=2, per_shard=4, size=(200, 100), urls=None):
    """Image shards with ``per_shard`` successes and one failed row each; keys are img2dataset's."""
    for s in range(shards):
        with ImageShardWriter(root, f"{s:05d}") as w:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                url = (urls or {}).get(key, f"https://example.com/photos/{key}_x.jpg?size=large")
                w.write(key, f"caption {key}", b"jpeg", {"url": url, "width": size[0], "height": size[1]})
            w.write(f"{s:05d}0099", "failed", None, {"url": "https://x/y.jpg"}, status="failed_to_download",
                    error_message="404")


def _regions(seed, n=3, w=400, h=200, d=D):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, [w / 2, h / 2], (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, [w / 2, h / 2], (n, 2))], 1).astype(np.float32)
    return boxes, rng.normal(size=(n, d)).astype(np.float32)


def _b64(arr):
    return base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode()


def _butd_line(image_id, boxes, feats, w=400, h=200):
    return "\t".join([image_id, str(w), str(h), str(len(boxes)), _b64(boxes), _b64(feats)]) + "\n"


def _lxmert_line(image_id, boxes, feats, w, h, py3_bytes=False):
    n = len(boxes)
    arrays = [np.arange(n, dtype=np.int64), np.full(n, 0.9, np.float32), np.arange(n, dtype=np.int64),
              np.full(n, 0.5, np.float32)]
    b64 = [_b64(a) for a in [*arrays, boxes, feats]]
    if py3_bytes:
        b64 = [f"b'{x}'" for x in b64]
    return "\t".join([image_id, str(h), str(w), *b64[:4], str(n), *b64[4:]]) + "\n"


def _run(tmp_path, fmt, src, **kw):
    return import_regions(ImportConfig(fmt=fmt, src=str(src), images=str(tmp_path / "images"),
                                       out=str(tmp_path / "regions"), tmp_dir=str(tmp_path), **kw))


def _missing(tmp_path, shard):
    return fs.read_json(fs.join(str(tmp_path / "regions"), f"{shard}_missing.json"))


def test_butd_tsv_mirrors_image_shards(tmp_path):
    _images(str(tmp_path / "images"))
    lines, expected = [], {}
    for s in range(2):
        for i in range(4):
            key = f"{s:05d}{i:04d}"
            if key == "000010002":
                continue                                         # no regions for this image
            boxes, feats = _regions(s * 10 + i)
            expected[key] = (boxes, feats)
            image_id = f"{key}_x" if key == "000000001" else key  # matched by the url's base name
            lines.append(_butd_line(image_id, boxes, feats))
    lines.append(_butd_line("unknown_image", *_regions(99)))
    lines.append(_butd_line("000000003", *_regions(98)))          # a duplicate row: the first wins
    lines[:-1] = random.Random(0).sample(lines[:-1], len(lines) - 1)   # TSV order is not shard order
    src = tmp_path / "feats.tsv"
    src.write_text("".join(lines))

    summary = _run(tmp_path, "butd-tsv", src)
    assert {k: summary[k] for k in ("shards", "images", "written", "missing", "rejected", "unmatched",
                                    "duplicates", "feature_dim", "num_classes")} == {
        "shards": 2, "images": 8, "written": 7, "missing": 1, "rejected": 0, "unmatched": 1, "duplicates": 1,
        "feature_dim": D, "num_classes": 0}
    assert summary["missing_examples"] == ["000010002"] and summary["unmatched_examples"] == ["unknown_image"]
    out = str(tmp_path / "regions")
    assert fs.list_dir(out, ".tar") == ["00000.tar", "00001.tar"]
    for s in range(2):
        recs = list(iter_region_shard(out, f"{s:05d}"))
        assert [r.key for r in recs] == [k for k in sorted(expected) if k.startswith(f"{s:05d}")]
        for rec in recs:
            boxes, feats = expected[rec.key]
            # The source image was 400x200, the shard image is 200x100: boxes are rescaled.
            np.testing.assert_allclose(rec.boxes, boxes / 2, rtol=1e-6)
            np.testing.assert_array_equal(rec.features, feats.astype(np.float16))
            assert rec.cls_prob is None and (rec.image_w, rec.image_h) == (200, 100)
            assert rec.meta["source_size"] == [400, 200]
    assert list(iter_region_shard(out, "00000"))[1].meta["source_id"] == "000000001_x"
    assert _missing(tmp_path, "00001") == {"shard": "00001", "expected": 4, "written": 3,
                                           "missing": ["000010002"], "rejected": []}
    info = read_regions_info(out)
    assert (info["feature_dim"], info["num_classes"], info["class_names"]) == (D, 0, None)
    assert info["source"]["format"] == "butd-tsv"


def test_lxmert_layout_header_rows_and_huge_fields(tmp_path):
    _images(str(tmp_path / "images"), shards=1, per_shard=3, size=(90, 160))
    big_d = 4096      # 10 boxes x 4096 float32: a 218 KB base64 field, over csv's default 128 KiB limit
    rows = {key: _regions(i, n=10, w=180, h=320, d=big_d) for i, key in enumerate(["000000000", "000000001"])}
    (tmp_path / "lxmert").mkdir()
    (tmp_path / "lxmert" / "a.tsv").write_text(
        _lxmert_line("000000000", *rows["000000000"], w=180, h=320, py3_bytes=True))
    header = "\t".join(["img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
                        "num_boxes", "boxes", "features"]) + "\n"
    (tmp_path / "lxmert" / "b.tsv").write_text(header + _lxmert_line("000000001", *rows["000000001"],
                                                                     w=180, h=320))
    assert len(_b64(rows["000000000"][1])) > 131072
    summary = _run(tmp_path, "butd-tsv", tmp_path / "lxmert")
    assert (summary["written"], summary["missing"], summary["feature_dim"]) == (2, 1, big_d)
    recs = {r.key: r for r in iter_region_shard(str(tmp_path / "regions"), "00000")}
    for key, (boxes, feats) in rows.items():
        # img_h comes before img_w in LXMERT: a 180x320 source scales by 0.5 onto the 90x160 image.
        np.testing.assert_allclose(recs[key].boxes, boxes / 2, rtol=1e-6)
        np.testing.assert_array_equal(recs[key].features, feats.astype(np.float16))


def test_custom_fields_and_unknown_layouts(tmp_path):
    _images(str(tmp_path / "images"), shards=1, per_shard=1, size=(400, 200))
    boxes, feats = _regions(0)
    (tmp_path / "odd.tsv").write_text("\t".join(["extra", "000000000", "400", "200", "3", _b64(boxes),
                                                 _b64(feats)]) + "\n")
    with pytest.raises(SgaError, match="7 tab-separated fields"):
        _run(tmp_path, "butd-tsv", tmp_path / "odd.tsv")
    fields = ("note", "image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
    assert _run(tmp_path, "butd-tsv", tmp_path / "odd.tsv", fields=fields)["written"] == 1


def test_unusable_rows_are_rejected_with_reasons(tmp_path):
    _images(str(tmp_path / "images"), shards=1, per_shard=4)
    boxes, feats = _regions(0)
    lines = [_butd_line("000000000", boxes, feats),
             _butd_line("000000001", boxes, feats, w=300, h=300),        # square source: cropped image
             _butd_line("000000002", boxes, feats * 1e6),                 # beyond float16
             _butd_line("000000003", *_regions(3, d=D + 1)),              # another feature width
             "000000000\t1\t2\n"]                                         # malformed row
    (tmp_path / "f.tsv").write_text("".join(lines))
    summary = _run(tmp_path, "butd-tsv", tmp_path / "f.tsv", max_error_rate=1.0)
    assert (summary["written"], summary["rejected"], summary["bad_rows"]) == (1, 3, 1)
    reasons = {r["key"]: r["reason"] for r in _missing(tmp_path, "00000")["rejected"]}
    assert "aspect ratio" in reasons["000000001"]
    assert "float16" in reasons["000000002"]
    assert "feature width" in reasons["000000003"]


def test_ambiguous_url_names_are_not_guessed(tmp_path):
    urls = {"000000000": "https://a.com/image.jpg", "000000001": "https://b.com/image.jpg",
            "000000002": "https://c.com/unique.png"}
    _images(str(tmp_path / "images"), shards=1, per_shard=3, urls=urls)
    lines = [_butd_line("image", *_regions(0)), _butd_line("unique", *_regions(1))]
    (tmp_path / "f.tsv").write_text("".join(lines))
    summary = _run(tmp_path, "butd-tsv", tmp_path / "f.tsv")
    assert (summary["written"], summary["unmatched"]) == (1, 1)
    assert [r.key for r in iter_region_shard(str(tmp_path / "regions"), "00000")] == ["000000002"]


class _Boom:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_npz_import(tmp_path):
    _images(str(tmp_path / "images"), shards=2, per_shard=2, size=(200, 100))
    src = tmp_path / "npz"
    src.mkdir()
    rng = np.random.default_rng(0)
    boxes, feats = _regions(0, w=200, h=100)
    cls_prob = rng.dirichlet(np.ones(5), size=3)
    np.savez(src / "000000000.npz", boxes=boxes, features=feats, cls_prob=cls_prob)
    # ViLBERT-style names and the image size given in the file; named by the url's base name.
    np.savez(src / "000000001_x.npz", bbox=boxes * 2, features=feats, image_width=400, image_height=200)
    marker = str(tmp_path / "UNPICKLED")
    np.savez(src / "000010000.npz", boxes=np.array([_Boom(marker)], dtype=object), features=feats)
    np.savez(src / "000010001.npz", boxes=boxes, features=feats, cls_prob=cls_prob[:, :4])  # wrong C
    np.savez(src / "stray.npz", boxes=boxes, features=feats)
    summary = _run(tmp_path, "npz", src, max_error_rate=0.5)     # 2 of 4 rejected: at the limit, not above
    assert not os.path.exists(marker)
    assert {k: summary[k] for k in ("written", "missing", "rejected", "unmatched", "feature_dim",
                                    "num_classes")} == {
        "written": 2, "missing": 0, "rejected": 2, "unmatched": 1, "feature_dim": D, "num_classes": 5}
    recs = list(iter_region_shard(str(tmp_path / "regions"), "00000"))
    assert [r.key for r in recs] == ["000000000", "000000001"]
    np.testing.assert_array_equal(recs[0].cls_prob, cls_prob.astype(np.float16))
    assert recs[1].cls_prob is None
    np.testing.assert_allclose(recs[1].boxes, boxes, rtol=1e-6)    # 400x200 source rescaled to 200x100
    reasons = {r["key"]: r["reason"] for r in _missing(tmp_path, "00001")["rejected"]}
    assert "pickle" in reasons["000010000"] and "classes" in reasons["000010001"]
    assert list(iter_region_shard(str(tmp_path / "regions"), "00001")) == []
    assert read_regions_info(str(tmp_path / "regions"))["num_classes"] == 5


def test_cli_prints_one_json_summary_and_fails_cleanly(tmp_path, capsys, monkeypatch):
    # In-process `sga` (pipeline.cli.main): the same parser, handler and printing as the console script.
    from pipeline.cli import main

    monkeypatch.setenv("SGA_PROGRESS", "0")
    _images(str(tmp_path / "images"), shards=1, per_shard=2)
    (tmp_path / "f.tsv").write_text(_butd_line("000000001", *_regions(0)))
    args = ["regions", "import", "--format", "butd-tsv", "--src", str(tmp_path / "f.tsv"),
            "--images", str(tmp_path / "images"), "--out", str(tmp_path / "regions"), "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["written"], summary["missing"], summary["missing_examples"]) == (1, 1, ["000000000"])
    (tmp_path / "none.tsv").write_text(_butd_line("nobody", *_regions(0)))
    args[args.index("--src") + 1] = str(tmp_path / "none.tsv")
    assert main(args) == 2
    out = capsys.readouterr()
    assert out.out == "" and "matches an image" in out.err
    with pytest.raises(SystemExit):
        main(["regions", "import", "--help"])
    assert "butd-tsv" in capsys.readouterr().out


def test_missing_inputs_name_the_problem(tmp_path):
    with pytest.raises(SgaError, match="does not exist"):
        _run(tmp_path, "npz", tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SgaError, match="no image shards"):
        _run(tmp_path, "npz", tmp_path / "empty")
    with pytest.raises(SgaError, match="unknown region format"):
        _run(tmp_path, "hdf5", tmp_path / "empty")


def _good_shards(tmp_path, shards):
    """``write_good_shard`` image shards (six 64x48 samples keyed ``{prefix}0..5``) and one .npz per key."""
    src = tmp_path / "npz"
    src.mkdir()
    for shard, prefix in shards.items():
        write_good_shard(tmp_path / "images", tmp_path / "fixture-regions", shard, prefix, D)
        for i in range(6):
            boxes, feats = _regions(i, w=64, h=48)
            np.savez(src / f"{prefix}{i}.npz", boxes=boxes, features=feats)
    return src


def _readable_keys(tar_path):
    keys = []
    try:
        for sample in iter_tar(str(tar_path)):
            keys.append(sample.key)
    except ShardReadError:
        pass
    return keys


def test_truncated_image_shard_keeps_every_readable_sample(tmp_path):
    src = _good_shards(tmp_path, {"00000": "trunc", "00001": "good"})
    images = tmp_path / "images"
    (images / "00000.parquet").unlink()         # the keys come from the tar alone, cut in half below
    truncate(images / "00000.tar", 0.5)
    readable = _readable_keys(images / "00000.tar")
    assert 0 < len(readable) < 6

    summary = _run(tmp_path, "npz", src, max_error_rate=0.5)
    out = str(tmp_path / "regions")
    assert [r.key for r in iter_region_shard(out, "00000")] == readable
    assert len(list(iter_region_shard(out, "00001"))) == 6
    damage = _missing(tmp_path, "00000")["damage"]
    assert (damage["shard"], damage["samples_read"], damage["after_key"]) == ("00000", len(readable),
                                                                               readable[-1])
    assert "00000.tar" in damage["reason"] and "at byte" in damage["reason"]
    assert "damage" not in _missing(tmp_path, "00001")
    assert (summary["written"], summary["damaged_shards"], summary["failed_shards"]) == (
        len(readable) + 6, 1, [])
    assert summary["damage"] == [damage] and summary["errors"] == 1
    assert summary["top_reasons"] == [{"reason": damage["reason"], "count": 1}]
    assert read_regions_info(out)["feature_dim"] == D
    assert summary["error_rate"] == 1 / (len(readable) + 6)
    # Below that rate the same import fails (status 3) and still writes what it read.
    with pytest.raises(JobFailed, match=r"rate 0\.\d+ > --max-error-rate 0\.05") as failed:
        _run(tmp_path, "npz", src, max_error_rate=0.05)
    assert failed.value.summary["written"] == len(readable) + 6


def test_unreadable_parquet_falls_back_to_the_tar(tmp_path):
    src = _good_shards(tmp_path, {"00000": "good"})
    (tmp_path / "images" / "00000.parquet").write_bytes(b"not a parquet file")
    summary = _run(tmp_path, "npz", src, max_error_rate=1.0)
    assert summary["written"] == 6 and summary["failed_shards"] == []
    damage = _missing(tmp_path, "00000")["damage"]
    assert (damage["samples_read"], damage["after_key"]) == (6, "good5")
    assert "unreadable parquet" in damage["reason"]


def test_shard_lost_whole_fails_with_status_3(tmp_path, capsys, monkeypatch):
    from pipeline.cli import main

    monkeypatch.setenv("SGA_PROGRESS", "0")
    src = _good_shards(tmp_path, {"00000": "good"})
    (tmp_path / "images" / "00001.tar").write_bytes(b"this is not a tar file at all" * 10)
    args = ["regions", "import", "--format", "npz", "--src", str(src), "--images", str(tmp_path / "images"),
            "--out", str(tmp_path / "regions"), "--max-error-rate", "1", "--json"]
    assert main(args) == 3
    out = capsys.readouterr()
    summary = json.loads(out.out)
    assert summary["failed_shards"] == ["00001"] and summary["written"] == 6
    assert "00001" in out.err and "yielded no sample" in out.err
    assert len(list(iter_region_shard(str(tmp_path / "regions"), "00000"))) == 6   # the rest is kept


def test_all_rejected_import_fails_with_top_reasons(tmp_path, capsys, monkeypatch):
    from pipeline.cli import main

    monkeypatch.setenv("SGA_PROGRESS", "0")
    _images(str(tmp_path / "images"), shards=1, per_shard=4)
    boxes, feats = _regions(0)
    lines = [_butd_line(f"00000000{i}", boxes, feats * 1e6) for i in range(3)]       # beyond float16
    lines.append(_butd_line("000000003", boxes, feats, w=300, h=300))               # another aspect ratio
    (tmp_path / "f.tsv").write_text("".join(lines))
    args = ["regions", "import", "--format", "butd-tsv", "--src", str(tmp_path / "f.tsv"),
            "--images", str(tmp_path / "images"), "--out", str(tmp_path / "regions"), "--json"]
    assert main(args) == 3
    out = capsys.readouterr()
    summary = json.loads(out.out)
    assert (summary["written"], summary["rejected"], summary["errors"]) == (0, 4, 4)
    assert summary["error_rate"] == 1.0
    assert [t["count"] for t in summary["top_reasons"]] == [3, 1]
    assert summary["top_reasons"][0]["reason"] == "features exceed the float16 range"
    assert "aspect ratio" in summary["top_reasons"][1]["reason"]
    assert "failed: 4 errors in 4 inputs" in out.err and "3 x features exceed the float16 range" in out.err
    assert len(_missing(tmp_path, "00000")["rejected"]) == 4


def test_disjoint_keys_are_refused_before_writing(tmp_path, capsys, monkeypatch):
    from pipeline.cli import main

    monkeypatch.setenv("SGA_PROGRESS", "0")
    _images(str(tmp_path / "images"), shards=2, per_shard=2)
    src = tmp_path / "npz"
    src.mkdir()
    for name in ("COCO_val2014_000000000042", "COCO_val2014_000000000073"):
        np.savez(src / f"{name}.npz", boxes=_regions(0)[0], features=_regions(0)[1])
    args = ["regions", "import", "--format", "npz", "--src", str(src), "--images", str(tmp_path / "images"),
            "--out", str(tmp_path / "regions")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"--src {src}" in err and f"--images {tmp_path / 'images'}" in err and "COCO_val2014" in err
    assert not (tmp_path / "regions").exists()
