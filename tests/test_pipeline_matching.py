"""Teacher boxes -> phrase labels -> alignment, and scoring the alignment against ground truth."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.matching import (
    GroundTruth,
    gt_alignment,
    phrase_labels,
    read_ground_truth,
    score_alignment,
    span_iou,
)
from shards.boxes import box_area, box_iou
from shards.labels import alignment_matrix

REGIONS = np.array([[0, 0, 10, 10], [20, 20, 40, 40], [0, 0, 40, 40]], np.float32)


def test_phrase_labels_clean_the_teachers_boxes():
    caption = "a red box and a blue box"
    found = [
        (np.array([[0, 0, 10, 10], [np.nan, 0, 5, 5], [-5, -5, 50, 50], [3, 3, 3, 9]], np.float32),
         np.array([0.9, 0.8, 0.6, 0.5], np.float32)),
        (np.array([[20, 20, 40, 40], [0, 0, 1, 1], [1, 1, 2, 2]], np.float32),
         np.array([0.2, 0.7, 0.01], np.float32)),
    ]
    labels = phrase_labels(caption, [(0, 9), (14, 24)], found, 40, 40, score_floor=0.05, top_k=2)
    assert [p.text for p in labels] == ["a red box", "a blue box"]
    # NaN and empty boxes dropped, the rest clipped to the image, at most top_k, best first.
    np.testing.assert_array_equal(labels[0].boxes, [[0, 0, 10, 10], [0, 0, 40, 40]])
    np.testing.assert_allclose(labels[0].scores, [0.9, 0.6])
    np.testing.assert_allclose(labels[1].scores, [0.7, 0.2])      # re-sorted, 0.01 below the floor
    align = alignment_matrix(labels, REGIONS, score_threshold=0.5, iou_threshold=0.5)
    np.testing.assert_array_equal(align, [[True, False, True], [False, False, False]])
    align = alignment_matrix(labels, REGIONS, score_threshold=0.1, iou_threshold=0.5)
    np.testing.assert_array_equal(align[1], [False, True, False])


def test_span_iou_is_interval_iou():
    ov = [[span_iou(a, b) for b in [(0, 5), (0, 10), (30, 40)]] for a in [(0, 10), (20, 25)]]
    assert ov == [[0.5, 1.0, 0.0], [0.0, 0.0, 0.0]]
    assert span_iou((3, 7), (5, 11)) == 2 / 8 and span_iou((4, 4), (4, 4)) == 0.0


def test_score_alignment_counts_cells_against_the_truth():
    gt = GroundTruth(spans=[(0, 9), (14, 24), (30, 40)],
                     boxes=[np.array([[0, 0, 10, 10]], np.float32), np.array([[20, 20, 40, 40]], np.float32),
                            np.zeros((0, 4), np.float32)],
                     visible=[True, True, False])
    truth = gt_alignment(gt, REGIONS, 0.5)
    np.testing.assert_array_equal(truth, [[1, 0, 0], [0, 1, 0], [0, 0, 0]])
    # Phrase 0 matches gt 0 with one right and one wrong region; phrase 1 ("blue" only) pairs with gt 1 by
    # span overlap but finds nothing; phrase 2 has no true partner, so its cell is a false positive.
    spans = [(0, 9), (16, 24), (50, 55)]
    align = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0]], bool)
    assert score_alignment(spans, align, gt, REGIONS, 0.5) == (1, 2, 1)
    # No extracted phrase at all: every true cell is missed.
    assert score_alignment([], np.zeros((0, 3), bool), gt, REGIONS, 0.5) == (0, 0, 2)


def test_spans_pair_one_to_one_best_first_ties_in_order():
    boxes = [np.array([[0, 0, 10, 10]], np.float32), np.array([[20, 20, 40, 40]], np.float32)]
    twins = GroundTruth(spans=[(0, 10), (0, 10)], boxes=boxes, visible=[True, True])      # regions 0 and 1
    # One phrase, two equally good true partners: the first one wins; the other's true cell is missed.
    assert score_alignment([(0, 10)], np.array([[1, 0, 0]], bool), twins, REGIONS, 0.5) == (1, 0, 1)
    # Two phrases after one true phrase: the better overlap (1.0 over 0.9) takes it, the other is unpaired.
    one = GroundTruth(spans=[(0, 10)], boxes=boxes[:1], visible=[True])
    align = np.array([[1, 0, 0], [1, 0, 0]], bool)
    assert score_alignment([(0, 9), (0, 10)], align, one, REGIONS, 0.5) == (1, 1, 0)
    # Below the span overlap threshold nothing pairs.
    assert score_alignment([(0, 4)], np.array([[1, 0, 0]], bool), one, REGIONS, 0.5) == (0, 1, 1)


def test_read_ground_truth_of_a_world(tmp_path):
    from pipeline_fixtures import make_world

    world = make_world(tmp_path / "w", samples=8, per_shard=8)
    truth = read_ground_truth(str(world / "gt"), "00000")
    assert truth and all(len(g.spans) == len(g.boxes) == len(g.visible) for g in truth.values())
    assert all(b.shape[1] == 4 for g in truth.values() for b in g.boxes)
    assert any(v for g in truth.values() for v in g.visible)


@st.composite
def phrase_boxes(draw):
    """Per phrase: K boxes (some degenerate, some out of the 40 x 40 image, some NaN) and their scores."""
    out = []
    for _ in range(draw(st.integers(0, 4))):
        k = draw(st.integers(0, 4))
        coords = draw(st.lists(st.sampled_from([-5.0, 0.0, 3.0, 10.0, 20.0, 45.0, float("nan")]),
                               min_size=4 * k, max_size=4 * k))
        scores = draw(st.lists(st.sampled_from([0.0, 0.01, 0.3, 0.3, 0.9]), min_size=k, max_size=k))
        out.append((np.array(coords, np.float32).reshape(k, 4), np.array(scores, np.float32)))
    return out


@settings(max_examples=60, deadline=None)
@given(phrase_boxes(), st.booleans())
def test_vectorised_matching_equals_the_per_phrase_rules(found, visible_first):
    """The batched cleaning and truth matrix give what the rules say, phrase by phrase."""
    caption = "x" * 40
    spans = [(i, i + 1) for i in range(len(found))]
    labels = phrase_labels(caption, spans, found, 40, 40, score_floor=0.05, top_k=2)
    for (boxes, scores), label in zip(found, labels):
        finite = np.isfinite(boxes).all(1) & np.isfinite(scores)
        clipped = np.clip(np.where(finite[:, None], boxes, 0), 0, 40)
        keep = np.flatnonzero(finite & (scores >= 0.05) & (box_area(clipped) > 0))
        order = keep[np.argsort(-scores[keep], kind="stable")][:2]
        np.testing.assert_array_equal(label.boxes, clipped[order])
        np.testing.assert_array_equal(label.scores, scores[order])

    visible = [visible_first or i > 0 for i in range(len(found))]
    gt = GroundTruth(spans, [np.nan_to_num(b) for b, _ in found], visible)
    truth = gt_alignment(gt, REGIONS, 0.5)
    for g, (boxes, shown) in enumerate(zip(gt.boxes, visible)):
        expected = (box_iou(boxes, REGIONS) >= 0.5).any(0) if shown and len(boxes) else np.zeros(3, bool)
        np.testing.assert_array_equal(truth[g], expected)
