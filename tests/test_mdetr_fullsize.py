"""Full-size MDETR end to end: a ResNet-101 + RoBERTa-base model in the released ``.pth`` layout, converted by
``sga teacher convert`` and run by ``sga label`` on img2dataset's own shard at MDETR's evaluation size.

The weights are random (no released checkpoint is available offline), so the test checks the plumbing at the
real size, not label quality. roberta-base's tokenizer files are not available offline either: as elsewhere in
the suite, a small RoBERTa-style byte-level BPE stands in for them. Its ids (< 300) are valid rows of the full
50,265-row embedding table, so the model keeps the official layout.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_fixtures import region_record

from shards.images import iter_image_shard
from shards.manifest import read_manifest
from shards.regions import RegionShardWriter, write_regions_info
from teacher.mdetr import build_mdetr
from teacher.preprocess import PreprocessConfig, preprocess_batch
from teacher.tokenizer import train_tokenizer

pytestmark = pytest.mark.slow

IMAGES = pathlib.Path(__file__).parent / "assets" / "img2dataset"
STALE_KEY = "transformer.text_encoder.embeddings.position_ids"


def sga(*argv: str) -> dict:
    """``sga ARGV --json`` in a fresh process (one BLAS thread); returns its summary object."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", *argv, "--json"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def released_r101(path: pathlib.Path) -> None:
    """A random-weight ``mdetr_resnet101`` saved as MDETR's ``main.py`` saves a BEST checkpoint: ``model``
    (with the ``position_ids`` buffer transformers 4.5.1 kept), ``optimizer``, ``epoch``, ``args``."""
    torch.manual_seed(0)
    model = build_mdetr("mdetr_resnet101")
    state = {**model.state_dict(), STALE_KEY: torch.arange(514).unsqueeze(0)}
    args = argparse.Namespace(backbone="resnet101", text_encoder_type="roberta-base", ema=False,
                              output_dir=pathlib.PosixPath("/checkpoint/pretrain"))
    torch.save({"model": state, "optimizer": {}, "epoch": 40, "args": args}, path)


def test_resnet101_teacher_labels_real_img2dataset_shard_at_800px(tmp_path):
    samples = list(iter_image_shard(str(IMAGES), "00000"))
    decoded = {s.key: Image.open(io.BytesIO(s.jpg)).convert("RGB") for s in samples if s.jpg is not None}
    assert len(samples) == 5 and len(decoded) == 4     # img2dataset's four downloads and one 404
    regions = tmp_path / "regions"
    with RegionShardWriter(str(regions), "00000") as writer:
        for key, image in decoded.items():
            w, h = image.size
            boxes = [[0, 0, w / 2, h / 2], [w / 4, h / 4, w, h], [0, 0, w, h]]
            writer.write(region_record(key, w, h, boxes=boxes))
    write_regions_info(str(regions), 8, 0, None, {"detector": "test"})

    captions = [s.caption for s in samples if s.caption] * 10
    train_tokenizer(captions, vocab_size=300, min_frequency=1).save_pretrained(str(tmp_path / "roberta"))
    released_r101(tmp_path / "pretrained_resnet101_checkpoint.pth")
    converted = sga("teacher", "convert", "--src", str(tmp_path / "pretrained_resnet101_checkpoint.pth"),
                    "--tokenizer", str(tmp_path / "roberta"), "--out", str(tmp_path / "r101"))
    assert converted["entry"] == "mdetr_resnet101" and converted["weights"] == "model"
    (tmp_path / "pretrained_resnet101_checkpoint.pth").unlink()   # 742 MB; the teacher directory is enough

    # What the teacher will feed the network: MDETR's evaluation size, short side 800, long side <= 1333.
    teacher_json = json.loads((tmp_path / "r101" / "teacher.json").read_text())
    preprocess = PreprocessConfig.from_dict(teacher_json["preprocess"])
    assert (preprocess.short_side, preprocess.max_size) == (800, 1333)
    for image in decoded.values():
        batch, mask = preprocess_batch([np.asarray(image)], preprocess)
        valid_h, valid_w = (~mask[0]).sum(0).max().item(), (~mask[0]).sum(1).max().item()
        assert min(valid_h, valid_w) == 800 and max(valid_h, valid_w) <= 1333
        assert batch.shape[-2:] == mask.shape[-2:] == (valid_h, valid_w)

    summary = sga("label", "--images", str(IMAGES), "--regions", str(regions), "--out",
                  str(tmp_path / "labels"), "--teacher", str(tmp_path / "r101"), "--num-cpus", "2",
                  "--workers", "1", "--cpus-per-worker", "1", "--shard-workers", "1",
                  "--cpus-per-shard-worker", "1", "--batch-size", "2", "--score-floor", "0")
    assert summary["samples"] == summary["ok"] + summary["errors"] == 5
    assert summary["ok"] == 4 and summary["errors"] == 1 and summary["shards_failed"] == {}
    assert summary["grounded"] == 4 and summary["teacher"] == "r101"
    rows = read_manifest(summary["labels"]).to_pylist()
    assert [(r["key"], r["status"]) for r in rows] == [
        (s.key, "ok" if s.jpg is not None else "error") for s in samples]
