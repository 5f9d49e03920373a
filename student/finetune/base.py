"""The fine-tuning task interface and its registry.

A task reads its split files, makes a head for the encoder, turns a list of items into a batch (encoder
inputs from :class:`student.finetune.data.InputEncoder` plus targets), and knows its loss and metric.
The loop (:mod:`student.finetune.engine`) only talks to this interface, so adding a task is one module
and one :func:`register_task` call; there is no string dispatch anywhere else.

Registered tasks: ``refexp`` (RefCOCO+ format), ``vqa`` (VQA 2.0 JSON), ``vcr_qa`` and ``vcr_qar``
(VCR jsonl, Q->A and QA->R). ``sga finetune --task vcr`` runs both VCR subtasks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from shards.errors import SgaError

from .data import InputEncoder, RegionStore


@dataclass(frozen=True)
class TaskDefaults:
    """Optimisation defaults of a task (the paper's, ViLBERT's text lengths); every one is overridable.

    Paper: Adam, lr 4e-5 and batch 256 for grounding and VQA, lr 2e-5 and batch 64 for VCR. ViLBERT's
    configs run 20 epochs and read at most 20 (RefCOCO+), 23 (VQA), 60 (Q->A) or 80 (QA->R) wordpieces.
    """

    lr: float
    batch_size: int
    epochs: int
    max_text_len: int


class Task(Protocol):
    """One downstream task. ``items`` are the task's own records (dataclasses of its module)."""

    name: str
    defaults: TaskDefaults
    metric: str                                   # name of the reported metric, e.g. "accuracy"

    def load(self, split: str) -> list[Any]:
        """Items of ``split`` whose image has regions; the rest are counted in :attr:`dropped`."""

    @property
    def dropped(self) -> dict[str, int]:
        """Items skipped while loading, by reason (e.g. ``"no_regions"``)."""

    def build_head(self, encoder: nn.Module, train_items: list[Any]) -> nn.Module:
        """A new head for ``encoder`` (sized by its ``text_dim``, ``visual_dim`` or ``pooled_dim``)."""

    def batch(self, items: list[Any], encode: InputEncoder) -> dict[str, Any]:
        """Encoder inputs (``InputEncoder`` keys) and the targets the loss and the metric read."""

    def loss(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """Scalar training loss of the head's ``logits``."""

    def scores(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """float ``[len(items)]``: each item's contribution to the metric (accuracy: 0 or 1; VQA: soft)."""


TaskFactory = Callable[[str, RegionStore], Task]
_TASKS: dict[str, TaskFactory] = {}


def register_task(name: str, factory: TaskFactory) -> None:
    """Make ``factory(task_dir, regions)`` available as task ``name``."""
    _TASKS[name] = factory


def task_names() -> list[str]:
    _ensure_builtin()
    return sorted(_TASKS)


def build_task(name: str, task_dir: str, regions: RegionStore) -> Task:
    """The task ``name`` reading its files under ``task_dir`` and its images from ``regions``."""
    _ensure_builtin()
    if name not in _TASKS:
        raise SgaError(f"unknown fine-tuning task {name!r}; choose from {', '.join(sorted(_TASKS))}")
    return _TASKS[name](task_dir, regions)


def _ensure_builtin() -> None:
    # The built-in tasks register themselves on import; importing here keeps this module import-light.
    from . import refexp, vcr, vqa  # noqa: F401
