"""Text side of MDETR: a RoBERTa built from a config dict (never downloaded) and the feature resizer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import RobertaConfig, RobertaModel


def build_text_encoder(config: dict[str, Any]) -> RobertaModel:
    """A randomly initialised ``RobertaModel`` (with its pooler, whose weights the checkpoints carry).

    The weights come from the MDETR checkpoint, which holds all of RoBERTa's tensors; nothing is fetched.
    """
    return RobertaModel(RobertaConfig(**config), add_pooling_layer=True)


class FeatureResizer(nn.Module):
    """``[..., in_dim]`` -> Linear -> LayerNorm(eps 1e-12) -> Dropout -> ``[..., out_dim]``.

    Maps RoBERTa's hidden states into the transformer's width. The LayerNorm eps is 1e-12 as in MDETR's
    resizer (RoBERTa's own norms use 1e-5).
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.layer_norm = nn.LayerNorm(out_dim, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.layer_norm(self.fc(x)))
