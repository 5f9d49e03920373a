"""MDETR weights on disk: the released ``.pth`` files, and the project's slim safetensors + config.json copy.

Released checkpoints (zenodo record 4721981) are dicts with keys ``model``, ``model_ema``, ``optimizer``,
``epoch``, ``args`` (BEST files may lack ``model_ema``). They are read with ``weights_only=True`` and
memory-mapped, so the optimizer moments are never paged in; the only non-tensor classes allowed are
``argparse.Namespace`` (``args``) and the pathlib paths that submitit runs store inside it. The EMA weights
are preferred because the published numbers come from them (``main.py --ema --eval``); the hub loader uses
``model``.

Buffers that the current libraries keep out of the state dict (RoBERTa's ``embeddings.position_ids``, saved by
transformers 4.5.1) are dropped before a strict load.

Project format, ``DIR/model.safetensors`` + ``DIR/config.json`` (``{"format": "sga-mdetr", "format_version",
"config", "metadata"}``, written last, so a directory with a config.json is complete).
"""

from __future__ import annotations

import argparse
import os
import pathlib
from typing import Any

import safetensors.torch
import torch

from shards import fs
from shards.errors import SgaError

from .build import build_mdetr
from .configs import MDETRConfig, get_config
from .model import MDETR

FORMAT = "sga-mdetr"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SAFE_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath]
WEIGHT_CHOICES = ("auto", "ema", "model")


def _torch_load(path: str) -> Any:
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Files written in torch's pre-1.6 format cannot be memory-mapped; read them whole.
            return torch.load(path, map_location="cpu", weights_only=True)


def read_released_state_dict(path: str, weights: str = "auto") -> tuple[dict[str, torch.Tensor], str]:
    """The state dict held by an MDETR ``.pth``, and which one: ``"model_ema"``, ``"model"`` or ``"file"``.

    ``weights``: ``"auto"`` (``model_ema`` when present and not None, else ``model``), ``"ema"`` or
    ``"model"``. A file that is itself a flat state dict is returned as ``"file"``.
    """
    if weights not in WEIGHT_CHOICES:
        raise SgaError(f"weights must be one of {WEIGHT_CHOICES}, not {weights!r}")
    if not os.path.isfile(path):
        raise SgaError(f"{path}: no such checkpoint file; download it first (zenodo record 4721981)")
    try:
        ckpt = _torch_load(path)
    except Exception as exc:
        try:
            needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            needed = []
        extra = f"; it needs the globals {needed}, which are not allowed" if needed else ""
        raise SgaError(f"{path}: not a loadable MDETR checkpoint ({type(exc).__name__}: {exc}){extra}. "
                       "Use a released MDETR .pth or a file written by torch.save(state_dict)") from exc
    if isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        if weights != "auto":
            raise SgaError(f"{path}: a bare state dict has no {weights!r} entry; use weights 'auto'")
        return ckpt, "file"
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else []
        raise SgaError(f"{path}: expected a dict with a 'model' state dict (MDETR's layout), "
                       f"found {type(ckpt).__name__} with keys {keys}")
    has_ema = ckpt.get("model_ema") is not None
    if weights == "ema" and not has_ema:
        raise SgaError(f"{path}: has no 'model_ema' weights (a BEST checkpoint?); load 'model' or 'auto'")
    which = "model_ema" if has_ema and weights != "model" else "model"
    return ckpt[which], which


def infer_entry(state_dict: dict[str, torch.Tensor]) -> str:
    """The hub entry whose layout a released state dict has, judged by the backbone's output width."""
    if any(k.startswith("detr.") for k in state_dict) or "qa_embed.weight" in state_dict:
        raise SgaError("this checkpoint is a PhraseCut/GQA/CLEVR model (segmentation or QA heads); only the "
                       "grounding entries (pretrained, RefCOCO/+/g) are supported")
    proj = state_dict.get("input_proj.weight")
    by_width = {2048: "mdetr_resnet101", 384: "mdetr_efficientnetB3", 512: "mdetr_efficientnetB5"}
    if proj is None or proj.shape[1] not in by_width:
        raise SgaError("cannot tell the MDETR variant from this state dict (no input_proj.weight of a known "
                       "width); name the entry explicitly")
    return by_width[proj.shape[1]]


def _load_strict(model: MDETR, state_dict: dict[str, torch.Tensor], source: str) -> MDETR:
    """Strictly load ``state_dict`` after dropping buffers this model keeps out of its state dict."""
    expected = model.state_dict()
    stale = {name for name, _ in model.named_buffers()} - set(expected)
    state_dict = {k: v for k, v in state_dict.items() if k not in stale}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [f"{k}: {list(state_dict[k].shape)} vs model {list(v.shape)}"
                  for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise SgaError(f"{source}: weights do not fit the {model.config.backbone} MDETR layout: "
                       f"{len(missing)} missing (e.g. {missing[:3]}), "
                       f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
                       f"{len(mismatched)} shape mismatches (e.g. {mismatched[:3]}); "
                       "check the entry/config matches the checkpoint")
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def load_mdetr_checkpoint(path: str, entry_or_config: str | MDETRConfig | None = None,
                          weights: str = "auto") -> MDETR:
    """Build the model for ``entry_or_config`` (inferred from the weights when None) and load a released
    ``.pth`` strictly. Returns the model in eval mode; nothing touches the network."""
    state_dict, which = read_released_state_dict(path, weights)
    config = get_config(entry_or_config if entry_or_config is not None else infer_entry(state_dict))
    return _load_strict(build_mdetr(config), state_dict, f"{path} [{which}]")


def save_mdetr(model: MDETR, config: MDETRConfig, out_dir: str,
               metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``out_dir/model.safetensors`` then ``out_dir/config.json`` (atomically, config last).

    ``metadata`` (JSON-serialisable, e.g. the source file and which weights) is stored in config.json.
    Returns a summary: ``{"out", "tensors", "bytes"}``.
    """
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    blob = safetensors.torch.save(tensors, metadata={"format": "pt"})
    fs.makedirs(out_dir)
    fs.write_bytes(fs.join(out_dir, WEIGHTS_FILE), blob)
    fs.write_json(fs.join(out_dir, CONFIG_FILE), {"format": FORMAT, "format_version": FORMAT_VERSION,
                                                   "config": config.to_dict(), "metadata": metadata or {}})
    return {"out": out_dir, "tensors": len(tensors), "bytes": len(blob)}


def read_mdetr_config(model_dir: str) -> tuple[MDETRConfig, dict[str, Any]]:
    """``(config, metadata)`` of a directory written by ``save_mdetr``."""
    path = fs.join(model_dir, CONFIG_FILE)
    if not fs.exists(path):
        raise SgaError(f"{path}: missing; {model_dir} is not an MDETR model directory (write one with "
                       "`sga teacher convert` or save_mdetr)")
    info = fs.read_json(path)
    if info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION:
        raise SgaError(f"{path}: format {info.get('format')!r} v{info.get('format_version')} is not "
                       f"{FORMAT!r} v{FORMAT_VERSION}; re-create it with this version of sga")
    return MDETRConfig.from_dict(info["config"]), info.get("metadata", {})


def load_mdetr(model_dir: str) -> MDETR:
    """The model saved by ``save_mdetr`` in ``model_dir`` (any ``pyarrow.fs`` URI), in eval mode."""
    config, _ = read_mdetr_config(model_dir)
    weights_path = fs.join(model_dir, WEIGHTS_FILE)
    try:
        # Local files are memory-mapped; other filesystems are read whole.
        if os.path.isfile(weights_path):
            state_dict = safetensors.torch.load_file(weights_path)
        else:
            state_dict = safetensors.torch.load(fs.read_bytes(weights_path))
    except (FileNotFoundError, safetensors.SafetensorError) as exc:
        raise SgaError(f"{weights_path}: cannot read the weights ({exc}); re-create the directory") from exc
    return _load_strict(build_mdetr(config), state_dict, weights_path)


def convert_checkpoint(src: str, entry: str | None, out_dir: str, weights: str = "auto") -> dict[str, Any]:
    """Released ``.pth`` -> slim ``out_dir`` (safetensors + config.json), validated by a strict load.

    Returns ``{"src", "entry", "weights", "out", "tensors", "bytes"}`` for the CLI to print.
    """
    state_dict, which = read_released_state_dict(src, weights)
    entry = entry or infer_entry(state_dict)
    config = get_config(entry)
    model = _load_strict(build_mdetr(config), state_dict, f"{src} [{which}]")
    del state_dict
    summary = save_mdetr(model, config, out_dir,
                         metadata={"source": os.path.basename(src), "entry": entry, "weights": which})
    return {"src": src, "entry": entry, "weights": which, **summary}
