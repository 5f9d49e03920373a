"""Teacher boxes -> phrase labels -> the phrase x region alignment matrix, and its score against ground truth.

Box work here is vectorised numpy over one sample: ``alignment_matrix`` (``shards.labels``) does the IoU
matching, this module cleans the teacher's output before it is stored and, for the synthetic world, counts
true/false positives of the matrix against the world's hidden ground truth. Pairing a caption's few phrases
with the true ones is plain Python, where numpy's per-call cost outweighed the arithmetic (scoring went from
160 to 95 us per sample over the benchmark world's 2,300 scored samples, with the same counts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shards import fs
from shards.boxes import box_area, box_iou, clip_boxes
from shards.labels import PhraseLabel

Span = tuple[int, int]


def phrase_labels(caption: str, spans: Sequence[Span], grounded: Sequence[tuple[np.ndarray, np.ndarray]],
                  image_w: int, image_h: int, score_floor: float, top_k: int) -> list[PhraseLabel]:
    """One :class:`PhraseLabel` per span from the teacher's ``(boxes [K, 4], scores [K])`` of that span
    (``PhraseBoxes`` fields, same order as ``spans``).

    Boxes are clipped to the image; non-finite or empty boxes and scores below ``score_floor`` are dropped;
    the rest is sorted by score (stable, so ties keep the teacher's order) and cut to ``top_k``.
    """
    if len(spans) != len(grounded):
        raise ValueError(f"{len(grounded)} teacher answers for {len(spans)} phrases")
    # All phrases' boxes are cleaned at once (a sample has ~10 phrases x 10 boxes: the per-call overhead of
    # numpy, not the arithmetic, is the cost), then split back by phrase.
    boxes = [np.asarray(b, np.float32).reshape(-1, 4) for b, _ in grounded]
    scores = [np.asarray(s, np.float32).reshape(-1) for _, s in grounded]
    counts = [len(s) for s in scores]
    all_boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32)
    all_scores = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    finite = np.isfinite(all_boxes).all(axis=1) & np.isfinite(all_scores)
    all_boxes = clip_boxes(np.where(finite[:, None], all_boxes, 0), image_w, image_h)
    keep = finite & (all_scores >= score_floor) & (box_area(all_boxes) > 0)
    labels, offset = [], 0
    for (start, end), count in zip(spans, counts):
        kept = offset + np.flatnonzero(keep[offset: offset + count])
        order = kept[np.argsort(-all_scores[kept], kind="stable")[:top_k]]
        labels.append(PhraseLabel(caption[start:end], int(start), int(end), all_boxes[order],
                                  all_scores[order]))
        offset += count
    return labels


@dataclass
class GroundTruth:
    """The world's hidden truth for one caption: G phrases with their spans, pixel boxes and visibility."""

    spans: list[Span]
    boxes: list[np.ndarray]     # per phrase float32 [K, 4] pixel xyxy
    visible: list[bool]


def read_ground_truth(gt_uri: str, shard: str) -> dict[str, GroundTruth]:
    """``GT/NNNNN.parquet`` (key, phrase, start, end, boxes, visible) -> ``{key: GroundTruth}``."""
    data = fs.read_bytes(fs.join(gt_uri, f"{shard}.parquet"))
    table = pq.read_table(pa.BufferReader(data), columns=["key", "start", "end", "boxes", "visible"])
    out: dict[str, GroundTruth] = {}
    cols = (table.column(n).to_pylist() for n in ("key", "start", "end", "boxes", "visible"))
    for key, start, end, boxes, visible in zip(*cols):
        gt = out.setdefault(str(key), GroundTruth([], [], []))
        gt.spans.append((int(start), int(end)))
        gt.boxes.append(np.asarray(boxes or [], np.float32).reshape(-1, 4))
        gt.visible.append(bool(visible))
    return out


def gt_alignment(gt: GroundTruth, region_boxes: np.ndarray, iou_threshold: float) -> np.ndarray:
    """bool ``[G, R]``: region r truly shows phrase g (IoU >= threshold with one of g's visible boxes)."""
    region_boxes = np.asarray(region_boxes, np.float32).reshape(-1, 4)
    out = np.zeros((len(gt.spans), len(region_boxes)), dtype=bool)
    shown = [g for g, (boxes, visible) in enumerate(zip(gt.boxes, gt.visible)) if visible and len(boxes)]
    if not shown or not len(region_boxes):
        return out
    # One IoU call for every true box, then an OR over each phrase's rows (they are contiguous).
    hits = box_iou(np.concatenate([gt.boxes[g] for g in shown]), region_boxes) >= iou_threshold   # [K, R]
    starts = np.cumsum([0] + [len(gt.boxes[g]) for g in shown[:-1]])
    out[shown] = np.logical_or.reduceat(hits, starts, axis=0)
    return out


def span_iou(a: Span, b: Span) -> float:
    """IoU of two character intervals ``[start, end)``; 0 when both are empty."""
    inter = max(min(a[1], b[1]) - max(a[0], b[0]), 0)
    union = (a[1] - a[0]) + (b[1] - b[0]) - inter
    return inter / union if union > 0 else 0.0


def score_alignment(spans: Sequence[Span], align: np.ndarray, gt: GroundTruth, region_boxes: np.ndarray,
                    iou_threshold: float, min_span_overlap: float = 0.5) -> tuple[int, int, int]:
    """``(tp, fp, fn)`` over phrase x region cells of ``align`` (bool ``[P, R]``) against the truth.

    Extracted phrases are paired one to one with true phrases by character overlap (greedy, best first,
    IoU of spans >= ``min_span_overlap``). A cell is a true positive when it is set in both matrices; cells of
    a phrase without a true partner are false positives; true cells of an unpaired true phrase are misses.
    """
    truth = gt_alignment(gt, region_boxes, iou_threshold)                  # [G, R]
    pairs = _pair_spans(spans, gt.spans, min_span_overlap)
    tp = int((align[[p for p, _ in pairs]] & truth[[g for _, g in pairs]]).sum()) if pairs else 0
    # Every set cell of align is a tp or an fp; every true cell (of a paired phrase or not) a tp or an fn.
    return tp, int(align.sum()) - tp, int(truth.sum()) - tp


def _pair_spans(a: Sequence[Span], b: Sequence[Span], threshold: float) -> list[tuple[int, int]]:
    """Greedy one-to-one pairs ``(i, j)`` of spans of ``a`` and ``b``, best :func:`span_iou` first (ties
    in row-major order), down to ``threshold``. Plain Python: a caption has a handful of phrases, where
    numpy's per-call cost is most of the work."""
    scored = []
    for i, span_a in enumerate(a):
        for j, span_b in enumerate(b):
            overlap = span_iou(span_a, span_b)
            if overlap >= threshold:
                scored.append((-overlap, i, j))      # ties sort by (i, j): row-major
    pairs, used_a, used_b = [], set(), set()
    for _, i, j in sorted(scored):
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            pairs.append((i, j))
    return pairs
