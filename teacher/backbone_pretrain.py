"""Pretrain the tiny teacher's CNN on freshly rendered scenes: the small world's stand-in for ImageNet.

MDETR starts from an ImageNet-pretrained backbone and a pretrained RoBERTa. Trained from scratch, the tiny
teacher's CNN learns where objects are (the box losses teach that) but not what they look like: a linear probe
reads an object's colour from its feature cell at chance level (issue 3's notes). This stage gives the CNN
what a pretrained backbone brings: features that say what is at each place (after 600 steps of 32
scenes, the object-centre cells classify colour 99.7 %, texture 98 %, size 96 %, shape 93 %).

Measured effect (issue 3): grounding training erodes those features at the full learning rate, and the
recall curve is the from-scratch run's. With the CNN at 0.1x lr (``--backbone-lr-ratio 0.1``) the curve
matches the from-scratch run's for 3,000 steps, then pulls ahead (held-out recall@1 0.65 at step 3,500,
where the from-scratch run plateaus at 0.57 by 7,500) and reaches 0.76 at 6,000 steps: the bundled teacher,
whose recipe (600 pretraining steps, 0.1x lr) is ``sga teacher train``'s default.

The task is dense attribute classification. Scenes are drawn and rendered by the synthetic world's own code
(JPEG round trip included, so the pixels look like the world's), resized like the teacher's input; the
feature cell holding an object's centre must classify the object's shape, colour, texture and size. Other
cells are not supervised: finding objects is what the grounding losses teach anyway, and a "no object" class
over the many empty cells would drown the shape term.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from shards.synthetic.render import encode_jpeg, render_scene
from shards.synthetic.scene import COLOURS, SHAPES, SIZES, TEXTURES, SceneConfig, sample_scene

from .preprocess import PreprocessConfig, normalize, pad_batch, resize_image

# (attribute, class names), one classifier each.
ATTRIBUTES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("shape", SHAPES), ("colour", tuple(COLOURS)), ("texture", TEXTURES), ("size", tuple(SIZES)))
IGNORE = -100


@dataclass
class BackbonePretrainConfig:
    """Steps and optimiser of the pretraining stage; scenes come from ``scene`` (the world's defaults)."""

    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    scene: SceneConfig | None = None


class AttributeHead(nn.Module):
    """A 1x1 conv per attribute over ``features [B, C, h, w]`` -> ``{name: logits [B, K, h, w]}``."""

    def __init__(self, channels: int):
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Conv2d(channels, len(classes), 1)
                                    for name, classes in ATTRIBUTES})

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(features) for name, head in self.heads.items()}


def render_batch(rng: np.random.Generator, config: BackbonePretrainConfig, preprocess: PreprocessConfig,
                 stride: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """A batch of new scenes: ``images [B, 3, H, W]``, ``mask [B, H, W]`` (True = padding) and per attribute
    ``targets[name] [B, H // stride, W // stride]`` long (class index, ``IGNORE`` where not supervised)."""
    scene_config = config.scene or SceneConfig()
    images, scenes = [], []
    for _ in range(config.batch_size):
        scene = sample_scene(rng, scene_config)
        with Image.open(io.BytesIO(encode_jpeg(render_scene(scene, rng)))) as im:
            images.append(resize_image(np.asarray(im.convert("RGB")), preprocess))
        scenes.append(scene)
    batch, mask = pad_batch([normalize(im, preprocess) for im in images], stride)
    h, w = batch.shape[2] // stride, batch.shape[3] // stride
    targets = {name: torch.full((len(scenes), h, w), IGNORE, dtype=torch.long) for name, _ in ATTRIBUTES}
    for b, (scene, image) in enumerate(zip(scenes, images)):
        valid_h, valid_w = -(-image.shape[0] // stride), -(-image.shape[1] // stride)
        sy, sx = image.shape[0] / scene.height / stride, image.shape[1] / scene.width / stride
        for obj in scene.objects:
            cx, cy = obj.center
            y, x = min(int(cy * sy), valid_h - 1), min(int(cx * sx), valid_w - 1)
            for name, classes in ATTRIBUTES:
                targets[name][b, y, x] = classes.index(getattr(obj, name))
    return batch, mask, targets


def attribute_losses(logits: dict[str, torch.Tensor],
                     targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cross-entropy per attribute over its supervised cells (mean; 0 when a batch supervises none)."""
    losses = {}
    for name, target in targets.items():
        count = (target != IGNORE).sum().clamp(min=1)
        losses[name] = F.cross_entropy(logits[name], target, ignore_index=IGNORE, reduction="sum") / count
    return losses


def object_accuracy(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per attribute, the classification accuracy at object-centre cells."""
    centre = (targets["colour"] != IGNORE)
    count = max(int(centre.sum()), 1)
    return {name: float((logits[name].argmax(1)[centre] == targets[name][centre]).sum()) / count
            for name in targets}


def pretrain_backbone(body: nn.Module, config: BackbonePretrainConfig, preprocess: PreprocessConfig,
                      stride: int, on_step=None) -> dict[str, float]:
    """Train ``body`` (``forward(images, mask) -> features [B, C, h, w]``, with ``num_channels``) in place.

    ``on_step(step, losses)`` is called after every step (progress bars, logs). Returns the object-centre
    accuracies on a fresh evaluation batch drawn from a generator independent of the training one.
    """
    # The head's init draws from its own seed, leaving the caller's RNG stream where it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        head = AttributeHead(body.num_channels)
    params = [*body.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    rng = np.random.default_rng([config.seed, 1])
    body.train()
    for step in range(config.steps):
        images, mask, targets = render_batch(rng, config, preprocess, stride)
        # Cosine from lr to 0: the stage ends with settled features for the grounding run to start from.
        for group in optimizer.param_groups:
            group["lr"] = config.lr * 0.5 * (1 + np.cos(np.pi * step / config.steps))
        losses = attribute_losses(head(body(images, mask)), targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step + 1, {k: v.item() for k, v in losses.items()})
    body.eval()
    eval_config = BackbonePretrainConfig(batch_size=4 * config.batch_size, scene=config.scene)
    images, mask, targets = render_batch(np.random.default_rng([config.seed, 2]), eval_config, preprocess,
                                         stride)
    with torch.no_grad():
        accuracy = object_accuracy(head(body(images, mask)), targets)
    body.train()
    return accuracy
