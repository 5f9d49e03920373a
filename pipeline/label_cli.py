"""``sga label``, ``sga labels ls``, ``sga inspect``, ``sga report``: argument parsing only.

Implementations are imported inside the handlers so ``sga --help`` stays fast.
"""

from __future__ import annotations

import argparse

from shards.cliutil import add_command, add_group

LABEL_DESCRIPTION = """\
Label captions with a phrase-grounding teacher on Ray: one unit of work per input shard reads the image and
region shards in lockstep, extracts noun phrases with spaCy, grounds them with the teacher, matches the
teacher's boxes to the regions (IoU) and writes OUT/<labelset_id>/NNNNN.{tar,parquet,_stats.json}.

With no arguments: the embedded default. A synthetic world is generated (or reused) under $SGA_CACHE
(default ~/.cache/sga), labelled with the bundled `tiny` teacher on a local Ray instance, and the summary
includes precision/recall of the alignment matrix against the world's hidden ground truth.

Rerunning resumes: finished shards (by marker) are skipped. A different --teacher (or thresholds) labels
into a new label set beside the old one; phrases are cached under OUT/_phrases and reused.

On a cluster (--address), every node reads the inputs and writes OUT itself: use URIs every node can reach
(s3://, gs://, hdfs://) or a shared file system, and install sga, spaCy and the teacher on every node.
"""

LABEL_EPILOG = """\
examples:
  sga label
  sga label --images world/images --regions world/regions --out labels --gt world/gt
  sga label --images s3://bucket/cc3m --regions s3://bucket/cc3m-regions --out s3://bucket/labels \\
            --address auto --gpus-per-worker 1 --batch-size 32 --teacher /models/mdetr_b5
"""


def _add_label(subparsers) -> None:
    p = add_command(subparsers, "label", _label, help="label shards with a grounding teacher (Ray job)",
                    description=LABEL_DESCRIPTION, epilog=LABEL_EPILOG)
    io = p.add_argument_group("inputs and outputs (all three, or none for the embedded default)")
    io.add_argument("--images", help="image shards (img2dataset webdataset layout), local path or URI")
    io.add_argument("--regions", help="region shards with the same shard names and keys")
    io.add_argument("--out", help="folder of label sets (a label set is OUT/<labelset_id>/)")
    io.add_argument("--gt", help="ground truth GT/NNNNN.parquet (synthetic world): adds precision/recall")
    io.add_argument("--cache", help="embedded default: cache folder (default $SGA_CACHE or ~/.cache/sga)")
    io.add_argument("--world-samples", type=int,
                    help="embedded default: a corpus-only synthetic world of this many samples")
    t = p.add_argument_group("teacher and labels")
    t.add_argument("--teacher", default="tiny", help="teacher name or local teacher folder (default: tiny)")
    t.add_argument("--score-floor", type=float, default=0.05, help="teacher boxes below are not stored")
    t.add_argument("--score-threshold", type=float, default=0.1,
                   help="a teacher box counts for the alignment matrix at or above this score")
    t.add_argument("--iou-threshold", type=float, default=0.5, help="region-box IoU for a positive")
    t.add_argument("--top-k", type=int, default=10, help="teacher boxes kept per phrase")
    t.add_argument("--max-error-rate", type=float, default=0.5,
                   help="fail the job (exit 3) when more than this fraction of the label set's samples "
                        "is rejected: real data loses a few percent, half lost means wrong inputs "
                        "(default: %(default)s)")
    t.add_argument("--max-caption-chars", type=int, default=1000, help="longer captions are rejected")
    r = p.add_argument_group("Ray")
    r.add_argument("--address",
                   help="Ray cluster: auto or ray://HOST:PORT (default: $RAY_ADDRESS, else a local instance)")
    r.add_argument("--num-cpus", type=int, help="CPUs of the local instance (default: this machine's)")
    r.add_argument("--workers", type=int, help="teacher actors (default: from the cluster's CPUs/GPUs)")
    r.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per teacher actor (0: CPU)")
    r.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs (and torch threads) per teacher")
    r.add_argument("--shard-workers", type=int, help="CPU actors that read, parse, match and write")
    r.add_argument("--cpus-per-shard-worker", type=float, default=1.0)
    r.add_argument("--batch-size", type=int, default=16, help="samples per teacher batch")
    r.add_argument("--batches-per-call", type=int, default=2,
                   help="teacher batches per call to a teacher actor (each call costs Ray ~2 ms at each end)")
    r.add_argument("--max-inflight", type=int, default=4, help="batches per shard worker at the teachers")
    r.add_argument("--decode", choices=("worker", "teacher"), default="worker",
                   help="where JPEGs are decoded: in the shard workers, which send pixels (default; the "
                        "teachers only run their model), or in the teachers, which then receive the ~10x "
                        "smaller JPEGs (for clusters short of network bandwidth, not CPU)")
    r.add_argument("--device", help="teacher device (default: cuda with --gpus-per-worker, else cpu)")


def _label(args: argparse.Namespace) -> dict:
    from shards.errors import SgaError

    from .job import run_label_job
    from .plan import LabelJobConfig
    from .validate import ValidationConfig

    given = [name for name in ("images", "regions", "out") if getattr(args, name)]
    if given and len(given) < 3:
        missing = sorted({"images", "regions", "out"} - set(given))
        raise SgaError(f"--{' --'.join(missing)} missing: pass --images, --regions and --out together, or "
                       "none of them for the embedded default")
    options = dict(
        teacher=args.teacher, gt=args.gt, address=args.address, num_cpus=args.num_cpus, workers=args.workers,
        gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
        shard_workers=args.shard_workers, cpus_per_shard_worker=args.cpus_per_shard_worker,
        batch_size=args.batch_size, max_inflight=args.max_inflight, batches_per_call=args.batches_per_call,
        decode=args.decode, score_floor=args.score_floor, score_threshold=args.score_threshold,
        iou_threshold=args.iou_threshold, top_k=args.top_k, max_error_rate=args.max_error_rate,
        device=args.device, validation=ValidationConfig(max_caption_chars=args.max_caption_chars),
        show_progress=not args.json,
    )
    if given and (args.cache or args.world_samples):
        raise SgaError("--cache and --world-samples apply to the embedded default only; drop them or drop "
                       "--images/--regions/--out")
    if not given:
        from .defaults import embedded_default

        images, regions, out, gt = embedded_default(args.cache, args.world_samples, quiet=args.json)
        options.update(gt=args.gt or gt)
        return run_label_job(LabelJobConfig(images=images, regions=regions, out=out, **options))
    return run_label_job(LabelJobConfig(images=args.images, regions=args.regions, out=args.out, **options))


def _add_labels(subparsers) -> None:
    sub = add_group(subparsers, "labels", help="list label sets",
                    description="Label sets under a folder written by `sga label`.")
    p = add_command(sub, "ls", _labels_ls, help="list label sets with teacher, date, counts, completeness",
                    description="List the label sets under URI (a folder given to `sga label --out`).")
    p.add_argument("uri", help="folder of label sets (or one label set)")


def _labels_ls(args: argparse.Namespace) -> dict:
    from .labelsets import describe, list_labelsets

    rows = [describe(uri) for uri in list_labelsets(args.uri)]
    if not args.json:
        header = f"{'labelset':<13} {'teacher':<14} {'created':<26} {'shards':>9} {'samples':>8} " \
                 f"{'ok':>8} {'errors':>7} {'err%':>6} {'score':>5} {'iou':>4} {'phrases':>8} " \
                 f"{'positives':>9}"
        print(header)
        for r in rows:
            print(f"{r['labelset_id']:<13} {r['teacher'][:14]:<14} {r['created_at']:<26} "
                  f"{r['shards_done']:>4}/{r['shards']:<4} {r['samples']:>8} {r['ok']:>8} "
                  f"{r['errors']:>7} {100 * r['error_rate']:>5.1f}% {r['score_threshold']:>5.2f} "
                  f"{r['iou_threshold']:>4.2f} {r['phrases']:>8} {r['positives']:>9}"
                  f"{'' if r['complete'] else '  (' + r['status'] + ')'}")
    return {"uri": args.uri, "labelsets": len(rows), "complete": sum(r["complete"] for r in rows),
            "failed": sum(r["failed"] for r in rows),
            **({"rows": rows} if args.json else {})}


def _add_inspect(subparsers) -> None:
    p = add_command(subparsers, "inspect", _inspect, help="draw one sample's labels to a PNG",
                    description="Draw the image, its region boxes, the teacher's boxes and the phrases "
                                "(colour-coded per phrase), with the regions matched to each phrase "
                                "highlighted.")
    p.add_argument("labels", help="a label set, or a folder holding label sets")
    p.add_argument("--key", required=True, help="sample key")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--labelset", help="label set id when LABELS holds several")
    p.add_argument("--images", help="image shards (default: those the label set was made from)")
    p.add_argument("--regions", help="region shards (default: those the label set was made from)")


def _inspect(args: argparse.Namespace) -> dict:
    from .inspect import inspect_sample

    return inspect_sample(args.labels, args.key, args.out, labelset_id=args.labelset, images=args.images,
                          regions=args.regions)


def _add_report(subparsers) -> None:
    p = add_command(subparsers, "report", _report, help="write a label-quality report (PNG + HTML)",
                    description="Phrases per caption, positives per phrase, teacher score histogram and "
                                "error reasons of a label set, as PNG plots and a small index.html.")
    p.add_argument("labels", help="a label set, or a folder holding label sets")
    p.add_argument("--out", required=True, help="folder to write the report to")
    p.add_argument("--labelset", help="label set id when LABELS holds several")


def _report(args: argparse.Namespace) -> dict:
    from .report import write_report

    return write_report(args.labels, args.out, labelset_id=args.labelset)


def register(subparsers) -> None:
    """Add ``label``, ``labels ls``, ``inspect`` and ``report`` to the ``sga`` parser."""
    _add_label(subparsers)
    _add_labels(subparsers)
    _add_inspect(subparsers)
    _add_report(subparsers)
