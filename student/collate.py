"""Turn a list of student samples into one padded pre-training batch.

Input: the per-sample dicts of the contract ("Student batch"), as yielded by ``student/data.py``::

    {"key": str, "caption": str, "phrase_spans": [(start, end), ...], "align": bool [P, R],
     "boxes": float32 [R, 4] pixel xyxy, "features": float16 [R, D], "cls_prob": float16 [R, C] | None,
     "image_w": int, "image_h": int}

The stages, in order: ITM caption swaps -> tokenisation (phrase character spans -> wordpiece indices
through the offset mapping) -> MLM masking -> regions ([IMG] token, region masking) -> grounding pairs
(:func:`student.sampling.sample_pairs`) -> padding. Every random choice uses the ``torch.Generator`` passed
to the call, so a batch is a pure function of (samples, generator state). The batch is built in numpy (the
generator's draws are read as numpy arrays) and becomes tensors once at the end: at B = 32, the per-op
overhead of small torch ops costs more than their arithmetic.

Output keys (B samples, L wordpieces, V = R_max + 1 visual tokens with [IMG] first, P phrases,
T wordpieces per phrase, N sampled pairs):

============================  ======================  ========================================================
key                           shape / dtype           meaning
============================  ======================  ========================================================
``input_ids``                 [B, L] long             wordpieces after MLM corruption, ``[CLS] ... [SEP]``
``attention_mask``            [B, L] bool             real wordpieces
``mlm_labels``                [B, L] long             original id at MLM-selected positions, -100 elsewhere
``region_features``           [B, V, D] float32       [IMG] = mean of the unmasked regions; masked rows = 0
``region_boxes``              [B, V, 4] float32       normalised xyxy in [0, 1]; [IMG] = (0, 0, 1, 1)
``region_mask``               [B, V] bool             real visual tokens ([IMG] always)
``mrc_mask``                  [B, V] bool             masked regions with a detector distribution
``mrc_targets``               [B, V, C] float32       detector cls_prob rows (sum 1) at ``mrc_mask``, else 0
``itm_label``                 [B] float32             1 = the caption belongs to the image, 0 = swapped
``phrase_tokens``             [B, P, T] long          text positions of each kept phrase's wordpieces, in
                                                      caption order (0-padded; slots past the kept ones empty)
``phrase_token_mask``         [B, P, T] bool          real entries of ``phrase_tokens``
``phrase_mask``               [B, P] bool             real phrases (none on swapped captions)
``gnd_batch``                 [N] long                sample of each sampled (region, phrase) pair
``gnd_phrase``                [N] long                phrase slot into P
``gnd_region``                [N] long                visual-token index into V (>= 1: never [IMG])
``gnd_label``                 [N] float32             the pseudo label M* of the pair
============================  ======================  ========================================================

Choices: masked regions lose their features but keep their boxes (ViLBERT) and stay grounding candidates;
[IMG] averages only unmasked regions so it cannot leak a masked feature. A swapped caption brings no
phrases, because the other image's pseudo labels say nothing about this image. Phrases whose wordpieces
were all truncated away are dropped with their row of M. MLM and MRC are applied to every sample; the
criterion counts them only on matched pairs. A loss missing from ``config.losses`` also switches off its
input corruption (no MLM masking without ``mlm``, no region masking without ``mrc``, no swaps without
``itm``) and its targets (no pairs without ``gnd``).
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import numpy as np
import torch

from shards.errors import SgaError

from .config import StudentConfig
from .sampling import sample_pairs
from .spatial import IMAGE_BOX
from .tokenizer import caption_encoder

IGNORE_INDEX = -100


def _rows(arrays: list[np.ndarray], width: int) -> np.ndarray:
    """The rows of ``arrays`` (each ``[r_i, width]``) stacked as float32 ``[sum r_i, width]``.

    float16 is converted by torch: numpy's float16 -> float32 cast is about ten times slower.
    """
    arrays = [a for a in arrays if len(a)]
    if not arrays:
        return np.zeros((0, width), np.float32)
    return torch.from_numpy(np.concatenate(arrays)).float().numpy()


class Collator:
    """``Collator(tokenizer, config)(samples, generator) -> dict[str, Tensor]`` (keys in the module doc)."""

    def __init__(self, tokenizer: Any, config: StudentConfig):
        if len(tokenizer) > config.vocab_size:
            raise SgaError(f"tokenizer has {len(tokenizer)} tokens but config.vocab_size is "
                             f"{config.vocab_size}; set vocab_size = len(tokenizer)")
        self.tokenizer = tokenizer
        self.encoder = caption_encoder(tokenizer, config.max_text_len)
        self.config = config
        special = set(tokenizer.all_special_ids)
        # MLM's random replacements are ordinary wordpieces, never [PAD]/[CLS]/[SEP]/[MASK]/[UNK].
        self.random_ids = np.array([i for i in range(len(tokenizer)) if i not in special], dtype=np.int64)
        # Any wordpiece of the caption may be an MLM target ([UNK] too, as in BERT); the frame may not.
        self.frame_ids = (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
        # A disabled loss also disables its corruption: masking without a target only hides input.
        self.mlm_prob = config.mlm_prob if "mlm" in config.losses else 0.0
        self.mrc_prob = config.mrc_prob if "mrc" in config.losses else 0.0
        self.use_itm = "itm" in config.losses
        self.use_gnd = "gnd" in config.losses

    def __call__(self, samples: list[dict], generator: torch.Generator) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("Collator: empty batch")
        for s in samples:
            expected = (len(s["phrase_spans"]), len(s["boxes"]))
            if tuple(np.shape(s["align"])) != expected:
                raise ValueError(f"sample {s['key']}: align has shape {np.shape(s['align'])}, expected "
                                 f"(phrases, regions) = {expected}")
        partner = self._itm_partners(samples, generator)
        matched = partner == np.arange(len(samples))
        # One caption at a time: encode_batch is no faster at B = 32 and would start a thread pool.
        encodings = [self.encoder.encode(samples[j]["caption"]) for j in partner]
        batch = self._text(encodings, generator)
        batch["itm_label"] = matched.astype(np.float32)
        counts = np.array([min(len(s["boxes"]), self.config.max_regions) for s in samples])
        batch.update(self._regions(samples, counts, generator))
        batch.update(self._phrases(samples, matched, encodings, batch["attention_mask"], counts, generator))
        return {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
                for k, v in batch.items()}

    # stage 1: ITM negatives ----------------------------------------------------------------------------
    def _itm_partners(self, samples: list[dict], generator: torch.Generator) -> np.ndarray:
        """Index ``[B]`` of the sample whose caption each image gets: itself, or (ITM negative) another's."""
        n = len(samples)
        partner = np.arange(n)
        if not self.use_itm or n < 2:
            return partner
        swap = torch.rand(n, generator=generator).numpy() < self.config.itm_neg_prob
        draws = torch.rand(n, generator=generator).numpy()
        # A caption identical to the image's own would be a false negative: candidates are the samples
        # with another caption; the draw picks one of them, in sample order.
        ids: dict[str, int] = {}
        caption_id = np.array([ids.setdefault(s["caption"], len(ids)) for s in samples])
        swapped = np.flatnonzero(swap)
        others = caption_id[None, :] != caption_id[swapped, None]                  # [S, B]
        n_others = others.sum(1)
        has = n_others > 0
        pick = (draws[swapped] * n_others.astype(np.float32)).astype(np.int64)      # float32, like the draws
        nth = np.cumsum(others, axis=1) > pick[:, None]
        partner[swapped[has]] = nth.argmax(1)[has]
        return partner

    # stage 2+3: tokens and MLM -------------------------------------------------------------------------
    def _text(self, encodings: list, generator: torch.Generator) -> dict[str, np.ndarray]:
        rows = [e.ids for e in encodings]
        lengths = np.array([len(r) for r in rows])
        # Padded on the right (BERT's side): ``attention`` lists the real slots in row-major order.
        attention = np.arange(lengths.max()) < lengths[:, None]
        ids = np.full(attention.shape, self.tokenizer.pad_token_id, np.int64)
        ids[attention] = np.fromiter(chain.from_iterable(rows), np.int64, int(lengths.sum()))
        cfg = self.config
        pick = torch.rand(ids.shape, generator=generator).numpy()
        how = torch.rand(ids.shape, generator=generator).numpy()
        draw = torch.randint(len(self.random_ids), ids.shape, generator=generator).numpy()
        random_tok = self.random_ids[draw]
        candidates = attention.copy()
        for frame_id in self.frame_ids:                     # three compares: cheaper than np.isin here
            candidates &= ids != frame_id
        chosen = candidates & (pick < self.mlm_prob)
        to_mask = chosen & (how < cfg.mlm_mask_frac)
        to_random = chosen & (how >= cfg.mlm_mask_frac) & (how < cfg.mlm_mask_frac + cfg.mlm_random_frac)
        labels = np.where(chosen, ids, IGNORE_INDEX)
        corrupted = np.where(to_mask, self.tokenizer.mask_token_id, ids)
        corrupted = np.where(to_random, random_tok, corrupted)
        return {"input_ids": corrupted, "attention_mask": attention, "mlm_labels": labels}

    # stage 4: regions ----------------------------------------------------------------------------------
    def _regions(self, samples: list[dict], counts: np.ndarray,
                 generator: torch.Generator) -> dict[str, np.ndarray]:
        cfg = self.config
        B, V = len(samples), int(counts.max()) + 1
        for s, r in zip(samples, counts):
            if r and s["features"].shape[1] != cfg.feature_dim:
                raise SgaError(f"sample {s['key']}: features have dim {s['features'].shape[1]} but the "
                               f"student's feature_dim is {cfg.feature_dim}; build its config from this "
                               "region set")
        real = np.arange(V)[None, :] <= counts[:, None]
        real[:, 0] = False                                                   # [IMG] is not a region
        # Work on the regions' rows stacked in (sample, region) order, then place them in the padded batch
        # at once: ``slots`` are their flat indices there, ``owner`` their samples.
        slots = np.flatnonzero(real)
        owner = np.repeat(np.arange(B), counts)
        has_cls = np.array([s["cls_prob"] is not None for s in samples])
        probs = np.zeros((len(slots), cfg.num_classes), np.float32)
        probs[has_cls[owner]] = _rows([s["cls_prob"][:r] for s, r in zip(samples, counts)
                                       if s["cls_prob"] is not None], cfg.num_classes)
        total = probs.sum(1)
        # Only rows that are a distribution can be KL targets (none without cls_prob); renormalising
        # removes float16 rounding.
        draw = torch.rand(B, V, generator=generator).numpy().reshape(-1)[slots]
        masked = (draw < self.mrc_prob) & (total > 0)
        rows = _rows([s["features"][:r] for s, r in zip(samples, counts)], cfg.feature_dim)
        rows[masked] = 0.0
        # [IMG] (slot 0 of each sample) is the mean of the regions the model still sees, so it cannot leak a
        # masked feature.
        first = np.arange(B) * V
        feats = np.zeros((B * V, cfg.feature_dim), np.float32)
        feats[slots] = rows
        nonempty = counts > 0
        if nonempty.any():
            feats[first[nonempty]] = np.add.reduceat(rows, (np.cumsum(counts) - counts)[nonempty])
        feats[first] /= np.maximum(np.bincount(owner[~masked], minlength=B), 1)[:, None]
        # Normalised like student.spatial.normalize_boxes: pixel xyxy / (w, h, w, h), clamped to [0, 1].
        sizes = np.array([(s["image_w"], s["image_h"]) for s in samples], np.float32)
        boxes = np.zeros((B * V, 4), np.float32)
        boxes[slots] = np.clip(_rows([s["boxes"][:r] for s, r in zip(samples, counts)], 4)
                               / np.tile(sizes, 2)[owner], 0.0, 1.0)
        boxes[first] = IMAGE_BOX
        targets = np.zeros((B * V, cfg.num_classes), np.float32)
        targets[slots[masked]] = probs[masked] / total[masked, None]
        mrc_mask = np.zeros(B * V, bool)
        mrc_mask[slots[masked]] = True
        feats, boxes, targets, mrc_mask = (x.reshape(B, V, *x.shape[1:])
                                           for x in (feats, boxes, targets, mrc_mask))
        region_mask = real.copy()
        region_mask[:, 0] = True
        return {"region_features": feats, "region_boxes": boxes, "region_mask": region_mask,
                "mrc_mask": mrc_mask, "mrc_targets": targets}

    # stage 5+6: phrases and grounding pairs ----------------------------------------------------------
    def _phrases(self, samples: list[dict], matched: np.ndarray, encodings: list, attention: np.ndarray,
                 counts: np.ndarray, generator: torch.Generator) -> dict[str, np.ndarray | torch.Tensor]:
        B, L = attention.shape
        own = [b for b in range(B) if matched[b] and samples[b]["phrase_spans"]]
        n_phrases = np.zeros(B, np.int64)
        n_phrases[own] = [len(samples[b]["phrase_spans"]) for b in own]
        P, R = int(n_phrases.max()), int(counts.max())
        given = np.arange(P) < n_phrases[:, None]                                       # [B, P]
        span = np.zeros((B, P, 2), np.int64)
        align = np.zeros((B, P, R), bool)
        offsets = np.zeros((B, L, 2), np.int64)
        if own:
            # Filled like the regions: the flat slots of each mask, in (sample, phrase, ...) order.
            span[given] = list(chain.from_iterable(samples[b]["phrase_spans"] for b in own))
            align[given[..., None] & (np.arange(R) < counts[:, None, None])] = np.concatenate(
                [np.asarray(samples[b]["align"], dtype=bool)[:, :counts[b]].ravel() for b in own])
            # Character offsets only where a phrase needs them (a swapped caption has none).
            rows = np.zeros(B, bool)
            rows[own] = True
            pairs = chain.from_iterable(encodings[b].offsets for b in own)
            offsets[attention & rows[:, None]] = np.fromiter(
                chain.from_iterable(pairs), np.int64).reshape(-1, 2)
        starts, ends = offsets[:, None, :, 0], offsets[:, None, :, 1]                    # [B, 1, L]
        # A wordpiece belongs to a phrase when their character ranges overlap; [CLS], [SEP] and padding
        # have the empty range (0, 0).
        inside = ((ends > span[..., :1]) & (starts < span[..., 1:]) & (ends > starts)
                  & given[..., None])                                                # [B, P, L]
        kept = inside.any(-1)
        if not np.array_equal(kept, given):
            # Compact each row: kept phrases first, in caption order; phrases lost to truncation go.
            order = np.argsort(~kept, axis=1, kind="stable")[:, :int(kept.sum(1).max())]
            kept = np.take_along_axis(kept, order, 1)
            inside = np.take_along_axis(inside, order[..., None], 1)
            align = np.take_along_axis(align, order[..., None], 1)
        lengths = inside.sum(-1)
        T = max(1, int(lengths.max())) if lengths.size else 1
        positions = np.sort(np.where(inside, np.arange(L), L), -1)[..., :T]
        token_mask = np.arange(T) < lengths[..., None]
        out = {"phrase_tokens": np.where(token_mask, positions, 0), "phrase_token_mask": token_mask,
               "phrase_mask": kept}
        out.update(self._pairs(align, kept, counts, generator))
        return out

    def _pairs(self, align: np.ndarray, kept: np.ndarray, counts: np.ndarray,
               generator: torch.Generator) -> dict[str, np.ndarray | torch.Tensor]:
        """Sample pairs over the kept phrases; ``align`` is ``[B, P, R]`` M, ``kept`` ``[B, P]``."""
        owners = np.argwhere(kept)                                       # [Q, 2]: (sample, phrase slot)
        if not self.use_gnd or len(owners) == 0:
            empty = np.zeros(0, np.int64)
            return {"gnd_batch": empty, "gnd_phrase": empty, "gnd_region": empty,
                    "gnd_label": np.zeros(0, np.float32)}
        rows = align[kept]                                               # [Q, R]
        valid = np.arange(rows.shape[1]) < counts[owners[:, 0], None]
        phrase, region, label = sample_pairs(rows, valid, self.config.gnd_pairs_per_phrase,
                                             self.config.gnd_pos_fraction, generator)
        phrase = phrase.numpy()
        return {"gnd_batch": owners[phrase, 0], "gnd_phrase": owners[phrase, 1],
                "gnd_region": region + 1, "gnd_label": label.float()}
