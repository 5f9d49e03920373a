"""Fine-tune a pretrained student on one task and evaluate it: a thin loop over the task interface.

Recipe: AdamW (no weight decay on biases and LayerNorms), linear warm-up over ``warmup`` of the steps
then linear decay to zero, the task's paper defaults for lr, batch size and epochs unless overridden.
The encoder and the new head train together. ``fraction`` keeps a random share of the training items
(drawn with ``seed``) for the data-efficiency study; the rest of the run is unchanged, so a smaller share
also means fewer steps, as with a smaller dataset.

Deterministic given ``seed``: head initialisation, the subset and the batch order all derive from it, and
the input encoding has no randomness. Models are evaluated once, after the last epoch, on every split of
``eval_splits`` (no model selection on test).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from shards import fs
from shards.errors import SgaError
from shards.progress import progress

from ..checkpoint import save_weights
from ..tokenizer import load_tokenizer
from ..train import linear_schedule
from .base import Task, build_task
from .data import InputEncoder, RegionStore
from .model import FinetuneModel, load_encoder

SUMMARY_FILE = "finetune_summary.json"


@dataclass
class FinetuneConfig:
    """One fine-tuning run. ``None`` optimisation fields take the task's defaults (:class:`TaskDefaults`)."""

    task: str                                    # refexp | vqa | vcr_qa | vcr_qar
    task_dir: str                                # folder with refexp/, vqa/, vcr/ (WORLD/tasks)
    regions: str                                 # region shards of the task images (WORLD/tasks/regions)
    checkpoint: str | None = None                # pretrained run / step checkpoint; None: random weights
    out: str | None = None                       # where to write the summary and weights (optional)
    fraction: float = 1.0                        # share of the training items used
    seed: int = 0
    lr: float | None = None
    batch_size: int | None = None
    epochs: int | None = None
    max_text_len: int | None = None
    warmup: float = 0.1
    weight_decay: float = 0.01
    eval_splits: tuple[str, ...] = ("val", "test")
    eval_batch_size: int = 256
    preset: str = "tiny"                         # model size without a checkpoint
    model: dict[str, Any] = field(default_factory=dict)   # StudentConfig overrides without a checkpoint
    tokenizer: str | None = None                 # local tokenizer dir; None: the shipped one
    threads: int | None = 1                      # torch threads (None: leave torch's setting)
    show_progress: bool = True

    def resolved(self, task: Task) -> dict[str, Any]:
        d = task.defaults
        return {"lr": self.lr if self.lr is not None else d.lr,
                "batch_size": self.batch_size or d.batch_size,
                "epochs": self.epochs if self.epochs is not None else d.epochs,
                "max_text_len": self.max_text_len or d.max_text_len}


def subset(items: list[Any], fraction: float, seed: int) -> list[Any]:
    """A random ``fraction`` of ``items`` (at least one), in their original order."""
    if not 0.0 < fraction <= 1.0:
        raise SgaError(f"--fraction must lie in (0, 1], got {fraction}")
    if fraction == 1.0:
        return list(items)
    keep = max(1, round(fraction * len(items)))
    chosen = np.sort(np.random.default_rng([seed, 7]).permutation(len(items))[:keep])
    return [items[i] for i in chosen]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


@torch.no_grad()
def evaluate(model: FinetuneModel, task: Task, items: list[Any], encode: InputEncoder,
             batch_size: int) -> dict[str, float]:
    """``{task.metric: mean score, "n": items}`` over ``items``."""
    model.eval()
    scores = []
    for start in range(0, len(items), batch_size):
        batch = task.batch(items[start:start + batch_size], encode)
        scores.append(task.scores(model(batch), batch))
    total = torch.cat(scores) if scores else torch.zeros(0)
    return {task.metric: float(total.mean()) if len(total) else float("nan"), "n": len(items)}


def train_epochs(model: FinetuneModel, task: Task, items: list[Any], encode: InputEncoder,
                 opt: dict[str, Any], cfg: FinetuneConfig) -> dict[str, Any]:
    """Run the optimisation; returns steps and the mean training loss of the first and last epoch."""
    batch_size = opt["batch_size"]
    steps_per_epoch = math.ceil(len(items) / batch_size)
    total = max(1, opt["epochs"] * steps_per_epoch)
    optimizer = build_optimizer(model, opt["lr"], cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_schedule(max(1, round(cfg.warmup * total)), total))
    generator = torch.Generator().manual_seed(cfg.seed)
    epoch_losses = []
    bar = progress(total=total, desc=f"finetune {task.name}", unit="step",
                   **({} if cfg.show_progress else {"disable": True}))
    model.train()
    for _ in range(opt["epochs"]):
        order = torch.randperm(len(items), generator=generator).tolist()
        losses = []
        for start in range(0, len(order), batch_size):
            batch = task.batch([items[i] for i in order[start:start + batch_size]], encode)
            loss = task.loss(model(batch), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.update()
        epoch_losses.append(float(np.mean(losses)))
    bar.close()
    return {"steps": total if opt["epochs"] else 0, "steps_per_epoch": steps_per_epoch,
            "loss_first_epoch": epoch_losses[0] if epoch_losses else None,
            "loss_last_epoch": epoch_losses[-1] if epoch_losses else None}


def finetune(cfg: FinetuneConfig, regions: RegionStore | None = None) -> dict[str, Any]:
    """Fine-tune ``cfg.checkpoint`` on ``cfg.task`` and evaluate; returns (and with ``out`` writes) a summary.

    ``regions`` may pass an already loaded :class:`RegionStore` of ``cfg.regions`` (saves re-reading it
    when one process runs many fine-tunings).
    """
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    regions = regions if regions is not None else RegionStore(cfg.regions)
    task = build_task(cfg.task, cfg.task_dir, regions)
    opt = cfg.resolved(task)
    train_all = task.load("train")
    train = subset(train_all, cfg.fraction, cfg.seed)
    if not train:
        raise SgaError(f"no usable training items for {cfg.task} under {cfg.task_dir} (dropped: "
                       f"{task.dropped}); check that --regions holds the task images")
    evals = {split: task.load(split) for split in cfg.eval_splits}
    tokenizer = load_tokenizer(cfg.tokenizer)
    torch.manual_seed(cfg.seed)
    student, encoder = load_encoder(cfg.checkpoint, regions.info, len(tokenizer), cfg.preset, cfg.model)
    model = FinetuneModel(encoder, task.build_head(encoder, train))
    encode = InputEncoder(tokenizer, student, opt["max_text_len"])
    progress_info = train_epochs(model, task, train, encode, opt, cfg)
    results = {split: evaluate(model, task, items, encode, cfg.eval_batch_size)
               for split, items in evals.items()}
    summary = {"task": task.name, "metric": task.metric, "checkpoint": cfg.checkpoint,
               "encoder": student.encoder, "fraction": cfg.fraction, "seed": cfg.seed,
               "train_items": len(train), "train_items_available": len(train_all), **opt, **progress_info,
               **{split: res for split, res in results.items()}, "dropped": task.dropped,
               "region_errors": dict(regions.errors),
               "wall_s": round(time.perf_counter() - start_wall, 3),
               "cpu_s": round(time.process_time() - start_cpu, 3)}
    if hasattr(task, "oracle"):
        summary["oracle"] = {split: task.oracle(items) for split, items in evals.items()}
    if cfg.out:
        save_weights(fs.join(cfg.out, "model.safetensors"), model, {"task": task.name})
        fs.write_json(fs.join(cfg.out, SUMMARY_FILE), {**summary, "config": asdict(cfg)})
    return summary
