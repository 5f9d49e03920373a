"""MDETR's transformer: a DETR encoder over concatenated image and text tokens, and a DETR decoder.

Both are post-norm (residual add, then LayerNorm), ReLU FFNs, torch ``nn.MultiheadAttention`` (its packed
``in_proj_weight`` = rows ``[W_q; W_k; W_v]`` is the layout of the checkpoints). All tensors here are batch
first: ``[B, N, D]``.

- Encoder layer: ``q = k = x + pos``, ``v = x``; attention -> add -> norm1 -> FFN -> add -> norm2. There is no
  final encoder norm. Image tokens carry the sine position codes, text tokens a zero code.
- Decoder layer: self-attention (``q = k = tgt + query_pos``) -> add -> norm1 -> cross-attention to the whole
  memory, image *and* text (``q = tgt + query_pos``, ``k = memory + pos``, ``v = memory``) -> add -> norm3 ->
  FFN -> add -> norm4. The names skip norm2 because the released model has no text cross-attention block.
- The decoder's shared ``norm`` is applied to every layer's output, and all of them are returned
  (``[L, B, Q, D]``) so the heads can supervise every layer. The target starts at zero; the learned query
  embeddings enter only as ``query_pos``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configs import MDETRConfig
from .text_encoder import FeatureResizer, build_text_encoder


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, nheads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nheads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        q = k = src + pos
        attn = self.self_attn(q, k, src, key_padding_mask=padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(ffn))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, nheads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nheads, dropout=dropout, batch_first=True)
        self.cross_attn_image = nn.MultiheadAttention(d_model, nheads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.norm4 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.dropout4 = nn.Dropout(dropout)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor,
                memory_mask: torch.Tensor) -> torch.Tensor:
        q = k = tgt + query_pos
        attn = self.self_attn(q, k, tgt, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(attn))
        attn = self.cross_attn_image(tgt + query_pos, memory + pos, memory, key_padding_mask=memory_mask,
                                     need_weights=False)[0]
        tgt = self.norm3(tgt + self.dropout3(attn))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm4(tgt + self.dropout4(ffn))


class Encoder(nn.Module):
    def __init__(self, num_layers: int, *layer_args):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(*layer_args) for _ in range(num_layers))

    def forward(self, src: torch.Tensor, pos: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            src = layer(src, pos, padding_mask)
        return src


class Decoder(nn.Module):
    def __init__(self, num_layers: int, d_model: int, *layer_args):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(d_model, *layer_args) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor,
                memory_mask: torch.Tensor) -> torch.Tensor:
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, query_pos, memory, pos, memory_mask)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)


class Transformer(nn.Module):
    """Encodes text, fuses it with image tokens, decodes the object queries.

    ``forward(src [B, D, h, w], mask [B, h, w] (True = padding), pos [B, D, h, w], query_embed [Q, D],
    input_ids [B, T], attention_mask [B, T] (1 = token))`` returns ``hs [L, B, Q, D]`` (every decoder layer,
    normed) and ``text_memory [B, T, D]`` (the encoder output at the text positions).
    """

    def __init__(self, config: MDETRConfig):
        super().__init__()
        d, layer_args = config.d_model, (config.nheads, config.dim_feedforward, config.dropout)
        self.encoder = Encoder(config.enc_layers, d, *layer_args)
        self.decoder = Decoder(config.dec_layers, d, *layer_args)
        for p in [*self.encoder.parameters(), *self.decoder.parameters()]:
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        self.text_encoder = build_text_encoder(config.text_encoder)
        self.resizer = FeatureResizer(self.text_encoder.config.hidden_size, d, config.dropout)

    def forward(self, src: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, query_embed: torch.Tensor,
                input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        text = self.resizer(text)
        num_text = text.shape[1]
        tokens = torch.cat([src.flatten(2).transpose(1, 2), text], dim=1)
        token_pos = torch.cat([pos.flatten(2).transpose(1, 2), torch.zeros_like(text)], dim=1)
        padding = torch.cat([mask.flatten(1), attention_mask == 0], dim=1)
        memory = self.encoder(tokens, token_pos, padding)
        query_pos = query_embed[None].expand(src.shape[0], -1, -1)
        hs = self.decoder(torch.zeros_like(query_pos), query_pos, memory, token_pos, padding)
        return hs, memory[:, -num_text:]
