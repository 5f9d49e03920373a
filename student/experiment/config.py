"""The experiment's configuration: world size, teacher, pretraining and fine-tuning recipes, the grid.

Two presets. :meth:`ExperimentConfig.full` is sized for under 3 hours on 2 CPU cores (tiny students, a
4,000-image world with 800 task images, 3 seeds; estimated from measured costs: about 3 CPU minutes of
pretraining per student on the full corpus, 2 of fine-tuning on the four tasks).
:meth:`ExperimentConfig.quick` keeps every table but shrinks the world, the seeds, the epochs and the
data-efficiency shares to stay under 15 minutes. Both are plain dataclasses, so tests build smaller ones.

Choices that differ from the paper, and why:

* Students are the ``tiny`` preset (hidden 64, 2 layers) with ``init_std`` 0.2: with BERT's 0.02 the
  tiny model's pooled summaries start so small that the image-text matching logit stays at chance for
  hundreds of steps (the student's own tests use 0.2 for this reason).
* Learning rates are scaled up for models this small and runs this short (pretraining 1e-3 instead of
  1e-4; fine-tuning 2e-3 / 1e-3 instead of 4e-5 / 2e-5, keeping the paper's 2:1 ratio between grounding
  or VQA and VCR), and batches shrink with the data (32 / 8 instead of 256 / 64, the same 4:1 ratio; a
  VCR item is four sequences). On a task set this small the number of optimizer steps decides whether the
  tiny model learns refexp at all (measured: 248 steps of 64 items gave 16 % test accuracy, 488 steps of
  32 gave 61 % at the same cost), hence the small batches and refexp's extra epochs.
* Pretraining runs a fixed number of epochs on either corpus, as the paper's 10 epochs on full and
  one-eighth Conceptual Captions: the one-eighth student also gets one eighth of the compute.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

TASKS = ("refexp", "vqa", "vcr_qa", "vcr_qar")

# Variant -> (pretraining labels, StudentConfig overrides). "pseudo": the teacher's label set; "gt": the
# world's ground truth; None: no pretraining at all.
BASE_LOSSES = ["mlm", "mrc", "itm"]
SGA_LOSSES = ["mlm", "mrc", "itm", "gnd"]
VARIANTS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "none": (None, {"spe": False}),
    "baseline": ("pseudo", {"losses": BASE_LOSSES, "spe": False}),
    "sga": ("pseudo", {"losses": SGA_LOSSES, "phrase_level": "lstm", "spe": True, "weight_gnd": 20.0}),
    "baseline_spe": ("pseudo", {"losses": BASE_LOSSES, "spe": True}),
    "sga_token": ("pseudo", {"losses": SGA_LOSSES, "phrase_level": "token", "spe": True, "weight_gnd": 20.0}),
    "sga_nospe": ("pseudo", {"losses": SGA_LOSSES, "phrase_level": "lstm", "spe": False, "weight_gnd": 20.0}),
    "sga_l1": ("pseudo", {"losses": SGA_LOSSES, "phrase_level": "lstm", "spe": True, "weight_gnd": 1.0}),
    "sga_l5": ("pseudo", {"losses": SGA_LOSSES, "phrase_level": "lstm", "spe": True, "weight_gnd": 5.0}),
    "sga_gt": ("gt", {"losses": SGA_LOSSES, "phrase_level": "lstm", "spe": True, "weight_gnd": 20.0}),
}
ABLATIONS = ("baseline_spe", "sga_token", "sga_nospe", "sga_l1", "sga_l5")


@dataclass
class PretrainRecipe:
    """``sga pretrain`` settings shared by every variant (``model`` overrides the tiny preset)."""

    epochs: float = 20.0
    batch_size: int = 64
    lr: float = 1e-3
    warmup: float = 0.1
    model: dict[str, Any] = field(default_factory=lambda: {"init_std": 0.2})


@dataclass
class FinetuneRecipe:
    """Per-task fine-tuning settings and the training shares of the data-efficiency study."""

    epochs: dict[str, int] = field(default_factory=lambda: {"refexp": 10, "vqa": 8, "vcr_qa": 8,
                                                            "vcr_qar": 8})
    lr: dict[str, float] = field(default_factory=lambda: {"refexp": 2e-3, "vqa": 2e-3, "vcr_qa": 1e-3,
                                                          "vcr_qar": 1e-3})
    batch_size: dict[str, int] = field(default_factory=lambda: {"refexp": 32, "vqa": 32, "vcr_qa": 8,
                                                                "vcr_qar": 8})
    fractions: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0)


@dataclass
class ExperimentConfig:
    """Everything that decides the experiment's numbers (``fingerprint`` hashes it per cell)."""

    name: str = "full"
    world_samples: int = 4000
    task_samples: int = 800
    samples_per_shard: int = 250
    world_seed: int = 0
    teacher: str = "tiny"
    teacher_signature: str = ""               # content hash of the teacher folder (set by the runner)
    score_threshold: float = 0.1              # `sga label`'s default threshold for M (best F1 of tiny)
    iou_threshold: float = 0.5
    small_fraction: float = 0.125             # "a random one-eighth" of the pretraining set
    seeds: int = 3
    encoders: tuple[str, ...] = ("two", "single")
    tasks: tuple[str, ...] = TASKS
    ablations: tuple[str, ...] = ABLATIONS
    focus_encoder: str = "two"                # ablations, data efficiency and ground-truth M (ViLBERT's role)
    gt_run: bool = True
    quality_thresholds: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)
    jobs: int = 2                             # parallel worker processes (1 torch thread each)
    pretrain: PretrainRecipe = field(default_factory=PretrainRecipe)
    finetune: FinetuneRecipe = field(default_factory=FinetuneRecipe)

    @classmethod
    def full(cls, **overrides: Any) -> ExperimentConfig:
        return cls(**overrides)

    @classmethod
    def quick(cls, **overrides: Any) -> ExperimentConfig:
        epochs = {"refexp": 12, "vqa": 4, "vcr_qa": 4, "vcr_qar": 4}
        fields = dict(name="quick", world_samples=800, task_samples=250, seeds=2,
                      pretrain=PretrainRecipe(epochs=8.0),
                      finetune=FinetuneRecipe(epochs=epochs, fractions=(0.25, 1.0)))
        return cls(**{**fields, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def world_part(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("world_samples", "task_samples", "samples_per_shard",
                                               "world_seed")}

    def label_part(self) -> dict[str, Any]:
        return {**self.world_part(), "teacher": self.teacher, "teacher_signature": self.teacher_signature,
                "score_threshold": self.score_threshold,
                "iou_threshold": self.iou_threshold, "small_fraction": self.small_fraction}


def teacher_signature(spec: str) -> str:
    """sha256 of the teacher folder's files (names and bytes), so results follow the teacher's weights and
    not its name: replacing the bundled ``tiny`` teacher relabels and retrains. A spec that is not a
    folder (another registered name) signs as itself."""
    from pathlib import Path

    from pipeline.teacher_id import teacher_dir

    folder = teacher_dir(spec)
    if folder is None:
        return spec
    sha = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        sha.update(str(path.relative_to(folder)).encode())
        sha.update(path.read_bytes())
    return sha.hexdigest()[:16]


def fingerprint(*parts: Any) -> str:
    """A short hash of JSON-able parts: equal settings give equal names, so finished work is reused."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]
