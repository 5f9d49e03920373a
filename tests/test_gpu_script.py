"""``benchmarks/gpu_mdetr.py``: its ``--dry-run`` (the GPU code path at toy size on the CPU) runs the forward
throughput loop and a real two-shard ``sga label`` job on Ray and prints every figure; without a GPU the full
run stops with a clear message instead of timing the CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_mdetr.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@pytest.mark.slow
def test_dry_run_prints_every_figure(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--workdir", str(tmp_path)], env=ENV,
                          capture_output=True, text=True, timeout=300, cwd=SCRIPT.parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result) == {"dry_run", "device", "torch", "size", "forward_img_per_s", "label_samples",
                           "label_ok", "label_img_per_s", "teacher_busy_fraction", "wall_s"}
    assert result["dry_run"] is True and result["device"] == "cpu"
    assert result["size"]["entry"] == "tiny" and result["size"]["gpus_per_worker"] == 0
    assert list(result["forward_img_per_s"]) == ["1", "2"] and all(
        v > 0 for v in result["forward_img_per_s"].values())
    # Two shards of four samples, every one labelled by the real job.
    assert result["label_samples"] == result["label_ok"] == 8
    assert result["label_img_per_s"] > 0 and 0 < result["teacher_busy_fraction"] <= 1
    assert "forward bs=  2" in done.stdout and "label job: 8 samples" in done.stdout
    assert sorted(p.name for p in (tmp_path / "labels").glob("*/0000?_stats.json")) == [
        "00000_stats.json", "00001_stats.json"]


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine runs the real benchmark")
def test_full_run_without_gpu_stops_with_a_message():
    done = subprocess.run([sys.executable, str(SCRIPT)], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "no CUDA device" in done.stderr and "--dry-run" in done.stderr
