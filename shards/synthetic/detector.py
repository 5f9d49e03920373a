"""A simulated object detector: region proposals, appearance features and class probabilities of a scene.

Per image it proposes ``R`` (``min_regions``..``max_regions``) boxes of three kinds, shuffled:

- jittered true boxes, 1–2 per object (IoU with their object mostly >= 0.6);
- partial boxes, one per object: a part of the object (low IoU, but inside it);
- distractors: background boxes, unions of two objects, a near-whole-image box.

Features (float16 ``[R, D]``) are what the box contains: the area-weighted mean of the attribute vectors
(one-hots of shape, colour, size, texture; a background indicator for uncovered area) of the objects inside
it, through a fixed random projection to ``D`` dims, plus Gaussian noise that grows as the box's best IoU
with any object falls. The projection depends only on ``projection_seed``, so worlds of different seeds
share one feature space, like one real detector applied to different datasets.

Class probabilities (float16 ``[R, C]``) cover the ``C = len(SHAPES) + 1`` classes of
:data:`CLASS_NAMES` (the shapes, then ``"background"``): a softmax of ``sharpness`` times each shape's best
IoU with the box and the background score ``(1 - best IoU) * bg_weight``, with logit noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from ..boxes import box_iou
from ..regions import RegionRecord
from .scene import COLOURS, SHAPES, SIZES, TEXTURES, Scene

CLASS_NAMES = (*SHAPES, "background")
ATTRIBUTE_DIM = len(SHAPES) + len(COLOURS) + len(SIZES) + len(TEXTURES) + 1   # + background indicator


@dataclass
class DetectorConfig:
    """Knobs of the simulated detector (defaults give 10–36 regions with 64-d features)."""

    feature_dim: int = 64
    min_regions: int = 10
    max_regions: int = 36
    true_jitter: float = 0.05        # std of each true-box edge, as a fraction of the object's side
    loose_jitter: float = 0.12       # the same for the ``loose_prob`` share of sloppier true boxes
    loose_prob: float = 0.2
    noise_base: float = 0.1          # feature noise std of a perfect box
    noise_scale: float = 0.6         # extra feature noise std per unit of (1 - best IoU)
    sharpness: float = 6.0           # class-logit scale
    bg_weight: float = 0.8
    logit_noise: float = 0.5
    projection_seed: int = 0


@cache
def projection(feature_dim: int, seed: int) -> np.ndarray:
    """The fixed float32 ``[ATTRIBUTE_DIM, feature_dim]`` projection of attribute vectors to features."""
    rng = np.random.default_rng([seed, feature_dim])
    # About 5 attribute entries are active per box; this scale keeps feature entries near unit variance.
    return (rng.standard_normal((ATTRIBUTE_DIM, feature_dim)) / np.sqrt(2.5)).astype(np.float32)


def attribute_vectors(scene: Scene) -> np.ndarray:
    """float32 ``[N + 1, ATTRIBUTE_DIM]``: one row per object (four one-hots), then the background row."""
    rows = np.zeros((len(scene.objects) + 1, ATTRIBUTE_DIM), dtype=np.float32)
    offsets = np.cumsum([0, len(SHAPES), len(COLOURS), len(SIZES)])
    vocab = (SHAPES, tuple(COLOURS), tuple(SIZES), TEXTURES)
    for i, obj in enumerate(scene.objects):
        for off, names, value in zip(offsets, vocab, obj.attributes):
            rows[i, off + names.index(value)] = 1.0
    rows[-1, -1] = 1.0
    return rows


def _clip(boxes: np.ndarray, w: int, h: int) -> np.ndarray:
    """Clip to the image and give every box at least 2 px per side."""
    boxes = boxes.copy()
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
    boxes[:, 2] = np.maximum(boxes[:, 2], np.minimum(boxes[:, 0] + 2, w))
    boxes[:, 0] = np.minimum(boxes[:, 0], boxes[:, 2] - 2)
    boxes[:, 3] = np.maximum(boxes[:, 3], np.minimum(boxes[:, 1] + 2, h))
    boxes[:, 1] = np.minimum(boxes[:, 1], boxes[:, 3] - 2)
    return boxes


def propose_boxes(scene: Scene, rng: np.random.Generator, config: DetectorConfig) -> np.ndarray:
    """float32 ``[R, 4]`` pixel xyxy proposals (true, partial and distractor boxes, shuffled)."""
    w, h = scene.width, scene.height
    boxes = []
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        side = np.array([x2 - x1, y2 - y1, x2 - x1, y2 - y1])
        for _ in range(int(rng.integers(1, 3))):
            sigma = config.loose_jitter if rng.random() < config.loose_prob else config.true_jitter
            boxes.append(np.asarray(obj.box) + rng.normal(0.0, sigma, 4) * side)
        fw, fh = rng.uniform(0.3, 0.6), rng.uniform(0.3, 0.7)
        px, py = x1 + rng.uniform(0, 1 - fw) * (x2 - x1), y1 + rng.uniform(0, 1 - fh) * (y2 - y1)
        boxes.append(np.array([px, py, px + fw * (x2 - x1), py + fh * (y2 - y1)]))
    total = max(int(rng.integers(config.min_regions, config.max_regions + 1)), len(boxes))
    total = min(total, config.max_regions)
    boxes = boxes[:total]
    if len(boxes) < total:
        boxes.append(np.array([rng.uniform(0, 0.05) * w, rng.uniform(0, 0.05) * h,
                               rng.uniform(0.95, 1) * w, rng.uniform(0.95, 1) * h]))
    if len(scene.objects) >= 2 and len(boxes) < total:
        a, b = rng.choice(len(scene.objects), size=2, replace=False)
        ba, bb = scene.objects[a].box, scene.objects[b].box
        boxes.append(np.array([min(ba[0], bb[0]), min(ba[1], bb[1]), max(ba[2], bb[2]), max(ba[3], bb[3])]))
    while len(boxes) < total:
        bw, bh = rng.uniform(0.1, 0.6) * w, rng.uniform(0.1, 0.6) * h
        x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        boxes.append(np.array([x, y, x + bw, y + bh]))
    out = _clip(np.stack(boxes).astype(np.float32), w, h)
    return out[rng.permutation(len(out))]


def _coverage(boxes: np.ndarray, scene: Scene) -> np.ndarray:
    """float32 ``[R, N + 1]``: the share of each box covered by each object box, then the uncovered rest."""
    obj = scene.boxes()
    iw = np.minimum(boxes[:, None, 2], obj[None, :, 2]) - np.maximum(boxes[:, None, 0], obj[None, :, 0])
    ih = np.minimum(boxes[:, None, 3], obj[None, :, 3]) - np.maximum(boxes[:, None, 1], obj[None, :, 1])
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[:, None]
    share = (iw.clip(0) * ih.clip(0)) / np.maximum(area, 1e-6)
    rest = (1.0 - share.sum(axis=1, keepdims=True)).clip(0)
    return np.concatenate([share, rest], axis=1).astype(np.float32)


def detect(scene: Scene, key: str, rng: np.random.Generator, config: DetectorConfig) -> RegionRecord:
    """The detector's output for one rendered scene, as a :class:`~shards.regions.RegionRecord`."""
    boxes = propose_boxes(scene, rng, config)
    iou = box_iou(boxes, scene.boxes())                       # [R, N]
    best = iou.max(axis=1)
    appearance = _coverage(boxes, scene) @ attribute_vectors(scene)          # [R, ATTRIBUTE_DIM]
    noise_std = config.noise_base + config.noise_scale * (1.0 - best)
    features = appearance @ projection(config.feature_dim, config.projection_seed)
    features += rng.standard_normal(features.shape).astype(np.float32) * noise_std[:, None]
    logits = np.zeros((len(boxes), len(CLASS_NAMES)), dtype=np.float32)
    for j, obj in enumerate(scene.objects):
        c = SHAPES.index(obj.shape)
        logits[:, c] = np.maximum(logits[:, c], iou[:, j])
    logits[:, -1] = (1.0 - best) * config.bg_weight
    logits = config.sharpness * logits + rng.normal(0.0, config.logit_noise, logits.shape)
    prob = np.exp(logits - logits.max(axis=1, keepdims=True))
    prob /= prob.sum(axis=1, keepdims=True)
    return RegionRecord(key=key, boxes=boxes, features=features.astype(np.float16),
                        cls_prob=prob.astype(np.float16), image_w=scene.width, image_h=scene.height)
