"""Label sets the experiment derives from ``sga label``'s: ground-truth M, random subsets, and M's quality.

* :func:`write_gt_labelset`: the world's hidden truth as a label set (phrases and their visible objects'
  true boxes with score 1), written with :mod:`shards.labels` for exactly the samples a reference label
  set kept, so a student pretrained on it differs from the pseudo-label run only in M.
* :func:`write_subset`: a label set holding only the given keys (the random one-eighth pretraining set).
  The student streams only labelled samples, so the subset is also its pretraining corpus.
* :func:`label_quality`: precision and recall of M against the truth at several teacher-score thresholds,
  cell by cell (:func:`pipeline.matching.score_alignment`, the measure ``sga label --gt`` reports).

Every set is finished like ``sga label``'s: tar, manifest, marker last, ``labelset.json``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from pipeline.matching import read_ground_truth, score_alignment
from shards import fs
from shards.images import iter_image_shard
from shards.labels import (
    LabelRecord,
    LabelSetInfo,
    LabelShardWriter,
    PhraseLabel,
    alignment_matrix,
    iter_label_shard,
    labelset_uri,
    list_label_shards,
    read_labelset_info,
    write_labelset_info,
)
from shards.manifest import ManifestRow, read_marker, write_manifest, write_marker
from shards.regions import iter_region_shard

GT_TEACHER = "ground-truth"


def label_shards(labelset: str) -> list[str]:
    """Finished shards of a label set (marker written), in name order."""
    return [n for n in list_label_shards(labelset) if read_marker(labelset, n) is not None]


def labelled_keys(labelset: str) -> list[str]:
    """Keys of every labelled sample of a label set, in shard and tar order."""
    return [rec.key for shard in label_shards(labelset) for rec in iter_label_shard(labelset, shard)]


def _finish_shard(labelset: str, shard: str, rows: list[ManifestRow]) -> None:
    write_manifest(labelset, shard, rows)
    write_marker(labelset, shard, {"ok": len(rows), "samples": len(rows)})


def _row(rec: LabelRecord, shard: str) -> ManifestRow:
    return ManifestRow(rec.key, shard, "ok", n_phrases=len(rec.phrases), n_regions=rec.num_regions,
                       n_positives=int(rec.align.sum()))


def write_subset(source: str, out_root: str, keys: Iterable[str]) -> str:
    """``OUT_ROOT/<labelset_id>``: the records of ``source`` whose key is in ``keys``; returns its URI."""
    info = read_labelset_info(source)
    out = labelset_uri(out_root, info)
    wanted = set(keys)
    for shard in label_shards(source):
        rows = []
        with LabelShardWriter(out, shard, info) as writer:
            for rec in iter_label_shard(source, shard):
                if rec.key in wanted:
                    writer.write(rec)
                    rows.append(_row(rec, shard))
        _finish_shard(out, shard, rows)
    write_labelset_info(out, info)
    return out


def gt_info(reference: LabelSetInfo, world_seed: int) -> LabelSetInfo:
    """Provenance of the ground-truth set: the reference's thresholds, the world as its 'teacher'."""
    return LabelSetInfo(teacher_name=GT_TEACHER, teacher_fingerprint=f"world-seed-{world_seed}",
                        extractor="world-gt-phrases", score_floor=0.0, score_threshold=0.5,
                        iou_threshold=reference.iou_threshold, top_k=reference.top_k,
                        created_at=reference.created_at)


def write_gt_labelset(world: str, reference: str, out_root: str, world_seed: int) -> str:
    """Ground-truth M for the samples ``reference`` labelled; returns ``OUT_ROOT/<labelset_id>``.

    Phrases are the world's caption phrases (spans from its generator, not spaCy's); a phrase's boxes are
    its visible objects' true boxes, scored 1, so M marks the regions with IoU >= the reference's IoU
    threshold to a named object. Invisible phrases (things the caption names but the image lacks) keep
    an empty row of M.
    """
    info = gt_info(read_labelset_info(reference), world_seed)
    out = labelset_uri(out_root, info)
    regions_uri = fs.join(world, "regions")
    for shard in label_shards(reference):
        keep = {rec.key for rec in iter_label_shard(reference, shard)}
        truth = read_ground_truth(fs.join(world, "gt"), shard)
        captions = {s.key: s.caption or "" for s in iter_image_shard(fs.join(world, "images"), shard)}
        rows = []
        with LabelShardWriter(out, shard, info) as writer:
            for region in iter_region_shard(regions_uri, shard):
                if region.key not in keep:
                    continue
                gt = truth.get(region.key)
                phrases = []
                caption = captions[region.key]
                if gt is not None:
                    for (start, end), boxes, visible in zip(gt.spans, gt.boxes, gt.visible):
                        kept = boxes if visible else np.zeros((0, 4), np.float32)
                        phrases.append(PhraseLabel(caption[start:end], start, end, kept.astype(np.float32),
                                                   np.ones(len(kept), np.float32)))
                align = alignment_matrix(phrases, region.boxes, info.score_threshold, info.iou_threshold)
                rec = LabelRecord(region.key, caption, region.image_w, region.image_h, region.num_boxes,
                                  phrases, align)
                writer.write(rec)
                rows.append(_row(rec, shard))
        _finish_shard(out, shard, rows)
    write_labelset_info(out, info)
    return out


def label_quality(labelset: str, world: str, thresholds: Iterable[float]) -> list[dict[str, float]]:
    """Precision/recall of M (recomputed at each teacher-score threshold) against the world's truth.

    Returns one dict per threshold: ``threshold, tp, fp, fn, precision, recall, positives_per_sample``.
    """
    info = read_labelset_info(labelset)
    thresholds = sorted(float(t) for t in thresholds)
    counts = {t: np.zeros(3, np.int64) for t in thresholds}
    samples = 0
    for shard in label_shards(labelset):
        truth = read_ground_truth(fs.join(world, "gt"), shard)
        boxes = {r.key: r.boxes for r in iter_region_shard(fs.join(world, "regions"), shard)}
        for rec in iter_label_shard(labelset, shard):
            if rec.key not in boxes or rec.key not in truth:
                continue
            samples += 1
            spans = [(p.start, p.end) for p in rec.phrases]
            for t in thresholds:
                align = alignment_matrix(rec.phrases, boxes[rec.key], t, info.iou_threshold)
                counts[t] += score_alignment(spans, align, truth[rec.key], boxes[rec.key], info.iou_threshold)
    out = []
    for t in thresholds:
        tp, fp, fn = (int(v) for v in counts[t])
        out.append({"threshold": t, "tp": tp, "fp": fp, "fn": fn,
                    "precision": tp / (tp + fp) if tp + fp else None,
                    "recall": tp / (tp + fn) if tp + fn else None,
                    "positives_per_sample": (tp + fp) / max(1, samples)})
    return out
