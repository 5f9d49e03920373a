"""Referring expressions (RefCOCO+ format): score every region proposal for the expression.

Files: ``TASK_DIR/refexp/{split}.json``, a JSON list of ``{"ref_id", "image_key", "expression", "box"
(pixel xyxy), ...}`` (the synthetic world writes this; a RefCOCO+ export with the same keys reads as is).

Head: ViLBERT's ``V-logit``, one linear logit per visual token over the fused region states, padding and
[IMG] excluded.

Training target (ViLBERT's): for proposal r, ``t_r = IoU(r, box)`` if ``IoU >= 0.5`` else 0, a soft
multi-label target under binary cross-entropy; the loss sums over an image's proposals and averages over
the batch. Ground-truth boxes are not added to the proposals (ViLBERT adds them in training): training
and test then see the same kind of candidates.

Metric: accuracy, a hit when the top-scoring proposal has ``IoU >= 0.5`` with the target box. ViLBERT's
code counts ``IoU > 0.5``; we follow the paper's wording (>=). The two differ only on exact ties.
``oracle`` is the share of items where some proposal is a hit, the ceiling the proposals allow.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shards import fs
from shards.boxes import box_iou
from shards.errors import SgaError

from .base import TaskDefaults, register_task
from .data import InputEncoder, RegionStore, pad_rows

HIT_IOU = 0.5


@dataclass
class RefExpItem:
    """One expression: ``iou`` float32 ``[R]`` is every proposal's IoU with the target ``box`` [4]."""

    ref_id: int
    key: str
    expression: str
    box: np.ndarray
    iou: np.ndarray


def soft_targets(iou: np.ndarray, threshold: float = HIT_IOU) -> np.ndarray:
    """ViLBERT's refexp target: the IoU where it reaches ``threshold``, else 0."""
    return np.where(iou >= threshold, iou, 0.0).astype(np.float32)


def read_refexp(task_dir: str, split: str) -> list[dict[str, Any]]:
    """The raw entries of ``TASK_DIR/refexp/{split}.json``."""
    uri = fs.join(task_dir, "refexp", f"{split}.json")
    if not fs.exists(uri):
        raise SgaError(f"{uri} not found; pass --task-dir a folder with refexp/{{train,val,test}}.json "
                       "(e.g. WORLD/tasks from `sga world`)")
    entries = fs.read_json(uri)
    if not isinstance(entries, list):
        raise SgaError(f"{uri} must hold a JSON list of referring expressions")
    return entries


class RefExpHead(nn.Module):
    """Region states ``[B, V, Hv]`` -> proposal logits ``[B, V - 1]`` (padding at -1e4)."""

    def __init__(self, visual_dim: int):
        super().__init__()
        self.logit = nn.Linear(visual_dim, 1)

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        logits = self.logit(outputs["region_states"][:, 1:]).squeeze(-1)
        return logits.masked_fill(~batch["region_mask"][:, 1:], -1e4)


class RefExpTask:
    name = "refexp"
    metric = "accuracy"
    defaults = TaskDefaults(lr=4e-5, batch_size=256, epochs=20, max_text_len=20)

    def __init__(self, task_dir: str, regions: RegionStore):
        self.task_dir, self.regions = task_dir, regions
        self._dropped: Counter = Counter()

    @property
    def dropped(self) -> dict[str, int]:
        return dict(self._dropped)

    def load(self, split: str) -> list[RefExpItem]:
        items = []
        for entry in read_refexp(self.task_dir, split):
            try:
                key, text = str(entry["image_key"]), str(entry["expression"])
                box = np.asarray(entry["box"], np.float32).reshape(4)
                ref_id = int(entry["ref_id"])
            except (KeyError, TypeError, ValueError):
                self._dropped["malformed"] += 1
                continue
            if key not in self.regions or self.regions[key].num_boxes == 0:
                self._dropped["no_regions"] += 1
                continue
            iou = box_iou(box[None], self.regions[key].boxes)[0].astype(np.float32)
            items.append(RefExpItem(ref_id, key, text, box, iou))
        return items

    def build_head(self, encoder: nn.Module, train_items: list[RefExpItem]) -> nn.Module:
        return RefExpHead(encoder.visual_dim)

    def batch(self, items: list[RefExpItem], encode: InputEncoder) -> dict[str, Any]:
        batch = encode([it.expression for it in items], [self.regions[it.key] for it in items])
        width = batch["region_mask"].shape[1] - 1
        batch["target"] = pad_rows([soft_targets(it.iou) for it in items], width, 0.0)
        # Proposals past the kept regions (truncation) and padding can never be a hit.
        batch["iou"] = pad_rows([it.iou for it in items], width, -1.0)
        batch["iou"] = batch["iou"].masked_fill(~batch["region_mask"][:, 1:], -1.0)
        return batch

    def loss(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        real = batch["region_mask"][:, 1:].float()
        per_region = F.binary_cross_entropy_with_logits(logits, batch["target"], reduction="none")
        return (per_region * real).sum() / max(1, logits.shape[0])

    def scores(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        top = logits.argmax(-1)
        return (batch["iou"].gather(1, top[:, None])[:, 0] >= HIT_IOU).float()

    @staticmethod
    def oracle(items: list[RefExpItem]) -> float:
        """Share of items with at least one proposal at IoU >= 0.5."""
        return float(np.mean([(it.iou >= HIT_IOU).any() for it in items])) if items else 0.0


register_task("refexp", RefExpTask)
