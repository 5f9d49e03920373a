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
``phrase_tokens``             [B, P, T] long          text positions of each phrase's wordpieces (0-padded)
``phrase_token_mask``         [B, P, T] bool          real entries of ``phrase_tokens``
``phrase_mask``               [B, P] bool             real phrases (none on swapped captions)
``gnd_batch``                 [N] long                sample of each sampled (region, phrase) pair
``gnd_phrase``                [N] long                phrase index into P
``gnd_region``                [N] long                visual-token index into V (>= 1: never [IMG])
``gnd_label``                 [N] float32             the pseudo label M* of the pair
============================  ======================  ========================================================

Choices: masked regions lose their features but keep their boxes (ViLBERT) and stay grounding candidates;
[IMG] averages only unmasked regions so it cannot leak a masked feature. A swapped caption brings no
phrases, because the other image's pseudo labels say nothing about this image. Phrases whose wordpieces
were all truncated away are dropped with their row of M. MLM and MRC are applied to every sample; the
criterion counts them only on matched pairs.
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
        self.special_ids = torch.tensor(sorted(special))
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
        candidates = attention & ~torch.isin(ids, self.special_ids)
        cfg = self.config
        chosen = candidates & (torch.rand(ids.shape, generator=generator) < cfg.mlm_prob)
        how = torch.rand(ids.shape, generator=generator)
        to_mask = chosen & (how < cfg.mlm_mask_frac)
        to_random = chosen & (how >= cfg.mlm_mask_frac) & (how < cfg.mlm_mask_frac + cfg.mlm_random_frac)
        random_tok = self.random_ids[torch.randint(len(self.random_ids), ids.shape, generator=generator)]
        labels = torch.where(chosen, ids, IGNORE_INDEX)
        corrupted = torch.where(to_mask, self.tokenizer.mask_token_id, ids)
        corrupted = torch.where(to_random, random_tok, corrupted)
        offsets = torch.where(candidates[..., None], enc["offset_mapping"], 0)
        return {"input_ids": corrupted, "attention_mask": attention, "mlm_labels": labels,
                "offsets": offsets}

    # stage 4: regions ----------------------------------------------------------------------------------
    def _regions(self, samples: list[dict], generator: torch.Generator) -> dict[str, torch.Tensor]:
        cfg = self.config
        counts = [min(len(s["boxes"]), cfg.max_regions) for s in samples]
        B, V = len(samples), max(counts) + 1
        feats = torch.zeros(B, V, cfg.feature_dim)
        boxes = torch.zeros(B, V, 4)
        boxes[:, 0] = torch.tensor(IMAGE_BOX)
        region_mask = torch.zeros(B, V, dtype=torch.bool)
        region_mask[:, 0] = True
        mrc_mask = torch.zeros(B, V, dtype=torch.bool)
        targets = torch.zeros(B, V, cfg.num_classes)
        for b, (s, r) in enumerate(zip(samples, counts)):
            if r == 0:
                continue
            f = torch.from_numpy(np.asarray(s["features"][:r], dtype=np.float32))
            if f.shape[1] != cfg.feature_dim:
                raise SgaError(f"sample {s['key']}: features have dim {f.shape[1]} but the student's "
                               f"feature_dim is {cfg.feature_dim}; build its config from this region set")
            px = torch.from_numpy(np.asarray(s["boxes"][:r], dtype=np.float32))
            boxes[b, 1:r + 1] = normalize_boxes(px, s["image_w"], s["image_h"])
            region_mask[b, 1:r + 1] = True
            masked = torch.rand(r, generator=generator) < cfg.mrc_prob
            if s["cls_prob"] is not None:
                prob = torch.from_numpy(np.asarray(s["cls_prob"][:r], dtype=np.float32))
                total = prob.sum(1, keepdim=True)
                # Only rows that are a distribution can be KL targets; renormalise float16 rounding away.
                masked &= total.squeeze(1) > 0
                targets[b, 1:r + 1] = torch.where(masked[:, None], prob / total.clamp(min=1e-12), 0.0)
                mrc_mask[b, 1:r + 1] = masked
            kept = ~masked
            if kept.any():
                feats[b, 0] = f[kept].mean(0)
            feats[b, 1:r + 1] = torch.where(masked[:, None], 0.0, f)
        return {"region_features": feats, "region_boxes": boxes, "region_mask": region_mask,
                "mrc_mask": mrc_mask, "mrc_targets": targets, "region_count": torch.tensor(counts)}

    # stage 5+6: phrases and grounding pairs ----------------------------------------------------------
    def _phrases(self, spans: list[list], aligns: list[np.ndarray], offsets: torch.Tensor,
                 region_count: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        starts, ends = offsets[..., 0], offsets[..., 1]
        token_sets: list[list[torch.Tensor]] = []
        rows: list[np.ndarray] = []          # M rows of the kept phrases, truncated to the kept regions
        owner: list[tuple[int, int]] = []    # (sample, phrase slot) of each kept phrase
        for b, sample_spans in enumerate(spans):
            kept = []
            for p, (start, end) in enumerate(sample_spans):
                # A wordpiece belongs to a phrase when their character ranges overlap.
                inside = (ends[b] > start) & (starts[b] < end) & (ends[b] > starts[b])
                if inside.any():
                    owner.append((b, len(kept)))
                    kept.append(inside.nonzero().flatten())
                    rows.append(np.asarray(aligns[b][p], dtype=bool)[: int(region_count[b])])
            token_sets.append(kept)

        B = len(spans)
        P = max((len(k) for k in token_sets), default=0)
        T = max((len(t) for k in token_sets for t in k), default=1)
        phrase_tokens = torch.zeros(B, P, T, dtype=torch.long)
        phrase_token_mask = torch.zeros(B, P, T, dtype=torch.bool)
        for b, kept in enumerate(token_sets):
            for p, tokens in enumerate(kept):
                phrase_tokens[b, p, : len(tokens)] = tokens
                phrase_token_mask[b, p, : len(tokens)] = True
        out = {"phrase_tokens": phrase_tokens, "phrase_token_mask": phrase_token_mask,
               "phrase_mask": phrase_token_mask.any(-1)}
        out.update(self._pairs(rows, owner, region_count, generator))
        return out

    def _pairs(self, rows: list[np.ndarray], owner: list[tuple[int, int]], region_count: torch.Tensor,
               generator: torch.Generator) -> dict[str, torch.Tensor]:
        empty = torch.zeros(0, dtype=torch.long)
        if not self.use_gnd or not rows:
            return {"gnd_batch": empty, "gnd_phrase": empty, "gnd_region": empty,
                    "gnd_label": torch.zeros(0)}
        width = int(region_count.max())
        align = torch.zeros(len(rows), width, dtype=torch.bool)
        valid = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, row in enumerate(rows):
            align[i, : len(row)] = torch.from_numpy(row)
            valid[i, : int(region_count[owner[i][0]])] = True
        phrase, region, label = sample_pairs(align, valid, self.config.gnd_pairs_per_phrase,
                                             self.config.gnd_pos_fraction, generator)
        owners = torch.tensor(owner, dtype=torch.long).reshape(-1, 2)
        return {"gnd_batch": owners[phrase, 0], "gnd_phrase": owners[phrase, 1],
                "gnd_region": region + 1, "gnd_label": label.float()}
