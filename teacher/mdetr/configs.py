"""MDETR configurations: one dataclass, the hub entries with the grounding layout, and ``tiny``.

The hub values are the fixed hyper-parameters of ``hubconf._make_detr`` in ashkamath/mdetr (see
``shared/notes/mdetr.md`` §1): d_model 256, 8 heads, 6+6 layers, FFN 2048, dropout 0.1, 100 queries, a
256-way soft-token head (255 text positions + no-object), 64-d contrastive projections, RoBERTa-base.
Entries whose state-dict layout is identical (``mdetr_resnet101`` and its RefCOCO/+/g fine-tunes, likewise for
EfficientNet-B3) map to the same configuration. The GQA, PhraseCut and CLEVR entries add question-answering or
segmentation heads and are not grounding teachers, so they are not provided.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from shards.errors import SgaError

# roberta-base's real configuration. ``RobertaConfig()`` defaults differ (512 positions, 2 token types,
# layer-norm eps 1e-12) and would give wrong shapes and numerics for the released checkpoints.
ROBERTA_BASE: dict[str, Any] = {
    "vocab_size": 50265,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 514,
    "type_vocab_size": 1,
    "layer_norm_eps": 1e-5,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
}

# A small RoBERTa for the tiny teacher; its vocabulary size is set by the tokenizer it is trained with.
# max_position_embeddings = 64 usable positions + 2, because RoBERTa numbers positions from pad_token_id + 1.
TINY_TEXT_ENCODER: dict[str, Any] = {
    **ROBERTA_BASE,
    "vocab_size": 1024,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 66,
}

BACKBONES = ("resnet50", "resnet101", "efficientnet_b3", "efficientnet_b5", "tiny_cnn")


@dataclass
class MDETRConfig:
    """Everything that decides the architecture (and so the state-dict layout) of an MDETR model.

    ``num_classes`` is the number of text token positions the soft-token head can point at; the head has
    ``num_classes + 1`` outputs and the last one (``no_object_index``) means "no object". Captions must
    tokenise to at most ``num_classes`` tokens (including ``<s>`` and ``</s>``).
    ``backbone_widths`` is used by ``tiny_cnn`` only: one stride-2 stage per width.
    """

    backbone: str = "resnet101"
    backbone_widths: tuple[int, ...] = ()
    d_model: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    num_queries: int = 100
    num_classes: int = 255
    contrastive_dim: int = 64
    text_encoder: dict[str, Any] = field(default_factory=lambda: dict(ROBERTA_BASE))
    aux_loss: bool = False

    def __post_init__(self) -> None:
        self.backbone_widths = tuple(self.backbone_widths)
        if self.backbone not in BACKBONES:
            raise SgaError(f"MDETR config: unknown backbone {self.backbone!r}; choose one of {BACKBONES}")
        if self.backbone == "tiny_cnn" and not self.backbone_widths:
            raise SgaError("MDETR config: backbone 'tiny_cnn' needs backbone_widths, e.g. [32, 64, 128]")
        if self.d_model % self.nheads or self.d_model % 2:
            raise SgaError(f"MDETR config: d_model {self.d_model} must be even and divisible by nheads")

    @property
    def no_object_index(self) -> int:
        """Column of ``pred_logits`` that means "no object" (the last one)."""
        return self.num_classes

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["backbone_widths"] = list(self.backbone_widths)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MDETRConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SgaError(f"MDETR config: unknown fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MDETRConfig:
        return cls.from_dict(json.loads(text))


_RESNET101 = MDETRConfig(backbone="resnet101")
_EFFICIENTNET_B3 = MDETRConfig(backbone="efficientnet_b3")
_EFFICIENTNET_B5 = MDETRConfig(backbone="efficientnet_b5")

# Hub entry -> configuration. ``mdetr_resnet101`` is also the Flickr30k (AnyBox) grounding model: there is no
# separate Flickr hub entry, and the README's MergedBox checkpoint has the same layout.
ENTRIES: dict[str, MDETRConfig] = {
    "mdetr_resnet101": _RESNET101,
    "mdetr_resnet101_refcoco": _RESNET101,
    "mdetr_resnet101_refcocoplus": _RESNET101,
    "mdetr_resnet101_refcocog": _RESNET101,
    "mdetr_efficientnetB3": _EFFICIENTNET_B3,
    "mdetr_efficientnetB3_refcoco": _EFFICIENTNET_B3,
    "mdetr_efficientnetB3_refcocoplus": _EFFICIENTNET_B3,
    "mdetr_efficientnetB3_refcocog": _EFFICIENTNET_B3,
    "mdetr_efficientnetB5": _EFFICIENTNET_B5,
    # Small enough to train on two CPU cores; the tiny-teacher trainer overrides what it needs.
    "tiny": MDETRConfig(
        backbone="tiny_cnn",
        backbone_widths=(32, 64, 96, 128, 128),
        d_model=64,
        nheads=4,
        enc_layers=2,
        dec_layers=2,
        dim_feedforward=128,
        num_queries=16,
        num_classes=63,
        contrastive_dim=32,
        text_encoder=dict(TINY_TEXT_ENCODER),
    ),
}


def get_config(entry: str | MDETRConfig, **overrides: Any) -> MDETRConfig:
    """The configuration of a named entry (or a given config), with fields replaced by ``overrides``.

    A ``text_encoder`` override is merged key by key into the entry's RoBERTa dict, so
    ``get_config("tiny", text_encoder={"vocab_size": 500})`` changes only the vocabulary size.
    """
    if isinstance(entry, MDETRConfig):
        base = entry
    elif entry in ENTRIES:
        base = ENTRIES[entry]
    else:
        raise SgaError(f"unknown MDETR entry {entry!r}; known entries: {sorted(ENTRIES)}")
    base = MDETRConfig.from_dict(base.to_dict())  # a deep copy, so callers never mutate the table
    if "text_encoder" in overrides:
        overrides["text_encoder"] = {**base.text_encoder, **overrides["text_encoder"]}
    try:
        return dataclasses.replace(base, **overrides)
    except TypeError as exc:
        raise SgaError(f"MDETR config override: {exc}") from exc
