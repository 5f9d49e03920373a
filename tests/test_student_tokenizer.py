"""WordPiece training, loading, and the shipped synthetic-world tokenizer (student/tokenizer.py)."""

import pytest

from shards.errors import SgaError
from shards.synthetic.world import WorldConfig, build_world
from student.tokenizer import (
    DEFAULT_TOKENIZER_DIR,
    caption_encoder,
    load_tokenizer,
    train_wordpiece,
    word_coverage,
    world_texts,
)

CAPTIONS = ["A red cube left of a blue ball.", "the green cylinder near two small spheres",
            "two red cubes and a tiny green ball"] * 5


def test_trained_tokenizer_round_trips_through_a_directory(tmp_path):
    out = train_wordpiece(CAPTIONS, tmp_path / "tok", vocab_size=200)
    assert {"tokenizer.json", "vocab.txt", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    tok = load_tokenizer(out)
    enc = tok("A red cube left of a blue ball.", return_offsets_mapping=True)
    pieces = tok.convert_ids_to_tokens(enc["input_ids"])
    assert pieces == ["[CLS]", "a", "red", "cube", "left", "of", "a", "blue", "ball", ".", "[SEP]"]
    assert enc["offset_mapping"][3] == (6, 10)                      # "cube" in the original string
    assert [tok.convert_ids_to_tokens(i) for i in tok.all_special_ids].count("[MASK]") == 1


def test_small_vocabulary_splits_words_into_pieces_but_never_unknown(tmp_path):
    tok = load_tokenizer(train_wordpiece(CAPTIONS, tmp_path / "tok", vocab_size=40))
    cover = word_coverage(tok, CAPTIONS)
    assert cover["unknown"] == 0 and cover["split"] > 0
    assert any(p.startswith("##") for p in tok.tokenize("cylinder spheres"))
    assert tok.unk_token_id in tok("zebra ~")["input_ids"]           # unseen characters are [UNK]


def test_loading_a_missing_directory_names_the_path(tmp_path):
    with pytest.raises(SgaError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")


def test_shipped_tokenizer_keeps_every_word_of_a_fresh_world_whole(tmp_path):
    """The asset was trained on a seed-0 world; a world with another seed must not bring new words."""
    build_world(WorldConfig(samples=150, seed=7, samples_per_shard=75, task_samples=60),
                str(tmp_path / "world"), show_progress=False)
    texts = world_texts(str(tmp_path / "world"))
    assert len(texts) > 300
    tok = load_tokenizer()
    cover = word_coverage(tok, texts)
    assert cover["unknown"] == 0 and cover["split"] == 0, cover
    assert cover["vocab_size"] == len(load_tokenizer(DEFAULT_TOKENIZER_DIR)) < 1000


def test_caption_encoder_matches_the_tokenizer_call_and_leaves_it_unchanged():
    tok = load_tokenizer()
    texts = [*CAPTIONS[:3], "Crème brûlée [SEP] a red cube", "", "zebra ~ " * 20]
    for max_length in (6, 64):
        encoder = caption_encoder(tok, max_length)
        for text in texts:
            want = tok(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
            got = encoder.encode(text)
            assert got.ids == want["input_ids"] and got.offsets == list(want["offset_mapping"])
    assert len(tok("zebra ~ " * 20)["input_ids"]) > 64             # the shared tokenizer still does not cut
