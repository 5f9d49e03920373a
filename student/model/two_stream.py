"""Two-stream encoder (ViLBERT style): a text BERT, a visual transformer, co-attention between them.

Layout, with ``Nt`` text layers, ``Nv`` visual layers and ``K`` co-attention blocks: each stream first
runs its ``N - K`` leading layers alone, then ``K`` times a co-attention block followed by one more layer
of each stream. ``Nt = 12, Nv = 6, K = 6`` reproduces ViLBERT's ``bert_base_6layer_6conect``: the
co-attention blocks come before text layers 6..11 and before visual layers 0..5 (its ``t_biattention_id``
and ``v_biattention_id``).

A co-attention block (ViLBERT's ``BertConnectionLayer``) lets text queries attend to the visual keys and
values and visual queries attend to the text, both in a shared ``bi_hidden_size`` width and computed from
the same inputs, then gives each stream a residual LayerNorm and its own feed-forward.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import StudentConfig
from .embeddings import TextEmbeddings, VisualEmbeddings
from .layers import Attention, Intermediate, LayerStack, Pooler, ResidualOutput


class CoAttentionLayer(nn.Module):
    """``(text [B, L, Ht], visual [B, V, Hv])`` -> the same shapes, each stream informed by the other."""

    def __init__(self, config: StudentConfig):
        super().__init__()
        Ht, Hv, Hb = config.hidden_size, config.v_hidden_size, config.bi_hidden_size
        drop = config.dropout
        self.text_attention = Attention(Ht, Hv, Hb, config.bi_num_heads, drop)
        self.visual_attention = Attention(Hv, Ht, Hb, config.bi_num_heads, drop)
        self.text_intermediate = Intermediate(Ht, config.intermediate_size)
        self.text_output = ResidualOutput(config.intermediate_size, Ht, drop)
        self.visual_intermediate = Intermediate(Hv, config.v_intermediate_size)
        self.visual_output = ResidualOutput(config.v_intermediate_size, Hv, drop)

    def forward(self, text: torch.Tensor, visual: torch.Tensor, text_mask: torch.Tensor,
                visual_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.text_attention(text, visual, visual_mask)
        v = self.visual_attention(visual, text, text_mask)
        return (self.text_output(self.text_intermediate(t), t),
                self.visual_output(self.visual_intermediate(v), v))


class TwoStreamEncoder(nn.Module):
    """ViLBERT-style encoder.

    ``text_dim = hidden_size``, ``visual_dim = v_hidden_size``, ``pooled_dim = bi_hidden_size`` (both
    poolers project into the shared width so [CLS] and [IMG] summaries can be multiplied).
    """

    def __init__(self, config: StudentConfig):
        super().__init__()
        self.text_dim, self.visual_dim = config.hidden_size, config.v_hidden_size
        self.pooled_dim = config.bi_hidden_size
        self.num_coattn = config.coattn_layers
        self.embeddings = TextEmbeddings(config)
        self.encoder = LayerStack(config.num_layers, config.hidden_size, config.num_heads,
                                  config.intermediate_size, config.dropout)
        self.visual_embeddings = VisualEmbeddings(config, config.v_hidden_size)
        self.v_encoder = LayerStack(config.v_num_layers, config.v_hidden_size, config.v_num_heads,
                                    config.v_intermediate_size, config.dropout)
        self.coattention = nn.ModuleList(CoAttentionLayer(config) for _ in range(config.coattn_layers))
        self.text_pooler = Pooler(config.hidden_size, config.bi_hidden_size)
        self.image_pooler = Pooler(config.v_hidden_size, config.bi_hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, region_features: torch.Tensor,
                region_boxes: torch.Tensor, region_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encode a batch (arguments as :meth:`SingleStreamEncoder.forward`).

        Returns:
            ``text_states`` ``[B, L, Ht]``, ``region_states`` ``[B, V, Hv]``, ``pooled_text`` and
            ``pooled_image`` ``[B, bi_hidden_size]``.
        """
        t = self.embeddings(input_ids)
        v = self.visual_embeddings(region_features, region_boxes)
        t_solo = len(self.encoder.layer) - self.num_coattn
        v_solo = len(self.v_encoder.layer) - self.num_coattn
        t = self.encoder(t, attention_mask, 0, t_solo)
        v = self.v_encoder(v, region_mask, 0, v_solo)
        for k, coattn in enumerate(self.coattention):
            t, v = coattn(t, v, attention_mask, region_mask)
            t = self.encoder(t, attention_mask, t_solo + k, t_solo + k + 1)
            v = self.v_encoder(v, region_mask, v_solo + k, v_solo + k + 1)
        return {"text_states": t, "region_states": v,
                "pooled_text": self.text_pooler(t), "pooled_image": self.image_pooler(v)}
