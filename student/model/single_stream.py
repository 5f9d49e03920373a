"""Single-stream encoder (VL-BERT style): wordpieces and visual tokens in one BERT.

The sequence is ``[CLS] words [SEP] <pad> | [IMG] regions <pad>``: text first (so text positions keep
BERT's position ids 0..L-1), visual tokens after. Every layer attends across both modalities; padding of
either part is masked out. The text part of the BERT (``embeddings``, ``encoder.layer.N``) can start from
a Hugging Face checkpoint; the visual embeddings and poolers are new.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import StudentConfig
from .embeddings import TextEmbeddings, VisualEmbeddings
from .layers import LayerStack, Pooler


class SingleStreamEncoder(nn.Module):
    """VL-BERT-style encoder.

    ``text_dim = visual_dim = pooled_dim = config.hidden_size``. See :meth:`forward` for the output keys.
    """

    def __init__(self, config: StudentConfig):
        super().__init__()
        H = config.hidden_size
        self.text_dim = self.visual_dim = self.pooled_dim = H
        self.embeddings = TextEmbeddings(config)
        self.visual_embeddings = VisualEmbeddings(config, H)
        self.encoder = LayerStack(config.num_layers, H, config.num_heads, config.intermediate_size,
                                  config.dropout)
        self.text_pooler = Pooler(H, H)
        self.image_pooler = Pooler(H, H)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, region_features: torch.Tensor,
                region_boxes: torch.Tensor, region_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encode a batch.

        Args:
            input_ids: long ``[B, L]``; attention_mask: bool ``[B, L]``.
            region_features: ``[B, V, D]``; region_boxes: normalised xyxy ``[B, V, 4]``;
            region_mask: bool ``[B, V]``. Visual token 0 is [IMG].

        Returns:
            ``text_states`` ``[B, L, H]``, ``region_states`` ``[B, V, H]``, ``pooled_text`` ``[B, H]`` (from
            [CLS]), ``pooled_image`` ``[B, H]`` (from [IMG]).
        """
        L = input_ids.shape[1]
        x = torch.cat([self.embeddings(input_ids), self.visual_embeddings(region_features, region_boxes)], 1)
        x = self.encoder(x, torch.cat([attention_mask, region_mask], 1))
        text, regions = x[:, :L], x[:, L:]
        return {"text_states": text, "region_states": regions,
                "pooled_text": self.text_pooler(text), "pooled_image": self.image_pooler(regions)}
