"""Pre-training heads on top of an encoder's states.

* :class:`MLMHead`: masked-word logits; the decoder is the word-embedding matrix (passed in, not owned, so
  no parameter is stored twice and checkpoints save with safetensors as they are).
* :class:`RegionHead`: masked-region class logits over the detector's C classes.
* :class:`ITMHead`: one image-sentence match logit from the product of the pooled [CLS] and [IMG].
* :class:`GroundingHead`: the grounding-alignment score g = f_align(H_V*, H_L*) of sampled (region,
  phrase) pairs. f_align projects the region state and the phrase state each with Linear + ReLU into
  ``align_dim``, multiplies them elementwise and a linear grounding layer turns the product into a logit.
  The phrase state H_L* is either the last state of an LSTM run over the phrase's wordpiece states
  (``phrase_level="lstm"``) or every wordpiece state on its own (``"token"``: one logit per wordpiece).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LAYER_NORM_EPS


def _transform(dim: int) -> nn.Sequential:
    """BERT's prediction-head transform: dense, GELU, LayerNorm."""
    return nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim, eps=LAYER_NORM_EPS))


class MLMHead(nn.Module):
    """Text states ``[M, dim]`` -> vocabulary logits ``[M, vocab]``, decoded with the word embeddings."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.transform = _transform(dim)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, states: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(states), word_embeddings, self.bias)


class RegionHead(nn.Module):
    """Visual states ``[B, V, dim]`` -> detector-class logits ``[B, V, C]``."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.transform = _transform(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.transform(states))


class ITMHead(nn.Module):
    """Pooled text and image ``[B, dim]`` each -> match logit ``[B]`` (ViLBERT's "mul" fusion)."""

    def __init__(self, dim: int):
        super().__init__()
        self.classifier = nn.Linear(dim, 1)

    def forward(self, pooled_text: torch.Tensor, pooled_image: torch.Tensor) -> torch.Tensor:
        return self.classifier(pooled_text * pooled_image).squeeze(-1)


class GroundingHead(nn.Module):
    """f_align over sampled pairs, with the phrase encoder chosen by ``phrase_level``."""

    def __init__(self, text_dim: int, visual_dim: int, align_dim: int, phrase_level: str):
        super().__init__()
        self.lstm = nn.LSTM(text_dim, text_dim, batch_first=True) if phrase_level == "lstm" else None
        self.region_proj = nn.Sequential(nn.Linear(visual_dim, align_dim), nn.ReLU())
        self.phrase_proj = nn.Sequential(nn.Linear(text_dim, align_dim), nn.ReLU())
        self.score = nn.Linear(align_dim, 1)

    def phrase_states(self, text_states: torch.Tensor, phrase_tokens: torch.Tensor,
                      phrase_token_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Phrase representations H_L* for every phrase of the batch.

        Args:
            text_states: ``[B, L, Ht]``; phrase_tokens: long ``[B, P, T]`` text positions;
            phrase_token_mask: bool ``[B, P, T]``.

        Returns:
            ``(states, mask)``: ``[B, P, 1, Ht]`` and ``[B, P, 1]`` at phrase level (the LSTM state after
            the phrase's last wordpiece), ``[B, P, T, Ht]`` and ``[B, P, T]`` at token level.
        """
        B = text_states.shape[0]
        tokens = text_states[torch.arange(B, device=text_states.device)[:, None, None], phrase_tokens]
        if self.lstm is None:
            return tokens, phrase_token_mask
        phrase_mask = phrase_token_mask.any(-1)
        seqs = tokens[phrase_mask]                                        # [Q, T, Ht]
        lengths = phrase_token_mask[phrase_mask].sum(-1)                  # [Q] >= 1
        # The LSTM runs in float32: cuDNN's RNN kernels do not take every autocast dtype (bf16).
        with torch.autocast(device_type=seqs.device.type, enabled=False):
            out, _ = self.lstm(seqs.float())
        # A forward LSTM's output at the last real step has not seen the padding after it.
        last = out[torch.arange(len(seqs), device=seqs.device), lengths - 1]
        states = last.new_zeros(*phrase_mask.shape, 1, last.shape[-1])
        states[phrase_mask] = last.unsqueeze(1)
        return states.to(text_states.dtype), phrase_mask.unsqueeze(-1)

    def forward(self, text_states: torch.Tensor, region_states: torch.Tensor, phrase_tokens: torch.Tensor,
                phrase_token_mask: torch.Tensor, gnd_batch: torch.Tensor, gnd_phrase: torch.Tensor,
                gnd_region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of the N sampled pairs ``(gnd_batch, gnd_phrase, gnd_region)`` (collator keys).

        Returns:
            ``(logits, mask)``, both ``[N, T']`` with ``T' = 1`` at phrase level and ``T`` at token level;
            ``mask`` marks the real wordpieces of each pair's phrase.
        """
        states, mask = self.phrase_states(text_states, phrase_tokens, phrase_token_mask)
        phrase = self.phrase_proj(states[gnd_batch, gnd_phrase])             # [N, T', A]
        region = self.region_proj(region_states[gnd_batch, gnd_region])      # [N, A]
        logits = self.score(phrase * region.unsqueeze(1)).squeeze(-1)         # [N, T']
        return logits, mask[gnd_batch, gnd_phrase]
