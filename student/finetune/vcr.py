"""VCR: Q->A and QA->R as 4-way multiple choice.

Files: ``TASK_DIR/vcr/{split}.jsonl``, one VCR object per line: ``question``, ``answer_choices`` (4),
``rationale_choices`` (4), ``answer_label``, ``rationale_label``, ``img_id`` (the image key), ``objects``,
``annot_id``. A token is a word, or (real VCR) a list of object indices, read as the objects' names
("[1, 2]" -> "person person").

Each item becomes four sequences over the same regions (ViLBERT's ``expand``):

* Q->A  (``vcr_qa``):  ``question [SEP] answer_i``
* QA->R (``vcr_qar``): ``question answer_correct [SEP] rationale_i``

Head: a linear layer on the fused representation, the product of the pooled text and image summaries,
gives one logit per sequence; the four logits of an item go through a 4-way cross-entropy. Metric:
accuracy of the argmax choice.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shards import fs
from shards.errors import SgaError

from .base import TaskDefaults, register_task
from .data import InputEncoder, RegionStore

CHOICES = 4


@dataclass
class VCRItem:
    annot_id: str
    key: str
    question: str
    answers: list[str]
    rationales: list[str]
    answer_label: int
    rationale_label: int


def detokenize(tokens: list[Any], objects: list[str]) -> str:
    """VCR tokens -> text; object references (lists of indices) become the objects' names."""
    words = []
    for tok in tokens:
        if isinstance(tok, list):
            words += [objects[i] if 0 <= i < len(objects) else "object" for i in tok]
        else:
            words.append(str(tok))
    return " ".join(words)


def read_vcr(task_dir: str, split: str) -> list[dict[str, Any]]:
    """The raw objects of ``TASK_DIR/vcr/{split}.jsonl`` (malformed lines are returned as ``None``)."""
    uri = fs.join(task_dir, "vcr", f"{split}.jsonl")
    if not fs.exists(uri):
        raise SgaError(f"{uri} not found; pass --task-dir a folder with vcr/{{train,val,test}}.jsonl")
    out = []
    for line in fs.read_bytes(uri).decode("utf-8").splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append(None)
    return out


class VCRHead(nn.Module):
    """Pooled text and image ``[B * 4, Hp]`` -> choice logits ``[B, 4]``."""

    def __init__(self, pooled_dim: int):
        super().__init__()
        self.logit = nn.Linear(pooled_dim, 1)

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        fused = outputs["pooled_text"] * outputs["pooled_image"]
        return self.logit(fused).view(-1, CHOICES)


class VCRTask:
    metric = "accuracy"

    def __init__(self, task_dir: str, regions: RegionStore, mode: str):
        if mode not in ("qa", "qar"):
            raise ValueError(f"VCR mode must be 'qa' or 'qar', got {mode!r}")
        self.task_dir, self.regions, self.mode = task_dir, regions, mode
        self.name = f"vcr_{mode}"
        # Paper: lr 2e-5, batch 64; ViLBERT reads 60 (Q->A) and 80 (QA->R) wordpieces.
        self.defaults = TaskDefaults(lr=2e-5, batch_size=64, epochs=20,
                                     max_text_len=60 if mode == "qa" else 80)
        self._dropped: Counter = Counter()

    @property
    def dropped(self) -> dict[str, int]:
        return dict(self._dropped)

    def load(self, split: str) -> list[VCRItem]:
        items = []
        for obj in read_vcr(self.task_dir, split):
            try:
                objects = [str(o) for o in obj.get("objects", [])]
                item = VCRItem(str(obj["annot_id"]), str(obj["img_id"]), detokenize(obj["question"], objects),
                               [detokenize(a, objects) for a in obj["answer_choices"]],
                               [detokenize(r, objects) for r in obj["rationale_choices"]],
                               int(obj["answer_label"]), int(obj["rationale_label"]))
            except (AttributeError, KeyError, TypeError, ValueError):
                self._dropped["malformed"] += 1
                continue
            if len(item.answers) != CHOICES or len(item.rationales) != CHOICES or \
                    not (0 <= item.answer_label < CHOICES and 0 <= item.rationale_label < CHOICES):
                self._dropped["malformed"] += 1
                continue
            if item.key not in self.regions or self.regions[item.key].num_boxes == 0:
                self._dropped["no_regions"] += 1
                continue
            items.append(item)
        return items

    def texts(self, item: VCRItem, sep: str) -> list[str]:
        if self.mode == "qa":
            return [f"{item.question} {sep} {a}" for a in item.answers]
        context = f"{item.question} {item.answers[item.answer_label]}"
        return [f"{context} {sep} {r}" for r in item.rationales]

    def label(self, item: VCRItem) -> int:
        return item.answer_label if self.mode == "qa" else item.rationale_label

    def build_head(self, encoder: nn.Module, train_items: list[VCRItem]) -> nn.Module:
        return VCRHead(encoder.pooled_dim)

    def batch(self, items: list[VCRItem], encode: InputEncoder) -> dict[str, Any]:
        texts = [t for it in items for t in self.texts(it, encode.sep)]
        records = [self.regions[it.key] for it in items for _ in range(CHOICES)]
        batch = encode(texts, records)
        batch["label"] = torch.tensor([self.label(it) for it in items])
        return batch

    def loss(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return F.cross_entropy(logits, batch["label"])

    def scores(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return (logits.argmax(-1) == batch["label"]).float()


register_task("vcr_qa", lambda task_dir, regions: VCRTask(task_dir, regions, "qa"))
register_task("vcr_qar", lambda task_dir, regions: VCRTask(task_dir, regions, "qar"))
