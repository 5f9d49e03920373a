"""Build a synthetic captioned world: image shards, region shards, hidden ground truth and downstream tasks.

Layout under ``out_uri`` (``shards/FORMAT.md`` describes the formats):

- ``images/NNNNN.{tar,parquet}`` + ``_stats.json``: img2dataset layout, failed rows only in the parquet;
- ``regions/NNNNN.tar`` + ``regions/regions.json``: the simulated detector's proposals, same shards and keys;
- ``gt/NNNNN.parquet``: hidden ground truth, one row per caption phrase (:data:`GT_SCHEMA`);
- ``tasks/images``, ``tasks/regions``, ``tasks/gt``: held-out images whose shard numbers continue after the
  corpus's, so their keys never collide with corpus keys; ``tasks/{refexp,vqa,vcr}/``: see :mod:`tasks`;
- ``world.json``: config, seed, counts, class names and versions (written last).

Every sample draws from its own generator seeded by ``(seed, stream, shard, index)``, so a shard's bytes
depend only on the config and the shard number (shards could be built in parallel, in any order).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import fs
from ..errors import SgaError
from ..images import ImageShardWriter
from ..progress import progress
from ..regions import RegionShardWriter, write_regions_info
from .captions import Caption, make_caption
from .detector import CLASS_NAMES, DetectorConfig, detect
from .render import encode_jpeg, render_scene
from .scene import COLOURS, SHAPES, SIZES, TEXTURES, Scene, SceneConfig, sample_scene
from .tasks import write_tasks

WORLD_SCHEMA_VERSION = 1
CORPUS_STREAM, TASK_STREAM = 0, 1      # generator streams: the corpus and the held-out task images
MAX_PER_SHARD = 10_000                 # keys are f"{shard:05d}{index:04d}"
GT_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("phrase", pa.string()),
    ("start", pa.int32()),              # character span [start, end) in the caption
    ("end", pa.int32()),
    ("boxes", pa.list_(pa.list_(pa.float32()))),   # pixel xyxy of every object the phrase names
    ("visible", pa.bool_()),
    ("kind", pa.string()),              # object | group | nonvisible | relation
    ("object_ids", pa.list_(pa.int32())),
    ("image_w", pa.int32()),
    ("image_h", pa.int32()),
])
FAILURE_MESSAGES = ("HTTP Error 404: Not Found", "<urlopen error timed out>", "HTTP Error 403: Forbidden")


@dataclass
class CaptionConfig:
    """How often captions take each style; the rest are ``normal``. Failed rows have no image at all."""

    failed_fraction: float = 0.02
    empty_fraction: float = 0.01
    overlong_fraction: float = 0.005
    no_phrase_fraction: float = 0.05
    nonvisible_prob: float = 0.4       # a normal caption names something not in the picture
    group_prob: float = 0.1            # a clause names a group ("two circles")
    overlong_chars: int = 1500


@dataclass
class WorldConfig:
    """Everything that determines a world's bytes."""

    samples: int = 1000
    seed: int = 0
    samples_per_shard: int = 250
    task_samples: int = 500
    task_splits: dict[str, float] = field(default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15})
    jpeg_quality: int = 90
    scene: SceneConfig = field(default_factory=SceneConfig)
    # Task images have at least two objects, often alike, so expressions and questions need grounding.
    task_scene: SceneConfig = field(default_factory=lambda: SceneConfig(min_objects=2, share_prob=0.6))
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)

    def validate(self) -> None:
        if self.samples < 1 or self.task_samples < 0:
            raise SgaError(f"--samples must be >= 1 and --task-samples >= 0 (got {self.samples}, "
                           f"{self.task_samples})")
        if not 1 <= self.samples_per_shard <= MAX_PER_SHARD:
            raise SgaError(f"--samples-per-shard must be in 1..{MAX_PER_SHARD} "
                           f"(got {self.samples_per_shard})")


@dataclass
class WorldSample:
    """One generated sample: what goes into the image, region and ground-truth shards."""

    key: str
    scene: Scene
    caption: Caption
    status: str                  # "success" or "failed_to_download"
    error_message: str | None


def caption_styles(config: WorldConfig, stream: int, shard: int, count: int) -> list[str]:
    """The caption style of each row of a shard: exactly ``round(fraction * count)`` rows per bad style,
    at positions drawn from the shard's own generator; task images always get ``normal`` captions."""
    styles = ["normal"] * count
    if stream == TASK_STREAM:
        return styles
    cfg = config.captions
    # Sample generators use indices below MAX_PER_SHARD; this one cannot collide with them.
    order = np.random.default_rng([config.seed, stream, shard, MAX_PER_SHARD]).permutation(count)
    pos = 0
    for style, frac in (("failed", cfg.failed_fraction), ("empty", cfg.empty_fraction),
                        ("overlong", cfg.overlong_fraction), ("no_phrase", cfg.no_phrase_fraction)):
        quota = round(frac * count)
        for i in order[pos:pos + quota]:
            styles[i] = style
        pos += quota
    return styles


def sample_key(shard: int, index: int) -> str:
    return f"{shard:05d}{index:04d}"


def generate_sample(config: WorldConfig, stream: int, shard: int, index: int,
                    style: str = "normal") -> tuple[WorldSample, np.random.Generator]:
    """The sample at ``(stream, shard, index)`` with a caption of ``style`` (or a failed row), and its
    generator, whose state continues into rendering and detection."""
    rng = np.random.default_rng([config.seed, stream, shard, index])
    scene = sample_scene(rng, config.task_scene if stream == TASK_STREAM else config.scene)
    cfg = config.captions
    caption = make_caption(scene, rng, "normal" if style == "failed" else style, cfg.nonvisible_prob,
                           cfg.group_prob, cfg.overlong_chars)
    if style == "failed":
        err = FAILURE_MESSAGES[int(rng.integers(len(FAILURE_MESSAGES)))]
        return WorldSample(sample_key(shard, index), scene, caption, "failed_to_download", err), rng
    return WorldSample(sample_key(shard, index), scene, caption, "success", None), rng


def _gt_rows(sample: WorldSample) -> list[dict[str, Any]]:
    boxes = sample.scene.boxes()
    return [{"key": sample.key, "phrase": p.text, "start": p.start, "end": p.end,
             "boxes": [boxes[i].tolist() for i in p.object_ids], "visible": p.visible, "kind": p.kind,
             "object_ids": list(p.object_ids), "image_w": sample.scene.width, "image_h": sample.scene.height}
            for p in sample.caption.phrases]


def write_gt(uri: str, rows: list[dict[str, Any]]) -> None:
    """Write ground-truth rows to a parquet file atomically (an empty shard still gets the schema)."""
    table = pa.Table.from_pylist(rows, schema=GT_SCHEMA)
    with fs.atomic_output(uri) as f:
        pq.write_table(table, f)


def build_shard(config: WorldConfig, root_uri: str, stream: int, shard: int, count: int,
                on_sample=None) -> list[WorldSample]:
    """Write shard ``shard`` of ``root_uri/{images,regions,gt}``: ``count`` samples. Returns the samples."""
    name = f"{shard:05d}"
    samples, gt_rows = [], []
    styles = caption_styles(config, stream, shard, count)
    with ImageShardWriter(fs.join(root_uri, "images"), name) as images, \
            RegionShardWriter(fs.join(root_uri, "regions"), name) as regions:
        for index in range(count):
            sample, rng = generate_sample(config, stream, shard, index, styles[index])
            samples.append(sample)
            scene = sample.scene
            meta = {"url": f"https://synthetic.invalid/{sample.key}.jpg", "width": scene.width,
                    "height": scene.height, "original_width": scene.width, "original_height": scene.height}
            if sample.status != "success":
                # Like img2dataset: a row that never downloaded has no sizes.
                meta.update(width=None, height=None, original_width=None, original_height=None)
                images.write(sample.key, sample.caption.text, None, meta, sample.status, sample.error_message)
            else:
                jpg = encode_jpeg(render_scene(scene, rng), config.jpeg_quality)
                images.write(sample.key, sample.caption.text, jpg, meta)
                regions.write(detect(scene, sample.key, rng, config.detector))
                gt_rows.extend(_gt_rows(sample))
            if on_sample is not None:
                on_sample()
    write_gt(fs.join(root_uri, "gt", f"{name}.parquet"), gt_rows)
    return samples


def _shard_counts(total: int, per_shard: int) -> list[int]:
    return [min(per_shard, total - start) for start in range(0, total, per_shard)]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import PIL
    try:
        sga_version = version("sga")
    except PackageNotFoundError:   # running from a source tree that was never installed
        sga_version = "unknown"
    return {"sga": sga_version, "world_schema": str(WORLD_SCHEMA_VERSION), "numpy": np.__version__,
            "pillow": PIL.__version__, "pyarrow": pa.__version__}


def _check_out(out_uri: str, overwrite: bool) -> None:
    """Refuse to mix a new world into a non-empty directory (stale shards would join it)."""
    if not fs.list_dir(out_uri) and not fs.list_subdirs(out_uri):
        return
    if not fs.exists(fs.join(out_uri, "world.json")):
        raise SgaError(f"{out_uri} is not empty and holds no world.json (an interrupted build?); "
                       "delete it or choose another --out")
    if not overwrite:
        raise SgaError(f"{out_uri} already holds a world; pass --overwrite to replace it, "
                       "or choose another --out")
    fs.remove(out_uri)


def _tally(counts: Counter, samples: list[WorldSample]) -> None:
    for s in samples:
        ok = s.status == "success"
        counts["samples"] += 1
        counts["images"] += ok
        counts["failed"] += not ok
        counts[f"style_{s.caption.style if ok else 'failed'}"] += 1
        if ok:
            counts["objects"] += len(s.scene.objects)
            counts["phrases"] += len(s.caption.phrases)
            counts["visible_phrases"] += sum(p.visible for p in s.caption.phrases)


def build_world(config: WorldConfig, out_uri: str, show_progress: bool = True,
                overwrite: bool = False) -> dict[str, Any]:
    """Write a whole world under ``out_uri``; returns a summary (counts, paths, seconds).

    ``out_uri`` must be empty or missing, or hold an earlier world and ``overwrite`` be set.
    """
    config.validate()
    _check_out(out_uri, overwrite)
    start = time.time()
    corpus = _shard_counts(config.samples, config.samples_per_shard)
    held_out = _shard_counts(config.task_samples, config.samples_per_shard)
    bar = progress(total=config.samples + config.task_samples, desc="sga world", unit="img",
                   **({} if show_progress else {"disable": True}))
    tally: Counter = Counter()
    for shard, count in enumerate(corpus):
        _tally(tally, build_shard(config, out_uri, CORPUS_STREAM, shard, count, bar.update))
    task_root = fs.join(out_uri, "tasks")
    task_samples: list[WorldSample] = []
    for offset, count in enumerate(held_out):
        task_samples += build_shard(config, task_root, TASK_STREAM, len(corpus) + offset, count, bar.update)
    bar.close()
    det = config.detector
    for root in (out_uri, task_root) if task_samples else (out_uri,):
        write_regions_info(fs.join(root, "regions"), det.feature_dim, len(CLASS_NAMES), list(CLASS_NAMES),
                           {"detector": "sga-synthetic", **dataclasses.asdict(det)})
    task_counts = write_tasks(config, task_root, task_samples) if task_samples else {}
    counts = {k: tally[k] for k in ("samples", "images", "failed", "objects", "phrases", "visible_phrases")}
    counts.update(shards=len(corpus), task_images=len(task_samples), task_shards=len(held_out),
                  captions_by_style={k[len("style_"):]: v for k, v in sorted(tally.items())
                                     if k.startswith("style_")},
                  tasks=task_counts)
    fs.write_json(fs.join(out_uri, "world.json"), {
        "config": dataclasses.asdict(config), "seed": config.seed, "counts": counts,
        "class_names": list(CLASS_NAMES), "shapes": list(SHAPES), "colours": list(COLOURS),
        "sizes": list(SIZES), "textures": list(TEXTURES), "versions": _versions(),
        "layout": {"images": "images", "regions": "regions", "gt": "gt", "tasks": "tasks"}})
    return {"out": out_uri, "seed": config.seed, **counts, "seconds": round(time.time() - start, 2)}

