"""Streaming region shards and label shards into student batches, for one rank of a DDP job.

The pipeline of every loader worker is an explicit list of webdataset stages::

    shard source  (resampled: shards drawn with replacement; split: this rank's and worker's slice, cycled)
    -> paired samples (region shard N and label shard N read together, joined by key, manifest errors dropped)
    -> sample shuffle buffer
    -> decode (plain .npy, never pickle, and JSON; optional re-thresholding of M)
    -> batched (lists of samples)
    .with_epoch(batches per worker)

and the last step, collation (tokenisation, masking, pair sampling), runs in the worker after it.

Both modes loop over their shards forever and ``with_epoch`` cuts every worker at the same number of batches,
so every rank yields exactly ``steps_per_epoch * accum`` micro-batches per epoch whatever the shard sizes (a
rank that ran short would hang DDP). Epochs are nominal: about ``num_samples`` samples per epoch.

Determinism: a worker's stream is a pure function of (seed, epoch, rank, worker), and the randomness of
collating batch i of that stream comes from a generator seeded with (seed, epoch, rank, worker, i). The
DataLoader takes batches from its workers round robin, so the micro-batch a rank sees at (epoch, k) is fixed.
Resuming at an optimizer step therefore needs no saved loader state: :class:`StreamPosition` says how many
micro-batches of the epoch were consumed, each worker replays its stream up to there without collating, and
the workers are rotated so the next batch comes from the worker that was next before the interruption.

Damaged shards and bad samples never stop training: they are skipped, logged once per shard, and counted
in the stats dict each batch carries.

Nothing here can unpickle: tars are read as raw bytes by :mod:`shards.tario` and decoded only by
:func:`region_fields`, :func:`label_fields` and ``decode_labels`` (``shards.npy.load_npy``, which refuses
object arrays, and JSON); webdataset contributes stages, never its decoders. Training processes also run
with ``WDS_SECURE=1`` (:func:`student.train.train`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import multiprocessing
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards import fs
from shards.errors import SampleError, SgaError, ShardReadError
from shards.labels import INFO_NAME as LABELSET_INFO
from shards.labels import MEMBER as LABEL_MEMBER
from shards.labels import (
    alignment_matrix,
    decode_labels,
    label_shard_uri,
    list_label_shards,
    read_labelset_info,
)
from shards.manifest import OK, manifest_uri, read_marker
from shards.npy import load_npy
from shards.tario import TarSample, iter_tar

from .launch import DataConfig

log = logging.getLogger(__name__)

MODES = ("resampled", "split")
# Counters every batch carries (cumulative for its worker's epoch): what was used and what was skipped.
STAT_KEYS = ("samples", "unlabelled", "manifest_errors", "labels_without_regions", "damaged_region_shards",
             "damaged_label_shards", "bad_regions", "bad_labels", "region_count_mismatch")
Collate = Callable[[list[dict[str, Any]], torch.Generator], dict[str, Any]]


@dataclass
class ShardPlan:
    """The shards a run streams, resolved once in the main process.

    ``shards`` are names present in both sets whose label shard is finished (marker written);
    ``left_out`` maps a reason to the shard names dropped for it; ``thresholds`` is ``None`` to use the
    stored M, else ``(score, iou)`` to recompute it.
    """

    regions: str
    labelset: str
    shards: list[str]
    num_samples: int
    thresholds: tuple[float, float] | None
    left_out: dict[str, list[str]] = field(default_factory=dict)


def resolve_labelset(labels: str) -> str:
    """``labels`` itself if it is a label set, else its only subdirectory that is one."""
    if fs.exists(fs.join(labels, LABELSET_INFO)):
        return labels
    sets = [d for d in fs.list_subdirs(labels) if fs.exists(fs.join(labels, d, LABELSET_INFO))]
    if len(sets) == 1:
        return fs.join(labels, sets[0])
    if not sets:
        raise SgaError(f"{labels}: no label set here ({LABELSET_INFO} missing, also in its subdirectories); "
                       "pass LABELS/<labelset_id> as written by `sga label`")
    raise SgaError(f"{labels} holds {len(sets)} label sets ({', '.join(sets)}); pass one, e.g. "
                   f"--labels {fs.join(labels, sets[0])}")


def _manifest_table(labelset: str, shard: str, columns: list[str]):
    filesystem, path = fs.resolve(manifest_uri(labelset, shard))
    return pq.read_table(path, columns=columns, filesystem=filesystem)


def plan_shards(cfg: DataConfig) -> ShardPlan:
    """Pair region and label shards by name and count the labelled samples; raise if nothing is usable."""
    if cfg.mode not in MODES:
        raise SgaError(f"unknown data mode {cfg.mode!r}; use one of {', '.join(MODES)}")
    labelset = resolve_labelset(cfg.labels)
    info = read_labelset_info(labelset)
    thresholds = None
    if cfg.score_threshold is not None or cfg.iou_threshold is not None:
        score = info.score_threshold if cfg.score_threshold is None else cfg.score_threshold
        iou = info.iou_threshold if cfg.iou_threshold is None else cfg.iou_threshold
        if score < info.score_floor:
            raise SgaError(f"score threshold {score} is below the score floor {info.score_floor} of "
                           f"{labelset}: boxes under the floor were not stored; relabel with a lower floor")
        thresholds = (float(score), float(iou))
    region_names = {n[:-4] for n in fs.list_dir(cfg.regions, ".tar")}
    label_names = set(list_label_shards(labelset))
    left_out: dict[str, list[str]] = {
        "no_labels": sorted(region_names - label_names),
        "no_regions": sorted(label_names - region_names),
        "unfinished_labels": [],
        "no_manifest": [],
    }
    shards, num_samples = [], 0
    for name in sorted(region_names & label_names):
        if read_marker(labelset, name) is None:
            left_out["unfinished_labels"].append(name)
            continue
        try:
            status = _manifest_table(labelset, name, ["status"]).column("status").to_pylist()
        except (OSError, ValueError) as exc:
            log.warning("label shard %s: manifest unreadable (%s); shard left out", name, exc)
            left_out["no_manifest"].append(name)
            continue
        shards.append(name)
        num_samples += sum(s == OK for s in status)
    left_out = {k: v for k, v in left_out.items() if v}
    for reason, names in left_out.items():
        log.warning("%d shard(s) left out (%s): %s", len(names), reason, ", ".join(names[:10]))
    if not shards or num_samples == 0:
        raise SgaError(f"no labelled samples to train on: {cfg.regions} and {labelset} share no finished "
                       f"shard with ok samples (left out: {json.dumps(left_out)[:300]}); check both paths "
                       "and that `sga label` finished")
    return ShardPlan(cfg.regions, labelset, shards, cfg.samples_per_epoch or num_samples, thresholds,
                     left_out)


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any JSON-able parts; the same in every process (unlike ``hash``)."""
    digest = hashlib.blake2b(json.dumps(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SharedEpoch:
    """The epoch number, shared with persistent DataLoader workers (they hold copies of the dataset)."""

    def __init__(self, epoch: int = 0):
        self.value = multiprocessing.Value("i", epoch)

    def set(self, epoch: int) -> None:
        self.value.value = epoch

    def get(self) -> int:
        return self.value.value


@dataclass(frozen=True)
class StreamPosition:
    """Where a rank's stream resumes: ``batch`` micro-batches of ``epoch`` were already consumed."""

    epoch: int = 0
    batch: int = 0


@dataclass(frozen=True)
class StreamContext:
    """Identity of one worker's stream; every random choice in it is seeded from these fields."""

    seed: int
    epoch: int
    rank: int
    world: int
    worker: int
    workers: int

    def seed_for(self, *tags: Any) -> int:
        return derive_seed(self.seed, self.epoch, self.rank, self.worker, *tags)


def epoch_geometry(num_samples: int, batch_size: int, world: int, workers: int,
                   accum: int) -> tuple[int, int]:
    """``(batches_per_worker, steps_per_epoch)`` covering ``num_samples`` once per epoch.

    Rounded up so that each worker yields whole accumulation windows' share: a rank's micro-batches per
    epoch, ``workers * batches_per_worker``, equal ``steps_per_epoch * accum``.
    """
    workers = max(1, workers)
    rounds = max(1, math.ceil(num_samples / (batch_size * world * workers * accum)))
    return rounds * accum, rounds * workers


class ShardSource:
    """Stage 0: an endless sequence of shard names for one worker's stream."""

    def __init__(self, plan: ShardPlan, mode: str, ctx: StreamContext):
        self.plan, self.mode, self.ctx = plan, mode, ctx

    def __call__(self) -> Iterator[str]:
        ctx = self.ctx
        if self.mode == "resampled":
            # Independent draws per worker: no worker ever lacks shards, so no rank can run short.
            rng = random.Random(ctx.seed_for("shards"))
            while True:
                yield rng.choice(self.plan.shards)
        # Split mode: one shard order per epoch, the same on every rank and worker, then sliced.
        order = list(self.plan.shards)
        random.Random(derive_seed(ctx.seed, ctx.epoch, "split")).shuffle(order)
        mine = order[ctx.rank::ctx.world][ctx.worker::ctx.workers]
        while True:
            yield from mine


class PairedSamples:
    """Stage 1: shard names -> ``(region TarSample, label TarSample)`` pairs joined by key.

    The label shard (small JSON members) is read whole into a dict first and the region shard is then
    streamed, so the join works whatever order the labelling job wrote keys in. Region samples without a
    label (unlabelled or rejected by the manifest) and labels without regions are counted, not fatal.
    """

    def __init__(self, plan: ShardPlan, stats: Counter, max_empty: int):
        self.plan, self.stats, self.max_empty = plan, stats, max_empty
        self.warned: set[tuple[str, str]] = set()

    def _warn(self, shard: str, what: str, detail: Any) -> None:
        if (shard, what) not in self.warned:
            self.warned.add((shard, what))
            log.warning("shard %s: %s (%s); skipped", shard, what, detail)

    def _labels(self, shard: str) -> tuple[dict[str, TarSample], set[str]]:
        """The shard's label samples by key, and the keys its manifest rejected."""
        labels: dict[str, TarSample] = {}
        try:
            for sample in iter_tar(label_shard_uri(self.plan.labelset, shard)):
                labels[sample.key] = sample
        except ShardReadError as exc:
            self.stats["damaged_label_shards"] += 1
            self._warn(shard, "damaged label shard", exc.reason)
        try:
            table = _manifest_table(self.plan.labelset, shard, ["key", "status"])
        except (OSError, ValueError) as exc:
            self._warn(shard, "manifest unreadable", exc)
            return labels, set()
        errors = {k for k, s in zip(table.column("key").to_pylist(), table.column("status").to_pylist())
                  if s != OK}
        for key in errors:
            labels.pop(key, None)
        return labels, errors

    def __call__(self, shards: Iterator[str]) -> Iterator[tuple[TarSample, TarSample]]:
        empty = 0
        for shard in shards:
            labels, errors = self._labels(shard)
            found = 0
            try:
                for region in iter_tar(fs.join(self.plan.regions, f"{shard}.tar")):
                    if region.key in errors:
                        self.stats["manifest_errors"] += 1
                        continue
                    label = labels.pop(region.key, None)
                    if label is None:
                        self.stats["unlabelled"] += 1
                        continue
                    found += 1
                    yield region, label
            except ShardReadError as exc:
                self.stats["damaged_region_shards"] += 1
                self._warn(shard, "damaged region shard", exc.reason)
            if labels:
                self.stats["labels_without_regions"] += len(labels)
                self._warn(shard, f"{len(labels)} labels have no region sample", sorted(labels)[:3])
            empty = 0 if found else empty + 1
            if empty > self.max_empty:
                raise SgaError(f"{empty} shards in a row gave no usable sample (last: {shard} of "
                               f"{self.plan.regions} and {self.plan.labelset}); check that the shards are "
                               "readable and their keys match")


# What a malformed label JSON raises while it is read (base64 and JSON errors are ValueErrors).
MALFORMED = (ValueError, TypeError, KeyError, AttributeError)


def label_fields(sample: TarSample) -> tuple[str, list[tuple[int, int]], int, np.ndarray]:
    """``(caption, phrase spans, num_regions, align bool [P, R])`` of a label sample, read straight from its
    JSON; raises one of :data:`MALFORMED` when a field the student uses is missing or out of range.

    ``decode_labels`` also converts and checks every phrase's teacher boxes, which the student needs only
    to recompute M (:class:`DecodeSamples` then uses it); that made it most of the label decoding time.
    """
    if sample.problems or LABEL_MEMBER not in sample.members:
        raise ValueError("; ".join(sample.problems) or f"missing member {LABEL_MEMBER}")
    body = json.loads(sample.members[LABEL_MEMBER])
    caption, num_regions = body["caption"], body["num_regions"]
    spans = [(start, end) for start, end in (p["span"] for p in body["phrases"])]
    if not isinstance(caption, str) or type(num_regions) is not int or num_regions < 0:
        raise ValueError("caption must be a string and num_regions a non-negative integer")
    for start, end in spans:
        if type(start) is not int or type(end) is not int or not 0 <= start < end <= len(caption):
            raise ValueError(f"phrase span [{start}, {end}) is outside the caption")
    size = len(spans) * num_regions
    bits = np.frombuffer(base64.b64decode(body["align"], validate=True), dtype=np.uint8)
    if bits.size != (size + 7) // 8:
        raise ValueError(f"align has {bits.size} bytes, expected {(size + 7) // 8}")
    align = np.unpackbits(bits, count=size).view(bool).reshape(len(spans), num_regions)
    return caption, spans, num_regions, align


def _positive_int(value: Any) -> bool:
    return type(value) is int and value > 0


def region_fields(sample: TarSample) -> dict[str, Any]:
    """``{"boxes", "features", "cls_prob", "image_w", "image_h"}`` of a region sample (the layout of
    ``shards.regions``), with the checks of ``check_regions`` done in fewer numpy calls; raises one of
    :data:`MALFORMED` on bad content. ``decode_regions`` also keeps the JSON's extra fields and builds a
    message per problem, which the loader, counting bad samples, does not use."""
    members = sample.members
    if sample.problems:
        raise ValueError("; ".join(sample.problems))
    info = json.loads(members["json"])
    boxes, features = load_npy(members["boxes.npy"]), load_npy(members["features.npy"])
    cls_prob = load_npy(members["cls_prob.npy"]) if "cls_prob.npy" in members else None
    rows = info["num_boxes"]
    if not (_positive_int(info["image_w"]) and _positive_int(info["image_h"])
            and boxes.dtype == np.float32 and boxes.shape == (rows, 4)
            and features.dtype == np.float16 and features.ndim == 2 and features.shape[0] == rows
            and features.shape[1] > 0 and np.isfinite(boxes).all() and np.isfinite(features).all()):
        raise ValueError("region arrays or image size break the format")
    if cls_prob is not None and not (
            cls_prob.dtype == np.float16 and cls_prob.ndim == 2 and cls_prob.shape[0] == rows
            # min and max are NaN when a value is, and NaN fails both comparisons.
            and (cls_prob.size == 0 or (cls_prob.min() >= 0 and cls_prob.max() <= 1))):
        raise ValueError("cls_prob breaks the format")
    return {"boxes": boxes, "features": features, "cls_prob": cls_prob, "image_w": info["image_w"],
            "image_h": info["image_h"]}


class DecodeSamples:
    """Stage 3: raw pairs -> the per-sample dicts :class:`student.collate.Collator` takes.

    Keys: key, caption, phrase_spans [(start, end)], align bool [P, R], boxes float32 [R, 4] pixel xyxy,
    features float16 [R, D], cls_prob float16 [R, C] or None, image_w, image_h.

    Regions are decoded and checked whole (``decode_regions``). Labels are read by :func:`label_fields`
    (the fields the student uses), or with re-thresholding by ``decode_labels`` (the teacher boxes too).
    """

    def __init__(self, plan: ShardPlan, stats: Counter):
        self.plan, self.stats = plan, stats

    def __call__(self, pairs: Iterator[tuple[TarSample, TarSample]]) -> Iterator[dict[str, Any]]:
        thresholds = self.plan.thresholds
        for region_raw, label_raw in pairs:
            try:
                region = region_fields(region_raw)
            except MALFORMED:
                self.stats["bad_regions"] += 1
                continue
            try:
                if thresholds is None:
                    caption, spans, num_regions, align = label_fields(label_raw)
                else:
                    label = decode_labels(label_raw)
                    caption, num_regions = label.caption, label.num_regions
                    spans = [(p.start, p.end) for p in label.phrases]
            except (SampleError, *MALFORMED):
                self.stats["bad_labels"] += 1
                continue
            if num_regions != len(region["boxes"]):
                # The labels were aligned to another region set: M's columns would point at wrong regions.
                self.stats["region_count_mismatch"] += 1
                continue
            if thresholds is not None:
                align = alignment_matrix(label.phrases, region["boxes"], *thresholds)
            self.stats["samples"] += 1
            yield {"key": region_raw.key, "caption": caption, "phrase_spans": spans, "align": align, **region}


class StudentStream(IterableDataset):
    """One rank's stream of ``(batch, stats)`` for one epoch; ``batch`` is the collator's dict and ``stats``
    the worker's counters so far this epoch (:data:`STAT_KEYS`) plus ``worker``, its logical index."""

    def __init__(self, plan: ShardPlan, cfg: DataConfig, collate: Collate, rank: int, world: int,
                 batches_per_worker: int, shared_epoch: SharedEpoch, start: StreamPosition):
        super().__init__()
        self.plan, self.cfg, self.collate = plan, cfg, collate
        self.rank, self.world = rank, world
        self.batches_per_worker = batches_per_worker
        self.shared_epoch, self.start = shared_epoch, start

    def __iter__(self) -> Iterator[tuple[dict[str, Any], dict[str, int]]]:
        info = get_worker_info()
        workers, physical = (info.num_workers, info.id) if info is not None else (1, 0)
        epoch = self.shared_epoch.get()
        consumed = self.start.batch if epoch == self.start.epoch else 0
        # The DataLoader restarts its round robin at worker 0: rotate so it is the worker that was next.
        worker = (physical + consumed) % workers
        skip = consumed // workers + (1 if worker < consumed % workers else 0)
        ctx = StreamContext(self.cfg.seed, epoch, self.rank, self.world, worker, workers)
        stats: Counter = Counter()
        max_empty = len(self.plan.shards) * (10 if self.cfg.mode == "resampled" else 1)
        pipeline = wds.DataPipeline([
            ShardSource(self.plan, self.cfg.mode, ctx),
            PairedSamples(self.plan, stats, max_empty),
            wds.shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer // 2,
                        rng=random.Random(ctx.seed_for("shuffle"))),
            DecodeSamples(self.plan, stats),
            wds.batched(self.cfg.batch_size, collation_fn=None, partial=False),
        ]).with_epoch(self.batches_per_worker)
        for index, samples in enumerate(pipeline):
            if index < skip:
                continue  # consumed before the interruption; replayed only to reach the same state
            generator = torch.Generator().manual_seed(ctx.seed_for("batch", index))
            yield self.collate(samples, generator), {"worker": worker, **{k: stats[k] for k in STAT_KEYS}}


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers share the rank's cores with the training step


def _as_is(item: Any) -> Any:
    """The DataLoader's per-item hook: batches are final (its default would walk and convert them)."""
    return item


class StudentLoader:
    """Epochs of ``(batch, stats)`` for one rank: call :meth:`set_epoch` before iterating each epoch.

    Every iteration yields exactly ``steps_per_epoch * accum`` micro-batches on every rank, except the
    epoch of ``start``, which yields the ones not consumed yet.
    """

    def __init__(self, plan: ShardPlan, cfg: DataConfig, collate: Collate, rank: int, world: int,
                 accum: int, start_step: int = 0, pin_memory: bool = False):
        slots = world * max(1, cfg.workers)
        if cfg.mode == "split" and len(plan.shards) < slots:
            # A worker without shards would end its epoch at once and leave its rank short: DDP would hang.
            raise SgaError(f"split mode needs at least ranks x workers = {world} x {max(1, cfg.workers)} = "
                           f"{slots} shards, but {plan.labelset} has {len(plan.shards)} usable; use "
                           "--data-mode resampled, fewer workers or more shards")
        self.plan = plan
        self.batches_per_worker, self.steps_per_epoch = epoch_geometry(
            plan.num_samples, cfg.batch_size, world, cfg.workers, accum)
        self.start = StreamPosition(start_step // self.steps_per_epoch,
                                    (start_step % self.steps_per_epoch) * accum)
        self.shared_epoch = SharedEpoch(self.start.epoch)
        self.stream = StudentStream(plan, cfg, collate, rank, world, self.batches_per_worker,
                                    self.shared_epoch, self.start)
        self.loader = DataLoader(self.stream, batch_size=None, collate_fn=_as_is, num_workers=cfg.workers,
                                 persistent_workers=cfg.workers > 0, pin_memory=pin_memory,
                                 worker_init_fn=_worker_init if cfg.workers > 0 else None)

    def set_epoch(self, epoch: int) -> None:
        self.shared_epoch.set(epoch)

    def __iter__(self) -> Iterator[tuple[dict[str, Any], dict[str, int]]]:
        return iter(self.loader)


def decoded_samples(plan: ShardPlan, shards: list[str]) -> Iterator[dict[str, Any]]:
    """The decoded samples of ``shards`` in order, no shuffling or batching (for inspection and tests)."""
    stats: Counter = Counter()
    yield from DecodeSamples(plan, stats)(PairedSamples(plan, stats, len(shards))(iter(shards)))

