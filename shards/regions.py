"""Region shards: a detector's proposals per image (boxes, features, class probabilities, image size).

One sample per image key, members (``shards/FORMAT.md`` has the details):

- ``KEY.boxes.npy``: float32 ``[R, 4]`` pixel xyxy in the image shard's pixel grid;
- ``KEY.features.npy``: float16 ``[R, D]``;
- ``KEY.cls_prob.npy``: float16 ``[R, C]`` (optional: absent when the source had no class distribution);
- ``KEY.json``: ``{"image_w", "image_h", "num_boxes", ...}``.

``ROOT/regions.json`` describes the set (feature_dim, num_classes, class_names, source). Arrays are ``.npy``
read with ``allow_pickle=False``; every decoded sample is checked for shapes, dtypes and finite values.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import fs
from .errors import SampleError, SgaError
from .npy import load_npy
from .tario import TarSample, TarShardWriter, iter_tar

INFO_NAME = "regions.json"
REGIONS_SCHEMA_VERSION = 1
READ_STAGE = "read_regions"
WRITE_STAGE = "write_regions"


@dataclass
class RegionRecord:
    """Regions of one image.

    boxes: float32 ``[R, 4]`` pixel xyxy; features: float16 ``[R, D]``; cls_prob: float16 ``[R, C]`` whose
    rows sum to ~1, or ``None``; image_w/image_h: the size of the image the boxes refer to. ``meta`` holds
    extra ``KEY.json`` fields (e.g. the source image id) and never overrides the fields above.
    """

    key: str
    boxes: np.ndarray
    features: np.ndarray
    cls_prob: np.ndarray | None
    image_w: int
    image_h: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_boxes(self) -> int:
        return int(self.boxes.shape[0])


def check_regions(rec: RegionRecord) -> str | None:
    """Why ``rec`` breaks the format (dtypes, shapes, non-finite values, image size), or ``None``."""
    def bad_array(name: str, arr: Any, dtype: type, cols: int | None) -> str | None:
        if not isinstance(arr, np.ndarray) or arr.dtype != dtype:
            return f"{name} must be a {np.dtype(dtype).name} array, got {getattr(arr, 'dtype', type(arr))}"
        if arr.ndim != 2 or (cols is not None and arr.shape[1] != cols):
            return f"{name} has shape {arr.shape}, expected [R, {cols or 'D'}]"
        if not np.isfinite(arr).all():
            return f"{name} has non-finite values"
        return None

    reason = (bad_array("boxes", rec.boxes, np.float32, 4)
              or bad_array("features", rec.features, np.float16, None))
    if reason is None and rec.cls_prob is not None:
        reason = bad_array("cls_prob", rec.cls_prob, np.float16, None)
        if reason is None and ((rec.cls_prob < 0).any() or (rec.cls_prob > 1).any()):
            reason = "cls_prob has values outside [0, 1]"
    if reason:
        return reason
    num = rec.boxes.shape[0]
    for name, arr in (("features", rec.features), ("cls_prob", rec.cls_prob)):
        if arr is not None and arr.shape[0] != num:
            return f"{name} has {arr.shape[0]} rows but boxes has {num}"
    if rec.features.shape[1] < 1:
        return "features has width 0"
    for name in ("image_w", "image_h"):
        value = getattr(rec, name)
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
            return f"{name} must be a positive integer, got {value!r}"
    return None


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _load_npy(key: str, name: str, data: bytes) -> np.ndarray:
    try:
        return load_npy(data)
    except (ValueError, OSError, EOFError) as exc:
        raise SampleError(key, READ_STAGE, f"{name} is not a plain .npy array: {exc}") from exc


def encode_regions(rec: RegionRecord) -> dict[str, bytes]:
    """RegionRecord -> tar members ``{"boxes.npy", "features.npy", ["cls_prob.npy"], "json"}``.

    Raises :class:`SampleError` (stage ``write_regions``) when the record breaks the format.
    """
    reason = check_regions(rec)
    if reason:
        raise SampleError(rec.key, WRITE_STAGE, reason)
    info = {**rec.meta, "image_w": int(rec.image_w), "image_h": int(rec.image_h), "num_boxes": rec.num_boxes}
    members = {"boxes.npy": _npy(rec.boxes), "features.npy": _npy(rec.features),
               "json": json.dumps(info, sort_keys=True).encode()}
    if rec.cls_prob is not None:
        members["cls_prob.npy"] = _npy(rec.cls_prob)
    return members


def decode_regions(sample: TarSample) -> RegionRecord:
    """Tar sample -> RegionRecord; raises :class:`SampleError` (stage ``read_regions``) on bad content."""
    key, members = sample.key, sample.members
    if sample.problems:
        raise SampleError(key, READ_STAGE, "; ".join(sample.problems))
    missing = [m for m in ("boxes.npy", "features.npy", "json") if m not in members]
    if missing:
        raise SampleError(key, READ_STAGE, f"missing members {', '.join(f'{key}.{m}' for m in missing)}")
    try:
        info = json.loads(members["json"])
    except (ValueError, UnicodeDecodeError) as exc:
        raise SampleError(key, READ_STAGE, f"{key}.json is not JSON: {exc}") from exc
    if not isinstance(info, dict) or not {"image_w", "image_h", "num_boxes"} <= info.keys():
        raise SampleError(key, READ_STAGE, f"{key}.json lacks image_w, image_h or num_boxes")
    cls_prob = _load_npy(key, "cls_prob", members["cls_prob.npy"]) if "cls_prob.npy" in members else None
    meta = {k: v for k, v in info.items() if k not in ("image_w", "image_h", "num_boxes")}
    rec = RegionRecord(key=key, boxes=_load_npy(key, "boxes", members["boxes.npy"]),
                       features=_load_npy(key, "features", members["features.npy"]), cls_prob=cls_prob,
                       image_w=info["image_w"], image_h=info["image_h"], meta=meta)
    reason = check_regions(rec)
    if reason is None and info["num_boxes"] != rec.num_boxes:
        reason = f"{key}.json says num_boxes={info['num_boxes']} but boxes has {rec.num_boxes} rows"
    if reason:
        raise SampleError(key, READ_STAGE, reason)
    return rec


class RegionShardWriter:
    """Write ``ROOT/NNNNN.tar`` atomically; use as a context manager, ``.write(rec)`` per image."""

    def __init__(self, root_uri: str, shard: str):
        self.uri = fs.join(root_uri, f"{shard}.tar")
        self._tar = TarShardWriter(self.uri)

    @property
    def count(self) -> int:
        return self._tar.count

    def __enter__(self) -> RegionShardWriter:
        self._tar.__enter__()
        return self

    def write(self, rec: RegionRecord) -> None:
        self._tar.write(rec.key, encode_regions(rec))

    def __exit__(self, exc_type, exc, tb) -> bool:
        return self._tar.__exit__(exc_type, exc, tb)


def iter_region_shard(root_uri: str, shard: str,
                      on_error: Callable[[SampleError], None] | None = None) -> Iterator[RegionRecord]:
    """Decoded records of ``ROOT/NNNNN.tar`` in tar order.

    A bad sample raises :class:`SampleError`, or with ``on_error`` is passed to it and skipped. A damaged
    tar raises :class:`ShardReadError` after the complete samples before the damage.
    """
    for sample in iter_tar(fs.join(root_uri, f"{shard}.tar")):
        try:
            rec = decode_regions(sample)
        except SampleError as err:
            if on_error is None:
                raise
            on_error(err)
            continue
        yield rec


def write_regions_info(root_uri: str, feature_dim: int, num_classes: int, class_names: list[str] | None,
                       source: Any) -> None:
    """Write ``ROOT/regions.json``: ``num_classes`` is 0 (and ``class_names`` None) without cls_prob."""
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    fs.write_json(fs.join(root_uri, INFO_NAME), {
        "feature_dim": int(feature_dim), "num_classes": int(num_classes),
        "class_names": list(class_names) if class_names is not None else None,
        "source": source, "schema_version": REGIONS_SCHEMA_VERSION})


def read_regions_info(root_uri: str) -> dict[str, Any]:
    """``ROOT/regions.json``: a dict with feature_dim, num_classes, class_names, source, schema_version."""
    uri = fs.join(root_uri, INFO_NAME)
    try:
        info = fs.read_json(uri)
    except FileNotFoundError as exc:
        raise SgaError(f"{uri} is missing: {root_uri} is not a region shard set; create one with "
                       "`sga regions import` or `sga world`") from exc
    except ValueError as exc:
        raise SgaError(f"{uri} is not valid JSON ({exc}); re-create the region set") from exc
    if not isinstance(info, dict) or "feature_dim" not in info:
        raise SgaError(f"{uri} lacks feature_dim; re-create the region set")
    if info.get("schema_version", REGIONS_SCHEMA_VERSION) > REGIONS_SCHEMA_VERSION:
        raise SgaError(f"{uri} has schema_version {info['schema_version']}, newer than this sga reads "
                       f"({REGIONS_SCHEMA_VERSION}); upgrade sga")
    return info
