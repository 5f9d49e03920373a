"""The bundled tiny teacher grounds phrases on a freshly generated world far better than chance.

Chance is measured, not assumed: the same teacher's boxes for a phrase, put in a random order, i.e. picking
one of its query boxes without looking at the phrase.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from shards.synthetic.world import WorldConfig, build_world
from teacher import PhraseBoxes, load_teacher
from teacher.evaluate import evaluate_teacher
from teacher.worlddata import iter_world

torch.set_num_threads(1)
# Not the training world's seed (0) nor the held-out world's used for the README figures.
FRESH_SEED = 20261128
# 300 images (~500 visible phrases): recall on 150 images swung by +-0.04 between worlds.
IMAGES = 300


class ShuffledRanking:
    """A teacher that ranks another teacher's boxes at random (the chance baseline)."""

    name = "shuffled"
    fingerprint = "chance"

    def __init__(self, inner, seed: int):
        self.inner = inner
        self.rng = np.random.default_rng(seed)

    def ground(self, batch):
        out = self.inner.ground(batch)
        shuffled = []
        for answers in out:
            row = []
            for a in answers:
                order = self.rng.permutation(len(a.scores))
                row.append(PhraseBoxes(a.boxes[order], a.scores[order]))
            shuffled.append(row)
        return shuffled


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("fresh_world")
    build_world(WorldConfig(samples=IMAGES, seed=FRESH_SEED, task_samples=0), str(out), show_progress=False)
    return str(out)


@pytest.fixture(scope="module")
def tiny():
    return load_teacher("tiny", score_floor=0.0, top_k=100)


def test_tiny_loads_by_name_with_a_stable_fingerprint(tiny):
    assert tiny.name == "tiny"
    again = load_teacher("tiny", score_floor=0.0, top_k=100)
    assert again.fingerprint == tiny.fingerprint
    assert load_teacher("tiny").fingerprint != tiny.fingerprint   # other inference settings


def test_tiny_beats_chance_by_a_wide_margin(tiny, world):
    result = evaluate_teacher(tiny, iter_world(world), show_progress=False)
    chance = evaluate_teacher(ShuffledRanking(tiny, seed=0), iter_world(world), show_progress=False)
    assert result["images"] > 0.9 * IMAGES and result["visible_phrases"] > 300
    # The bars sit well under what the bundled teacher measures here (recall@1 0.81, chance 0.43, boxes
    # above threshold 0.76); issue 3's target (recall@1 >= 0.8) is measured by `sga teacher eval` on 2,000
    # images.
    assert result["recall_at_1"] >= 0.6, result
    assert result["recall_at_1"] >= chance["recall_at_1"] + 0.25, (result, chance)
    assert result["recall_at_5"] >= result["recall_at_1"]
    # Phrases naming nothing mostly get no confident box, while visible ones mostly do.
    assert result["nonvisible_no_box"] >= 0.7, result
    assert result["visible_box_above_threshold"] >= 0.6, result


def test_eval_command_prints_one_json_summary(world, tiny):
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "teacher", "eval", "--world", world,
                           "--teacher", "tiny", "--limit", "30", "--json"],
                          capture_output=True, text=True, timeout=120, check=True)
    summary = json.loads(proc.stdout)
    expected = evaluate_teacher(load_teacher("tiny", score_floor=0.0, top_k=5), iter_world(world, limit=30),
                                show_progress=False)
    assert summary["images"] == 30
    assert summary["fingerprint"] == load_teacher("tiny", score_floor=0.0, top_k=5).fingerprint
    for key in ("recall_at_1", "recall_at_5", "nonvisible_no_box", "visible_phrases"):
        assert summary[key] == expected[key], key
