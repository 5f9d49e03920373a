"""The student: visio-linguistic BERT encoders and their pre-training heads.

``build_model(config)`` returns a :class:`PretrainModel`; its ``encoder`` is a
:class:`SingleStreamEncoder` (VL-BERT) or :class:`TwoStreamEncoder` (ViLBERT).
"""

from .pretrain import PretrainModel, build_model
from .single_stream import SingleStreamEncoder
from .two_stream import TwoStreamEncoder

__all__ = ["PretrainModel", "SingleStreamEncoder", "TwoStreamEncoder", "build_model"]
