"""2-D sine position encoding of DETR/MDETR, normalised to the un-padded extent of each image."""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """``mask [B, h, w]`` (True = padding) -> position codes ``[B, 2 * num_pos_feats, h, w]``.

    Each axis position is the count of valid cells up to and including it, divided by the valid length of that
    row/column and scaled to ``(0, 2π]``, so padding never shifts the codes of valid cells. Per axis the
    channels interleave ``sin(p / t_0), cos(p / t_1), sin(p / t_2), ...`` with
    ``t_i = temperature ** (2 * floor(i / 2) / num_pos_feats)``; the output is ``cat(y_codes, x_codes)``.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        valid = ~mask
        y = valid.cumsum(1, dtype=torch.float32)
        x = valid.cumsum(2, dtype=torch.float32)
        eps = 1e-6  # keeps fully padded rows/columns finite
        y = y / (y[:, -1:, :] + eps) * self.scale
        x = x / (x[:, :, -1:] + eps) * self.scale
        i = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x[..., None] / dim_t
        pos_y = y[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
