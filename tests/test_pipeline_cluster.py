"""``sga label`` on a multi-node Ray cluster simulated on this machine (``ray.cluster_utils.Cluster``: a head
without CPUs and two 1-CPU nodes). The driver is SIGKILLed while a shard is being written; the rerun loses
the node running its shard worker mid-job. Every sample still ends up labelled (or in the errors table)
exactly once, and no partial file is ever visible."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pipeline_fixtures import assert_exactly_once, assert_listed_files_whole, make_world, teacher_spec

from pipeline.job import run_label_job
from pipeline.plan import LabelJobConfig
from shards.manifest import read_marker

SHARDS = 8


@pytest.fixture()
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


def node_of(class_name: str) -> str | None:
    """Node id (hex) of the live actor of ``class_name``, from the GCS actor table."""
    import ray._private.state as state

    for actor in state.actors().values():
        if actor["ActorClassName"].endswith(class_name) and actor["State"] == "ALIVE":
            return actor["Address"]["NodeID"]
    return None


def label_files(out: Path) -> list[str]:
    sets = [d for d in out.iterdir() if d.is_dir() and d.name != "_phrases"] if out.exists() else []
    return [f.name for d in sets for f in d.iterdir()]


def kill_driver_mid_write(args: list[str], out: Path) -> int:
    """Run ``sga label`` in a subprocess and SIGKILL it while a shard's temp file exists after at least one
    shard is done; returns the number of finished shards at that moment."""
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "label", *args],
                              env={**os.environ, "SGA_PROGRESS": "0"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 900     # a bound against a hung driver; the trigger is the files, not a time
    try:
        while time.time() < deadline and driver.poll() is None:
            files = label_files(out)
            markers = sum(n.endswith("_stats.json") for n in files)
            if markers >= 1 and any(".tmp-" in n for n in files):
                driver.kill()                                    # SIGKILL
                return markers
            time.sleep(0.005)
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.wait(timeout=30)
    raise AssertionError("the driver finished (or stalled) before it could be killed mid-write")


def test_killed_driver_then_lost_node_still_labels_everything_once(cluster, tmp_path):
    cluster, nodes = cluster
    world = make_world(tmp_path / "world", samples=8 * SHARDS, per_shard=8, seed=7)
    out = tmp_path / "labels"
    teacher = teacher_spec(tmp_path)
    # Half a CPU each, so one surviving 1-CPU node can host both actors after the other node is gone.
    options = dict(teacher=teacher, address=cluster.address, workers=1, shard_workers=1, cpus_per_worker=0.5,
                   cpus_per_shard_worker=0.5, batch_size=2, score_floor=0.0, score_threshold=0.01)
    args = ["--images", str(world / "images"), "--regions", str(world / "regions"), "--out", str(out),
            *[f"--{k.replace('_', '-')}={v}" for k, v in options.items()]]
    done_at_kill = kill_driver_mid_write(args, out)
    labelset = next(d for d in out.iterdir() if d.is_dir() and d.name != "_phrases")
    done = [s for s in (f"{i:05d}" for i in range(SHARDS)) if read_marker(str(labelset), s) is not None]
    assert done_at_kill <= len(done) < SHARDS
    assert assert_listed_files_whole(str(labelset)) == len(done)      # readers never see partial files

    config = LabelJobConfig(images=str(world / "images"), regions=str(world / "regions"), out=str(out),
                            **options)
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(run_label_job(config)))
    job.start()
    deadline = time.time() + 900
    while sum(n.endswith("_stats.json") for n in label_files(out)) <= len(done) and job.is_alive() \
            and time.time() < deadline:
        time.sleep(0.02)
    victim_id = node_of("ShardActor")
    victim = next((n for n in nodes if n.node_id == victim_id), None)
    remaining = SHARDS - sum(n.endswith("_stats.json") for n in label_files(out))
    assert victim is not None and job.is_alive() and remaining > 0, "no shard worker to take away mid-job"
    cluster.remove_node(victim)
    job.join(timeout=900)
    assert not job.is_alive()
    assert result["shards_failed"] == {} and result["shards_done"] == SHARDS
    assert result["shards_skipped"] >= len(done)
    assert result["shards_labeled"] == SHARDS - result["shards_skipped"]
    assert_exactly_once(result["labels"], str(world / "images"))
    assert not [p for p in labelset.iterdir() if ".tmp-" in p.name]
