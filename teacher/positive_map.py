"""From phrase character spans to token positions: MDETR's ``positive_map``.

A phrase ``[start, end)`` of the caption covers the tokens from ``char_to_token(start)`` to
``char_to_token(end - 1)``. RoBERTa-style tokenizers trim whitespace from token offsets, so a span that
begins or ends on a space maps to no token there; like MDETR, the start then moves right by up to two
characters and the end left by up to two more (``end - 2``, ``end - 3``), and a span that still finds no token
is dropped. The map has one row per phrase over the model's text positions; rows are normalised to sum to 1
(the soft target of the loss), and ``> 0`` recovers the phrase's tokens (what inference scores over).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import BatchEncoding

# Row normaliser's epsilon: keeps a row of a phrase that found no token at exactly zero.
_EPS = 1e-6


def _char_to_token(tokenized: BatchEncoding, batch_index: int, char: int) -> int | None:
    # Negative indices would count from the end; positions past the caption give None.
    return None if char < 0 else tokenized.char_to_token(batch_index, char)


def token_span(tokenized: BatchEncoding, start: int, end: int,
               batch_index: int = 0) -> tuple[int, int] | None:
    """First and last token index (inclusive) of the character span ``[start, end)``, or None.

    ``tokenized`` must come from a fast tokenizer (``char_to_token``). Tokens cut off by truncation give None.
    """
    if end <= start:
        return None
    first = next((t for c in (start, start + 1, start + 2)
                  if (t := _char_to_token(tokenized, batch_index, c)) is not None), None)
    last = next((t for c in (end - 1, end - 2, end - 3)
                 if (t := _char_to_token(tokenized, batch_index, c)) is not None), None)
    if first is None or last is None or last < first:
        return None
    return first, last


def positive_map(tokenized: BatchEncoding, spans: Sequence[Sequence[tuple[int, int]]], num_positions: int,
                 batch_index: int = 0) -> torch.Tensor:
    """float32 ``[P, num_positions]``: row ``p`` spreads mass 1 uniformly over the tokens of phrase ``p``.

    ``spans[p]`` lists the character spans of phrase ``p`` (usually one). A phrase none of whose spans maps
    to a token (whitespace only, truncated away, beyond ``num_positions``) gets an all-zero row.
    """
    out = torch.zeros((len(spans), num_positions), dtype=torch.float32)
    for p, phrase_spans in enumerate(spans):
        for start, end in phrase_spans:
            tokens = token_span(tokenized, start, end, batch_index)
            if tokens is not None and tokens[0] < num_positions:
                out[p, tokens[0]: min(tokens[1] + 1, num_positions)] = 1.0
    return out / (out.sum(dim=-1, keepdim=True) + _EPS)
