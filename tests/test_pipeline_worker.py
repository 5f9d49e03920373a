"""The teacher actor's packed answers: one tuple of four arrays per batch instead of two arrays per phrase."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.worker import pack_answers, unpack_answers


def test_packed_answers_unpack_to_the_same_boxes_and_scores():
    rng = np.random.default_rng(0)
    answers = [
        [(rng.random((3, 4)), rng.random(3)), (np.zeros((0, 4)), np.zeros(0))],     # float64, an empty phrase
        [],                                                                          # a sample with no phrase
        [(rng.random((1, 4), dtype=np.float32), rng.random(1, dtype=np.float32))],
    ]
    phrases, counts, boxes, scores = packed = pack_answers(answers)
    assert phrases.tolist() == [2, 0, 1] and counts.tolist() == [3, 0, 1]
    assert boxes.shape == (4, 4) and boxes.dtype == scores.dtype == np.float32
    back = unpack_answers(packed)
    assert [len(sample) for sample in back] == [2, 0, 1]
    for got, want in zip((p for s in back for p in s), (p for s in answers for p in s)):
        np.testing.assert_array_equal(got[0], np.asarray(want[0], np.float32).reshape(-1, 4))
        np.testing.assert_array_equal(got[1], np.asarray(want[1], np.float32))
    assert unpack_answers(pack_answers([])) == []


def test_boxes_and_scores_of_different_lengths_fail_the_batch():
    with pytest.raises(ValueError, match="different lengths"):
        pack_answers([[(np.zeros((2, 4)), np.zeros(3))]])
