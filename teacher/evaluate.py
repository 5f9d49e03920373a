"""Phrase-grounding evaluation on a synthetic world's hidden ground truth (``sga teacher eval``).

- ``recall_at_1`` / ``recall_at_5``: over visible phrases, the fraction whose first 1 (5) boxes include one
  with IoU >= ``iou_threshold`` against any of the phrase's true boxes (Flickr30k's "AnyBox" protocol, as
  MDETR reports it). The teacher is asked for its full ranking (``score_floor=0``), so these are MDETR's
  numbers.
- ``nonvisible_no_box``: over phrases that name nothing in the image, the fraction whose best score stays
  below ``score_threshold`` (the teacher correctly gives them no box); ``visible_box_above_threshold`` is the
  matching rate for visible phrases, so the two read together.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable

import numpy as np

from shards.boxes import box_iou
from shards.progress import progress

from .base import GroundingInput, PhraseBoxes, Teacher, load_teacher
from .worlddata import GroundedSample, iter_world


def _hit(pred: PhraseBoxes, truth: np.ndarray, k: int, iou_threshold: float) -> bool:
    top = pred.boxes[:k]
    return bool(len(top)) and bool((box_iou(top, truth) >= iou_threshold).any())


def evaluate_teacher(teacher: Teacher, samples: Iterable[GroundedSample], score_threshold: float = 0.2,
                     iou_threshold: float = 0.5, batch_size: int = 16, show_progress: bool = True,
                     total: int | None = None) -> dict:
    """Ground every sample's phrases with ``teacher`` and score them against the truth (module docstring).

    Returns ``{"images", "visible_phrases", "recall_at_1", "recall_at_5", "nonvisible_phrases",
    "nonvisible_no_box", "visible_box_above_threshold", "score_threshold", "iou_threshold", "seconds"}``.
    """
    start = time.time()
    images = visible = nonvisible = hits1 = hits5 = quiet_nonvisible = loud_visible = 0
    bar = progress(total=total, desc="teacher eval", unit="img",
                   **({} if show_progress else {"disable": True}))
    it = iter(samples)
    while batch := list(itertools.islice(it, batch_size)):
        inputs = [GroundingInput(s.image, s.caption, [(p.start, p.end) for p in s.phrases]) for s in batch]
        for sample, answers in zip(batch, teacher.ground(inputs)):
            for phrase, pred in zip(sample.phrases, answers):
                above = bool(len(pred.scores)) and float(pred.scores[0]) >= score_threshold
                if phrase.visible and len(phrase.boxes):
                    visible += 1
                    hits1 += _hit(pred, phrase.boxes, 1, iou_threshold)
                    hits5 += _hit(pred, phrase.boxes, 5, iou_threshold)
                    loud_visible += above
                elif not phrase.visible:
                    nonvisible += 1
                    quiet_nonvisible += not above
        images += len(batch)
        bar.update(len(batch))
    bar.close()

    def rate(n: int, d: int) -> float | None:
        return round(n / d, 4) if d else None

    return {"images": images, "visible_phrases": visible, "recall_at_1": rate(hits1, visible),
            "recall_at_5": rate(hits5, visible), "nonvisible_phrases": nonvisible,
            "nonvisible_no_box": rate(quiet_nonvisible, nonvisible),
            "visible_box_above_threshold": rate(loud_visible, visible),
            "score_threshold": score_threshold, "iou_threshold": iou_threshold,
            "seconds": round(time.time() - start, 2)}


def eval_world(world_uri: str, teacher_spec: str = "tiny", device: str = "cpu", limit: int | None = None,
               score_threshold: float = 0.2, iou_threshold: float = 0.5, batch_size: int = 16,
               show_progress: bool = True, long_captions: str | None = None) -> dict:
    """``sga teacher eval``: load ``teacher_spec`` with its full ranking and evaluate it on ``world_uri``
    (``long_captions``: an MDETR teacher's mode for captions past its text encoder; None: its default)."""
    extra = {"long_captions": long_captions} if long_captions else {}
    teacher = load_teacher(teacher_spec, device=device, score_floor=0.0, top_k=5, **extra)
    result = evaluate_teacher(teacher, iter_world(world_uri, limit), score_threshold, iou_threshold,
                              batch_size, show_progress, total=limit)
    return {"world": world_uri, "teacher": teacher_spec, "fingerprint": teacher.fingerprint, **result}
