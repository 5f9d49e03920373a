"""The MDETR grounding teacher: images + captions + phrase spans -> scored boxes per phrase.

Scoring follows MDETR's published Flickr30k evaluation (``PostProcessFlickr``): the soft-token head gives each
query a softmax over the caption's token positions plus "no object"; a phrase scores each query by the
**maximum** over the phrase's tokens of that probability, and queries are ranked by it. Flickr30k recall@k
reads the first k boxes of that ranking, so our best-first lists are the same ranking, truncated: boxes
scoring below ``score_floor`` are dropped (this only removes boxes ranked after every kept one) and at most
``top_k`` are kept. Hence recall@k computed from our output equals MDETR's for every k <= top_k as long as the
k-th box clears the floor; with ``score_floor=0`` it is exactly MDETR's.

Boxes are MDETR's sigmoid (cx, cy, w, h), normalised to the un-padded input, scaled to the original image's
pixels as xyxy and clipped to the image. A caption longer than the model's text positions is grounded
clause by clause (``long_captions="clauses"``, :mod:`teacher.windows`), each window of whole phrases a
caption of its own with the same image; with ``long_captions="truncate"`` it is cut instead, and phrases past
the cut get no boxes (MDETR's behaviour: its Flickr30k captions all fit).

A teacher directory holds ``config.json`` + ``model.safetensors`` (:mod:`teacher.mdetr.checkpoint`),
``tokenizer/`` (a fast tokenizer) and ``teacher.json`` (``{"format", "kind", "preprocess", "info"}``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from shards.errors import SgaError

from .base import GroundingInput, PhraseBoxes
from .fingerprint import compute_fingerprint, weights_digest
from .mdetr.checkpoint import convert_checkpoint, load_mdetr
from .mdetr.model import MDETR
from .positive_map import positive_map
from .preprocess import PreprocessConfig, preprocess_batch
from .tokenizer import load_tokenizer
from .windows import Window, caption_windows

TEACHER_FILE = "teacher.json"
TOKENIZER_DIR = "tokenizer"
TEACHER_FORMAT = "sga-teacher"
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LONG_CAPTIONS = ("clauses", "truncate")


@dataclass(frozen=True)
class InferenceConfig:
    """What turns model outputs into labels. ``precision`` is the autocast dtype (``fp32`` = no autocast);
    ``long_captions`` is how captions longer than the text encoder are read (module docstring)."""

    score_floor: float = 0.05
    top_k: int = 10
    precision: str = "fp32"
    long_captions: str = "clauses"


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` -> ``bf16`` on a CUDA device that supports it, else ``fp32``; checks explicit choices."""
    if precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16" if cuda_bf16 else "fp32"
    if precision not in PRECISIONS:
        raise SgaError(f"unknown precision {precision!r}; choose auto, {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise SgaError("fp16 inference needs a CUDA device; use --precision fp32 or bf16 on CPU")
    return precision


def tokenizer_digest(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary, merges, normaliser and processors (not transient settings)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def scale_to_pixels(boxes: torch.Tensor, width: int, height: int) -> np.ndarray:
    """``[K, 4]`` normalised cxcywh -> float32 ``[K, 4]`` pixel xyxy, clipped to the ``width x height``
    image."""
    b = boxes.float().cpu()
    xyxy = torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], dim=1)
    xyxy = xyxy * torch.tensor([width, height, width, height], dtype=torch.float32)
    limits = torch.tensor([width, height, width, height], dtype=torch.float32)
    return torch.minimum(xyxy.clamp(min=0), limits).numpy().astype(np.float32)


def phrase_scores(prob: torch.Tensor, pos_map: torch.Tensor) -> torch.Tensor:
    """``prob [Q, P]`` (softmax over positions) and ``pos_map [N, P]`` -> ``[N, Q]``: per phrase and query,
    the max over the phrase's tokens (``pos_map > 0``) of the query's probability."""
    mask = (pos_map > 0).to(prob.dtype)
    return (prob[None, :, :] * mask[:, None, :]).amax(dim=-1)


def _check_spans(sample: GroundingInput) -> None:
    for start, end in sample.spans:
        if not 0 <= start < end <= len(sample.caption):
            raise ValueError(f"phrase span ({start}, {end}) is not inside the caption of length "
                             f"{len(sample.caption)}: {sample.caption!r}")


class MDETRTeacher:
    """An MDETR model as a :class:`teacher.base.Teacher`. See the module docstring for the scoring rule."""

    def __init__(self, model: MDETR, tokenizer, preprocess: PreprocessConfig, inference: InferenceConfig,
                 name: str = "mdetr", device: str = "cpu", max_batch: int = 16):
        self.name = name
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        if inference.long_captions not in LONG_CAPTIONS:
            raise SgaError(f"unknown long-caption mode {inference.long_captions!r}; choose "
                           f"{' or '.join(LONG_CAPTIONS)}")
        self.inference = InferenceConfig(inference.score_floor, inference.top_k,
                                         resolve_precision(inference.precision, self.device),
                                         inference.long_captions)
        self.max_batch = max_batch
        config = model.config
        # Positions the head can point at, and that RoBERTa can embed (it numbers positions from pad + 1).
        self.max_text_len = min(config.num_classes, config.text_encoder["max_position_embeddings"] - 2)
        self.fingerprint = compute_fingerprint(
            weights_digest(model.state_dict()), config.to_dict(),
            {**preprocess.to_dict(), "tokenizer": tokenizer_digest(tokenizer),
             "max_text_len": self.max_text_len},
            asdict(self.inference),
        )

    @classmethod
    def from_dir(cls, path: str | Path, name: str | None = None, device: str = "cpu",
                 score_floor: float = 0.05, top_k: int = 10, precision: str = "auto",
                 max_batch: int = 16, long_captions: str = "clauses") -> MDETRTeacher:
        """Load a teacher directory (see the module docstring)."""
        path = Path(path)
        info_path = path / TEACHER_FILE
        if not info_path.is_file():
            raise SgaError(f"{info_path}: missing; {path} is not a teacher directory (make one with "
                           "`sga teacher train` or `sga teacher convert`)")
        info = json.loads(info_path.read_text())
        if info.get("format") != TEACHER_FORMAT or info.get("kind") != "mdetr":
            raise SgaError(f"{info_path}: not an sga MDETR teacher (format {info.get('format')!r}, kind "
                           f"{info.get('kind')!r}); re-create it with `sga teacher convert`")
        model = load_mdetr(str(path))
        tokenizer = load_tokenizer(path / TOKENIZER_DIR)
        return cls(model, tokenizer, PreprocessConfig.from_dict(info["preprocess"]),
                   InferenceConfig(score_floor, top_k, precision, long_captions), name=name or path.name,
                   device=device,
                   max_batch=max_batch)

    def ground(self, batch: Sequence[GroundingInput]) -> list[list[PhraseBoxes]]:
        """``[sample][phrase]`` scored boxes; see :class:`teacher.base.Teacher`."""
        parts: list[GroundingInput] = []
        owners: list[tuple[int, tuple[int, ...]]] = []
        for b, sample in enumerate(batch):
            _check_spans(sample)
            for w in self._windows(sample):
                spans = [w.local(sample.spans[i]) for i in w.phrases]
                parts.append(GroundingInput(sample.image, sample.caption[w.start: w.end], spans))
                owners.append((b, w.phrases))
        answers: list[list[PhraseBoxes]] = []
        for i in range(0, len(parts), self.max_batch):
            answers.extend(self._ground_chunk(parts[i: i + self.max_batch]))
        out: list[list[PhraseBoxes]] = [[PhraseBoxes.empty()] * len(s.spans) for s in batch]
        for (b, phrases), answer in zip(owners, answers):
            for i, boxes in zip(phrases, answer):
                out[b][i] = boxes
        return out

    def _windows(self, sample: GroundingInput) -> list[Window]:
        if self.inference.long_captions == "truncate":
            return [Window(0, len(sample.caption), tuple(range(len(sample.spans))))]
        # Counted untruncated (the call resets the truncation the model inputs set on the backend).
        return caption_windows(sample.caption, sample.spans,
                               lambda text: len(self.tokenizer(text, truncation=False)["input_ids"]),
                               self.max_text_len)

    @torch.inference_mode()
    def _ground_chunk(self, batch: Sequence[GroundingInput]) -> list[list[PhraseBoxes]]:
        images, image_mask = preprocess_batch([s.image for s in batch], self.preprocess)
        tokenized = self.tokenizer([s.caption for s in batch], padding="longest", truncation=True,
                                   max_length=self.max_text_len, return_tensors="pt")
        dtype = PRECISIONS[self.inference.precision]
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            outputs = self.model(images.to(self.device), image_mask.to(self.device),
                                 tokenized["input_ids"].to(self.device),
                                 tokenized["attention_mask"].to(self.device))
        probs = outputs["pred_logits"].float().softmax(-1).cpu()
        pred_boxes = outputs["pred_boxes"].float().cpu()
        num_positions = probs.shape[-1]
        results = []
        for b, sample in enumerate(batch):
            pos_map = positive_map(tokenized, [[span] for span in sample.spans], num_positions, batch_index=b)
            scores = phrase_scores(probs[b], pos_map)
            height, width = sample.image.shape[:2]
            boxes = scale_to_pixels(pred_boxes[b], width, height)
            results.append([self._select(scores[p], boxes, bool(pos_map[p].any()))
                            for p in range(len(sample.spans))])
        return results

    def _select(self, scores: torch.Tensor, boxes: np.ndarray, has_tokens: bool) -> PhraseBoxes:
        """Best-first boxes of one phrase: score >= floor, at most top_k; none if the phrase has no token."""
        if not has_tokens:
            return PhraseBoxes.empty()
        s = scores.numpy()
        order = np.argsort(-s, kind="stable")
        order = order[s[order] >= self.inference.score_floor][: self.inference.top_k]
        return PhraseBoxes(boxes[order].reshape(-1, 4), s[order].astype(np.float32))


def write_teacher_json(out_dir: str | Path, preprocess: PreprocessConfig, info: dict) -> None:
    """Write ``teacher.json`` (atomically; last, so its presence marks a complete teacher directory)."""
    path = Path(out_dir) / TEACHER_FILE
    tmp = path.with_name(TEACHER_FILE + ".tmp")
    tmp.write_text(json.dumps({"format": TEACHER_FORMAT, "kind": "mdetr", "preprocess": preprocess.to_dict(),
                               "info": info}, indent=1, sort_keys=True))
    tmp.replace(path)


def convert_to_teacher(src: str, tokenizer_dir: str, out_dir: str, entry: str | None = None,
                       weights: str = "auto", preprocess: PreprocessConfig | None = None) -> dict:
    """A released MDETR ``.pth`` + a local tokenizer directory (roberta-base's files) -> a teacher directory.

    Returns the conversion summary plus ``{"teacher": out_dir}``; load it with ``--teacher OUT_DIR``.
    """
    tokenizer = load_tokenizer(tokenizer_dir)  # fail before the slow conversion
    summary = convert_checkpoint(src, entry, out_dir, weights)
    tokenizer.save_pretrained(str(Path(out_dir) / TOKENIZER_DIR))
    write_teacher_json(out_dir, preprocess or PreprocessConfig(), {"converted_from": summary})
    return {**summary, "teacher": out_dir}
