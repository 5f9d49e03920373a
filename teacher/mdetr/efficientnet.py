"""EfficientNet-B3/B5 trunks as the TensorFlow-ported ("tf_", noisy-student) weights expect them.

Module names follow timm's ``tf_efficientnet_*`` feature extractor (``conv_stem``, ``bn1``,
``blocks.S.B.{conv_dw,conv_pw,conv_pwl,bn1,bn2,bn3,se.conv_reduce,se.conv_expand}``) so the released MDETR
state dicts load unchanged; conv_head and its norm are absent because MDETR's feature extractor drops them.

Numerics that matter for those weights:
- TensorFlow "SAME" padding. Stride-1 convs with odd kernels pad symmetrically (identical to SAME); stride-2
  convs pad from the input size, putting the extra pixel at the bottom/right (``SameConv2d``).
- SiLU after the stem and after every expansion and depthwise norm, and inside squeeze-excitation. The
  activations are calls in ``forward`` rather than fused into the norm modules, so swapping the norms for
  frozen ones (as MDETR does) cannot silently remove them (the timm >= 0.6 trap, ashkamath/mdetr#83).
- The norms are whatever ``norm_layer`` builds; MDETR uses frozen batch norm with eps 1e-5 (not TF's 1e-3).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

NormLayer = Callable[[int], nn.Module]

# Base stages of EfficientNet-B0: (block kind, repeats, kernel, stride, expansion, output channels).
# "ds" = depthwise-separable block (no expansion), "ir" = inverted residual (MBConv). All use SE ratio 0.25.
BASE_STAGES = (
    ("ds", 1, 3, 1, 1, 16),
    ("ir", 2, 3, 2, 6, 24),
    ("ir", 2, 5, 2, 6, 40),
    ("ir", 3, 3, 2, 6, 80),
    ("ir", 3, 5, 1, 6, 112),
    ("ir", 4, 5, 2, 6, 192),
    ("ir", 1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
SE_RATIO = 0.25
# name -> (channel multiplier, depth multiplier)
VARIANTS = {"efficientnet_b3": (1.2, 1.4), "efficientnet_b5": (1.6, 2.2)}


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of ``divisor``, but never more than 10% below ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def same_padding(size: int, kernel: int, stride: int) -> int:
    """Total padding TF "SAME" adds along one axis so the output has ``ceil(size / stride)`` positions."""
    return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)


class SameConv2d(nn.Conv2d):
    """A conv whose padding is computed from the input like TF "SAME" (extra pixel bottom/right)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        pad_w = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return super().forward(x)


def tf_conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """Bias-free conv with SAME semantics: static symmetric padding where that is exact (stride 1)."""
    if stride == 1:
        return nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, groups=groups, bias=False)
    return SameConv2d(in_ch, out_ch, kernel, stride=stride, groups=groups, bias=False)


class SqueezeExcite(nn.Module):
    """Channel gate: global mean -> 1x1 reduce -> SiLU -> 1x1 expand -> sigmoid -> scale."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.conv_expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.conv_expand(F.silu(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * gate.sigmoid()


class DepthwiseSeparable(nn.Module):
    """depthwise kxk -> norm -> SiLU -> SE -> pointwise 1x1 -> norm (linear), residual when shapes allow."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, norm_layer: NormLayer):
        super().__init__()
        self.conv_dw = tf_conv(in_ch, in_ch, kernel, stride, groups=in_ch)
        self.bn1 = norm_layer(in_ch)
        self.se = SqueezeExcite(in_ch, make_divisible(in_ch * SE_RATIO, 1))
        self.conv_pw = tf_conv(in_ch, out_ch, 1)
        self.bn2 = norm_layer(out_ch)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.se(F.silu(self.bn1(self.conv_dw(x))))
        out = self.bn2(self.conv_pw(out))
        return out + x if self.residual else out


class InvertedResidual(nn.Module):
    """expand 1x1 -> norm -> SiLU -> depthwise kxk -> norm -> SiLU -> SE -> project 1x1 -> norm (linear).

    The SE width is a quarter of the block's *input* channels, not of the expanded ones.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expansion: int,
                 norm_layer: NormLayer):
        super().__init__()
        mid = make_divisible(in_ch * expansion)
        self.conv_pw = tf_conv(in_ch, mid, 1)
        self.bn1 = norm_layer(mid)
        self.conv_dw = tf_conv(mid, mid, kernel, stride, groups=mid)
        self.bn2 = norm_layer(mid)
        self.se = SqueezeExcite(mid, make_divisible(in_ch * SE_RATIO, 1))
        self.conv_pwl = tf_conv(mid, out_ch, 1)
        self.bn3 = norm_layer(out_ch)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.silu(self.bn1(self.conv_pw(x)))
        out = self.se(F.silu(self.bn2(self.conv_dw(out))))
        out = self.bn3(self.conv_pwl(out))
        return out + x if self.residual else out


class EfficientNet(nn.Module):
    """``[B, 3, H, W]`` -> ``[B, C, ceil(H/32), ceil(W/32)]``: the last stage (C = 384 for B3, 512 for B5)."""

    def __init__(self, width_mult: float, depth_mult: float, norm_layer: NormLayer):
        super().__init__()
        stem = make_divisible(STEM_CHANNELS * width_mult)
        self.conv_stem = tf_conv(3, stem, 3, stride=2)
        self.bn1 = norm_layer(stem)
        in_ch = stem
        stages = []
        for kind, repeats, kernel, stride, expansion, channels in BASE_STAGES:
            out_ch = make_divisible(channels * width_mult)
            blocks = []
            for b in range(math.ceil(repeats * depth_mult)):
                s = stride if b == 0 else 1
                if kind == "ds":
                    blocks.append(DepthwiseSeparable(in_ch, out_ch, kernel, s, norm_layer))
                else:
                    blocks.append(InvertedResidual(in_ch, out_ch, kernel, s, expansion, norm_layer))
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.num_channels = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(F.silu(self.bn1(self.conv_stem(x))))


def build_efficientnet(name: str, norm_layer: NormLayer) -> EfficientNet:
    width_mult, depth_mult = VARIANTS[name]
    return EfficientNet(width_mult, depth_mult, norm_layer)
