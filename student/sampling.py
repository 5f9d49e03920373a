"""Hierarchical sampling of (phrase, region) pairs for the grounding-alignment loss.

The pseudo-label matrix M (``align``, bool ``[P, R]``: phrase p is grounded in region r) is very
unbalanced: a phrase matches one to three of ~36 regions, and some phrases match none. Training on every
pair would teach the grounding layer to answer "no". :func:`sample_pairs` draws a balanced subset in two
levels, over all phrases of a batch at once:

1. **Phrases.** The batch gets a budget of ``b = pairs_per_phrase x (phrases with any region)`` pairs and a
   positive target ``T+ = min(round(pos_fraction·b), available positives)``. ``T+`` is spread over phrases
   by water-filling: each positive goes to the phrase holding the fewest positives so far, among phrases
   with positives left, so every phrase with a positive gets one before any gets a second, and phrases
   rich in positives make up for phrases short of them. The negative target is what keeps the batch at
   ``pos_fraction``: ``T- = round(T+·(1-f)/f)`` (at most ``b - T+``). Negatives are water-filled on top
   of the positives, so each phrase ends near ``pairs_per_phrase`` pairs and phrases without a positive
   are served first. Coverage floor: every phrase that got no positive and has a negative region gets at
   least one negative, even when that pushes the batch below ``pos_fraction`` (a batch without positives
   then still trains on negatives). Ties between equally-filled phrases go to a random phrase order.
2. **Regions.** Each phrase draws its quota of positives uniformly without replacement from its positive
   regions, and its negatives likewise from its negative regions, so a pair never appears twice.

When supply allows, the batch holds exactly ``b`` pairs with ``round(pos_fraction·b)`` positives. All
randomness comes from the ``torch.Generator`` argument: the same generator state gives the same pairs.
The arithmetic runs in numpy (the generator's draws are read as arrays): the matrices are small, and a
collator calls this once per batch, where per-op overhead of torch would dominate.
"""

from __future__ import annotations

import math

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def water_fill(capacity: ArrayLike, start: ArrayLike, total: int, priority: ArrayLike) -> np.ndarray:
    """Split ``total`` units over bins, always topping up the lowest bin, and return each bin's share.

    Args:
        capacity: integer ``[P]`` (numpy or CPU tensor), units each bin can still take.
        start: integer ``[P]``, each bin's level before filling.
        total: units to hand out, ``<= capacity.sum()``.
        priority: ``[P]`` distinct values; among bins on the same level the lower priority fills first.

    Returns:
        int64 numpy ``[P]`` shares with ``share <= capacity`` and ``share.sum() == total``. This equals
        handing out the units one at a time to the lowest bin (level = start + share) that has capacity left.
    """
    capacity = np.asarray(capacity, dtype=np.int64)
    start = np.asarray(start, dtype=np.int64)
    if total <= 0:
        return np.zeros_like(capacity)

    # Largest level L whose full fill fits in the budget, from the fill of every level at once (fill(L) is
    # non-decreasing in L; levels run up to the fullest bin, a few dozen at most).
    levels = np.arange(int(start.min()), int((start + capacity).max()) + 1)
    fills = np.minimum(np.maximum(levels[:, None] - start, 0), capacity)           # [levels, P]
    lo = int(np.searchsorted(fills.sum(1), total, side="right")) - 1
    share, lo = fills[lo], int(levels[lo])
    rest = total - int(share.sum())
    # The remainder goes one each to bins sitting exactly at level L with room left, by priority.
    eligible = (start + share == lo) & (share < capacity)
    order = np.argsort(np.where(eligible, np.asarray(priority, dtype=np.float64), math.inf), kind="stable")
    share[order[:rest]] += 1
    return share


def _ranks(pos: np.ndarray, neg: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank ``[P, R]`` of each positive among its row's positives, and of each negative among its row's
    negatives, by ascending key (one sort: negatives are keyed past every positive)."""
    order = np.argsort(np.where(pos | neg, keys + 2.0 * neg, np.inf), axis=1)     # keys in [0, 1)
    rank = np.argsort(order, axis=1)
    return rank, rank - pos.sum(1, keepdims=True)


def sample_pairs(align: ArrayLike, valid: ArrayLike, pairs_per_phrase: int, pos_fraction: float,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw (phrase, region) pairs from the pseudo labels of a batch (see the module docstring).

    Args:
        align: bool ``[P, R]`` (numpy or CPU tensor), M for every phrase of the batch stacked row-wise
            (columns padded to the batch's largest region count).
        valid: bool ``[P, R]``, which columns are real regions of the phrase's image.
        pairs_per_phrase: pair budget per phrase.
        pos_fraction: target share of positive pairs, in ``(0, 1]``.
        generator: the only source of randomness.

    Returns:
        ``(phrase, region, label)``: long ``[N]``, long ``[N]``, bool ``[N]`` tensors, sorted by phrase then
        region; ``label = align[phrase, region]``. ``N`` may be 0.
    """
    align = np.asarray(align, dtype=bool)
    valid = np.asarray(valid, dtype=bool)
    pos = align & valid
    neg = ~align & valid
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    budget = pairs_per_phrase * int(valid.any(1).sum())
    priority = torch.randperm(align.shape[0], generator=generator).numpy()

    want_pos = min(_round_half_up(pos_fraction * budget), int(n_pos.sum()))
    pos_count = water_fill(n_pos, np.zeros_like(n_pos), want_pos, priority)

    want_neg = min(_round_half_up(want_pos * (1.0 - pos_fraction) / pos_fraction), budget - want_pos)
    uncovered = int(((pos_count == 0) & (n_neg > 0)).sum())
    neg_total = min(max(want_neg, uncovered), int(n_neg.sum()))
    neg_count = water_fill(n_neg, pos_count, neg_total, priority)

    keys = torch.rand(align.shape, generator=generator).numpy().astype(np.float64)
    pos_rank, neg_rank = _ranks(pos, neg, keys)
    chosen = (pos & (pos_rank < pos_count[:, None])) | (neg & (neg_rank < neg_count[:, None]))
    phrase, region = np.nonzero(chosen)
    return torch.from_numpy(phrase), torch.from_numpy(region), torch.from_numpy(align[phrase, region])
