"""``sga inspect``: draw one labelled sample (image, regions, teacher boxes, phrases, matches) to a PNG.

Every phrase gets a colour. Its teacher boxes are dashed in that colour (the best one thicker; boxes below
the label set's score threshold, which do not count for the matrix, dotted and faint), and the regions the
alignment matrix matches to it are drawn solid and filled. Unmatched regions are thin grey.
"""

from __future__ import annotations

import io
import textwrap
from typing import Any

import numpy as np

from shards import fs
from shards.errors import SgaError
from shards.images import iter_image_shard
from shards.labels import read_labelset_info
from shards.regions import decode_regions
from shards.tario import iter_tar

from .labelsets import find_record, read_job, resolve_labelset
from .validate import ValidationConfig, check_image


def load_image(images: str, shard: str, key: str) -> np.ndarray:
    for sample in iter_image_shard(images, shard):
        if sample.key == key:
            return check_image(key, sample.status, sample.jpg, sample.error_message, ValidationConfig())
    raise SgaError(f"key {key!r} is not in {fs.join(images, shard + '.tar')}; pass the right --images")


def load_region_boxes(regions: str, shard: str, key: str) -> np.ndarray:
    for sample in iter_tar(fs.join(regions, f"{shard}.tar")):
        if sample.key == key:
            return decode_regions(sample).boxes
    raise SgaError(f"key {key!r} is not in {fs.join(regions, shard + '.tar')}; pass the right --regions")


def _rect(ax, box, **kwargs):
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = (float(v) for v in box)
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, **kwargs))


def draw(image: np.ndarray, region_boxes: np.ndarray, rec, score_threshold: float, title: str) -> bytes:
    """PNG bytes of the drawing described in the module doc. ``rec`` is a ``LabelRecord``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab10").colors
    h, w = image.shape[:2]
    fig, ax = plt.subplots(figsize=(8, 8 * h / max(w, 1) + 1.2), dpi=100)
    ax.imshow(image)
    matched = rec.align.any(axis=0) if rec.align.size else np.zeros(len(region_boxes), bool)
    for r, box in enumerate(region_boxes):
        if not matched[r]:
            _rect(ax, box, fill=False, edgecolor="0.6", linewidth=0.6)
    handles = []
    for p, phrase in enumerate(rec.phrases):
        colour = colours[p % len(colours)]
        for r in np.flatnonzero(rec.align[p]):
            _rect(ax, region_boxes[r], fill=True, facecolor=(*colour, 0.18), edgecolor=colour, linewidth=2.5)
        for k, (box, score) in enumerate(zip(phrase.boxes, phrase.scores)):
            counts = score >= score_threshold
            _rect(ax, box, fill=False, edgecolor=colour, linestyle="--" if counts else ":",
                  linewidth=(2.0 if k == 0 else 1.0) if counts else 0.8, alpha=1.0 if counts else 0.5)
        best = f"{phrase.scores[0]:.2f}" if len(phrase.scores) else "-"
        handles.append(plt.Line2D([], [], color=colour, linewidth=3,
                                  label=f"{phrase.text!r}  best {best}, {int(rec.align[p].sum())} regions"))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.axis("off")
    ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=9)
    if handles:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.01), fontsize=8, frameon=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def inspect_sample(labels: str, key: str, out: str, labelset_id: str | None = None, images: str | None = None,
                   regions: str | None = None) -> dict[str, Any]:
    """Write the PNG of ``key`` to ``out``; inputs default to those recorded in the label set's job.json."""
    uri = resolve_labelset(labels, labelset_id)
    info = read_labelset_info(uri)
    shard, rec = find_record(uri, key)
    job = read_job(uri) or {}
    images, regions = images or job.get("images"), regions or job.get("regions")
    if not images or not regions:
        raise SgaError(f"{uri} does not record its inputs; pass --images and --regions")
    image = load_image(images, shard, key)
    region_boxes = load_region_boxes(regions, shard, key)
    thresholds = f"score >= {info.score_threshold:g}, IoU >= {info.iou_threshold:g}"
    title = f"{key} ({info.teacher_name}, {thresholds}): {rec.caption}"
    fs.write_bytes(out, draw(image, region_boxes, rec, info.score_threshold, title))
    return {"out": out, "key": key, "shard": shard, "labelset_id": info.labelset_id,
            "phrases": [p.text for p in rec.phrases], "regions": int(rec.num_regions),
            "positives": int(rec.align.sum())}
