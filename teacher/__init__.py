"""Phrase-grounding teachers behind one interface (:mod:`teacher.base`), MDETR, and the bundled tiny teacher.

Heavy modules (the MDETR teacher, training) are imported by the functions that need them.
"""

from .base import (
    GroundingInput,
    PhraseBoxes,
    Teacher,
    load_teacher,
    register_teacher,
    registered_teachers,
)

__all__ = ["GroundingInput", "PhraseBoxes", "Teacher", "build_mdetr", "load_teacher", "register_teacher",
           "registered_teachers"]


def __getattr__(name: str):
    # build_mdetr pulls in torch and transformers (~4 s): imported on first use, so `sga --help` stays fast.
    if name == "build_mdetr":
        from .mdetr import build_mdetr

        return build_mdetr
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
