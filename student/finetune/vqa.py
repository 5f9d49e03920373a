"""VQA 2.0: multi-label answer classification with soft targets from ten human answers.

Files (VQA 2.0 layout): ``TASK_DIR/vqa/v2_OpenEnded_{name}_{split}_questions.json`` (``{"questions":
[{"image_id", "question", "question_id"}]}``) and ``TASK_DIR/vqa/v2_{name}_{split}_annotations.json``
(``{"annotations": [{"question_id", "answers": 10 x {"answer", ...}, "multiple_choice_answer", ...}]}``);
``name`` is found by globbing (``synthetic`` for the world, ``mscoco`` for the real set). Images are
looked up by ``image_id = int(key)``.

Soft score (the formula). For an answer given by ``c`` of the 10 annotators, VQA's accuracy averages
``min(1, matches / 3)`` over the 10 ways of leaving one annotator out::

    score(c) = [c · min(1, (c - 1) / 3) + (10 - c) · min(1, c / 3)] / 10

which is 0, 0.3, 0.6, 0.9, 1 for c = 0, 1, 2, 3, >= 4: the exact VQA metric and bottom-up-attention's
``get_score`` table agree. The same score is the training target and the metric: accuracy is the mean
score of each question's top answer. Answers are compared after lower-casing and trimming whitespace
(VQA's full normalisation, punctuation and number words, is not needed for the world's answers).

Answer vocabulary: every ``multiple_choice_answer`` of the training questions given at least
``min_answer_count`` times (1 here; 9 on the real set gives its 3,129 answers), most frequent first.
Answers outside it get no output, so a question whose answers all lie outside scores 0.

Head: a two-layer MLP (Linear, ReLU, Dropout 0.5, Linear; vilbert_beta's classifier without weight norm)
on the elementwise product of the pooled text and image summaries. Loss: binary cross-entropy summed over
the answers and averaged over the batch (ViLBERT's ``mean() * num_answers``).
"""

from __future__ import annotations

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


def normalize_answer(text: str) -> str:
    return " ".join(str(text).lower().split())


def answer_score(count: int, annotators: int = 10) -> float:
    """VQA accuracy of an answer given by ``count`` of ``annotators`` humans (leave-one-out average)."""
    count = min(count, annotators)
    kept_match = count * min(1.0, (count - 1) / 3) if count else 0.0
    kept_other = (annotators - count) * min(1.0, count / 3)
    return (kept_match + kept_other) / annotators


def soft_scores(answers: list[str]) -> dict[str, float]:
    """Every distinct (normalised) answer of one question -> its soft score."""
    counts = Counter(normalize_answer(a) for a in answers)
    return {a: answer_score(c, len(answers)) for a, c in counts.items()}


@dataclass
class VQAItem:
    question_id: int
    key: str
    question: str
    scores: dict[str, float]          # answer -> soft score (answers outside the vocabulary included)
    majority: str                     # multiple_choice_answer, normalised


class AnswerVocab:
    """Answers the head can predict, most frequent first (ties alphabetical)."""

    def __init__(self, answers: list[str]):
        self.answers = list(answers)
        self.index = {a: i for i, a in enumerate(self.answers)}

    def __len__(self) -> int:
        return len(self.answers)

    @classmethod
    def from_items(cls, items: list[VQAItem], min_count: int = 1) -> AnswerVocab:
        counts = Counter(it.majority for it in items)
        kept = sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))
        if not kept:
            raise SgaError(f"no training answer occurs {min_count} times; lower min_answer_count")
        return cls(kept)

    def targets(self, items: list[VQAItem]) -> torch.Tensor:
        """float32 ``[B, A]`` soft targets."""
        out = torch.zeros(len(items), len(self))
        for b, it in enumerate(items):
            for answer, score in it.scores.items():
                if answer in self.index:
                    out[b, self.index[answer]] = score
        return out


def _find(task_dir: str, split: str, kind: str) -> str:
    """The one ``vqa/`` file of ``split`` and ``kind`` ("questions" | "annotations")."""
    folder = fs.join(task_dir, "vqa")
    if kind == "questions":
        match = [n for n in fs.list_dir(folder, f"_{split}_questions.json") if n.startswith("v2_OpenEnded_")]
    else:
        match = [n for n in fs.list_dir(folder, f"_{split}_annotations.json") if n.startswith("v2_")]
    if len(match) != 1:
        raise SgaError(f"expected one VQA {kind} file for split {split!r} in {folder} "
                       f"(v2_OpenEnded_*_{split}_questions.json, v2_*_{split}_annotations.json), "
                       f"found {match or 'none'}")
    return fs.join(folder, match[0])


class VQAHead(nn.Module):
    """Pooled text and image ``[B, Hp]`` -> answer logits ``[B, A]``."""

    def __init__(self, pooled_dim: int, num_answers: int, dropout: float = 0.5):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(pooled_dim, 2 * pooled_dim), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(2 * pooled_dim, num_answers))

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        return self.mlp(outputs["pooled_text"] * outputs["pooled_image"])


class VQATask:
    name = "vqa"
    metric = "vqa_accuracy"
    defaults = TaskDefaults(lr=4e-5, batch_size=256, epochs=20, max_text_len=23)

    def __init__(self, task_dir: str, regions: RegionStore, min_answer_count: int = 1):
        self.task_dir, self.regions = task_dir, regions
        self.min_answer_count = min_answer_count
        self.vocab: AnswerVocab | None = None
        self._dropped: Counter = Counter()

    @property
    def dropped(self) -> dict[str, int]:
        return dict(self._dropped)

    def load(self, split: str) -> list[VQAItem]:
        questions = fs.read_json(_find(self.task_dir, split, "questions")).get("questions", [])
        annotations = fs.read_json(_find(self.task_dir, split, "annotations")).get("annotations", [])
        by_qid = {a.get("question_id"): a for a in annotations}
        items = []
        for q in questions:
            ann = by_qid.get(q.get("question_id"))
            if ann is None or not ann.get("answers"):
                self._dropped["no_annotation"] += 1
                continue
            key = self.regions.key_for_image_id(q["image_id"])
            if key is None or self.regions[key].num_boxes == 0:
                self._dropped["no_regions"] += 1
                continue
            answers = [a["answer"] for a in ann["answers"]]
            majority = ann.get("multiple_choice_answer") or Counter(answers).most_common(1)[0][0]
            items.append(VQAItem(int(q["question_id"]), key, str(q["question"]), soft_scores(answers),
                                 normalize_answer(majority)))
        return items

    def build_head(self, encoder: nn.Module, train_items: list[VQAItem]) -> nn.Module:
        self.vocab = AnswerVocab.from_items(train_items, self.min_answer_count)
        return VQAHead(encoder.pooled_dim, len(self.vocab))

    def batch(self, items: list[VQAItem], encode: InputEncoder) -> dict[str, Any]:
        if self.vocab is None:
            raise RuntimeError("VQATask.build_head must run before batching (it fixes the vocabulary)")
        batch = encode([it.question for it in items], [self.regions[it.key] for it in items])
        batch["target"] = self.vocab.targets(items)
        batch["items"] = items
        return batch

    def loss(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits, batch["target"], reduction="none")
        return bce.sum() / max(1, logits.shape[0])

    def scores(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        answers = [self.vocab.answers[i] for i in logits.argmax(-1).tolist()]
        return torch.tensor([it.scores.get(a, 0.0) for it, a in zip(batch["items"], answers)])


register_task("vqa", VQATask)
