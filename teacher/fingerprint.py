"""A teacher's fingerprint: one short hash of everything that decides its labels.

``fingerprint = sha256(weights digest, architecture config, preprocessing, inference settings)``. Each part
is serialised canonically (sorted keys, exact tensor bytes), so the fingerprint changes if and only if one of
them changes: a label set that records it can tell whether it was made by the same teacher. The device is
deliberately not part of it (the same weights on CPU or GPU are the same teacher); the inference precision is.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch

# Hex characters kept: 64 bits, plenty to tell teachers apart, short enough for file names and logs.
FINGERPRINT_CHARS = 16


def weights_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and raw bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        # A uint8 view reads the exact bytes of any dtype (bf16 has no numpy equivalent).
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def compute_fingerprint(weights: str, architecture: Mapping[str, Any], preprocessing: Mapping[str, Any],
                        inference: Mapping[str, Any]) -> str:
    """The first :data:`FINGERPRINT_CHARS` hex characters of the hash of the four parts.

    ``weights`` is a :func:`weights_digest`; the other parts are JSON-serialisable dicts (the tokenizer
    belongs to ``preprocessing``).
    """
    payload = json.dumps({"weights": weights, "architecture": architecture, "preprocessing": preprocessing,
                          "inference": inference}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:FINGERPRINT_CHARS]
