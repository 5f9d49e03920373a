"""The per-shard unit of work, in-process (no Ray): bad input, teacher failures, phrase cache, determinism.

Everything is real: tar shards written by the shard writers (and damaged by hand), spaCy, and a real MDETR
teacher (see ``pipeline_fixtures.teacher_spec``).
"""

from __future__ import annotations

import torch

torch.set_num_threads(1)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from pipeline_fixtures import assert_exactly_once, make_world, teacher_spec, write_bad_input  # noqa: E402

from shards import fs  # noqa: E402
from shards.labels import LabelSetInfo, iter_label_shard  # noqa: E402
from shards.manifest import read_manifest, read_marker  # noqa: E402
from shards.regions import read_regions_info  # noqa: E402


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from teacher.base import load_teacher

    return load_teacher(teacher_spec(tmp_path_factory.mktemp("teacher")), score_floor=0.0, top_k=5)


@pytest.fixture(scope="module")
def extractor():
    from pipeline.phrases import PhraseExtractor

    return PhraseExtractor()


def make_task(images, regions, out, teacher, extractor, gt=None, threshold=0.01, **kwargs):
    from pipeline.labeler import ShardTask

    info = LabelSetInfo(teacher.name, teacher.fingerprint, extractor.extractor_id, 0.0, threshold, 0.5, 5)
    dim = read_regions_info(str(regions))["feature_dim"]
    return ShardTask(str(images), str(regions), str(out), info, gt_uri=gt and str(gt), feature_dim=dim,
                     **kwargs)


def test_every_bad_input_becomes_one_error_row_and_the_shard_goes_on(tmp_path, teacher, extractor):
    from pipeline.labeler import LocalTeacherClient, label_shard

    expected = write_bad_input(tmp_path)
    task = make_task(tmp_path / "images", tmp_path / "regions", tmp_path / "labels", teacher, extractor,
                     batch_size=4, max_inflight=1)
    client = LocalTeacherClient(teacher)
    for shard in ("00000", "00001", "00002", "00003"):
        progress: list[int] = []
        stats = label_shard(task, shard, extractor, client, on_progress=progress.append)
        assert stats["samples"] == stats["ok"] + stats["errors"] == sum(progress)

    rows = [r for r in read_manifest(task.labelset_uri).to_pylist() if r["shard"] == "00000"]
    assert [(r["key"], r["status"], r["stage"]) for r in rows] == expected
    assert all(r["reason"] for r in rows if r["status"] == "error")
    by_key = {r["key"]: r for r in rows if r["status"] == "ok"}
    assert by_key["nophrase"]["n_phrases"] == 0 and by_key["good0"]["n_phrases"] == 2
    assert all(r["n_regions"] == 3 for r in by_key.values())
    reasons = {r["key"]: r["reason"] for r in rows if r["status"] == "error"}
    assert "failed_to_download" in reasons["failed"] and "corrupt" in reasons["corrupt"]
    assert "features" in reasons["nanfeat"] and "features" in reasons["inffeat"]
    assert "repeated member" in reasons["dupregion"] and "missing" in reasons["nobytes"]
    assert "degenerate" in reasons["degenerate"]
    assert "32x32" in reasons["sizediff"] and "duplicate" in reasons["good0"]
    labelled = list(iter_label_shard(task.labelset_uri, "00000"))
    assert [r.key for r in labelled] == ["good0", "nophrase", "good1"]
    assert labelled[1].align.shape == (0, 3)
    good0 = labelled[0]
    assert [p.text for p in good0.phrases] == ["a red square", "a blue circle"]
    assert good0.align.shape == (2, 3) and good0.align.dtype == bool

    truncated = [r for r in read_manifest(task.labelset_uri).to_pylist() if r["shard"] == "00001"]
    assert [r["key"] for r in truncated] == [f"trunc{i}" for i in range(6)]
    assert {r["status"] for r in truncated} == {"ok", "error"}
    assert all(r["stage"] == "read" for r in truncated if r["status"] == "error")
    unreadable = [r for r in read_manifest(task.labelset_uri).to_pylist() if r["shard"] == "00002"]
    assert [(r["key"], r["stage"]) for r in unreadable] == [("00002", "read")]
    cut = [r for r in read_manifest(task.labelset_uri).to_pylist() if r["shard"] == "00003"]
    assert [r["key"] for r in cut] == [f"cutregions{i}" for i in range(6)]
    assert cut[0]["status"] == "ok" and cut[-1]["status"] == "error"
    assert all(r["stage"] == "regions" and "damaged" in r["reason"] for r in cut if r["status"] == "error")
    # The helper's view of "every input once" agrees, shard by shard.
    assert_exactly_once(task.labelset_uri, str(tmp_path / "images"))


class FailingClient:
    """Fault injection around the real teacher: batches holding ``poison`` raise, as a crashing teacher
    would; everything else goes to the teacher."""

    def __init__(self, teacher, poison: str, everything: bool = False):
        from pipeline.labeler import LocalTeacherClient

        self.inner = LocalTeacherClient(teacher)
        self.poison, self.everything = poison, everything

    @property
    def local_cpu_s(self):
        return self.inner.local_cpu_s

    def submit(self, batches):
        return batches

    def collect(self, token):
        if self.everything or any(self.poison in caption for batch in token for _, caption, _ in batch):
            raise RuntimeError("teacher crashed")
        return self.inner.collect(token)


def test_teacher_failure_costs_only_the_failing_sample(tmp_path, teacher, extractor):
    from pipeline.labeler import TeacherFailure, label_shard

    world = make_world(tmp_path / "world", samples=12, per_shard=12)
    task = make_task(world / "images", world / "regions", tmp_path / "labels", teacher, extractor,
                     batch_size=4)
    from shards.images import iter_image_shard

    victim = next(s for s in iter_image_shard(str(world / "images"), "00000")
                  if s.status == "success" and s.caption and len(s.caption) > 12)
    progress: list[int] = []
    stats = label_shard(task, "00000", extractor, FailingClient(teacher, victim.caption), progress.append)
    assert sum(progress) == stats["samples"] == 12
    rows = read_manifest(task.labelset_uri).to_pylist()
    failed = [r for r in rows if r["stage"] == "teacher"]
    assert [r["key"] for r in failed] == [victim.key] and "teacher crashed" in failed[0]["reason"]
    assert stats["teacher_errors"] == 1 and stats["ok"] >= 8
    # A teacher that fails on everything is broken, not fed bad input: nothing is committed.
    fs.remove(str(tmp_path / "labels"))
    with pytest.raises(TeacherFailure):
        label_shard(task, "00000", extractor, FailingClient(teacher, "", everything=True))
    assert read_marker(task.labelset_uri, "00000") is None
    assert not fs.exists(fs.join(task.labelset_uri, "00000.tar.gz"))


def test_batches_per_call_changes_the_calls_not_the_labels(tmp_path, teacher, extractor):
    """Several teacher batches travel in one call, each still grounded as its own batch: the same bytes
    whatever the grouping, and fewer calls."""
    import dataclasses

    from pipeline.labeler import LocalTeacherClient, label_shard

    class Counting(LocalTeacherClient):
        def submit(self, batches):
            self.calls.append([len(b) for b in batches])
            return super().submit(batches)

    world = make_world(tmp_path / "world", samples=30, per_shard=30)
    base = make_task(world / "images", world / "regions", tmp_path / "one", teacher, extractor, batch_size=3,
                     max_inflight=1, batches_per_call=1)
    tars, calls = [], []
    for per_call, inflight in ((1, 1), (3, 4), (2, 2)):
        task = dataclasses.replace(base, labels_root=str(tmp_path / f"per{per_call}"),
                                   batches_per_call=per_call, max_inflight=inflight)
        client = Counting(teacher)
        client.calls = []
        label_shard(task, "00000", extractor, client)
        tars.append(fs.read_bytes(fs.join(task.labelset_uri, "00000.tar.gz")))
        calls.append(client.calls)
    assert tars[0] == tars[1] == tars[2]
    assert all(len(c) == 1 for c in calls[0]) and max(len(c) for c in calls[1]) == 3
    assert [n for c in calls[0] for n in c] == [n for c in calls[1] for n in c]     # the same teacher batches
    assert len(calls[1]) < len(calls[2]) < len(calls[0])


def test_labels_are_deterministic_and_phrases_are_cached_across_teachers(tmp_path, teacher, extractor):
    from pipeline.labeler import LocalTeacherClient, label_shard

    world = make_world(tmp_path / "world", samples=20, per_shard=20)
    out = tmp_path / "labels"
    task = make_task(world / "images", world / "regions", out, teacher, extractor, gt=world / "gt",
                     batch_size=3, max_inflight=2)
    first = label_shard(task, "00000", extractor, LocalTeacherClient(teacher))
    tar = fs.join(task.labelset_uri, "00000.tar.gz")
    before = fs.read_bytes(tar)
    assert first["phrase_cache_misses"] == first["ok"] and first["phrase_cache_hits"] == 0
    assert first["scored"] and first["tp"] + first["fn"] > 0

    # Same inputs, same teacher, same batching: byte-identical labels, phrases from the cache.
    again = label_shard(task, "00000", extractor, LocalTeacherClient(teacher))
    assert fs.read_bytes(tar) == before
    assert again["phrase_cache_hits"] == first["ok"] and again["phrase_cache_misses"] == 0
    # JPEGs decoded by the teacher instead of the shard worker: the same pixels, byte-identical labels.
    assert task.decode == "worker"
    task.decode = "teacher"
    label_shard(task, "00000", extractor, LocalTeacherClient(teacher))
    assert fs.read_bytes(tar) == before
    task.decode = "worker"
    # Other batching: the same phrases and boxes up to the teacher's float noise from batch padding.
    records = list(iter_label_shard(task.labelset_uri, "00000"))
    task.batch_size, task.max_inflight = 7, 1
    label_shard(task, "00000", extractor, LocalTeacherClient(teacher))
    rebatched = list(iter_label_shard(task.labelset_uri, "00000"))
    assert [(r.key, [(p.start, p.end) for p in r.phrases]) for r in records] == \
        [(r.key, [(p.start, p.end) for p in r.phrases]) for r in rebatched]
    for a, b in zip(records, rebatched):
        for pa, pb in zip(a.phrases, b.phrases):
            k = min(len(pa.scores), len(pb.scores))
            np.testing.assert_allclose(pa.scores[:k], pb.scores[:k], atol=2e-3)

    # Another label set (other thresholds) in the same output reuses the phrases too.
    other = make_task(world / "images", world / "regions", out, teacher, extractor, threshold=0.5)
    assert other.labelset_uri != task.labelset_uri
    third = label_shard(other, "00000", extractor, LocalTeacherClient(teacher))
    assert third["phrase_cache_hits"] == first["ok"]
    assert third["positives"] <= first["positives"]

    # A changed spaCy pipeline (another extractor id) never reads the old cache.
    extractor.extractor_id += "+changed"
    try:
        changed = label_shard(task, "00000", extractor, LocalTeacherClient(teacher))
    finally:
        extractor.extractor_id = extractor.extractor_id.removesuffix("+changed")
    assert changed["phrase_cache_hits"] == 0


def test_img2dataset_output_is_read_as_is(tmp_path, teacher, extractor):
    """Shards written the way img2dataset writes them (webdataset's TarWriter, its parquet columns and
    stats file; failures only in the parquet) label without any conversion."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds
    from pipeline_fixtures import jpeg, region_record

    from pipeline.labeler import LocalTeacherClient, label_shard
    from shards.regions import RegionShardWriter, write_regions_info

    images, regions = tmp_path / "images", tmp_path / "regions"
    images.mkdir()
    rows = []
    with wds.TarWriter(str(images / "00000.tar")) as sink, RegionShardWriter(str(regions), "00000") as r:
        for i, caption in enumerate(["a red square on a table", "two blue circles", "a dog in the park"]):
            key = f"00000{i:04d}"
            row = {"url": f"http://x/{i}.jpg", "caption": caption, "key": key, "status": "success",
                   "error_message": None, "width": 64, "height": 48, "original_width": 640,
                   "original_height": 480, "exif": "{}", "sha256": f"{i:064d}"}
            if i == 2:
                row.update(status="failed_to_download", error_message="HTTP Error 404: Not Found",
                           width=None, height=None, original_width=None, original_height=None)
            else:
                sink.write({"__key__": key, "jpg": jpeg(64, 48), "txt": caption, "json": row})
                r.write(region_record(key))
            rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows), images / "00000.parquet")
    (images / "00000_stats.json").write_text(json.dumps({"count": 3, "successes": 2}))
    write_regions_info(str(regions), 8, 0, None, {"detector": "test"})

    task = make_task(images, regions, tmp_path / "labels", teacher, extractor)
    stats = label_shard(task, "00000", extractor, LocalTeacherClient(teacher))
    rows_out = read_manifest(task.labelset_uri).to_pylist()
    assert [(r["key"], r["status"], r["stage"]) for r in rows_out] == [
        ("000000000", "ok", None), ("000000001", "ok", None), ("000000002", "error", "image")]
    assert "404" in rows_out[2]["reason"] and stats["phrases"] == 3
    assert [p.text for p in next(iter_label_shard(task.labelset_uri, "00000")).phrases] == ["a red square",
                                                                                            "a table"]


def test_real_img2dataset_output_is_labelled_as_is(tmp_path, teacher, extractor):
    """img2dataset 1.47.0's own shard (tests/assets/img2dataset/README.md), read where it lies: every parquet
    row gets one manifest row, the 404 an ``image`` error with img2dataset's message, the rest labels."""
    import io
    from pathlib import Path

    import pyarrow.parquet as pq
    from PIL import Image
    from pipeline_fixtures import region_record

    from pipeline.labeler import LocalTeacherClient, label_shard
    from shards.images import iter_image_shard
    from shards.regions import RegionShardWriter, write_regions_info

    images = Path(__file__).parent / "assets" / "img2dataset"
    rows = pq.read_table(images / "00000.parquet").to_pylist()
    samples = {s.key: s for s in iter_image_shard(str(images), "00000")}
    assert [r["key"] for r in rows] == list(samples) and len(rows) == 5
    regions = tmp_path / "regions"
    with RegionShardWriter(str(regions), "00000") as r:
        for key, s in samples.items():
            if s.jpg is not None:
                w, h = Image.open(io.BytesIO(s.jpg)).size
                boxes = [[0, 0, w / 2, h / 2], [w / 4, h / 4, w, h], [0, 0, w, h]]
                r.write(region_record(key, w, h, boxes=boxes))
    write_regions_info(str(regions), 8, 0, None, {"detector": "test"})

    task = make_task(images, regions, tmp_path / "labels", teacher, extractor)
    stats = label_shard(task, "00000", extractor, LocalTeacherClient(teacher))
    out = read_manifest(task.labelset_uri).to_pylist()
    assert [(r["key"], r["status"], r["stage"]) for r in out] == [
        (row["key"], "ok" if row["status"] == "success" else "error", None if row["status"] == "success"
         else "image") for row in rows]
    assert "HTTP Error 404" in next(r["reason"] for r in out if r["status"] == "error")
    labelled = {rec.key: rec for rec in iter_label_shard(task.labelset_uri, "00000")}
    successes = [row for row in rows if row["status"] == "success"]
    assert [rec.caption for rec in labelled.values()] == [row["caption"] for row in successes]
    assert stats["ok"] == 4 and stats["phrases"] > 0
    assert all(rec.num_regions == 3 for rec in labelled.values())


def test_shards_labelled_in_two_threads_overlap_only_outside_the_prep_lock(tmp_path, teacher, extractor):
    """A worker's second shard call reads and submits while the first one drains (the teacher answering)
    and commits; spaCy never runs in two threads at once, and the labels are the serial run's bytes."""
    import dataclasses
    import threading

    from pipeline.labeler import LocalTeacherClient, label_shard

    world = make_world(tmp_path / "world", samples=24, per_shard=12)
    shards = ("00000", "00001")
    serial = make_task(world / "images", world / "regions", tmp_path / "serial", teacher, extractor,
                       batch_size=3, max_inflight=2)
    for shard in shards:
        label_shard(serial, shard, extractor, LocalTeacherClient(teacher))

    events: list[tuple[str, str]] = []
    inside, most = [0], [0]

    class Recording(LocalTeacherClient):
        def submit(self, batches):
            events.append((threading.current_thread().name, "submit"))
            return super().submit(batches)

        def collect(self, token):
            answer = super().collect(token)
            events.append((threading.current_thread().name, "collect"))
            return answer

    extract = extractor.extract

    def counted(captions):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        try:
            return extract(captions)
        finally:
            inside[0] -= 1

    task = dataclasses.replace(serial, labels_root=str(tmp_path / "threads"))     # same info, same bytes
    lock, client, errors = threading.Lock(), Recording(teacher), []

    def run(shard):
        try:
            label_shard(task, shard, extractor, client, prep_lock=lock)
        except Exception as exc:  # surfaced by the assert below
            errors.append(exc)

    extractor.extract = counted
    try:
        threads = [threading.Thread(target=run, args=(shard,), name=shard) for shard in shards]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        del extractor.extract
    assert not errors and most[0] == 1
    first = events[0][0]
    second = next(name for name, _ in events if name != first)
    last_collect_of_first = max(i for i, event in enumerate(events) if event == (first, "collect"))
    assert events.index((second, "submit")) < last_collect_of_first     # the second fed the teacher early
    for shard in shards:
        assert fs.read_bytes(fs.join(task.labelset_uri, f"{shard}.tar.gz")) == \
            fs.read_bytes(fs.join(serial.labelset_uri, f"{shard}.tar.gz"))
