"""The tiny teacher's backbone pretraining: dense attribute targets on rendered scenes and a CNN that learns
to read colour from them (its place in `sga teacher train`: tests/test_teacher_train.py)."""

import numpy as np
import pytest
import torch

from shards.synthetic.scene import COLOURS, SHAPES, SceneConfig
from teacher.backbone_pretrain import (
    ATTRIBUTES,
    IGNORE,
    BackbonePretrainConfig,
    attribute_losses,
    object_accuracy,
    pretrain_backbone,
    render_batch,
)
from teacher.mdetr.backbone import TinyCNN
from teacher.preprocess import PreprocessConfig

torch.set_num_threads(1)
PRE = PreprocessConfig(short_side=48, max_size=96, size_multiple=4)


def test_targets_mark_one_cell_per_object_centre_and_ignore_the_rest():
    config = BackbonePretrainConfig(batch_size=6, scene=SceneConfig(min_objects=1, max_objects=3))
    images, mask, targets = render_batch(np.random.default_rng(3), config, PRE, stride=4)
    assert images.shape[0] == mask.shape[0] == 6
    assert images.shape[2] % 4 == 0 and images.shape[3] % 4 == 0
    h, w = images.shape[2] // 4, images.shape[3] // 4
    supervised = targets["colour"] != IGNORE
    for name, classes in ATTRIBUTES:
        assert targets[name].shape == (6, h, w)
        assert torch.equal(targets[name] != IGNORE, supervised)        # the same cells for every attribute
        assert int(targets[name][supervised].max()) < len(classes)
    per_image = supervised.flatten(1).sum(1)
    assert per_image.min() >= 1 and per_image.max() <= 3          # centres may share a cell, never more
    cells = mask[:, ::4, ::4]                                      # a supervised cell is never padding
    assert not cells[supervised].any()
    # The same generator state gives the same batch.
    again = render_batch(np.random.default_rng(3), config, PRE, stride=4)
    assert torch.equal(again[0], images) and all(torch.equal(again[2][k], targets[k]) for k in targets)


def test_losses_and_accuracy_on_hand_made_logits():
    target = torch.full((1, 2, 2), IGNORE)
    target[0, 1, 0] = 2
    targets = {name: target.clone() for name, _ in ATTRIBUTES}
    logits = {name: torch.zeros(1, len(classes), 2, 2) for name, classes in ATTRIBUTES}
    losses = attribute_losses(logits, targets)
    assert losses["colour"].item() == pytest.approx(np.log(len(COLOURS)))
    assert losses["shape"].item() == pytest.approx(np.log(len(SHAPES)))
    logits["colour"][0, 2, 1, 0] = 5.0
    assert object_accuracy(logits, targets)["colour"] == 1.0
    none = {name: torch.full((1, 2, 2), IGNORE) for name, _ in ATTRIBUTES}
    assert attribute_losses(logits, none)["colour"].item() == 0.0    # no object: zero, not NaN


def test_pretraining_teaches_colour_deterministically():
    config = BackbonePretrainConfig(steps=40, batch_size=8, lr=3e-3, seed=1)
    torch.manual_seed(0)
    body = TinyCNN((8, 16))
    before = {k: v.clone() for k, v in body.state_dict().items()}
    rng_state = torch.get_rng_state()
    accuracy = pretrain_backbone(body, config, PRE, stride=4)
    assert torch.equal(torch.get_rng_state(), rng_state)       # the run's own RNG stream is left alone
    assert accuracy["colour"] > 0.5                            # chance: 1/8
    torch.manual_seed(0)
    other = TinyCNN((8, 16))
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    assert pretrain_backbone(other, config, PRE, stride=4) == accuracy
    assert all(torch.equal(body.state_dict()[k], v) for k, v in other.state_dict().items())
