"""``sga teacher train|eval|convert`` (implementations in ``teacher.train``, ``teacher.evaluate``,
``teacher.grounding``, imported on use so ``sga --help`` stays fast)."""

from __future__ import annotations

import argparse
import dataclasses

from shards.cliutil import add_command, add_group

TRAIN_DESCRIPTION = """\
Train a small MDETR phrase-grounding teacher on a synthetic world's hidden ground truth (CPU).

The last --val-samples images of --world are held out for the periodic recall printed to the log. Output
(--out): a teacher directory (model.safetensors, config.json, tokenizer/, teacher.json) usable as
--teacher OUT, plus train_log.jsonl and train_state/checkpoint.pt. Rerun the same command to resume.
The defaults are the bundled teacher's recipe, which it was trained with under --nproc 2 (two processes of
one thread, each computing half of every batch): about an hour on an idle 2-core machine. Batch norm
normalises per process, so the process count is part of a recipe. One process of two threads (--threads 2)
runs ~1.5x slower. Give each process only the cores it owns (--threads x --nproc <= cores): oversubscribed
torch threads run several times slower.
"""

EVAL_DESCRIPTION = """\
Phrase-grounding recall of a teacher on a world's hidden ground truth: recall@1 and recall@5 at
IoU >= 0.5 over visible phrases (any true box counts, Flickr30k AnyBox), and the fraction of phrases naming
nothing visible whose best box scores below --score-threshold. Use a world the teacher was not trained on
(generate one with another --seed).
"""

CONVERT_DESCRIPTION = """\
Turn a released MDETR checkpoint (.pth from zenodo record 4721981, e.g. pretrained_resnet101_checkpoint.pth,
which is also MDETR's Flickr30k grounding model) into a teacher directory: slim safetensors weights (EMA
weights when present), config.json, the tokenizer copied from --tokenizer (a local directory with
roberta-base's tokenizer.json or vocab.json + merges.txt; nothing is downloaded) and teacher.json.
"""


def train_config(args: argparse.Namespace):
    """The ``TrainConfig`` of ``sga teacher train`` arguments: given flags over the dataclass defaults."""
    from .train_config import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if "backbone_widths" in values:
        values["backbone_widths"] = tuple(int(w) for w in values["backbone_widths"].split(","))
    if values.get("init"):   # a second stage starts from a trained CNN: no pretraining unless asked for
        values.setdefault("backbone_pretrain_steps", 0)
    return TrainConfig(**values)


def _run_train(args: argparse.Namespace) -> dict:
    config = train_config(args)
    if config.nproc > 1:
        from .parallel import launch

        return launch(config, show_progress=not args.json)
    from .train import train

    return train(config, show_progress=not args.json)


def _run_eval(args: argparse.Namespace) -> dict:
    import torch

    from .evaluate import eval_world

    torch.set_num_threads(args.threads)
    return eval_world(args.world, args.teacher, device=args.device, limit=args.limit,
                      score_threshold=args.score_threshold, iou_threshold=args.iou_threshold,
                      batch_size=args.batch_size, show_progress=not args.json,
                      long_captions=args.long_captions)


def _run_convert(args: argparse.Namespace) -> dict:
    from .grounding import convert_to_teacher
    from .preprocess import PreprocessConfig

    return convert_to_teacher(args.src, args.tokenizer, args.out, entry=args.entry, weights=args.weights,
                              preprocess=PreprocessConfig(short_side=args.short_side, max_size=args.max_size))


def register(subparsers) -> None:
    """Add ``sga teacher train|eval|convert`` to the ``sga`` parser."""
    group = add_group(subparsers, "teacher", help="phrase-grounding teachers: train, evaluate, convert",
                      description="Phrase-grounding teachers (MDETR). `--teacher tiny` is the bundled small "
                                  "teacher; `--teacher DIR` any teacher directory.")

    p = add_command(group, "train", _run_train, help="train the small MDETR teacher on a synthetic world",
                    description=TRAIN_DESCRIPTION)
    p.add_argument("--world", required=True, help="world directory written by `sga world`")
    p.add_argument("--out", required=True, help="output teacher directory (resumed if it has a checkpoint)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (default 1)")
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes started with torchrun, each computing 1/N of every batch "
                        "with --threads threads (default 1: train in this process)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--steps", type=int, help="optimizer steps (default 6000)")
    p.add_argument("--batch-size", type=int, help="images per step (default 32)")
    p.add_argument("--lr", type=float, help="peak AdamW learning rate (default 5e-4)")
    p.add_argument("--val-samples", type=int, help="images held out at the end of the world (default 500)")
    p.add_argument("--short-side", type=int, help="input short side in pixels (default 96)")
    p.add_argument("--max-size", type=int, help="cap on the input long side (default 192)")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default 1000)")
    p.add_argument("--backbone-widths",
                   help="CNN stage widths, one stride-2 stage each (default 16,48,96,128)")
    p.add_argument("--d-model", type=int, help="transformer width (default 128)")
    p.add_argument("--enc-layers", type=int, help="fusion encoder layers (default 3)")
    p.add_argument("--dec-layers", type=int, help="decoder layers (default 3)")
    p.add_argument("--num-queries", type=int, help="object queries (default 12)")
    p.add_argument("--dropout", type=float, help="transformer and text-encoder dropout (default 0.1)")
    p.add_argument("--eos-coef", type=float, help="no-object weight of unmatched queries (default 0.1)")
    p.add_argument("--contrastive-weight", type=float,
                   help="weight of the contrastive alignment loss (default 1.0, MDETR's)")
    p.add_argument("--backbone-pretrain-steps", type=int,
                   help="steps of dense attribute pretraining of the CNN on rendered scenes before "
                        "grounding training, the tiny world's stand-in for ImageNet pretraining; 0 = none "
                        "(default 600; 0 with --init)")
    p.add_argument("--backbone-lr-ratio", type=float,
                   help="the CNN's learning rate relative to --lr (default 0.1)")
    p.add_argument("--long-captions", choices=("truncate", "clauses"),
                   help="training captions longer than the text encoder: truncated (default), or one "
                        "example per clause (window of whole phrases), as the teacher grounds them")
    p.add_argument("--backbone-frozen-stages", type=int,
                   help="CNN stages (from the input) left as pretrained, not trained (default 1)")
    p.add_argument("--init", help="start from this teacher directory's weights and tokenizer (a second "
                                  "training stage; same sizes required)")
    p.add_argument("--eval-every", type=int, help="steps between held-out evaluations (default 500)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 500)")
    p.add_argument("--log-every", type=int, help="steps between log lines (default 50)")

    p = add_command(group, "eval", _run_eval, help="recall@1/@5 of a teacher on a world's ground truth",
                    description=EVAL_DESCRIPTION)
    p.add_argument("--world", required=True, help="world directory written by `sga world` (held out)")
    p.add_argument("--teacher", default="tiny", help="'tiny' (bundled), a registered name or a teacher dir")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
    p.add_argument("--score-threshold", type=float, default=0.2,
                   help="a phrase 'gets a box' when its best score reaches this (default 0.2)")
    p.add_argument("--iou-threshold", type=float, default=0.5, help="IoU for a hit (default 0.5)")
    p.add_argument("--batch-size", type=int, default=16, help="images per teacher call (default 16)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--long-captions", choices=("clauses", "truncate"),
                   help="captions longer than the text encoder: grounded clause by clause, in windows of "
                        "whole phrases (default), or truncated, phrases past the cut getting no box "
                        "(MDETR's behaviour)")

    p = add_command(group, "convert", _run_convert, help="released MDETR .pth -> teacher directory",
                    description=CONVERT_DESCRIPTION)
    p.add_argument("--src", required=True, help="released checkpoint (.pth)")
    p.add_argument("--tokenizer", required=True, help="local roberta-base tokenizer directory")
    p.add_argument("--out", required=True, help="teacher directory to write")
    p.add_argument("--entry", help="hub entry, e.g. mdetr_resnet101 (default: inferred from the weights)")
    p.add_argument("--weights", default="auto", choices=("auto", "ema", "model"),
                   help="which weights: model_ema when present (auto), or force one")
    p.add_argument("--short-side", type=int, default=800, help="input short side (MDETR: 800)")
    p.add_argument("--max-size", type=int, default=1333, help="cap on the long side (MDETR: 1333)")
