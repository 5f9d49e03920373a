"""The experiment's stages, each skipped when its output for the same settings already exists.

``prepare`` (driver process): ``sga world`` -> ``sga label`` with the bundled teacher (its own Ray job,
resumable by shard markers) -> the random one-eighth subset -> the ground-truth label sets -> label
quality. Its record ``WORK/data-<hash>/prepare.json`` is written last.

``run_unit`` (a worker process, 1 torch thread): ``sga pretrain`` through :func:`student.train.train`
(resumes from its last checkpoint; skipped when ``summary.json`` exists), then every fine-tuning cell
of that student through :func:`student.finetune.finetune`, each written to ``WORK/cells/<id>.json`` as
soon as it finishes. A rerun therefore continues where the last one stopped.

Work layout (``WORK`` defaults to ``$SGA_CACHE/experiment/<name>``)::

    WORK/data-<hash>/world/            the synthetic world
    WORK/data-<hash>/labels/<id>/      pseudo labels (``sga label --out``)
    WORK/data-<hash>/labels-eighth/    the same labels for a random one-eighth of the samples
    WORK/data-<hash>/labels-gt/, labels-gt-eighth/   ground-truth M for the same samples
    WORK/pretrain/<run_id>/            one ``sga pretrain --out`` folder per student
    WORK/cells/<cell_id>.json          one fine-tuning result per cell
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from shards import fs

from .config import ExperimentConfig, fingerprint
from .labelsets import label_quality, labelled_keys, write_gt_labelset, write_subset
from .plan import EIGHTH, FULL, Cell, PretrainSpec, Unit

PREPARE_FILE = "prepare.json"
TIMING_FILE = "experiment_timing.json"


def data_dir(cfg: ExperimentConfig, work: str) -> str:
    return fs.join(work, f"data-{fingerprint(cfg.label_part())}")


def prepare(cfg: ExperimentConfig, work: str, show_progress: bool = True) -> dict[str, Any]:
    """World, label sets and label quality for ``cfg`` (reused when already made); returns the record."""
    root = data_dir(cfg, work)
    record_uri = fs.join(root, PREPARE_FILE)
    if fs.exists(record_uri):
        return fs.read_json(record_uri)
    from pipeline.job import run_label_job
    from pipeline.plan import LabelJobConfig
    from shards.synthetic.world import WorldConfig, build_world

    world = fs.join(root, "world")
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    if fs.exists(fs.join(world, "world.json")):
        world_summary = fs.read_json(fs.join(world, "world.json"))["counts"]
    else:
        world_cfg = WorldConfig(samples=cfg.world_samples, seed=cfg.world_seed, task_samples=cfg.task_samples,
                                samples_per_shard=cfg.samples_per_shard)
        fs.remove(world)  # an interrupted build (no world.json) is rebuilt from scratch
        world_summary = build_world(world_cfg, world, show_progress=show_progress)
    timings["world_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    # The job places one teacher actor and one shard actor of one CPU each: two logical CPUs at least.
    label = run_label_job(LabelJobConfig(
        images=fs.join(world, "images"), regions=fs.join(world, "regions"), out=fs.join(root, "labels"),
        teacher=cfg.teacher, gt=fs.join(world, "gt"), score_threshold=cfg.score_threshold,
        iou_threshold=cfg.iou_threshold, num_cpus=max(2, cfg.jobs), show_progress=show_progress))
    timings["label_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    pseudo = label["labels"]
    keys = labelled_keys(pseudo)
    # One random one-eighth of the labelled samples, the same for every student and label kind.
    count = max(1, round(cfg.small_fraction * len(keys)))
    order = np.random.default_rng([cfg.world_seed, 8]).permutation(len(keys))
    eighth_keys = sorted(keys[i] for i in order[:count])
    sets = {"pseudo": {FULL: pseudo,
                       EIGHTH: write_subset(pseudo, fs.join(root, "labels-eighth"), eighth_keys)}}
    if cfg.gt_run:
        gt_full = write_gt_labelset(world, pseudo, fs.join(root, "labels-gt"), cfg.world_seed)
        sets["gt"] = {FULL: gt_full,
                      EIGHTH: write_subset(gt_full, fs.join(root, "labels-gt-eighth"), eighth_keys)}
    quality = {"pseudo": label_quality(pseudo, world, cfg.quality_thresholds)}
    if cfg.gt_run:
        quality["gt"] = label_quality(gt_full, world, [1.0])
    timings["derive_s"] = time.perf_counter() - tick
    record = {"world": world, "world_summary": world_summary, "label_summary": label, "labelsets": sets,
              "samples": {FULL: len(keys), EIGHTH: len(eighth_keys)}, "quality": quality,
              "timings": timings, "cpus": max(2, cfg.jobs)}
    fs.write_json(record_uri, record)
    return record


# ------------------------------------------------------------------------------------- worker side
def _quiet_logging() -> None:
    # Training logs INFO per step; the experiment's own progress is enough on a shared terminal.
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def pretrain(spec: PretrainSpec, cfg: ExperimentConfig, record: dict[str, Any], work: str) -> str | None:
    """The student's run folder, pretraining it first unless done; None for the no-pretraining variant."""
    if spec.labels is None:
        return None
    from student.launch import DataConfig, TrainConfig
    from student.train import train

    out = fs.join(work, "pretrain", spec.run_id(cfg))
    if fs.exists(fs.join(out, "summary.json")):
        return out
    recipe = cfg.pretrain
    data = DataConfig(regions=fs.join(record["world"], "regions"),
                      labels=record["labelsets"][spec.labels][spec.data], batch_size=recipe.batch_size,
                      workers=0, seed=spec.seed)
    train_cfg = TrainConfig(out=out, data=data, preset="tiny", model=spec.model(cfg), epochs=recipe.epochs,
                            global_batch=recipe.batch_size, lr=recipe.lr, warmup=recipe.warmup,
                            checkpoint_every=200, keep_checkpoints=1, resume=True, device="cpu",
                            precision="fp32", threads=1, tensorboard=False)
    wall, cpu = time.perf_counter(), time.process_time()
    summary = train(train_cfg)
    fs.write_json(fs.join(out, TIMING_FILE), {"wall_s": time.perf_counter() - wall,
                                              "cpu_s": time.process_time() - cpu, "steps": summary["steps"],
                                              "resumed_from": summary["resumed_from"]})
    return out


def finetune_cell(cell: Cell, checkpoint: str | None, cfg: ExperimentConfig, record: dict[str, Any],
                  regions) -> dict[str, Any]:
    """Fine-tune and evaluate one cell; returns its result row (also the JSON stored for it)."""
    from student.finetune import FinetuneConfig, finetune

    ft = cfg.finetune
    world = record["world"]
    summary = finetune(FinetuneConfig(
        task=cell.task, task_dir=fs.join(world, "tasks"), regions=fs.join(world, "tasks", "regions"),
        checkpoint=checkpoint, fraction=cell.fraction, seed=cell.spec.seed, lr=ft.lr[cell.task],
        batch_size=ft.batch_size[cell.task], epochs=ft.epochs[cell.task], preset="tiny",
        model=cell.spec.model(cfg), threads=1, show_progress=False), regions)
    spec = cell.spec
    metric = summary["metric"]
    return {"cell_id": cell.cell_id(cfg), "run_id": spec.run_id(cfg), "variant": spec.variant,
            "encoder": spec.encoder, "data": spec.data, "labels": spec.labels, "seed": spec.seed,
            "task": cell.task, "fraction": cell.fraction, "metric": metric,
            "val": summary["val"][metric], "test": summary["test"][metric], "n_test": summary["test"]["n"],
            "train_items": summary["train_items"], "steps": summary["steps"],
            "wall_s": summary["wall_s"], "cpu_s": summary["cpu_s"]}


def run_unit(unit: Unit, cfg: ExperimentConfig, record: dict[str, Any], work: str) -> list[str]:
    """Pretrain the unit's student and run its missing cells (worker entry point); returns cell ids run."""
    import torch

    from student.finetune.data import RegionStore

    torch.set_num_threads(1)
    _quiet_logging()
    todo = [c for c in unit.cells if not fs.exists(cell_path(work, c.cell_id(cfg)))]
    if not todo:
        return []
    checkpoint = pretrain(unit.spec, cfg, record, work)
    regions = RegionStore(fs.join(record["world"], "tasks", "regions"))
    done = []
    for cell in todo:
        result = finetune_cell(cell, checkpoint, cfg, record, regions)
        fs.write_json(cell_path(work, cell.cell_id(cfg)), result)
        done.append(cell.cell_id(cfg))
    return done


def cell_path(work: str, cell_id: str) -> str:
    return fs.join(work, "cells", f"{cell_id}.json")


def pretrain_timing(work: str, spec: PretrainSpec, cfg: ExperimentConfig) -> dict[str, Any] | None:
    uri = fs.join(work, "pretrain", spec.run_id(cfg), TIMING_FILE)
    return fs.read_json(uri) if fs.exists(uri) else None


def worker_env() -> None:
    """One OpenMP thread per worker process (set before the workers import torch)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
