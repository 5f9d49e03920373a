"""Box geometry as small pure functions (numpy; the torch twins live where tensors are needed).

Boxes are ``float32`` arrays of shape ``[..., 4]``. ``xyxy`` = (x0, y0, x1, y1) with x1 >= x0; ``cxcywh`` =
(centre x, centre y, width, height). Pixel boxes use the original image's pixel grid.
"""

from __future__ import annotations

import numpy as np


def box_area(boxes: np.ndarray) -> np.ndarray:
    """``[N, 4]`` xyxy -> ``[N]`` areas; degenerate boxes have area 0."""
    wh = np.clip(boxes[..., 2:] - boxes[..., :2], 0, None)
    return wh[..., 0] * wh[..., 1]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU: ``[N, 4]`` x ``[M, 4]`` xyxy -> ``[N, M]``; 0 where the union is empty."""
    a = np.asarray(a, dtype=np.float32).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float32).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0).astype(np.float32)


def cxcywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    c, wh = boxes[..., :2], boxes[..., 2:]
    return np.concatenate([c - wh / 2, c + wh / 2], axis=-1)


def xyxy_to_cxcywh(boxes: np.ndarray) -> np.ndarray:
    lo, hi = boxes[..., :2], boxes[..., 2:]
    return np.concatenate([(lo + hi) / 2, hi - lo], axis=-1)


def scale_boxes(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """Normalised ``[0, 1]`` boxes -> pixels (or back, with ``1 / width``, ``1 / height``)."""
    return boxes * np.asarray([width, height, width, height], dtype=boxes.dtype)


def clip_boxes(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    limits = np.asarray([width, height, width, height], dtype=boxes.dtype)
    return np.clip(boxes, 0, limits)


def valid_boxes(boxes: np.ndarray, width: float, height: float, tol: float = 1.0) -> np.ndarray:
    """``[N]`` bool: finite, positive extent, and inside the image up to ``tol`` pixels."""
    finite = np.isfinite(boxes).all(axis=-1)
    positive = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    inside = ((boxes[..., :2] >= -tol).all(axis=-1)
              & (boxes[..., 2] <= width + tol) & (boxes[..., 3] <= height + tol))
    return finite & positive & inside
