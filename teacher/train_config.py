"""Settings of ``sga teacher train`` and what follows from them alone: the learning-rate schedule, the batch
of every step, the dropout seed of every step and rank, and the model and preprocessing configurations."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .mdetr import get_config
from .preprocess import PreprocessConfig

# Fields that only say how a run is executed; everything else must match to resume a checkpoint.
RUNTIME_FIELDS = ("world", "out", "threads", "nproc", "eval_every", "checkpoint_every", "log_every")
# What a checkpoint written before a setting existed ran with, where today's default differs.
LEGACY_DEFAULTS = {"backbone_pretrain_steps": 0, "backbone_lr_ratio": 1.0}


@dataclass
class TrainConfig:
    world: str
    out: str
    steps: int = 6000
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 300
    decay_start: float = 0.6          # fraction of the steps after which the lr follows a cosine to the end
    min_lr_ratio: float = 0.02
    grad_clip: float = 0.1
    seed: int = 0
    val_samples: int = 500
    short_side: int = 96
    max_size: int = 192
    vocab_size: int = 1000
    backbone_widths: tuple[int, ...] = (16, 48, 96, 128)
    d_model: int = 128
    nheads: int = 4
    enc_layers: int = 3
    dec_layers: int = 3
    dim_feedforward: int = 256
    num_queries: int = 12
    dropout: float = 0.1              # transformer, resizer and text-encoder dropout
    eos_coef: float = 0.1             # weight of the no-object target of unmatched queries
    contrastive_align: bool = True
    contrastive_weight: float = 1.0   # weight of the contrastive alignment loss (MDETR: 1)
    # Training captions longer than the text encoder: "truncate" (phrases past the cut are not learnt) or
    # "clauses", one example per clause (window of whole phrases), as the teacher grounds such captions
    # (one full run with it reached held-out recall@1 0.62 against 0.76 truncated; not the default).
    long_captions: str = "truncate"
    # The CNN is pretrained first (teacher.backbone_pretrain) and then trained at a tenth of ``lr``: from
    # scratch the CNN carried no colour at object cells and recall@1 plateaued at 0.57 (issue 3).
    backbone_pretrain_steps: int = 600    # 0: no pretraining
    backbone_lr_ratio: float = 0.1    # the CNN's learning rate relative to ``lr``
    # CNN stages kept as pretrained, as DETR freezes ResNet's stem and first stage: their backward, at the
    # highest resolutions, is skipped.
    backbone_frozen_stages: int = 1
    init: str | None = None           # a teacher directory whose weights (and tokenizer) the run starts from
    threads: int = 1                  # torch threads per process
    nproc: int = 1                    # data-parallel processes (ranks); the batch is split between them
    eval_every: int = 500
    checkpoint_every: int = 500
    log_every: int = 50

    def identity(self) -> dict:
        data = dataclasses.asdict(self)
        data["backbone_widths"] = list(self.backbone_widths)
        return {k: v for k, v in data.items() if k not in RUNTIME_FIELDS}


def lr_at(config: TrainConfig, step: int) -> float:
    """Linear warm-up, constant, then cosine from ``decay_start`` down to ``min_lr_ratio * lr``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_from = int(config.decay_start * config.steps)
    if step < decay_from:
        return config.lr
    progress_ = (step - decay_from) / max(config.steps - decay_from, 1)
    floor = config.min_lr_ratio * config.lr
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress_))


def batch_indices(config: TrainConfig, step: int, num_examples: int) -> torch.Tensor:
    """The example indices of ``step``: epoch-wise permutations seeded by ``(seed, epoch)``, last partial
    batch dropped, so a resumed run sees exactly the batches of an uninterrupted one."""
    per_epoch = num_examples // config.batch_size
    epoch, offset = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    perm = torch.randperm(num_examples, generator=generator)
    return perm[offset * config.batch_size: (offset + 1) * config.batch_size]


def step_seed(config: TrainConfig, step: int, rank: int) -> int:
    """The seed of ``step``'s random draws (dropout) on ``rank``: a resumed run draws what an uninterrupted
    one would have, with no RNG state in the checkpoint."""
    return (config.seed * 1_000_003 + step) * 1024 + rank


def preprocess_config(config: TrainConfig) -> PreprocessConfig:
    # Padding to the backbone's stride keeps an image's features independent of its batch neighbours.
    return PreprocessConfig(short_side=config.short_side, max_size=config.max_size,
                            size_multiple=2 ** len(config.backbone_widths))


def model_config(config: TrainConfig, vocab_size: int, aux_loss: bool):
    return get_config("tiny", backbone_widths=config.backbone_widths, d_model=config.d_model,
                      nheads=config.nheads, enc_layers=config.enc_layers, dec_layers=config.dec_layers,
                      dim_feedforward=config.dim_feedforward, num_queries=config.num_queries,
                      dropout=config.dropout, aux_loss=aux_loss,
                      text_encoder={"vocab_size": vocab_size, "hidden_dropout_prob": config.dropout,
                                    "attention_probs_dropout_prob": config.dropout})


def config_from_json(path: str) -> TrainConfig:
    data = json.loads(Path(path).read_text())
    return TrainConfig(**{**data, "backbone_widths": tuple(data["backbone_widths"])})
