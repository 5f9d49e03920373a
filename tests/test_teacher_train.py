"""`sga teacher train` end to end on a small generated world: a loadable teacher directory, exact resume,
and the guards on changed settings."""

import dataclasses
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

import teacher
from shards.errors import SgaError
from shards.synthetic.world import WorldConfig, build_world
from teacher import GroundingInput, load_teacher
from teacher.train import train
from teacher.train_config import TrainConfig, lr_at
from teacher.worlddata import iter_world

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_world")
    build_world(WorldConfig(samples=60, seed=7, task_samples=0), str(out), show_progress=False)
    return str(out)


def _config(world: str, out, **overrides) -> TrainConfig:
    # decay_start=1.0: a constant lr after warm-up, so --steps may grow on resume.
    small = dict(steps=4, batch_size=4, val_samples=8, short_side=32, max_size=64, vocab_size=300,
                 backbone_widths=(8, 16), d_model=32, nheads=2, enc_layers=1, dec_layers=2,
                 dim_feedforward=64, num_queries=4, warmup_steps=2, decay_start=1.0, eval_every=2,
                 checkpoint_every=2, log_every=2, backbone_pretrain_steps=2, backbone_lr_ratio=1.0)
    return TrainConfig(world=world, out=str(out), **{**small, **overrides})


def _weights(out) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(out / "model.safetensors"))


def test_train_writes_a_teacher_and_resumes_exactly(world, tmp_path):
    straight = tmp_path / "straight"
    summary = train(_config(world, straight), show_progress=False)
    assert summary["steps"] == 4 and summary["val_images"] == 8
    assert 0.0 <= summary["val_recall_at_1"] <= 1.0
    log = [json.loads(line) for line in (straight / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "eval" in r] == [2, 4]
    assert all(r["loss"] > 0 for r in log if "loss" in r)

    teacher = load_teacher(str(straight), score_floor=0.0, top_k=2)
    sample = next(iter_world(world))
    answer = teacher.ground([GroundingInput(sample.image, sample.caption,
                                            [(p.start, p.end) for p in sample.phrases])])[0]
    assert len(answer) == len(sample.phrases)

    assert [r["backbone_step"] for r in log if "backbone_step" in r] == [2, 2]   # a log line, then accuracy
    assert (straight / "train_state" / "backbone.safetensors").is_file()

    resumed = tmp_path / "resumed"
    train(_config(world, resumed, steps=2), show_progress=False)
    train(_config(world, resumed, steps=4), show_progress=False)   # continues from step 2
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)

    # Killed after the backbone stage, before the first checkpoint: the rerun reuses the stage's result.
    killed = tmp_path / "killed"
    train(_config(world, killed, steps=4, checkpoint_every=100), show_progress=False)
    (killed / "train_state" / "checkpoint.pt").unlink()
    train(_config(world, killed, steps=4, backbone_pretrain_steps=2), show_progress=False)
    c = _weights(killed)
    assert all(torch.equal(a[k], c[k]) for k in a)
    log = [json.loads(line) for line in (killed / "train_log.jsonl").read_text().splitlines()]
    assert sum("object_accuracy" in r for r in log) == 1                 # pretrained once, not twice
    # A cached stage of other settings is not reused: killed again, rerun with 3 pretraining steps.
    (killed / "train_state" / "checkpoint.pt").unlink()
    train(_config(world, killed, steps=4, backbone_pretrain_steps=3), show_progress=False)
    log = [json.loads(line) for line in (killed / "train_log.jsonl").read_text().splitlines()]
    assert sum("object_accuracy" in r for r in log) == 2
    assert any(not torch.equal(a[k], _weights(killed)[k]) for k in a)


def test_resume_refuses_changed_settings(world, tmp_path):
    out = tmp_path / "run"
    train(_config(world, out, steps=2), show_progress=False)
    with pytest.raises(SgaError, match="other settings"):
        train(_config(world, out, steps=4, lr=1e-3), show_progress=False)
    decaying = tmp_path / "decaying"
    train(_config(world, decaying, steps=2, decay_start=0.5), show_progress=False)
    with pytest.raises(SgaError, match="before the learning-rate decay"):
        train(_config(world, decaying, steps=4, decay_start=0.5), show_progress=False)


def test_checkpoints_from_before_a_new_setting_resume_at_its_default(world, tmp_path):
    out = tmp_path / "run"
    train(_config(world, out, steps=2), show_progress=False)
    path = out / "train_state" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    identity = json.loads(state["identity"])
    del identity["eos_coef"]                       # as written before --eos-coef existed
    state["identity"] = json.dumps(identity, sort_keys=True)
    torch.save(state, path)
    with pytest.raises(SgaError, match="other settings"):
        train(_config(world, out, steps=4, eos_coef=0.5), show_progress=False)
    assert train(_config(world, out, steps=4), show_progress=False)["steps"] == 4


def test_checkpoints_from_before_backbone_pretraining_resume_as_runs_without_it(world, tmp_path):
    out = tmp_path / "run"
    train(_config(world, out, steps=2, backbone_pretrain_steps=0), show_progress=False)
    path = out / "train_state" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    identity = json.loads(state["identity"])
    assert identity["backbone_lr_ratio"] == 1.0
    del identity["backbone_pretrain_steps"]        # as written before the stage existed (it then did not run)
    del identity["backbone_lr_ratio"]
    state["identity"] = json.dumps(identity, sort_keys=True)
    torch.save(state, path)
    with pytest.raises(SgaError, match="other settings"):
        train(_config(world, out, steps=4, backbone_pretrain_steps=2), show_progress=False)
    with pytest.raises(SgaError, match="other settings"):
        train(_config(world, out, steps=4, backbone_pretrain_steps=0, backbone_lr_ratio=0.1),
              show_progress=False)
    assert train(_config(world, out, steps=4, backbone_pretrain_steps=0), show_progress=False)["steps"] == 4
    assert not (out / "train_state" / "backbone.safetensors").exists()


def test_backbone_lr_ratio_scales_the_cnn_group_only(world, tmp_path):
    from teacher.train import _optimizer

    model = torch.nn.Module()
    model.backbone = torch.nn.Linear(2, 2)
    model.head = torch.nn.Linear(2, 2)
    optimizer = _optimizer(model, _config(world, tmp_path, backbone_lr_ratio=0.1))
    scales = [(g["lr_scale"], len(g["params"])) for g in optimizer.param_groups]
    assert scales == [(1.0, 2), (0.1, 2)]
    assert len(_optimizer(model, _config(world, tmp_path)).param_groups) == 1


def test_lr_schedule_warms_up_holds_and_decays():
    config = TrainConfig(world="w", out="o", steps=100, lr=1.0, warmup_steps=10, decay_start=0.6,
                         min_lr_ratio=0.1)
    assert lr_at(config, 0) == pytest.approx(0.1)
    assert lr_at(config, 9) == pytest.approx(1.0)
    assert lr_at(config, 59) == 1.0
    assert 0.1 < lr_at(config, 80) < 1.0
    assert lr_at(config, 100) == pytest.approx(0.1)
    later = [lr_at(config, s) for s in range(60, 101)]
    assert later == sorted(later, reverse=True)
    assert dataclasses.replace(config, steps=200).identity() != config.identity()


def test_a_second_stage_starts_from_the_first_stages_weights(world, tmp_path):
    first = tmp_path / "first"
    train(_config(world, first), show_progress=False)
    # Zero steps of a second stage: its model is exactly the first stage's, with the first's tokenizer.
    second = tmp_path / "second"
    second_stage = dict(init=str(first), backbone_pretrain_steps=0)
    train(_config(world, second, steps=0, eos_coef=0.5, dropout=0.0, **second_stage), show_progress=False)
    a, b = _weights(first), _weights(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (second / "tokenizer" / "tokenizer.json").read_bytes() == \
        (first / "tokenizer" / "tokenizer.json").read_bytes()
    # Training on from there changes the weights; other sizes are refused with the fix.
    train(_config(world, tmp_path / "third", steps=2, eos_coef=0.5, **second_stage), show_progress=False)
    c = _weights(tmp_path / "third")
    assert any(not torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(SgaError, match="drop --backbone-pretrain-steps"):
        train(_config(world, tmp_path / "both", init=str(first)), show_progress=False)  # _config: 2 steps
    with pytest.raises(SgaError, match="do not fit"):
        train(_config(world, tmp_path / "bad", d_model=16, nheads=2, **second_stage), show_progress=False)


def test_cli_defaults_are_the_bundled_teachers_recipe_and_init_skips_cnn_pretraining():
    from pipeline.cli import build_parser
    from teacher.cli import train_config

    parse = build_parser().parse_args
    config = train_config(parse(["teacher", "train", "--world", "W", "--out", "T"]))
    assert (config.steps, config.backbone_pretrain_steps, config.backbone_lr_ratio) == (6000, 600, 0.1)
    shipped = json.loads((Path(teacher.__file__).parent / "assets/tiny/teacher.json").read_text())
    assert shipped["info"]["train_config"] == config.identity()
    second = train_config(parse(["teacher", "train", "--world", "W", "--out", "T", "--init", "tiny"]))
    assert second.backbone_pretrain_steps == 0 and second.init == "tiny"
    asked = parse(["teacher", "train", "--world", "W", "--out", "T", "--init", "tiny",
                   "--backbone-pretrain-steps", "5"])
    assert train_config(asked).backbone_pretrain_steps == 5      # refused by train() with the fix


def test_two_torchrun_ranks_stay_in_step_and_resume_exactly(world, tmp_path):
    """`sga teacher train --nproc 2`: two real ranks each compute half of every batch; their weights are
    checked equal at every checkpoint (a rank that stepped on its own gradients fails the run), and a resumed
    two-rank run ends with the weights of an uninterrupted one."""
    from teacher.parallel import launch

    straight = tmp_path / "straight"
    summary = launch(_config(world, straight, nproc=2), show_progress=False)
    assert summary["nproc"] == 2 and summary["steps"] == 4 and summary["val_images"] == 8
    log = [json.loads(line) for line in (straight / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [2, 4]          # rank 0 logs, once per step
    assert [r["step"] for r in log if "eval" in r] == [2, 4]
    assert sum("object_accuracy" in r for r in log) == 1               # rank 0 pretrained, the other read it

    resumed = tmp_path / "resumed"
    launch(_config(world, resumed, nproc=2, steps=2), show_progress=False)
    launch(_config(world, resumed, nproc=2, steps=4), show_progress=False)
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    teacher = load_teacher(str(straight), score_floor=0.0, top_k=2)
    sample = next(iter_world(world))
    answer = teacher.ground([GroundingInput(sample.image, sample.caption,
                                            [(p.start, p.end) for p in sample.phrases])])[0]
    assert len(answer) == len(sample.phrases)

    with pytest.raises(SgaError, match="multiple of --nproc"):
        launch(_config(world, tmp_path / "odd", nproc=3), show_progress=False)


def test_frozen_cnn_stages_keep_their_pretrained_weights(world, tmp_path):
    from teacher.worlddata import world_captions

    out = tmp_path / "frozen"
    config = _config(world, out, backbone_frozen_stages=1, long_captions="clauses")
    summary = train(config, show_progress=False)
    assert summary["train_examples"] >= summary["train_images"] == len(world_captions(world)) - 8
    pretrained = safetensors.torch.load_file(str(out / "train_state" / "backbone.safetensors"))
    trained = _weights(out)
    convs = [k for k in pretrained if k.endswith(".0.weight")]             # the conv of every block
    assert {k.split(".")[1] for k in convs} == {"0", "1"}
    for key in convs:
        same = torch.equal(pretrained[key], trained["backbone.0.body." + key])
        assert same == key.startswith("stages.0."), key
    with pytest.raises(SgaError, match="has 2 stages"):
        train(_config(world, tmp_path / "bad", backbone_frozen_stages=3), show_progress=False)
    with pytest.raises(SgaError, match="choose truncate or clauses"):
        train(_config(world, tmp_path / "bad", long_captions="wrap"), show_progress=False)


def test_long_training_captions_become_one_example_per_window():
    import numpy as np

    from teacher.preprocess import PreprocessConfig
    from teacher.tokenizer import train_tokenizer
    from teacher.traindata import make_examples
    from teacher.worlddata import GroundedSample, GTPhrase

    phrases = [f"the {c} circle" for c in ("red", "blue", "green", "pink", "black", "white")] * 3
    caption = " and ".join(phrases)
    truth, at = [], 0
    for i, phrase in enumerate(phrases):       # a box of its own per phrase
        start = caption.index(phrase, at)
        truth.append(GTPhrase(start, start + len(phrase), np.asarray([[3 * i, 0, 3 * i + 2, 10]], np.float32),
                              True))
        at = start + len(phrase)
    sample = GroundedSample("k", np.zeros((64, 64, 3), np.uint8), caption, truth)
    tokenizer = train_tokenizer([caption] * 5, vocab_size=300)
    pre = PreprocessConfig(short_side=32, max_size=64, size_multiple=4)

    (truncated,) = make_examples(sample, tokenizer, pre, max_text_len=16)
    windows = make_examples(sample, tokenizer, pre, max_text_len=16, windows=True)
    assert len(windows) > 1 and all(len(e.input_ids) <= 16 for e in windows)
    assert sum(len(e.boxes) for e in windows) == len(phrases) > len(truncated.boxes)   # each phrase once
    assert all(e.image is windows[0].image for e in windows)                          # one resized copy
    assert make_examples(GroundedSample("s", sample.image, "the red circle", truth[:1]), tokenizer, pre, 16,
                         windows=True)[0].boxes.shape == (1, 4)
