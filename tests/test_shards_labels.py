"""Label shards: the alignment matrix on hand-made and random cases, the compact JSON, label set identity,
provenance in the PAX header, and rejection of bad content."""

import base64
import json

import numpy as np
import pytest

from shards import fs
from shards.errors import SampleError, SgaError
from shards.labels import (
    SCHEMA_VERSION,
    LabelRecord,
    LabelSetInfo,
    LabelShardWriter,
    PhraseLabel,
    alignment_matrix,
    decode_labels,
    encode_labels,
    info_from_pax,
    iter_label_shard,
    label_shard_uri,
    labelset_uri,
    list_label_shards,
    read_labelset_info,
    write_labelset_info,
)
from shards.tario import TarSample, TarShardWriter, read_pax_headers

CAPTION = "a red ball next to a small wooden table on a sunny day"


def _phrase(start, end, boxes, scores):
    return PhraseLabel(CAPTION[start:end], start, end, np.asarray(boxes, np.float32).reshape(-1, 4),
                       np.asarray(scores, np.float32))


def _info(**changes):
    fields = dict(teacher_name="tiny", teacher_fingerprint="f00d", extractor="spacy:en_core_web_sm@3.8.0",
                  score_floor=0.05, score_threshold=0.3)
    fields.update(changes)
    return LabelSetInfo(**fields)


def _random_record(key="000000000", phrases=3, boxes_per_phrase=5, regions=36, seed=0):
    rng = np.random.default_rng(seed)
    spans = [(0, 10), (19, 38), (42, 53)][:phrases]
    labels = []
    for start, end in spans:
        xy = rng.uniform(0, 180, (boxes_per_phrase, 2))
        box = np.concatenate([xy, xy + rng.uniform(5, 80, xy.shape)], 1)
        labels.append(_phrase(start, end, box, np.sort(rng.uniform(0.05, 1, boxes_per_phrase))[::-1]))
    xy = rng.uniform(0, 180, (regions, 2))
    region_boxes = np.concatenate([xy, xy + rng.uniform(5, 80, xy.shape)], 1).astype(np.float32)
    align = alignment_matrix(labels, region_boxes, 0.3, 0.5)
    return LabelRecord(key, CAPTION, 260, 240, regions, labels, align), region_boxes


# ---- alignment matrix ---------------------------------------------------------------------------------

def test_alignment_matrix_hand_made():
    regions = np.array([[0, 0, 10, 10],      # r0: equals phrase 0's first box
                        [5, 0, 15, 10],      # r1: IoU 1/3 with r0's box
                        [0, 0, 10, 20],      # r2: IoU exactly 0.5 with [0, 0, 10, 10]
                        [50, 50, 60, 60]],   # r3: matches phrase 1's low-score box only
                       np.float32)
    phrases = [_phrase(0, 10, [[0, 0, 10, 10]], [0.9]),
               _phrase(19, 38, [[100, 100, 120, 120], [50, 50, 60, 60]], [0.8, 0.2]),
               _phrase(42, 53, np.zeros((0, 4)), [])]
    m = alignment_matrix(phrases, regions, score_threshold=0.3, iou_threshold=0.5)
    assert m.dtype == bool and m.shape == (3, 4)
    assert m.tolist() == [[True, False, True, False], [False] * 4, [False] * 4]
    # Lowering the score threshold admits phrase 1's second box; raising IoU drops the 0.5 match.
    assert alignment_matrix(phrases, regions, 0.1, 0.5)[1].tolist() == [False, False, False, True]
    assert alignment_matrix(phrases, regions, 0.3, 0.51)[0].tolist() == [True, False, False, False]
    assert alignment_matrix(phrases, regions, 0.3, 0.3)[0].tolist() == [True, True, True, False]
    assert alignment_matrix([], regions, 0.3, 0.5).shape == (0, 4)
    assert alignment_matrix(phrases, np.zeros((0, 4)), 0.3, 0.5).shape == (3, 0)


def _iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@pytest.mark.parametrize("seed", range(5))
def test_alignment_matrix_matches_the_definition(seed):
    rec, regions = _random_record(seed=seed, boxes_per_phrase=8, regions=20)
    for score_t, iou_t in [(0.3, 0.5), (0.05, 0.2), (0.9, 0.1)]:
        want = np.array([[any(s >= score_t and _iou(b, r) >= iou_t for b, s in zip(p.boxes, p.scores))
                          for r in regions] for p in rec.phrases])
        np.testing.assert_array_equal(alignment_matrix(rec.phrases, regions, score_t, iou_t), want)
    assert alignment_matrix(rec.phrases, regions, 0.05, 0.1).any()  # the random case is not all-empty


# ---- encoding -----------------------------------------------------------------------------------------

def test_encode_is_compact_and_round_trips_within_stated_precision():
    rec, _ = _random_record()
    members = encode_labels(rec)
    assert list(members) == ["labels.json"]
    blob = members["labels.json"]
    # 3 phrases x 5 boxes, 36 regions: well under a kilobyte.
    assert len(blob) < 800, len(blob)
    body = json.loads(blob)
    assert "text" not in body["phrases"][0]          # text equals caption[start:end], so not stored
    assert len(base64.b64decode(body["align"])) == (3 * 36 + 7) // 8
    back = decode_labels(TarSample(rec.key, members))
    assert (back.key, back.caption, back.image_w, back.image_h, back.num_regions) == \
        (rec.key, rec.caption, rec.image_w, rec.image_h, rec.num_regions)
    np.testing.assert_array_equal(back.align, rec.align)
    assert back.align.dtype == bool
    for want, have in zip(rec.phrases, back.phrases, strict=True):
        assert (have.text, have.start, have.end) == (want.text, want.start, want.end)
        assert have.boxes.dtype == np.float32 and have.scores.dtype == np.float32
        np.testing.assert_allclose(have.boxes, want.boxes, atol=0.05 + 1e-4)
        np.testing.assert_allclose(have.scores, want.scores, atol=5e-5 + 1e-7)


def test_text_that_differs_from_the_span_is_kept():
    rec, _ = _random_record(phrases=1)
    rec.phrases[0].text = "red ball"       # e.g. a normalised phrase
    back = decode_labels(TarSample(rec.key, encode_labels(rec)))
    assert back.phrases[0].text == "red ball"


def test_no_phrases_and_no_regions():
    rec = LabelRecord("000000009", "so beautiful", 100, 80, 0, [], np.zeros((0, 0), bool))
    back = decode_labels(TarSample(rec.key, encode_labels(rec)))
    assert back.phrases == [] and back.align.shape == (0, 0)


def test_encode_rejects_inconsistent_records():
    rec, _ = _random_record()
    rec.align = rec.align[:, :-1]
    with pytest.raises(SampleError, match="align") as err:
        encode_labels(rec)
    assert err.value.stage == "write_labels"
    rec, _ = _random_record()
    rec.phrases[0].end = len(CAPTION) + 5
    with pytest.raises(SampleError, match="outside the caption"):
        encode_labels(rec)


def _tampered(change):
    rec, _ = _random_record()
    body = json.loads(encode_labels(rec)["labels.json"])
    change(body)
    return TarSample(rec.key, {"labels.json": json.dumps(body).encode()})


BAD_LABELS = {
    "align too short": lambda b: b.update(align=base64.b64encode(b"\x00").decode()),
    "align not base64": lambda b: b.update(align="***"),
    "span outside caption": lambda b: b["phrases"][0].update(span=[40, 400]),
    "boxes not multiple of 4": lambda b: b["phrases"][0].update(boxes=[1.0, 2.0, 3.0]),
    "scores count wrong": lambda b: b["phrases"][0].update(scores=[0.5]),
    "missing caption": lambda b: b.pop("caption"),
    "float region count": lambda b: b.update(num_regions=36.5),
    "zero width": lambda b: b.update(image_w=0),
}


@pytest.mark.parametrize("name", list(BAD_LABELS))
def test_bad_label_content_raises_sample_error(name):
    with pytest.raises(SampleError) as err:
        decode_labels(_tampered(BAD_LABELS[name]))
    assert err.value.stage == "read_labels" and err.value.key == "000000000"


def test_not_json_and_missing_member():
    with pytest.raises(SampleError, match="malformed"):
        decode_labels(TarSample("k", {"labels.json": b"\xff\xfe not json"}))
    with pytest.raises(SampleError, match="missing member"):
        decode_labels(TarSample("k", {"pyd": b"\x80\x04K\x01."}))


# ---- label set identity and shards --------------------------------------------------------------------

def test_labelset_id_hashes_everything_but_created_at():
    a, b = _info(created_at="2024-01-01T00:00:00+00:00"), _info(created_at="2025-06-01T00:00:00+00:00")
    assert a.labelset_id == b.labelset_id and len(a.labelset_id) == 12
    for change in ({"teacher_fingerprint": "beef"}, {"score_threshold": 0.4}, {"iou_threshold": 0.6},
                   {"extractor": "spacy:en_core_web_sm@3.7.0"}, {"top_k": 5}, {"score_floor": 0.01},
                   {"teacher_name": "mdetr"}, {"schema_version": SCHEMA_VERSION + 1}):
        assert _info(**change).labelset_id != a.labelset_id, change
    assert a.schema_version == SCHEMA_VERSION and a.iou_threshold == 0.5
    assert LabelSetInfo.from_dict(a.to_dict()) == a
    with pytest.raises(ValueError, match="does not match"):
        LabelSetInfo.from_dict({**a.to_dict(), "score_threshold": 0.9})
    with pytest.raises(ValueError):
        LabelSetInfo.from_dict({"teacher_name": "x"})


def test_label_shard_round_trip_with_provenance(tmp_path):
    info = _info()
    root = labelset_uri(str(tmp_path / "labels"), info)
    assert fs.basename(root) == info.labelset_id
    recs = [_random_record(f"00000000{i}", seed=i)[0] for i in range(3)]
    with LabelShardWriter(root, "00000", info) as w:
        for rec in recs:
            w.write(rec)
    write_labelset_info(root, info)
    assert read_labelset_info(root) == info
    assert fs.list_dir(root) == ["00000.tar.gz", "labelset.json"]
    headers = read_pax_headers(fs.join(root, "00000.tar.gz"))
    assert headers["sga.labelset_id"] == info.labelset_id
    assert info_from_pax(headers, "x") == info
    got = list(iter_label_shard(root, "00000"))
    assert [r.key for r in got] == [r.key for r in recs]
    for want, have in zip(recs, got, strict=True):
        np.testing.assert_array_equal(have.align, want.align)


def test_newer_schema_and_foreign_shards_are_refused(tmp_path):
    newer = _info(schema_version=SCHEMA_VERSION + 1)
    rec, _ = _random_record()
    with LabelShardWriter(str(tmp_path), "00000", newer) as w:
        w.write(rec)
    with pytest.raises(SgaError, match="upgrade sga"):
        list(iter_label_shard(str(tmp_path), "00000"))
    write_labelset_info(str(tmp_path), newer)
    with pytest.raises(SgaError, match="upgrade sga"):
        read_labelset_info(str(tmp_path))
    with TarShardWriter(fs.join(str(tmp_path), "00001.tar")) as tw:
        tw.write(rec.key, encode_labels(rec))
    with pytest.raises(SgaError, match="no label set header"):
        list(iter_label_shard(str(tmp_path), "00001"))
    with pytest.raises(SgaError, match="is missing"):
        read_labelset_info(str(tmp_path / "nothing"))


def test_iterator_skips_bad_samples_with_on_error(tmp_path):
    info = _info()
    good, _ = _random_record("000000000")
    with TarShardWriter(fs.join(str(tmp_path), "00000.tar"), pax_headers={
            "sga.labelset_id": info.labelset_id, "sga.labelset": json.dumps(info.to_dict())}) as tw:
        tw.write("000000000", encode_labels(good))
        tw.write("000000001", {"labels.json": b"{}"})
        tw.write("000000002", encode_labels(_random_record("000000002", seed=2)[0]))
    with pytest.raises(SampleError):
        list(iter_label_shard(str(tmp_path), "00000"))
    errors = []
    keys = [r.key for r in iter_label_shard(str(tmp_path), "00000", on_error=errors.append)]
    assert keys == ["000000000", "000000002"] and [e.key for e in errors] == ["000000001"]


def test_file_uri(tmp_path):
    info = _info()
    root = labelset_uri((tmp_path / "labels").as_uri(), info)
    rec, _ = _random_record()
    with LabelShardWriter(root, "00000", info) as w:
        w.write(rec)
    write_labelset_info(root, info)
    (back,) = iter_label_shard(root, "00000")
    assert back.key == rec.key and read_labelset_info(root).labelset_id == info.labelset_id


def test_label_tars_are_gzipped_deterministic_and_smaller_than_a_tar_block_per_sample(tmp_path):
    """A label (3 phrases x 5 boxes, 36 regions) is ~0.6 KB of JSON, but an uncompressed tar spends a 512-byte
    header plus padding to 512 on each; the gzipped shard must cost well under 1 KB per sample."""
    info = _info()
    recs = [_random_record(f"{i:09d}", seed=i)[0] for i in range(200)]
    for name in ("a", "b"):
        with LabelShardWriter(str(tmp_path / name), "00000", info) as w:
            for rec in recs:
                w.write(rec)
    a, b = (fs.read_bytes(fs.join(str(tmp_path / n), "00000.tar.gz")) for n in ("a", "b"))
    assert a == b and a[:2] == b"\x1f\x8b"
    payload = sum(len(encode_labels(r)["labels.json"]) for r in recs)
    plain = str(tmp_path / "plain.tar")
    with TarShardWriter(plain) as tw:
        for rec in recs:
            tw.write(rec.key, encode_labels(rec))
    assert len(fs.read_bytes(plain)) >= len(recs) * 1024            # what compression saves
    assert len(a) / len(recs) < 0.6 * payload / len(recs) < 600, (len(a), payload)
    assert [r.key for r in iter_label_shard(str(tmp_path / "a"), "00000")] == [r.key for r in recs]


def test_legacy_uncompressed_label_tars_are_found_and_read(tmp_path):
    info = _info()
    root = str(tmp_path)
    rec, _ = _random_record()
    with LabelShardWriter(root, "00001", info) as w:
        w.write(rec)
    with TarShardWriter(fs.join(root, "00000.tar"), pax_headers={
            "sga.labelset_id": info.labelset_id, "sga.labelset": json.dumps(info.to_dict())}) as tw:
        tw.write(rec.key, encode_labels(rec))
    assert list_label_shards(root) == ["00000", "00001"]
    assert label_shard_uri(root, "00000").endswith("00000.tar")
    assert label_shard_uri(root, "00001").endswith("00001.tar.gz")
    assert label_shard_uri(root, "00002").endswith("00002.tar.gz")   # a new shard is written compressed
    for shard in ("00000", "00001"):
        (back,) = iter_label_shard(root, shard)
        np.testing.assert_array_equal(back.align, rec.align)
