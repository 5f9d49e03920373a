"""`sga pretrain` with 2 ranks under real torchrun (gloo, CPU) on a small generated world.

The runs use split mode over an odd number of shards (3 shards, 2 ranks, one loader worker process each:
rank 0 reads two shards, rank 1 one), the mode where a short rank would hang DDP, so every run finishing
is that check. One uninterrupted reference run serves the others: ranks in sync, every loss term finite
and falling, and the reference for resume: a run killed with SIGKILL after its first checkpoint and
resumed must end with the same bytes. (Equal batch counts in the default resampled mode are checked with
simulated ranks in test_student_data.py; starting processes costs most of this file's time.)
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from student_fixtures import labels_from_world

from shards.synthetic.world import WorldConfig, build_world
from student.checkpoint import load_weights, weights_digest
from student.config import StudentConfig
from student.logs import read_log
from student.model import build_model

torch.set_num_threads(1)
pytestmark = pytest.mark.slow

STEPS, EVERY = 48, 16
TERMS = ("loss", "mlm", "mrc", "itm", "gnd")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    # 24 samples in 3 shards of 8: an odd shard count, and small enough for the tiny model to fit quickly.
    build_world(WorldConfig(samples=24, seed=1, samples_per_shard=8, task_samples=0), str(root / "world"),
                show_progress=False)
    labels = labels_from_world(str(root / "world"), str(root / "labels"))
    return {"root": root, "regions": str(root / "world" / "regions"), "labels": labels}


def command(world, out, *extra):
    # The shipped synthetic-world tokenizer (no --tokenizer). BERT's init_std 0.02 leaves the tiny model's
    # ITM logit at chance for hundreds of steps (a product of two small pooled vectors); a wider init lets
    # every term move within a short run.
    return [sys.executable, "-m", "pipeline.cli", "pretrain", "--regions", world["regions"],
            "--labels", world["labels"], "--out", str(out), "--nproc", "2", "--threads", "1",
            "--device", "cpu", "--preset", "tiny", "--model", "init_std=0.2", "--model", "dropout=0.1",
            "--batch-size", "4", "--global-batch", "16",
            "--data-mode", "split", "--workers", "1", "--lr", "3e-3", "--warmup", "0.05",
            "--steps", str(STEPS), "--checkpoint-every", str(EVERY), "--no-tensorboard", "--json", *extra]


def descendants(pid: int) -> list[int]:
    """Live descendant process ids of ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def run(cmd, timeout=240):
    env = {**os.environ, "SGA_PROGRESS": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def reference(world):
    out = world["root"] / "reference"
    return out, run(command(world, out))


def test_ranks_hold_identical_parameters(reference):
    out, summary = reference
    assert summary["world_size"] == 2 and summary["steps"] == STEPS and summary["accum"] == 2
    assert summary["wds_secure"]                                       # no webdataset decoder may unpickle
    digest_0, digest_1 = summary["param_digests"]
    assert digest_0 == digest_1
    # The digest is of the real weights: rank 0's exported file gives the same one.
    with open(out / "student_config.json") as f:
        model = build_model(StudentConfig.from_json(f.read()))
    load_weights(str(out / "model.safetensors"), model)
    assert weights_digest(model).hex()[:16] == digest_0
    assert summary["data"]["samples"] >= STEPS * 16 and summary["shards"] == 3
    assert summary["steps_per_epoch"] * summary["epochs"] >= STEPS > summary["steps_per_epoch"]


def test_every_loss_term_is_finite_and_decreasing(reference):
    out, _ = reference
    rows = read_log(str(out / "logs"))
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    window = STEPS // 4
    for term in TERMS:
        values = [r[term] for r in rows]
        assert all(math.isfinite(v) for v in values), term
        early, late = sum(values[:window]) / window, sum(values[-window:]) / window
        assert late < early, f"{term}: {early:.4f} -> {late:.4f}"
    lrs = [r["lr"] for r in rows]
    assert max(lrs) == pytest.approx(3e-3) and lrs[-1] == 0.0


def test_a_killed_run_resumes_to_the_same_parameters(world, reference):
    ref_out, ref_summary = reference
    out = world["root"] / "killed"
    proc = subprocess.Popen(command(world, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "SGA_PROGRESS": "0"}, start_new_session=True)
    latest = out / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 180
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    tree = descendants(proc.pid)  # torchrun and the two ranks
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and torchrun, mid-training
    proc.wait()
    # The ranks run in sessions of their own; they must die with their launcher, not run on as orphans.
    deadline = time.monotonic() + 30
    while any(os.path.exists(f"/proc/{pid}") for pid in tree) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(tree) >= 3 and not any(os.path.exists(f"/proc/{pid}") for pid in tree)
    assert latest.exists() and not (out / "summary.json").exists(), "the run was not interrupted"

    summary = run(command(world, out, "--resume"))
    assert EVERY <= summary["start_step"] < STEPS and summary["resumed_from"]
    assert summary["param_digests"] == ref_summary["param_digests"]
    resumed, uninterrupted = (load_file(str(o / "model.safetensors")) for o in (out, ref_out))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    rows = read_log(str(out / "logs"))
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))   # no duplicated steps after resume
    ref_rows = read_log(str(ref_out / "logs"))
    for row, ref_row in zip(rows, ref_rows):
        assert all(row[t] == ref_row[t] for t in TERMS), row["step"]
