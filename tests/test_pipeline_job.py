"""``sga label`` on a real local Ray instance (one per module, 2 CPUs): the whole job, no-op rerun, a new
teacher beside the old labels, ``labels ls``/``inspect``/``report``, killed workers, up-front refusals."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from pipeline_fixtures import assert_exactly_once, make_world, teacher_spec

from pipeline.cli import main as sga
from pipeline.job import run_label_job
from pipeline.plan import LabelJobConfig
from shards import fs
from shards.errors import SgaError
from shards.manifest import read_marker


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"), samples=48, per_shard=8)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teachers")
    return teacher_spec(tmp, seed=0), teacher_spec(tmp, seed=1)


def config(world: Path, out: Path, teacher: str, **kwargs) -> LabelJobConfig:
    options = dict(gt=str(world / "gt"), workers=1, shard_workers=1, batch_size=4, score_floor=0.0,
                   score_threshold=0.01)
    return LabelJobConfig(images=str(world / "images"), regions=str(world / "regions"), out=str(out),
                          teacher=teacher, **{**options, **kwargs})


def cli_json(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert sga([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _ok_rows(labelset: str) -> list[dict]:
    from shards.manifest import read_manifest

    return [r for r in read_manifest(labelset).to_pylist() if r["status"] == "ok"]


def actor_pids(class_name: str) -> list[int]:
    """PIDs of Ray worker processes running actors of ``class_name`` (Ray names them ``ray::Class...``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(f"ray::{class_name}".encode()):
                pids.append(int(entry.name))
    return pids


def run_with_kills(cfg: LabelJobConfig, labelset_markers, kills: list[tuple[str, int]]) -> tuple[dict, list]:
    """Run the job in a thread and SIGKILL one actor of each ``(class, after_n_markers)`` once that many
    shards are done and some are still pending. Returns the summary and the kills that happened."""
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(run_label_job(cfg)))
    job.start()
    done, deadline = [], time.time() + 120
    for victim, after in kills:
        while labelset_markers() < after and job.is_alive() and time.time() < deadline:
            time.sleep(0.02)
        pids = actor_pids(victim)
        if pids and job.is_alive():
            os.kill(pids[0], signal.SIGKILL)
            done.append((victim, labelset_markers()))
    job.join(timeout=240)
    assert not job.is_alive()
    return result, done


def test_job_noop_tools_and_new_teacher_with_killed_workers(ray_instance, world, teachers, tmp_path, capsys):
    out = tmp_path / "labels"
    first = run_label_job(config(world, out, teachers[0]))
    shards = len(list((world / "images").glob("*.tar")))
    assert first["shards"] == first["shards_done"] == first["shards_labeled"] == shards
    assert first["samples"] == first["ok"] + first["errors"] == 48 and first["shards_failed"] == {}
    assert first["errors"] == sum(first["error_stages"].values())
    assert 0 <= first["precision"] <= 1 and 0 <= first["recall"] <= 1
    assert 0 < first["teacher_busy_fraction"] <= 1 and first["samples_per_s"] > 0
    counts = assert_exactly_once(first["labels"], str(world / "images"))
    assert counts == {"ok": first["ok"], "error": first["errors"]}

    start = time.perf_counter()
    again = run_label_job(config(world, out, teachers[0]))
    assert again["shards_skipped"] == shards and again["shards_labeled"] == 0 and "teachers" not in again
    assert time.perf_counter() - start < 5
    assert {k: again[k] for k in ("samples", "ok", "phrases", "positives")} == \
        {k: first[k] for k in ("samples", "ok", "phrases", "positives")}

    key = next(r["key"] for r in _ok_rows(first["labels"]) if r["n_phrases"] > 0)
    png = tmp_path / "inspect.png"
    shown = cli_json(capsys, "inspect", first["labels"], "--key", key, "--out", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shown["phrases"]
    report = cli_json(capsys, "report", str(out), "--out", str(tmp_path / "report"))
    page = (tmp_path / "report" / "index.html").read_text()
    assert report["samples"] == 48 and "Error reasons" in page and first["labelset_id"] in page
    assert all((tmp_path / "report" / name).read_bytes()[:4] == b"\x89PNG" for name in report["plots"])

    # A new teacher labels into a new label set beside the old one, reusing the cached phrases, while a
    # shard worker and then a teacher are killed mid-job: every sample still ends up labelled once.
    def new_markers() -> int:
        return sum(1 for d in out.iterdir() if d.name not in ("_phrases", Path(first["labels"]).name)
                   for _ in d.glob("*_stats.json"))

    other, killed = run_with_kills(config(world, out, teachers[1]), new_markers,
                                   [("ShardActor", 1), ("TeacherActor", 3)])
    assert [v for v, _ in killed] == ["ShardActor", "TeacherActor"], f"the job ended too soon: {killed}"
    assert all(n < shards for _, n in killed)
    assert other["labelset_id"] != first["labelset_id"] and other["shards_failed"] == {}
    assert other["shards_done"] == other["shards_labeled"] == shards
    assert_exactly_once(other["labels"], str(world / "images"))
    assert fs.exists(fs.join(first["labels"], "00000.tar"))           # the old label set stays readable
    marker = read_marker(other["labels"], "00005")
    assert marker["phrase_cache_hits"] == marker["ok"] and marker["phrase_cache_misses"] == 0

    listing = cli_json(capsys, "labels", "ls", str(out))
    assert listing["labelsets"] == 2 and listing["complete"] == 2
    ids = {row["labelset_id"]: row for row in listing["rows"]}
    assert ids[first["labelset_id"]]["samples"] == 48 and ids[other["labelset_id"]]["shards_done"] == shards
    # What the killed writers left behind is invisible to readers and cleaned up by the next run.
    assert run_label_job(config(world, out, teachers[1]))["shards_labeled"] == 0
    assert not [p for p in Path(other["labels"]).iterdir() if ".tmp-" in p.name]


def test_refused_up_front_with_the_file_and_the_fix(tmp_path, world, teachers):
    def refused(cfg) -> str:
        with pytest.raises(SgaError) as info:
            run_label_job(cfg)
        return str(info.value)

    message = refused(config(world, tmp_path / "o1", str(tmp_path / "no-such-teacher")))
    assert "no-such-teacher" in message and "--teacher" in message

    regions = tmp_path / "regions"
    regions.mkdir()
    for name in ("00000.tar", "00001.tar", "00007.tar", "regions.json"):
        (regions / name).write_bytes((world / "regions" / name).read_bytes() if name != "00007.tar" else b"")
    cfg = config(world, tmp_path / "o2", teachers[0])
    cfg.regions = str(regions)
    message = refused(cfg)
    assert "00002.tar" in message and "00007.tar" in message and "--regions" in message

    stray = tmp_path / "o3"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    message = refused(config(world, stray, teachers[0]))
    assert "notes.txt" in message and "--out" in message

    newer = tmp_path / "o4" / "abc"
    newer.mkdir(parents=True)
    (newer / "labelset.json").write_text(json.dumps({
        "teacher_name": "x", "teacher_fingerprint": "y", "extractor": "z", "score_floor": 0.0,
        "score_threshold": 0.5, "iou_threshold": 0.5, "top_k": 1, "schema_version": 99, "created_at": "t"}))
    message = refused(config(world, tmp_path / "o4", teachers[0]))
    assert "labelset.json" in message and "schema" in message
