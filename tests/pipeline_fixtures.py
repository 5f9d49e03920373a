"""Real inputs for the pipeline tests: a generated world, a real teacher, damaged shards, and the
exactly-once check every resume test ends with."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from shards import fs
from shards.images import ImageShardWriter, list_image_keys, list_shards
from shards.labels import iter_label_shard
from shards.manifest import read_manifest, read_marker
from shards.regions import RegionRecord, RegionShardWriter, write_regions_info
from shards.tario import TarShardWriter


def run_fresh(code: str, *args: str, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter (one BLAS/OpenMP thread, ``env`` added, the user's
    ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` removed so library defaults are in force) and return the JSON
    object its last line of output prints."""
    environ = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    environ.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", **env)
    done = subprocess.run([sys.executable, "-c", code, *args], env=environ, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_world(root: Path, samples: int, per_shard: int, seed: int = 0) -> Path:
    """A synthetic world (no task images) under ``root``; returns its folder."""
    from shards.synthetic.world import WorldConfig, build_world

    config = WorldConfig(samples=samples, samples_per_shard=per_shard, task_samples=0, seed=seed)
    build_world(config, str(root), show_progress=False)
    return root


def teacher_spec(tmp: Path, seed: int = 0) -> str:
    """A real teacher: the bundled ``tiny`` for seed 0; for other seeds a randomly initialised small MDETR
    folder written through the teacher package's own API (a second teacher with its own fingerprint)."""
    if seed == 0:
        return "tiny"
    import torch

    from teacher.mdetr.build import build_mdetr
    from teacher.mdetr.checkpoint import save_mdetr
    from teacher.mdetr.configs import get_config
    from teacher.preprocess import PreprocessConfig
    from teacher.tokenizer import train_tokenizer

    out = tmp / f"teacher-{seed}"
    if (out / "teacher.json").is_file():
        return str(out)
    torch.manual_seed(seed)
    texts = ["a small striped red circle to the left of a large blue square on a sunny day",
             "two green triangles above a dotted yellow shape", "the artist paints a purple heart"] * 20
    tok = train_tokenizer(texts, vocab_size=300, min_frequency=1)
    config = get_config("tiny", text_encoder={"vocab_size": len(tok)})
    save_mdetr(build_mdetr(config), config, str(out))
    tok.save_pretrained(str(out / "tokenizer"))
    pre = PreprocessConfig(short_side=64, max_size=128, size_multiple=8)
    (out / "teacher.json").write_text(json.dumps({"format": "sga-teacher", "kind": "mdetr",
                                                  "preprocess": pre.to_dict(), "info": {}}))
    return str(out)


def jpeg(w: int, h: int, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="JPEG")
    return buf.getvalue()


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def region_record(key: str, w: int = 64, h: int = 48, boxes=None, dim: int = 8) -> RegionRecord:
    boxes = np.asarray(boxes if boxes is not None else [[2, 2, 30, 30], [10, 5, 60, 45], [0, 0, 64, 48]],
                       np.float32)
    feats = np.full((len(boxes), dim), 0.5, np.float16)
    return RegionRecord(key, boxes, feats, None, w, h)


def raw_region_members(rec: RegionRecord) -> dict[str, bytes]:
    """Region tar members written without the format's checks (to plant NaN features, bad boxes)."""
    return {"boxes.npy": npy(rec.boxes), "features.npy": npy(rec.features),
            "json": json.dumps({"image_w": rec.image_w, "image_h": rec.image_h,
                                "num_boxes": len(rec.boxes)}).encode()}


def truncate(path: Path, keep_fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


def write_bad_input(root: Path, dim: int = 8) -> list[tuple[str, str, str | None]]:
    """Shards ``00000`` (every kind of bad sample beside good ones), ``00001`` (a truncated image tar),
    ``00002`` (an unreadable shard) and ``00003`` (a truncated region tar), with matching region shards.
    Returns shard 00000's manifest as the job must write it: ``(key, status, stage)`` in input order."""
    images, regions = root / "images", root / "regions"
    good = jpeg(64, 48)
    cases = [
        # key, caption, jpg, status, region entry (None: absent), expected status and stage
        ("good0", "a red square next to a blue circle", good, "success", "rec", "ok", None),
        ("nophrase", "so beautiful", good, "success", "rec", "ok", None),
        ("failed", "", None, "failed_to_download", None, "error", "image"),
        ("corrupt", "a red square", b"\xff\xd8\xff\xe0 not a jpeg", "success", "rec", "error", "image"),
        ("empty", "", good, "success", "rec", "error", "caption"),
        ("blank", "   \n", good, "success", "rec", "error", "caption"),
        ("overlong", "a red square " * 200, good, "success", "rec", "error", "caption"),
        ("badutf8", "placeholder", good, "success", "rec", "error", "caption"),
        ("noregions", "a red square", good, "success", None, "error", "regions"),
        ("nanfeat", "a red square", good, "success", "nan", "error", "regions"),
        ("inffeat", "a red square", good, "success", "inf", "error", "regions"),
        ("dupregion", "a red square", good, "success", "twice", "error", "regions"),  # two region entries
        ("nobytes", "a red square", good, "success", "rec", "error", "image"),    # jpg dropped below
        ("degenerate", "a red square", good, "success", "degenerate", "error", "regions"),
        ("outside", "a red square", good, "success", "outside", "error", "regions"),
        ("sizediff", "a red square", jpeg(32, 32), "success", "rec", "error", "regions"),
        ("good1", "the small green triangle", good, "success", "rec", "ok", None),
        # The first key again: img2dataset never does this, a merged or hand-edited shard might.
        ("good0", "a blue circle", good, "success", None, "error", "read"),
    ]
    region_members: list[tuple[str, dict[str, bytes]]] = []
    with ImageShardWriter(str(images), "00000") as w:
        for key, caption, data, status, region, _, _ in cases:
            meta = {"width": 64, "height": 48} if data is not None else {}
            w.write(key, caption, data, meta, status, None if data is not None else "HTTP Error 404")
            boxes = {"degenerate": [[5, 5, 5, 20]], "outside": [[0, 0, 500, 40]]}.get(region)
            rec = region_record(key, boxes=boxes, dim=dim)
            if region in ("nan", "inf"):
                rec.features[1, 3] = np.nan if region == "nan" else -np.inf
            if region is not None:
                region_members += [(key, raw_region_members(rec))] * (2 if region == "twice" else 1)
    # Undecodable caption bytes in the tar (the parquet row keeps its placeholder, as a broken writer might),
    # and a success row whose image the tar lacks.
    replace_member(images / "00000.tar", "badutf8.txt", b"\xff\xfe a red \xc3 square")
    replace_member(images / "00000.tar", "nobytes.jpg", None)
    with TarShardWriter(str(regions / "00000.tar")) as t:
        for key, members in region_members:
            t.write(key, members)
    # Shard 00001: 6 good samples, then the image tar is cut in half.
    write_good_shard(images, regions, "00001", "trunc", dim)
    truncate(images / "00001.tar", 0.5)
    # Shard 00002: garbage where the image tar should be, and no parquet.
    (images / "00002.tar").write_bytes(b"this is not a tar file at all" * 10)
    with RegionShardWriter(str(regions), "00002") as r:
        r.write(region_record("lost0", dim=dim))
    # Shard 00003: 6 good samples, then the region tar is cut in half.
    write_good_shard(images, regions, "00003", "cutregions", dim)
    truncate(regions / "00003.tar", 0.5)
    write_regions_info(str(regions), dim, 0, None, {"detector": "test"})
    return [(key, status, stage) for key, *_, status, stage in cases]


def write_good_shard(images: Path, regions: Path, shard: str, prefix: str, dim: int) -> None:
    """Image and region shard ``shard`` of six good samples keyed ``{prefix}0`` to ``{prefix}5``."""
    with ImageShardWriter(str(images), shard) as w, RegionShardWriter(str(regions), shard) as r:
        for i in range(6):
            w.write(f"{prefix}{i}", f"a red square number {i}", jpeg(64, 48), {"width": 64, "height": 48})
            r.write(region_record(f"{prefix}{i}", dim=dim))


def replace_member(tar_path: Path, name: str, data: bytes | None) -> None:
    """Rewrite a tar with member ``name``'s bytes replaced, or the member left out when ``data`` is None."""
    with tarfile.open(tar_path) as tar:
        members = [(i.name, tar.extractfile(i).read()) for i in tar.getmembers()]
    with tarfile.open(tar_path, "w") as tar:
        for member, payload in members:
            if member == name and data is None:
                continue
            payload = data if member == name else payload
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def assert_exactly_once(labelset: str, images: str) -> dict:
    """Every input sample of every image shard is in the manifest exactly once, each ``ok`` sample is in
    exactly one label tar and no ``error`` sample is; every shard has its marker; no temp file is left
    where a reader could list it. Returns the manifest's status counts."""
    rows = read_manifest(labelset).to_pylist()
    expected = []
    for shard in list_shards(images):
        assert read_marker(labelset, shard) is not None, f"shard {shard} has no marker"
        try:
            expected += [(shard, k) for k in list_image_keys(images, shard)]
        except Exception:  # an unreadable shard reports one row named after the shard
            expected.append((shard, shard))
    got = sorted((r["shard"], r["key"]) for r in rows)
    assert got == sorted(expected), "manifest rows != input samples"
    labelled: list[str] = []
    for shard in list_shards(images):
        labelled += [rec.key for rec in iter_label_shard(labelset, shard)]
    ok = sorted(r["key"] for r in rows if r["status"] == "ok")
    assert sorted(labelled) == ok, "label tars != ok rows of the manifest"
    # The folder itself, not fs.list_dir (which never lists temp files): nothing half-written is left.
    assert not [p.name for p in Path(labelset).iterdir() if fs.TMP_MARK in p.name], "temp files left"
    return {"ok": len(ok), "error": len(rows) - len(ok)}


def assert_listed_files_whole(labelset: str) -> int:
    """Every file a reader lists in ``labelset`` (``fs.list_dir``) reads to its end, whatever was killed
    mid-write, and every shard marker comes after its label tar and manifest. Returns the markers."""
    names = fs.list_dir(labelset)
    markers = [n.removesuffix("_stats.json") for n in names if n.endswith("_stats.json")]
    for shard in markers:
        assert {f"{shard}.tar.gz", f"{shard}.parquet"} <= set(names), f"marker of {shard} before its files"
        assert read_marker(labelset, shard) is not None
    for name in names:
        if name.endswith(".tar.gz"):
            list(iter_label_shard(labelset, name.removesuffix(".tar.gz")))
        elif name.endswith(".parquet"):
            pq.read_table(os.path.join(labelset, name))
        else:
            json.loads(Path(labelset, name).read_text())
    return len(markers)
