"""Image side of MDETR: frozen batch norm, the backbone bodies, and the module that adds the padding mask and
position codes at feature resolution.

The module tree reproduces the released checkpoints' prefixes: ``backbone.0.body.<trunk names>`` for the
trunk and ``backbone.1`` for the (parameter-free) position encoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configs import MDETRConfig
from .efficientnet import VARIANTS as EFFICIENTNET_VARIANTS
from .efficientnet import build_efficientnet
from .position_encoding import PositionEmbeddingSine
from .resnet import DEPTHS as RESNET_DEPTHS
from .resnet import build_resnet


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine terms, all buffers (so never trained and never updated).

    ``y = (x - running_mean) * weight / sqrt(running_var + eps) + bias``, folded into one scale and shift.
    eps is 1e-5 for every backbone, as in MDETR (the TF EfficientNet weights were trained with 1e-3, but the
    released MDETR models were fine-tuned with 1e-5, so that is what their weights expect).
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a ``[B, H, W]`` bool padding mask to ``[B, *size]`` (MDETR's rule)."""
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]


class ConvNormReLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        conv = nn.Conv2d(in_ch, out_ch, 3, stride, padding=1, bias=False)
        super().__init__(conv, nn.BatchNorm2d(out_ch), nn.ReLU())


class TinyCNN(nn.Module):
    """A small trainable CNN for the tiny teacher: per width, a stride-2 and a stride-1 3x3 conv block.

    Features at padded positions are zeroed after every block, so a padded cell looks exactly like the convs'
    own zero padding: in eval mode the valid features of an image do not depend on how much padding its batch
    adds (as long as the padded size is a multiple of the total stride), which keeps teacher labels
    independent of batching. Uses ordinary (trainable) batch norm, since it is trained from scratch.
    """

    def __init__(self, widths: tuple[int, ...]):
        super().__init__()
        stages, in_ch = [], 3
        for width in widths:
            stages.append(nn.Sequential(ConvNormReLU(in_ch, width, 2), ConvNormReLU(width, width, 1)))
            in_ch = width
        self.stages = nn.Sequential(*stages)
        self.num_channels = in_ch

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = None
        for stage in self.stages:
            for block in stage:
                x = block(x)
                if keep is None or keep.shape[-2:] != x.shape[-2:]:   # one resize per resolution
                    keep = ~resize_mask(mask, x.shape[-2:])[:, None]
                x = x * keep
        return x


class Backbone(nn.Module):
    """``images [B, 3, H, W]``, ``mask [B, H, W]`` -> ``features [B, C, h, w]``, ``mask [B, h, w]``.

    The official trunks (ResNet, EfficientNet) see padding as image content, exactly as in MDETR.
    """

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        self.num_channels: int = body.num_channels

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(images, mask) if isinstance(self.body, TinyCNN) else self.body(images)
        return features, resize_mask(mask, features.shape[-2:])


class ImageEncoder(nn.Sequential):
    """Backbone (index 0) plus sine position codes (index 1).

    Returns ``features [B, C, h, w]``, ``mask [B, h, w]`` (True = padding) and ``pos [B, d_model, h, w]``.
    """

    def __init__(self, backbone: Backbone, position: PositionEmbeddingSine):
        super().__init__(backbone, position)
        self.num_channels = backbone.num_channels

    def forward(self, images: torch.Tensor, mask: torch.Tensor):
        features, feature_mask = self[0](images, mask)
        return features, feature_mask, self[1](feature_mask).to(features.dtype)


def build_backbone(config: MDETRConfig) -> ImageEncoder:
    name = config.backbone
    if name in RESNET_DEPTHS:
        body = build_resnet(name, FrozenBatchNorm2d)
    elif name in EFFICIENTNET_VARIANTS:
        body = build_efficientnet(name, FrozenBatchNorm2d)
    else:
        body = TinyCNN(config.backbone_widths)
    return ImageEncoder(Backbone(body), PositionEmbeddingSine(config.d_model // 2))
