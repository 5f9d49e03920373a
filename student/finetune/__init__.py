"""Fine-tuning the student on downstream tasks: refexp (RefCOCO+), VQA 2.0 and VCR.

``finetune(FinetuneConfig(...))`` runs one task (:mod:`.engine`); tasks live behind one interface
(:mod:`.base`) in :mod:`.refexp`, :mod:`.vqa` and :mod:`.vcr`; :mod:`.data` holds the task images' regions
and the input encoding; :mod:`.model` restores a pretrained encoder and adds the head.
"""

from .base import Task, TaskDefaults, build_task, register_task, task_names
from .data import InputEncoder, RegionStore
from .engine import FinetuneConfig, evaluate, finetune, subset
from .model import FinetuneModel, load_encoder

__all__ = ["FinetuneConfig", "FinetuneModel", "InputEncoder", "RegionStore", "Task", "TaskDefaults",
           "build_task", "evaluate", "finetune", "load_encoder", "register_task", "subset", "task_names"]
