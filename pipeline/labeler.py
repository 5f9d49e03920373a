"""The unit of work: label one input shard, streaming batches to a teacher, and commit its three files.

``label_shard`` reads the image and region shards in lockstep (``pipeline.reader``), validates and decodes
each sample (``pipeline.validate``), takes noun phrases from the per-shard cache or spaCy
(``pipeline.phrases``), sends batches to a teacher through a :class:`TeacherClient`, matches the teacher's
boxes to the regions (``pipeline.matching``) and writes, in this order and each atomically:

1. ``LABELSET/NNNNN.tar.gz`` the labels of every accepted sample, in input order;
2. ``LABELSET/NNNNN.parquet`` the manifest, one row per input sample (``ok`` or ``error`` + stage + reason);
3. ``LABELSET/NNNNN_stats.json`` the completion marker with the shard's counts.

At most ``max_inflight`` batches of one shard are with the teacher at a time, ``batches_per_call`` per call
(a call costs ~2 ms of Ray's time at each end whatever its size): while the teacher works on them, this
worker decodes and extracts phrases for the next batches and matches and writes the previous ones, so the
teacher is not left idle and memory stays bounded whatever the shard size.

Between shards the teacher would idle while a shard's last batches come back and its files are written,
and until the next shard's first batch is read, decoded and parsed (~0.1 s a shard, 4 % of a job of
250-sample shards). With a ``prep_lock`` shared by the shard calls of one worker, a call holds it only
while it reads and submits, so the next shard's call (another thread of the same worker) starts feeding the
teacher while this one drains and commits (teacher busy 95.8 % -> 97.7-98.1 % of a 2,500-sample job).
The lock also keeps spaCy, which is not thread-safe, to one thread at a time.

The function knows nothing of Ray: ``pipeline.worker`` runs it in an actor with a client that calls teacher
actors, and tests run it in-process with :class:`LocalTeacherClient`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from shards import fs
from shards.errors import SampleError, SgaError
from shards.labels import LabelRecord, LabelSetInfo, LabelShardWriter, alignment_matrix
from shards.manifest import ERROR, OK, ManifestRow, write_manifest, write_marker
from shards.regions import RegionRecord

from .matching import phrase_labels, read_ground_truth, score_alignment
from .phrases import PhraseCache, PhraseExtractor, Span
from .reader import ShardItem, iter_shard
from .validate import (
    ValidationConfig,
    check_caption,
    check_image,
    check_regions,
    check_status,
    decode_rgb,
    verify_image,
)

PHRASE_CHUNK = 64  # samples whose captions go through spaCy together
PROGRESS_S = 0.5   # seconds between a shard's progress reports
# Where images are decoded. "worker": the shard worker decodes each image once, validating it, and sends the
# pixels, so a teacher (a GPU above all) only runs its model; pixels are ~10x the bytes of the JPEG through
# Ray's object store, which costs nothing on one node. "teacher": the worker only checks the image (a
# draft-mode decode) and sends the JPEG; the teacher decodes it, for clusters where the network between
# shard workers and teachers, not CPU, is the scarce resource.
DECODE = ("worker", "teacher")


class TeacherClient(Protocol):
    """Where batches of ``(image, caption, spans)`` tuples go: ``submit`` hands over one call's batches (each
    grounded as one teacher batch) and returns a token, ``collect`` waits for the answers of every sample of
    the call in order (``[sample][phrase] -> (boxes, scores)``, see :func:`ground_plain`) or raises the
    teacher's error. ``local_cpu_s`` is teacher CPU time spent in the calling thread (0 when the teacher runs
    elsewhere)."""

    local_cpu_s: float

    def submit(self, batches: list[list]) -> Any: ...

    def collect(self, token: Any) -> list[list]: ...


class LocalTeacherClient:
    """Runs the teacher in this thread when a batch is collected (in-process use: tests, benchmarks)."""

    def __init__(self, teacher):
        self.teacher = teacher
        self.local_cpu_s = 0.0

    def submit(self, batches: list[list]) -> Any:
        return batches

    def collect(self, token: Any) -> list[list]:
        start = time.thread_time()
        try:
            return [answer for batch in token for answer in ground_plain(self.teacher, batch)]
        finally:
            self.local_cpu_s += time.thread_time() - start


@dataclass
class ShardTask:
    """What a worker needs to label any shard of one job (picklable; the same for every shard)."""

    images_uri: str
    regions_uri: str
    labels_root: str                  # LABELS: label sets and the phrase cache live under it
    info: LabelSetInfo
    gt_uri: str | None = None         # the world's hidden truth, for precision/recall
    feature_dim: int | None = None    # from regions.json; samples with another width are rejected
    batch_size: int = 16
    max_inflight: int = 4             # teacher batches of a shard at the teacher at once
    batches_per_call: int = 2         # teacher batches per call: each call costs ~2 ms of Ray at both ends
    decode: str = "worker"            # where JPEGs become pixels: "worker" (here) or "teacher" (see DECODE)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    @property
    def labelset_uri(self) -> str:
        return fs.join(self.labels_root, self.info.labelset_id)


class TeacherFailure(SgaError):
    """The teacher failed on every sample of a shard: a broken teacher, not bad input; the shard is not
    marked done so a rerun retries it."""


@dataclass
class _Sample:
    index: int
    key: str
    caption: str
    image: bytes | np.ndarray   # the JPEG, or uint8 [H, W, 3] RGB when the worker decodes (ShardTask.decode)
    width: int
    height: int
    regions: RegionRecord
    spans: list[Span] = field(default_factory=list)


class _ShardRun:
    """State of one shard being labelled (see :func:`label_shard`)."""

    def __init__(self, task: ShardTask, shard: str, extractor: PhraseExtractor, client: TeacherClient,
                 writer: LabelShardWriter, on_progress: Callable[[int], None] | None):
        self.task, self.shard, self.client, self.writer = task, shard, client, writer
        self.cache = PhraseCache(task.labels_root, shard, extractor)
        gt_file = fs.join(task.gt_uri, f"{shard}.parquet") if task.gt_uri else None
        self.truth = read_ground_truth(task.gt_uri, shard) if gt_file and fs.exists(gt_file) else None
        self.on_progress = on_progress or (lambda n: None)
        self.rows: list[tuple[int, ManifestRow]] = []
        self.pending: deque[tuple[Any, list[_Sample], int]] = deque()   # token, samples, batches
        self.counts = dict.fromkeys(("phrases", "positives", "regions", "grounded", "teacher_errors",
                                     "tp", "fp", "fn"), 0)
        self.teacher_wait = 0.0
        self.scoring_cpu = 0.0      # thread CPU spent scoring M against the world's truth (synthetic only)
        self._unreported = 0
        self._reported_at = time.perf_counter()

    def error(self, index: int, err: SampleError, in_batch: bool = False) -> None:
        """An error row; samples rejected before batching count towards progress at the next report."""
        self.rows.append((index, ManifestRow(err.key, self.shard, ERROR, err.stage, err.reason)))
        self._unreported += not in_batch

    def prepare(self, index: int, item: ShardItem) -> _Sample:
        if item.error is not None:
            raise item.error
        image = item.image
        cfg = self.task.validation
        check_status(item.key, image.status, image.error_message)
        caption = check_caption(item.key, image.caption, cfg)
        if self.task.decode == "worker":
            pixels = check_image(item.key, image.status, image.jpg, image.error_message, cfg)
            (height, width), sent = pixels.shape[:2], pixels
        else:
            width, height = verify_image(item.key, image.status, image.jpg, image.error_message, cfg)
            sent = image.jpg
        regions = check_regions(item.key, item.regions, width, height, self.task.feature_dim, cfg)
        return _Sample(index, item.key, caption, sent, width, height, regions)

    def submit(self, chunk: list[_Sample]) -> None:
        """Phrases for a chunk of samples in one spaCy call, then its teacher batches (``batch_size``
        samples, less those without phrases), ``batches_per_call`` to a call, keeping at most
        ``max_inflight`` batches at the teacher (finishing the oldest calls while over)."""
        for sample, spans in zip(chunk, self.cache.get([(s.key, s.caption) for s in chunk])):
            sample.spans = spans
        size = self.task.batch_size
        for i in range(0, len(chunk), size * self.task.batches_per_call):
            samples = chunk[i: i + size * self.task.batches_per_call]
            batches = [b for b in (_inputs([s for s in samples[j: j + size] if s.spans])
                                   for j in range(0, len(samples), size)) if b]
            self.pending.append((self.client.submit(batches) if batches else None, samples, len(batches)))
            while sum(n for _, _, n in self.pending) > self.task.max_inflight:
                self.finish_oldest()

    def ground(self, token: Any, grounded: list[_Sample]) -> list[list | SampleError]:
        """The teacher's answer per grounded sample; on a failed batch, each sample alone, so one bad sample
        costs only itself."""
        start = time.perf_counter()
        try:
            answers = _checked(self.client.collect(token), grounded)
        except Exception:
            answers = []
            for s in grounded:
                try:
                    answers.append(_checked(self.client.collect(self.client.submit([_inputs([s])])),
                                            [s])[0])
                except Exception as exc:  # the boundary where a teacher crash becomes an error row
                    answers.append(SampleError(s.key, "teacher", f"teacher failed: {exc!r}"[:500]))
        self.teacher_wait += time.perf_counter() - start
        return answers

    def finish_oldest(self) -> None:
        """Match, write and count the samples of the oldest pending call once it is answered."""
        token, samples, _ = self.pending.popleft()
        grounded = [s for s in samples if s.spans]
        answers = iter(self.ground(token, grounded) if token is not None else [])
        info = self.task.info
        for s in samples:
            found = next(answers) if s.spans else []
            if isinstance(found, SampleError):
                self.counts["teacher_errors"] += 1
                self.error(s.index, found, in_batch=True)
                continue
            w, h = s.width, s.height
            phrases = phrase_labels(s.caption, s.spans, found, w, h, info.score_floor, info.top_k)
            align = alignment_matrix(phrases, s.regions.boxes, info.score_threshold, info.iou_threshold)
            rec = LabelRecord(s.key, s.caption, w, h, s.regions.num_boxes, phrases, align)
            try:
                self.writer.write(rec)
            except SampleError as err:
                self.error(s.index, err, in_batch=True)
                continue
            positives = int(align.sum())
            self.rows.append((s.index, ManifestRow(s.key, self.shard, OK, None, None, len(phrases),
                                                   s.regions.num_boxes, positives)))
            self.counts["phrases"] += len(phrases)
            self.counts["positives"] += positives
            self.counts["regions"] += s.regions.num_boxes
            self.counts["grounded"] += bool(s.spans)
            if self.truth is not None and s.key in self.truth:
                scoring = time.thread_time()
                tp, fp, fn = score_alignment(s.spans, align, self.truth[s.key], s.regions.boxes,
                                             info.iou_threshold)
                self.scoring_cpu += time.thread_time() - scoring
                self.counts["tp"] += tp
                self.counts["fp"] += fp
                self.counts["fn"] += fn
        self.report(len(samples))

    def report(self, n: int, final: bool = False) -> None:
        """Count ``n`` finished samples; pass them on at most every ``PROGRESS_S`` seconds (and when
        ``final``): in a Ray job each report is an actor call, 2 % of the shard worker's CPU when made per
        batch (py-spy over a 2,500-sample job)."""
        self._unreported += n
        now = time.perf_counter()
        if final or now - self._reported_at >= PROGRESS_S:
            if self._unreported:
                self.on_progress(self._unreported)
            self._unreported, self._reported_at = 0, now


def _inputs(samples: Sequence[_Sample]) -> list[tuple]:
    """``(image, caption, spans)`` per sample: ``teacher.base.GroundingInput`` is built where the teacher
    runs (so this side never imports the teacher package)."""
    return [(s.image, s.caption, list(s.spans)) for s in samples]


def ground_plain(teacher, batch: Sequence[tuple]) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """``teacher.ground`` on ``(image, caption, spans)`` tuples, answering ``(boxes, scores)`` tuples.

    Only plain tuples, bytes and arrays cross between the labeler and the teacher, so the labeling side
    never imports (or unpickles objects of) the teacher package and its model libraries. An image is uint8
    ``[H, W, 3]`` pixels, or encoded bytes decoded here (``ShardTask.decode``).
    """
    from teacher.base import GroundingInput

    inputs = [GroundingInput(data if isinstance(data, np.ndarray) else decode_rgb(data), caption, spans)
              for data, caption, spans in batch]
    answers = teacher.ground(inputs)
    return [[(pb.boxes, pb.scores) for pb in sample] for sample in answers]


def _checked(answers: list[list], samples: Sequence[_Sample]) -> list[list]:
    """The answers if they have one entry per sample and per phrase, else a ``ValueError``."""
    if len(answers) != len(samples) or any(len(a) != len(s.spans) for a, s in zip(answers, samples)):
        raise ValueError(f"teacher answered {[len(a) for a in answers]} phrases for "
                         f"{[len(s.spans) for s in samples]}")
    return answers


def _read_and_submit(task: ShardTask, shard: str, run: _ShardRun) -> None:
    """Every sample of the shard prepared and its batches submitted (the oldest calls finished while over
    ``max_inflight`` batches); the last calls, at most ``max_inflight`` batches, are left pending."""
    # spaCy is ~1.5x faster per caption in batches of 64 than of 4 (256 gains only another 1.1x, and
    # preparing 256 samples outlasts the teacher's in-flight batches, idling it: job/teacher 0.78), and
    # the first chunk is one teacher batch, so the teacher gets work from a new shard quickly. Whole
    # teacher batches per chunk keep the batches (and so the labels) the same whatever the chunk sizes.
    chunk_size = task.batch_size
    chunk: list[_Sample] = []
    for index, item in enumerate(iter_shard(task.images_uri, task.regions_uri, shard)):
        try:
            chunk.append(run.prepare(index, item))
        except SampleError as err:
            run.error(index, err)
            continue
        if len(chunk) == chunk_size:
            run.submit(chunk)
            chunk = []
            chunk_size = task.batch_size * -(-PHRASE_CHUNK // task.batch_size)
    if chunk:
        run.submit(chunk)


def label_shard(task: ShardTask, shard: str, extractor: PhraseExtractor, client: TeacherClient,
                on_progress: Callable[[int], None] | None = None,
                prep_lock: threading.Lock | None = None) -> dict[str, Any]:
    """Label ``shard`` and commit tar, manifest and marker (see the module doc); returns the marker's stats.

    ``prep_lock``, when given, is held while the shard is read and submitted, and released before its last
    batches are awaited and its files written (module doc); concurrent calls must share it and ``extractor``.

    Stats keys: ``labelset_id, shard, samples, ok, errors, error_stages, phrases, positives, regions,
    grounded, teacher_errors, tp, fp, fn, scored, label_bytes, phrase_cache_hits, phrase_cache_misses,
    seconds, prep_cpu_s, scoring_cpu_s, teacher_wait_s``. ``prep_cpu_s`` is this thread's CPU time less the
    teacher's when it ran here; ``scoring_cpu_s`` is the part of it spent scoring against ground truth.
    Raises :class:`TeacherFailure` (nothing committed) when the teacher failed on every one of at least two
    samples.
    """
    start, cpu_start, local_start = time.perf_counter(), time.thread_time(), client.local_cpu_s
    fs.makedirs(task.labelset_uri)
    with LabelShardWriter(task.labelset_uri, shard, task.info) as writer:
        run = _ShardRun(task, shard, extractor, client, writer, on_progress)
        with prep_lock or nullcontext():
            _read_and_submit(task, shard, run)
        while run.pending:
            run.finish_oldest()
        failed, tried = run.counts["teacher_errors"], run.counts["teacher_errors"] + run.counts["grounded"]
        if tried >= 2 and failed == tried:
            raise TeacherFailure(f"shard {shard}: the teacher failed on all {tried} samples it was given; "
                                 "check the teacher (see the manifest-less shard's worker log) and rerun")
    run.report(0, final=True)
    run.cache.save()
    rows = [row for _, row in sorted(run.rows, key=lambda r: r[0])]
    write_manifest(task.labelset_uri, shard, rows)
    stages: dict[str, int] = {}
    for row in rows:
        if row.status == ERROR:
            stages[row.stage] = stages.get(row.stage, 0) + 1
    label_fs, label_path = fs.resolve(writer.uri)
    stats = {
        "labelset_id": task.info.labelset_id, "shard": shard, "samples": len(rows),
        "ok": sum(r.status == OK for r in rows), "errors": sum(stages.values()), "error_stages": stages,
        **run.counts, "scored": run.truth is not None, "label_bytes": label_fs.get_file_info(label_path).size,
        "phrase_cache_hits": run.cache.hits, "phrase_cache_misses": run.cache.misses,
        "seconds": time.perf_counter() - start, "teacher_wait_s": run.teacher_wait,
        "prep_cpu_s": time.thread_time() - cpu_start - (client.local_cpu_s - local_start),
        "scoring_cpu_s": run.scoring_cpu,
    }
    write_marker(task.labelset_uri, shard, stats)
    return stats
