"""``sga label`` tells the truth about its outcome: region shards made for other images are refused before
anything runs (exit 2), a job that rejects more than ``--max-error-rate`` of its samples exits 3 with its
commonest reasons counted, and ``sga labels ls`` calls such a label set failed, never complete."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
from pipeline_fixtures import make_world

from pipeline.cli import main as sga
from shards.manifest import read_manifest


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("outcome") / "world", samples=16, per_shard=8)


def _label(capsys, world, out, *extra) -> tuple[int, dict, str]:
    capsys.readouterr()
    rc = sga(["label", "--images", str(world / "images"), "--regions", str(world / "regions"),
              "--out", str(out), "--teacher", "tiny", *extra, "--json"])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return rc, (json.loads(lines[-1]) if lines else {}), captured.err


def test_regions_of_other_images_are_refused_naming_both_uris(tmp_path, world, capsys):
    regions = tmp_path / "regions"
    shutil.copytree(world / "regions", regions)
    # Same shard names, but shard 00000's regions are those of 00001's images: no key in common.
    shutil.copy(world / "regions" / "00001.tar", regions / "00000.tar")
    out = tmp_path / "out"
    capsys.readouterr()
    rc = sga(["label", "--images", str(world / "images"), "--regions", str(regions), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(world / "images") in err and str(regions) in err and "--regions" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_job_over_the_error_rate_exits_3_and_is_listed_failed(tmp_path, world, capsys, ray_instance):
    out = tmp_path / "out"
    rc, summary, err = _label(capsys, world, out, "--max-caption-chars", "1")
    assert rc == 3, err
    assert "--max-error-rate" in err
    table = read_manifest(summary["labels"]).to_pylist()
    rejected = [r for r in table if r["status"] != "ok"]
    assert summary["errors"] == len(rejected) == 16 and summary["error_rate"] == 1.0
    counts = Counter((r["stage"], r["reason"]) for r in rejected).most_common(5)
    assert [(t["stage"], t["reason"], t["count"]) for t in summary["top_errors"]] == \
        [(stage, reason, n) for (stage, reason), n in counts]
    assert summary["top_errors"][0]["stage"] == "caption"

    assert sga(["labels", "ls", str(out), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (row,) = listing["rows"]
    assert row["status"] == "failed" and not row["complete"] and listing["failed"] == 1
    assert row["errors"] == 16 and row["ok"] == 0 and row["max_error_rate"] == 0.5

    # The same inputs with a limit that allows them: the rerun labels nothing anew and exits 0.
    rc, summary, err = _label(capsys, world, out, "--max-caption-chars", "1", "--max-error-rate", "1")
    assert rc == 0, err


def test_a_normal_job_exits_0_and_is_complete(tmp_path, world, capsys, ray_instance):
    out = tmp_path / "out"
    rc, summary, err = _label(capsys, world, out)
    assert rc == 0, err
    assert summary["error_rate"] < 0.5 and summary["ok"] + summary["errors"] == 16
    assert sga(["labels", "ls", str(out), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert row["status"] == "complete" and row["complete"]
