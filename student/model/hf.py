"""Start the text stream from a local Hugging Face BERT checkpoint (no hub access).

The checkpoint directory is what ``transformers`` writes with ``save_pretrained`` (``config.json`` plus
``model.safetensors``); it is read with ``BertModel.from_pretrained(dir, local_files_only=True)``. Its
``embeddings.*`` and ``encoder.layer.N.*`` tensors are copied into the encoder's parameters of the same
names (:mod:`student.model.layers` mirrors BERT's layout). The BERT pooler is not used: the student's
poolers are ViLBERT's Linear + ReLU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shards.errors import SgaError

from ..config import StudentConfig

TEXT_PREFIXES = ("embeddings.", "encoder.")


def _load(local_dir: str) -> Any:
    from transformers import BertModel

    try:
        return BertModel.from_pretrained(local_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise SgaError(f"cannot load a BERT checkpoint from {local_dir}: {exc}. Point text_init at a local "
                       "directory written by transformers' save_pretrained (config.json + weights).") from exc


def config_from_bert(local_dir: str, **overrides: Any) -> StudentConfig:
    """A :class:`StudentConfig` whose text-stream sizes are the checkpoint's, with ``text_init`` set."""
    from transformers import BertConfig

    try:
        bert = BertConfig.from_pretrained(local_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise SgaError(f"cannot read a BERT config.json in {local_dir}: {exc}") from exc
    sizes = dict(vocab_size=bert.vocab_size, hidden_size=bert.hidden_size, num_layers=bert.num_hidden_layers,
                 num_heads=bert.num_attention_heads, intermediate_size=bert.intermediate_size,
                 max_position=bert.max_position_embeddings, type_vocab_size=bert.type_vocab_size,
                 text_init=str(local_dir))
    return StudentConfig(**{**sizes, **overrides})


def load_text_weights(encoder: nn.Module, local_dir: str) -> list[str]:
    """Copy the BERT checkpoint in ``local_dir`` into ``encoder``'s text stream; return the copied keys.

    Raises ``SgaError`` when the checkpoint is not a GELU BERT or a tensor's shape differs from the
    encoder's (build the config with :func:`config_from_bert` so the sizes agree).
    """
    bert = _load(local_dir)
    if bert.config.hidden_act != "gelu":
        raise SgaError(f"{local_dir}: hidden_act is {bert.config.hidden_act!r}; "
                       "the student's layers use 'gelu'")
    source = bert.state_dict()
    target = {k: v for k, v in encoder.state_dict().items() if k.startswith(TEXT_PREFIXES)}
    missing = sorted(set(target) - set(source))
    if missing:
        raise SgaError(f"{local_dir}: checkpoint lacks {len(missing)} text-stream tensors, "
                       f"e.g. {missing[:3]}")
    for key, own in target.items():
        if own.shape != source[key].shape:
            raise SgaError(f"{local_dir}: {key} has shape {tuple(source[key].shape)}, the student expects "
                           f"{tuple(own.shape)}; build the config with student.model.hf.config_from_bert")
    with torch.no_grad():
        for key, own in target.items():
            own.copy_(source[key])
    return sorted(target)
