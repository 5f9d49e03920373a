"""The Teacher interface: registry, preprocessing, box conversion, grounding output, teacher directories and
the fingerprint, with a real (randomly initialised) small MDETR and a real BPE tokenizer."""

import argparse
import dataclasses
import pathlib

import numpy as np
import pytest
import torch

from pipeline.cli import main
from shards.errors import SgaError
from teacher import GroundingInput, PhraseBoxes, Teacher, load_teacher, register_teacher
from teacher.grounding import (
    TOKENIZER_DIR,
    InferenceConfig,
    MDETRTeacher,
    phrase_scores,
    scale_to_pixels,
    write_teacher_json,
)
from teacher.mdetr import build_mdetr
from teacher.mdetr.checkpoint import save_mdetr
from teacher.preprocess import PreprocessConfig, pad_batch, preprocess_batch, resized_hw
from teacher.tokenizer import train_tokenizer

torch.set_num_threads(1)
CAPTIONS = ["a red circle next to a blue square", "the green star on a sunny day",
            "two yellow hearts left of the black cross"] * 10
PREPROCESS = PreprocessConfig(short_side=48, max_size=96, size_multiple=8)


@pytest.fixture(scope="module")
def parts():
    tokenizer = train_tokenizer(CAPTIONS, vocab_size=300)
    torch.manual_seed(0)
    model = build_mdetr("tiny", backbone_widths=(8, 16, 32), d_model=32, nheads=2, enc_layers=1, dec_layers=1,
                        dim_feedforward=64, num_queries=6,
                        text_encoder={"vocab_size": len(tokenizer), "hidden_size": 32, "num_hidden_layers": 1,
                                      "intermediate_size": 64})
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def teacher_dir(parts, tmp_path_factory):
    model, tokenizer = parts
    out = tmp_path_factory.mktemp("teacher")
    save_mdetr(model, model.config, str(out))
    tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    write_teacher_json(out, PREPROCESS, {"note": "random weights for tests"})
    return out


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _teacher(parts, **inference) -> MDETRTeacher:
    model, tokenizer = parts
    return MDETRTeacher(model, tokenizer, PREPROCESS, InferenceConfig(**inference))


# ---- preprocessing and boxes -------------------------------------------------------------------------------

@pytest.mark.parametrize(("hw", "short", "cap", "expected"), [
    ((480, 640), 800, 1333, (800, 1066)),      # short side to 800, long side truncated
    ((640, 480), 800, 1333, (1066, 800)),
    ((100, 1000), 800, 1333, (133, 1330)),     # the cap wins: short side round(1333 * 100 / 1000)
    ((800, 900), 800, 1333, (800, 900)),       # already at size: unchanged
    ((150, 200), 96, None, (96, 128)),
])
def test_resized_hw(hw, short, cap, expected):
    assert resized_hw(*hw, short, cap) == expected


def test_pad_batch_masks_padding_and_rounds_to_multiple():
    a, b = torch.ones(3, 10, 12), torch.ones(3, 7, 17)
    images, mask = pad_batch([a, b], size_multiple=8)
    assert images.shape == (2, 3, 16, 24) and mask.shape == (2, 16, 24)
    assert not mask[0, :10, :12].any() and mask[0, 10:].all() and mask[0, :, 12:].all()
    assert (images[1][:, ~mask[1]] == 1).all() and (images[1][:, mask[1]] == 0).all()


def test_preprocess_normalises_with_imagenet_statistics():
    image = np.full((60, 80, 3), 255, dtype=np.uint8)
    images, mask = preprocess_batch([image], PreprocessConfig(short_side=30, max_size=None))
    assert images.shape == (1, 3, 30, 40) and not mask.any()
    expected = (1 - torch.tensor(PREPROCESS.mean)) / torch.tensor(PREPROCESS.std)
    assert torch.allclose(images[0, :, 5, 5], expected, atol=1e-5)


def test_scale_to_pixels_converts_and_clips():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.95, 0.1, 0.2, 0.4]])
    out = scale_to_pixels(boxes, width=200, height=100)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], [80, 30, 120, 70], atol=1e-4)
    np.testing.assert_allclose(out[1], [170, 0, 200, 30], atol=1e-4)   # clipped to the image


def test_phrase_scores_take_the_max_over_the_phrase_tokens():
    prob = torch.tensor([[0.1, 0.6, 0.1, 0.2], [0.3, 0.1, 0.5, 0.1]])   # 2 queries, 3 tokens + no-object
    pos = torch.tensor([[0.0, 0.5, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(phrase_scores(prob, pos), torch.tensor([[0.6, 0.5], [0.1, 0.3]]))


# ---- the registry ------------------------------------------------------------------------------------------

def test_registry_passes_settings_to_the_factory():
    calls = {}

    def factory(**kwargs):
        calls.update(kwargs)
        return "a teacher"

    register_teacher("fake-for-test", factory)
    assert load_teacher("fake-for-test", device="cpu", score_floor=0.3, top_k=4, extra=1) == "a teacher"
    assert calls == {"device": "cpu", "score_floor": 0.3, "top_k": 4, "extra": 1}


def test_registry_rejects_bad_names_and_specs(tmp_path):
    with pytest.raises(ValueError):
        register_teacher("a/b", lambda **kw: None)
    with pytest.raises(SgaError, match="unknown teacher"):
        load_teacher(str(tmp_path / "nowhere"))
    with pytest.raises(SgaError, match="not a teacher directory"):
        load_teacher(str(tmp_path))
    with pytest.raises(SgaError, match="score_floor"):
        load_teacher("tiny", score_floor=1.5)


# ---- grounding ---------------------------------------------------------------------------------------------

def test_ground_output_contract(parts):
    teacher = _teacher(parts, score_floor=0.0, top_k=4)
    assert isinstance(teacher, Teacher)
    caption = "a red circle next to a blue square"
    batch = [GroundingInput(_image(90, 120), caption, [(0, 12), (21, 34), (1, 2)]),
             GroundingInput(_image(70, 50, 1), "the green star on a sunny day", []),
             GroundingInput(_image(64, 64, 2), "", [])]
    out = teacher.ground(batch)
    assert [len(x) for x in out] == [3, 0, 0]
    for answer in out[0][:2]:
        assert isinstance(answer, PhraseBoxes)
        assert answer.boxes.dtype == np.float32 and answer.scores.dtype == np.float32
        assert answer.boxes.shape == (4, 4) and answer.scores.shape == (4,)
        assert (np.diff(answer.scores) <= 0).all()
        assert (answer.boxes[:, [0, 1]] <= answer.boxes[:, [2, 3]]).all()
        assert (answer.boxes >= 0).all() and (answer.boxes[:, [0, 2]] <= 120).all()
        assert (answer.boxes[:, [1, 3]] <= 90).all()
    assert len(out[0][2].boxes) == 0    # a span on a single space has no token: no boxes


def test_score_floor_and_top_k_truncate_the_same_ranking(parts):
    sample = GroundingInput(_image(90, 120), "a red circle next to a blue square", [(2, 12)])
    full = _teacher(parts, score_floor=0.0, top_k=6).ground([sample])[0][0]
    floor = float(full.scores[2])
    cut = _teacher(parts, score_floor=floor, top_k=6).ground([sample])[0][0]
    assert len(cut.scores) == 3 and (cut.scores >= floor).all()
    np.testing.assert_array_equal(cut.boxes, full.boxes[:3])
    top2 = _teacher(parts, score_floor=0.0, top_k=2).ground([sample])[0][0]
    np.testing.assert_array_equal(top2.boxes, full.boxes[:2])


def test_results_do_not_depend_on_batch_neighbours(parts):
    teacher = _teacher(parts, score_floor=0.0, top_k=6)
    # 90x130 resizes to 48x69; with its neighbour (48x80) the batch is wider.
    sample = GroundingInput(_image(90, 130), "a red circle next to a blue square", [(2, 12), (23, 34)])
    other = GroundingInput(_image(150, 250, 3), "two yellow hearts left of the black cross and more words",
                           [(0, 17)])
    alone = teacher.ground([sample])[0]
    together = teacher.ground([other, sample])[1]
    for a, b in zip(alone, together):
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)


def test_captions_longer_than_the_text_encoder_are_grounded_in_windows(parts):
    phrases = [f"a {c} circle" for c in ("red", "blue", "green", "yellow", "black")] * 8
    caption = " next to ".join(phrases)
    spans, at = [], 0
    for phrase in phrases:
        spans.append((caption.index(phrase, at), caption.index(phrase, at) + len(phrase)))
        at = spans[-1][1]
    sample = GroundingInput(_image(90, 120), caption, spans)
    windows, cut = _teacher(parts, score_floor=0.0, top_k=3), _teacher(parts, score_floor=0.0, top_k=3,
                                                                       long_captions="truncate")
    assert len(windows.tokenizer(caption)["input_ids"]) > windows.max_text_len
    by_window, truncated = windows.ground([sample])[0], cut.ground([sample])[0]
    assert all(len(a.boxes) == 3 for a in by_window)                  # every phrase is read
    assert len(truncated[-1].boxes) == 0 and len(truncated[0].boxes) == 3
    # A phrase's answer is its window's, grounded as a caption of its own (up to text padding in the batch).
    last = windows._windows(sample)[-1]
    alone = windows.ground([GroundingInput(sample.image, caption[last.start: last.end],
                                           [(spans[i][0] - last.start, spans[i][1] - last.start)
                                            for i in last.phrases])])[0]
    for i, answer in zip(last.phrases, alone):
        np.testing.assert_allclose(by_window[i].scores, answer.scores, atol=1e-5)
        np.testing.assert_allclose(by_window[i].boxes, answer.boxes, atol=1e-3)
    # A caption that fits reads the same either way; the mode is part of the fingerprint.
    short = GroundingInput(_image(90, 120), "a red circle next to a blue square", [(2, 12), (23, 34)])
    for a, b in zip(windows.ground([short])[0], cut.ground([short])[0]):
        np.testing.assert_array_equal(a.boxes, b.boxes)
    assert windows.fingerprint != cut.fingerprint
    with pytest.raises(SgaError, match="long-caption mode"):
        _teacher(parts, long_captions="wrap")


def test_spans_outside_the_caption_are_rejected(parts):
    with pytest.raises(ValueError, match="span"):
        _teacher(parts).ground([GroundingInput(_image(40, 40), "a red circle", [(5, 40)])])


# ---- teacher directories and the fingerprint ---------------------------------------------------------------

def test_teacher_directory_round_trip(parts, teacher_dir):
    loaded = load_teacher(str(teacher_dir), score_floor=0.0, top_k=5)
    direct = _teacher(parts, score_floor=0.0, top_k=5)
    assert loaded.fingerprint == direct.fingerprint
    sample = GroundingInput(_image(90, 120), "a red circle next to a blue square", [(2, 12)])
    np.testing.assert_array_equal(loaded.ground([sample])[0][0].boxes, direct.ground([sample])[0][0].boxes)


def test_fingerprint_changes_iff_an_input_changes(parts, teacher_dir):
    model, tokenizer = parts
    base = load_teacher(str(teacher_dir)).fingerprint
    assert load_teacher(str(teacher_dir)).fingerprint == base
    assert len(base) == 16 and int(base, 16) >= 0
    # Device is not part of it: the same weights and settings are the same teacher.
    inference = InferenceConfig(score_floor=0.05, top_k=10, precision="fp32")
    assert MDETRTeacher(model, tokenizer, PREPROCESS, inference).fingerprint == base
    replace = dataclasses.replace
    changed = {
        "score floor": MDETRTeacher(model, tokenizer, PREPROCESS, replace(inference, score_floor=0.1)),
        "top k": MDETRTeacher(model, tokenizer, PREPROCESS, replace(inference, top_k=5)),
        "image size": MDETRTeacher(model, tokenizer, replace(PREPROCESS, short_side=64), inference),
        "tokenizer": MDETRTeacher(model, train_tokenizer(CAPTIONS, vocab_size=290), PREPROCESS, inference),
    }
    for what, teacher in changed.items():
        assert teacher.fingerprint != base, what
    edited = build_mdetr(model.config)
    edited.load_state_dict(model.state_dict())
    with torch.no_grad():
        edited.class_embed.bias[0] += 1e-6
    assert MDETRTeacher(edited, tokenizer, PREPROCESS, inference).fingerprint != base
    bigger = build_mdetr(dataclasses.replace(model.config, num_queries=7))
    assert MDETRTeacher(bigger, tokenizer, PREPROCESS, inference).fingerprint != base


def test_bf16_autocast_changes_the_fingerprint_not_the_answer(parts):
    sample = GroundingInput(_image(90, 120), "a red circle next to a blue square", [(2, 12)])
    fp32 = _teacher(parts, score_floor=0.0, top_k=6)
    bf16 = _teacher(parts, score_floor=0.0, top_k=6, precision="bf16")
    assert bf16.inference.precision == "bf16" and bf16.fingerprint != fp32.fingerprint
    a, b = fp32.ground([sample])[0][0], bf16.ground([sample])[0][0]
    np.testing.assert_allclose(np.sort(a.scores), np.sort(b.scores), atol=0.05)
    with pytest.raises(SgaError, match="fp16"):
        _teacher(parts, precision="fp16")


def test_convert_released_layout_checkpoint_to_teacher_dir(parts, tmp_path):
    _, tokenizer = parts
    torch.manual_seed(1)
    model = build_mdetr("tiny")
    torch.manual_seed(2)
    ema = build_mdetr("tiny").state_dict()
    args = argparse.Namespace(lr=1e-4, output_dir=pathlib.PosixPath("/runs/x"))
    torch.save({"model": model.state_dict(), "model_ema": ema, "optimizer": {}, "epoch": 3, "args": args},
               tmp_path / "ck.pth")
    tokenizer.save_pretrained(str(tmp_path / "roberta"))
    out = tmp_path / "converted"
    code = main(["teacher", "convert", "--src", str(tmp_path / "ck.pth"), "--tokenizer",
                 str(tmp_path / "roberta"), "--out", str(out), "--entry", "tiny", "--short-side", "64",
                 "--max-size", "128"])
    assert code == 0
    teacher = load_teacher(str(out), score_floor=0.0, top_k=3)
    assert teacher.preprocess.short_side == 64
    assert torch.equal(teacher.model.class_embed.bias, ema["class_embed.bias"])   # EMA weights preferred
    answer = teacher.ground([GroundingInput(_image(70, 90), "a red circle", [(2, 12)])])[0][0]
    assert answer.boxes.shape == (3, 4)
