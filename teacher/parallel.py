"""Data-parallel ``sga teacher train`` on CPU cores: ranks under torchrun, gradient averaging, the launcher.

A training step of the tiny teacher is many small operations, which two threads of one process share badly
(a 32-image step: 1.12 s on one thread, 0.80 s on two). Two processes of one thread each, each computing
half of the batch, use the cores better. Every rank holds the whole model and computes a contiguous share
of each step's global batch; gradients are averaged over the ranks (gloo) before clipping, and the loss
normaliser is the global box count, so every rank takes the same optimizer step. The run differs from a
one-process run in the order of floating-point sums and in batch norm, whose statistics each rank takes over
its own share (CPU has no SyncBatchNorm); rank 0's running statistics are the ones saved.

No ``DistributedDataParallel`` wrapper: one flat all-reduce per step costs little next to a step on CPU, the
held-out evaluation and the checkpoints use the plain module, and parameters a loss setting leaves without a
gradient need no ``find_unused_parameters``.

``sga teacher train --nproc K`` writes ``OUT/train_config.json`` and starts
``python -m torch.distributed.run --standalone --nproc-per-node K -m teacher.train --config ...``; rank 0
writes ``OUT/train_summary.json``, which the launcher prints.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from shards.errors import SgaError

CONFIG_FILE = "train_config.json"
SUMMARY_FILE = "train_summary.json"
# Rank 0 alone pretrains the CNN and evaluates while the others wait in a collective; gloo's default
# 30-minute timeout would be too tight for a larger configuration's pretraining stage.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=4)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: ``rank`` of ``world_size`` (0 of 1 outside torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_ranks() -> Ranks:
    """Read torchrun's ``RANK``/``WORLD_SIZE`` and join the gloo process group when there are peers."""
    ranks = Ranks(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    if ranks.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    return ranks


def shutdown(ranks: Ranks) -> None:
    if ranks.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.world_size > 1:
        dist.barrier()


def check_split(batch_size: int, world_size: int) -> None:
    """Refuse a global batch that does not split evenly over the ranks."""
    if batch_size % world_size:
        raise SgaError(f"--batch-size {batch_size} does not split evenly over {world_size} processes; pass "
                       "a multiple of --nproc")


def share(indices: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """This rank's contiguous share of a global batch's example ``indices [B]`` (``B`` divisible by ranks)."""
    return indices.chunk(ranks.world_size)[ranks.rank]


def global_mean(values: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The mean over ranks of a float tensor (the tensor itself with one rank)."""
    if ranks.world_size == 1:
        return values
    total = values.detach().clone()
    dist.all_reduce(total)
    return total / ranks.world_size


def average_gradients(params: Sequence[torch.nn.Parameter], ranks: Ranks) -> None:
    """Replace every gradient by its mean over the ranks, in one flat all-reduce.

    A parameter with a gradient on some ranks only gets zeros from the others; one with a gradient on none
    keeps ``None``, so the optimizer skips it exactly as a one-process run would.
    """
    if ranks.world_size == 1:
        return
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
    dist.all_reduce(present)
    used = [p for p, n in zip(params, present.tolist()) if n > 0]
    if not used:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in used])
    dist.all_reduce(flat)
    flat /= ranks.world_size
    for p, grad in zip(used, flat.split([p.numel() for p in used])):
        p.grad = grad.view_as(p)


def check_in_step(module: torch.nn.Module, ranks: Ranks) -> None:
    """Raise when the ranks' weights have drifted apart (they must take identical steps)."""
    if ranks.world_size == 1:
        return
    with torch.no_grad():
        digest = torch.stack([p.double().abs().sum() for p in module.parameters()]).sum().reshape(1)
    low, high = digest.clone(), digest.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise SgaError(f"teacher training ranks diverged (weight digests {low.item()} vs {high.item()}); "
                       "rerun with --nproc 1 and report this")


def launch(config, show_progress: bool = True) -> dict:
    """Run ``config`` (a ``teacher.train.TrainConfig``) on ``config.nproc`` local ranks under torchrun;
    returns rank 0's summary. Each rank gets ``config.threads`` OpenMP and torch threads."""
    check_split(config.batch_size, config.nproc)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG_FILE
    path.write_text(json.dumps(dataclasses.asdict(config), indent=1, sort_keys=True))
    (out / SUMMARY_FILE).unlink(missing_ok=True)
    threads = str(config.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if not show_progress:
        env["SGA_PROGRESS"] = "0"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={config.nproc}",
           "-m", "teacher.train", "--config", str(path)]
    # The ranks' stdout goes to our stderr: with --json, stdout must hold only the summary object.
    result = subprocess.run(cmd, env=env, stdout=sys.stderr)
    if result.returncode != 0 or not (out / SUMMARY_FILE).is_file():
        raise SgaError(f"teacher training failed (torchrun exit status {result.returncode}); see the rank "
                       f"logs above. Rerun the same command to resume from the last checkpoint in {out}")
    return json.loads((out / SUMMARY_FILE).read_text())
