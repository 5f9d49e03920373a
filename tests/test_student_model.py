"""Student config, encoders and heads (student/config.py, student/model/): shapes, training, BERT init."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from shards.errors import SgaError
from student.collate import Collator
from student.config import StudentConfig
from student.criterion import build_criterion
from student.model import build_model
from student.model.embeddings import VisualEmbeddings
from student.model.hf import config_from_bert
from student.tokenizer import load_tokenizer

torch.set_num_threads(1)
D, C = 16, 9
TOKENIZER = load_tokenizer()
WORDS = ("red", "blue", "green", "small", "big", "striped", "circle", "square", "star", "heart")


def make_samples(n: int, seed: int = 0) -> list[dict]:
    """World-like samples: 'a <w> <w> and the <w> <w> <w>' with two phrases and learnable M."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w = rng.choice(WORDS, size=5)
        first, second = f"a {w[0]} {w[1]}", f"the {w[2]} {w[3]} {w[4]}"
        caption = f"{first} and {second}"
        R = int(rng.integers(4, 10))
        lo = rng.uniform(0, 80, size=(R, 2))
        boxes = np.concatenate([lo, lo + rng.uniform(10, 40, size=(R, 2))], 1).astype(np.float32)
        feats = rng.normal(size=(R, D)).astype(np.float32)
        align = np.zeros((2, R), dtype=bool)
        align[0, 0] = align[1, 1:3] = True
        feats[align.any(0)] += 2.0                       # positives are visibly different regions
        cls = rng.dirichlet(np.full(C, 0.3), size=R).astype(np.float16)
        out.append({"key": f"{i:09d}", "caption": caption,
                    "phrase_spans": [(0, len(first)), (len(caption) - len(second), len(caption))],
                    "align": align, "boxes": boxes, "features": feats.astype(np.float16), "cls_prob": cls,
                    "image_w": 128, "image_h": 128})
    return out


def tiny(**overrides) -> StudentConfig:
    return StudentConfig.tiny(vocab_size=len(TOKENIZER), feature_dim=D, num_classes=C, **overrides)


def collate(config: StudentConfig, n: int = 8, seed: int = 0) -> dict:
    return Collator(TOKENIZER, config)(make_samples(n, seed), torch.Generator().manual_seed(seed))


# config ---------------------------------------------------------------------------------------------------
def test_config_round_trips_through_json():
    config = tiny(encoder="two", losses=("mlm", "gnd"), phrase_level="token", spe=False, weight_gnd=5.0)
    again = StudentConfig.from_json(config.to_json())
    assert again == config and again.losses == ("mlm", "gnd")
    assert StudentConfig.from_json(StudentConfig.base().to_json()) == StudentConfig.base()
    assert config.weight_dict == {"mlm": 1.0, "gnd": 5.0}


@pytest.mark.parametrize("bad, message", [
    ({"encoder": "three"}, "encoder"), ({"phrase_level": "gru"}, "phrase_level"),
    ({"losses": ("mlm", "nsp")}, "unknown losses"), ({"encoder": "two", "coattn_layers": 3}, "coattn_layers"),
    ({"spe_dim": 12}, "spe_dim"), ({"gnd_pos_fraction": 0.0}, "gnd_pos_fraction"),
    ({"max_text_len": 100}, "max_position")])
def test_config_rejects_inconsistent_fields(bad, message):
    with pytest.raises(SgaError, match=message):
        tiny(**bad)
    with pytest.raises(SgaError, match="unknown fields"):
        StudentConfig.from_dict({"hidden": 3})


# forward --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoder", ["single", "two"])
@pytest.mark.parametrize("level", ["lstm", "token"])
def test_forward_outputs_have_the_documented_shapes(encoder, level):
    config = tiny(encoder=encoder, phrase_level=level, bi_hidden_size=48, v_hidden_size=32)
    batch = collate(config)
    out = build_model(config)(batch)
    B, L = batch["input_ids"].shape
    V = batch["region_mask"].shape[1]
    M = int((batch["mlm_labels"] != -100).sum())
    N, T = len(batch["gnd_label"]), batch["phrase_tokens"].shape[2]
    Ht, Hv, Hp = (64, 64, 64) if encoder == "single" else (64, 32, 48)
    Tp = 1 if level == "lstm" else T
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "text_states": (B, L, Ht), "region_states": (B, V, Hv),
        "pooled_text": (B, Hp), "pooled_image": (B, Hp),
        "mlm_logits": (M, len(TOKENIZER)), "mrc_logits": (B, V, C), "itm_logit": (B,),
        "gnd_logits": (N, Tp), "gnd_logit_mask": (N, Tp)}


def test_only_enabled_losses_get_heads():
    model = build_model(tiny(losses=("mlm", "itm")))
    assert model.mrc_head is None and model.gnd_head is None
    out = model(collate(tiny(losses=("mlm", "itm"))))
    assert "gnd_logits" not in out and "mrc_logits" not in out


@pytest.mark.parametrize("encoder, level, spe", [
    ("single", "lstm", True), ("single", "token", False), ("two", "lstm", False), ("two", "token", True)])
def test_a_few_steps_lower_every_loss(encoder, level, spe):
    torch.manual_seed(0)
    config = tiny(encoder=encoder, phrase_level=level, spe=spe)
    batch = collate(config, n=12)
    model, criterion = build_model(config), build_criterion(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(40):
        losses = criterion(model(batch), batch)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in losses.items()})
    assert all(np.isfinite(v) for h in history for v in h.values())
    for name in ("mlm", "mrc", "itm", "gnd", "loss"):
        first, last = np.mean([h[name] for h in history[:3]]), np.mean([h[name] for h in history[-3:]])
        assert last < 0.8 * first, (name, first, last)


def test_batch_without_phrases_or_masked_regions_still_gives_every_parameter_a_gradient():
    """DDP needs a gradient for every parameter on every rank, even when a rank's batch has no pairs."""
    config = tiny(mrc_prob=0.0, mlm_prob=0.0)
    samples = make_samples(4)
    for s in samples:
        s["phrase_spans"], s["align"] = [], np.zeros((0, len(s["boxes"])), dtype=bool)
    batch = Collator(TOKENIZER, config)(samples, torch.Generator().manual_seed(0))
    assert len(batch["gnd_label"]) == 0 and not batch["mrc_mask"].any()
    model = build_model(config)
    losses = build_criterion(config)(model(batch), batch)
    assert losses["gnd"].item() == losses["mrc"].item() == losses["mlm"].item() == 0.0
    losses["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_bf16_autocast_forward_gives_finite_losses():
    config = tiny()
    batch = collate(config)
    model = build_model(config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    losses = build_criterion(config)(out, batch)
    assert out["mlm_logits"].dtype == torch.bfloat16                 # autocast was in force
    assert all(torch.isfinite(v) for v in losses.values())


def test_spe_switch_adds_a_box_dependence_beyond_the_5d_feature():
    boxes = torch.tensor([[[0.1, 0.1, 0.3, 0.3], [0.5, 0.1, 0.7, 0.3]]])     # same size, other place
    feats = torch.zeros(1, 2, D)
    outputs = {}
    for spe in (True, False):
        emb = VisualEmbeddings(tiny(spe=spe), 64)
        torch.nn.init.zeros_(emb.box_proj.weight)             # silence the 5-d box feature
        outputs[spe] = emb(feats, boxes)
        assert (emb.spe_proj is not None) == spe
    assert torch.allclose(outputs[False][0, 0], outputs[False][0, 1])
    assert not torch.allclose(outputs[True][0, 0], outputs[True][0, 1])


def test_two_stream_supports_fewer_coattention_blocks_than_layers():
    config = tiny(encoder="two", num_layers=3, v_num_layers=2, coattn_layers=1)
    model = build_model(config)
    assert len(model.encoder.coattention) == 1
    out = model(collate(config))
    assert torch.isfinite(out["pooled_image"]).all()


def test_phrase_states_for_task_heads():
    config = tiny()
    batch = collate(config)
    model = build_model(config)
    out = model(batch)
    states, mask = model.gnd_head.phrase_states(out["text_states"], batch["phrase_tokens"],
                                                batch["phrase_token_mask"])
    B, P = batch["phrase_mask"].shape
    assert states.shape == (B, P, 1, 64) and torch.equal(mask[..., 0], batch["phrase_mask"])


def test_weights_save_with_safetensors_and_the_mlm_decoder_is_the_word_embedding(tmp_path):
    config = tiny()
    model = build_model(config)
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))        # no tensor is stored twice
    restored = build_model(config)
    restored.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    batch = collate(config)
    model.eval(), restored.eval()
    assert torch.equal(model(batch)["mlm_logits"], restored(batch)["mlm_logits"])
    with torch.no_grad():
        model.encoder.embeddings.word_embeddings.weight[5] += 1.0
    assert not torch.equal(model(batch)["mlm_logits"][:, 5], restored(batch)["mlm_logits"][:, 5])


# Hugging Face initialisation -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(TOKENIZER), hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=40))
    path = tmp_path_factory.mktemp("bert")
    bert.save_pretrained(str(path))
    return path, bert.eval()


@pytest.mark.parametrize("encoder", ["single", "two"])
def test_text_stream_starts_from_a_local_bert_checkpoint(bert_dir, encoder):
    path, bert = bert_dir
    config = config_from_bert(str(path), encoder=encoder, feature_dim=D, num_classes=C, max_text_len=20,
                              v_hidden_size=32, v_num_heads=2, bi_hidden_size=32, coattn_layers=1, spe_dim=32,
                              align_dim=16, dropout=0.0)
    assert (config.hidden_size, config.num_layers, config.max_position) == (32, 2, 40)
    model = build_model(config).eval()
    for key, value in bert.state_dict().items():
        if key.startswith(("embeddings.word", "encoder.layer.1.output")):
            assert torch.equal(model.encoder.state_dict()[key], value), key
    # The copied layers compute what BERT computes: run text alone through them.
    ids = TOKENIZER(["a red circle and the big striped star"], return_tensors="pt")["input_ids"]
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        ours = model.encoder.encoder(model.encoder.embeddings(ids), mask)
        theirs = bert(input_ids=ids).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-5)
    out = model(collate(config))
    assert torch.isfinite(out["itm_logit"]).all()


def test_checkpoint_size_mismatch_and_missing_directory_are_user_errors(bert_dir, tmp_path):
    path, _ = bert_dir
    with pytest.raises(SgaError, match="config_from_bert"):
        build_model(tiny(text_init=str(path)))                        # hidden 64 vs the checkpoint's 32
    with pytest.raises(SgaError, match="cannot"):
        build_model(tiny(text_init=str(tmp_path / "missing")))
