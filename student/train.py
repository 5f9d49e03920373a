"""Student pretraining: wire data, model, criterion, optimizer and checkpoints, then run a thin loop.

Run alone (one process) or under torchrun (one process per rank; ``student.cli`` launches it). The global
batch (paper: 512) is ``batch_size x world_size x accum``; the learning rate warms up linearly over the
first ``warmup`` share of the steps, then decays linearly to zero (paper: AdamW, lr 1e-4, 10 epochs).

Exact resume: the data order and every random draw are functions of (seed, step). The loader replays its
stream to the step (``student.data``), and dropout is reseeded from (seed, rank, step, micro-batch) before
every forward pass, so a run resumed from a checkpoint retraces the uninterrupted run bit for bit on CPU.

Entry point for torchrun: ``python -m student.train --config OUT/pretrain_config.json``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from shards import fs
from shards.cliutil import rank_main
from shards.errors import SgaError
from shards.regions import read_regions_info

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_weights, weights_digest
from .config import StudentConfig
from .data import STAT_KEYS, StudentLoader, derive_seed, epoch_geometry, plan_shards
from .distributed import (
    DistInfo,
    all_gather_bytes,
    all_reduce_sum,
    barrier,
    init_distributed,
    shutdown,
)
from .launch import CONFIG_FILE, SUMMARY_FILE, TrainConfig, cores_per_process
from .logs import TrainLog

log = logging.getLogger(__name__)
PRESETS = {"tiny": StudentConfig.tiny, "base": StudentConfig.base}
# Settings that fix the data order and model: a resumed run must match the checkpoint's.
RESUME_KEYS = ("seed", "world_size", "workers", "batch_size", "accum", "mode", "shuffle_buffer", "shards",
               "num_samples", "student")


def accumulation(cfg: TrainConfig, world: int) -> int:
    """Micro-batches per optimizer step so that ``batch_size x world x accum == global_batch``."""
    per_pass = cfg.data.batch_size * world
    if cfg.global_batch % per_pass:
        raise SgaError(f"global batch {cfg.global_batch} is not a multiple of batch size "
                       f"{cfg.data.batch_size} x {world} processes; change --global-batch or --batch-size")
    return cfg.global_batch // per_pass


def linear_schedule(warmup_steps: int, total_steps: int):
    """LR multiplier for step s: linear warm-up from 0 to 1, then linear decay to 0 at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; biases and LayerNorm weights (1-d parameters) get no weight decay (BERT's recipe)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def build_student_config(cfg: TrainConfig, vocab_size: int) -> StudentConfig:
    """The preset with the region set's feature/class sizes, the tokenizer's vocabulary and overrides."""
    if cfg.preset not in PRESETS:
        raise SgaError(f"unknown model preset {cfg.preset!r}; use one of {', '.join(PRESETS)}")
    info = read_regions_info(cfg.data.regions)
    fields = {"feature_dim": int(info["feature_dim"]), "vocab_size": vocab_size}
    if int(info.get("num_classes") or 0) > 0:
        fields["num_classes"] = int(info["num_classes"])
    else:
        # Regions without class distributions (e.g. imported TSV features) cannot train MRC.
        losses = cfg.model.get("losses", StudentConfig.losses)
        fields["losses"] = tuple(name for name in losses if name != "mrc")
        log.warning("%s has no class probabilities: the mrc loss is off", cfg.data.regions)
    return PRESETS[cfg.preset](**{**fields, **cfg.model})


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _check_resume(saved: dict[str, Any], current: dict[str, Any], path: str) -> None:
    diffs = [k for k in RESUME_KEYS if saved.get(k) != current.get(k)]
    if diffs:
        raise SgaError(f"cannot resume from {path}: {', '.join(diffs)} differ from the checkpoint's run, "
                       "so the data order would change; rerun with the original settings or a new --out")


@contextlib.contextmanager
def _refuse_pickle():
    """While training, every webdataset decoder refuses pickle and ``torch.load`` (``WDS_SECURE=1``).

    The student's own decoding never unpickles; this guards any decoder added later, in this process and
    the loader workers it forks. The setting is process-wide (webdataset then also refuses local paths in
    its ``gopen``), so it is restored afterwards for callers that train in-process.
    """
    import webdataset

    saved = os.environ.get("WDS_SECURE"), webdataset.utils.enforce_security
    os.environ["WDS_SECURE"] = "1"
    webdataset.utils.enforce_security = True
    try:
        yield
    finally:
        if saved[0] is None:
            os.environ.pop("WDS_SECURE", None)
        else:
            os.environ["WDS_SECURE"] = saved[0]
        webdataset.utils.enforce_security = saved[1]


def _setup_logging(rank: int) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run pretraining in this process (one rank); returns rank 0's summary (other ranks: ``{"rank": r}``)."""
    info = init_distributed(cfg.device)
    _setup_logging(info.rank)
    try:
        with _refuse_pickle():
            return _train(cfg, info)
    finally:
        shutdown()


def _train(cfg: TrainConfig, info: DistInfo) -> dict[str, Any]:
    run = _setup(cfg, info)
    logger = TrainLog(run.log_dir, info.is_main, run.total_steps, run.start_step, cfg.tensorboard)
    try:
        progress = _loop(run, cfg, info, logger)
    finally:
        logger.close()
    return _finish(run, cfg, info, progress)


@dataclass
class _Run:
    """Everything :func:`_setup` builds for the loop."""

    model: torch.nn.Module
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: StudentLoader
    student: StudentConfig
    meta: dict[str, Any]
    accum: int
    total_steps: int
    start_step: int
    resumed_from: str | None
    log_dir: str
    bf16: bool


def _setup(cfg: TrainConfig, info: DistInfo) -> _Run:
    from .collate import Collator
    from .criterion import build_criterion
    from .model import build_model
    from .tokenizer import load_tokenizer

    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(cfg.threads or cores_per_process(local_procs))
    accum = accumulation(cfg, info.world_size)
    plan = plan_shards(cfg.data)
    _, steps_per_epoch = epoch_geometry(plan.num_samples, cfg.data.batch_size, info.world_size,
                                        cfg.data.workers, accum)
    total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    tokenizer = load_tokenizer(cfg.tokenizer)
    student = build_student_config(cfg, len(tokenizer))
    torch.manual_seed(cfg.data.seed)  # the same initial weights on every rank
    model = build_model(student).to(info.device)
    optimizer = build_optimizer(model, cfg)
    warmup_steps = max(1, round(cfg.warmup * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup_steps, total_steps))
    meta = {"seed": cfg.data.seed, "world_size": info.world_size, "workers": cfg.data.workers,
            "batch_size": cfg.data.batch_size, "accum": accum, "mode": cfg.data.mode,
            "shuffle_buffer": cfg.data.shuffle_buffer, "shards": plan.shards, "num_samples": plan.num_samples,
            "student": student.to_dict(), "total_steps": total_steps, "labelset": plan.labelset}

    start_step, resumed_from = 0, None
    existing = latest_checkpoint(cfg.out)
    if cfg.resume and existing is not None:
        state = load_checkpoint(existing, model, optimizer, scheduler)
        _check_resume(state["meta"], meta, existing)
        start_step, resumed_from = int(state["step"]), existing
        log.info("resumed from %s at step %d", existing, start_step)
    elif existing is not None:
        raise SgaError(f"{cfg.out} already holds checkpoints ({existing}); pass --resume to continue, or "
                       "choose a new --out")
    if info.is_main:
        fs.write_json(fs.join(cfg.out, CONFIG_FILE), cfg.to_dict())
    if info.distributed:
        model = DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters)
    loader = StudentLoader(plan, cfg.data, Collator(tokenizer, student), info.rank, info.world_size, accum,
                           start_step, pin_memory=info.device.type == "cuda")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and info.device.type == "cuda")
    return _Run(model, build_criterion(student), optimizer, scheduler, loader, student, meta, accum,
                total_steps, start_step, resumed_from, cfg.log_dir or _default_log_dir(cfg.out), bf16)


def _loop(run: _Run, cfg: TrainConfig, info: DistInfo, logger: TrainLog) -> dict[str, Any]:
    """Train from ``run.start_step`` to ``run.total_steps``; returns the first/last logged values, the
    data counters summed over ranks and the number of epochs touched."""
    model, loader, accum = run.model, run.loader, run.accum
    step, epoch, micro = run.start_step, loader.start.epoch, 0
    terms: list[str] | None = None
    sums, samples, first, last = 0, 0, None, None
    data_stats = torch.zeros(len(STAT_KEYS), dtype=torch.float64)
    tick = time.perf_counter()
    model.train()
    while step < run.total_steps:
        loader.set_epoch(epoch)
        epoch_stats: dict[int, dict[str, int]] = {}
        for batch, stats in loader:
            epoch_stats[stats.pop("worker")] = stats
            batch = _to_device(batch, info.device)
            # Dropout draws depend only on (seed, rank, step, micro-batch): resuming reproduces them.
            torch.manual_seed(derive_seed(cfg.data.seed, "dropout", info.rank, step, micro))
            sync = micro == accum - 1
            no_sync = model.no_sync() if info.distributed and not sync else contextlib.nullcontext()
            with no_sync:
                with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=run.bf16):
                    outputs = model(batch)
                losses = run.criterion(outputs, batch)
                (losses["loss"] / accum).backward()
            terms = terms or sorted(k for k, v in losses.items() if torch.is_tensor(v) and v.numel() == 1)
            sums = sums + torch.stack([losses[k].detach().float() for k in terms])
            samples += int(batch["input_ids"].shape[0])
            micro += 1
            if not sync:
                continue
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            step, micro = step + 1, 0
            # One collective for the logged means and the sample count: each costs a round trip.
            count = torch.tensor([float(samples)], device=info.device)
            reduced = all_reduce_sum(torch.cat([sums / accum, count]), info).tolist()
            mean, seen = [v / info.world_size for v in reduced[:-1]], reduced[-1]
            now = time.perf_counter()
            last = {"epoch": epoch, "lr": run.scheduler.get_last_lr()[0],
                    "samples_per_s": seen / max(now - tick, 1e-9), **dict(zip(terms, mean))}
            first = first or last
            logger.log(step, last)
            sums, samples, tick = 0, 0, now
            if step % cfg.checkpoint_every == 0 or step == run.total_steps:
                if info.is_main:
                    save_checkpoint(cfg.out, step, model, run.optimizer, run.scheduler, run.meta,
                                    cfg.keep_checkpoints)
                barrier(info)
            if step >= run.total_steps:
                break
        for stats in epoch_stats.values():
            data_stats += torch.tensor([stats[k] for k in STAT_KEYS], dtype=torch.float64)
        epoch += 1
    totals = all_reduce_sum(data_stats.to(info.device), info).tolist()
    return {"steps": step, "epochs": epoch - loader.start.epoch, "first": first, "last": last,
            "data": dict(zip(STAT_KEYS, map(int, totals)))}


def _finish(run: _Run, cfg: TrainConfig, info: DistInfo, progress: dict[str, Any]) -> dict[str, Any]:
    """Export the final weights, check the ranks agree on them and write ``OUT/summary.json``."""
    digests = [d.hex()[:16] for d in all_gather_bytes(weights_digest(run.model), info)]
    if len(set(digests)) > 1:
        log.error("ranks hold different weights after training: %s", digests)
    if not info.is_main:
        return {"rank": info.rank}
    weights = fs.join(cfg.out, "model.safetensors")
    save_weights(weights, run.model, {"step": str(progress["steps"])})
    fs.write_bytes(fs.join(cfg.out, "student_config.json"), run.student.to_json().encode())
    plan = run.loader.plan
    summary = {"out": cfg.out, **progress, "start_step": run.start_step, "resumed_from": run.resumed_from,
               "total_steps": run.total_steps, "steps_per_epoch": run.loader.steps_per_epoch,
               "world_size": info.world_size, "accum": run.accum, "global_batch": cfg.global_batch,
               "shards": len(plan.shards), "left_out_shards": plan.left_out, "log_dir": run.log_dir,
               "param_digests": digests, "checkpoint": latest_checkpoint(cfg.out), "weights": weights,
               "wds_secure": os.environ.get("WDS_SECURE") == "1"}
    fs.write_json(fs.join(cfg.out, SUMMARY_FILE), summary)
    return summary


def _default_log_dir(out: str) -> str:
    """``OUT/logs`` for a local OUT; logs are local files, so a remote OUT logs under ``./sga_logs``."""
    if "://" in out:
        return os.path.join("sga_logs", fs.basename(out))
    return os.path.join(out, "logs")


def main(argv: list[str] | None = None) -> int:
    return rank_main(argv, "sga pretrain", f"a {CONFIG_FILE} written by `sga pretrain`",
                     lambda path: train(TrainConfig.from_dict(fs.read_json(path))))


if __name__ == "__main__":
    sys.exit(main())
