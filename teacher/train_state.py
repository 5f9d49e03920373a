"""What a teacher training run keeps on disk: its log, its checkpoint (resume exactly where it stopped) and
the pretrained CNN (an interrupted run does not pretrain twice), plus starting from a trained teacher."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from shards.errors import SgaError
from shards.progress import progress

from .backbone_pretrain import BackbonePretrainConfig, pretrain_backbone
from .mdetr.checkpoint import load_mdetr
from .preprocess import PreprocessConfig
from .train_config import LEGACY_DEFAULTS, TrainConfig

CHECKPOINT = "train_state/checkpoint.pt"
LOG_FILE = "train_log.jsonl"
BACKBONE_STATE = "train_state/backbone.safetensors"


def log(out: Path, record: dict) -> None:
    with open(out / LOG_FILE, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def save_checkpoint(out: Path, config: TrainConfig, model, optimizer, step: int) -> None:
    path = out / CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "identity": json.dumps(config.identity(), sort_keys=True)}, tmp)
    tmp.replace(path)


def load_checkpoint(out: Path, config: TrainConfig, model, optimizer) -> int:
    """Restore a run; returns the step to continue from (0 without a checkpoint)."""
    path = out / CHECKPOINT
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = json.loads(state["identity"])
    step = int(state["step"])
    # --steps may change while both schedules are still before their decay: the run so far is then exactly
    # what the new schedule would have done (same warm-up, same constant lr, same batches).
    saved_steps = saved.pop("steps")
    ours = {k: v for k, v in config.identity().items() if k != "steps"}
    # Settings added after a checkpoint was written were then at their defaults of that time.
    defaults = {**TrainConfig(world="", out="").identity(), **LEGACY_DEFAULTS}
    saved = {**{k: defaults[k] for k in ours if k not in saved}, **saved}
    if saved != ours:
        raise SgaError(f"{path} was written by a run with other settings; rerun with the same options, or "
                       "pass a new --out (or delete that directory) to start over")
    before_decay = min(saved_steps, config.steps) * config.decay_start
    if saved_steps != config.steps and step > before_decay:
        raise SgaError(f"{path}: --steps can only change before the learning-rate decay starts (step "
                       f"{int(before_decay)}); this run is at step {step}, rerun with --steps {saved_steps}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return step


def init_weights(model, teacher_dir: str) -> None:
    """Start from a trained teacher's weights (a second stage with other loss or dropout settings); every
    tensor must have this run's shape."""
    try:
        model.load_state_dict(load_mdetr(teacher_dir).state_dict())
    except RuntimeError as exc:
        raise SgaError(f"--init {teacher_dir}: its weights do not fit this run's model; pass the sizes of "
                       f"the run that trained it ({str(exc).splitlines()[0]})") from exc


def pretrained_backbone(model, config: TrainConfig, out: Path, preprocess: PreprocessConfig,
                         show_progress: bool) -> None:
    """Run the backbone pretraining stage (:mod:`teacher.backbone_pretrain`) into ``model``'s CNN, or reuse
    its result from an earlier, interrupted attempt of this run."""
    body = model.backbone[0].body
    path = out / BACKBONE_STATE
    # What the stage's result depends on; a cached result of other settings is recomputed, not reused.
    settings = config.identity()
    identity = json.dumps({k: settings[k] for k in ("backbone_pretrain_steps", "batch_size", "seed",
                                                    "backbone_widths", "short_side", "max_size")},
                          sort_keys=True)
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            cached = (f.metadata() or {}).get("identity")
        if cached == identity:
            body.load_state_dict(load_file(str(path)))
            return
    bar = progress(total=config.backbone_pretrain_steps, desc="pretrain backbone", unit="step",
                   **({} if show_progress else {"disable": True}))

    def on_step(step: int, losses: dict[str, float]) -> None:
        bar.update(1)
        if step % config.log_every == 0:
            log(out, {"backbone_step": step, **{k: round(v, 4) for k, v in losses.items()}})

    accuracy = pretrain_backbone(body, BackbonePretrainConfig(steps=config.backbone_pretrain_steps,
                                                              batch_size=config.batch_size, seed=config.seed),
                                 preprocess, preprocess.size_multiple, on_step)
    bar.close()
    log(out, {"backbone_step": config.backbone_pretrain_steps, "object_accuracy": accuracy})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in body.state_dict().items()}, str(tmp), {"identity": identity})
    tmp.replace(path)
