"""The pre-training objective ``L = mlm + mrc + λ_align·itm + λ_gnd·gnd`` as one criterion.

:class:`PretrainCriterion` has one ``loss_<name>`` method per term, a name -> method map, and the weight of
each term; ``criterion(outputs, batch)`` returns every enabled term plus ``"loss"``, the weighted total.
``outputs`` are :class:`student.model.PretrainModel`'s, ``batch`` the collator's (key tables in
:mod:`student.model.pretrain` and :mod:`student.collate`).

Normalisation: each masked or pair loss is a sum over its items divided by the item count. Under
``torch.distributed`` the count is the mean count per rank (all-reduced, so DDP's gradient averaging
yields the global per-item mean), and it is clamped to >= 1 so a batch without items gives 0, never NaN.
Masked losses (mlm, mrc) count only samples whose caption matches the image (``itm_label == 1``): a
swapped caption is no evidence about masked words or regions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .collate import IGNORE_INDEX
from .config import LOSSES, StudentConfig

Outputs = dict[str, torch.Tensor]


def item_count(n: torch.Tensor | int, device: torch.device) -> torch.Tensor:
    """The divisor for ``n`` local items: the per-rank mean of ``n`` across processes, at least 1."""
    count = torch.as_tensor(n, dtype=torch.float32, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        count = count.clone()
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp(min=1.0)


class PretrainCriterion(nn.Module):
    """Pre-training losses in the style of DETR's ``SetCriterion``.

    Args:
        losses: names of the terms to compute, a subset of ``("mlm", "mrc", "itm", "gnd")``.
        weight_dict: weight of each term in the total.
    """

    def __init__(self, losses: Sequence[str], weight_dict: dict[str, float]):
        super().__init__()
        unknown = [name for name in losses if name not in LOSSES]
        if unknown or set(losses) - set(weight_dict):
            raise ValueError(f"losses {list(losses)} must come from {LOSSES} and each needs a weight")
        self.losses = list(losses)
        self.weight_dict = dict(weight_dict)

    def loss_mlm(self, outputs: Outputs, batch: Outputs) -> torch.Tensor:
        """Cross-entropy of the masked wordpieces of matched samples.

        Reads ``mlm_logits`` ``[M, vocab]`` (rows = positions with ``mlm_labels != -100``, row-major),
        ``mlm_labels`` ``[B, L]`` and ``itm_label`` ``[B]``.
        """
        labels = batch["mlm_labels"]
        selected = labels != IGNORE_INDEX
        matched = batch["itm_label"][selected.nonzero()[:, 0]] > 0.5
        ce = F.cross_entropy(outputs["mlm_logits"].float(), labels[selected], reduction="none")
        return (ce * matched).sum() / item_count(matched.sum(), ce.device)

    def loss_mrc(self, outputs: Outputs, batch: Outputs) -> torch.Tensor:
        """KL(detector cls_prob || predicted class distribution) over masked regions of matched samples.

        Reads ``mrc_logits`` ``[B, V, C]``, ``mrc_targets`` ``[B, V, C]``, ``mrc_mask`` ``[B, V]`` and
        ``itm_label`` ``[B]``. ``xlogy`` makes ``0·log 0 = 0`` for classes the detector gave no mass.
        """
        masked = batch["mrc_mask"] & (batch["itm_label"][:, None] > 0.5)
        log_pred = F.log_softmax(outputs["mrc_logits"][masked].float(), dim=-1)
        target = batch["mrc_targets"][masked]
        kl = (torch.special.xlogy(target, target) - target * log_pred).sum(-1)
        return kl.sum() / item_count(masked.sum(), kl.device)

    def loss_itm(self, outputs: Outputs, batch: Outputs) -> torch.Tensor:
        """Binary cross-entropy of the match logit ``itm_logit`` ``[B]`` against ``itm_label`` ``[B]``."""
        logit = outputs["itm_logit"].float()
        bce = F.binary_cross_entropy_with_logits(logit, batch["itm_label"].to(logit), reduction="sum")
        return bce / item_count(logit.shape[0], logit.device)

    def loss_gnd(self, outputs: Outputs, batch: Outputs) -> torch.Tensor:
        """Binary cross-entropy of f_align's scores against the sampled pseudo labels M*.

        Reads ``gnd_logits`` and ``gnd_logit_mask`` ``[N, T']`` and ``gnd_label`` ``[N]``. At token level
        (``T' > 1``) every wordpiece of the phrase is scored against the pair's label and the pair's loss
        is the mean over its wordpieces, so each pair weighs the same at either level.
        """
        logits = outputs["gnd_logits"].float()
        mask = outputs["gnd_logit_mask"].to(logits)
        labels = batch["gnd_label"].to(logits)[:, None].expand_as(logits)
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * mask
        per_pair = bce.sum(1) / mask.sum(1).clamp(min=1.0)
        return per_pair.sum() / item_count(logits.shape[0], logits.device)

    def get_loss(self, name: str, outputs: Outputs, batch: Outputs) -> torch.Tensor:
        loss_map: dict[str, Callable[[Outputs, Outputs], torch.Tensor]] = {
            "mlm": self.loss_mlm, "mrc": self.loss_mrc, "itm": self.loss_itm, "gnd": self.loss_gnd}
        if name not in loss_map:
            raise ValueError(f"unknown loss {name!r}; known: {sorted(loss_map)}")
        return loss_map[name](outputs, batch)

    def forward(self, outputs: Outputs, batch: Outputs) -> dict[str, torch.Tensor]:
        """``{name: term for each enabled loss} | {"loss": Σ weight[name]·term}`` (scalars)."""
        terms = {name: self.get_loss(name, outputs, batch) for name in self.losses}
        terms["loss"] = sum(self.weight_dict[name] * terms[name] for name in self.losses)
        return terms


def build_criterion(config: StudentConfig) -> PretrainCriterion:
    """The criterion for ``config.losses`` with ``config.weight_dict`` (λ_align, λ_gnd, ...)."""
    return PretrainCriterion(config.losses, config.weight_dict)
