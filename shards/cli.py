"""``sga regions ...``: region shard tools (implementation in ``shards.importers``, imported on use)."""

from __future__ import annotations

import argparse

from .cliutil import add_command, add_group

IMPORT_DESCRIPTION = """\
Import pre-extracted detector regions into region shards that mirror a set of image shards.

Inputs:
  --images  img2dataset output (NNNNN.tar, NNNNN.parquet): which keys, in which order, at which size.
  --src     butd-tsv: a bottom-up-attention TSV file, or a directory of *.tsv files. Rows are
              image_id, image_w, image_h, num_boxes, boxes, features (base64 float32; LXMERT's 10-field
              layout and files with a header row are recognised; --fields names other layouts).
            npz: a directory of NAME.npz files with boxes [R,4], features [R,D], optional cls_prob [R,C],
              optional image_w/image_h (loaded without pickle).
  A source id (TSV image_id, npz NAME) matches the sample whose key equals it, else the only sample whose
  url base name without extension equals it. Boxes are rescaled to the shard image's width/height.

Outputs under --out: NNNNN.tar per image shard (KEY.boxes.npy float32 [R,4] pixel xyxy, KEY.features.npy
float16 [R,D], KEY.cls_prob.npy float16 [R,C] when the source has it, KEY.json), NNNNN_missing.json
(samples with no or unusable regions), and regions.json, written last. Formats: shards/FORMAT.md.

Errors: a truncated or corrupt image shard is imported up to the damage, which NNNNN_missing.json and the
summary record (shard, last whole key, reason with the byte offset). Exit status 2: refused, nothing
written (bad arguments, or no source id matches the first image shard's keys). Exit status 3: the import
ran but failed (errors / inputs above --max-error-rate, where errors are rejected samples plus damaged
shards, or a shard yielded no sample); the summary with the top error reasons is printed.
"""


def _run_import(args: argparse.Namespace) -> dict:
    from .importers import ImportConfig, import_regions

    fields = tuple(f.strip() for f in args.fields.split(",")) if args.fields else None
    return import_regions(ImportConfig(fmt=args.format, src=args.src, images=args.images, out=args.out,
                                       fields=fields, tmp_dir=args.tmp_dir,
                                       max_error_rate=args.max_error_rate))


def register(subparsers) -> None:
    """Add ``sga regions import`` to the ``sga`` parser."""
    group = add_group(subparsers, "regions", help="region shard tools (import pre-extracted features)",
                      description="Tools for region shards: per-image detector boxes, features and class "
                                  "probabilities. See `sga regions import --help`.")
    parser = add_command(group, "import", _run_import, help="import bottom-up-attention TSV or .npz regions",
                         description=IMPORT_DESCRIPTION)
    parser.add_argument("--format", required=True, choices=("butd-tsv", "npz"), help="source format")
    parser.add_argument("--src", required=True, help="TSV file or directory (butd-tsv), .npz directory (npz)")
    parser.add_argument("--images", required=True, help="image shard root (local path or pyarrow.fs URI)")
    parser.add_argument("--out", required=True, help="region shard root to write (local path or URI)")
    parser.add_argument("--fields", help="comma-separated TSV column names for a headerless file in "
                                         "another layout (must include image_id, num_boxes, boxes, features)")
    parser.add_argument("--tmp-dir", help="local directory for staging TSV records (default: system temp)")
    # The default is shards.importers.DEFAULT_MAX_ERROR_RATE, not imported here: `sga --help` stays fast.
    parser.add_argument("--max-error-rate", type=float, default=0.1,
                        help="fail (exit 3) when errors / inputs exceeds this fraction "
                             "(default: %(default)s)")
