"""``sga teacher train``: train a small MDETR on a synthetic world's ground truth, on CPU, resumably.

Stages: split the world (the last ``val_samples`` images are held out) -> train a byte-level BPE tokenizer on
the training captions -> prepare examples (:mod:`teacher.traindata`) -> build the model (the ``tiny`` MDETR
entry with this config's sizes) -> optionally pretrain its CNN on rendered scenes
(:mod:`teacher.backbone_pretrain`, what ImageNet pretraining is to MDETR's ResNet) -> AdamW with warm-up, a
long constant phase and a cosine decay, MDETR's losses on every decoder layer -> periodic held-out recall ->
the teacher directory.

Output directory: the teacher (``model.safetensors``, ``config.json``, ``tokenizer/``, ``teacher.json``, the
last written) plus ``train_log.jsonl``, ``train_state/backbone.safetensors`` (the pretrained CNN) and
``train_state/checkpoint.pt`` (model, optimizer, step).
Rerunning the same command resumes from the checkpoint; the run is deterministic given the seed, the process
count and the thread count (batches depend only on the seed and the step, dropout on the seed, the step and
the rank). ``nproc > 1`` trains data-parallel on that many ranks under torchrun (:mod:`teacher.parallel`).
Entry point of a rank: ``python -m teacher.train --config OUT/train_config.json``.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

from shards.cliutil import rank_main
from shards.errors import SgaError
from shards.progress import progress

from .criterion import CriterionConfig, SetCriterion
from .evaluate import evaluate_teacher
from .grounding import LONG_CAPTIONS, TOKENIZER_DIR, InferenceConfig, MDETRTeacher, write_teacher_json
from .matcher import HungarianMatcher
from .mdetr import build_mdetr
from .mdetr.checkpoint import save_mdetr
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
from .train_config import (
    TrainConfig,
    batch_indices,
    config_from_json,
    lr_at,
    model_config,
    preprocess_config,
    step_seed,
)
from .train_state import init_weights, load_checkpoint, log, pretrained_backbone, save_checkpoint
from .traindata import collate, make_examples
from .worlddata import iter_world, world_captions


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
    if config.long_captions not in LONG_CAPTIONS:
        raise SgaError(f"--long-captions {config.long_captions!r}: choose truncate or clauses")
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


def _examples(config: TrainConfig, tokenizer, preprocess: PreprocessConfig, max_text_len: int, num_train: int,
              total: int, ranks: Ranks, show_progress: bool) -> tuple[list, list]:
    """``(training examples, held-out samples)``: every rank prepares the whole training split (batches index
    it globally); only rank 0, which evaluates, keeps the held-out images."""
    examples, val_samples = [], []
    windows = config.long_captions == "clauses"
    for i, sample in enumerate(progress(iter_world(config.world), total=total, desc="prepare", unit="img",
                                        **({} if show_progress else {"disable": True}))):
        if i < num_train:
            examples.extend(make_examples(sample, tokenizer, preprocess, max_text_len, windows=windows))
        elif ranks.is_main:
            val_samples.append(sample)
    return examples, val_samples


def _start(config: TrainConfig, out: Path, model, optimizer, preprocess: PreprocessConfig, ranks: Ranks,
           show_progress: bool) -> int:
    """Resume, or start from ``--init`` weights or the pretrained CNN; freeze the first CNN stages. Returns
    the step to continue from."""
    step = load_checkpoint(out, config, model, optimizer)
    if config.init and step == 0:   # a resumed run's checkpoint already holds the weights
        init_weights(model, config.init)
    elif config.backbone_pretrain_steps > 0 and step == 0:
        # Rank 0 pretrains with every rank's threads while the others wait, then they read its result.
        if ranks.is_main:
            torch.set_num_threads(config.threads * ranks.world_size)
            pretrained_backbone(model, config, out, preprocess, show_progress)
            torch.set_num_threads(config.threads)
        barrier(ranks)
        if not ranks.is_main:
            pretrained_backbone(model, config, out, preprocess, show_progress=False)
    model.backbone[0].body.stages[: config.backbone_frozen_stages].requires_grad_(False)
    model.train()
    return step


def _step(config: TrainConfig, step: int, model, criterion, optimizer, params: list, batch: dict,
          ranks: Ranks) -> tuple[dict, torch.Tensor]:
    """One optimizer step on this rank's share of the batch; returns ``(loss terms, weighted total)``."""
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
    return losses, loss


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
    examples, val_samples = _examples(config, tokenizer, preprocess, max_text_len, num_train, len(captions),
                                      ranks, show_progress)
    optimizer = _optimizer(model, config)
    criterion = SetCriterion(HungarianMatcher(), CriterionConfig(eos_coef=config.eos_coef,
                                                                 contrastive_align=config.contrastive_align,
                                                                 contrastive_align_weight=config.contrastive_weight),
                             num_aux=config.dec_layers - 1)
    step = _start(config, out, model, optimizer, preprocess, ranks, show_progress)
    num_positions = model.config.num_classes + 1
    params = [p for p in model.parameters() if p.requires_grad]
    bar = progress(total=config.steps, initial=step, desc="train", unit="step",
                   **({} if show_progress else {"disable": True}))
    running: dict[str, float] = {}
    tick = time.time()
    while step < config.steps:
        indices = share(batch_indices(config, step, len(examples)), ranks)
        batch = collate([examples[i] for i in indices.tolist()], preprocess, tokenizer.pad_token_id,
                        num_positions)
        losses, loss = _step(config, step, model, criterion, optimizer, params, batch, ranks)
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
                log(out, {"step": step, "lr": lr_at(config, step - 1),
                           "images_per_s": round(config.log_every * config.batch_size / (now - tick), 1),
                           **{k: round(v, 4) for k, v in running.items()}})
            bar.set_postfix(loss=f"{running['loss']:.3f}")
            running, tick = {}, now
        if step % config.checkpoint_every == 0 or step == config.steps:
            check_in_step(model, ranks)
            if ranks.is_main:
                save_checkpoint(out, config, model, optimizer, step)
        if ranks.is_main and (step % config.eval_every == 0 or step == config.steps):
            log(out, {"step": step, "eval": _held_out_eval(model, tokenizer, preprocess, val_samples)})
            tick = time.time()
    bar.close()
    if not ranks.is_main:
        return {}
    return _finish(config, out, model, tokenizer, preprocess, val_samples, step,
                   {"train_images": num_train, "train_examples": len(examples), "nproc": ranks.world_size})


def _finish(config: TrainConfig, out: Path, model, tokenizer, preprocess: PreprocessConfig, val_samples: list,
            step: int, counts: dict) -> dict:
    """Write the teacher directory (rank 0) and ``train_summary.json``; returns the summary."""
    final = _held_out_eval(model, tokenizer, preprocess, val_samples)
    model.config = model_config(config, len(tokenizer), aux_loss=False)
    save_mdetr(model, model.config, str(out), metadata={"trained_by": "sga teacher train", "steps": step})
    write_teacher_json(out, preprocess, {"train_config": config.identity(), "held_out": final,
                                         "parameters": sum(p.numel() for p in model.parameters())})
    summary = {"out": str(out), "steps": step, "val_images": len(val_samples), **counts,
               **{f"val_{k}": v for k, v in final.items() if k.startswith(("recall", "nonvisible_no"))}}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, sort_keys=True))
    return summary


def main(argv: list[str] | None = None) -> int:
    return rank_main(argv, "sga teacher train", "train_config.json, written by `sga teacher train --nproc K`",
                     lambda path: train(config_from_json(path)))


if __name__ == "__main__":
    sys.exit(main())
