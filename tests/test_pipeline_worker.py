"""Actor plumbing: the teacher actor's packed answers, the shard worker's frozen start-up objects."""

from __future__ import annotations

import numpy as np
import pytest
from pipeline_fixtures import run_fresh

from pipeline.worker import ProgressActor, pack_answers, unpack_answers


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


def test_shard_worker_freezes_what_it_loaded_so_full_collections_skip_it():
    """A fresh interpreter builds a shard worker (without teachers or Ray) and reports the objects frozen
    out of the garbage collector's reach, and whether a full collection still sees them."""
    code = """
import gc, json
from pipeline import worker
from pipeline.phrases import PhraseConfig
worker.RayTeacherClient = lambda teachers, offset: None    # no teacher actors to find
worker.ShardActor(PhraseConfig(), [], 1, 0)
print(json.dumps({"frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects())}))
"""
    counts = run_fresh(code)
    assert counts["frozen"] > 50_000 and counts["tracked"] < counts["frozen"] / 10


def test_progress_counts_a_redone_shard_once():
    progress = ProgressActor()
    progress.set("00000", 5)
    progress.set("00001", 3)
    progress.set("00000", 2)           # its worker died: the shard started again from its first sample
    assert progress.value(["00000", "00001"]) == 5
    assert progress.value(["00001", "00002"]) == 3
