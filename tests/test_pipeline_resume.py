"""SIGKILL of the ``sga label`` driver in the middle of writing a shard, then a rerun: every input sample
ends up labelled (or in the errors table) exactly once, and nothing partial is ever visible."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline_fixtures import assert_exactly_once, make_world, teacher_spec

from pipeline.job import run_label_job
from pipeline.plan import LabelJobConfig
from shards import fs
from shards.manifest import read_marker


def test_driver_killed_mid_write_then_rerun_labels_everything_once(tmp_path):
    world = make_world(tmp_path / "world", samples=48, per_shard=8, seed=5)
    out = tmp_path / "labels"
    teacher = teacher_spec(tmp_path)
    args = ["--images", str(world / "images"), "--regions", str(world / "regions"), "--out", str(out),
            "--teacher", teacher, "--workers", "1", "--shard-workers", "1", "--batch-size", "4",
            "--score-floor", "0", "--score-threshold", "0.01"]
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "label", *args, "--num-cpus", "2"],
                              env={**os.environ, "SGA_PROGRESS": "0"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    killed_while = None
    deadline = time.time() + 150
    try:
        while time.time() < deadline and driver.poll() is None:
            sets = [d for d in out.glob("*") if d.is_dir() and d.name != "_phrases"] if out.exists() else []
            files = [f.name for d in sets for f in d.iterdir()]
            markers = sum(n.endswith("_stats.json") for n in files)
            if markers >= 1 and any(".tmp-" in n for n in files):
                killed_while = (markers, sorted(n for n in files if ".tmp-" in n))
                driver.kill()                                    # SIGKILL
                break
            time.sleep(0.005)
    finally:
        if driver.poll() is None and killed_while is None:
            driver.kill()
        driver.wait(timeout=30)
    assert killed_while is not None, "the driver finished (or stalled) before it could be killed mid-write"
    labelset = next(d for d in out.glob("*") if d.is_dir() and d.name != "_phrases")
    done_before = [s for s in (f"{i:05d}" for i in range(6)) if read_marker(str(labelset), s) is not None]
    assert 1 <= len(done_before) < 6
    # Readers see only finished files: temp files are hidden from listings.
    assert all(".tmp-" not in name for name in fs.list_dir(str(labelset)))

    config = LabelJobConfig(images=str(world / "images"), regions=str(world / "regions"), out=str(out),
                            teacher=teacher, num_cpus=2, workers=1, shard_workers=1, batch_size=4,
                            score_floor=0.0, score_threshold=0.01)
    summary = run_label_job(config)
    assert summary["shards_done"] == 6 and summary["shards_failed"] == {}
    assert summary["shards_skipped"] >= len(done_before)
    assert summary["shards_labeled"] == 6 - summary["shards_skipped"]
    assert_exactly_once(summary["labels"], str(world / "images"))
    assert not [p for p in Path(summary["labels"]).iterdir() if ".tmp-" in p.name]
