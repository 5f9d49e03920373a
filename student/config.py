"""The student's configuration: one dataclass for the encoder, its heads, the losses and the batch recipe.

``StudentConfig`` is the single source of truth shared by :mod:`student.collate` (masking, ITM negatives,
pair sampling, truncation), :mod:`student.model` (sizes) and :mod:`student.criterion` (loss list and
weights). It round-trips through JSON (``to_json`` / ``from_json``) so a checkpoint directory carries the
exact config it was trained with.

Two presets: ``StudentConfig.tiny()`` (hidden 64, 2 layers; CPU tests) and ``StudentConfig.base()``
(BERT-base text stream; ViLBERT's 6-layer 1024-wide visual stream with 6 co-attention blocks). The region
set decides ``feature_dim`` (D) and ``num_classes`` (C): read them from the set's ``regions.json``. The
tokenizer decides ``vocab_size``. A local Hugging Face BERT directory decides the text-stream sizes:
:func:`student.model.hf.config_from_bert` copies them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from shards.errors import SgaError

ENCODERS = ("single", "two")
PHRASE_LEVELS = ("lstm", "token")
LOSSES = ("mlm", "mrc", "itm", "gnd")


@dataclass
class StudentConfig:
    """Everything that shapes the student model, its batches and its losses.

    Text stream (also the joint stream of the single-stream encoder): ``hidden_size``, ``num_layers``,
    ``num_heads``, ``intermediate_size``, ``max_position``, ``type_vocab_size`` follow BERT's names.
    Visual stream and co-attention (two-stream only, ViLBERT): ``v_*`` and ``bi_*``; ``coattn_layers``
    co-attention blocks sit before the last ``coattn_layers`` layers of each stream.
    """

    encoder: str = "single"              # "single" (VL-BERT) | "two" (ViLBERT)
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.1
    init_std: float = 0.02
    text_init: str | None = None         # local Hugging Face BERT directory for the text stream, or None

    v_hidden_size: int = 1024
    v_num_layers: int = 6
    v_num_heads: int = 8
    v_intermediate_size: int = 1024
    coattn_layers: int = 6
    bi_hidden_size: int = 1024
    bi_num_heads: int = 8

    feature_dim: int = 2048              # D, from regions.json
    num_classes: int = 1601              # C, from regions.json (detector classes incl. background)
    spe: bool = True                     # add the sine-cosine box encoding to the 5-d box feature
    spe_dim: int = 128                   # total width of that encoding: 4 coordinates x spe_dim / 4

    phrase_level: str = "lstm"           # "lstm": one LSTM state per phrase | "token": every phrase token
    align_dim: int = 256                 # width of f_align's region / phrase projections

    losses: tuple[str, ...] = LOSSES
    weight_mlm: float = 1.0
    weight_mrc: float = 1.0
    weight_itm: float = 1.0              # lambda_align
    weight_gnd: float = 20.0             # lambda_gnd

    mlm_prob: float = 0.15               # share of text tokens chosen for MLM
    mlm_mask_frac: float = 0.8           # of those: replaced by [MASK]
    mlm_random_frac: float = 0.1         # of those: replaced by a random token (the rest stay)
    mrc_prob: float = 0.15               # share of regions whose features are zeroed and classified
    itm_neg_prob: float = 0.5            # share of samples whose caption is swapped with another's

    gnd_pairs_per_phrase: int = 8        # pair budget: this many (region, phrase) pairs per phrase
    gnd_pos_fraction: float = 0.5        # target share of positive pairs per batch

    max_text_len: int = 36               # wordpieces incl. [CLS] and [SEP]
    max_regions: int = 36                # detector regions kept per image (the [IMG] token comes on top)

    def __post_init__(self) -> None:
        self.losses = tuple(self.losses)
        self.validate()

    # presets -----------------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **overrides: Any) -> StudentConfig:
        """A few-hundred-kilobyte model for CPU tests and the synthetic world."""
        sizes = dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_position=64,
                     v_hidden_size=64, v_num_layers=2, v_num_heads=2, v_intermediate_size=128,
                     coattn_layers=1, bi_hidden_size=64, bi_num_heads=2, spe_dim=32, align_dim=32,
                     dropout=0.0)
        return cls(**{**sizes, **overrides})

    @classmethod
    def base(cls, **overrides: Any) -> StudentConfig:
        """BERT-base text stream; for ``encoder="two"`` ViLBERT's ``bert_base_6layer_6conect`` layout."""
        return cls(**overrides)

    # checks ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``SgaError`` naming the first inconsistent field."""
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise SgaError(f"StudentConfig: {what}")

        need(self.encoder in ENCODERS, f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        need(self.phrase_level in PHRASE_LEVELS,
             f"phrase_level must be one of {PHRASE_LEVELS}, got {self.phrase_level!r}")
        unknown = [name for name in self.losses if name not in LOSSES]
        need(not unknown, f"unknown losses {unknown}; choose from {LOSSES}")
        need(len(set(self.losses)) == len(self.losses) and self.losses, "losses must be non-empty, unique")
        need(self.hidden_size % self.num_heads == 0, "hidden_size must be a multiple of num_heads")
        if self.encoder == "two":
            need(self.v_hidden_size % self.v_num_heads == 0,
                 "v_hidden_size must be a multiple of v_num_heads")
            need(self.bi_hidden_size % self.bi_num_heads == 0,
                 "bi_hidden_size must be a multiple of bi_num_heads")
            need(1 <= self.coattn_layers <= min(self.num_layers, self.v_num_layers),
                 "coattn_layers must be between 1 and min(num_layers, v_num_layers)")
        need(self.spe_dim > 0 and self.spe_dim % 8 == 0, "spe_dim must be a positive multiple of 8")
        need(self.max_text_len >= 3, "max_text_len must leave room for [CLS], a word and [SEP]")
        need(self.max_text_len <= self.max_position, "max_text_len must not exceed max_position")
        need(self.max_regions >= 1, "max_regions must be >= 1")
        for name in ("mlm_prob", "mlm_mask_frac", "mlm_random_frac", "mrc_prob", "itm_neg_prob"):
            need(0.0 <= getattr(self, name) <= 1.0, f"{name} must lie in [0, 1]")
        need(self.mlm_mask_frac + self.mlm_random_frac <= 1.0, "mlm_mask_frac + mlm_random_frac must be <= 1")
        need(0.0 < self.gnd_pos_fraction <= 1.0, "gnd_pos_fraction must lie in (0, 1]")
        need(self.gnd_pairs_per_phrase >= 1, "gnd_pairs_per_phrase must be >= 1")

    # loss weights ------------------------------------------------------------------------------------
    @property
    def weight_dict(self) -> dict[str, float]:
        """Weight of each enabled loss term in the total ``L = mlm + mrc + λ_align·itm + λ_gnd·gnd``."""
        return {name: float(getattr(self, f"weight_{name}")) for name in self.losses}

    # JSON --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["losses"] = list(self.losses)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudentConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SgaError(f"StudentConfig: unknown fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StudentConfig:
        return cls.from_dict(json.loads(text))
