"""Tokenizers for MDETR teachers: train a small RoBERTa-style byte-level BPE, load any local fast tokenizer.

The tiny teacher's text encoder is a small RoBERTa, so its tokenizer mirrors roberta-base's conventions:
byte-level BPE, special tokens ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, ``<mask>``=4, captions wrapped
as ``<s> ... </s>``, and trimmed offsets (whitespace maps to no token, which is what MDETR's span fallbacks in
:mod:`teacher.positive_map` expect). It is saved as a transformers *fast* tokenizer because
``BatchEncoding.char_to_token`` only exists on fast tokenizers.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, RobertaTokenizerFast

from shards.errors import SgaError

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A byte-level BPE with at most ``vocab_size`` tokens, trained on ``texts`` (deterministic)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")),
        trim_offsets=True, add_prefix_space=False,
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>", cls_token="<s>", sep_token="</s>", padding_side="right",
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A fast tokenizer from a local directory: one saved by transformers, or roberta-base's
    ``vocab.json`` + ``merges.txt`` (what the official MDETR checkpoints need). Never touches the network."""
    path = Path(path)
    if not path.is_dir():
        raise SgaError(f"tokenizer directory {path} does not exist; pass a local directory with "
                       "tokenizer.json or vocab.json + merges.txt (e.g. roberta-base's files)")
    try:
        if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        else:
            tok = RobertaTokenizerFast.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise SgaError(f"cannot load a tokenizer from {path}: {exc}; it needs tokenizer.json or "
                       "vocab.json + merges.txt") from exc
    if not tok.is_fast:
        raise SgaError(f"tokenizer in {path} is not a fast tokenizer; MDETR's positive map needs "
                       "char_to_token")
    return tok
