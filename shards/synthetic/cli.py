"""``sga world``: write the synthetic captioned world (the embedded default corpus)."""

from __future__ import annotations

from ..cliutil import add_command

DESCRIPTION = """\
Write a small Conceptual-Captions-like corpus, deterministic in --seed:
  OUT/images/     image shards in img2dataset layout (NNNNN.tar/.parquet/_stats.json; failed rows
                  only in the parquet, plus empty, phrase-less and overlong captions)
  OUT/regions/    region shards of a simulated detector (same shard names and keys) + regions.json
  OUT/gt/         hidden ground truth, NNNNN.parquet: caption phrase -> object boxes (never read by
                  `sga label`; used to score teachers and labels and to train the small teacher)
  OUT/tasks/      held-out images/regions/gt and the downstream tasks: refexp/{train,val,test}.json
                  (RefCOCO+ style), vqa/ (VQA 2.0 questions + annotations JSON), vcr/{split}.jsonl
  OUT/world.json  config, seed, counts, class names, versions (written last)
"""


def register(subparsers) -> None:
    """Add ``sga world`` to the ``sga`` parser."""
    parser = add_command(subparsers, "world", _run, help="write the synthetic captioned world",
                         description=DESCRIPTION)
    parser.add_argument("--out", required=True, help="output directory or pyarrow.fs URI")
    parser.add_argument("--samples", type=int, default=1000, help="corpus samples (rows), default 1000")
    parser.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    parser.add_argument("--samples-per-shard", type=int, default=250, help="rows per shard (default 250)")
    parser.add_argument("--task-samples", type=int, default=500,
                        help="held-out images for the downstream tasks (default 500; 0: no tasks)")
    parser.add_argument("--overwrite", action="store_true", help="replace a world already in --out")
    parser.add_argument("--feature-dim", type=int, default=64, help="region feature width D (default 64)")


def _run(args) -> dict:
    from .detector import DetectorConfig
    from .world import WorldConfig, build_world

    config = WorldConfig(samples=args.samples, seed=args.seed, samples_per_shard=args.samples_per_shard,
                         task_samples=args.task_samples,
                         detector=DetectorConfig(feature_dim=args.feature_dim))
    return build_world(config, args.out, show_progress=not args.json, overwrite=args.overwrite)
