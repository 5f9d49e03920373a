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
from .mdetr import build_mdetr

__all__ = ["GroundingInput", "PhraseBoxes", "Teacher", "build_mdetr", "load_teacher", "register_teacher",
           "registered_teachers"]
