"""student.checkpoint: exact round trips, no pickle on disk, atomic completion, pruning and fallbacks; and
`sga pretrain` in one process: checkpoints, logs, final weights, and the guards around --resume."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from student_fixtures import make_shards

from shards import fs
from shards.errors import SgaError
from student import checkpoint as ckpt
from student.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
    weights_digest,
)
from student.config import StudentConfig
from student.logs import read_log
from student.model import build_model

torch.set_num_threads(1)


class Tied(torch.nn.Module):
    """Embedding + decoder sharing one weight (like BERT's MLM head), a LayerNorm and a bias."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 6)
        self.norm = torch.nn.LayerNorm(6)
        self.dec = torch.nn.Linear(6, 11)
        self.dec.weight = self.emb.weight

    def forward(self, ids):
        return self.dec(self.norm(self.emb(ids)))


def make(seed=0):
    torch.manual_seed(seed)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4) * 0.9 ** s)
    return model, opt, sched


def steps(model, opt, sched, n, start=0):
    for i in range(start, start + n):
        ids = torch.arange(i, i + 5) % 11
        loss = torch.nn.functional.cross_entropy(model(ids), (ids + 1) % 11)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def test_resumed_training_matches_uninterrupted_bit_for_bit(tmp_path):
    model, opt, sched = make()
    steps(model, opt, sched, 3)
    path = save_checkpoint(str(tmp_path), 3, model, opt, sched, {"seed": 0})
    steps(model, opt, sched, 4, start=3)

    fresh, fresh_opt, fresh_sched = make(seed=123)               # different init: everything must load
    state = load_checkpoint(path, fresh, fresh_opt, fresh_sched)
    assert state["step"] == 3 and state["meta"] == {"seed": 0}
    assert fresh.dec.weight is fresh.emb.weight                  # tying survives the load
    steps(fresh, fresh_opt, fresh_sched, 4, start=3)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh_sched.get_last_lr() == sched.get_last_lr()
    assert fresh_opt.param_groups[0]["betas"] == (0.9, 0.999)


def test_checkpoints_hold_only_safetensors_and_json(tmp_path):
    model, opt, sched = make()
    steps(model, opt, sched, 2)
    path = save_checkpoint(str(tmp_path), 2, model, opt, sched, {"seed": 0})
    assert sorted(os.listdir(path)) == ["model.safetensors", "optimizer.safetensors", "state.json"]
    weights = load_file(os.path.join(path, "model.safetensors"))
    assert "emb.weight" in weights and "dec.weight" not in weights   # the tied copy is stored once
    optim = load_file(os.path.join(path, "optimizer.safetensors"))
    assert {k.rsplit("/", 1)[1] for k in optim} == {"step", "exp_avg", "exp_avg_sq"}
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    assert state["scheduler"]["last_epoch"] == 2
    for name in os.listdir(path):
        with open(os.path.join(path, name), "rb") as f:
            assert not f.read(2).startswith(b"\x80"), f"{name} looks like a pickle"


def test_an_interrupted_save_leaves_the_previous_checkpoint_current(tmp_path, monkeypatch):
    model, opt, sched = make()
    first = save_checkpoint(str(tmp_path), 1, model, opt, sched, {})
    real_write = fs.write_bytes

    def crash_on_state(uri, data):
        if uri.endswith(ckpt.STATE_FILE):
            raise KeyboardInterrupt  # killed between the tensors and the state file
        real_write(uri, data)

    monkeypatch.setattr(ckpt.fs, "write_bytes", crash_on_state)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(tmp_path), 2, model, opt, sched, {})
    monkeypatch.setattr(ckpt.fs, "write_bytes", real_write)
    assert os.path.exists(os.path.join(tmp_path, "checkpoints", "step_00000002", "model.safetensors"))
    assert list_checkpoints(str(tmp_path)) == [1]
    assert latest_checkpoint(str(tmp_path)) == first
    with pytest.raises(SgaError, match="not a complete checkpoint"):
        load_checkpoint(os.path.join(tmp_path, "checkpoints", "step_00000002"), model)


def test_old_checkpoints_are_pruned_and_latest_falls_back(tmp_path):
    model, opt, sched = make()
    for step in (1, 2, 3, 4):
        save_checkpoint(str(tmp_path), step, model, opt, sched, {}, keep=2)
    assert list_checkpoints(str(tmp_path)) == [3, 4]
    assert latest_checkpoint(str(tmp_path)).endswith("step_00000004")
    with open(os.path.join(tmp_path, "checkpoints", "latest.json"), "w") as f:
        f.write("{not json")
    assert latest_checkpoint(str(tmp_path)).endswith("step_00000004")
    assert latest_checkpoint(str(tmp_path / "nothing-here")) is None


def test_weights_round_trip_into_a_ddp_free_model(tmp_path):
    model, _, _ = make(seed=1)
    uri = str(tmp_path / "w.safetensors")
    save_weights(uri, model, {"step": "7"})
    other, _, _ = make(seed=2)
    load_weights(uri, other)
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    broken = Tied()
    broken.extra = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="extra"):
        load_weights(uri, broken)                                  # strict: missing keys are an error


def pretrain(regions, labels, out, *extra) -> int:
    """``sga pretrain`` in this process (one rank, tiny model, a few steps)."""
    from pipeline.cli import main

    return main(["pretrain", "--regions", regions, "--labels", labels, "--out", str(out), "--nproc", "1",
                 "--threads", "1", "--device", "cpu", "--preset", "tiny", "--batch-size", "4",
                 "--global-batch", "8", "--workers", "0", "--steps", "3", "--checkpoint-every", "2", "--json",
                 *extra])


def test_pretrain_in_one_process_writes_checkpoints_logs_and_weights(tmp_path, capsys):
    import webdataset

    regions, labels = make_shards(str(tmp_path), [6, 5, 7])
    secure_before = os.environ.get("WDS_SECURE"), webdataset.utils.enforce_security
    assert pretrain(regions, labels, tmp_path / "run") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and summary["accum"] == 2 and summary["world_size"] == 1
    assert summary["wds_secure"] and summary["data"]["samples"] >= 3 * 8
    assert (os.environ.get("WDS_SECURE"), webdataset.utils.enforce_security) == secure_before
    assert list_checkpoints(str(tmp_path / "run")) == [2, 3]
    rows = read_log(str(tmp_path / "run" / "logs"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"mlm", "mrc", "itm", "gnd", "loss", "lr", "samples_per_s"} <= rows[0].keys()
    events = os.listdir(tmp_path / "run" / "logs" / "tensorboard")
    assert any(n.startswith("events.out.tfevents") for n in events)
    with open(tmp_path / "run" / "student_config.json") as f:
        model = build_model(StudentConfig.from_json(f.read()))
    load_weights(str(tmp_path / "run" / "model.safetensors"), model)
    assert weights_digest(model).hex()[:16] == summary["param_digests"][0]


def test_pretrain_refuses_to_overwrite_or_to_resume_with_other_settings(tmp_path, capsys):
    regions, labels = make_shards(str(tmp_path), [6, 5, 7])
    out = tmp_path / "run"
    assert pretrain(regions, labels, out) == 0
    capsys.readouterr()
    assert pretrain(regions, labels, out) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert pretrain(regions, labels, out, "--resume", "--seed", "1") == 2
    assert "seed differ" in capsys.readouterr().err
    assert pretrain(regions, labels, out, "--resume", "--steps", "5") == 0   # a longer schedule continues
    summary = json.loads(capsys.readouterr().out)
    assert summary["start_step"] == 3 and summary["steps"] == 5 and summary["resumed_from"].endswith("3")
    assert [r["step"] for r in read_log(str(out / "logs"))] == [1, 2, 3, 4, 5]
