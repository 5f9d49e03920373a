"""Windows of whole phrases over captions longer than a text encoder (teacher.windows), counted here in
words plus two special tokens."""

import itertools

from teacher.windows import Window, caption_windows


def _words(text: str) -> int:
    return len(text.split()) + 2


def _spans(caption: str, phrases: list[str]) -> list[tuple[int, int]]:
    spans, at = [], 0
    for phrase in phrases:
        start = caption.index(phrase, at)
        spans.append((start, start + len(phrase)))
        at = start + len(phrase)
    return spans


def test_a_caption_that_fits_is_one_window_with_every_phrase():
    caption = "a red circle next to a blue square"
    spans = _spans(caption, ["a red circle", "a blue square"])
    assert caption_windows(caption, spans, _words, max_tokens=10) == [Window(0, len(caption), (0, 1))]
    assert caption_windows(caption, [], _words, max_tokens=3) == [Window(0, len(caption), ())]


def test_long_captions_split_into_fitting_windows_of_whole_phrases():
    phrases = [f"the {c} circle" for c in ("red", "blue", "green", "pink", "black", "white", "grey")]
    caption = " and ".join(phrases) + " on a table"
    spans = _spans(caption, phrases)
    windows = caption_windows(caption, spans, _words, max_tokens=12)
    assert len(windows) > 1 and windows[0].start == 0
    assert sorted(i for w in windows for i in w.phrases) == list(range(len(phrases)))   # each phrase once
    for w in windows:
        assert _words(caption[w.start: w.end]) <= 12
        assert w.end == spans[w.phrases[-1]][1]                                       # ends on a phrase
        assert all(w.start <= spans[i][0] and spans[i][1] <= w.end for i in w.phrases)
    # Greedy: no window could have taken the next window's first phrase as well.
    for a, b in itertools.pairwise(windows):
        assert _words(caption[a.start: spans[b.phrases[0]][1]]) > 12


def test_a_phrase_longer_than_the_budget_gets_a_window_of_its_own():
    long = "the very large extremely shiny metallic blue square box"
    caption = f"a cat and {long} and a dog"
    spans = _spans(caption, ["a cat", long, "a dog"])
    windows = caption_windows(caption, spans, _words, max_tokens=6)
    assert [w.phrases for w in windows] == [(0,), (1,), (2,)]
    assert caption[windows[1].start: windows[1].end] == long


def test_spans_out_of_order_and_nested_are_each_placed_once():
    caption = "the dog with a red ball and the cat near the old brown fence by the lake"
    outer = (0, 24)                                       # "the dog with a red ball"
    inner = (13, 24)                                      # "a red ball"
    spans = [_spans(caption, ["the old brown fence"])[0], inner, outer, _spans(caption, ["the lake"])[0]]
    windows = caption_windows(caption, spans, _words, max_tokens=9)
    assert sorted(i for w in windows for i in w.phrases) == [0, 1, 2, 3]
    assert next(w for w in windows if 2 in w.phrases) == next(w for w in windows if 1 in w.phrases)


def test_a_long_caption_is_cut_into_clauses_each_a_window():
    clauses = ["a red circle above a blue square", "our team shows the green star",
               "a tiny pink heart next to the black arrow; the grey hexagon"]
    caption = ", ".join(clauses) + "."
    phrases = ["a red circle", "a blue square", "our team", "the green star", "a tiny pink heart",
               "the black arrow", "the grey hexagon"]
    spans = _spans(caption, phrases)
    windows = caption_windows(caption, spans, _words, max_tokens=12)     # the caption: 29 words
    assert [caption[w.start: w.end] for w in windows] == [
        "a red circle above a blue square", "our team shows the green star",
        "a tiny pink heart next to the black arrow", "the grey hexagon"]
    assert [w.phrases for w in windows] == [(0, 1), (2, 3), (4, 5), (6,)]
    # The same caption fits a larger encoder and is read whole.
    whole = caption_windows(caption, spans, _words, max_tokens=40)
    assert whole == [Window(0, len(caption), tuple(range(7)))]


def test_a_clause_too_long_for_the_encoder_is_split_inside():
    first = " and ".join(f"the {c} circle" for c in ("red", "blue", "green", "pink"))
    caption = f"the teacher drew {first}, then a star"
    phrases = ["the teacher"] + [f"the {c} circle" for c in ("red", "blue", "green", "pink")] + ["a star"]
    spans = _spans(caption, phrases)
    windows = caption_windows(caption, spans, _words, max_tokens=9)
    assert windows[0].start == 0 and windows[-1].phrases == (5,)
    assert caption[windows[-1].start: windows[-1].end] == "then a star"             # from the clause's start
    assert sorted(i for w in windows[:-1] for i in w.phrases) == [0, 1, 2, 3, 4]
    assert len(windows) > 2 and all(_words(caption[w.start: w.end]) <= 9 for w in windows[1:-1])
