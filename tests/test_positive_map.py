"""Positive maps from character spans: MDETR's char_to_token rule and its whitespace fallbacks, on a real
byte-level BPE tokenizer trained here (RoBERTa conventions: trimmed offsets, <s> ... </s>)."""

import pytest
import torch

from teacher.positive_map import positive_map, token_span
from teacher.tokenizer import load_tokenizer, train_tokenizer

CAPTIONS = [
    "a red circle next to a blue square",
    "the green star, on a sunny day.",
    "two yellow hearts left of the black cross",
    "the red circle and the red circle",
    "a small striped purple hexagon above the big dotted orange diamond",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    torch.set_num_threads(1)
    return train_tokenizer(CAPTIONS, vocab_size=400)


def _span_text(tokenizer, caption: str, start: int, end: int) -> str | None:
    """The caption text covered by the tokens that ``token_span`` picks (None when it picks none)."""
    enc = tokenizer(caption)
    span = token_span(enc, start, end)
    if span is None:
        return None
    first, last = enc.token_to_chars(span[0]), enc.token_to_chars(span[1])
    return caption[first.start: last.end]


def test_exact_span_covers_the_phrase_tokens(tokenizer):
    caption = "a red circle next to a blue square"
    start = caption.index("red circle")
    assert _span_text(tokenizer, caption, start, start + len("red circle")) == "red circle"


@pytest.mark.parametrize("phrase", [" red circle", "red circle ", "  red circle  "])
def test_spans_starting_or_ending_on_spaces_fall_back_to_the_words(tokenizer, phrase):
    caption = "a  red circle  next to a blue square"
    start = caption.index(phrase)
    assert _span_text(tokenizer, caption, start, start + len(phrase)) == "red circle"


def test_three_leading_spaces_exceed_mdetrs_fallback(tokenizer):
    # MDETR tries start, start+1, start+2 only; with three spaces the span is dropped.
    caption = "a   red circle"
    assert token_span(tokenizer(caption), 1, len(caption)) is None


def test_punctuation_inside_and_outside_the_span(tokenizer):
    caption = "the green star, on a sunny day."
    start = caption.index("the green star")
    assert _span_text(tokenizer, caption, start, start + len("the green star")) == "the green star"
    assert _span_text(tokenizer, caption, start, start + len("the green star,")) == "the green star,"
    day = caption.index("a sunny day")
    assert _span_text(tokenizer, caption, day, day + len("a sunny day")) == "a sunny day"


def test_repeated_words_map_to_their_own_occurrence(tokenizer):
    caption = "the red circle and the red circle"
    first = caption.index("the red circle")
    second = caption.rindex("the red circle")
    enc = tokenizer(caption)
    a, b = token_span(enc, first, first + 14), token_span(enc, second, second + 14)
    assert a is not None and b is not None
    assert b[0] > a[1]
    assert a[1] - a[0] == b[1] - b[0]


def test_phrase_at_the_end_of_the_caption_stops_before_eos(tokenizer):
    caption = "two yellow hearts left of the black cross"
    start = caption.index("the black cross")
    enc = tokenizer(caption)
    first, last = token_span(enc, start, len(caption))
    eos = len(enc["input_ids"]) - 1
    assert enc["input_ids"][eos] == tokenizer.eos_token_id
    assert last == eos - 1
    assert caption[enc.token_to_chars(first).start:] == "the black cross"


def test_positive_map_rows_are_normalised_and_batched_positions_match(tokenizer):
    captions = ["a red circle next to a blue square", "the green star, on a sunny day."]
    spans = [[[(2, 12)], [(21, 34)], [(30, 30 + 1)]], [[(0, 14)], [(16, 16)]]]
    batch = tokenizer(captions, padding="longest", return_tensors="pt")
    for b, caption in enumerate(captions):
        batched = positive_map(batch, spans[b], 64, batch_index=b)
        alone = positive_map(tokenizer(caption), spans[b], 64)
        assert torch.equal(batched, alone)
        sums = batched.sum(-1)
        for p, phrase_spans in enumerate(spans[b]):
            start, end = phrase_spans[0]
            if end > start:
                assert sums[p] == pytest.approx(1.0, abs=1e-5)
                assert torch.allclose(batched[p][batched[p] > 0], batched[p].max())
            else:
                assert sums[p] == 0


def test_whitespace_only_and_truncated_spans_give_zero_rows(tokenizer):
    caption = "a red circle next to a blue square"
    enc = tokenizer(caption, truncation=True, max_length=5)
    square = caption.index("blue square")
    pm = positive_map(enc, [[(1, 2)], [(square, len(caption))], [(0, 12)]], 16)
    assert pm[0].sum() == 0            # the space between "a" and "red"
    assert pm[1].sum() == 0            # cut off by truncation
    assert pm[2].sum() == pytest.approx(1.0, abs=1e-5)


def test_positions_beyond_the_head_are_cut(tokenizer):
    caption = "a small striped purple hexagon above the big dotted orange diamond"
    enc = tokenizer(caption)
    first, last = token_span(enc, 0, len(caption))
    pm = positive_map(enc, [[(0, len(caption))]], num_positions=first + 2)
    assert (pm[0] > 0).sum() == 2 and last > first + 1


def test_saved_tokenizer_reloads_as_fast_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(str(tmp_path))
    again = load_tokenizer(tmp_path)
    caption = "the red circle and the red circle"
    assert again(caption)["input_ids"] == tokenizer(caption)["input_ids"]
    assert again.pad_token_id == 1 and again.bos_token_id == 0 and again.eos_token_id == 2
    assert again(caption).char_to_token(4) == tokenizer(caption).char_to_token(4)
