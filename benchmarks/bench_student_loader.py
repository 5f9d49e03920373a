"""Benchmark of the student loader: raw webdataset tar iteration vs the full loader, and the training step.

Same shards, one process, the same thread count, interleaved repeats (best of each is kept):

1. raw: webdataset reads every region and label tar of the run (``SimpleShardList`` ->
   ``tarfile_to_samples``) without decoding anything: the cost of touching the bytes;
2. stream: :class:`student.data.StudentLoader` without collation (pairing by key, manifest filtering,
   shuffle buffer, ``.npy``/JSON decoding, batching);
3. loader: the same with the real :class:`student.collate.Collator` (ITM swaps, tokenisation, MLM and region
   masking, grounding pair sampling, padding): what training consumes;
4. train step: the tiny model's forward, backward and AdamW step on pre-collated batches.

Printed: samples/s of each, loader/raw (target >= 0.8) and loader/train step (> 1: one loader process keeps
up with the model on this machine; with ``--workers`` W the loader runs in W processes).

    .venv/bin/python benchmarks/bench_student_loader.py                         # a generated world
    .venv/bin/python benchmarks/bench_student_loader.py --regions R --labels L   # any shard sets

Without ``--labels``, a synthetic world is generated and its hidden ground truth is written as the label set
(``tests/student_fixtures.py``), standing in for ``sga label``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regions", help="region shard set (default: a generated world's)")
    p.add_argument("--labels", help="label set (default: the generated world's ground truth)")
    p.add_argument("--samples", type=int, default=2000, help="generated world size")
    p.add_argument("--per-shard", type=int, default=250, help="generated world: samples per shard")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="loader worker processes (0: in this process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the train step")
    p.add_argument("--train-batches", type=int, default=20, help="batches timed for the train step")
    p.add_argument("--repeat", type=int, default=3, help="interleaved repeats; the best of each is kept")
    p.add_argument("--workdir", help="keeps the generated world between runs (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p.parse_args(argv)


def generated_shards(root: Path, samples: int, per_shard: int) -> tuple[str, str]:
    from shards.synthetic.world import WorldConfig, build_world

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from student_fixtures import labels_from_world

    world = root / f"world-{samples}-{per_shard}"
    if not (world / "world.json").exists():
        build_world(WorldConfig(samples=samples, samples_per_shard=per_shard, task_samples=0), str(world),
                    show_progress=False)
    labels = root / f"labels-{samples}-{per_shard}"
    if not labels.exists():
        labels_from_world(str(world), str(labels))
    return str(world / "regions"), str(labels)


def raw_pass(plan) -> tuple[int, float]:
    """Read every region and label tar of the plan with webdataset, undecoded; count region samples."""
    import webdataset as wds

    from shards import fs
    from shards.labels import label_shard_uri

    urls = [url for s in plan.shards
            for url in (fs.join(plan.regions, f"{s}.tar"), label_shard_uri(plan.labelset, s))]
    start = time.perf_counter()
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())
    count = sum(1 for sample in pipeline if sample["__url__"].startswith(plan.regions))
    return count, time.perf_counter() - start


def loader_pass(loader, epoch: int) -> tuple[int, float, list]:
    """One epoch of a rank-0 loader of a 1-process run; returns (samples, seconds, batches)."""
    start = time.perf_counter()
    loader.set_epoch(epoch)
    batches = [batch for batch, _ in loader]
    seconds = time.perf_counter() - start
    count = sum(len(b) if isinstance(b, list) else int(b["input_ids"].shape[0]) for b in batches)
    return count, seconds, batches


def _samples_as_batch(samples: list, generator) -> list:
    """Collation left out: the batch is the list of decoded samples."""
    return samples


def train_pass(batches: list, student, threads: int) -> tuple[int, float]:
    import torch

    from student.criterion import build_criterion
    from student.model import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, criterion = build_model(student), build_criterion(student)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(batch):
        criterion(model(batch), batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch in batches[:2]:  # warm-up: first calls allocate and pick kernels
        step(batch)
    start = time.perf_counter()
    for batch in batches[2:]:
        step(batch)
    return sum(int(b["input_ids"].shape[0]) for b in batches[2:]), time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from shards.regions import read_regions_info
    from student.collate import Collator
    from student.config import StudentConfig
    from student.data import DataConfig, StudentLoader, plan_shards
    from student.tokenizer import load_tokenizer

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        regions, labels = args.regions, args.labels
        if labels is None:
            regions, labels = generated_shards(Path(args.workdir or tmp), args.samples, args.per_shard)
        cfg = DataConfig(regions=regions, labels=labels, batch_size=args.batch_size, workers=args.workers)
        plan = plan_shards(cfg)
        info = read_regions_info(regions)
        tokenizer = load_tokenizer()
        student = StudentConfig.tiny(feature_dim=info["feature_dim"], num_classes=max(1, info["num_classes"]),
                                     vocab_size=len(tokenizer))
        # Built once: with --workers, persistent worker processes start in the first repeat only.
        stream = StudentLoader(plan, cfg, _samples_as_batch, rank=0, world=1, accum=1)
        loader = StudentLoader(plan, cfg, Collator(tokenizer, student), rank=0, world=1, accum=1)
        best = {"raw": 0.0, "stream": 0.0, "loader": 0.0}
        batches: list = []
        for rep in range(args.repeat):
            count, seconds = raw_pass(plan)
            best["raw"] = max(best["raw"], count / seconds)
            count, seconds, _ = loader_pass(stream, rep)
            best["stream"] = max(best["stream"], count / seconds)
            count, seconds, batches = loader_pass(loader, rep)
            best["loader"] = max(best["loader"], count / seconds)
        count, seconds = train_pass(batches[: args.train_batches + 2], student, args.threads)
        train_sps = count / seconds
    result = {"shards": len(plan.shards), "samples_per_epoch": plan.num_samples,
              "batch_size": args.batch_size, "workers": args.workers, "threads": args.threads,
              "cpu_count": os.cpu_count(), "raw_samples_per_s": round(best["raw"], 1),
              "stream_samples_per_s": round(best["stream"], 1),
              "loader_samples_per_s": round(best["loader"], 1),
              "train_step_samples_per_s": round(train_sps, 1),
              "loader_vs_raw": round(best["loader"] / best["raw"], 3),
              "loader_vs_train_step": round(best["loader"] / train_sps, 2)}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{plan.num_samples} labelled samples in {len(plan.shards)} shards, batch {args.batch_size}, "
          f"{args.workers} loader workers, {args.threads} torch thread(s), {os.cpu_count()} cores")
    print(f"  raw webdataset tar iteration   {result['raw_samples_per_s']:>9.1f} samples/s")
    print(f"  stream (pair, decode, batch)   {result['stream_samples_per_s']:>9.1f} samples/s")
    print(f"  full student loader            {result['loader_samples_per_s']:>9.1f} samples/s")
    print(f"  tiny model train step          {result['train_step_samples_per_s']:>9.1f} samples/s")
    print(f"  loader / raw                   {result['loader_vs_raw']:>9.3f}   (target >= 0.8)")
    print(f"  loader / train step            {result['loader_vs_train_step']:>9.2f}   (> 1: keeps up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
