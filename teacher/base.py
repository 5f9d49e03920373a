"""The teacher interface: what the labeling job sends a grounding model and what it gets back.

A teacher takes a batch of (image, caption, phrase character spans) and returns, for every phrase, boxes in
the original image's pixels (xyxy) with scores, best first, all at or above the teacher's ``score_floor`` and
at most ``top_k`` of them. Its ``fingerprint`` identifies everything that decides those outputs (weights,
architecture, preprocessing, inference settings), so label sets record which teacher made them.

Teachers are chosen by a spec string: a registered name (``"tiny"``, the bundled small MDETR), or a local path
to a teacher directory. Adding a teacher (say OWLv2 from a local Hugging Face directory) is one new module
that calls :func:`register_teacher`; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from shards.errors import SgaError

# The small MDETR trained by ``sga teacher train`` on the synthetic world, shipped with the package.
TINY_DIR = Path(__file__).resolve().parent / "assets" / "tiny"


@dataclass
class GroundingInput:
    """One sample to ground.

    ``image``: uint8 ``[H, W, 3]`` RGB at its original size; ``spans``: ``[start, end)`` character spans of
    the phrases in ``caption``.
    """

    image: np.ndarray
    caption: str
    spans: list[tuple[int, int]]


@dataclass
class PhraseBoxes:
    """A teacher's answer for one phrase.

    ``boxes``: float32 ``[K, 4]`` pixel xyxy in the original image, best first; ``scores``: float32 ``[K]``,
    descending, each >= the teacher's ``score_floor``. ``K`` may be 0.
    """

    boxes: np.ndarray
    scores: np.ndarray

    @classmethod
    def empty(cls) -> PhraseBoxes:
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32))


@runtime_checkable
class Teacher(Protocol):
    """A phrase-grounding model behind one call."""

    name: str
    fingerprint: str

    def ground(self, batch: Sequence[GroundingInput]) -> list[list[PhraseBoxes]]:
        """``[sample][phrase]`` answers, in the order of ``batch`` and of each sample's ``spans``."""
        ...


# factory(device=..., score_floor=..., top_k=..., **kwargs) -> Teacher
TeacherFactory = Callable[..., Teacher]
_REGISTRY: dict[str, TeacherFactory] = {}


def register_teacher(name: str, factory: TeacherFactory) -> None:
    """Make ``load_teacher(name, ...)`` call ``factory(device=, score_floor=, top_k=, **kwargs)``."""
    if not name or "/" in name:
        raise ValueError(f"teacher name {name!r} must be non-empty and contain no '/' (paths are specs too)")
    _REGISTRY[name] = factory


def registered_teachers() -> list[str]:
    return sorted(_REGISTRY)


def load_teacher(spec: str, device: str = "cpu", score_floor: float = 0.05, top_k: int = 10,
                 **kwargs) -> Teacher:
    """The teacher named by ``spec``: a registered name (``"tiny"``) or a local teacher directory.

    A directory is an MDETR teacher as written by ``sga teacher train`` / ``sga teacher convert``
    (safetensors weights, config JSON, tokenizer files, ``teacher.json``). Extra ``kwargs`` go to the factory.
    """
    if not 0.0 <= score_floor <= 1.0:
        raise SgaError(f"score_floor must lie in [0, 1], got {score_floor}; pass e.g. --score-floor 0.05")
    if top_k < 1:
        raise SgaError(f"top_k must be >= 1, got {top_k}; pass e.g. --top-k 10")
    if spec in _REGISTRY:
        return _REGISTRY[spec](device=device, score_floor=score_floor, top_k=top_k, **kwargs)
    if Path(spec).is_dir():
        from .grounding import MDETRTeacher

        return MDETRTeacher.from_dir(spec, device=device, score_floor=score_floor, top_k=top_k, **kwargs)
    raise SgaError(f"unknown teacher {spec!r}: not a registered name ({', '.join(registered_teachers())}) "
                   "and not a local directory; pass --teacher tiny or --teacher PATH to a teacher directory "
                   "(write one with `sga teacher train` or `sga teacher convert`)")


def _load_tiny(**kwargs) -> Teacher:
    from .grounding import MDETRTeacher

    if not (TINY_DIR / "teacher.json").is_file():
        raise SgaError(f"the bundled tiny teacher is missing from {TINY_DIR}; reinstall the package or train "
                       "one with `sga teacher train --world DIR --out DIR` and pass --teacher DIR")
    return MDETRTeacher.from_dir(TINY_DIR, name="tiny", **kwargs)


register_teacher("tiny", _load_tiny)
