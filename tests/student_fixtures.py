"""Real region and label shard sets for the student tests.

:func:`make_shards` writes a small hand-made set (sizes and damage chosen by the test);
:func:`labels_from_world` turns a generated synthetic world's hidden ground truth into a finished label set,
standing in for ``sga label`` (ground-truth boxes act as the teacher's, with score 1).
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq

from shards import fs
from shards.labels import (
    LabelRecord,
    LabelSetInfo,
    LabelShardWriter,
    PhraseLabel,
    alignment_matrix,
    write_labelset_info,
)
from shards.labels import labelset_uri as labelset_dir
from shards.manifest import ManifestRow, write_manifest, write_marker
from shards.regions import RegionRecord, RegionShardWriter, read_regions_info, write_regions_info

WORDS = ("red", "blue", "green", "small", "large", "striped")
NOUNS = ("circle", "square", "triangle", "star", "ring")


def make_info(**overrides) -> LabelSetInfo:
    fields = dict(teacher_name="fixture", teacher_fingerprint="fixture-0", extractor="fixture",
                  score_floor=0.05, score_threshold=0.5, iou_threshold=0.5, top_k=4)
    return LabelSetInfo(**{**fields, **overrides})


def _sample(rng: np.random.Generator, key: str, info: LabelSetInfo, dim: int, classes: int):
    w, h = int(rng.integers(96, 160)), int(rng.integers(96, 160))
    r = int(rng.integers(6, 12))
    xy = rng.uniform(0, 0.6, (r, 2)) * [w, h]
    wh = rng.uniform(0.2, 0.4, (r, 2)) * [w, h]
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    features = rng.normal(size=(r, dim)).astype(np.float16)
    cls = rng.random((r, classes))
    region = RegionRecord(key, boxes, features, (cls / cls.sum(1, keepdims=True)).astype(np.float16), w, h)
    caption, phrases = "", []
    for i in range(int(rng.integers(0, 4))):
        text = f"a {WORDS[rng.integers(len(WORDS))]} {NOUNS[rng.integers(len(NOUNS))]}"
        caption += (" and " if i else "") + text
        target = boxes[rng.integers(r)]
        k = int(rng.integers(1, 4))
        tboxes = (target + rng.normal(0, 3, (k, 4))).astype(np.float32)
        scores = np.sort(rng.uniform(info.score_floor, 1.0, k))[::-1].astype(np.float32)
        phrases.append(PhraseLabel(text, len(caption) - len(text), len(caption), tboxes, scores))
    caption = caption or "nothing to see here"
    align = alignment_matrix(phrases, boxes, info.score_threshold, info.iou_threshold)
    return region, LabelRecord(key, caption, w, h, r, phrases, align)


def make_shards(root: str, sizes: list[int], seed: int = 0, dim: int = 16, classes: int = 5,
                errors_every: int = 0, unlabelled_every: int = 0,
                info: LabelSetInfo | None = None) -> tuple[str, str]:
    """Write ``ROOT/regions`` and a finished label set under ``ROOT/labels``; returns their URIs.

    Shard ``i`` holds ``sizes[i]`` samples; every ``errors_every``-th sample is a manifest error row (no
    label) and every ``unlabelled_every``-th has regions but neither a label nor a manifest row.
    """
    info = info or make_info()
    regions, labels = os.path.join(root, "regions"), labelset_dir(os.path.join(root, "labels"), info)
    rng = np.random.default_rng(seed)
    write_regions_info(regions, dim, classes, [f"c{i}" for i in range(classes)], "fixture")
    write_labelset_info(labels, info)
    for s, size in enumerate(sizes):
        shard = f"{s:05d}"
        rows = []
        with RegionShardWriter(regions, shard) as rw, LabelShardWriter(labels, shard, info) as lw:
            for i in range(size):
                key = f"{s:05d}{i:04d}"
                region, label = _sample(rng, key, info, dim, classes)
                rw.write(region)
                if unlabelled_every and i % unlabelled_every == unlabelled_every - 1:
                    continue
                if errors_every and i % errors_every == errors_every - 1:
                    rows.append(ManifestRow(key, shard, "error", "teacher", "fixture error"))
                    continue
                lw.write(label)
                rows.append(ManifestRow(key, shard, "ok", n_phrases=len(label.phrases), n_regions=len(
                    region.boxes), n_positives=int(label.align.sum())))
        write_manifest(labels, shard, rows)
        write_marker(labels, shard, {"ok": sum(r.status == "ok" for r in rows)})
    return regions, labels


def labels_from_world(world: str, labels_root: str, info: LabelSetInfo | None = None) -> str:
    """A finished label set for ``WORLD/regions`` from ``WORLD/gt`` (visible phrases' true boxes)."""
    from shards.regions import iter_region_shard

    info = info or make_info(teacher_name="ground-truth")
    regions = fs.join(world, "regions")
    read_regions_info(regions)
    out = labelset_dir(labels_root, info)
    write_labelset_info(out, info)
    for name in fs.list_dir(regions, ".tar"):
        shard = name[:-4]
        gt = pq.read_table(os.path.join(world, "gt", f"{shard}.parquet")).to_pylist()
        by_key: dict[str, list[dict]] = {}
        for row in gt:
            by_key.setdefault(row["key"], []).append(row)
        captions = _captions(world, shard)
        rows = []
        with LabelShardWriter(out, shard, info) as writer:
            for region in iter_region_shard(regions, shard):
                phrases = []
                for row in by_key.get(region.key, []):
                    boxes = np.asarray(row["boxes"] if row["visible"] else [], np.float32).reshape(-1, 4)
                    phrases.append(PhraseLabel(row["phrase"], row["start"], row["end"], boxes,
                                               np.ones(len(boxes), np.float32)))
                align = alignment_matrix(phrases, region.boxes, info.score_threshold, info.iou_threshold)
                writer.write(LabelRecord(region.key, captions[region.key], region.image_w, region.image_h,
                                         region.num_boxes, phrases, align))
                rows.append(ManifestRow(region.key, shard, "ok", n_phrases=len(phrases),
                                        n_regions=region.num_boxes, n_positives=int(align.sum())))
        write_manifest(out, shard, rows)
        write_marker(out, shard, {"ok": len(rows)})
    return out


def _captions(world: str, shard: str) -> dict[str, str]:
    from shards.images import iter_image_shard

    return {s.key: s.caption or "" for s in iter_image_shard(os.path.join(world, "images"), shard)}
