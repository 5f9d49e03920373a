"""Ground-truth grounding samples from a synthetic world: image + caption + phrases with their true boxes.

Reads ``WORLD/images/`` (img2dataset shards) and the hidden ``WORLD/gt/NNNNN.parquet`` (one row per caption
phrase: ``key, phrase, start, end, boxes`` pixel xyxy, ``visible``). Only the teacher's training and
evaluation read the ground truth; the labeling job never does.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from shards import fs
from shards.errors import SgaError
from shards.images import SUCCESS, iter_image_shard, list_shards


@dataclass
class GTPhrase:
    """A caption phrase ``[start, end)`` and the pixel xyxy boxes (float32 ``[K, 4]``) of what it names."""

    start: int
    end: int
    boxes: np.ndarray
    visible: bool


@dataclass
class GroundedSample:
    """One world image (uint8 ``[H, W, 3]`` RGB), its caption and its phrases (possibly none)."""

    key: str
    image: np.ndarray
    caption: str
    phrases: list[GTPhrase]


def read_ground_truth(world_uri: str) -> dict[str, list[GTPhrase]]:
    """``key -> phrases`` (in caption order) from every ``WORLD/gt/*.parquet``."""
    gt_dir = fs.join(world_uri, "gt")
    names = fs.list_dir(gt_dir, ".parquet") if fs.is_dir(gt_dir) else []
    if not names:
        raise SgaError(f"{gt_dir}: no ground-truth parquet files; pass --world a directory written by "
                       "`sga world --out DIR`")
    out: dict[str, list[GTPhrase]] = {}
    for name in names:
        data = pa.BufferReader(fs.read_bytes(fs.join(gt_dir, name)))
        table = pq.read_table(data, columns=["key", "start", "end", "boxes", "visible"])
        for row in table.to_pylist():
            boxes = np.asarray(row["boxes"] or [], dtype=np.float32).reshape(-1, 4)
            out.setdefault(row["key"], []).append(GTPhrase(int(row["start"]), int(row["end"]), boxes,
                                                           bool(row["visible"])))
    for phrases in out.values():
        phrases.sort(key=lambda p: (p.start, p.end))
    return out


def decode_image(jpg: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 ``[H, W, 3]`` RGB."""
    with Image.open(io.BytesIO(jpg)) as im:
        return np.asarray(im.convert("RGB"))


def iter_world(world_uri: str, limit: int | None = None) -> Iterator[GroundedSample]:
    """The world's successfully stored images in shard order, each with its ground-truth phrases.

    Images whose caption has no phrase come with ``phrases == []`` (they teach "no object"). Stops after
    ``limit`` samples when given.
    """
    truth = read_ground_truth(world_uri)
    images = fs.join(world_uri, "images")
    count = 0
    for shard in list_shards(images):
        for sample in iter_image_shard(images, shard):
            if sample.status != SUCCESS or sample.jpg is None:
                continue
            if limit is not None and count >= limit:
                return
            yield GroundedSample(sample.key, decode_image(sample.jpg), sample.caption or "",
                                 truth.get(sample.key, []))
            count += 1


def world_captions(world_uri: str) -> list[tuple[str, str]]:
    """``(key, caption)`` of the samples :func:`iter_world` yields, in the same order, without decoding."""
    images = fs.join(world_uri, "images")
    if not fs.is_dir(images):
        raise SgaError(f"{images}: missing; pass --world a directory written by `sga world --out DIR`")
    return [(s.key, s.caption or "") for shard in list_shards(images) for s in iter_image_shard(images, shard)
            if s.status == SUCCESS and s.jpg is not None]
