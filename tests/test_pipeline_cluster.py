"""``sga label`` on a multi-node Ray cluster simulated on this machine (``ray.cluster_utils.Cluster``: a
head without CPUs and two 1-CPU nodes), with the node running the shard worker removed mid-job."""

from __future__ import annotations

import threading
import time

import pytest
from pipeline_fixtures import assert_exactly_once, make_world, teacher_spec

from pipeline.job import run_label_job
from pipeline.plan import LabelJobConfig


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


def test_node_removed_mid_job_completes_exactly_once(cluster, tmp_path):
    cluster, nodes = cluster
    world = make_world(tmp_path / "world", samples=64, per_shard=8, seed=7)
    out = tmp_path / "labels"
    # Half a CPU each, so a single surviving 1-CPU node can host both actors after the other is gone.
    config = LabelJobConfig(images=str(world / "images"), regions=str(world / "regions"), out=str(out),
                            teacher=teacher_spec(tmp_path), address="auto", workers=1, shard_workers=1,
                            cpus_per_worker=0.5, cpus_per_shard_worker=0.5, batch_size=2,
                            score_floor=0.0, score_threshold=0.01)
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(run_label_job(config)))
    job.start()

    def markers() -> int:
        return len(list(out.glob("*/*_stats.json"))) if out.exists() else 0

    deadline = time.time() + 150
    while markers() < 1 and job.is_alive() and time.time() < deadline:
        time.sleep(0.02)
    victim_id = node_of("ShardActor")
    victim = next((n for n in nodes if n.node_id == victim_id), None)
    assert victim is not None and job.is_alive() and markers() < 8, "no shard worker to take away mid-job"
    cluster.remove_node(victim)
    removed_at = markers()
    job.join(timeout=300)
    assert not job.is_alive()
    assert removed_at < 8
    assert result["shards_failed"] == {} and result["shards_done"] == result["shards_labeled"] == 8
    assert_exactly_once(result["labels"], str(world / "images"))
