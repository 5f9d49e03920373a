"""Turn a list of student samples into one padded pre-training batch.

Input: the per-sample dicts of the contract ("Student batch"), as yielded by ``student/data.py``::

    {"key": str, "caption": str, "phrase_spans": [(start, end), ...], "align": bool [P, R],
     "boxes": float32 [R, 4] pixel xyxy, "features": float16 [R, D], "cls_prob": float16 [R, C] | None,
     "image_w": int, "image_h": int}

The stages, in order: ITM caption swaps -> tokenisation (phrase character spans -> wordpiece indices
through the offset mapping) -> MLM masking -> regions ([IMG] token, region masking) -> grounding pairs
(:func:`student.sampling.sample_pairs`) -> padding. Every random choice uses the ``torch.Generator`` passed
to the call, so a batch is a pure function of (samples, generator state).

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

from typing import Any

import numpy as np
import torch

from shards.errors import SgaError

from .config import StudentConfig
from .sampling import sample_pairs
from .spatial import IMAGE_BOX, normalize_boxes

IGNORE_INDEX = -100


class Collator:
    """``Collator(tokenizer, config)(samples, generator) -> dict[str, Tensor]`` (keys in the module doc)."""

    def __init__(self, tokenizer: Any, config: StudentConfig):
        if len(tokenizer) > config.vocab_size:
            raise SgaError(f"tokenizer has {len(tokenizer)} tokens but config.vocab_size is "
                             f"{config.vocab_size}; set vocab_size = len(tokenizer)")
        self.tokenizer = tokenizer
        self.config = config
        special = set(tokenizer.all_special_ids)
        # MLM's random replacements are ordinary wordpieces, never [PAD]/[CLS]/[SEP]/[MASK]/[UNK].
        self.random_ids = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
        # Any wordpiece of the caption may be an MLM target ([UNK] too, as in BERT); the frame may not.
        self.frame_ids = torch.tensor([tokenizer.cls_token_id, tokenizer.sep_token_id,
                                       tokenizer.pad_token_id])
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
        captions = [samples[j]["caption"] for j in partner]
        batch = self._text(captions, generator)
        batch["itm_label"] = torch.tensor([float(i == j) for i, j in enumerate(partner)])
        batch.update(self._regions(samples, generator))
        spans = [samples[i]["phrase_spans"] if i == j else [] for i, j in enumerate(partner)]
        aligns = [samples[i]["align"] for i in range(len(samples))]
        batch.update(self._phrases(spans, aligns, batch.pop("offsets"), batch.pop("region_count"), generator))
        return batch

    # stage 1: ITM negatives ----------------------------------------------------------------------------
    def _itm_partners(self, samples: list[dict], generator: torch.Generator) -> list[int]:
        """Index of the sample whose caption each image gets: itself, or (ITM negative) another caption."""
        n = len(samples)
        partner = list(range(n))
        if not self.use_itm or n < 2:
            return partner
        swap = torch.rand(n, generator=generator) < self.config.itm_neg_prob
        draws = torch.rand(n, generator=generator)
        for i in swap.nonzero().flatten().tolist():
            # A caption identical to the image's own would be a false negative.
            others = [j for j in range(n) if samples[j]["caption"] != samples[i]["caption"]]
            if others:
                partner[i] = others[int(draws[i] * len(others))]
        return partner

    # stage 2+3: tokens and MLM -------------------------------------------------------------------------
    def _text(self, captions: list[str], generator: torch.Generator) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(captions, padding=True, truncation=True, max_length=self.config.max_text_len,
                             return_offsets_mapping=True, return_tensors="pt")
        ids = enc["input_ids"].long()
        attention = enc["attention_mask"].bool()
        candidates = attention & ~torch.isin(ids, self.frame_ids)
        cfg = self.config
        chosen = candidates & (torch.rand(ids.shape, generator=generator) < self.mlm_prob)
        how = torch.rand(ids.shape, generator=generator)
        to_mask = chosen & (how < cfg.mlm_mask_frac)
        to_random = chosen & (how >= cfg.mlm_mask_frac) & (how < cfg.mlm_mask_frac + cfg.mlm_random_frac)
        random_tok = self.random_ids[torch.randint(len(self.random_ids), ids.shape, generator=generator)]
        labels = torch.where(chosen, ids, IGNORE_INDEX)
        corrupted = torch.where(to_mask, self.tokenizer.mask_token_id, ids)
        corrupted = torch.where(to_random, random_tok, corrupted)
        return {"input_ids": corrupted, "attention_mask": attention, "mlm_labels": labels,
                "offsets": enc["offset_mapping"]}

    # stage 4: regions ----------------------------------------------------------------------------------
    def _regions(self, samples: list[dict], generator: torch.Generator) -> dict[str, torch.Tensor]:
        cfg = self.config
        counts = [min(len(s["boxes"]), cfg.max_regions) for s in samples]
        B, V = len(samples), max(counts) + 1
        # Gather into padded numpy arrays first: one torch conversion per batch, not per sample.
        feats = np.zeros((B, V, cfg.feature_dim), np.float32)
        pixels = np.zeros((B, V, 4), np.float32)
        probs = np.zeros((B, V, cfg.num_classes), np.float32)
        for b, (s, r) in enumerate(zip(samples, counts)):
            if r == 0:
                continue
            if s["features"].shape[1] != cfg.feature_dim:
                raise SgaError(f"sample {s['key']}: features have dim {s['features'].shape[1]} but the "
                               f"student's feature_dim is {cfg.feature_dim}; build its config from this "
                               "region set")
            feats[b, 1:r + 1] = s["features"][:r]
            pixels[b, 1:r + 1] = s["boxes"][:r]
            if s["cls_prob"] is not None:
                probs[b, 1:r + 1] = s["cls_prob"][:r]
        feats, probs = torch.from_numpy(feats), torch.from_numpy(probs)
        sizes = torch.tensor([[s["image_w"], s["image_h"]] for s in samples], dtype=torch.float32)
        boxes = normalize_boxes(torch.from_numpy(pixels), sizes[:, :1], sizes[:, 1:])
        boxes[:, 0] = torch.tensor(IMAGE_BOX)
        real = torch.arange(V)[None, :] <= torch.tensor(counts)[:, None]
        real[:, 0] = False                                                   # [IMG] is not a region
        total = probs.sum(-1, keepdim=True)
        # Only rows that are a distribution can be KL targets (none without cls_prob); renormalising
        # removes float16 rounding.
        masked = real & (torch.rand(B, V, generator=generator) < self.mrc_prob) & (total[..., 0] > 0)
        targets = torch.where(masked[..., None], probs / total.clamp(min=1e-12), 0.0)
        kept = (real & ~masked).unsqueeze(-1)
        # [IMG] is the mean of the regions the model still sees, so it cannot leak a masked feature.
        feats[:, 0] = (feats * kept).sum(1) / kept.sum(1).clamp(min=1)
        feats = torch.where(masked[..., None], 0.0, feats)
        region_mask = real.clone()
        region_mask[:, 0] = True
        return {"region_features": feats, "region_boxes": boxes, "region_mask": region_mask,
                "mrc_mask": masked, "mrc_targets": targets, "region_count": torch.tensor(counts)}

    # stage 5+6: phrases and grounding pairs ----------------------------------------------------------
    def _phrases(self, spans: list[list], aligns: list[np.ndarray], offsets: torch.Tensor,
                 region_count: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        B, L = offsets.shape[:2]
        P, R = max(len(s) for s in spans), int(region_count.max())
        span = torch.zeros(B, P, 2, dtype=torch.long)
        given = torch.zeros(B, P, dtype=torch.bool)
        align = torch.zeros(B, P, R, dtype=torch.bool)
        for b, sample_spans in enumerate(spans):
            if sample_spans:
                n, r = len(sample_spans), int(region_count[b])
                span[b, :n] = torch.tensor(sample_spans, dtype=torch.long).reshape(n, 2)
                given[b, :n] = True
                align[b, :n, :r] = torch.from_numpy(np.asarray(aligns[b], dtype=bool)[:, :r])
        starts, ends = offsets[..., 0].unsqueeze(1), offsets[..., 1].unsqueeze(1)     # [B, 1, L]
        # A wordpiece belongs to a phrase when their character ranges overlap; [CLS], [SEP] and padding
        # have the empty range (0, 0).
        inside = ((ends > span[..., :1]) & (starts < span[..., 1:]) & (ends > starts)
                  & given.unsqueeze(-1))                                             # [B, P, L]
        kept = inside.any(-1)
        # Compact each row: kept phrases first, in caption order; phrases lost to truncation go.
        order = torch.argsort((~kept).to(torch.uint8), dim=1, stable=True)
        P = int(kept.sum(1).max()) if kept.numel() else 0
        order = order[:, :P]
        kept = kept.gather(1, order)
        inside = inside.gather(1, order[..., None].expand(-1, -1, L))
        align = align.gather(1, order[..., None].expand(-1, -1, R))
        lengths = inside.sum(-1)
        T = max(1, int(lengths.max())) if lengths.numel() else 1
        positions = torch.where(inside, torch.arange(L), L).sort(-1).values[..., :T]
        token_mask = torch.arange(T) < lengths.unsqueeze(-1)
        out = {"phrase_tokens": torch.where(token_mask, positions, 0), "phrase_token_mask": token_mask,
               "phrase_mask": kept}
        out.update(self._pairs(align, kept, region_count, generator))
        return out

    def _pairs(self, align: torch.Tensor, kept: torch.Tensor, region_count: torch.Tensor,
               generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Sample pairs over the kept phrases; ``align`` is ``[B, P, R]`` M, ``kept`` ``[B, P]``."""
        owners = kept.nonzero()                                          # [Q, 2]: (sample, phrase slot)
        if not self.use_gnd or len(owners) == 0:
            empty = torch.zeros(0, dtype=torch.long)
            return {"gnd_batch": empty, "gnd_phrase": empty, "gnd_region": empty,
                    "gnd_label": torch.zeros(0)}
        rows = align[kept]                                               # [Q, R]
        valid = torch.arange(rows.shape[1]) < region_count[owners[:, 0]].unsqueeze(1)
        phrase, region, label = sample_pairs(rows, valid, self.config.gnd_pairs_per_phrase,
                                             self.config.gnd_pos_fraction, generator)
        return {"gnd_batch": owners[phrase, 0], "gnd_phrase": owners[phrase, 1],
                "gnd_region": region + 1, "gnd_label": label.float()}
