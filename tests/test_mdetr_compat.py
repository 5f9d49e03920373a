"""MDETR re-implementation vs the official checkpoints' layout, and the checkpoint loaders.

The reference lists (``tests/assets/mdetr_reference/*_state_dict.json``: ``[key, shape]`` pairs, plus the
per-entry counts in ``mdetr_hub_entries_summary.json``) were produced by instantiating the official hub entry
points with random weights; each one must match ``build_mdetr(entry).state_dict()`` key for key, shape for
shape, in order.
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib

import pytest
import torch

from shards.errors import SgaError
from teacher.mdetr import build_mdetr
from teacher.mdetr.checkpoint import (
    convert_checkpoint,
    infer_entry,
    load_mdetr,
    load_mdetr_checkpoint,
    read_mdetr_config,
)

torch.set_num_threads(1)

REFERENCE = pathlib.Path(__file__).resolve().parent / "assets" / "mdetr_reference"
REFERENCE_FILES = sorted(REFERENCE.glob("mdetr_*_state_dict.json"))
STALE_KEY = "transformer.text_encoder.embeddings.position_ids"


def test_reference_files_present():
    # Guards the parametrisation below against silently running zero cases.
    assert REFERENCE.is_dir(), f"MDETR reference layouts not found at {REFERENCE}"
    assert {p.name for p in REFERENCE_FILES} >= {
        "mdetr_resnet101_state_dict.json", "mdetr_resnet101_refcocoplus_state_dict.json",
        "mdetr_efficientnetB3_state_dict.json", "mdetr_efficientnetB5_state_dict.json"}


@pytest.mark.parametrize("ref", REFERENCE_FILES, ids=lambda p: p.name.removesuffix("_state_dict.json"))
def test_state_dict_layout_matches_reference(ref):
    entry = ref.name.removesuffix("_state_dict.json")
    expected = [(k, list(shape)) for k, shape in json.loads(ref.read_text())]
    summary = json.loads((REFERENCE / "mdetr_hub_entries_summary.json").read_text())["entries"][entry]
    # The meta device gives the exact module tree without allocating 600-750 MB per model; the real
    # allocation path is exercised by the checkpoint test below.
    with torch.device("meta"):
        model = build_mdetr(entry)
    state = model.state_dict()
    assert [(k, list(v.shape)) for k, v in state.items()] == expected
    assert {v.dtype for v in state.values()} == {torch.float32}
    # Frozen batch norm terms are buffers, not parameters, as in the official model.
    assert sum(p.numel() for p in model.parameters()) == summary["n_parameters"]
    assert sum(v.numel() for v in state.values()) == summary["n_state_dict_elements"]
    assert model.backbone.num_channels == summary["backbone_num_channels"]
    # Stride 32: MDETR's 800x1066 evaluation size gives 25x34 = 850 image tokens for every backbone.
    with torch.device("meta"):
        images, image_mask = torch.zeros(1, 3, 800, 1066), torch.zeros(1, 800, 1066, dtype=torch.bool)
        features, mask, pos = model.backbone(images, image_mask)
    assert features.shape == (1, summary["backbone_num_channels"], 25, 34)
    assert mask.shape == (1, 25, 34) and pos.shape == (1, 256, 25, 34)


def _released_file(tmp_path, model_sd, ema_sd, name="ckpt.pth", **extra):
    """A file in the layout main.py writes: model, model_ema, optimizer, epoch and argparse args."""
    args = argparse.Namespace(backbone="timm_tf_efficientnet_b3_ns", ema=True, lr=1e-4,
                              output_dir=pathlib.PosixPath("/checkpoint/run"))
    optimizer = {"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(3)}},
                 "param_groups": [{"lr": 1e-4, "params": [0]}]}
    path = tmp_path / name
    torch.save({"model": model_sd, "model_ema": ema_sd, "optimizer": optimizer, "epoch": 20, "args": args,
                **extra}, path)
    return str(path)


def _with_stale_key(sd):
    return {**sd, STALE_KEY: torch.arange(514).unsqueeze(0)}


def test_released_efficientnet_b3_checkpoint_loads_strictly(tmp_path):
    source = build_mdetr("mdetr_efficientnetB3")
    model_sd = _with_stale_key(source.state_dict())
    # The EMA copy shares every storage except two tensors, which keeps the file at one model's size.
    ema_sd = dict(model_sd)
    ema_sd["class_embed.bias"] = model_sd["class_embed.bias"] + 1.0
    bn_key = "backbone.0.body.blocks.6.1.bn3.running_var"
    ema_sd[bn_key] = model_sd[bn_key] * 2
    del source
    path = _released_file(tmp_path, model_sd, ema_sd)

    loaded = load_mdetr_checkpoint(path)  # entry inferred from the weights; EMA preferred
    assert loaded.config.backbone == "efficientnet_b3"
    assert not loaded.training
    got = loaded.state_dict()
    assert set(got) == set(ema_sd) - {STALE_KEY}
    assert all(torch.equal(got[k], ema_sd[k]) for k in got)

    # The official forward contract at full size: 100 queries, 256-way head, 64-d projections.
    images = torch.randn(1, 3, 96, 128)
    with torch.inference_mode():
        out = loaded(images, torch.zeros(1, 96, 128, dtype=torch.bool), torch.tensor([[0, 5, 9, 7, 2]]),
                     torch.ones(1, 5, dtype=torch.long))
    assert out["pred_logits"].shape == (1, 100, 256) and out["pred_boxes"].shape == (1, 100, 4)
    assert out["proj_queries"].shape == (1, 100, 64) and out["proj_tokens"].shape == (1, 5, 64)
    assert all(torch.isfinite(v).all() for v in out.values())
    del loaded, got, out
    gc.collect()

    plain = load_mdetr_checkpoint(path, "mdetr_efficientnetB3", weights="model")
    assert torch.equal(plain.class_embed.bias, model_sd["class_embed.bias"])
    assert torch.equal(plain.backbone[0].body.blocks[6][1].bn3.running_var, model_sd[bn_key])
    del plain
    gc.collect()


@pytest.fixture()
def tiny_sd():
    torch.manual_seed(0)
    return build_mdetr("tiny").state_dict()


def test_best_checkpoint_without_ema_loads_model(tmp_path, tiny_sd):
    path = _released_file(tmp_path, _with_stale_key(tiny_sd), None)
    model = load_mdetr_checkpoint(path, "tiny")
    assert all(torch.equal(v, tiny_sd[k]) for k, v in model.state_dict().items())
    with pytest.raises(SgaError, match="model_ema"):
        load_mdetr_checkpoint(path, "tiny", weights="ema")


def test_legacy_format_file_loads_without_mmap(tmp_path, tiny_sd):
    path = tmp_path / "legacy.pth"
    torch.save({"model": tiny_sd, "args": argparse.Namespace(ema=False)}, path,
               _use_new_zipfile_serialization=False)
    model = load_mdetr_checkpoint(str(path), "tiny")
    assert torch.equal(model.query_embed.weight, tiny_sd["query_embed.weight"])


def test_layout_errors_are_reported_not_ignored(tmp_path, tiny_sd):
    extra = _released_file(tmp_path, {**tiny_sd, "class_embed.extra": torch.zeros(1)}, None, "extra.pth")
    with pytest.raises(SgaError, match="1 unexpected"):
        load_mdetr_checkpoint(extra, "tiny")
    missing = _released_file(tmp_path, {k: v for k, v in tiny_sd.items() if k != "query_embed.weight"}, None,
                             "missing.pth")
    with pytest.raises(SgaError, match="1 missing"):
        load_mdetr_checkpoint(missing, "tiny")
    ok = _released_file(tmp_path, tiny_sd, None, "ok.pth")
    with pytest.raises(SgaError, match="shape mismatches"):
        load_mdetr_checkpoint(ok, build_mdetr("tiny", num_queries=8).config)


class _Payload:
    """A global a checkpoint must not be allowed to instantiate."""

    calls = 0

    def __reduce__(self):
        return (_Payload._construct, ())

    @staticmethod
    def _construct():
        _Payload.calls += 1
        return _Payload()


def test_disallowed_globals_are_refused(tmp_path, tiny_sd):
    path = _released_file(tmp_path, tiny_sd, None, extra=_Payload())
    with pytest.raises(SgaError, match="_Payload"):
        load_mdetr_checkpoint(path, "tiny")
    assert _Payload.calls == 0


def test_infer_entry_refuses_non_grounding_layouts():
    assert infer_entry({"input_proj.weight": torch.zeros(256, 2048, 1, 1)}) == "mdetr_resnet101"
    assert infer_entry({"input_proj.weight": torch.zeros(256, 512, 1, 1)}) == "mdetr_efficientnetB5"
    with pytest.raises(SgaError, match="GQA"):
        infer_entry({"qa_embed.weight": torch.zeros(6, 256), "input_proj.weight": torch.zeros(256, 384, 1, 1),
                     "class_embed.bias": torch.zeros(256)})
    with pytest.raises(SgaError, match="name the entry"):
        infer_entry({"input_proj.weight": torch.zeros(256, 100, 1, 1)})


def test_convert_then_load_project_format(tmp_path, tiny_sd):
    ema_sd = {k: (v + 0.5 if v.is_floating_point() else v) for k, v in tiny_sd.items()}
    src = _released_file(tmp_path, _with_stale_key(tiny_sd), _with_stale_key(ema_sd))
    out_dir = str(tmp_path / "converted")
    summary = convert_checkpoint(src, "tiny", out_dir)
    assert summary["weights"] == "model_ema" and summary["tensors"] == len(tiny_sd)
    config, metadata = read_mdetr_config(out_dir)
    assert config == build_mdetr("tiny").config
    assert metadata == {"source": "ckpt.pth", "entry": "tiny", "weights": "model_ema"}
    model = load_mdetr(out_dir)
    assert all(torch.equal(v, ema_sd[k]) for k, v in model.state_dict().items())
    with pytest.raises(SgaError, match="not an MDETR model directory"):
        load_mdetr(str(tmp_path / "nowhere"))
