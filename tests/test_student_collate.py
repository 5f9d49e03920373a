"""The student collator (student/collate.py) on hand-made samples with the shipped tokenizer."""

import numpy as np
import pytest
import torch

from shards.errors import SgaError
from student.collate import IGNORE_INDEX, Collator
from student.config import StudentConfig
from student.tokenizer import load_tokenizer

torch.set_num_threads(1)
D, C = 8, 5
TOKENIZER = load_tokenizer()
CAPTIONS = [
    ("a small striped red square to the left of two circles", ["a small striped red square", "two circles"]),
    ("the medium-sized pink diamond is above a big heart", ["the medium-sized pink diamond", "a big heart"]),
    ("my daughter drew a blue star", ["my daughter", "a blue star"]),
    ("so beautiful", []),
]


def make_sample(i: int, rng: np.random.Generator, regions: int | None = None, with_cls: bool = True) -> dict:
    caption, phrases = CAPTIONS[i % len(CAPTIONS)]
    spans = [(caption.index(p), caption.index(p) + len(p)) for p in phrases]
    R = int(rng.integers(3, 9)) if regions is None else regions
    lo = rng.uniform(0, 100, size=(R, 2))
    boxes = np.concatenate([lo, lo + rng.uniform(5, 60, size=(R, 2))], 1).astype(np.float32)
    cls = rng.dirichlet(np.ones(C), size=R).astype(np.float16) if with_cls else None
    return {"key": f"{i:09d}", "caption": caption, "phrase_spans": spans,
            "align": rng.random((len(spans), R)) < 0.3, "boxes": boxes,
            "features": rng.normal(size=(R, D)).astype(np.float16), "cls_prob": cls,
            "image_w": 160, "image_h": 120}


def make_batch(n: int, seed: int = 0, **overrides):
    rng = np.random.default_rng(seed)
    config = StudentConfig.tiny(vocab_size=len(TOKENIZER), feature_dim=D, num_classes=C, **overrides)
    samples = [make_sample(i, rng) for i in range(n)]
    return samples, Collator(TOKENIZER, config)(samples, torch.Generator().manual_seed(seed)), config


def test_batch_has_the_documented_keys_shapes_and_dtypes():
    samples, batch, _ = make_batch(6)
    B, L = batch["input_ids"].shape
    V = max(len(s["boxes"]) for s in samples) + 1
    P, T = batch["phrase_tokens"].shape[1:]
    N = len(batch["gnd_label"])
    expected = {"input_ids": ((B, L), torch.long), "attention_mask": ((B, L), torch.bool),
                "mlm_labels": ((B, L), torch.long), "region_features": ((B, V, D), torch.float32),
                "region_boxes": ((B, V, 4), torch.float32), "region_mask": ((B, V), torch.bool),
                "mrc_mask": ((B, V), torch.bool), "mrc_targets": ((B, V, C), torch.float32),
                "itm_label": ((B,), torch.float32), "phrase_tokens": ((B, P, T), torch.long),
                "phrase_token_mask": ((B, P, T), torch.bool), "phrase_mask": ((B, P), torch.bool),
                "gnd_batch": ((N,), torch.long), "gnd_phrase": ((N,), torch.long),
                "gnd_region": ((N,), torch.long), "gnd_label": ((N,), torch.float32)}
    assert B == 6 and P == 2 and N > 0
    assert {k: (tuple(v.shape), v.dtype) for k, v in batch.items()} == expected


def test_phrase_spans_map_to_their_wordpieces():
    _, batch, _ = make_batch(4, mlm_prob=0.0, itm_neg_prob=0.0)
    for b, (_, phrases) in enumerate(CAPTIONS):
        assert batch["phrase_mask"][b].sum() == len(phrases)
        for p, text in enumerate(phrases):
            positions = batch["phrase_tokens"][b, p][batch["phrase_token_mask"][b, p]]
            ids = batch["input_ids"][b, positions].tolist()
            assert ids == TOKENIZER(text, add_special_tokens=False)["input_ids"]
            assert (positions[1:] - positions[:-1] == 1).all()          # contiguous wordpieces


def test_phrases_cut_by_truncation_are_dropped_with_their_row_of_m():
    rng = np.random.default_rng(1)
    sample = make_sample(0, rng)             # "... to the left of two circles": phrase 1 is at the end
    config = StudentConfig.tiny(vocab_size=len(TOKENIZER), feature_dim=D, num_classes=C, max_text_len=8,
                                mlm_prob=0.0, itm_neg_prob=0.0, gnd_pos_fraction=0.5)
    batch = Collator(TOKENIZER, config)([sample], torch.Generator().manual_seed(0))
    assert batch["input_ids"].shape == (1, 8)
    assert batch["phrase_mask"].tolist() == [[True]]
    assert (batch["gnd_phrase"] == 0).all()
    labels = sample["align"][0, batch["gnd_region"] - 1]
    assert batch["gnd_label"].bool().tolist() == labels.tolist()


def test_mlm_selects_15_percent_of_words_and_splits_them_80_10_10():
    samples, batch, _ = make_batch(400, itm_neg_prob=0.0)
    clean = TOKENIZER([s["caption"] for s in samples], padding=True, return_tensors="pt")["input_ids"]
    frame = [TOKENIZER.cls_token_id, TOKENIZER.sep_token_id, TOKENIZER.pad_token_id]
    special = torch.isin(clean, torch.tensor(frame))
    chosen = batch["mlm_labels"] != IGNORE_INDEX
    assert not (chosen & special).any()
    assert torch.equal(batch["mlm_labels"][chosen], clean[chosen])
    assert torch.equal(batch["input_ids"][~chosen], clean[~chosen])         # untouched elsewhere
    rate = chosen.sum() / (~special).sum()
    assert 0.13 < rate < 0.17
    corrupted = batch["input_ids"][chosen]
    masked = (corrupted == TOKENIZER.mask_token_id).float().mean()
    kept = (corrupted == clean[chosen]).float().mean()
    assert 0.76 < masked < 0.84 and 0.07 < kept < 0.13                     # the rest is random words
    assert not torch.isin(corrupted[corrupted != TOKENIZER.mask_token_id],
                          torch.tensor(TOKENIZER.all_special_ids)).any()


def test_regions_are_normalised_masked_and_summarised_by_the_img_token():
    samples, batch, _ = make_batch(300, itm_neg_prob=0.0)
    masked = batch["mrc_mask"]
    real = batch["region_mask"].clone()
    real[:, 0] = False
    assert 0.12 < masked.sum() / real.sum() < 0.18
    assert not masked[:, 0].any() and not (masked & ~real).any()
    for b in (0, 1, 2):
        s, R = samples[b], len(samples[b]["boxes"])
        feats = torch.from_numpy(s["features"].astype(np.float32))
        m = masked[b, 1:R + 1]
        assert torch.equal(batch["region_features"][b, 1:R + 1][m], torch.zeros(int(m.sum()), D))
        assert torch.allclose(batch["region_features"][b, 1:R + 1][~m], feats[~m])
        assert torch.allclose(batch["region_features"][b, 0], feats[~m].mean(0), atol=1e-6)
        scale = torch.tensor([160.0, 120.0, 160.0, 120.0])
        expected = (torch.from_numpy(s["boxes"]) / scale).clamp(0, 1)
        assert torch.allclose(batch["region_boxes"][b, 1:R + 1], expected)
        cls = torch.from_numpy(s["cls_prob"].astype(np.float32))[m]
        assert torch.allclose(batch["mrc_targets"][b, 1:R + 1][m], cls / cls.sum(1, keepdim=True))
    assert (batch["region_boxes"][:, 0] == torch.tensor([0.0, 0.0, 1.0, 1.0])).all()
    targets = batch["mrc_targets"][masked].sum(-1)
    assert torch.allclose(targets, torch.ones_like(targets))


def test_samples_without_class_probabilities_get_no_region_targets():
    rng = np.random.default_rng(0)
    samples = [make_sample(i, rng, regions=30, with_cls=False) for i in range(4)]
    config = StudentConfig.tiny(vocab_size=len(TOKENIZER), feature_dim=D, num_classes=C, mrc_prob=0.5)
    batch = Collator(TOKENIZER, config)(samples, torch.Generator().manual_seed(0))
    assert not batch["mrc_mask"].any() and not batch["mrc_targets"].any()


def test_disabled_losses_leave_their_inputs_uncorrupted():
    _, batch, _ = make_batch(32, losses=("itm",), mlm_prob=0.5, mrc_prob=0.5)
    assert (batch["mlm_labels"] == IGNORE_INDEX).all() and not batch["mrc_mask"].any()
    assert len(batch["gnd_label"]) == 0 and batch["phrase_mask"].any()


def test_itm_negatives_swap_captions_and_drop_their_phrases():
    samples, batch, _ = make_batch(8, itm_neg_prob=1.0, mlm_prob=0.0)
    assert (batch["itm_label"] == 0).all()
    assert not batch["phrase_mask"].any() and len(batch["gnd_label"]) == 0
    own = TOKENIZER([s["caption"] for s in samples], padding=True, return_tensors="pt")["input_ids"]
    for b in range(8):
        row = batch["input_ids"][b][batch["attention_mask"][b]].tolist()
        assert row != own[b][own[b] != TOKENIZER.pad_token_id].tolist()     # someone else's caption
    _, matched, _ = make_batch(8, itm_neg_prob=0.0)
    assert (matched["itm_label"] == 1).all()
    _, no_itm, _ = make_batch(8, itm_neg_prob=1.0, losses=("mlm", "gnd"))
    assert (no_itm["itm_label"] == 1).all()


def test_itm_swap_rate_is_the_configured_share():
    _, batch, _ = make_batch(400, itm_neg_prob=0.5)
    assert 0.43 < (batch["itm_label"] == 0).float().mean() < 0.57


def test_grounding_pairs_carry_the_pseudo_labels_of_their_image():
    samples, batch, config = make_batch(64, itm_neg_prob=0.0)
    b, p, r = batch["gnd_batch"], batch["gnd_phrase"], batch["gnd_region"]
    assert (r >= 1).all() and batch["region_mask"][b, r].all()
    assert batch["phrase_mask"][b, p].all()
    labels = [bool(samples[i]["align"][j, k - 1]) for i, j, k in zip(b.tolist(), p.tolist(), r.tolist())]
    assert batch["gnd_label"].bool().tolist() == labels
    triples = torch.stack([b, p, r], 1)
    assert len(torch.unique(triples, dim=0)) == len(triples)
    phrases = int(batch["phrase_mask"].sum())
    assert len(triples) <= config.gnd_pairs_per_phrase * phrases


def test_max_regions_keeps_the_first_regions_and_their_columns_of_m():
    rng = np.random.default_rng(3)
    sample = make_sample(0, rng, regions=20)
    sample["align"][:] = False
    sample["align"][:, 15:] = True                   # only regions past the cut are positive
    config = StudentConfig.tiny(vocab_size=len(TOKENIZER), feature_dim=D, num_classes=C, max_regions=10,
                                itm_neg_prob=0.0)
    batch = Collator(TOKENIZER, config)([sample], torch.Generator().manual_seed(0))
    assert batch["region_features"].shape[1] == 11
    assert len(batch["gnd_label"]) > 0 and not batch["gnd_label"].any()


def test_same_generator_state_gives_the_same_batch():
    _, first, _ = make_batch(16, seed=5)
    _, again, _ = make_batch(16, seed=5)
    assert all(torch.equal(first[k], again[k]) for k in first)
    rng = np.random.default_rng(5)
    samples = [make_sample(i, rng) for i in range(16)]
    config = StudentConfig.tiny(vocab_size=len(TOKENIZER), feature_dim=D, num_classes=C)
    other = Collator(TOKENIZER, config)(samples, torch.Generator().manual_seed(6))
    assert not torch.equal(first["mlm_labels"], other["mlm_labels"])


def test_images_without_regions_and_captions_without_phrases_collate():
    rng = np.random.default_rng(0)
    samples = [make_sample(3, rng, regions=0), make_sample(3, rng, regions=4)]   # "so beautiful": no phrase
    config = StudentConfig.tiny(vocab_size=len(TOKENIZER), feature_dim=D, num_classes=C)
    batch = Collator(TOKENIZER, config)(samples, torch.Generator().manual_seed(0))
    assert batch["phrase_tokens"].shape == (2, 0, 1) and len(batch["gnd_label"]) == 0
    assert batch["region_mask"][0].tolist() == [True, False, False, False, False]
    assert not batch["region_features"][0].any()


def test_inconsistent_inputs_are_rejected_with_the_reason():
    rng = np.random.default_rng(0)
    config = StudentConfig.tiny(vocab_size=len(TOKENIZER), feature_dim=D, num_classes=C)
    bad_align = make_sample(0, rng)
    bad_align["align"] = bad_align["align"][:, :-1]
    with pytest.raises(ValueError, match="align has shape"):
        Collator(TOKENIZER, config)([bad_align], torch.Generator())
    wrong_dim = make_sample(0, rng)
    wrong_dim["features"] = np.zeros((len(wrong_dim["boxes"]), D + 1), np.float16)
    with pytest.raises(SgaError, match="feature_dim"):
        Collator(TOKENIZER, config)([wrong_dim], torch.Generator())
    with pytest.raises(SgaError, match="vocab_size"):
        Collator(TOKENIZER, StudentConfig.tiny(vocab_size=10))
