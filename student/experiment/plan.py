"""The experiment's grid: which students to pretrain and which fine-tunings to run on each.

A :class:`PretrainSpec` is one student (variant, encoder, pretraining data, seed); a :class:`Cell` is one
fine-tuning of it (task, share of the task's training data) and yields one number. Every id ends in a hash
of all the settings that decide its result, so a finished cell is reused exactly when nothing it depends
on changed. The grid (``ExperimentConfig`` decides the sizes):

=====================  =================================  =========  =========================
table                  variants                           encoders   pretraining data, shares
=====================  =================================  =========  =========================
main (paper Table 1)   baseline, sga                      all        full and 1/8; share 1
no pretraining         none                               all        -; share 1
ablations              baseline_spe, sga_token, sga_nospe focus      1/8; share 1
                       sga_l1, sga_l5 (+ baseline, sga)
data efficiency        baseline, sga, none                focus      full and 1/8; every share
ground-truth M         sga_gt                             focus      full and 1/8; share 1
=====================  =================================  =========  =========================
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .config import VARIANTS, ExperimentConfig, fingerprint

FULL, EIGHTH, NO_DATA = "full", "eighth", "none"


@dataclass(frozen=True)
class PretrainSpec:
    variant: str
    encoder: str
    data: str            # "full" | "eighth" | "none" (variant "none": no pretraining)
    seed: int

    @property
    def labels(self) -> str | None:
        """Which label set pretrains it: "pseudo", "gt", or None (no pretraining)."""
        return VARIANTS[self.variant][0]

    def model(self, cfg: ExperimentConfig) -> dict:
        """StudentConfig overrides of this student."""
        return {**cfg.pretrain.model, **VARIANTS[self.variant][1], "encoder": self.encoder}

    def run_id(self, cfg: ExperimentConfig) -> str:
        key = fingerprint(cfg.label_part(), dataclasses.asdict(cfg.pretrain), self.model(cfg), self.data,
                          self.seed, self.labels)
        return f"{self.variant}-{self.encoder}-{self.data}-s{self.seed}-{key}"

    def cost(self, cfg: ExperimentConfig) -> float:
        """Pretraining samples seen, in units of the full corpus."""
        share = {FULL: 1.0, EIGHTH: cfg.small_fraction, NO_DATA: 0.0}[self.data]
        return share * cfg.pretrain.epochs


@dataclass(frozen=True)
class Cell:
    spec: PretrainSpec
    task: str
    fraction: float

    def cell_id(self, cfg: ExperimentConfig) -> str:
        ft = cfg.finetune
        key = fingerprint(self.spec.run_id(cfg), self.task, self.fraction, ft.epochs[self.task],
                          ft.lr[self.task], ft.batch_size[self.task])
        return f"{self.spec.run_id(cfg)}-{self.task}-f{self.fraction:g}-{key}"


@dataclass
class Unit:
    """One worker's job: pretrain ``spec`` (unless ``none``) and run its ``cells``."""

    spec: PretrainSpec
    cells: list[Cell]

    def cost(self, cfg: ExperimentConfig) -> float:
        # Rough seconds-free cost model: one pretraining epoch on the full corpus ~ 3 fine-tuning epochs
        # of a task at share 1 on the default world sizes; used only to start long units first.
        ft = sum(c.fraction * cfg.finetune.epochs[c.task] for c in self.cells) / 3
        return self.spec.cost(cfg) * cfg.world_samples / max(1, cfg.task_samples) + ft


def build_plan(cfg: ExperimentConfig) -> list[Unit]:
    """Every unit of the grid, longest first."""
    cells: dict[PretrainSpec, set[tuple[str, float]]] = {}

    def add(variant: str, encoder: str, data: str, fractions) -> None:
        for seed in range(cfg.seeds):
            spec = PretrainSpec(variant, encoder, data, seed)
            cells.setdefault(spec, set()).update((t, float(f)) for t in cfg.tasks for f in fractions)

    every = cfg.finetune.fractions
    for encoder in cfg.encoders:
        focus = encoder == cfg.focus_encoder
        for data in (FULL, EIGHTH):
            for variant in ("baseline", "sga"):
                add(variant, encoder, data, every if focus else (1.0,))
        add("none", encoder, NO_DATA, every if focus else (1.0,))
    if cfg.focus_encoder in cfg.encoders:
        for variant in cfg.ablations:
            add(variant, cfg.focus_encoder, EIGHTH, (1.0,))
        if cfg.gt_run:
            for data in (FULL, EIGHTH):
                add("sga_gt", cfg.focus_encoder, data, (1.0,))
    units = [Unit(spec, [Cell(spec, t, f) for t, f in sorted(todo)]) for spec, todo in cells.items()]
    return sorted(units, key=lambda u: -u.cost(cfg))
