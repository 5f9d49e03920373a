"""``build_mdetr``: configuration -> randomly initialised model (weights come from a checkpoint later)."""

from __future__ import annotations

from typing import Any

from .backbone import build_backbone
from .configs import MDETRConfig, get_config
from .model import MDETR
from .transformer import Transformer


def build_mdetr(entry: str | MDETRConfig, **overrides: Any) -> MDETR:
    """Build the model of a hub entry (``"mdetr_resnet101"``, ``"mdetr_efficientnetB5"``, ...), ``"tiny"``, or
    an ``MDETRConfig``, with config fields replaced by ``overrides`` (e.g. ``aux_loss=True``).

    Nothing is downloaded: every weight, RoBERTa's included, is random until a checkpoint is loaded.
    The config is kept as ``model.config``.
    """
    config = get_config(entry, **overrides)
    return MDETR(config, build_backbone(config), Transformer(config))
