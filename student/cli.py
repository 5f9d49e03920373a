"""``sga pretrain``: train the student on region shards + label shards, on one or several processes.

Outside torchrun with ``--nproc K > 1`` the command writes ``OUT/pretrain_config.json`` and starts
``python -m torch.distributed.run --nproc-per-node K -m student.train --config ...``; inside torchrun (or
with one process) it trains in this process. Each process gets ``cores / K`` torch threads.
"""

from __future__ import annotations

import argparse
import json

from shards.cliutil import add_command

DESCRIPTION = """\
Pretrain the vision-language student with MLM, masked-region classification, image-text matching and the
grounding-alignment loss on the teacher's pseudo labels.

Inputs:  --regions ROOT (region shards NNNNN.tar + regions.json)
         --labels LABELS/<labelset_id> (label shards, manifest and markers from `sga label`; a LABELS root
         holding a single label set also works). Shards pair by name, samples by key.
Outputs: OUT/checkpoints/step_N/ (model.safetensors, optimizer.safetensors, state.json), OUT/model.safetensors
         and OUT/student_config.json (final weights), OUT/logs/train.csv and OUT/logs/tensorboard/,
         OUT/summary.json.
"""

EPILOG = """\
examples:
  sga pretrain --regions world/regions --labels labels --out runs/tiny --preset tiny --steps 200 --nproc 2
  sga pretrain ... --out runs/tiny --resume        # continue exactly where the last checkpoint left off
"""


def _model_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value  # a bare string such as encoder=two
    return key, parsed


def register(subparsers) -> None:
    """Add ``sga pretrain``."""
    p = add_command(subparsers, "pretrain", _pretrain, help="pretrain the student on pseudo labels",
                    description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("--regions", required=True, help="region shard set (path or pyarrow.fs URI)")
    p.add_argument("--labels", required=True, help="label set directory (or a root with one label set)")
    p.add_argument("--out", required=True, help="run directory for checkpoints, logs and the summary")
    p.add_argument("--steps", type=int, help="optimizer steps (default: --epochs worth)")
    p.add_argument("--epochs", type=float, default=10.0, help="nominal epochs when --steps is not given")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes (ranks) to launch with torchrun (default: GPUs, else 1)")
    p.add_argument("--resume", action="store_true", help="continue from OUT's latest checkpoint")
    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=("tiny", "base"), default="base",
                   help="model size preset (tiny: CPU tests and the synthetic world)")
    g.add_argument("--model", type=_model_override, action="append", default=[], metavar="FIELD=VALUE",
                   help="override a StudentConfig field, e.g. encoder=two, weight_gnd=20, "
                        "'losses=[\"mlm\",\"gnd\"]' (repeatable)")
    g.add_argument("--tokenizer", help="local tokenizer path (default: the shipped synthetic-world one)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=32, help="per-process micro-batch")
    g.add_argument("--global-batch", type=int, default=512,
                   help="samples per optimizer step over all processes (gradient accumulation fills it)")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup", type=float, default=0.1, help="share of steps for the linear warm-up")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    g.add_argument("--threads", type=int, help="torch threads per process (default: cores / processes)")
    g = p.add_argument_group("data")
    g.add_argument("--workers", type=int, default=2, help="loader worker processes per rank")
    g.add_argument("--data-mode", choices=("resampled", "split"), default="resampled",
                   help="resampled: shards drawn with replacement per worker (default); split: each rank "
                        "and worker reads its own slice of the shards (needs shards >= ranks x workers)")
    g.add_argument("--shuffle-buffer", type=int, default=256, help="samples in each worker's shuffle buffer")
    g.add_argument("--score-threshold", type=float, help="recompute M at this teacher score threshold")
    g.add_argument("--iou-threshold", type=float, help="recompute M at this IoU threshold")
    g.add_argument("--samples-per-epoch", type=int, help="nominal epoch size (default: labelled samples)")
    g = p.add_argument_group("checkpoints and logs")
    g.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (0: all)")
    g.add_argument("--log-dir", help="local log directory (default: OUT/logs)")
    g.add_argument("--no-tensorboard", action="store_true", help="CSV log only")


def config_from_args(args: argparse.Namespace):
    """The :class:`student.train.TrainConfig` the parsed arguments describe."""
    from .launch import DataConfig, TrainConfig

    data = DataConfig(regions=args.regions, labels=args.labels, batch_size=args.batch_size,
                      workers=args.workers, mode=args.data_mode, shuffle_buffer=args.shuffle_buffer,
                      seed=args.seed, score_threshold=args.score_threshold, iou_threshold=args.iou_threshold,
                      samples_per_epoch=args.samples_per_epoch)
    return TrainConfig(out=args.out, data=data, preset=args.preset, model=dict(args.model),
                       tokenizer=args.tokenizer, steps=args.steps, epochs=args.epochs,
                       global_batch=args.global_batch, lr=args.lr, weight_decay=args.weight_decay,
                       warmup=args.warmup, checkpoint_every=args.checkpoint_every,
                       keep_checkpoints=args.keep_checkpoints, resume=args.resume, device=args.device,
                       precision=args.precision, threads=args.threads, log_dir=args.log_dir,
                       tensorboard=not args.no_tensorboard)


def _pretrain(args: argparse.Namespace) -> dict:
    from .launch import launch, under_torchrun

    cfg = config_from_args(args)
    nproc = args.nproc
    if nproc is None:
        import torch

        nproc = max(1, torch.cuda.device_count()) if args.device != "cpu" else 1
    if under_torchrun() or nproc == 1:
        from .train import train

        return train(cfg)
    return launch(cfg, nproc, quiet=args.json)
