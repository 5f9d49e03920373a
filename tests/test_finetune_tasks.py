"""Fine-tuning task readers, targets and metrics on a real synthetic world's task files and region shards."""

from __future__ import annotations

import json
import os
import shutil
from itertools import combinations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from shards.boxes import box_iou
from shards.regions import RegionShardWriter, iter_region_shard, read_regions_info, write_regions_info
from shards.synthetic.world import WorldConfig, build_world
from student.config import StudentConfig
from student.finetune.base import build_task, task_names
from student.finetune.data import InputEncoder, RegionStore
from student.finetune.refexp import HIT_IOU, soft_targets
from student.finetune.vcr import detokenize
from student.finetune.vqa import AnswerVocab, answer_score, soft_scores
from student.tokenizer import load_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ft") / "world")
    build_world(WorldConfig(samples=4, seed=3, samples_per_shard=20, task_samples=40), root,
                show_progress=False)
    return root


@pytest.fixture(scope="module")
def store(world):
    return RegionStore(os.path.join(world, "tasks", "regions"))


@pytest.fixture(scope="module")
def encode(store):
    tok = load_tokenizer()
    config = StudentConfig.tiny(vocab_size=len(tok), feature_dim=store.info["feature_dim"])
    return InputEncoder(tok, config, 40)


def _json(world, *parts):
    with open(os.path.join(world, "tasks", *parts)) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------- formulas
def _leave_one_out(count: int, n: int = 10) -> float:
    """VQA accuracy by its definition: mean over the n annotator subsets of size n-1 of min(1, matches/3)."""
    humans = [1] * count + [0] * (n - count)
    return float(np.mean([min(1.0, sum(s) / 3) for s in combinations(humans, n - 1)]))


@pytest.mark.parametrize("count,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_answer_score_is_the_butd_table_and_the_leave_one_out_metric(count, expected):
    assert answer_score(count) == pytest.approx(expected)
    assert answer_score(count) == pytest.approx(_leave_one_out(count))


@given(st.lists(st.sampled_from(["yes", "no", "Yes ", "2", "two"]), min_size=10, max_size=10))
def test_soft_scores_count_normalised_answers(answers):
    scores = soft_scores(answers)
    normalised = [a.strip().lower() for a in answers]
    assert set(scores) == set(normalised)
    for answer, score in scores.items():
        assert score == pytest.approx(_leave_one_out(normalised.count(answer)))


def test_refexp_target_keeps_iou_from_the_threshold_up():
    iou = np.array([0.0, 0.49, 0.5, 0.8], np.float32)
    assert soft_targets(iou).tolist() == pytest.approx([0.0, 0.0, 0.5, 0.8])


def test_detokenize_reads_vcr_object_references():
    assert detokenize(["is", [0, 2], "happy", "?"], ["person", "dog", "cat"]) == "is person cat happy ?"


# -------------------------------------------------------------------------------------------- readers
def test_every_task_is_registered():
    assert task_names() == ["refexp", "vcr_qa", "vcr_qar", "vqa"]


def test_refexp_items_match_the_file_and_their_regions(world, store):
    task = build_task("refexp", os.path.join(world, "tasks"), store)
    items = task.load("train")
    entries = _json(world, "refexp", "train.json")
    assert len(items) == len(entries) > 0 and task.dropped == {}
    for item, entry in zip(items, entries):
        assert item.expression == entry["expression"] and item.key == entry["image_key"]
        expected = box_iou(np.asarray(entry["box"], np.float32)[None], store[item.key].boxes)[0]
        np.testing.assert_allclose(item.iou, expected, rtol=1e-6)


def test_vqa_items_targets_and_vocabulary(world, store):
    task = build_task("vqa", os.path.join(world, "tasks"), store)
    items = task.load("train")
    questions = _json(world, "vqa", "v2_OpenEnded_synthetic_train_questions.json")["questions"]
    annotations = {a["question_id"]: a for a in
                   _json(world, "vqa", "v2_synthetic_train_annotations.json")["annotations"]}
    assert [it.question_id for it in items] == [q["question_id"] for q in questions]
    for item, q in zip(items, questions):
        assert item.key == f"{q['image_id']:09d}"            # image_id is int(key)
        majority = annotations[q["question_id"]]["multiple_choice_answer"]
        assert item.scores[majority] == max(item.scores.values())
    vocab = AnswerVocab.from_items(items)
    counts = [sum(it.majority == a for it in items) for a in vocab.answers]
    assert counts == sorted(counts, reverse=True) and set(vocab.answers) == {it.majority for it in items}
    targets = vocab.targets(items)
    for b, item in enumerate(items):
        for answer, i in vocab.index.items():
            assert targets[b, i].item() == pytest.approx(item.scores.get(answer, 0.0))


def test_vcr_sequences_pair_question_and_choices(world, store, encode):
    for name in ("vcr_qa", "vcr_qar"):
        task = build_task(name, os.path.join(world, "tasks"), store)
        items = task.load("train")
        assert items and task.dropped == {}
        batch = task.batch(items[:3], encode)
        assert batch["input_ids"].shape[0] == 12 and batch["label"].shape == (3,)
        texts = task.texts(items[0], "[SEP]")
        choices = items[0].answers if name == "vcr_qa" else items[0].rationales
        assert [t.split(" [SEP] ")[1] for t in texts] == choices
        if name == "vcr_qar":
            assert all(items[0].answers[items[0].answer_label] in t for t in texts)
        sep = encode.tokenizer.sep_token_id
        # Every sequence holds the separator between its two segments and at its end.
        assert ((batch["input_ids"] == sep).sum(1) == 2).all()


def test_items_without_regions_are_counted_not_fatal(world, tmp_path):
    regions = str(tmp_path / "regions")
    src = os.path.join(world, "tasks", "regions")
    info = read_regions_info(src)
    write_regions_info(regions, info["feature_dim"], info["num_classes"], info["class_names"], "test")
    shard = sorted(n for n in os.listdir(src) if n.endswith(".tar"))[0][:-4]
    records = list(iter_region_shard(src, shard))
    missing = records[0].key
    with RegionShardWriter(regions, shard) as writer:
        for rec in records[1:]:
            writer.write(rec)
    store = RegionStore(regions)
    for name in ("refexp", "vqa", "vcr_qa"):
        task = build_task(name, os.path.join(world, "tasks"), store)
        items = [it for split in ("train", "val", "test") for it in task.load(split)]
        assert all(it.key != missing for it in items)
        assert task.dropped.get("no_regions", 0) > 0


def test_damaged_region_shard_keeps_the_samples_before_the_damage(world, tmp_path):
    src = os.path.join(world, "tasks", "regions")
    dst = str(tmp_path / "regions")
    shutil.copytree(src, dst)
    shard = sorted(n for n in os.listdir(dst) if n.endswith(".tar"))[0]
    full = RegionStore(src)
    path = os.path.join(dst, shard)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    store = RegionStore(dst)
    assert store.errors["damaged_region_shards"] == 1
    assert 0 < len(store.records) < len(full.records)


# ------------------------------------------------------------------------------------------- metrics
def _refexp_batch(world, store, encode):
    task = build_task("refexp", os.path.join(world, "tasks"), store)
    items = task.load("val")[:6]
    return task, items, task.batch(items, encode)


def test_refexp_hit_rule_is_iou_at_least_one_half(world, store, encode):
    task, items, batch = _refexp_batch(world, store, encode)
    iou = batch["iou"]
    # Place the top logit on a chosen proposal per item and compare with the hit rule by hand.
    for pick in ("best", "worst"):
        target = iou.argmax(1) if pick == "best" else iou.masked_fill(iou < 0, 9).argmin(1)
        logits = torch.full(iou.shape, -5.0)
        logits[torch.arange(len(items)), target] = 5.0
        expected = [float(iou[b, t] >= HIT_IOU) for b, t in enumerate(target.tolist())]
        assert task.scores(logits, batch).tolist() == expected
    # An IoU of exactly 0.5 is a hit; just below is not.
    batch["iou"] = torch.full_like(iou, 0.0)
    batch["iou"][:, 0] = torch.tensor([0.5, 0.4999, 0.5, 0.4999, 0.5, 0.4999])
    logits = torch.zeros_like(iou)
    logits[:, 0] = 1.0
    assert task.scores(logits, batch).tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]


def test_refexp_loss_ignores_padding(world, store, encode):
    task, _, batch = _refexp_batch(world, store, encode)
    logits = torch.zeros(batch["iou"].shape, requires_grad=True)
    task.loss(logits, batch).backward()
    padding = ~batch["region_mask"][:, 1:]
    assert padding.any() and (logits.grad[padding] == 0).all() and (logits.grad[~padding] != 0).all()


def test_vqa_accuracy_is_the_soft_score_of_the_top_answer(world, store, encode):
    task = build_task("vqa", os.path.join(world, "tasks"), store)
    items = task.load("train")
    task.vocab = AnswerVocab.from_items(items)
    batch = task.batch(items[:5], encode)
    logits = torch.randn(5, len(task.vocab), generator=torch.Generator().manual_seed(0))
    picked = [task.vocab.answers[i] for i in logits.argmax(1).tolist()]
    expected = [it.scores.get(a, 0.0) for it, a in zip(items[:5], picked)]
    assert task.scores(logits, batch).tolist() == pytest.approx(expected)
