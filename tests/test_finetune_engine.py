"""The fine-tuning loop, checkpoint loading and ``sga finetune`` on a real world and a real pretraining."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from student_fixtures import labels_from_world

from pipeline.cli import main as sga
from shards.errors import SgaError
from shards.synthetic.world import WorldConfig, build_world
from student.finetune.data import RegionStore
from student.finetune.engine import FinetuneConfig, finetune, subset
from student.finetune.model import load_encoder
from student.launch import DataConfig, TrainConfig
from student.train import train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fte")
    world = str(root / "world")
    build_world(WorldConfig(samples=24, seed=5, samples_per_shard=12, task_samples=60), world,
                show_progress=False)
    return {"root": root, "world": world, "tasks": os.path.join(world, "tasks"),
            "regions": os.path.join(world, "tasks", "regions")}


@pytest.fixture(scope="module")
def pretrained(world):
    """A real (short) two-stream pretraining run on ground-truth labels."""
    labels = labels_from_world(world["world"], str(world["root"] / "labels"))
    out = str(world["root"] / "pretrain")
    cfg = TrainConfig(out=out, data=DataConfig(regions=os.path.join(world["world"], "regions"), labels=labels,
                                               batch_size=8), preset="tiny", model={"encoder": "two"},
                      steps=4, global_batch=8, lr=1e-3, checkpoint_every=2, device="cpu", threads=1,
                      tensorboard=False)
    train(cfg)
    return out


def _cfg(world, **kw):
    base = dict(task="refexp", task_dir=world["tasks"], regions=world["regions"], lr=2e-3, batch_size=16,
                epochs=2, show_progress=False)
    return FinetuneConfig(**{**base, **kw})


def test_subset_is_a_seeded_share_in_order():
    items = list(range(80))
    part = subset(items, 0.25, seed=3)
    assert len(part) == 20 and part == sorted(part) and part == subset(items, 0.25, seed=3)
    assert part != subset(items, 0.25, seed=4)
    assert subset(items, 1.0, 0) == items and len(subset(items, 0.001, 0)) == 1
    with pytest.raises(SgaError):
        subset(items, 0.0, 0)


def test_encoder_is_restored_bit_for_bit(world, pretrained):
    store = RegionStore(world["regions"])
    weights = load_file(os.path.join(pretrained, "model.safetensors"))
    for ckpt in (pretrained, os.path.join(pretrained, "checkpoints", "step_00000002")):
        config, encoder = load_encoder(ckpt, store.info, 300)
        assert config.encoder == "two"
        step = load_file(os.path.join(ckpt, "model.safetensors"))
        for name, tensor in encoder.state_dict().items():
            assert torch.equal(tensor, step[f"encoder.{name}"]), name
    # The final export is the last step, not the step-2 checkpoint.
    step2 = load_file(os.path.join(pretrained, "checkpoints", "step_00000002", "model.safetensors"))
    assert any(not torch.equal(weights[k], step2[k]) for k in weights)


def test_wrong_feature_width_is_refused(world, pretrained):
    store = RegionStore(world["regions"])
    with pytest.raises(SgaError, match="region features"):
        load_encoder(pretrained, {**store.info, "feature_dim": store.info["feature_dim"] + 1}, 300)
    with pytest.raises(SgaError, match="neither"):
        load_encoder(str(world["root"]), store.info, 300)


@pytest.mark.parametrize("task", ["refexp", "vqa", "vcr_qa", "vcr_qar"])
def test_finetuning_learns_and_is_deterministic(world, pretrained, task):
    store = RegionStore(world["regions"])
    cfg = _cfg(world, task=task, checkpoint=pretrained, epochs=6, batch_size=8 if "vcr" in task else 16)
    first, second = finetune(cfg, store), finetune(cfg, store)
    assert first["loss_last_epoch"] < first["loss_first_epoch"]
    for key in ("loss_first_epoch", "loss_last_epoch", "val", "test"):
        assert first[key] == second[key], key
    metric = first["metric"]
    assert 0.0 <= first["test"][metric] <= 1.0 and first["test"]["n"] > 0
    assert first["encoder"] == "two" and first["steps"] == 6 * first["steps_per_epoch"]


def test_fraction_trains_on_fewer_items_and_steps(world):
    full = finetune(_cfg(world, epochs=1))
    eighth = finetune(_cfg(world, epochs=1, fraction=0.125))
    assert eighth["train_items"] == round(full["train_items"] / 8)
    assert eighth["steps"] < full["steps"]


def test_cli_runs_both_vcr_subtasks_and_writes_summaries(world, tmp_path, capsys):
    out = str(tmp_path / "ft")
    code = sga(["finetune", "--task", "vcr", "--checkpoint", "none", "--world", world["world"],
                "--epochs", "1", "--batch-size", "8", "--lr", "1e-3", "--model", "encoder=two",
                "--out", out, "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary["runs"]) == {"vcr_qa", "vcr_qar"}
    for name in ("vcr_qa", "vcr_qar"):
        with open(os.path.join(out, name, "finetune_summary.json")) as f:
            written = json.load(f)
        assert written["test"] == summary["runs"][name]["test"]
        assert written["encoder"] == "two" and written["checkpoint"] is None
        assert os.path.exists(os.path.join(out, name, "model.safetensors"))
    assert summary["vcr_qa_test"] == summary["runs"]["vcr_qa"]["test"]["accuracy"]


def test_cli_refuses_missing_inputs(world, capsys):
    assert sga(["finetune", "--task", "refexp", "--checkpoint", "none"]) == 2
    assert "--world" in capsys.readouterr().err
    assert sga(["finetune", "--task", "refexp", "--checkpoint", "none", "--task-dir", world["world"],
                "--regions", world["regions"]]) == 2
    assert "refexp/" in capsys.readouterr().err
