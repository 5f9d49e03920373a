"""``sga report``: label-quality plots of a label set (PNG) and a small ``index.html`` that shows them.

Plots: phrases per caption (from the manifest, every accepted sample), positives per phrase and teacher
scores (from the label shards, at most ``max_samples`` samples in shard order), and error reasons (from the
manifest). Reasons are grouped after replacing numbers with ``N`` so "feature dim 7 != 8" and "feature dim
9 != 8" count as one reason.
"""

from __future__ import annotations

import html
import io
import re
from collections import Counter
from typing import Any

import numpy as np

from shards import fs
from shards.labels import iter_label_shard, list_label_shards, read_labelset_info
from shards.manifest import read_manifest

from .labelsets import marker_totals, planned_shards, resolve_labelset

TOP_REASONS = 15


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _hist(values: list[float], title: str, xlabel: str, bins, vline: float | None = None) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.hist(values, bins=bins, color="tab:blue", edgecolor="white")
    if vline is not None:
        ax.axvline(vline, color="tab:red", linestyle="--", label=f"threshold {vline:g}")
        ax.legend()
    ax.set_title(f"{title} (n={len(values)})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    return _png(fig)


def _bars(counts: list[tuple[str, int]], title: str) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.35 * max(len(counts), 1) + 1.2), dpi=100)
    labels = [label[:70] for label, _ in counts]
    ax.barh(range(len(counts)), [n for _, n in counts], color="tab:red")
    ax.set_yticks(range(len(counts)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title)
    ax.set_xlabel("samples")
    return _png(fig)


NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def reason_group(stage: str | None, reason: str | None) -> str:
    return f"{stage}: {NUMBER.sub('N', reason or '')}"


def collect(uri: str, max_samples: int) -> dict[str, Any]:
    """The numbers behind the plots: manifest columns, and per-phrase values from up to ``max_samples``."""
    rows = read_manifest(uri).to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    errors = [r for r in rows if r["status"] == "error"]
    positives, top_scores, all_scores, read = [], [], [], 0
    written = set(list_label_shards(uri))
    for shard in planned_shards(uri):
        if read >= max_samples or shard not in written:
            continue
        for rec in iter_label_shard(uri, shard):
            positives.extend(rec.align.sum(axis=1).tolist())
            for phrase in rec.phrases:
                all_scores.extend(phrase.scores.tolist())
                top_scores.append(float(phrase.scores[0]) if len(phrase.scores) else 0.0)
            read += 1
            if read >= max_samples:
                break
    reasons = Counter(reason_group(r["stage"], r["reason"]) for r in errors)
    examples: dict[str, str] = {}
    for r in errors:
        examples.setdefault(reason_group(r["stage"], r["reason"]), r["key"])
    return {"phrases_per_caption": [r["n_phrases"] for r in ok], "positives_per_phrase": positives,
            "top_scores": top_scores, "all_scores": all_scores, "reasons": reasons.most_common(),
            "examples": examples, "samples_read": read, "rows": len(rows), "errors": len(errors)}


def _page(info, totals: dict, data: dict, plots: list[tuple[str, str]]) -> str:
    esc = html.escape
    facts = [("label set", info.labelset_id),
             ("teacher", f"{info.teacher_name} ({info.teacher_fingerprint})"),
             ("extractor", info.extractor), ("created", info.created_at),
             ("thresholds", f"score >= {info.score_threshold:g} (floor {info.score_floor:g}), "
                            f"IoU >= {info.iou_threshold:g}, top {info.top_k}"),
             ("shards done", totals["shards_done"]), ("samples", totals["samples"]),
             ("labelled", totals["ok"]), ("errors", totals["errors"]), ("phrases", totals["phrases"]),
             ("positives", totals["positives"])]
    for name in ("precision", "recall"):
        if totals.get(name) is not None:
            facts.append((f"{name} vs ground truth", f"{totals[name]:.3f}"))
    facts_html = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in facts)
    reasons_html = "".join(
        f"<tr><td>{n}</td><td>{esc(reason)}</td><td>{esc(data['examples'][reason])}</td></tr>"
        for reason, n in data["reasons"])
    images = "".join(f'<figure><img src="{name}" alt="{esc(alt)}"></figure>' for name, alt in plots)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>sga label report {esc(info.labelset_id)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:.25em .6em;text-align:left}}
figure{{display:inline-block;margin:.5em}}</style>
</head><body><h1>Label set {esc(info.labelset_id)}</h1>
<table>{facts_html}</table>
<h2>Plots</h2><p>Per-phrase plots read {data['samples_read']} labelled samples.</p>{images}
<h2>Error reasons</h2><table><tr><th>samples</th><th>stage: reason</th><th>example key</th></tr>
{reasons_html}</table></body></html>
"""


def write_report(labels: str, out: str, labelset_id: str | None = None,
                 max_samples: int = 50_000) -> dict[str, Any]:
    """Write the PNGs and ``index.html`` under ``out``; returns the paths and headline numbers."""
    import matplotlib

    matplotlib.use("Agg")
    uri = resolve_labelset(labels, labelset_id)
    info = read_labelset_info(uri)
    totals = marker_totals(uri, planned_shards(uri))
    data = collect(uri, max_samples)
    max_p = max(data["phrases_per_caption"], default=0)
    max_r = max(data["positives_per_phrase"], default=0)
    plots = {
        "phrases_per_caption.png": _hist(data["phrases_per_caption"], "Phrases per caption", "phrases",
                                         np.arange(max_p + 2) - 0.5),
        "positives_per_phrase.png": _hist(data["positives_per_phrase"], "Matched regions per phrase",
                                          "regions", np.arange(max_r + 2) - 0.5),
        "teacher_top_score.png": _hist(data["top_scores"], "Best teacher score per phrase", "score",
                                       np.linspace(0, 1, 41), vline=info.score_threshold),
        "teacher_scores.png": _hist(data["all_scores"], "All stored teacher scores", "score",
                                    np.linspace(0, 1, 41), vline=info.score_threshold),
        "errors.png": _bars(data["reasons"][:TOP_REASONS], f"Error reasons ({data['errors']} samples)"),
    }
    fs.makedirs(out)
    for name, png in plots.items():
        fs.write_bytes(fs.join(out, name), png)
    page = _page(info, totals, data, [(name, name[:-4].replace("_", " ")) for name in plots])
    fs.write_bytes(fs.join(out, "index.html"), page.encode())
    return {"out": fs.join(out, "index.html"), "labelset_id": info.labelset_id, "samples": data["rows"],
            "errors": data["errors"], "phrases_read": len(data["top_scores"]),
            "plots": sorted(plots), "error_reasons": len(data["reasons"])}
