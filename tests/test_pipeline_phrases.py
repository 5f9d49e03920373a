"""Noun phrases with the real spaCy pipeline, and the per-shard phrase cache."""

from __future__ import annotations

import numpy as np
import pytest
from spacy.tokens import Doc

from pipeline.phrases import (
    NEEDED_COMPONENTS,
    PhraseCache,
    PhraseConfig,
    PhraseExtractor,
    cache_slug,
    describe_model,
)
from shards import fs
from shards.synthetic.captions import make_caption
from shards.synthetic.scene import SceneConfig, sample_scene


def _world_captions(seed: int, n: int = 300) -> list[str]:
    rng = np.random.default_rng(seed)
    return [make_caption(sample_scene(rng, SceneConfig()), rng).text for _ in range(n)]


@pytest.fixture(scope="module")
def extractor():
    return PhraseExtractor(PhraseConfig(batch_size=4))


def test_noun_chunks_as_exact_character_spans(extractor):
    captions = ["a small striped red circle to the left of a big blue square on a sunny day",
                "It is here.", "so beautiful", "   ", "Two dogs and THE Eiffel Tower, at night"]
    spans = extractor.extract(captions)
    texts = [[c[s:e] for s, e in row] for c, row in zip(captions, spans)]
    assert texts[0] == ["a small striped red circle", "the left", "a big blue square", "a sunny day"]
    assert texts[1] == []           # a pronoun grounds nothing on its own
    assert texts[2] == [] and texts[3] == []
    assert "Two dogs" in texts[4] and "THE Eiffel Tower" in texts[4]
    assert all(0 <= s < e <= len(c) for c, row in zip(captions, spans) for s, e in row)


def test_only_the_components_noun_chunks_need_are_loaded(extractor):
    assert set(extractor.nlp.pipe_names) <= set(NEEDED_COMPONENTS)
    assert {"tagger", "parser"} <= set(extractor.nlp.pipe_names)
    package, meta, ident = describe_model(PhraseConfig())
    assert ident == extractor.extractor_id and meta["version"] in ident
    assert package.startswith("en_core_web_sm")
    capped = PhraseExtractor(PhraseConfig(max_phrases=2))
    assert len(capped.extract(["a cat, a dog, a bird and a fish"])[0]) == 2
    # The cap changes the phrases, so it names another extractor: its own label sets and phrase cache.
    assert capped.extractor_id == f"{ident}/max2" and capped.cache_slug != extractor.cache_slug
    assert describe_model(PhraseConfig(batch_size=7))[2] == ident


def test_cache_reuses_rows_and_notices_changed_captions(tmp_path, extractor):
    items = [("k1", "a red circle"), ("k2", "two blue squares near a tree")]
    cache = PhraseCache(str(tmp_path), "00003", extractor)
    first = cache.get(items)
    assert (cache.hits, cache.misses) == (0, 2)
    cache.save()
    path = fs.join(str(tmp_path), "_phrases", cache_slug(extractor.extractor_id), "00003.parquet")
    assert fs.exists(path)

    reread = PhraseCache(str(tmp_path), "00003", extractor)
    assert reread.get(items) == first and (reread.hits, reread.misses) == (2, 0)
    changed = reread.get([("k1", "a green triangle and a star")])
    assert reread.misses == 1 and [("a green triangle and a star"[s:e]) for s, e in changed[0]] == \
        ["a green triangle", "a star"]

    fs.write_bytes(path, b"not parquet")          # a damaged cache is rebuilt, never trusted
    damaged = PhraseCache(str(tmp_path), "00003", extractor)
    assert damaged.get(items) == first and damaged.misses == 2


# Web-caption English beyond the world's templates: expletives, auxiliaries, contractions, determiners used
# as pronouns, whitespace tokens, proper nouns, numbers, punctuation.
MIXED_CAPTIONS = [
    "there is a cat on the roof", "There are two old bikes near the wall.", "it's a dog's life",
    "this is what we do", "that one is mine", "all of them are here", "do n't touch the red button",
    "the man who has a hat does not smile", "a  photo  of\tthe beach", "New York City at night, 1999",
    "I have been to Paris", "these are the best days", "have you seen my keys?", "some like it hot",
    "whether or not the bridge holds", "Is this the place?", "an apple, a pear and 3 plums",
    "she'd rather be at the beach", "what a view!", "the cat that I saw was black",
    "   leading and trailing spaces  ", "no. 5 on the list", "he did it", "they were there",
] * 2


def test_pos_memo_gives_exactly_the_ruler_s_chunks(extractor):
    captions = _world_captions(seed=3) + MIXED_CAPTIONS
    memo = extractor.pos
    assert memo is not None and memo.enabled
    memo.memo.clear()
    memo.hits = memo.misses = 0
    extractor.memo.clear()                  # every caption parsed, none answered by the caption memo
    with_memo = extractor.extract(captions)
    assert memo.hits > len(set(captions)) // 2        # most docs are answered from memory
    extractor.pos = None
    extractor.memo.clear()
    try:
        with_ruler = extractor.extract(captions)
    finally:
        extractor.pos = memo
    assert with_memo == with_ruler
    # Stronger than equal chunks: every token's POS is the ruler's (AUX vs VERB after "there" included).
    for doc in extractor.nlp.pipe(captions, disable=["attribute_ruler"]):
        by_ruler = memo.ruler(Doc(doc.vocab).from_bytes(doc.to_bytes()))
        by_memo = memo(doc)
        assert [t.pos_ for t in by_memo] == [t.pos_ for t in by_ruler], doc.text


def test_numpy_matmul_gives_blis_s_phrases(extractor):
    """The pipeline's matrix products run on numpy's BLAS (for speed); its phrases must be BLIS's."""
    from thinc.api import NumpyOps

    nodes = [node for _, proc in extractor.nlp.pipeline if hasattr(proc, "model")
             for node in proc.model.walk()]
    assert nodes and all(isinstance(n.ops, NumpyOps) and not n.ops.use_blis for n in nodes)
    captions = _world_captions(seed=11) + MIXED_CAPTIONS
    extractor.memo.clear()
    with_numpy = extractor.extract(captions)
    extractor.memo.clear()
    blis = NumpyOps(use_blis=True)
    saved = [node.ops for node in nodes]
    for node in nodes:
        node.ops = blis
    try:
        with_blis = extractor.extract(captions)
    finally:
        for node, ops in zip(nodes, saved):
            node.ops = ops
    assert with_numpy == with_blis


def test_caption_memo_answers_repeats_exactly_and_stays_bounded(extractor, monkeypatch):
    """Repeated captions skip spaCy (within a call and across calls) with the phrases a parse gives; the
    memo keeps only the most recently used ``MEMO_CAPTIONS`` captions."""
    import pipeline.phrases as phrases

    captions = _world_captions(seed=5, n=60) + MIXED_CAPTIONS          # MIXED_CAPTIONS repeats itself
    parsed: list[str] = []
    pipe = extractor.nlp.pipe

    def counting(texts, **kwargs):
        texts = list(texts)
        parsed.extend(texts)
        return pipe(texts, **kwargs)

    extractor.memo.clear()
    monkeypatch.setattr(extractor.nlp, "pipe", counting)
    first = extractor.extract(captions)
    assert sorted(parsed) == sorted(set(captions))                     # each distinct caption parsed once
    parsed.clear()
    assert extractor.extract(list(reversed(captions))) == first[::-1] and parsed == []
    first[0].append((0, 1))                                            # callers get copies
    assert extractor.extract(captions[:1])[0] != first[0]

    fresh = PhraseExtractor(PhraseConfig(batch_size=4))                # no memory at all
    assert fresh.extract(captions) == extractor.extract(captions)

    monkeypatch.setattr(phrases, "MEMO_CAPTIONS", 10)
    extractor.extract(captions[:30])
    assert list(extractor.memo) == captions[20:30]                     # least recently used dropped
    parsed.clear()
    extractor.extract(captions[25:30] + captions[:2])
    assert parsed == captions[:2]
