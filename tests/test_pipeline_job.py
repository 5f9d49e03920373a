"""``sga label`` on a real local Ray instance (one per module, 2 CPUs): the embedded default, its no-op
rerun, ``labels ls``/``inspect``/``report``, a new teacher beside the old labels while its workers are
SIGKILLed, and the up-front refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pipeline_fixtures import assert_exactly_once, make_world, teacher_spec

from pipeline.cli import main as sga
from pipeline.job import run_label_job, size_workers
from pipeline.plan import LabelJobConfig
from shards.errors import SgaError
from shards.manifest import read_manifest, read_marker


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teachers")
    return teacher_spec(tmp, seed=0), teacher_spec(tmp, seed=1)


def cli_json(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert sga([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def process_titles() -> dict[int, str]:
    """``pid -> command line`` of this test's descendant processes (Ray titles actor processes
    ``ray::Class.method``); other Ray instances on the machine are never touched."""
    parents, titles = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # The parent pid is the field after the parenthesised command name.
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                titles[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace")
            except (OSError, IndexError, ValueError):
                continue

    def ours(pid: int) -> bool:
        while pid > 1:
            if pid == os.getpid():
                return True
            pid = parents.get(pid, 0)
        return False

    return {pid: title for pid, title in titles.items() if ours(pid)}


def kill_when_busy(job: threading.Thread, victims: tuple[str, ...]) -> list[str]:
    """SIGKILL one process of each actor class in ``victims`` as soon as a shard worker is labelling.

    The trigger is the worker's process title, not a time: on a loaded machine the actors may take minutes
    to start, so the only deadline is a generous bound against a hung job."""
    deadline = time.time() + 900
    while job.is_alive() and time.time() < deadline:
        titles = process_titles()
        if any(t.startswith("ray::ShardActor.label") for t in titles.values()):
            killed = []
            for victim in victims:
                pid = next((p for p, t in titles.items() if t.startswith(f"ray::{victim}")), None)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(victim)
            return killed
        time.sleep(0.01)
    return []


def test_default_job_rerun_tools_and_new_teacher_with_killed_workers(ray_instance, teachers, tmp_path,
                                                                     capsys):
    cache = tmp_path / "cache"
    common = ["--cache", str(cache), "--world-samples", "40", "--workers", "1", "--shard-workers", "1",
              "--batch-size", "4", "--score-floor", "0", "--score-threshold", "0.01"]
    first = cli_json(capsys, "label", *common, "--teacher", teachers[0])
    world = next((cache / "worlds").iterdir())
    assert first["samples"] == first["ok"] + first["errors"] == 40 and first["shards_failed"] == {}
    assert first["shards"] == first["shards_done"] == first["shards_labeled"] == 1
    assert first["errors"] == sum(first["error_stages"].values())
    assert 0 <= first["precision"] <= 1 and 0 <= first["recall"] <= 1     # against the world's truth
    assert 0 < first["teacher_busy_fraction"] <= 1 and first["samples_per_s"] > 0
    peaks = first["peak_rss_mb"]                    # one teacher and one shard worker: the sum of both
    assert peaks["actors"] == peaks["teacher"] + peaks["shard_worker"] and peaks["teacher"] > 100
    counts = assert_exactly_once(first["labels"], str(world / "images"))
    assert counts == {"ok": first["ok"], "error": first["errors"]}

    start = time.perf_counter()
    again = cli_json(capsys, "label", *common, "--teacher", teachers[0])
    assert again["shards_skipped"] == 1 and again["shards_labeled"] == 0 and "teachers" not in again
    assert time.perf_counter() - start < 5
    assert {k: again[k] for k in ("samples", "ok", "phrases", "positives", "precision")} == \
        {k: first[k] for k in ("samples", "ok", "phrases", "positives", "precision")}

    ok_rows = [r for r in read_manifest(first["labels"]).to_pylist() if r["status"] == "ok"]
    key = next(r["key"] for r in ok_rows if r["n_phrases"] > 0)
    png = tmp_path / "inspect.png"
    shown = cli_json(capsys, "inspect", first["labels"], "--key", key, "--out", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shown["phrases"]
    report = cli_json(capsys, "report", first["labels"], "--out", str(tmp_path / "report"))
    page = (tmp_path / "report" / "index.html").read_text()
    assert report["samples"] == 40 and "Error reasons" in page and first["labelset_id"] in page
    assert all((tmp_path / "report" / name).read_bytes()[:4] == b"\x89PNG" for name in report["plots"])

    # A new teacher labels into a new label set beside the old one, reusing the cached phrases, while the
    # shard worker and the teacher are SIGKILLed mid-shard: every sample still ends up labelled once.
    old_labels = Path(first["labels"], "00000.tar.gz").read_bytes()
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(
        run_label_job(LabelJobConfig(images=str(world / "images"), regions=str(world / "regions"),
                                     out=str(Path(first["labels"]).parent), teacher=teachers[1], workers=1,
                                     shard_workers=1, batch_size=4, score_floor=0.0, score_threshold=0.01))))
    job.start()
    killed = kill_when_busy(job, ("ShardActor", "TeacherActor"))
    job.join(timeout=900)
    assert not job.is_alive()
    assert killed == ["ShardActor", "TeacherActor"], "the job ended before its workers could be killed"
    assert result["labelset_id"] != first["labelset_id"] and result["shards_failed"] == {}
    assert result["shards_done"] == result["shards_labeled"] == 1
    assert_exactly_once(result["labels"], str(world / "images"))
    assert not [p for p in Path(result["labels"]).iterdir() if ".tmp-" in p.name]   # leftovers cleaned
    assert Path(first["labels"], "00000.tar.gz").read_bytes() == old_labels    # the old set is untouched
    assert assert_exactly_once(first["labels"], str(world / "images")) == counts   # and reads as before
    marker = read_marker(result["labels"], "00000")
    assert marker["phrase_cache_hits"] == marker["ok"] and marker["phrase_cache_misses"] == 0

    listing = cli_json(capsys, "labels", "ls", str(Path(first["labels"]).parent))
    assert listing["labelsets"] == 2 and listing["complete"] == 2
    rows = {row["labelset_id"]: row for row in listing["rows"]}
    assert rows[first["labelset_id"]]["samples"] == rows[result["labelset_id"]]["samples"] == 40
    assert rows[result["labelset_id"]]["teacher"] == Path(teachers[1]).name
    assert cli_json(capsys, "label", *common, "--teacher", teachers[1])["shards_labeled"] == 0


def test_refused_up_front_with_the_file_and_the_fix(tmp_path, teachers):
    world = make_world(tmp_path / "world", samples=24, per_shard=8)

    def refused(**changes) -> str:
        options = dict(images=str(world / "images"), regions=str(world / "regions"), out=str(tmp_path / "o"),
                       teacher=teachers[0])
        with pytest.raises(SgaError) as info:
            run_label_job(LabelJobConfig(**{**options, **changes}))
        return str(info.value)

    message = refused(teacher=str(tmp_path / "no-such-teacher"))
    assert "no-such-teacher" in message and "--teacher" in message

    regions = tmp_path / "regions"
    regions.mkdir()
    for name in ("00000.tar", "00001.tar", "00007.tar", "regions.json"):
        (regions / name).write_bytes((world / "regions" / name).read_bytes() if name != "00007.tar" else b"")
    message = refused(regions=str(regions))
    assert "00002.tar" in message and "00007.tar" in message and "--regions" in message

    stray = tmp_path / "o3"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    message = refused(out=str(stray))
    assert "notes.txt" in message and "--out" in message

    newer = tmp_path / "o4" / "abc"
    newer.mkdir(parents=True)
    (newer / "labelset.json").write_text(json.dumps({
        "teacher_name": "x", "teacher_fingerprint": "y", "extractor": "z", "score_floor": 0.0,
        "score_threshold": 0.5, "iou_threshold": 0.5, "top_k": 1, "schema_version": 99, "created_at": "t"}))
    message = refused(out=str(tmp_path / "o4"))
    assert "labelset.json" in message and "schema" in message

    assert sga(["label", "--images", str(world / "images"), "--cache", str(tmp_path)]) == 2


def test_the_embedded_default_starts_its_own_local_ray_instance(tmp_path):
    """``sga label`` as a user types it: no Ray running in its process and no address, so it starts (and
    stops) a local instance of its own, and prints the summary the issue asks for as ``key  value`` lines."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "label", "--cache", str(tmp_path / "cache"),
                          "--world-samples", "24", "--num-cpus", "2"],
                         env={**env, "SGA_PROGRESS": "0"}, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = dict(line.split(None, 1) for line in run.stdout.splitlines() if len(line.split(None, 1)) == 2)
    assert int(summary["samples"]) == 24 and int(summary["shards_done"]) == 1
    assert int(summary["ok"]) + int(summary["errors"]) == 24 and int(summary["phrases"]) > 0
    assert int(summary["positives"]) > 0 and float(summary["samples_per_s"]) > 0
    assert 0 <= float(summary["precision"]) <= 1 and 0 <= float(summary["recall"]) <= 1
    assert int(summary["teachers"]) == 1 and int(summary["shard_workers"]) == 1


@pytest.mark.parametrize(("options", "cpus", "gpus", "pending", "expected"), [
    ({}, 2, 0, 10, (1, 1)),                                           # this machine: one of each
    ({}, 64, 0, 100, (56, 8)),                                        # ~one shard worker per 8 CPUs
    ({}, 16, 0, 1, (14, 1)),                                          # never more workers than shards
    ({"gpus_per_worker": 1}, 32, 4, 100, (4, 28)),                    # a teacher per GPU, spare CPUs feed
    ({"gpus_per_worker": 0.5}, 32, 4, 100, (8, 24)),                  # two teachers share each GPU
    ({"gpus_per_worker": 1, "workers": 2, "shard_workers": 3}, 32, 4, 100, (2, 3)),   # fixed by hand
])
def test_workers_are_sized_to_the_cluster(options, cpus, gpus, pending, expected):
    config = LabelJobConfig(images="i", regions="r", out="o", **options)
    sized = size_workers(config, cpus, gpus, pending)
    assert (sized.teachers, sized.shard_workers) == expected


def test_asking_for_gpus_on_a_cluster_without_them_is_refused():
    with pytest.raises(SgaError, match="--gpus-per-worker 0"):
        size_workers(LabelJobConfig(images="i", regions="r", out="o", gpus_per_worker=1), 8, 0, 4)
