"""Launching a pretraining run: its settings and the torchrun command, free of heavy imports.

``sga pretrain --nproc K`` writes the :class:`TrainConfig` to ``OUT/pretrain_config.json`` and starts
``python -m torch.distributed.run --nproc-per-node K -m student.train --config ...``; every rank reads the
config back. Nothing here imports torch, so the launcher costs no more than its argument parsing.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from shards import fs
from shards.errors import SgaError

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")

CONFIG_FILE = "pretrain_config.json"
SUMMARY_FILE = "summary.json"


@dataclass
class DataConfig:
    """What to stream and how. ``batch_size`` is the per-rank micro-batch."""

    regions: str
    labels: str                              # a label set dir, or a root holding exactly one label set
    batch_size: int = 32
    workers: int = 0                         # DataLoader worker processes per rank (0: in the main process)
    mode: str = "resampled"                  # "resampled" | "split"
    shuffle_buffer: int = 256
    seed: int = 0
    score_threshold: float | None = None     # override the label set's thresholds for M (recomputed)
    iou_threshold: float | None = None
    samples_per_epoch: int | None = None     # default: the labelled samples of the usable shards


@dataclass
class TrainConfig:
    """One pretraining run. ``model`` overrides fields of the ``preset`` :class:`StudentConfig`."""

    out: str
    data: DataConfig
    preset: str = "base"
    model: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None             # local tokenizer path; None: the shipped synthetic-world one
    steps: int | None = None                 # optimizer steps; None: ``epochs`` x steps per epoch
    epochs: float = 10.0
    global_batch: int = 512
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.1                      # share of the steps
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    resume: bool = False
    device: str = "auto"                     # "auto" | "cpu" | "cuda"
    precision: str = "auto"                  # "auto" (bf16 on CUDA, fp32 on CPU) | "bf16" | "fp32"
    threads: int | None = None               # torch threads per process; None: cores / local processes
    log_dir: str | None = None               # local directory; None: OUT/logs
    tensorboard: bool = True
    find_unused_parameters: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return cls(**{**data, "data": DataConfig(**data["data"])})


def under_torchrun() -> bool:
    """True inside a process started by torchrun (or any launcher that sets the same variables)."""
    return all(v in os.environ for v in TORCHRUN_VARS)


def cores_per_process(nproc: int) -> int:
    """CPU cores each of ``nproc`` processes sharing this machine may use (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, nproc))


def launch(cfg: TrainConfig, nproc: int, quiet: bool = False) -> dict[str, Any]:
    """Run ``cfg`` on ``nproc`` local ranks under torchrun; returns rank 0's ``OUT/summary.json``.

    Each rank gets ``cfg.threads`` (default: cores / nproc) OpenMP and torch threads. ``quiet`` turns the
    progress bar off (for ``--json``).
    """
    config_uri = fs.join(cfg.out, CONFIG_FILE)
    fs.write_json(config_uri, cfg.to_dict())
    threads = str(cfg.threads or cores_per_process(nproc))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "WDS_SECURE": "1"}
    if quiet:
        env["SGA_PROGRESS"] = "0"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "student.train", "--config", config_uri]
    # The ranks' stdout goes to our stderr: with --json, stdout must hold only the summary object.
    result = subprocess.run(cmd, env=env, stdout=sys.stderr)
    if result.returncode != 0:
        raise SgaError(f"pretraining failed (torchrun exit status {result.returncode}); see the rank logs "
                       f"above. Rerun with --resume to continue from the last checkpoint in {cfg.out}")
    return fs.read_json(fs.join(cfg.out, SUMMARY_FILE))
