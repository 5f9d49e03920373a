"""A folder of label sets (``LABELS/<labelset_id>/``): find them, total their markers, describe them.

Beside the files of ``shards.labels``/``shards.manifest``, ``sga label`` writes ``LABELSET/job.json`` at the
start of every run: the input URIs (so ``sga inspect`` finds the images and regions) and the planned shard
names (so completeness is ``markers / planned``).
"""

from __future__ import annotations

from typing import Any

from shards import fs
from shards.errors import SgaError
from shards.labels import INFO_NAME, iter_label_shard, label_shard_uri, read_labelset_info
from shards.manifest import read_marker

from .phrases import CACHE_DIR

JOB_NAME = "job.json"
# Marker counts summed over shards (the rest of a marker is per-shard timing and identity).
SUMMED = ("samples", "ok", "errors", "phrases", "positives", "regions", "grounded", "teacher_errors",
          "tp", "fp", "fn", "label_bytes", "phrase_cache_hits", "phrase_cache_misses", "seconds",
          "prep_cpu_s", "teacher_wait_s")


def is_labelset(uri: str) -> bool:
    return fs.exists(fs.join(uri, INFO_NAME))


def list_labelsets(root: str) -> list[str]:
    """URIs of the label sets directly under ``root`` (``root`` itself if it is one)."""
    if is_labelset(root):
        return [root]
    subdirs = (fs.join(root, d) for d in fs.list_subdirs(root) if d != CACHE_DIR)
    return [uri for uri in subdirs if is_labelset(uri)]


def resolve_labelset(uri: str, labelset_id: str | None = None) -> str:
    """The label set ``uri`` names: itself, the one with ``labelset_id`` under it, or its only one."""
    if is_labelset(uri):
        return uri
    found = list_labelsets(uri)
    if labelset_id is not None:
        match = [u for u in found if fs.basename(u) == labelset_id]
        if not match:
            raise SgaError(f"{uri} has no label set {labelset_id!r}; `sga labels ls {uri}` lists them")
        return match[0]
    if len(found) == 1:
        return found[0]
    if not found:
        raise SgaError(f"{uri} holds no label set (no */{INFO_NAME}); label one with `sga label --out {uri}`")
    names = ", ".join(fs.basename(u) for u in found)
    raise SgaError(f"{uri} holds several label sets ({names}); pick one with --labelset ID")


def read_job(labelset_uri: str) -> dict[str, Any] | None:
    uri = fs.join(labelset_uri, JOB_NAME)
    try:
        job = fs.read_json(uri)
    except (FileNotFoundError, ValueError):
        return None
    return job if isinstance(job, dict) else None


def marker_totals(labelset_uri: str, shards: list[str]) -> dict[str, Any]:
    """Sums of :data:`SUMMED` over the finished shards among ``shards``, plus ``shards_done``,
    ``error_stages``, and ``precision``/``recall`` of the alignment matrix when ground truth was scored."""
    totals: dict[str, Any] = dict.fromkeys(SUMMED, 0)
    totals["shards_done"] = 0
    stages: dict[str, int] = {}
    scored = False
    for shard in shards:
        marker = read_marker(labelset_uri, shard)
        if marker is None:
            continue
        totals["shards_done"] += 1
        for name in SUMMED:
            totals[name] += marker.get(name, 0)
        for stage, n in marker.get("error_stages", {}).items():
            stages[stage] = stages.get(stage, 0) + n
        scored = scored or marker.get("scored", False)
    totals["error_stages"] = stages
    if scored:
        tp, fp, fn = totals["tp"], totals["fp"], totals["fn"]
        totals["precision"] = tp / (tp + fp) if tp + fp else None
        totals["recall"] = tp / (tp + fn) if tp + fn else None
    return totals


def top_errors(labelset_uri: str, n: int = 5) -> list[dict[str, Any]]:
    """The ``n`` commonest ``{"stage", "reason", "count"}`` among the manifest's error rows."""
    from collections import Counter

    from shards.manifest import ERROR, read_manifest

    table = read_manifest(labelset_uri)
    counts = Counter((r["stage"], r["reason"]) for r in
                     table.select(["status", "stage", "reason"]).to_pylist() if r["status"] == ERROR)
    return [{"stage": stage, "reason": reason, "count": count}
            for (stage, reason), count in counts.most_common(n)]


def outcome(totals: dict[str, Any], max_error_rate: float | None,
            shards_failed: int = 0) -> tuple[float, bool]:
    """``(error_rate, failed)``: failed when a shard was lost whole or errors/samples exceeds the limit."""
    rate = totals["errors"] / totals["samples"] if totals["samples"] else 0.0
    return rate, bool(shards_failed) or (max_error_rate is not None and rate > max_error_rate)


def planned_shards(labelset_uri: str) -> list[str]:
    """Shards of the last run's plan, else those that have a marker or manifest."""
    job = read_job(labelset_uri)
    if job and isinstance(job.get("shards"), list):
        return [str(s) for s in job["shards"]]
    names = fs.list_dir(labelset_uri, "_stats.json")
    return [n[: -len("_stats.json")] for n in names]


def describe(labelset_uri: str) -> dict[str, Any]:
    """One ``sga labels ls`` row: identity, teacher, date, thresholds, counts and completeness."""
    info = read_labelset_info(labelset_uri)
    shards = planned_shards(labelset_uri)
    totals = marker_totals(labelset_uri, shards)
    job = read_job(labelset_uri) or {}
    limit = (job.get("config") or {}).get("max_error_rate")
    failed_shards = len(job.get("shards_failed") or {})
    rate, failed = outcome(totals, limit, failed_shards)
    complete = bool(shards) and totals["shards_done"] == len(shards) and not failed
    return {
        "labelset_id": info.labelset_id, "uri": labelset_uri, "teacher": info.teacher_name,
        "teacher_fingerprint": info.teacher_fingerprint, "extractor": info.extractor,
        "created_at": info.created_at, "score_threshold": info.score_threshold,
        "iou_threshold": info.iou_threshold, "images": job.get("images"),
        "shards": len(shards), "shards_done": totals["shards_done"],
        "complete": complete, "failed": failed, "error_rate": rate, "max_error_rate": limit,
        "shards_failed": failed_shards,
        "status": "failed" if failed else "complete" if complete else "incomplete",
        **{k: totals[k] for k in ("samples", "ok", "errors", "phrases", "positives")},
    }


def find_record(labelset_uri: str, key: str):
    """``(shard, LabelRecord)`` of ``key``, found through the manifest; SgaError when it has no labels."""
    from shards.manifest import read_manifest

    table = read_manifest(labelset_uri)
    rows = [r for r in table.to_pylist() if r["key"] == key]
    if not rows:
        raise SgaError(f"key {key!r} is not in the manifest of {labelset_uri}; list keys with "
                       "`sga report` or read the NNNNN.parquet files")
    row = rows[0]
    if row["status"] != "ok":
        raise SgaError(f"key {key!r} was rejected at stage {row['stage']}: {row['reason']}")
    for rec in iter_label_shard(labelset_uri, row["shard"]):
        if rec.key == key:
            return row["shard"], rec
    raise SgaError(f"key {key!r} is missing from {label_shard_uri(labelset_uri, row['shard'])}; relabel "
                   "that shard")
