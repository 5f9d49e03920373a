"""Input embeddings: wordpieces (BERT's, key-compatible with Hugging Face) and visual tokens.

A visual token is the sum of three projections, then LayerNorm and dropout::

    e = LayerNorm(W_f·feature + W_b·box5 [+ W_s·SPE(box)])

``box5`` is ViLBERT's ``[x1, y1, x2, y2, area]`` on normalised boxes and ``SPE`` the fixed sine-cosine
encoding (:mod:`student.spatial`), present when ``config.spe`` is on. Visual tokens carry no position id:
their order is arbitrary and their geometry is in the box terms.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import StudentConfig
from ..spatial import box_feature5, sine_box_encoding
from .layers import LAYER_NORM_EPS


class TextEmbeddings(nn.Module):
    """``input_ids`` ``[B, L]`` -> ``[B, L, hidden]``: word + position + segment (0), LayerNorm, dropout.

    Attribute names match ``transformers.BertEmbeddings``, so ``embeddings.*`` of a BERT checkpoint load.
    """

    def __init__(self, config: StudentConfig):
        super().__init__()
        H = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, H)
        self.position_embeddings = nn.Embedding(config.max_position, H)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, H)
        self.LayerNorm = nn.LayerNorm(H, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # Captions are single segments: every wordpiece has segment id 0 (row 0 of the type table).
        e = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings.weight[0])
        return self.dropout(self.LayerNorm(e))


class VisualEmbeddings(nn.Module):
    """Region features ``[B, V, D]`` and normalised boxes ``[B, V, 4]`` -> visual tokens ``[B, V, dim]``."""

    def __init__(self, config: StudentConfig, dim: int):
        super().__init__()
        self.spe_dim = config.spe_dim if config.spe else 0
        self.feature_proj = nn.Linear(config.feature_dim, dim)
        self.box_proj = nn.Linear(5, dim)
        self.spe_proj = nn.Linear(self.spe_dim, dim) if self.spe_dim else None
        self.LayerNorm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, features: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        e = self.feature_proj(features) + self.box_proj(box_feature5(boxes))
        if self.spe_proj is not None:
            e = e + self.spe_proj(sine_box_encoding(boxes, self.spe_dim))
        return self.dropout(self.LayerNorm(e))
