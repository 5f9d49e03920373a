"""Fine-tuning the student on downstream tasks: refexp (RefCOCO+), VQA 2.0 and VCR.

``finetune(FinetuneConfig(...))`` runs one task (:mod:`.engine`); tasks live behind one interface
(:mod:`.base`) in :mod:`.refexp`, :mod:`.vqa` and :mod:`.vcr`; :mod:`.data` holds the task images' regions
and the input encoding; :mod:`.model` restores a pretrained encoder and adds the head.
"""

import importlib

# Name -> submodule. The submodules import torch: they load on first use, so `sga --help` (which imports
# this package's cli module) stays fast.
_EXPORTS = {
    "Task": "base", "TaskDefaults": "base", "build_task": "base", "register_task": "base",
    "task_names": "base",
    "InputEncoder": "data", "RegionStore": "data",
    "FinetuneConfig": "engine", "evaluate": "engine", "finetune": "engine", "subset": "engine",
    "FinetuneModel": "model", "load_encoder": "model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
