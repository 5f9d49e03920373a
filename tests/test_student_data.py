"""student.data: shard pairing, key join, skipping, thresholds, no pickle, equal batch counts, exact resume.

Every test streams real tar shards written by the shard writers (tests/student_fixtures.py).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import pickle

import numpy as np
import pytest
import torch
from student_fixtures import make_info, make_shards

from shards.errors import SampleError, SgaError
from shards.labels import (
    alignment_matrix,
    decode_labels,
    iter_label_shard,
    label_shard_uri,
    read_labelset_info,
)
from shards.manifest import read_manifest
from shards.regions import decode_regions, iter_region_shard
from shards.tario import TarSample, TarShardWriter, iter_tar
from student.data import (
    MALFORMED,
    DataConfig,
    StudentLoader,
    decoded_samples,
    label_fields,
    plan_shards,
    region_fields,
)

torch.set_num_threads(1)


def keys_collate(samples, generator):
    """Stands in for the Collator: keeps the keys and one draw of the batch's generator."""
    return {"keys": [s["key"] for s in samples], "draw": float(torch.rand(1, generator=generator))}


def epoch(loader: StudentLoader, number: int) -> list[tuple[tuple[str, ...], float]]:
    loader.set_epoch(number)
    return [(tuple(b["keys"]), b["draw"]) for b, _ in loader]


def config(root, **kw) -> DataConfig:
    paths = {"regions": os.path.join(root, "regions"), "labels": os.path.join(root, "labels")}
    return DataConfig(**{**paths, "batch_size": 3, "shuffle_buffer": 8, **kw})


def test_plan_pairs_finished_shards_by_name(tmp_path):
    regions, labels = make_shards(str(tmp_path), [4, 3, 5], errors_every=3)
    os.remove(os.path.join(labels, "00001_stats.json"))       # labelling still running on 00001
    os.remove(os.path.join(regions, "00002.tar"))             # regions missing for 00002
    plan = plan_shards(config(tmp_path))
    assert plan.labelset == labels
    assert plan.shards == ["00000"]
    assert plan.left_out == {"unfinished_labels": ["00001"], "no_regions": ["00002"]}
    ok = read_manifest(labels).to_pylist()
    assert plan.num_samples == sum(r["status"] == "ok" and r["shard"] == "00000" for r in ok) == 3
    assert plan.thresholds is None


def test_plan_names_the_fix_when_nothing_is_usable(tmp_path):
    make_shards(str(tmp_path / "a"), [2])
    with pytest.raises(SgaError, match="no label set here"):
        plan_shards(config(tmp_path / "a", labels=str(tmp_path / "a" / "regions")))
    make_shards(str(tmp_path / "a"), [2], info=make_info(score_threshold=0.7))   # a second label set
    with pytest.raises(SgaError, match="holds 2 label sets"):
        plan_shards(config(tmp_path / "a"))
    make_shards(str(tmp_path / "b"), [2])
    for name in os.listdir(tmp_path / "b" / "regions"):
        if name.endswith(".tar"):
            os.rename(tmp_path / "b" / "regions" / name, tmp_path / "b" / "regions" / ("9" + name))
    with pytest.raises(SgaError, match="no labelled samples"):
        plan_shards(config(tmp_path / "b"))


def test_decoded_samples_join_by_key_and_skip_rejected(tmp_path):
    regions, labels = make_shards(str(tmp_path), [7, 6], errors_every=3, unlabelled_every=4)
    plan = plan_shards(config(tmp_path))
    got = list(decoded_samples(plan, plan.shards))
    manifest = read_manifest(labels).to_pylist()
    assert [s["key"] for s in got] == [r["key"] for r in manifest if r["status"] == "ok"]
    region_by_key = {r.key: r for s in plan.shards for r in iter_region_shard(regions, s)}
    label_by_key = {r.key: r for s in plan.shards for r in iter_label_shard(labels, s)}
    assert len(region_by_key) == 13 and len(label_by_key) == len(got) < 13
    for sample in got:
        region, label = region_by_key[sample["key"]], label_by_key[sample["key"]]
        np.testing.assert_array_equal(sample["features"], region.features)
        np.testing.assert_array_equal(sample["boxes"], region.boxes)
        np.testing.assert_array_equal(sample["align"], label.align)
        assert sample["caption"] == label.caption
        assert sample["phrase_spans"] == [(p.start, p.end) for p in label.phrases]
        assert sample["features"].dtype == np.float16 and sample["align"].dtype == bool


def test_thresholds_for_M_can_be_overridden_at_load_time(tmp_path):
    _regions, labels = make_shards(str(tmp_path), [12])
    info = read_labelset_info(labels)
    stored = list(decoded_samples(plan_shards(config(tmp_path)), ["00000"]))
    plan = plan_shards(config(tmp_path, iou_threshold=0.8, score_threshold=0.7))
    assert plan.thresholds == (0.7, 0.8)
    strict = list(decoded_samples(plan, ["00000"]))
    phrases = {r.key: r.phrases for r in iter_label_shard(labels, "00000")}
    for s in strict:
        np.testing.assert_array_equal(s["align"], alignment_matrix(phrases[s["key"]], s["boxes"], 0.7, 0.8))
    assert sum(s["align"].sum() for s in strict) < sum(s["align"].sum() for s in stored)
    with pytest.raises(SgaError, match="below the score floor"):
        plan_shards(config(tmp_path, score_threshold=info.score_floor / 2))


def test_damaged_shards_are_skipped_with_a_warning_and_counted(tmp_path, caplog):
    regions, labels = make_shards(str(tmp_path), [6, 6, 6])
    tar = os.path.join(regions, "00001.tar")
    with open(tar, "rb") as f:
        data = f.read()
    with open(tar, "wb") as f:
        f.write(data[: len(data) // 2])                                   # truncated mid-sample
    with open(label_shard_uri(labels, "00002"), "wb") as f:
        f.write(b"\x00garbage" * 100)                                    # not a tar at all
    caplog.set_level(logging.WARNING, logger="student.data")
    loader = StudentLoader(plan_shards(config(tmp_path)), config(tmp_path), keys_collate, 0, 1, accum=1)
    batches = [(b, s) for b, s in loader]
    assert len(batches) == loader.steps_per_epoch
    stats = batches[-1][1]
    assert stats["damaged_region_shards"] >= 1 and stats["damaged_label_shards"] >= 1
    keys = {k for b, _ in batches for k in b["keys"]}
    assert not any(k.startswith("00002") for k in keys)                # no labels survived there
    assert "damaged region shard" in caplog.text and "damaged label shard" in caplog.text


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr), allow_pickle=True)
    return buf.getvalue()


def _edit_json(data: bytes, **fields) -> bytes:
    return json.dumps({**json.loads(data), **fields}).encode()


def _rejects(decode, sample) -> bool:
    try:
        decode(sample)
    except (SampleError, *MALFORMED):
        return True
    return False


REGION_DAMAGE = {
    "nan feature": lambda m: {"features.npy": _npy(np.full((3, 4), np.nan, np.float16))},
    "inf box": lambda m: {"boxes.npy": _npy(np.full((3, 4), np.inf, np.float32))},
    "float64 boxes": lambda m: {"boxes.npy": _npy(np.zeros((3, 4)))},
    "boxes [R, 3]": lambda m: {"boxes.npy": _npy(np.zeros((3, 3), np.float32))},
    "a row short": lambda m: {"features.npy": _npy(np.zeros((2, 4), np.float16))},
    "no feature columns": lambda m: {"features.npy": _npy(np.zeros((3, 0), np.float16))},
    "class prob 1.5": lambda m: {"cls_prob.npy": _npy(np.full((3, 2), 1.5, np.float16))},
    "class prob < 0": lambda m: {"cls_prob.npy": _npy(np.full((3, 2), -0.5, np.float16))},
    "nan class prob": lambda m: {"cls_prob.npy": _npy(np.full((3, 2), np.nan, np.float16))},
    "float32 class probs": lambda m: {"cls_prob.npy": _npy(np.full((3, 2), 0.5, np.float32))},
    "object array": lambda m: {"features.npy": _npy(np.array([None, 1], dtype=object))},
    "num_boxes off": lambda m: {"json": _edit_json(m["json"], num_boxes=4)},
    "zero width": lambda m: {"json": _edit_json(m["json"], image_w=0)},
    "height as text": lambda m: {"json": _edit_json(m["json"], image_h="9")},
    "height true": lambda m: {"json": _edit_json(m["json"], image_h=True)},
    "json garbage": lambda m: {"json": b"{not json"},
    "json list": lambda m: {"json": b"[1, 2]"},
    "features missing": lambda m: {"features.npy": None},
}


@pytest.mark.parametrize("damage", sorted(REGION_DAMAGE))
def test_region_fast_path_rejects_what_decode_regions_rejects(damage):
    good = {"boxes.npy": _npy(np.array([[0, 0, 4, 4]] * 3, np.float32)),
            "features.npy": _npy(np.ones((3, 4), np.float16)),
            "cls_prob.npy": _npy(np.full((3, 2), 0.5, np.float16)),
            "json": json.dumps({"image_w": 8, "image_h": 6, "num_boxes": 3, "id": 1}).encode()}
    for members in (good, {k: v for k, v in good.items() if k != "cls_prob.npy"}):
        sample = TarSample("000000000", members)
        fields, record = region_fields(sample), decode_regions(sample)
        for name in ("boxes", "features", "cls_prob", "image_w", "image_h"):
            np.testing.assert_array_equal(fields[name], getattr(record, name))
    members = {k: v for k, v in {**good, **REGION_DAMAGE[damage](good)}.items() if v is not None}
    sample = TarSample("000000000", members)
    assert _rejects(decode_regions, sample) and _rejects(region_fields, sample)
    assert _rejects(region_fields, TarSample("000000000", good, ["member json repeated"]))


LABEL_DAMAGE = {
    "span reversed": {"phrases": [{"span": [5, 2], "boxes": [], "scores": []}]},
    "span past the caption": {"phrases": [{"span": [2, 40], "boxes": [], "scores": []}]},
    "float span": {"phrases": [{"span": [0.0, 3], "boxes": [], "scores": []}]},
    "three-number span": {"phrases": [{"span": [0, 1, 2], "boxes": [], "scores": []}]},
    "negative regions": {"num_regions": -1, "align": ""},
    "regions true": {"num_regions": True},
    "caption not text": {"caption": 7},
    "align too short": {"align": base64.b64encode(b"").decode()},
    "align not base64": {"align": "!!"},
    "phrases missing": {"phrases": None},
}


@pytest.mark.parametrize("damage", sorted(LABEL_DAMAGE))
def test_label_fast_path_rejects_what_decode_labels_rejects(damage):
    body = {"caption": "a red star", "image_w": 8, "image_h": 6, "num_regions": 3,
            "phrases": [{"span": [0, 10], "boxes": [0, 0, 4, 4], "scores": [0.9]}],
            "align": base64.b64encode(np.packbits([True, False, True])).decode()}
    sample = TarSample("000000000", {"labels.json": json.dumps(body).encode()})
    caption, spans, regions, align = label_fields(sample)
    record = decode_labels(sample)
    assert (caption, spans, regions) == (record.caption, [(0, 10)], record.num_regions)
    np.testing.assert_array_equal(align, record.align)
    bad = TarSample("000000000", {"labels.json": json.dumps({**body, **LABEL_DAMAGE[damage]}).encode()})
    assert _rejects(decode_labels, bad) and _rejects(label_fields, bad)
    # Teacher boxes are read only to recompute M, where decode_labels checks them.
    unused = {**body, "phrases": [{"span": [0, 10], "boxes": [float("nan")] * 4, "scores": [0.9]}]}
    assert not _rejects(label_fields, TarSample("000000000", {"labels.json": json.dumps(unused).encode()}))


class Trap:
    """Unpickling this creates a directory: proof that something unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_pickle_payloads_are_never_unpickled(tmp_path):
    regions, _labels = make_shards(str(tmp_path), [4])
    trap_npy, trap_pyd = str(tmp_path / "npy-was-unpickled"), str(tmp_path / "pyd-was-unpickled")
    samples = list(iter_tar(os.path.join(regions, "00000.tar")))
    buf = io.BytesIO()
    np.save(buf, np.array([Trap(trap_npy)], dtype=object), allow_pickle=True)
    samples[1].members["features.npy"] = buf.getvalue()
    samples[2].members["pyd"] = pickle.dumps(Trap(trap_pyd))
    with TarShardWriter(os.path.join(regions, "00000.tar")) as w:
        for s in samples:
            w.write(s.key, s.members)
    cfg = config(tmp_path, batch_size=1)
    loader = StudentLoader(plan_shards(cfg), cfg, keys_collate, 0, 1, accum=1)
    stats = [s for _, s in loader][-1]
    assert stats["bad_regions"] >= 1                                   # the object array was refused
    assert not os.path.exists(trap_npy) and not os.path.exists(trap_pyd)


@pytest.mark.parametrize(("mode", "workers"), [("resampled", 0), ("resampled", 2), ("split", 1)])
def test_every_rank_gets_the_same_number_of_batches(tmp_path, mode, workers):
    make_shards(str(tmp_path), [9, 2, 5])                              # odd count, uneven sizes
    cfg = config(tmp_path, mode=mode, workers=workers)
    plan = plan_shards(cfg)
    seen = []
    for rank in (0, 1):
        loader = StudentLoader(plan, cfg, keys_collate, rank, world=2, accum=2)
        batches = epoch(loader, 0)
        assert len(batches) == loader.steps_per_epoch * 2 > 0
        assert all(len(keys) == cfg.batch_size for keys, _ in batches)
        seen.append({k[:5] for keys, _ in batches for k in keys})
    if mode == "split":
        assert seen[0].isdisjoint(seen[1])                             # each rank reads its own shards


def test_split_mode_needs_a_shard_per_rank_and_worker(tmp_path):
    make_shards(str(tmp_path), [3, 3, 3])
    cfg = config(tmp_path, mode="split")
    with pytest.raises(SgaError, match=r"at least ranks x workers = 4 x 1 = 4 shards"):
        StudentLoader(plan_shards(cfg), cfg, keys_collate, 0, world=4, accum=1)
    StudentLoader(plan_shards(cfg), cfg, keys_collate, 0, world=3, accum=1)


def test_stream_is_a_function_of_seed_and_epoch(tmp_path):
    make_shards(str(tmp_path), [5, 5, 5])
    cfg = config(tmp_path)
    plan = plan_shards(cfg)
    first = StudentLoader(plan, cfg, keys_collate, 0, 1, accum=1)
    again = StudentLoader(plan, cfg, keys_collate, 0, 1, accum=1)
    assert epoch(first, 0) == epoch(again, 0)
    assert epoch(first, 1) != epoch(again, 0)
    other = config(tmp_path, seed=1)
    assert epoch(StudentLoader(plan, other, keys_collate, 0, 1, accum=1), 0) != epoch(again, 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_loader_continues_the_exact_stream(tmp_path, workers):
    make_shards(str(tmp_path), [7, 4, 6])
    cfg = config(tmp_path, workers=workers, samples_per_epoch=40)
    plan = plan_shards(cfg)
    accum = 3  # odd: a resumed epoch restarts the DataLoader's round robin at an odd micro-batch
    full = StudentLoader(plan, cfg, keys_collate, 1, world=2, accum=accum)
    epochs = [epoch(full, 0), epoch(full, 1)]                          # persistent workers follow set_epoch
    spe = full.steps_per_epoch
    assert epochs[0] != epochs[1] and len(epochs[0]) == spe * accum
    for start in (1, spe + spe // 2 + 1):
        resumed = StudentLoader(plan, cfg, keys_collate, 1, world=2, accum=accum, start_step=start)
        e, done = divmod(start, spe)
        assert resumed.start.epoch == e
        tail = epoch(resumed, e)
        assert tail == epochs[e][done * accum:]
        if e == 0:
            assert epoch(resumed, 1) == epochs[1]
