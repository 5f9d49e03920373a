"""``sga teacher train``: train a small MDETR on a synthetic world's ground truth, on CPU, resumably.

Stages: split the world (the last ``val_samples`` images are held out) -> train a byte-level BPE tokenizer on
the training captions -> prepare examples (:mod:`teacher.traindata`) -> build the model (the ``tiny`` MDETR
entry with this config's sizes) -> optionally pretrain its CNN on rendered scenes
(:mod:`teacher.backbone_pretrain`, what ImageNet pretraining is to MDETR's ResNet) -> AdamW with warm-up, a
long constant phase and a cosine decay, MDETR's losses on every decoder layer -> periodic held-out recall ->
the teacher directory.

Output directory: the teacher (``model.safetensors``, ``config.json``, ``tokenizer/``, ``teacher.json``, the
last written) plus ``train_log.jsonl``, ``train_state/backbone.safetensors`` (the pretrained CNN) and
``train_state/checkpoint.pt`` (model, optimizer, step, RNG).
Rerunning the same command resumes from the checkpoint; the run is deterministic given the seed, the process
count and the thread count (batches depend only on the seed and the step, dropout on the seed, the step and
the rank). ``nproc > 1`` trains data-parallel on that many ranks under torchrun (:mod:`teacher.parallel`).
Entry point of a rank: ``python -m teacher.train --config OUT/train_config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from shards.cliutil import rank_main
from shards.errors import SgaError
from shards.progress import progress

from .backbone_pretrain import BackbonePretrainConfig, pretrain_backbone
from .criterion import CriterionConfig, SetCriterion
from .evaluate import evaluate_teacher
from .grounding import TOKENIZER_DIR, InferenceConfig, MDETRTeacher, write_teacher_json
from .matcher import HungarianMatcher
from .mdetr import build_mdetr, get_config
from .mdetr.checkpoint import load_mdetr, save_mdetr
from .parallel import (
    SUMMARY_FILE,
    Ranks,
    average_gradients,
    barrier,
    check_in_step,
    check_split,
    global_mean,
    init_ranks,
    share,
    shutdown,
)
from .preprocess import PreprocessConfig
from .tokenizer import load_tokenizer, train_tokenizer
from .traindata import collate, make_examples
from .worlddata import iter_world, world_captions

CHECKPOINT = "train_state/checkpoint.pt"
LOG_FILE = "train_log.jsonl"
# Fields that only say how a run is executed; everything else must match to resume a checkpoint.
_RUNTIME_FIELDS = ("world", "out", "threads", "nproc", "eval_every", "checkpoint_every", "log_every")
BACKBONE_STATE = "train_state/backbone.safetensors"
# What a checkpoint written before a setting existed ran with, where today's default differs.
_LEGACY_DEFAULTS = {"backbone_pretrain_steps": 0, "backbone_lr_ratio": 1.0}


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
    # "windows", one example per window of whole phrases, as the teacher grounds such captions.
    long_captions: str = "truncate"
    # The CNN is pretrained first (teacher.backbone_pretrain) and then trained at a tenth of ``lr``: from
    # scratch the CNN carried no colour at object cells and recall@1 plateaued at 0.57 (issue 3).
    backbone_pretrain_steps: int = 600    # 0: no pretraining
    backbone_lr_ratio: float = 0.1    # the CNN's learning rate relative to ``lr``
    # CNN stages kept as pretrained, as DETR freezes ResNet's stem and first stage: their backward, at the
    # highest resolutions, is skipped.
    backbone_frozen_stages: int = 0
    init: str | None = None           # a teacher directory whose weights (and tokenizer) the run starts from
    threads: int = 1                  # torch threads per process
    nproc: int = 1                    # data-parallel processes (ranks); the batch is split between them
    eval_every: int = 500
    checkpoint_every: int = 500
    log_every: int = 50

    def identity(self) -> dict:
        data = dataclasses.asdict(self)
        data["backbone_widths"] = list(self.backbone_widths)
        return {k: v for k, v in data.items() if k not in _RUNTIME_FIELDS}


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


def _log(out: Path, record: dict) -> None:
    with open(out / LOG_FILE, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def _save_checkpoint(out: Path, config: TrainConfig, model, optimizer, step: int) -> None:
    path = out / CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "identity": json.dumps(config.identity(), sort_keys=True)}, tmp)
    tmp.replace(path)


def _load_checkpoint(out: Path, config: TrainConfig, model, optimizer) -> int:
    """Restore a run; returns the step to continue from (0 without a checkpoint)."""
    path = out / CHECKPOINT
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = json.loads(state["identity"])
    step = int(state["step"])
    # --steps may change while both schedules are still before their decay: the run so far is then exactly
    # what the new schedule would have done (same warm-up, same constant lr, same batches).
    saved_steps = saved.pop("steps")
    ours = {k: v for k, v in config.identity().items() if k != "steps"}
    # Settings added after a checkpoint was written were then at their defaults of that time.
    defaults = {**TrainConfig(world="", out="").identity(), **_LEGACY_DEFAULTS}
    saved = {**{k: defaults[k] for k in ours if k not in saved}, **saved}
    if saved != ours:
        raise SgaError(f"{path} was written by a run with other settings; rerun with the same options, or "
                       "pass a new --out (or delete that directory) to start over")
    before_decay = min(saved_steps, config.steps) * config.decay_start
    if saved_steps != config.steps and step > before_decay:
        raise SgaError(f"{path}: --steps can only change before the learning-rate decay starts (step "
                       f"{int(before_decay)}); this run is at step {step}, rerun with --steps {saved_steps}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return step


def _init_weights(model, teacher_dir: str) -> None:
    """Start from a trained teacher's weights (a second stage with other loss or dropout settings); every
    tensor must have this run's shape."""
    try:
        model.load_state_dict(load_mdetr(teacher_dir).state_dict())
    except RuntimeError as exc:
        raise SgaError(f"--init {teacher_dir}: its weights do not fit this run's model; pass the sizes of "
                       f"the run that trained it ({str(exc).splitlines()[0]})") from exc


def _pretrained_backbone(model, config: TrainConfig, out: Path, preprocess: PreprocessConfig,
                         show_progress: bool) -> None:
    """Run the backbone pretraining stage (:mod:`teacher.backbone_pretrain`) into ``model``'s CNN, or reuse
    its result from an earlier, interrupted attempt of this run."""
    body = model.backbone[0].body
    path = out / BACKBONE_STATE
    # What the stage's result depends on; a cached result of other settings is recomputed, not reused.
    settings = config.identity()
    identity = json.dumps({k: settings[k] for k in ("backbone_pretrain_steps", "batch_size", "seed",
                                                    "backbone_widths", "short_side", "max_size")},
                          sort_keys=True)
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            cached = (f.metadata() or {}).get("identity")
        if cached == identity:
            body.load_state_dict(load_file(str(path)))
            return
    bar = progress(total=config.backbone_pretrain_steps, desc="pretrain backbone", unit="step",
                   **({} if show_progress else {"disable": True}))

    def on_step(step: int, losses: dict[str, float]) -> None:
        bar.update(1)
        if step % config.log_every == 0:
            _log(out, {"backbone_step": step, **{k: round(v, 4) for k, v in losses.items()}})

    accuracy = pretrain_backbone(body, BackbonePretrainConfig(steps=config.backbone_pretrain_steps,
                                                              batch_size=config.batch_size, seed=config.seed),
                                 preprocess, preprocess.size_multiple, on_step)
    bar.close()
    _log(out, {"backbone_step": config.backbone_pretrain_steps, "object_accuracy": accuracy})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in body.state_dict().items()}, str(tmp), {"identity": identity})
    tmp.replace(path)


def _optimizer(model, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; with ``backbone_lr_ratio != 1`` the CNN is its own group (``lr_scale`` = the ratio)."""
    if config.backbone_lr_ratio == 1.0:
        groups = [{"params": list(model.parameters()), "lr_scale": 1.0}]
    else:
        cnn = {id(p) for p in model.backbone.parameters()}
        groups = [{"params": [p for p in model.parameters() if id(p) not in cnn], "lr_scale": 1.0},
                  {"params": list(model.backbone.parameters()), "lr_scale": config.backbone_lr_ratio}]
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def _held_out_eval(model, tokenizer, preprocess, val_samples) -> dict:
    teacher = MDETRTeacher(model, tokenizer, preprocess, InferenceConfig(score_floor=0.0, top_k=5))
    result = evaluate_teacher(teacher, val_samples, show_progress=False)
    model.train()
    return result


def _tokenizer(config: TrainConfig, out: Path, captions: list, num_train: int, ranks: Ranks):
    """The run's tokenizer: the ``--init`` teacher's, one saved by an earlier attempt, or a new one trained on
    the training captions. Rank 0 writes it; the other ranks read what it wrote."""
    if ranks.is_main and not (out / TOKENIZER_DIR).is_dir():
        if config.init:
            shutil.copytree(Path(config.init) / TOKENIZER_DIR, out / TOKENIZER_DIR)
        else:
            tokenizer = train_tokenizer((c for _, c in captions[:num_train]), config.vocab_size)
            tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    barrier(ranks)
    return load_tokenizer(out / TOKENIZER_DIR)


def _check(config: TrainConfig, num_images: int, ranks: Ranks) -> int:
    """The number of training images, after refusing settings the run cannot work with."""
    if config.init and config.backbone_pretrain_steps:
        raise SgaError("--init starts from a trained teacher's weights, backbone included; drop "
                       "--backbone-pretrain-steps (or --init)")
    if config.long_captions not in ("truncate", "windows"):
        raise SgaError(f"--long-captions {config.long_captions!r}: choose truncate or windows")
    if not 0 <= config.backbone_frozen_stages <= len(config.backbone_widths):
        raise SgaError(f"--backbone-frozen-stages {config.backbone_frozen_stages}: the CNN has "
                       f"{len(config.backbone_widths)} stages")
    check_split(config.batch_size, ranks.world_size)
    num_train = num_images - config.val_samples
    if num_train < config.batch_size or config.val_samples < 1:
        raise SgaError(f"{config.world} has {num_images} images: too few for --val-samples "
                       f"{config.val_samples} and --batch-size {config.batch_size}; generate a bigger world")
    return num_train


def train(config: TrainConfig, show_progress: bool = True) -> dict:
    """Run (or resume) a training run in this process, alone or as one rank of a torchrun job; returns a
    summary with the final held-out evaluation (rank 0; the other ranks return ``{}``)."""
    ranks = init_ranks()
    try:
        return _train(config, ranks, show_progress and ranks.is_main)
    finally:
        shutdown(ranks)


def _train(config: TrainConfig, ranks: Ranks, show_progress: bool) -> dict:
    torch.set_num_threads(config.threads)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    preprocess = preprocess_config(config)
    captions = world_captions(config.world)
    num_train = _check(config, len(captions), ranks)
    tokenizer = _tokenizer(config, out, captions, num_train, ranks)

    torch.manual_seed(config.seed)
    model = build_mdetr(model_config(config, len(tokenizer), aux_loss=True))
    max_text_len = min(model.config.num_classes, model.config.text_encoder["max_position_embeddings"] - 2)
    examples, val_samples = [], []
    quiet = {} if show_progress else {"disable": True}
    for i, sample in enumerate(progress(iter_world(config.world), total=len(captions), desc="prepare",
                                        unit="img", **quiet)):
        if i < num_train:
            examples.extend(make_examples(sample, tokenizer, preprocess, max_text_len,
                                          windows=config.long_captions == "windows"))
        elif ranks.is_main:
            val_samples.append(sample)

    optimizer = _optimizer(model, config)
    criterion = SetCriterion(HungarianMatcher(), CriterionConfig(eos_coef=config.eos_coef,
                                                                 contrastive_align=config.contrastive_align,
                                                                 contrastive_align_weight=config.contrastive_weight),
                             num_aux=config.dec_layers - 1)
    step = _load_checkpoint(out, config, model, optimizer)
    if config.init and step == 0:   # a resumed run's checkpoint already holds the weights
        _init_weights(model, config.init)
    elif config.backbone_pretrain_steps > 0 and step == 0:
        # Rank 0 pretrains with every rank's threads while the others wait, then they read its result.
        if ranks.is_main:
            torch.set_num_threads(config.threads * ranks.world_size)
            _pretrained_backbone(model, config, out, preprocess, show_progress)
            torch.set_num_threads(config.threads)
        barrier(ranks)
        if not ranks.is_main:
            _pretrained_backbone(model, config, out, preprocess, show_progress=False)
    model.backbone[0].body.stages[: config.backbone_frozen_stages].requires_grad_(False)
    model.train()
    num_positions = model.config.num_classes + 1
    params = [p for p in model.parameters() if p.requires_grad]
    bar = progress(total=config.steps, initial=step, desc="train", unit="step", **quiet)
    running: dict[str, float] = {}
    tick = time.time()
    while step < config.steps:
        indices = share(batch_indices(config, step, len(examples)), ranks)
        batch = collate([examples[i] for i in indices.tolist()], preprocess, tokenizer.pad_token_id,
                        num_positions)
        lr = lr_at(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        torch.manual_seed(step_seed(config, step, ranks.rank))
        # Every box of the global batch weighs the same: the per-rank losses use the global count per rank.
        boxes = global_mean(torch.tensor([float(sum(len(t["boxes"]) for t in batch["targets"]))]), ranks)
        outputs = model(batch["images"], batch["image_mask"], batch["input_ids"], batch["attention_mask"])
        losses = criterion(outputs, batch["targets"], batch["attention_mask"].bool(),
                           num_boxes=max(boxes.item(), 1 / ranks.world_size))
        loss = criterion.weighted_total(losses)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(params, ranks)
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        step += 1
        bar.update(1)
        for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_contrastive_align"):
            if key in losses:
                running[key] = running.get(key, 0.0) + losses[key].item() / config.log_every
        running["loss"] = running.get("loss", 0.0) + loss.item() / config.log_every
        if step % config.log_every == 0:
            means = global_mean(torch.tensor(list(running.values()), dtype=torch.float64), ranks).tolist()
            running = dict(zip(running, means))
            now = time.time()
            if ranks.is_main:
                _log(out, {"step": step, "lr": lr, "images_per_s": round(config.log_every * config.batch_size
                                                                        / (now - tick), 1),
                           **{k: round(v, 4) for k, v in running.items()}})
            bar.set_postfix(loss=f"{running['loss']:.3f}")
            running, tick = {}, now
        if step % config.checkpoint_every == 0 or step == config.steps:
            check_in_step(model, ranks)
            if ranks.is_main:
                _save_checkpoint(out, config, model, optimizer, step)
        if ranks.is_main and (step % config.eval_every == 0 or step == config.steps):
            _log(out, {"step": step, "eval": _held_out_eval(model, tokenizer, preprocess, val_samples)})
            tick = time.time()
    bar.close()
    if not ranks.is_main:
        return {}

    final = _held_out_eval(model, tokenizer, preprocess, val_samples)
    model.config = model_config(config, len(tokenizer), aux_loss=False)
    save_mdetr(model, model.config, str(out), metadata={"trained_by": "sga teacher train", "steps": step})
    write_teacher_json(out, preprocess, {"train_config": config.identity(), "held_out": final,
                                         "parameters": sum(p.numel() for p in model.parameters())})
    summary = {"out": str(out), "steps": step, "train_images": num_train, "train_examples": len(examples),
               "val_images": len(val_samples), "nproc": ranks.world_size,
               **{f"val_{k}": v for k, v in final.items() if k.startswith(("recall", "nonvisible_no"))}}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, sort_keys=True))
    return summary


def _config_from_json(path: str) -> TrainConfig:
    data = json.loads(Path(path).read_text())
    return TrainConfig(**{**data, "backbone_widths": tuple(data["backbone_widths"])})


def main(argv: list[str] | None = None) -> int:
    return rank_main(argv, "sga teacher train", "train_config.json, written by `sga teacher train --nproc K`",
                     lambda path: train(_config_from_json(path)))


if __name__ == "__main__":
    sys.exit(main())
