"""What every fine-tuning task shares: the task images' regions in memory and the student's input encoding.

Task sets are small next to a pretraining corpus (RefCOCO+ has 20k images, the synthetic world a few
thousand), so :class:`RegionStore` reads a region shard set once into a dict keyed by sample key; every
task item then looks its image up by key (VCR ``img_id``, RefCOCO+ ``image_key``) or by VQA's integer
``image_id`` (``int(key)``). Damaged samples and shards are skipped and counted, never fatal.

:class:`InputEncoder` turns ``(texts, region records)`` into the encoder's inputs with the pretraining
collator (:class:`student.collate.Collator`), so tokenisation, truncation, box normalisation, the [IMG]
token and padding are exactly those the checkpoint was trained with. Every corruption of the collator is
tied to its loss; with ``gnd`` as the only loss and no phrases given, it masks nothing, swaps nothing and
samples no pairs, so the encoding is deterministic. Class distributions are not passed: only masked-region
classification reads them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Any

import numpy as np
import torch

from shards import fs
from shards.errors import SampleError, SgaError, ShardReadError
from shards.regions import RegionRecord, iter_region_shard, read_regions_info

from ..collate import Collator
from ..config import StudentConfig

log = logging.getLogger(__name__)


class RegionStore:
    """Every region record of a shard set, by key. ``errors`` counts what was skipped and why."""

    def __init__(self, uri: str):
        self.uri = uri
        self.info = read_regions_info(uri)
        self.records: dict[str, RegionRecord] = {}
        self.errors: Counter = Counter()
        names = [n[: -len(".tar")] for n in fs.list_dir(uri, ".tar")]
        if not names:
            raise SgaError(f"{uri} holds no region shards (NNNNN.tar); pass --regions the task images' "
                           "region set, e.g. WORLD/tasks/regions")
        for shard in names:
            try:
                for rec in iter_region_shard(uri, shard, on_error=self._bad_sample):
                    self.records[rec.key] = rec
            except ShardReadError as exc:
                self.errors["damaged_region_shards"] += 1
                log.warning("region shard %s is damaged (%s); its remaining samples are skipped",
                            exc.uri, exc.reason)
        self._by_image_id = {}
        for key in self.records:
            if key.isdigit():
                self._by_image_id[int(key)] = key

    def _bad_sample(self, err: SampleError) -> None:
        self.errors["bad_region_samples"] += 1
        log.warning("region sample %s skipped: %s", err.key, err.reason)

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __getitem__(self, key: str) -> RegionRecord:
        return self.records[key]

    def key_for_image_id(self, image_id: int) -> str | None:
        """The key of VQA's integer ``image_id`` (``int(key)``), or None when no such image has regions."""
        return self._by_image_id.get(int(image_id))


def load_regions(uri: str) -> RegionStore:
    return RegionStore(uri)


class InputEncoder:
    """``(texts, records)`` -> encoder inputs (collator keys, B = len(texts), V = 1 + max regions)::

        input_ids [B, L] long, attention_mask [B, L] bool, region_features [B, V, D] float32,
        region_boxes [B, V, 4] float32 (normalised xyxy), region_mask [B, V] bool

    plus ``region_count`` [B] long, the regions kept per image (at most ``config.max_regions``: region r
    of a record is visual token r + 1; token 0 is [IMG]).
    """

    INPUT_KEYS = ("input_ids", "attention_mask", "region_features", "region_boxes", "region_mask")

    def __init__(self, tokenizer: Any, config: StudentConfig, max_text_len: int):
        # The position table bounds the text length a checkpoint can read.
        length = max(3, min(max_text_len, config.max_position))
        quiet = dataclasses.replace(config, losses=("gnd",), max_text_len=length)
        self.collator = Collator(tokenizer, quiet)
        self.tokenizer = tokenizer
        self.max_regions = config.max_regions
        self._generator = torch.Generator().manual_seed(0)   # drawn from, but nothing depends on it

    @property
    def sep(self) -> str:
        """The separator token text: joins the two segments of a VCR choice."""
        return self.tokenizer.sep_token

    def __call__(self, texts: list[str], records: list[RegionRecord]) -> dict[str, torch.Tensor]:
        samples = [{"key": rec.key, "caption": text, "phrase_spans": [],
                    "align": np.zeros((0, rec.num_boxes), dtype=bool), "boxes": rec.boxes,
                    "features": rec.features, "cls_prob": None, "image_w": rec.image_w,
                    "image_h": rec.image_h} for text, rec in zip(texts, records, strict=True)]
        batch = self.collator(samples, self._generator)
        out = {k: batch[k] for k in self.INPUT_KEYS}
        out["region_count"] = torch.tensor([min(rec.num_boxes, self.max_regions) for rec in records])
        return out


def pad_rows(rows: list[np.ndarray], width: int, fill: float) -> torch.Tensor:
    """float32 ``[len(rows), width]``: each row cut to ``width`` and padded with ``fill``."""
    out = np.full((len(rows), width), fill, dtype=np.float32)
    for i, row in enumerate(rows):
        n = min(len(row), width)
        out[i, :n] = row[:n]
    return torch.from_numpy(out)
