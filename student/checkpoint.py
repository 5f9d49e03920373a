"""Training checkpoints without pickle: safetensors for tensors, JSON for everything else.

Layout under a run's output directory (local path or any ``pyarrow.fs`` URI)::

    OUT/checkpoints/step_00001000/model.safetensors      model weights (tied weights stored once)
    OUT/checkpoints/step_00001000/optimizer.safetensors  optimizer state tensors, "state/<param>/<name>"
    OUT/checkpoints/step_00001000/state.json             step, optimizer param groups, scheduler, run meta
    OUT/checkpoints/latest.json                          {"step": 1000, "name": "step_00001000"}

Every file is written atomically and ``state.json`` last, so a checkpoint directory is complete iff it has
``state.json``; ``latest.json`` moves only after that. The data order and every random draw of training are
functions of (seed, step) (``student.data``, ``student.train``), so the step is the whole sampler and RNG
state: nothing else needs saving for an exact resume.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shards import fs
from shards.errors import SgaError

CKPT_DIR = "checkpoints"
LATEST = "latest.json"
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
FORMAT_VERSION = 1


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (or the module itself)."""
    return getattr(model, "module", model)


def _storage_id(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


def model_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, aliases)``: the state dict with each shared tensor stored once (safetensors refuses
    shared storage), and ``alias -> stored name`` for the dropped duplicates (e.g. tied MLM decoder)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in unwrap(model).state_dict().items():
        sid = _storage_id(t)
        if sid in seen:
            aliases[name] = seen[sid]
            continue
        seen[sid] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    return tensors, aliases


def weights_digest(model: torch.nn.Module) -> bytes:
    """SHA-256 over the model's parameters and buffers (names, shapes, bytes): equal iff bitwise equal."""
    sha = hashlib.sha256()
    tensors, _ = model_tensors(model)
    for name in sorted(tensors):
        t = tensors[name]
        sha.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        sha.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.digest()


def save_weights(uri: str, model: torch.nn.Module, metadata: dict[str, str] | None = None) -> None:
    """Write the model's weights to one safetensors file (atomically)."""
    tensors, aliases = model_tensors(model)
    meta = {**(metadata or {}), "aliases": json.dumps(aliases, sort_keys=True)}
    fs.write_bytes(uri, st_save(tensors, metadata=meta))


def load_weights(uri: str, model: torch.nn.Module, strict: bool = True) -> None:
    """Load weights written by :func:`save_weights` into ``model`` (or its DDP wrapper)."""
    data = fs.read_bytes(uri)
    tensors = st_load(data)
    aliases = json.loads(_metadata(data).get("aliases", "{}"))
    for alias, name in aliases.items():
        tensors[alias] = tensors[name]
    unwrap(model).load_state_dict(tensors, strict=strict)


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (its header is an 8-byte length then JSON)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]).get("__metadata__", {}) or {}


def _optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (safetensors) and JSON (param groups, scalars)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state/{index}/{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split("/", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(out: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, meta: dict[str, Any], keep: int = 2) -> str:
    """Write checkpoint ``step`` under ``OUT/checkpoints`` and point ``latest.json`` at it; return its URI.

    Call on rank 0 only. ``meta`` (JSON) records what must not change on resume (seed, world size, ...).
    Keeps the newest ``keep`` checkpoints (``keep <= 0`` keeps all).
    """
    root = fs.join(out, CKPT_DIR)
    name = checkpoint_name(step)
    path = fs.join(root, name)
    fs.remove(path)  # leftovers of a save of this step that was killed before its state.json
    save_weights(fs.join(path, MODEL_FILE), model, {"step": str(step)})
    opt_tensors, opt_meta = _optimizer_parts(optimizer)
    fs.write_bytes(fs.join(path, OPTIM_FILE), st_save(opt_tensors))
    state = {"format_version": FORMAT_VERSION, "step": step, "optimizer": opt_meta,
             "scheduler": scheduler.state_dict() if scheduler is not None else None, "meta": meta}
    fs.write_bytes(fs.join(path, STATE_FILE), json.dumps(state, indent=1, sort_keys=True).encode())
    fs.write_json(fs.join(root, LATEST), {"step": step, "name": name})
    if keep > 0:
        for old in list_checkpoints(out)[:-keep]:
            fs.remove(fs.join(root, checkpoint_name(old)))  # removes the directory with its files
    return path


def list_checkpoints(out: str) -> list[int]:
    """Steps of the complete checkpoints under ``OUT/checkpoints``, ascending."""
    root = fs.join(out, CKPT_DIR)
    steps = []
    for name in fs.list_subdirs(root):
        if name.startswith("step_") and name[5:].isdigit() and fs.exists(fs.join(root, name, STATE_FILE)):
            steps.append(int(name[5:]))
    return sorted(steps)


def latest_checkpoint(out: str) -> str | None:
    """URI of the checkpoint ``latest.json`` names, else of the newest complete one, else ``None``."""
    root = fs.join(out, CKPT_DIR)
    try:
        name = fs.read_json(fs.join(root, LATEST))["name"]
        if fs.exists(fs.join(root, name, STATE_FILE)):
            return fs.join(root, name)
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        pass
    steps = list_checkpoints(out)
    return fs.join(root, checkpoint_name(steps[-1])) if steps else None


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its ``state.json`` dict
    (keys: step, meta, optimizer, scheduler, format_version)."""
    try:
        state = json.loads(fs.read_bytes(fs.join(path, STATE_FILE)))
    except (FileNotFoundError, ValueError) as exc:
        raise SgaError(f"{path} is not a complete checkpoint ({exc}); resume from another one or start "
                       "a new --out") from exc
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise SgaError(f"{path} was written by a newer sga (format {state['format_version']}); upgrade sga")
    load_weights(fs.join(path, MODEL_FILE), model)
    if optimizer is not None:
        tensors = st_load(fs.read_bytes(fs.join(path, OPTIM_FILE)))
        optimizer.load_state_dict(_optimizer_state(tensors, state["optimizer"]))
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state
