"""MDETR's training losses as one set criterion: match, then one ``loss_<name>`` method per term.

Terms (each normalised by the number of target boxes in the batch, clamped to >= 1; data-parallel training
passes the count over all ranks' batches instead, so every box weighs the same whatever the split):
- ``labels``: soft-token cross-entropy. A matched query's target distribution is its phrase's positive map
  (uniform over the phrase's tokens); an unmatched query's target is the no-object column, weighted by
  ``eos_coef``.
- ``boxes``: L1 on normalised cxcywh and 1 - GIoU, for matched queries.
- ``contrastive_align``: InfoNCE between L2-normalised query and token embeddings (temperature 0.07): a
  matched query should be closer to its phrase's tokens than to the caption's other tokens, and each such
  token closer to the queries matched to it than to the other queries.
With auxiliary outputs, every term is repeated per earlier decoder layer with a ``_<layer>`` suffix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .matcher import HungarianMatcher, box_cxcywh_to_xyxy, generalized_box_iou

_MASKED = -1e9


@dataclass
class CriterionConfig:
    """Loss weights and options (MDETR's defaults, except which terms are on)."""

    eos_coef: float = 0.1
    ce_weight: float = 1.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    contrastive_align_weight: float = 1.0
    temperature: float = 0.07
    contrastive_align: bool = True


class SetCriterion(nn.Module):
    """``forward(outputs, targets, text_mask) -> {loss name: scalar tensor}``; see the module docstring.

    ``outputs``: the model's dict (``pred_logits [B, Q, P]``, ``pred_boxes [B, Q, 4]``, ``proj_queries
    [B, Q, Dc]``, ``proj_tokens [B, T, Dc]``, optional ``aux_outputs``). ``targets``: per image, ``boxes
    [N, 4]`` normalised cxcywh and ``positive_map [N, P]`` (rows sum to 1, last column 0).
    ``text_mask [B, T]`` bool, True on real tokens (used by ``contrastive_align``; None = all real).
    """

    def __init__(self, matcher: HungarianMatcher, config: CriterionConfig, num_aux: int = 0):
        super().__init__()
        self.matcher = matcher
        self.config = config
        self.losses = ["labels", "boxes"] + (["contrastive_align"] if config.contrastive_align else [])
        base = {"loss_ce": config.ce_weight, "loss_bbox": config.bbox_weight, "loss_giou": config.giou_weight}
        if config.contrastive_align:
            base["loss_contrastive_align"] = config.contrastive_align_weight
        self.weight_dict = dict(base)
        for i in range(num_aux):
            self.weight_dict.update({f"{k}_{i}": v for k, v in base.items()})

    def loss_labels(self, outputs, targets, indices, num_boxes, text_mask):
        logits = outputs["pred_logits"].float()
        log_prob = logits.log_softmax(-1)
        target = torch.zeros_like(log_prob)
        target[..., -1] = 1.0
        weight = torch.full(logits.shape[:2], self.config.eos_coef, device=logits.device)
        for b, (q, t) in enumerate(indices):
            target[b, q] = targets[b]["positive_map"][t].to(target)
            weight[b, q] = 1.0
        loss = -(log_prob * target).sum(-1) * weight
        return {"loss_ce": loss.sum() / num_boxes}

    def loss_boxes(self, outputs, targets, indices, num_boxes, text_mask):
        pred = torch.cat([outputs["pred_boxes"][b, q] for b, (q, _) in enumerate(indices)]).float()
        gt = torch.cat([targets[b]["boxes"][t] for b, (_, t) in enumerate(indices)]).to(pred)
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(gt)))
        return {"loss_bbox": F.l1_loss(pred, gt, reduction="sum") / num_boxes,
                "loss_giou": (1 - giou).sum() / num_boxes}

    def loss_contrastive_align(self, outputs, targets, indices, num_boxes, text_mask):
        queries, tokens = outputs["proj_queries"].float(), outputs["proj_tokens"].float()
        logits = queries @ tokens.transpose(1, 2) / self.config.temperature  # [B, Q, T]
        num_tokens = tokens.shape[1]
        positive = torch.zeros_like(logits, dtype=torch.bool)
        for b, (q, t) in enumerate(indices):
            positive[b, q] = targets[b]["positive_map"][t, :num_tokens].to(logits.device) > 0
        # A large finite value instead of -inf: rows without positives are dropped below, and -inf there
        # would still turn their (zero) gradients into NaN through logsumexp's backward.
        if text_mask is not None:
            logits = logits.masked_fill(~text_mask[:, None, :].to(logits.device), _MASKED)
        pos_logits = logits.masked_fill(~positive, _MASKED)
        # -log(sum of softmax over positives) = logsumexp(all) - logsumexp(positives), rows with positives.
        query_rows = positive.any(-1)
        box_to_token = (logits.logsumexp(-1) - pos_logits.logsumexp(-1))[query_rows].sum()
        token_cols = positive.any(1)
        token_to_box = (logits.logsumexp(1) - pos_logits.logsumexp(1))[token_cols].sum()
        return {"loss_contrastive_align": (box_to_token + token_to_box) / 2 / num_boxes}

    _LOSS_METHODS: ClassVar[dict] = {"labels": loss_labels, "boxes": loss_boxes,
                                     "contrastive_align": loss_contrastive_align}

    def get_loss(self, name, outputs, targets, indices, num_boxes, text_mask) -> dict[str, torch.Tensor]:
        return self._LOSS_METHODS[name](self, outputs, targets, indices, num_boxes, text_mask)

    def forward(self, outputs: dict, targets: list[dict], text_mask: torch.Tensor | None = None,
                num_boxes: float | None = None):
        """``{loss name: scalar}``; ``num_boxes`` defaults to this batch's target boxes (clamped to >= 1)."""
        if num_boxes is None:
            num_boxes = max(sum(len(t["boxes"]) for t in targets), 1)
        losses: dict[str, torch.Tensor] = {}
        for suffix, layer_outputs in [("", outputs)] + [
                (f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]:
            indices = self.matcher(layer_outputs, targets)
            for name in self.losses:
                for key, value in self.get_loss(name, layer_outputs, targets, indices, num_boxes,
                                                text_mask).items():
                    losses[key + suffix] = value
        return losses

    def weighted_total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training objective: sum of the weighted terms (terms without a weight are only logged)."""
        return sum(losses[k] * w for k, w in self.weight_dict.items() if k in losses)
