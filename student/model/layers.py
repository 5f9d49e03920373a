"""Transformer building blocks shared by both encoders.

Parameter names follow Hugging Face's ``BertLayer`` (``attention.self.query``, ``attention.output.dense``,
``attention.output.LayerNorm``, ``intermediate.dense``, ``output.dense``, ``output.LayerNorm``), so a text
stream made of :class:`TransformerLayer` loads a ``BertModel`` state dict key for key (see ``hf.py``)
while the forward pass stays our own: one code path for both encoders, independent of the installed
transformers version, and ``scaled_dot_product_attention`` for speed.

Masks are bool ``[B, L]`` with True at real tokens. Every sequence the encoders build starts with a real
token ([CLS] or [IMG]), so no attention row is ever fully masked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-12  # BERT's value; pretrained checkpoints were trained with it


class MultiHeadAttention(nn.Module):
    """Queries from ``x`` ``[B, Lq, q_dim]``, keys and values from ``context`` ``[B, Lk, kv_dim]``.

    Returns ``[B, Lq, inner_dim]``. Self-attention passes ``context = x``; co-attention passes the other
    stream (ViLBERT), with ``inner_dim`` the shared bi-attention width.
    """

    def __init__(self, q_dim: int, kv_dim: int, inner_dim: int, num_heads: int, dropout: float):
        super().__init__()
        if inner_dim % num_heads:
            raise ValueError(f"attention width {inner_dim} is not a multiple of {num_heads} heads")
        self.num_heads = num_heads
        self.dropout = dropout
        self.query = nn.Linear(q_dim, inner_dim)
        self.key = nn.Linear(kv_dim, inner_dim)
        self.value = nn.Linear(kv_dim, inner_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.num_heads, -1).transpose(1, 2)        # [B, heads, L, head_dim]

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(context)), self._heads(self.value(context))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=context_mask[:, None, None, :],
                                             dropout_p=self.dropout if self.training else 0.0)
        return out.transpose(1, 2).flatten(2)


class ResidualOutput(nn.Module):
    """``LayerNorm(x + dropout(dense(h)))``, BERT's post-norm residual (HF ``BertSelfOutput``)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(in_dim, out_dim)
        self.LayerNorm = nn.LayerNorm(out_dim, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(h)))


class Attention(nn.Module):
    """Attention plus its residual output; ``[B, Lq, q_dim]`` -> ``[B, Lq, q_dim]``."""

    def __init__(self, q_dim: int, kv_dim: int, inner_dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.self = MultiHeadAttention(q_dim, kv_dim, inner_dim, num_heads, dropout)
        self.output = ResidualOutput(inner_dim, q_dim, dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, context, context_mask), x)


class Intermediate(nn.Module):
    """The feed-forward expansion, ``GELU(dense(x))``."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, inner_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class TransformerLayer(nn.Module):
    """One post-norm BERT layer: self-attention then feed-forward; ``[B, L, dim]`` -> ``[B, L, dim]``."""

    def __init__(self, dim: int, num_heads: int, inner_dim: int, dropout: float):
        super().__init__()
        self.attention = Attention(dim, dim, dim, num_heads, dropout)
        self.intermediate = Intermediate(dim, inner_dim)
        self.output = ResidualOutput(inner_dim, dim, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, x, mask)
        return self.output(self.intermediate(x), x)


class LayerStack(nn.Module):
    """``num_layers`` :class:`TransformerLayer` under ``.layer`` (HF's ``encoder.layer.N`` key layout)."""

    def __init__(self, num_layers: int, dim: int, num_heads: int, inner_dim: int, dropout: float):
        super().__init__()
        self.layer = nn.ModuleList(TransformerLayer(dim, num_heads, inner_dim, dropout)
                                   for _ in range(num_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, start: int = 0, stop: int | None = None
                ) -> torch.Tensor:
        """Run layers ``start .. stop - 1`` (all by default); the two-stream encoder interleaves slices."""
        for layer in self.layer[start:stop]:
            x = layer(x, mask)
        return x


class Pooler(nn.Module):
    """``ReLU(dense(x[:, 0]))``: the [CLS] / [IMG] summary of a sequence (ViLBERT's text/image poolers)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.dense = nn.Linear(in_dim, out_dim)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return F.relu(self.dense(states[:, 0]))


def init_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation: normal(0, std) weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
