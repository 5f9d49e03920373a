"""The student's WordPiece tokenizer: train one on captions, save it, load it from a local directory.

A tokenizer directory holds ``tokenizer.json`` (the ``tokenizers`` pipeline), ``vocab.txt`` and
``tokenizer_config.json``, i.e. what ``BertTokenizerFast.save_pretrained`` writes; any local BERT
checkpoint directory with its tokenizer files loads the same way. The pipeline is BERT's: lower-casing
and accent stripping, whitespace and punctuation pre-splitting, WordPiece with ``##`` continuations, and
``[CLS] ... [SEP]`` around every caption.

The synthetic world's tokenizer ships in ``student/assets/tokenizer`` (:data:`DEFAULT_TOKENIZER_DIR`). It
was produced by ``python -m student.tokenizer --world DIR --out student/assets/tokenizer`` on a world
built by ``sga world``; the vocabulary size is chosen large enough that every word of the world's
captions is a single wordpiece (the command prints that coverage).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from shards.errors import SgaError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
DEFAULT_TOKENIZER_DIR = Path(__file__).parent / "assets" / "tokenizer"


def train_wordpiece(captions: Iterable[str], out_dir: str | Path, vocab_size: int,
                    min_frequency: int = 1) -> Path:
    """Train a BERT-style WordPiece tokenizer on ``captions`` and save it in ``out_dir``.

    Words seen at least ``min_frequency`` times become whole wordpieces while the vocabulary has room; the
    rest split into sub-words, down to single characters (every character of the captions is in the
    alphabet, so no caption word becomes ``[UNK]``). Returns ``out_dir``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tok.train_from_iterator(captions, trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", do_lower_case=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    tok.model.save(str(out))  # vocab.txt, for tools that read a plain BERT vocabulary
    return out


def load_tokenizer(path: str | Path | None = None) -> Any:
    """``BertTokenizerFast`` from a local directory (default: the shipped synthetic-world tokenizer)."""
    from transformers import BertTokenizerFast

    path = Path(path) if path is not None else DEFAULT_TOKENIZER_DIR
    try:
        return BertTokenizerFast.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise SgaError(f"cannot load a WordPiece tokenizer from {path}: {exc}. Pass a directory written "
                       "by student.tokenizer.train_wordpiece or a local BERT checkpoint with vocab files."
                       ) from exc


def caption_encoder(tokenizer: Any, max_length: int) -> Any:
    """A private copy of ``tokenizer``'s Rust pipeline (``tokenizers.Tokenizer``) that truncates to
    ``max_length`` wordpieces ([CLS] and [SEP] included) on the tokenizer's truncation side.

    ``encoder.encode(text)`` gives the ids and character offsets of ``tokenizer(text, truncation=True,
    max_length=max_length, return_offsets_mapping=True)`` without the Python wrapper's per-call work (it
    was a third of the student collator's time). A copy, so the shared tokenizer's settings stay as they
    are; no padding, which the caller does for a whole batch at once.
    """
    from tokenizers import Tokenizer

    encoder = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    encoder.enable_truncation(max_length, direction=tokenizer.truncation_side)
    encoder.no_padding()
    return encoder


def word_coverage(tokenizer: Any, captions: Iterable[str]) -> dict[str, float | int]:
    """How the tokenizer splits the captions' words: counts of words kept whole, split, and unknown."""
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    norm = tokenizer.backend_tokenizer.normalizer
    words = {w for c in captions for w, _ in pre.pre_tokenize_str(norm.normalize_str(c))}
    vocab = tokenizer.get_vocab()
    unknown = sum(tokenizer.unk_token_id in tokenizer.convert_tokens_to_ids(tokenizer.tokenize(w))
                  for w in words)
    whole = sum(w in vocab for w in words)
    return {"words": len(words), "whole": whole, "split": len(words) - whole - unknown, "unknown": unknown,
            "vocab_size": len(tokenizer)}


def world_texts(world_dir: str) -> list[str]:
    """Every text of a synthetic world the student will read: captions (pre-training and task images),
    referring expressions, VQA questions and answers, VCR questions, answers and rationales."""
    from shards import fs
    from shards.images import iter_image_shard, list_shards

    texts = []
    for sub in ("images", "tasks/images"):
        root = fs.join(world_dir, sub)
        if fs.exists(root):
            for shard in list_shards(root):
                texts += [s.caption for s in iter_image_shard(root, shard) if s.caption]
    tasks = fs.join(world_dir, "tasks")
    for split in ("train", "val", "test"):
        refexp = fs.join(tasks, "refexp", f"{split}.json")
        if fs.exists(refexp):
            texts += [entry["expression"] for entry in fs.read_json(refexp)]
        questions = fs.join(tasks, "vqa", f"v2_OpenEnded_synthetic_{split}_questions.json")
        if fs.exists(questions):
            texts += [q["question"] for q in fs.read_json(questions)["questions"]]
        answers = fs.join(tasks, "vqa", f"v2_synthetic_{split}_annotations.json")
        if fs.exists(answers):
            texts += [a["answer"] for ann in fs.read_json(answers)["annotations"] for a in ann["answers"]]
        vcr = fs.join(tasks, "vcr", f"{split}.jsonl")
        if fs.exists(vcr):
            for line in fs.read_bytes(vcr).decode().splitlines():
                item = json.loads(line)
                texts.append(" ".join(item["question"]))
                texts += [" ".join(c) for c in item["answer_choices"] + item["rationale_choices"]]
    return texts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the WordPiece tokenizer on a synthetic world.")
    parser.add_argument("--world", required=True, help="directory written by `sga world`")
    parser.add_argument("--out", default=str(DEFAULT_TOKENIZER_DIR))
    parser.add_argument("--vocab-size", type=int, default=1000)
    args = parser.parse_args(argv)
    texts = world_texts(args.world)
    if not texts:
        raise SgaError(f"no captions under {args.world}/images; build a world with `sga world --out DIR`")
    out = train_wordpiece(texts, args.out, args.vocab_size)
    print(json.dumps({"out": str(out), "texts": len(texts), **word_coverage(load_tokenizer(out), texts)}))


if __name__ == "__main__":
    main()
