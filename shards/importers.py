"""Import pre-extracted detector regions into region shards that mirror a set of image shards.

Sources (``shards/FORMAT.md`` documents the rules):

- ``butd-tsv``: bottom-up-attention TSV rows ``image_id, image_w, image_h, num_boxes, boxes, features``
  (base64 float32), or LXMERT's ``img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf,
  num_boxes, boxes, features``; a header row, or ``fields``, names other layouts. ``src`` is a file or a
  directory of ``*.tsv`` files (one per extraction GPU). TSV rows come in any order, so decoded records are
  staged in a local temporary directory and then written shard by shard in image order.
- ``npz``: ``SRC/NAME.npz`` per image with ``boxes`` [R, 4], ``features`` [R, D], optional ``cls_prob`` [R, C]
  and optional ``image_w``/``image_h`` scalars, loaded with ``allow_pickle=False``.

A source entry matches an image sample when its id equals the sample key, else when it equals the base name
without extension of the sample's ``url`` and no other sample of the set has that base name. Boxes are
rescaled to the shard image's size (``width``/``height`` in its metadata) when the source image had the same
aspect ratio at another size, and rejected when the aspect ratio differs (a cropped or padded image).

For every image shard one region shard of the same name is written with the successful image samples that
have regions, in image order, plus ``NNNNN_missing.json`` listing the samples without regions (``missing``)
and those whose regions were unusable (``rejected``, with reasons). ``regions.json`` is written last.

A damaged image shard does not stop the import: every sample read before the damage is imported and the
damage (shard, last whole key, reason with the byte offset) goes to ``damage`` in its ``NNNNN_missing.json``
and the summary. Errors are rejected samples plus damaged shards; when errors / inputs exceeds
``max_error_rate``, or a shard yielded no sample at all, the import raises :class:`JobFailed` after writing.
A source none of whose ids match the first image shard with successes is refused before anything is written.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import posixpath
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import fs
from .errors import JobFailed, SampleError, SgaError, ShardReadError
from .images import SUCCESS, list_shards, read_image_rows, shard_uris
from .progress import progress
from .regions import RegionRecord, RegionShardWriter, decode_regions, encode_regions, write_regions_info
from .tario import KEY_RE, TarSample, iter_tar

FORMATS = ("butd-tsv", "npz")
BUTD_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
LXMERT_FIELDS = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
                 "num_boxes", "boxes", "features")
_ALIASES = {"img_id": "image_id", "img_w": "image_w", "img_h": "image_h", "bbox": "boxes",
            "image_width": "image_w", "image_height": "image_h"}
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_ASPECT_TOLERANCE = 0.01
_EXAMPLES = 10
_TOP_REASONS = 5
DEFAULT_MAX_ERROR_RATE = 0.1


@dataclass
class ImportConfig:
    """``sga regions import`` settings: ``fmt`` is one of :data:`FORMATS`; ``fields`` names the TSV
    columns of a headerless file in another layout; ``tmp_dir`` holds the TSV staging area;
    ``max_error_rate`` is the largest errors / inputs fraction of a successful import."""

    fmt: str
    src: str
    images: str
    out: str
    fields: tuple[str, ...] | None = None
    tmp_dir: str | None = None
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE


@dataclass
class _Target:
    key: str
    shard: str
    url_stem: str | None
    width: int | None
    height: int | None


def _image_targets(images_uri: str) -> tuple[dict[str, list[_Target]], dict[str, dict[str, Any]]]:
    """Shard name -> its successful image samples in order (from the parquet, else the tar's KEY.json),
    and shard name -> its damage (``shard``, ``samples_read``, ``after_key``, ``reason``) for shards that
    could not be read to their end; the samples before the damage are kept."""
    shards = list_shards(images_uri)
    if not shards:
        raise SgaError(f"no image shards (*.tar) under {images_uri}; point --images at img2dataset output")
    targets: dict[str, list[_Target]] = {}
    damage: dict[str, dict[str, Any]] = {}
    for shard in progress(shards, desc="index images", unit="shard"):
        rows: list[dict[str, Any]] = []
        problems: list[str] = []
        try:
            rows = read_image_rows(images_uri, shard) or []
        except ShardReadError as exc:
            problems.append(str(exc))  # a broken parquet: the tar's KEY.json files still give the samples
        if not rows:
            try:
                _read_tar_rows(shard_uris(images_uri, shard)["tar"], rows)
            except ShardReadError as exc:
                problems.append(str(exc))
        if problems:
            last = str(rows[-1]["key"]) if rows else None
            damage[shard] = {"shard": shard, "samples_read": len(rows), "after_key": last,
                             "reason": "; ".join(problems)}
        targets[shard] = [
            _Target(str(r["key"]), shard, _url_stem(r.get("url")), _positive_int(r.get("width")),
                    _positive_int(r.get("height")))
            for r in rows if r.get("status") == SUCCESS]
    return targets, damage


def _read_tar_rows(tar_uri: str, rows: list[dict[str, Any]]) -> None:
    """Append one metadata row per tar sample (its KEY.json, with ``key``) to ``rows`` as it is read, so
    the rows before a :class:`ShardReadError` survive it."""
    for sample in iter_tar(tar_uri):
        try:
            meta = json.loads(sample.members["json"]) if "json" in sample.members else {}
        except (ValueError, UnicodeDecodeError):
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
        rows.append({**meta, "key": sample.key, "status": meta.get("status") or SUCCESS})


def _url_stem(url: Any) -> str | None:
    if not isinstance(url, str) or not url:
        return None
    name = posixpath.basename(url.split("?", 1)[0].split("#", 1)[0])
    return name.rsplit(".", 1)[0] if "." in name else name or None


def _positive_int(value: Any) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 and number == value else None


class _Matcher:
    """Source id -> image key: the key itself, else a unique url base name (see the module docstring)."""

    def __init__(self, targets: dict[str, list[_Target]]):
        self.by_key = {t.key: t for ts in targets.values() for t in ts}
        stems: dict[str, list[_Target]] = {}
        for t in self.by_key.values():
            if t.url_stem:
                stems.setdefault(t.url_stem, []).append(t)
        self.by_stem = {s: ts[0] for s, ts in stems.items() if len(ts) == 1}

    def __call__(self, source_id: str) -> _Target | None:
        return self.by_key.get(source_id) or self.by_stem.get(source_id)


def _record(target: _Target, boxes: np.ndarray, features: np.ndarray, cls_prob: np.ndarray | None,
            source_w: int | None, source_h: int | None, source_id: str) -> RegionRecord:
    """Build a RegionRecord in the shard image's pixel grid; raises SampleError on unusable input."""
    def fail(reason: str) -> SampleError:
        return SampleError(target.key, "import_regions", reason)

    if not KEY_RE.match(target.key):
        raise fail("the image key is not a valid shard key")
    if boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.shape[0] == 0:
        raise fail(f"boxes have shape {boxes.shape}, expected [R, 4] with R >= 1")
    if features.ndim != 2 or features.shape[0] != boxes.shape[0]:
        raise fail(f"features have shape {features.shape} for {boxes.shape[0]} boxes")
    if np.abs(features).max(initial=0) > _FLOAT16_MAX:
        raise fail("features exceed the float16 range")
    width, height = target.width or source_w, target.height or source_h
    if not width or not height:
        raise fail("image size unknown: neither the image metadata nor the source gives it")
    boxes = boxes.astype(np.float32)
    meta: dict[str, Any] = {"source_id": source_id}
    if source_w and source_h and (source_w, source_h) != (width, height):
        if abs(source_w / source_h - width / height) > _ASPECT_TOLERANCE * (width / height):
            raise fail(f"regions are for a {source_w}x{source_h} image but the shard image is "
                       f"{width}x{height}, another aspect ratio (cropped or padded); extract regions "
                       "from the shard images")
        boxes = boxes * np.asarray([width / source_w, height / source_h] * 2, dtype=np.float32)
        meta["source_size"] = [source_w, source_h]
    rec = RegionRecord(target.key, boxes, features.astype(np.float16),
                       None if cls_prob is None else cls_prob.astype(np.float16), width, height, meta)
    encode_regions(rec)  # validates dtypes, shapes and values; the caller writes it
    return rec


def _b64_array(text: str, dtype: type) -> np.ndarray:
    # Python 3 ports of generate_tsv.py wrote str(bytes): "b'...'".
    if len(text) > 2 and text[0] == "b" and text[1] in "'\"" and text[-1] == text[1]:
        text = text[2:-1]
    return np.frombuffer(base64.b64decode(text), dtype=dtype)


def _tsv_rows(src: str, fields: tuple[str, ...] | None) -> Iterator[dict[str, str]]:
    """Rows of one TSV file (or every ``*.tsv`` of a directory) as dicts keyed by canonical field names."""
    files = [fs.join(src, n) for n in fs.list_dir(src, ".tsv")] if fs.is_dir(src) else [src]
    if not files:
        raise SgaError(f"no *.tsv files under {src}; pass a bottom-up-attention TSV file or its directory")
    # Feature fields are megabytes of base64; csv's default 128 KiB limit rejects them.
    csv.field_size_limit(2**31 - 1)
    for uri in files:
        with fs.open_input(uri) as stream, io.TextIOWrapper(stream, encoding="utf-8", newline="") as text:
            reader = csv.reader(text, delimiter="\t")
            names = fields
            for row in reader:
                if names is None:
                    if "boxes" in row and "features" in row:
                        names = tuple(row)
                        continue
                    names = {len(BUTD_FIELDS): BUTD_FIELDS, len(LXMERT_FIELDS): LXMERT_FIELDS}.get(len(row))
                    if names is None:
                        raise SgaError(f"{uri}: rows have {len(row)} tab-separated fields; expected 6 "
                                       "(bottom-up-attention) or 10 (LXMERT); name them with --fields")
                canonical = [_ALIASES.get(n, n) for n in names]
                if not {"image_id", "num_boxes", "boxes", "features"} <= set(canonical):
                    raise SgaError(f"{uri}: fields {list(names)} lack image_id, num_boxes, boxes or features")
                yield dict(zip(canonical, row)) if len(row) == len(canonical) else {"_bad": str(len(row))}


def _tsv_record(target: _Target, row: dict[str, str]) -> RegionRecord:
    try:
        num = int(row["num_boxes"])
        boxes = _b64_array(row["boxes"], np.float32).reshape(num, 4)
        flat = _b64_array(row["features"], np.float32)
        features = flat.reshape(num, -1) if num and flat.size % num == 0 else flat.reshape(1, -1)
        size = _positive_int(float(row["image_w"])), _positive_int(float(row["image_h"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise SampleError(target.key, "import_regions", f"unreadable TSV row: {exc}") from exc
    return _record(target, boxes, features, None, *size, source_id=row["image_id"])


def _npz_record(target: _Target, uri: str, source_id: str) -> RegionRecord:
    try:
        with np.load(io.BytesIO(fs.read_bytes(uri)), allow_pickle=False) as npz:
            arrays = {_ALIASES.get(k, k): npz[k] for k in npz.files}
        boxes, features = np.asarray(arrays["boxes"]), np.asarray(arrays["features"])
        cls_prob = arrays.get("cls_prob")
        size = [_positive_int(arrays[k].item()) if k in arrays else None for k in ("image_w", "image_h")]
    except (ValueError, KeyError, OSError, EOFError) as exc:
        raise SampleError(target.key, "import_regions", f"unreadable {uri}: {exc!r}") from exc
    return _record(target, boxes, features, cls_prob, *size, source_id=source_id)


class _Collector:
    """Per-key outcome of the source scan, plus the set-wide widths D and C every record must share."""

    def __init__(self):
        self.rejected: dict[str, str] = {}
        self.feature_dim: int | None = None
        self.num_classes = 0
        self.unmatched: list[str] = []
        self.num_unmatched = 0
        self.duplicates = 0
        self.bad_rows = 0

    def accept(self, rec: RegionRecord) -> bool:
        """Check ``rec``'s widths against the set's; a mismatch is recorded as a rejection."""
        dim = rec.features.shape[1]
        classes = 0 if rec.cls_prob is None else rec.cls_prob.shape[1]
        self.feature_dim = self.feature_dim or dim
        self.num_classes = self.num_classes or classes
        if dim != self.feature_dim or classes not in (0, self.num_classes):
            self.rejected[rec.key] = (f"feature width {dim} / {classes} classes differ from the set's "
                                      f"{self.feature_dim} / {self.num_classes}")
            return False
        return True

    def unmatch(self, source_id: str) -> None:
        self.num_unmatched += 1
        if len(self.unmatched) < _EXAMPLES:
            self.unmatched.append(source_id)


def _stage_tsv(config: ImportConfig, matcher: _Matcher, staging: Path, found: _Collector) -> set[str]:
    """Decode every TSV row and stage its region members as ``staging/KEY.EXT`` files; returns the keys
    staged."""
    staged: set[str] = set()
    for row in progress(_tsv_rows(config.src, config.fields), desc="read TSV", unit="row"):
        if "_bad" in row:
            found.bad_rows += 1
            continue
        target = matcher(row["image_id"])
        if target is None:
            found.unmatch(row["image_id"])
            continue
        if target.key in staged or target.key in found.rejected:
            found.duplicates += 1
            continue
        try:
            rec = _tsv_record(target, row)
        except SampleError as err:
            found.rejected[target.key] = err.reason
            continue
        if found.accept(rec):
            for ext, data in encode_regions(rec).items():
                (staging / f"{rec.key}.{ext}").write_bytes(data)
            staged.add(rec.key)
    return staged


def _staged_record(staging: Path, key: str) -> RegionRecord | None:
    paths = {p.name[len(key) + 1:]: p for p in staging.glob(f"{key}.*")}
    if not paths:
        return None
    return decode_regions(TarSample(key, {ext: p.read_bytes() for ext, p in paths.items()}))


def _check_overlap(config: ImportConfig, targets: dict[str, list[_Target]], matched: set[str],
                   damage: dict[str, dict[str, Any]], unmatched: list[str]) -> None:
    """Refuse a source that matches no sample of the first image shard with successes (another dataset,
    another key scheme) before anything is written."""
    first = next((shard for shard, ts in targets.items() if ts), None)
    if first is None:
        if damage:
            return  # every shard is damaged: the import runs, records the damage and fails
        raise SgaError(f"no image shard under {config.images} has a successful sample; point --images at "
                       "img2dataset output with downloaded images")
    if not any(t.key in matched for t in targets[first]):
        raise SgaError(f"no region id in --src {config.src} matches an image of shard {first} in --images "
                       f"{config.images} (source ids such as {unmatched[:3]}, image keys such as "
                       f"{[t.key for t in targets[first][:3]]}); ids must equal sample keys or url base "
                       "names: check that --src and --images describe the same images")


def _outcome(config: ImportConfig, summary: dict[str, Any], reasons: Counter) -> None:
    """Raise :class:`JobFailed` when a shard yielded no sample, the error rate exceeds the limit or nothing
    was imported; adds ``errors``, ``error_rate`` and ``top_reasons`` to ``summary``."""
    failed = summary["failed_shards"]
    inputs = summary["images"] + len(failed)
    summary["errors"] = summary["rejected"] + summary["damaged_shards"]
    summary["error_rate"] = summary["errors"] / max(inputs, 1)
    summary["max_error_rate"] = config.max_error_rate
    summary["top_reasons"] = [{"reason": r, "count": n} for r, n in reasons.most_common(_TOP_REASONS)]
    top = "; ".join(f"{n} x {r}" for r, n in reasons.most_common(_TOP_REASONS))
    if failed:
        raise JobFailed(f"image shard(s) {failed[:_EXAMPLES]} of {config.images} yielded no sample; "
                        f"repair or re-download them and rerun. Top reasons: {top}", summary)
    if summary["error_rate"] > config.max_error_rate:
        raise JobFailed(f"{summary['errors']} errors in {inputs} inputs (rate {summary['error_rate']:.3g} > "
                        f"--max-error-rate {config.max_error_rate}); NNNNN_missing.json under {config.out} "
                        f"lists them. Top reasons: {top}", summary)
    if not summary["written"]:
        raise JobFailed(f"no sample of {config.images} was imported from {config.src}", summary)


def import_regions(config: ImportConfig) -> dict[str, Any]:
    """Run an import; returns the summary printed by ``sga regions import``.

    Raises :class:`SgaError` (nothing written) on unusable arguments or a source that matches no image of
    the first shard, and :class:`JobFailed` (with the summary) when the import ran but failed; see the
    module docstring.
    """
    if config.fmt not in FORMATS:
        raise SgaError(f"unknown region format {config.fmt!r}; use one of {', '.join(FORMATS)}")
    if not 0 <= config.max_error_rate <= 1:
        raise SgaError(f"--max-error-rate {config.max_error_rate} is not a fraction; pass a value in [0, 1]")
    if not fs.exists(config.src):
        raise SgaError(f"region source {config.src} does not exist")
    targets, damage = _image_targets(config.images)
    matcher = _Matcher(targets)
    found = _Collector()
    npz_names: dict[str, str] = {}
    reasons: Counter = Counter(d["reason"] for d in damage.values())
    with tempfile.TemporaryDirectory(prefix="sga-regions-", dir=config.tmp_dir) as tmp:
        staging = Path(tmp)
        if config.fmt == "butd-tsv":
            matched = _stage_tsv(config, matcher, staging, found) | set(found.rejected)
        else:
            for name in fs.list_dir(config.src, ".npz"):
                target = matcher(name[: -len(".npz")])
                if target is None:
                    found.unmatch(name)
                elif target.key in npz_names:
                    found.duplicates += 1
                else:
                    npz_names[target.key] = name
            matched = set(npz_names)
        _check_overlap(config, targets, matched, damage, found.unmatched)
        totals = {"written": 0, "missing": 0, "rejected": 0}
        missing_examples: list[str] = []
        for shard, shard_targets in progress(targets.items(), desc="write regions", unit="shard"):
            missing, rejected = [], []
            with RegionShardWriter(config.out, shard) as writer:
                for target in shard_targets:
                    rec = None
                    try:
                        if config.fmt == "butd-tsv":
                            rec = _staged_record(staging, target.key)
                        elif target.key in npz_names:
                            name = npz_names[target.key]
                            rec = _npz_record(target, fs.join(config.src, name), name[: -len(".npz")])
                    except SampleError as err:
                        found.rejected[target.key] = err.reason
                    if rec is not None and found.accept(rec):
                        writer.write(rec)
                    elif target.key in found.rejected:
                        rejected.append({"key": target.key, "reason": found.rejected[target.key]})
                        reasons[found.rejected[target.key]] += 1
                    else:
                        missing.append(target.key)
            report = {"shard": shard, "expected": len(shard_targets), "written": writer.count,
                      "missing": missing, "rejected": rejected}
            if shard in damage:
                report["damage"] = damage[shard]
            fs.write_json(fs.join(config.out, f"{shard}_missing.json"), report)
            totals["written"] += writer.count
            totals["missing"] += len(missing)
            totals["rejected"] += len(rejected)
            missing_examples.extend(missing[: _EXAMPLES - len(missing_examples)])
    if totals["written"]:
        write_regions_info(config.out, found.feature_dim or 0, found.num_classes, None,
                           {"format": config.fmt, "src": config.src, "images": config.images})
    summary = {"out": config.out, "shards": len(targets), "images": sum(len(t) for t in targets.values()),
               **totals, "unmatched": found.num_unmatched, "duplicates": found.duplicates,
               "bad_rows": found.bad_rows, "feature_dim": found.feature_dim, "num_classes": found.num_classes,
               "missing_examples": missing_examples, "unmatched_examples": found.unmatched,
               "damaged_shards": len(damage), "damage": list(damage.values())[:_EXAMPLES],
               "failed_shards": [shard for shard, d in damage.items() if not d["samples_read"]]}
    _outcome(config, summary, reasons)
    return summary
