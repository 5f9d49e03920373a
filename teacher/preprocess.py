"""Image preprocessing of MDETR's evaluation path: resize the short side, normalise, pad a batch with a mask.

MDETR evaluates with the short side resized to 800 pixels unless that would make the long side exceed 1333, in
which case the long side becomes (about) 1333; bilinear resampling of the PIL image; ImageNet mean/std; images
zero-padded at the bottom and right to the batch's largest size, with a mask that is True on padding. The tiny
teacher uses the same code with a smaller short side (its ``teacher.json`` says which).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes model input. ``max_size`` None means no cap on the long side.

    ``size_multiple`` pads every batch up to a multiple of that many pixels (1 = MDETR's behaviour). The tiny
    teacher sets it to its backbone stride so that an image's features never depend on its batch neighbours.
    """

    short_side: int = 800
    max_size: int | None = 1333
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    size_multiple: int = 1

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessConfig:
        data = dict(data)
        for name in ("mean", "std"):
            if name in data:
                data[name] = tuple(data[name])
        return cls(**data)


def resized_hw(height: int, width: int, short_side: int, max_size: int | None) -> tuple[int, int]:
    """Output ``(h, w)`` for an input ``(height, width)``: short side -> ``short_side``, long side capped.

    With the cap active the short side becomes ``round(max_size * short / long)``; the long side is the
    truncated proportional size. An image already at the target short side is left unchanged.
    """
    short, long = min(height, width), max(height, width)
    target = short_side
    if max_size is not None and long / short * target > max_size:
        target = round(max_size * short / long)
    if short == target:
        return height, width
    scaled_long = int(target * long / short)
    return (target, scaled_long) if height <= width else (scaled_long, target)


def resize_image(image: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """uint8 ``[H, W, 3]`` RGB -> uint8 ``[h, w, 3]`` resized by :func:`resized_hw` (bilinear, like MDETR)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [H, W, 3] RGB image, got {image.dtype} {list(image.shape)}")
    h, w = resized_hw(image.shape[0], image.shape[1], config.short_side, config.max_size)
    if (h, w) == image.shape[:2]:
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def normalize(image: np.ndarray, config: PreprocessConfig) -> torch.Tensor:
    """uint8 ``[h, w, 3]`` -> float32 ``[3, h, w]``: scaled to [0, 1], then ImageNet mean/std."""
    x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1).div_(255.0)
    mean = torch.tensor(config.mean).view(3, 1, 1)
    std = torch.tensor(config.std).view(3, 1, 1)
    return (x - mean) / std


def pad_batch(images: Sequence[torch.Tensor], size_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``[3, h_i, w_i]`` tensors -> ``images [B, 3, H, W]`` zero-padded bottom/right, ``mask [B, H, W]``
    (True = padding). ``H, W`` are the largest sizes, rounded up to ``size_multiple``."""
    height = max(x.shape[1] for x in images)
    width = max(x.shape[2] for x in images)
    height = -(-height // size_multiple) * size_multiple
    width = -(-width // size_multiple) * size_multiple
    batch = images[0].new_zeros((len(images), 3, height, width))
    mask = torch.ones((len(images), height, width), dtype=torch.bool)
    for i, x in enumerate(images):
        batch[i, :, : x.shape[1], : x.shape[2]] = x
        mask[i, : x.shape[1], : x.shape[2]] = False
    return batch, mask


def preprocess_batch(images: Sequence[np.ndarray],
                     config: PreprocessConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Original uint8 RGB images -> ``images [B, 3, H, W]`` float32 and ``mask [B, H, W]`` bool."""
    return pad_batch([normalize(resize_image(im, config), config) for im in images], config.size_multiple)
