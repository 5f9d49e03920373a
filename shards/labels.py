"""Label shards: per caption, its noun phrases, the teacher's boxes per phrase and the phrase x region matrix.

A label set lives in ``LABELS/<labelset_id>/``: ``NNNNN.tar.gz`` (one member ``KEY.labels.json`` per
labelled sample, gzip-compressed: a label is a few hundred bytes, less than its tar header and padding),
the manifest ``NNNNN.parquet`` and marker ``NNNNN_stats.json`` (``shards.manifest``), and ``labelset.json``
(the :class:`LabelSetInfo`). Every label tar also carries the info in its PAX global header, so a shard
copied on its own still names its teacher. ``shards/FORMAT.md`` documents the JSON.

Every teacher box above the set's ``score_floor`` is kept, so the matrix can be re-derived at other
thresholds with :func:`alignment_matrix` without relabelling.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from . import fs
from .boxes import box_iou
from .errors import SampleError, SgaError
from .tario import TarSample, TarShardReader, TarShardWriter

SCHEMA_VERSION = 1
INFO_NAME = "labelset.json"
MEMBER = "labels.json"
READ_STAGE = "read_labels"
WRITE_STAGE = "write_labels"
PAX_INFO = "sga.labelset"
PAX_ID = "sga.labelset_id"
SHARD_SUFFIX = ".tar.gz"
# Label sets written before the shards were compressed hold plain NNNNN.tar files; they are read as is.
LEGACY_SUFFIX = ".tar"
# Stored precision: a tenth of a pixel and 1e-4 of score are far below teacher noise and keep labels small.
BOX_DECIMALS = 1
SCORE_DECIMALS = 4


@dataclass
class PhraseLabel:
    """One phrase: ``caption[start:end] == text``; boxes float32 ``[K, 4]`` pixel xyxy, best first;
    scores float32 ``[K]`` descending, all >= the label set's ``score_floor``."""

    text: str
    start: int
    end: int
    boxes: np.ndarray
    scores: np.ndarray


@dataclass
class LabelRecord:
    """Labels of one sample: ``align`` is bool ``[P, R]`` (P = len(phrases), R = num_regions) at the label
    set's default thresholds; ``align[p, r]`` says region r of the region shard shows phrase p."""

    key: str
    caption: str
    image_w: int
    image_h: int
    num_regions: int
    phrases: list[PhraseLabel]
    align: np.ndarray


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@dataclass
class LabelSetInfo:
    """Provenance of a label set. ``labelset_id`` hashes every field but ``created_at``: the same teacher,
    extractor and thresholds give the same id, and so the same output directory."""

    teacher_name: str
    teacher_fingerprint: str
    extractor: str
    score_floor: float
    score_threshold: float
    iou_threshold: float = 0.5
    top_k: int = 10
    schema_version: int = SCHEMA_VERSION
    created_at: str = field(default_factory=_now)

    @property
    def labelset_id(self) -> str:
        identity = {k: v for k, v in asdict(self).items() if k != "created_at"}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "labelset_id": self.labelset_id}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabelSetInfo:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` when fields are missing or unknown."""
        fields = {k: v for k, v in data.items() if k != "labelset_id"}
        try:
            info = cls(**fields)
        except TypeError as exc:
            raise ValueError(f"not a label set description: {exc}") from exc
        if "labelset_id" in data and data["labelset_id"] != info.labelset_id:
            raise ValueError(f"labelset_id {data['labelset_id']} does not match its fields "
                             f"({info.labelset_id})")
        return info


def labelset_uri(labels_root: str, info: LabelSetInfo) -> str:
    """``LABELS/<labelset_id>``: where the label set described by ``info`` lives."""
    return fs.join(labels_root, info.labelset_id)


def write_labelset_info(labelset_uri: str, info: LabelSetInfo) -> None:
    fs.write_json(fs.join(labelset_uri, INFO_NAME), info.to_dict())


def read_labelset_info(labelset_uri: str) -> LabelSetInfo:
    uri = fs.join(labelset_uri, INFO_NAME)
    try:
        info = LabelSetInfo.from_dict(fs.read_json(uri))
    except FileNotFoundError as exc:
        raise SgaError(f"{uri} is missing: {labelset_uri} is not a label set; point at LABELS/<labelset_id> "
                       "written by `sga label`") from exc
    except (ValueError, AttributeError) as exc:
        raise SgaError(f"{uri} is not a valid label set description ({exc}); "
                       "relabel with `sga label`") from exc
    _check_schema(info.schema_version, uri)
    return info


def _check_schema(version: int, uri: str) -> None:
    if version > SCHEMA_VERSION:
        raise SgaError(f"{uri} has label schema_version {version}, newer than this sga reads "
                       f"({SCHEMA_VERSION}); upgrade sga")


def alignment_matrix(phrases: list[PhraseLabel], region_boxes: np.ndarray, score_threshold: float,
                     iou_threshold: float) -> np.ndarray:
    """bool ``[P, R]``: region r is positive for phrase p iff some box of p with score >= score_threshold
    has IoU >= iou_threshold with region r. ``region_boxes`` is ``[R, 4]`` pixel xyxy."""
    region_boxes = np.asarray(region_boxes, dtype=np.float32).reshape(-1, 4)
    out = np.zeros((len(phrases), region_boxes.shape[0]), dtype=bool)
    if not phrases or not region_boxes.shape[0]:
        return out
    boxes = np.concatenate([np.asarray(p.boxes, np.float32).reshape(-1, 4) for p in phrases])
    scores = np.concatenate([np.asarray(p.scores, np.float32).reshape(-1) for p in phrases])
    owner = np.repeat(np.arange(len(phrases)), [len(p.scores) for p in phrases])
    keep = scores >= score_threshold
    hits = box_iou(boxes[keep], region_boxes) >= iou_threshold      # [K_kept, R]
    np.logical_or.at(out, owner[keep], hits)
    return out


def _check_record(rec: LabelRecord) -> str | None:
    """Why ``rec`` breaks the format, or ``None``."""
    for name in ("image_w", "image_h"):
        value = getattr(rec, name)
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
            return f"{name} must be a positive integer, got {value!r}"
    if isinstance(rec.num_regions, bool) or not isinstance(rec.num_regions, int | np.integer) \
            or rec.num_regions < 0:
        return f"num_regions must be a non-negative integer, got {rec.num_regions!r}"
    if not isinstance(rec.caption, str):
        return "caption must be a string"
    for i, p in enumerate(rec.phrases):
        if not (isinstance(p.start, int | np.integer) and isinstance(p.end, int | np.integer)
                and 0 <= p.start < p.end <= len(rec.caption)):
            return f"phrase {i} span [{p.start}, {p.end}) is outside the caption ({len(rec.caption)} chars)"
        boxes, scores = np.asarray(p.boxes), np.asarray(p.scores)
        if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != (boxes.shape[0],):
            return f"phrase {i} has boxes {boxes.shape} and scores {scores.shape}, expected [K, 4] and [K]"
        if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            return f"phrase {i} has non-finite boxes or scores"
    align = rec.align
    if not isinstance(align, np.ndarray) or align.dtype != bool \
            or align.shape != (len(rec.phrases), rec.num_regions):
        return (f"align must be bool [{len(rec.phrases)}, {rec.num_regions}], got "
                f"{getattr(align, 'dtype', type(align))} {getattr(align, 'shape', '')}")
    return None


def _rounded(arrays: list[np.ndarray], decimals: int) -> list[float]:
    """The arrays' values, flattened in order, as float64 rounded to ``decimals`` (Python floats)."""
    if not arrays:
        return []
    flat = np.concatenate([np.asarray(a, np.float64).reshape(-1) for a in arrays])
    return np.round(flat, decimals).tolist()


def encode_labels(rec: LabelRecord) -> dict[str, bytes]:
    """LabelRecord -> ``{"labels.json": bytes}``: compact JSON, boxes rounded to 0.1 px, scores to 1e-4,
    ``align`` bit-packed (row-major ``np.packbits``) and base64-encoded. A phrase's ``text`` is stored only
    when it differs from ``caption[start:end]``. Raises :class:`SampleError` (stage ``write_labels``)."""
    reason = _check_record(rec)
    if reason:
        raise SampleError(rec.key, WRITE_STAGE, reason)
    # Every phrase's numbers rounded in one numpy call per kind, then cut back into lists per phrase: per
    # phrase calls cost more than the rounding.
    counts = [len(p.scores) for p in rec.phrases]
    boxes = _rounded([p.boxes for p in rec.phrases], BOX_DECIMALS)
    scores = _rounded([p.scores for p in rec.phrases], SCORE_DECIMALS)
    phrases, offset = [], 0
    for p, count in zip(rec.phrases, counts):
        entry: dict[str, Any] = {"span": [int(p.start), int(p.end)],
                                 "boxes": boxes[4 * offset: 4 * (offset + count)],
                                 "scores": scores[offset: offset + count]}
        if p.text != rec.caption[p.start:p.end]:
            entry["text"] = p.text
        phrases.append(entry)
        offset += count
    body = {"caption": rec.caption, "image_w": int(rec.image_w), "image_h": int(rec.image_h),
            "num_regions": int(rec.num_regions), "phrases": phrases,
            "align": base64.b64encode(np.packbits(rec.align.reshape(-1))).decode("ascii")}
    return {MEMBER: json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()}


def decode_labels(sample: TarSample) -> LabelRecord:
    """Tar sample -> LabelRecord; raises :class:`SampleError` (stage ``read_labels``) on bad content."""
    key = sample.key
    if sample.problems:
        raise SampleError(key, READ_STAGE, "; ".join(sample.problems))
    if MEMBER not in sample.members:
        raise SampleError(key, READ_STAGE, f"missing member {key}.{MEMBER}")
    try:
        body = json.loads(sample.members[MEMBER])
        caption = body["caption"]
        phrases = []
        for entry in body["phrases"]:
            start, end = entry["span"]
            boxes = np.asarray(entry["boxes"], dtype=np.float32).reshape(-1, 4)
            scores = np.asarray(entry["scores"], dtype=np.float32).reshape(-1)
            text = entry.get("text", caption[start:end] if isinstance(caption, str) else "")
            phrases.append(PhraseLabel(text, start, end, boxes, scores))
        num_regions = body["num_regions"]
        size = len(phrases) * num_regions
        bits = np.frombuffer(base64.b64decode(body["align"], validate=True), dtype=np.uint8)
        if bits.size != (size + 7) // 8:
            raise ValueError(f"align has {bits.size} bytes, expected {(size + 7) // 8}")
        align = np.unpackbits(bits, count=size).astype(bool).reshape(len(phrases), num_regions)
        rec = LabelRecord(key, caption, body["image_w"], body["image_h"], num_regions, phrases, align)
    except (ValueError, TypeError, KeyError, UnicodeDecodeError, AttributeError) as exc:
        raise SampleError(key, READ_STAGE, f"{key}.{MEMBER} is malformed: {exc!r}") from exc
    reason = _check_record(rec)
    if reason:
        raise SampleError(key, READ_STAGE, reason)
    return rec


def label_shard_uri(labelset_uri: str, shard: str) -> str:
    """The label tar of ``shard``: ``NNNNN.tar.gz``, or a legacy uncompressed ``NNNNN.tar`` when only that
    exists."""
    uri = fs.join(labelset_uri, shard + SHARD_SUFFIX)
    legacy = fs.join(labelset_uri, shard + LEGACY_SUFFIX)
    return legacy if not fs.exists(uri) and fs.exists(legacy) else uri


def list_label_shards(labelset_uri: str) -> list[str]:
    """Sorted names (``NNNNN``) of the label tars in a label set folder."""
    names = set()
    for name in fs.list_dir(labelset_uri):   # one listing (a request per call on object stores)
        for suffix in (SHARD_SUFFIX, LEGACY_SUFFIX):
            if name.endswith(suffix):
                names.add(name[: -len(suffix)])
                break
    return sorted(names)


def _pax_headers(info: LabelSetInfo) -> dict[str, str]:
    return {PAX_ID: info.labelset_id, PAX_INFO: json.dumps(info.to_dict(), sort_keys=True)}


class LabelShardWriter:
    """Write ``LABELSET/NNNNN.tar.gz`` atomically with the set's provenance in its PAX global header.

    Use as a context manager; ``.write(rec)`` per labelled sample (rejected samples go only to the manifest).
    """

    def __init__(self, labelset_uri: str, shard: str, info: LabelSetInfo):
        self.uri = fs.join(labelset_uri, shard + SHARD_SUFFIX)
        self.info = info
        self._tar = TarShardWriter(self.uri, pax_headers=_pax_headers(info), gzip=True)

    @property
    def count(self) -> int:
        return self._tar.count

    def __enter__(self) -> LabelShardWriter:
        self._tar.__enter__()
        return self

    def write(self, rec: LabelRecord) -> None:
        self._tar.write(rec.key, encode_labels(rec))

    def __exit__(self, exc_type, exc, tb) -> bool:
        return self._tar.__exit__(exc_type, exc, tb)


def info_from_pax(headers: dict[str, str], uri: str) -> LabelSetInfo:
    """The :class:`LabelSetInfo` a label tar's PAX global header carries (see :func:`read_pax_headers`)."""
    if PAX_INFO not in headers:
        raise SgaError(f"{uri} has no label set header; it was not written by LabelShardWriter")
    try:
        info = LabelSetInfo.from_dict(json.loads(headers[PAX_INFO]))
    except ValueError as exc:
        raise SgaError(f"{uri}: bad label set header ({exc}); relabel this shard") from exc
    _check_schema(info.schema_version, uri)
    return info


def iter_label_shard(labelset_uri: str, shard: str,
                     on_error: Callable[[SampleError], None] | None = None) -> Iterator[LabelRecord]:
    """Decoded records of the label tar of ``shard`` (:func:`label_shard_uri`) in tar order.

    Raises :class:`SgaError` if the shard was written by a newer schema. A bad sample raises
    :class:`SampleError`, or with ``on_error`` is passed to it and skipped; a damaged tar raises
    :class:`ShardReadError` after the complete samples before the damage.
    """
    reader = TarShardReader(label_shard_uri(labelset_uri, shard))
    checked = False
    for sample in reader:
        if not checked:
            info_from_pax(reader.pax_headers, reader.uri)
            checked = True
        try:
            rec = decode_labels(sample)
        except SampleError as err:
            if on_error is None:
                raise
            on_error(err)
            continue
        yield rec
