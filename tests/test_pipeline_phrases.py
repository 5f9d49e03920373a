"""Noun phrases with the real spaCy pipeline, and the per-shard phrase cache."""

from __future__ import annotations

import pytest

from pipeline.phrases import (
    NEEDED_COMPONENTS,
    PhraseCache,
    PhraseConfig,
    PhraseExtractor,
    cache_slug,
    describe_model,
)
from shards import fs


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
