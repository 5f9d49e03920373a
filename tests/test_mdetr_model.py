"""MDETR building blocks and the forward contract, on the tiny configuration and small modules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from shards.errors import SgaError
from teacher.mdetr import ENTRIES, MDETRConfig, build_mdetr, get_config
from teacher.mdetr.backbone import FrozenBatchNorm2d
from teacher.mdetr.efficientnet import (
    DepthwiseSeparable,
    EfficientNet,
    InvertedResidual,
    SameConv2d,
    make_divisible,
    same_padding,
    tf_conv,
)
from teacher.mdetr.position_encoding import PositionEmbeddingSine

torch.set_num_threads(1)


def _caption_batch(lengths, total, vocab=1000, seed=0):
    """RoBERTa-style ids (<s>=0 ... </s>=2, pad=1) of the given lengths, right-padded to ``total``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.ones(len(lengths), total, dtype=torch.long)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, vocab, (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = 0, 2
        mask[i, :n] = 1
    return ids, mask


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_mdetr("tiny", aux_loss=True).eval()


def test_tiny_forward_contract(tiny):
    cfg = tiny.config
    images = torch.randn(2, 3, 64, 96)
    image_mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    image_mask[1, 40:] = True
    ids, attn = _caption_batch([7, 4], 7)
    with torch.inference_mode():
        out = tiny(images, image_mask, ids, attn)
    q, p = cfg.num_queries, cfg.num_classes + 1
    assert out["pred_logits"].shape == (2, q, p) and cfg.no_object_index == p - 1
    assert out["pred_boxes"].shape == (2, q, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert out["proj_queries"].shape == (2, q, cfg.contrastive_dim)
    assert out["proj_tokens"].shape == (2, 7, cfg.contrastive_dim)
    for key in ("proj_queries", "proj_tokens"):
        assert torch.allclose(out[key].norm(dim=-1), torch.ones(()), atol=1e-5)
    assert len(out["aux_outputs"]) == cfg.dec_layers - 1
    for aux in out["aux_outputs"]:
        assert {k: v.shape for k, v in aux.items()} == {k: out[k].shape for k in aux}
        assert not torch.equal(aux["pred_boxes"], out["pred_boxes"])
    assert "aux_outputs" not in build_mdetr("tiny").eval()(images, image_mask, ids, attn)
    long_ids, long_attn = _caption_batch([cfg.num_classes + 1], cfg.num_classes + 1)
    with pytest.raises(ValueError, match="text positions"):
        tiny(images[:1], image_mask[:1], long_ids, long_attn)


def test_padding_does_not_change_outputs(tiny):
    """An image and caption alone give the same outputs as inside a batch padded to a larger size."""
    image = torch.randn(1, 3, 50, 70)
    ids, attn = _caption_batch([5], 5, seed=1)
    with torch.inference_mode():
        alone = tiny(image, torch.zeros(1, 50, 70, dtype=torch.bool), ids, attn)
        images = torch.zeros(2, 3, 96, 128)
        images[0, :, :50, :70] = image[0]
        images[1] = torch.randn(3, 96, 128)
        image_mask = torch.ones(2, 96, 128, dtype=torch.bool)
        image_mask[0, :50, :70] = False
        image_mask[1] = False
        batch_ids, batch_attn = _caption_batch([5, 9], 9, seed=2)
        batch_ids[0], batch_attn[0] = F.pad(ids[0], (0, 4), value=1), F.pad(attn[0], (0, 4))
        batched = tiny(images, image_mask, batch_ids, batch_attn)
        feats_alone, mask_alone, _ = tiny.backbone(image, torch.zeros(1, 50, 70, dtype=torch.bool))
        feats, mask, _ = tiny.backbone(images, image_mask)
    # Backbone: the valid cells are the un-padded image's feature map, bit for bit up to float rounding.
    h, w = feats_alone.shape[-2:]
    assert not mask_alone.any() and not mask[0, :h, :w].any() and mask[0, h:].all() and mask[0, :, w:].all()
    scale = feats_alone.abs().max()
    assert torch.allclose(feats[:1, :, :h, :w], feats_alone, rtol=0, atol=1e-4 * scale)
    for key in ("pred_logits", "pred_boxes", "proj_queries"):
        assert torch.allclose(batched[key][0], alone[key][0], atol=1e-5), key
    assert torch.allclose(batched["proj_tokens"][0, :5], alone["proj_tokens"][0], atol=1e-5)
    # The same image with its padding *unmasked* is a different input: the check above can fail.
    with torch.inference_mode():
        unmasked = tiny(images[:1], torch.zeros(1, 96, 128, dtype=torch.bool), ids, attn)
    assert not torch.allclose(unmasked["pred_boxes"][0], alone["pred_boxes"][0], atol=1e-4)


def test_frozen_batch_norm_matches_eval_batch_norm():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(6, eps=1e-5).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.1, 3)
    frozen = FrozenBatchNorm2d(6)
    frozen.load_state_dict({k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"})
    x = torch.randn(2, 6, 5, 7)
    assert torch.allclose(frozen(x), bn(x), atol=1e-5)
    assert list(frozen.parameters()) == []
    assert sorted(frozen.state_dict()) == ["bias", "running_mean", "running_var", "weight"]


def test_same_padding_puts_the_extra_pixel_bottom_right():
    cases = [((224, 3, 2), 1), ((225, 3, 2), 2), ((7, 5, 1), 4), ((1, 3, 2), 2)]
    assert [same_padding(*args) for args, _ in cases] == [total for _, total in cases]
    conv = SameConv2d(1, 1, 3, stride=2, bias=False)
    torch.nn.init.ones_(conv.weight)
    out = conv(torch.ones(1, 1, 4, 4))
    # Total padding 1 per axis goes after the image: the top-left window sees 9 pixels, the bottom-right 4.
    assert out[0, 0].tolist() == [[9.0, 6.0], [6.0, 4.0]]
    # Stride 1 uses static symmetric padding, which equals SAME for odd kernels.
    static = tf_conv(2, 3, 5)
    same = SameConv2d(2, 3, 5, bias=False)
    same.load_state_dict(static.state_dict())
    x = torch.randn(1, 2, 9, 6)
    assert torch.allclose(static(x), same(x), atol=1e-6)
    assert make_divisible(19.2) == 24 and make_divisible(134.4) == 136 and make_divisible(10.0, 1) == 10


def _capture(module, store, name, inputs=False):
    def hook(_m, args, output):
        store[name] = args[0] if inputs else output
    return module.register_forward_hook(hook)


def test_efficientnet_keeps_silu_after_frozen_norms():
    """The timm>=0.6 trap: activations fused into norms vanish when norms are swapped; ours stay."""
    torch.manual_seed(0)
    seen = {}
    ir = InvertedResidual(8, 8, 3, 1, 6, FrozenBatchNorm2d)
    hooks = [_capture(ir.bn1, seen, "bn1"), _capture(ir.conv_dw, seen, "dw_in", True),
             _capture(ir.bn2, seen, "bn2"), _capture(ir.se, seen, "se_in", True)]
    ir(torch.randn(1, 8, 6, 6))
    assert torch.allclose(seen["dw_in"], F.silu(seen["bn1"]))
    assert torch.allclose(seen["se_in"], F.silu(seen["bn2"]))
    ds = DepthwiseSeparable(8, 8, 3, 1, FrozenBatchNorm2d)
    hooks += [_capture(ds.bn1, seen, "ds_bn1"), _capture(ds.se, seen, "ds_se_in", True)]
    ds(torch.randn(1, 8, 6, 6))
    assert torch.allclose(seen["ds_se_in"], F.silu(seen["ds_bn1"]))
    net = EfficientNet(0.25, 0.25, FrozenBatchNorm2d)
    hooks += [_capture(net.bn1, seen, "stem"), _capture(net.blocks, seen, "blocks_in", True)]
    out = net(torch.randn(1, 3, 33, 47))
    assert torch.allclose(seen["blocks_in"], F.silu(seen["stem"]))
    assert out.shape[-2:] == (math.ceil(33 / 32), math.ceil(47 / 32))
    for h in hooks:
        h.remove()


def test_sine_position_codes():
    pe = PositionEmbeddingSine(num_pos_feats=4)
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    pos = pe(mask)
    assert pos.shape == (1, 8, 2, 3)
    y = torch.tensor([1.0, 2.0]) / 2 * 2 * math.pi
    x = torch.tensor([1.0, 2.0, 3.0]) / 3 * 2 * math.pi
    dim_t = [1.0, 1.0, 100.0, 100.0]  # 10000 ** (2 * floor(i / 2) / 4)
    for c, fn in enumerate([torch.sin, torch.cos, torch.sin, torch.cos]):
        assert torch.allclose(pos[0, c], fn(y / dim_t[c])[:, None].expand(2, 3), atol=1e-5)
        assert torch.allclose(pos[0, 4 + c], fn(x / dim_t[c])[None, :].expand(2, 3), atol=1e-5)
    padded = torch.ones(1, 4, 5, dtype=torch.bool)
    padded[0, :2, :3] = False
    assert torch.allclose(pe(padded)[:, :, :2, :3], pos, atol=1e-5)


def test_config_json_round_trip_and_overrides():
    for name, cfg in ENTRIES.items():
        assert MDETRConfig.from_json(cfg.to_json()) == cfg, name
    cfg = get_config("tiny", text_encoder={"vocab_size": 77}, num_queries=5)
    assert cfg.text_encoder["vocab_size"] == 77 and cfg.text_encoder["hidden_size"] == 64
    assert cfg.num_queries == 5 and ENTRIES["tiny"].num_queries == 16
    assert build_mdetr(cfg).transformer.text_encoder.embeddings.word_embeddings.num_embeddings == 77
    roberta = ENTRIES["mdetr_resnet101"].text_encoder
    assert (roberta["max_position_embeddings"], roberta["type_vocab_size"], roberta["layer_norm_eps"]) == (
        514, 1, 1e-5)
    with pytest.raises(SgaError, match="unknown MDETR entry"):
        get_config("mdetr_resnet18")
    with pytest.raises(SgaError, match="unknown fields"):
        MDETRConfig.from_dict({"backbone": "resnet101", "hidden": 3})
    with pytest.raises(SgaError, match="override"):
        get_config("tiny", hidden=3)
