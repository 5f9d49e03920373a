"""Hungarian matching of predicted queries to target boxes, with MDETR's costs; torch box geometry.

A target is one ground-truth box together with the positive map of its phrase (a phrase with two boxes gives
two targets sharing a map). The cost of giving target ``j`` to query ``q`` is

    cost_class * -(prob[q] . positive_map[j])     (the mean predicted probability of the phrase's tokens)
  + cost_bbox  * L1(box[q], box[j])                (normalised cxcywh)
  + cost_giou  * -GIoU(box[q], box[j])

and ``scipy.optimize.linear_sum_assignment`` picks the cheapest one-to-one assignment per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` (cx, cy, w, h) -> (x0, y0, x1, y1)."""
    c, wh = boxes[..., :2], boxes[..., 2:]
    return torch.cat([c - wh / 2, c + wh / 2], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` (x0, y0, x1, y1) -> (cx, cy, w, h)."""
    lo, hi = boxes[..., :2], boxes[..., 2:]
    return torch.cat([(lo + hi) / 2, hi - lo], dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU of ``[N, 4]`` and ``[M, 4]`` xyxy boxes -> ``[N, M]`` in [-1, 1].

    GIoU = IoU - (hull area - union) / hull area, where the hull is the smallest box enclosing both.
    Degenerate (zero-area) pairs are guarded so the result stays finite.
    """
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = box_area(torch.cat([lt, rb], dim=-1))
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    iou = inter / union.clamp(min=1e-7)
    hull_lt = torch.min(a[:, None, :2], b[None, :, :2])
    hull_rb = torch.max(a[:, None, 2:], b[None, :, 2:])
    hull = box_area(torch.cat([hull_lt, hull_rb], dim=-1))
    return iou - (hull - union) / hull.clamp(min=1e-7)


@dataclass
class HungarianMatcher:
    """Weights of the three matching costs (MDETR: 1, 5, 2)."""

    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0

    @torch.no_grad()
    def __call__(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match each image's queries to its targets.

        ``outputs``: ``pred_logits [B, Q, P]``, ``pred_boxes [B, Q, 4]`` (normalised cxcywh).
        ``targets``: per image, ``boxes [N, 4]`` normalised cxcywh and ``positive_map [N, P]`` (rows sum
        to 1).
        Returns per image ``(query_idx, target_idx)``, int64 ``[min(Q, N)]`` each, sorted by query.
        """
        prob = outputs["pred_logits"].float().softmax(-1)
        boxes = outputs["pred_boxes"].float()
        indices = []
        for b, target in enumerate(targets):
            tgt_boxes = target["boxes"].float()
            if len(tgt_boxes) == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                indices.append((empty, empty))
                continue
            giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes[b]), box_cxcywh_to_xyxy(tgt_boxes))
            cost = (-self.cost_class * prob[b] @ target["positive_map"].float().T
                    + self.cost_bbox * torch.cdist(boxes[b], tgt_boxes, p=1)
                    - self.cost_giou * giou)
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64),
                            torch.as_tensor(cols, dtype=torch.int64)))
        return indices
