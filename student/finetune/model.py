"""The fine-tuning model: a pretrained student encoder and one task head.

:func:`load_encoder` restores the encoder of a ``sga pretrain`` run. ``CHECKPOINT`` is either a run
directory (``OUT/student_config.json`` + ``OUT/model.safetensors``, the final export) or one training
checkpoint (``OUT/checkpoints/step_N/``: ``model.safetensors`` + ``state.json``, whose ``meta.student``
is the config). The pretraining heads are dropped; fine-tuning trains the encoder and the new head.
Without a checkpoint the encoder starts from random weights (the "no pretraining" reference).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch
from torch import nn

from shards import fs
from shards.errors import SgaError

from ..checkpoint import MODEL_FILE, STATE_FILE, load_weights
from ..config import StudentConfig
from ..model import build_model

CONFIG_FILE = "student_config.json"
PRESETS = {"tiny": StudentConfig.tiny, "base": StudentConfig.base}


def checkpoint_config(checkpoint: str) -> StudentConfig:
    """The :class:`StudentConfig` a run directory or a step checkpoint was trained with."""
    if fs.exists(fs.join(checkpoint, CONFIG_FILE)):
        return StudentConfig.from_json(fs.read_bytes(fs.join(checkpoint, CONFIG_FILE)).decode())
    if fs.exists(fs.join(checkpoint, STATE_FILE)):
        state = json.loads(fs.read_bytes(fs.join(checkpoint, STATE_FILE)))
        return StudentConfig.from_dict(state["meta"]["student"])
    raise SgaError(f"{checkpoint} is not a pretrained student: it has neither {CONFIG_FILE} (a finished "
                   f"`sga pretrain --out` folder) nor {STATE_FILE} (OUT/checkpoints/step_N); pass one of "
                   "those, or --checkpoint none to start from random weights")


def load_encoder(checkpoint: str | None, region_info: dict[str, Any], vocab_size: int, preset: str = "tiny",
                 overrides: dict[str, Any] | None = None) -> tuple[StudentConfig, nn.Module]:
    """``(config, encoder)``: restored from ``checkpoint``, or new (``preset`` + ``overrides``) for None.

    ``region_info`` is the task region set's ``regions.json``; its feature width must be the encoder's.
    """
    feature_dim = int(region_info["feature_dim"])
    if checkpoint is None:
        if preset not in PRESETS:
            raise SgaError(f"unknown model preset {preset!r}; use one of {', '.join(PRESETS)}")
        fields = {"feature_dim": feature_dim, "vocab_size": vocab_size,
                  "num_classes": int(region_info.get("num_classes") or 1)}
        config = PRESETS[preset](**{**fields, **(overrides or {})})
        return config, build_model(config).encoder
    config = checkpoint_config(checkpoint)
    if config.feature_dim != feature_dim:
        raise SgaError(f"{checkpoint} reads {config.feature_dim}-d region features but the task regions have "
                       f"{feature_dim}-d ones; use regions from the same detector as the pretraining set")
    if vocab_size > config.vocab_size:
        raise SgaError(f"the tokenizer has {vocab_size} tokens, more than the {config.vocab_size} of "
                       f"{checkpoint}; pass the tokenizer it was pretrained with (--tokenizer)")
    # The checkpoint's weights replace any BERT initialisation: do not load one first.
    model = build_model(dataclasses.replace(config, text_init=None))
    load_weights(fs.join(checkpoint, MODEL_FILE), model)
    return config, model.encoder


class FinetuneModel(nn.Module):
    """``encoder`` + ``head``; ``forward(batch)`` returns the head's logits (shape per task)."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        out = self.encoder(batch["input_ids"], batch["attention_mask"], batch["region_features"],
                           batch["region_boxes"], batch["region_mask"])
        return self.head(out, batch)
