"""The MDETR model: image encoder + transformer + prediction heads, one forward call.

Submodules are registered in the order of the released state dicts (transformer, class_embed, bbox_embed,
query_embed, input_proj, backbone, contrastive projections), so even ``state_dict()`` key order matches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import ImageEncoder
from .configs import MDETRConfig
from .transformer import Transformer


class MLP(nn.Module):
    """``layers.0 .. layers.{n-1}`` Linear layers with ReLU between them (none after the last)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, [*dims[1:], out_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MDETR(nn.Module):
    """Phrase-grounding detector over an image and a tokenised caption.

    Inputs: ``images [B, 3, H, W]`` (ImageNet-normalised, zero-padded bottom/right to a common size),
    ``image_mask [B, H, W]`` bool (True = padding), ``input_ids [B, T]`` long, ``attention_mask [B, T]``
    (1 = token, 0 = padding), with ``T <= config.num_classes`` so every token has a head column.
    Tokenisation happens outside the model.

    Output dict:
    - ``pred_logits [B, Q, P]``: soft-token logits, ``P = config.num_classes + 1``; column ``t < T`` refers to
      token ``t`` of ``input_ids``, the last column is "no object".
    - ``pred_boxes [B, Q, 4]``: sigmoid ``(cx, cy, w, h)`` normalised to each image's un-padded size.
    - ``proj_queries [B, Q, Dc]``, ``proj_tokens [B, T, Dc]``: L2-normalised contrastive embeddings of the
      queries and of the encoder output at the text positions.
    - ``aux_outputs`` (only when ``config.aux_loss``): a list of ``L - 1`` dicts with the four keys above for
      the earlier decoder layers, first layer first.
    """

    def __init__(self, config: MDETRConfig, backbone: ImageEncoder, transformer: Transformer):
        super().__init__()
        self.config = config
        d = config.d_model
        self.transformer = transformer
        self.class_embed = nn.Linear(d, config.num_classes + 1)
        self.bbox_embed = MLP(d, d, 4, 3)
        self.query_embed = nn.Embedding(config.num_queries, d)
        self.input_proj = nn.Conv2d(backbone.num_channels, d, kernel_size=1)
        self.backbone = backbone
        self.contrastive_align_projection_image = nn.Linear(d, config.contrastive_dim)
        self.contrastive_align_projection_text = nn.Linear(d, config.contrastive_dim)

    def forward(self, images: torch.Tensor, image_mask: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> dict[str, Any]:
        if input_ids.shape[1] > self.config.num_classes:
            raise ValueError(f"captions of {input_ids.shape[1]} tokens exceed the head's "
                             f"{self.config.num_classes} text positions; shorten them before batching")
        features, mask, pos = self.backbone(images, image_mask)
        hs, text_memory = self.transformer(self.input_proj(features), mask, pos, self.query_embed.weight,
                                           input_ids, attention_mask)
        logits = self.class_embed(hs)
        boxes = self.bbox_embed(hs).sigmoid()
        proj_queries = F.normalize(self.contrastive_align_projection_image(hs), p=2, dim=-1)
        proj_tokens = F.normalize(self.contrastive_align_projection_text(text_memory), p=2, dim=-1)
        layers = [
            {"pred_logits": logits[i], "pred_boxes": boxes[i], "proj_queries": proj_queries[i],
             "proj_tokens": proj_tokens}
            for i in range(hs.shape[0])
        ]
        out: dict[str, Any] = dict(layers[-1])
        if self.config.aux_loss:
            out["aux_outputs"] = layers[:-1]
        return out
