"""``sga finetune``: fine-tune a pretrained student on refexp, VQA or VCR and report its accuracy."""

from __future__ import annotations

import argparse
import json

from shards.cliutil import add_command

DESCRIPTION = """\
Fine-tune the student on a downstream task and evaluate it on the val and test splits.

Tasks (files under --task-dir, images from the region shards in --regions):
  refexp  refexp/{split}.json (RefCOCO+ format): score every region proposal for the expression;
          accuracy = the top proposal has IoU >= 0.5 with the target box
  vqa     vqa/v2_OpenEnded_*_{split}_questions.json + v2_*_{split}_annotations.json (VQA 2.0): soft
          answer scores from the 10 human answers, VQA accuracy
  vcr     vcr/{split}.jsonl (VCR): Q->A and QA->R as 4-way multiple choice (two runs, both reported)
With --world DIR the task files and regions default to DIR/tasks and DIR/tasks/regions.

Defaults are the paper's: lr 4e-5, batch 256 for refexp and VQA; lr 2e-5, batch 64 for VCR; 20 epochs.
"""

EPILOG = """\
examples:
  sga finetune --task refexp --checkpoint runs/tiny --world world
  sga finetune --task vqa --checkpoint none --world world --preset tiny --lr 1e-3 --batch-size 64
  sga finetune --task vcr --checkpoint runs/tiny/checkpoints/step_00001000 --task-dir world/tasks \\
               --regions world/tasks/regions --fraction 0.125 --json
"""

TASKS = {"refexp": ("refexp",), "vqa": ("vqa",), "vcr": ("vcr_qa", "vcr_qar")}


def _override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def register(subparsers) -> None:
    """Add ``sga finetune``."""
    p = add_command(subparsers, "finetune", _finetune, help="fine-tune the student on refexp, VQA or VCR",
                    description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--checkpoint", required=True,
                   help="`sga pretrain --out` folder, one of its checkpoints/step_N, or 'none' (random init)")
    p.add_argument("--world", help="synthetic world folder: --task-dir and --regions default into it")
    p.add_argument("--task-dir", help="folder with refexp/, vqa/, vcr/ (default WORLD/tasks)")
    p.add_argument("--regions", help="region shards of the task images (default WORLD/tasks/regions)")
    p.add_argument("--out", help="write finetune_summary.json and the fine-tuned weights here "
                                 "(VCR: OUT/vcr_qa and OUT/vcr_qar)")
    p.add_argument("--fraction", type=float, default=1.0, help="share of the training data to use")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("optimisation (default: the task's paper setting)")
    g.add_argument("--lr", type=float)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--epochs", type=int)
    g.add_argument("--max-text-len", type=int, help="wordpieces per sequence (capped by the model)")
    g.add_argument("--warmup", type=float, default=0.1, help="share of steps for the linear warm-up")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--eval-batch-size", type=int, default=256)
    g.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    g = p.add_argument_group("model without a checkpoint")
    g.add_argument("--preset", choices=("tiny", "base"), default="tiny")
    g.add_argument("--model", type=_override, action="append", default=[], metavar="FIELD=VALUE",
                   help="override a StudentConfig field, e.g. encoder=two (repeatable)")
    g.add_argument("--tokenizer", help="local tokenizer folder (default: the shipped synthetic-world one)")


def _finetune(args: argparse.Namespace) -> dict:
    from shards import fs
    from shards.errors import SgaError

    from .data import RegionStore
    from .engine import FinetuneConfig, finetune

    task_dir = args.task_dir or (fs.join(args.world, "tasks") if args.world else None)
    regions = args.regions or (fs.join(args.world, "tasks", "regions") if args.world else None)
    if task_dir is None or regions is None:
        raise SgaError("pass --world DIR, or both --task-dir and --regions")
    checkpoint = None if args.checkpoint.lower() == "none" else args.checkpoint
    store = RegionStore(regions)
    summaries = {}
    for task in TASKS[args.task]:
        out = args.out if args.out is None or len(TASKS[args.task]) == 1 else fs.join(args.out, task)
        cfg = FinetuneConfig(task=task, task_dir=task_dir, regions=regions, checkpoint=checkpoint, out=out,
                             fraction=args.fraction, seed=args.seed, lr=args.lr, batch_size=args.batch_size,
                             epochs=args.epochs, max_text_len=args.max_text_len, warmup=args.warmup,
                             weight_decay=args.weight_decay, eval_batch_size=args.eval_batch_size,
                             preset=args.preset, model=dict(args.model), tokenizer=args.tokenizer,
                             threads=args.threads, show_progress=not args.json)
        summaries[task] = finetune(cfg, store)
    if len(summaries) == 1:
        return next(iter(summaries.values()))
    return {"task": args.task, **{f"{t}_test": s["test"][s["metric"]] for t, s in summaries.items()
                                  if "test" in s}, "runs": summaries}
