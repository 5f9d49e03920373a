"""``sga experiment``: the paper's table in miniature on the synthetic world.

:mod:`.config` (presets and variants), :mod:`.plan` (the grid), :mod:`.labelsets` (one-eighth subset,
ground-truth M, label quality), :mod:`.stages` (world, labels, pretraining, fine-tuning), :mod:`.runner`
(worker processes, resume), :mod:`.report`, :mod:`.markdown` and :mod:`.plots` (RESULTS.md, CSVs, PNGs).
"""

from .config import ExperimentConfig, FinetuneRecipe, PretrainRecipe
from .plan import Cell, PretrainSpec, Unit, build_plan
from .runner import run_experiment

__all__ = ["Cell", "ExperimentConfig", "FinetuneRecipe", "PretrainRecipe", "PretrainSpec", "Unit",
           "build_plan", "run_experiment"]
