"""Training examples for the tiny teacher: world samples -> resized images, token ids and matched targets.

Every sample is prepared once (decode, resize to the teacher's input size, tokenise) and kept in memory; a
batch is then only normalisation, padding and stacking. A caption longer than the text encoder is truncated,
or split into clauses, windows of whole phrases (:mod:`teacher.windows`, as the teacher grounds it), one
example each sharing the image. Targets follow MDETR: one target per distinct true box, whose positive map
covers the tokens of *every* phrase that names that box (so "the red circle" and "two circles" share the red
circle's target), normalised to sum to 1. Phrases naming nothing get no target: the model learns to leave
their tokens unpointed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .positive_map import token_span
from .preprocess import PreprocessConfig, normalize, pad_batch, resize_image
from .windows import Window, caption_windows
from .worlddata import GroundedSample


@dataclass
class Example:
    """``image`` uint8 ``[h, w, 3]`` (already resized); ``input_ids`` ``[T]`` with ``<s>``/``</s>``;
    ``boxes`` float32 ``[N, 4]`` normalised cxcywh; ``tokens`` bool ``[N, T]`` (each row has a True)."""

    image: np.ndarray
    input_ids: np.ndarray
    boxes: np.ndarray
    tokens: np.ndarray


def make_examples(sample: GroundedSample, tokenizer, preprocess: PreprocessConfig, max_text_len: int,
                  windows: bool = False) -> list[Example]:
    """The sample's example, or with ``windows`` one per window of a caption longer than ``max_text_len``
    tokens (each window's phrases re-based to it; the resized image is shared, not copied)."""
    image = resize_image(sample.image, preprocess)
    if not windows:
        return [_example(sample, image, tokenizer, max_text_len)]
    spans = [(p.start, p.end) for p in sample.phrases]
    parts = caption_windows(sample.caption, spans, lambda text: len(tokenizer(text)["input_ids"]),
                            max_text_len)

    def in_window(w: Window) -> GroundedSample:
        phrases = []
        for i in w.phrases:
            start, end = w.local(spans[i])
            phrases.append(dataclasses.replace(sample.phrases[i], start=start, end=end))
        return GroundedSample(sample.key, sample.image, sample.caption[w.start: w.end], phrases)

    return [_example(in_window(w), image, tokenizer, max_text_len) for w in parts]


def _example(sample: GroundedSample, image: np.ndarray, tokenizer, max_text_len: int) -> Example:
    """One example of ``sample`` (module docstring) with its already resized ``image``. Boxes whose phrases
    were all truncated away are dropped."""
    tokenized = tokenizer(sample.caption, truncation=True, max_length=max_text_len)
    num_tokens = len(tokenized["input_ids"])
    height, width = sample.image.shape[:2]
    scale = np.asarray([width, height, width, height], dtype=np.float32)
    by_box: dict[tuple[float, ...], np.ndarray] = {}
    for phrase in sample.phrases:
        span = token_span(tokenized, phrase.start, phrase.end) if phrase.visible else None
        if span is None:
            continue
        for box in phrase.boxes:
            mask = by_box.setdefault(tuple(box.tolist()), np.zeros(num_tokens, dtype=bool))
            mask[span[0]: span[1] + 1] = True
    xyxy = np.clip(np.asarray(list(by_box), dtype=np.float32).reshape(-1, 4) / scale, 0.0, 1.0)
    cxcywh = np.concatenate([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], axis=1)
    tokens = np.stack(list(by_box.values())) if by_box else np.zeros((0, num_tokens), dtype=bool)
    return Example(image, np.asarray(tokenized["input_ids"], dtype=np.int64), cxcywh.astype(np.float32),
                   tokens)


def collate(examples: Sequence[Example], preprocess: PreprocessConfig, pad_token_id: int,
            num_positions: int) -> dict:
    """A training batch.

    Returns ``{"images" [B, 3, H, W] float32, "image_mask" [B, H, W] bool (True = pad), "input_ids" [B, T],
    "attention_mask" [B, T] long, "targets": [{"boxes" [N, 4], "positive_map" [N, num_positions]}]}``.
    """
    images, image_mask = pad_batch([normalize(e.image, preprocess) for e in examples],
                                   preprocess.size_multiple)
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    targets = []
    for i, e in enumerate(examples):
        input_ids[i, : len(e.input_ids)] = torch.from_numpy(e.input_ids)
        attention_mask[i, : len(e.input_ids)] = 1
        pos = torch.zeros((len(e.boxes), num_positions), dtype=torch.float32)
        pos[:, : e.tokens.shape[1]] = torch.from_numpy(e.tokens.astype(np.float32))
        targets.append({"boxes": torch.from_numpy(e.boxes),
                        "positive_map": pos / pos.sum(-1, keepdim=True).clamp(min=1)})
    return {"images": images, "image_mask": image_mask, "input_ids": input_ids,
            "attention_mask": attention_mask, "targets": targets}
