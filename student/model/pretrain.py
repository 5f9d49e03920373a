"""The pre-training model: an encoder (single- or two-stream) plus the heads of the enabled losses.

``PretrainModel.forward(batch)`` takes the collator's batch (:mod:`student.collate`) and returns the
encoder's states together with the head outputs the criterion reads:

==================  ====================  ==============================================================
key                 shape                 meaning
==================  ====================  ==============================================================
``text_states``     [B, L, Ht]            final wordpiece states
``region_states``   [B, V, Hv]            final visual-token states; index 0 is [IMG]
``pooled_text``     [B, Hp]               [CLS] summary (Linear + ReLU)
``pooled_image``    [B, Hp]               [IMG] summary (Linear + ReLU)
``mlm_logits``      [M, vocab]            only at the M positions where ``mlm_labels != -100``, in
                                          row-major order (scoring every position would cost B·L·vocab)
``mrc_logits``      [B, V, C]             detector-class logits of every visual token
``itm_logit``       [B]                   image-caption match logit
``gnd_logits``      [N, T']               f_align scores of the N sampled pairs (T' = 1 at phrase level)
``gnd_logit_mask``  [N, T']               real entries of ``gnd_logits``
==================  ====================  ==============================================================

Head outputs exist only for the losses in ``config.losses``. ``Ht = Hv = Hp = hidden_size`` for the
single stream; ``hidden_size``, ``v_hidden_size`` and ``bi_hidden_size`` for the two-stream encoder.
Fine-tuning heads use ``model.encoder`` (same states) and ``model.gnd_head.phrase_states``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..collate import IGNORE_INDEX
from ..config import StudentConfig
from .heads import GroundingHead, ITMHead, MLMHead, RegionHead
from .hf import load_text_weights
from .layers import init_weights
from .single_stream import SingleStreamEncoder
from .two_stream import TwoStreamEncoder

ENCODERS = {"single": SingleStreamEncoder, "two": TwoStreamEncoder}


class PretrainModel(nn.Module):
    """Encoder + pre-training heads; see the module docstring for ``forward``'s output keys."""

    def __init__(self, config: StudentConfig):
        super().__init__()
        self.config = config
        self.encoder = ENCODERS[config.encoder](config)
        enc, losses = self.encoder, set(config.losses)
        self.mlm_head = MLMHead(enc.text_dim, config.vocab_size) if "mlm" in losses else None
        self.mrc_head = RegionHead(enc.visual_dim, config.num_classes) if "mrc" in losses else None
        self.itm_head = ITMHead(enc.pooled_dim) if "itm" in losses else None
        self.gnd_head = (GroundingHead(enc.text_dim, enc.visual_dim, config.align_dim, config.phrase_level)
                         if "gnd" in losses else None)
        for module in self.modules():
            if not isinstance(module, nn.LSTM):  # the LSTM keeps PyTorch's uniform initialisation
                init_weights(module, config.init_std)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.encoder(batch["input_ids"], batch["attention_mask"], batch["region_features"],
                           batch["region_boxes"], batch["region_mask"])
        if self.mlm_head is not None:
            selected = batch["mlm_labels"] != IGNORE_INDEX
            out["mlm_logits"] = self.mlm_head(out["text_states"][selected],
                                              self.encoder.embeddings.word_embeddings.weight)
        if self.mrc_head is not None:
            out["mrc_logits"] = self.mrc_head(out["region_states"])
        if self.itm_head is not None:
            out["itm_logit"] = self.itm_head(out["pooled_text"], out["pooled_image"])
        if self.gnd_head is not None:
            out["gnd_logits"], out["gnd_logit_mask"] = self.gnd_head(
                out["text_states"], out["region_states"], batch["phrase_tokens"], batch["phrase_token_mask"],
                batch["gnd_batch"], batch["gnd_phrase"], batch["gnd_region"])
        return out


def build_model(config: StudentConfig) -> PretrainModel:
    """The pre-training model for ``config``, its text stream loaded from ``config.text_init`` if set."""
    model = PretrainModel(config)
    if config.text_init:
        load_text_weights(model.encoder, config.text_init)
    return model
