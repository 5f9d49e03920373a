"""MDETR (Kamath et al. 2021) re-implemented to load the official checkpoints; see README.md here."""

from .build import build_mdetr
from .checkpoint import convert_checkpoint, load_mdetr, load_mdetr_checkpoint, save_mdetr
from .configs import ENTRIES, MDETRConfig, get_config
from .model import MDETR

__all__ = [
    "ENTRIES",
    "MDETR",
    "MDETRConfig",
    "build_mdetr",
    "convert_checkpoint",
    "get_config",
    "load_mdetr",
    "load_mdetr_checkpoint",
    "save_mdetr",
]
