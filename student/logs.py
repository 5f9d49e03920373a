"""Training logs on rank 0: a CSV row and TensorBoard scalars per step, and a progress bar on stderr.

``LOG_DIR/train.csv`` has one row per logged step: ``step, epoch, lr, samples_per_s`` and every loss term
(``loss``, ``mlm``, ``mrc``, ``itm``, ``gnd``, ... as the criterion names them). ``LOG_DIR/tensorboard/``
holds the same values as ``train/<name>`` scalars. On resume, rows after the resumed step (logged by the
interrupted run after its last checkpoint) are dropped, so the CSV reads as one run.
"""

from __future__ import annotations

import csv
import os
from typing import Any

from shards.progress import progress

FIXED_COLUMNS = ("step", "epoch", "lr", "samples_per_s")


class TrainLog:
    """Per-step logging; a no-op on ranks other than 0 (``enabled=False``)."""

    def __init__(self, log_dir: str, enabled: bool, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True):
        self.enabled = enabled
        self.csv_path = os.path.join(log_dir, "train.csv")
        self.columns: list[str] | None = None
        self._file = None
        self._writer = None
        self._tb = None
        bar_kwargs = {} if enabled else {"disable": True}  # rank 0 follows the shared SGA_PROGRESS rule
        self._bar = progress(total=total_steps, initial=start_step, desc="pretrain", unit="step",
                             **bar_kwargs)
        if not enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        self._resume_csv(start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # heavy import, rank 0 only

            self._tb = SummaryWriter(os.path.join(log_dir, "tensorboard"), purge_step=start_step + 1)

    def _resume_csv(self, start_step: int) -> None:
        """Keep the rows up to ``start_step`` of an earlier run; start a fresh file otherwise."""
        if start_step <= 0 or not os.path.exists(self.csv_path):
            return
        with open(self.csv_path, newline="") as f:
            reader = csv.DictReader(f)
            rows = [r for r in reader if int(r["step"]) <= start_step]
            self.columns = list(reader.fieldnames or [])
        self._open(mode="w")
        for row in rows:
            self._writer.writerow(row)

    def _open(self, mode: str) -> None:
        self._file = open(self.csv_path, mode, newline="")  # noqa: SIM115 - held open for the whole run
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns, extrasaction="ignore")
        self._writer.writeheader()

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Record ``values`` (must include the fixed columns except ``step``) for optimizer step ``step``."""
        self._bar.update(step - self._bar.n)
        if not self.enabled:
            return
        loss = values.get("loss")
        if loss is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", sps=f"{values.get('samples_per_s', 0):.0f}",
                                  refresh=False)
        if self.columns is None:
            terms = sorted(k for k in values if k not in FIXED_COLUMNS)
            self.columns = [*FIXED_COLUMNS, *terms]
        if self._writer is None:
            self._open(mode="w")
        self._writer.writerow({"step": step, **values})
        self._file.flush()
        if self._tb is not None:
            for name, value in values.items():
                if name != "epoch":
                    self._tb.add_scalar(f"train/{name}", float(value), step)

    def close(self) -> None:
        self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_log(log_dir: str) -> list[dict[str, float]]:
    """The rows of ``LOG_DIR/train.csv`` as floats (for tests and reports)."""
    with open(os.path.join(log_dir, "train.csv"), newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
