"""Box encodings for visual tokens, as small pure torch functions.

Every function takes boxes as the last dimension of size 4 and keeps the leading dimensions, so the same
code serves one image (``[R, 4]``) and a padded batch (``[B, R, 4]``).

* :func:`normalize_boxes`: pixel xyxy -> xyxy divided by the image size, clamped to ``[0, 1]``.
* :func:`box_feature5`: ViLBERT's 5-d location vector ``[x1/W, y1/H, x2/W, y2/H, area/(W·H)]``.
* :func:`sine_box_encoding`: the fixed sine-cosine spatial positional encoding (SPE).
* :data:`IMAGE_BOX`: the normalised box of the global [IMG] token, the whole image.

SPE formula. The normalised box becomes ``(cx, cy, w, h)`` (centre and size, so position and extent get
separate channels). With ``m = dim / 8`` frequencies, a scale ``s`` and a temperature ``T``, each of the
four numbers ``c`` is encoded as::

    ω_k = T ** (-k / m),              k = 0 .. m-1
    enc(c) = [sin(s·c·ω_0), ..., sin(s·c·ω_{m-1}), cos(s·c·ω_0), ..., cos(s·c·ω_{m-1})]

and the four ``2m``-wide blocks are concatenated in the order cx, cy, w, h (width ``8m = dim``).
``s = 100`` puts coordinates on a percent grid, so the fastest channel (``ω_0 = 1``) changes noticeably
between boxes one percent apart, and ``T = 1000`` makes the slowest channel's period (``2π·T^((m-1)/m)/s``
in box units) cover the whole image. The same scheme with the same constants is VL-BERT's; DETR's
``PositionEmbeddingSine`` is its two-dimensional pixel analogue.
"""

from __future__ import annotations

import torch

IMAGE_BOX = (0.0, 0.0, 1.0, 1.0)


def normalize_boxes(boxes: torch.Tensor, image_w: torch.Tensor | float,
                    image_h: torch.Tensor | float) -> torch.Tensor:
    """Pixel xyxy ``[..., 4]`` -> xyxy in image fractions, clamped to ``[0, 1]``.

    ``image_w`` / ``image_h`` are numbers or tensors broadcastable to ``boxes.shape[:-1]``; clamping keeps
    detector boxes that spill a pixel past the border inside the unit square.
    """
    w = torch.as_tensor(image_w, dtype=boxes.dtype, device=boxes.device)
    h = torch.as_tensor(image_h, dtype=boxes.dtype, device=boxes.device)
    size = torch.stack(torch.broadcast_tensors(w, h, w, h), dim=-1)
    return (boxes / size).clamp(0.0, 1.0)


def box_feature5(norm_boxes: torch.Tensor) -> torch.Tensor:
    """Normalised xyxy ``[..., 4]`` -> ``[..., 5]``: the four coordinates and the box's share of the image.

    On normalised boxes ``(x2 - x1)·(y2 - y1)`` equals ViLBERT's ``w·h / (W·H)``. Degenerate boxes
    (``x2 < x1``) get area 0 rather than a negative one.
    """
    wh = (norm_boxes[..., 2:] - norm_boxes[..., :2]).clamp(min=0.0)
    return torch.cat([norm_boxes, (wh[..., 0] * wh[..., 1]).unsqueeze(-1)], dim=-1)


def sine_box_encoding(norm_boxes: torch.Tensor, dim: int, scale: float = 100.0,
                      temperature: float = 1000.0) -> torch.Tensor:
    """Normalised xyxy ``[..., 4]`` -> fixed sine-cosine encoding ``[..., dim]`` (see the module docstring).

    ``dim`` must be a positive multiple of 8 (4 coordinates x a sine and a cosine per frequency).
    """
    if dim <= 0 or dim % 8:
        raise ValueError(f"sine_box_encoding: dim must be a positive multiple of 8, got {dim}")
    num_freq = dim // 8
    centre = (norm_boxes[..., :2] + norm_boxes[..., 2:]) / 2
    size = norm_boxes[..., 2:] - norm_boxes[..., :2]
    coords = torch.cat([centre, size], dim=-1).float()                    # [..., 4]: cx, cy, w, h
    k = torch.arange(num_freq, dtype=torch.float32, device=norm_boxes.device)
    omega = temperature ** (-k / num_freq)                                  # [m]
    angles = scale * coords.unsqueeze(-1) * omega                           # [..., 4, m]
    enc = torch.cat([angles.sin(), angles.cos()], dim=-1)                   # [..., 4, 2m]
    return enc.flatten(-2).to(norm_boxes.dtype)
