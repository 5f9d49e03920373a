"""Benchmark of ``sga label``: the whole job against the teacher's forward pass alone, in one run.

Same samples, same teacher, same thread count and memory set-up (``pipeline.heap``) for the teacher (one CPU
by default):

1. the teacher alone on pre-decoded batches (images decoded and phrases extracted beforehand), in this
   process: the ceiling for the job's throughput;
2. the whole job on a local Ray instance (a teacher actor plus a shard worker that reads, decodes, parses,
   matches and writes), on N samples and on ``--scale`` x N samples;
3. at scale x N, the teacher alone again while the job's shard work loops in a second process, its teacher
   answers replayed at the teacher's pace: how much sharing the machine with that work slows the teacher,
   apart from how well the job keeps it fed;
4. at scale x N, that shard work alone in this process, the answers replayed at once: its CPU per sample
   without a teacher on the other core (the job's figure adds what sharing the machine costs it).

(1) and (2) run in ``--repeats`` rounds, each job between two teacher-alone passes whose mean it is compared
with, and the figures are medians over rounds with every round's ratio printed: a shared host's speed drifts
by 10-20 % over minutes.

Printed: samples/s of both and their ratio (target >= 0.9) at N and at scale x N samples (a one-shard job
pays its start and end, when the teacher waits for the first batch and the last files, on few samples), the
non-teacher CPU cost in ms per sample per core (target <= 2), the job's peak memory (all actors) at N and
scale x N (target: flat, <= 1.2x), label bytes per sample (target <= 1 KB; on disk, and the JSON payload
without tar headers), and the teacher's busy fraction.

    .venv/bin/python benchmarks/bench_label.py --samples 250 --scale 10 --teacher tiny
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=250, help="N (samples of the small world)")
    p.add_argument("--scale", type=int, default=10, help="the large world has scale x N samples")
    p.add_argument("--repeats", type=int, default=3,
                   help="jobs at N and at scale x N, each between two teacher-alone passes (medians)")
    p.add_argument("--per-shard", type=int, default=250, help="samples per shard")
    p.add_argument("--teacher", default="tiny")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    p.add_argument("--shard-workers", type=int, help="shard worker actors (default: the job's sizing)")
    p.add_argument("--cpus-per-shard-worker", type=float, default=1.0)
    p.add_argument("--decode", default="worker", choices=("worker", "teacher"),
                   help="where the job decodes images (the teacher alone always gets decoded images)")
    p.add_argument("--score-floor", type=float, default=0.05)
    p.add_argument("--score-threshold", type=float, default=0.1)
    p.add_argument("--workdir", help="keeps the worlds between runs (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def world(root: Path, samples: int, per_shard: int) -> Path:
    from shards.synthetic.world import WorldConfig, build_world

    out = root / f"world-{samples}"
    if not (out / "world.json").exists():
        build_world(WorldConfig(samples=samples, samples_per_shard=per_shard, task_samples=0), str(out),
                    show_progress=False)
    return out


def teacher_alone(world_dir: Path, args, beside: tuple[dict, float] | None = None) -> tuple[dict, dict]:
    """Teacher ``ground`` over every sample with phrases, decoded and parsed beforehand (1 thread).

    With ``beside`` (an earlier pass's answers and grounded samples/s, see :class:`_ShardWorkProcess`), the
    job's shard work on the same world loops in a second process meanwhile, at that pace, so the teacher
    shares the machine as in the job.
    Returns the timing and this pass's answers, keyed by :func:`_answer_key`.
    """
    import torch

    from pipeline.phrases import PhraseExtractor
    from pipeline.validate import ValidationConfig, check_caption, check_image
    from shards.errors import SampleError
    from shards.images import iter_image_shard, list_shards
    from teacher.base import GroundingInput, load_teacher

    torch.set_num_threads(1)
    teacher = load_teacher(args.teacher, score_floor=args.score_floor)
    extractor = PhraseExtractor()
    images = str(world_dir / "images")
    decoded, total = [], 0
    for shard in list_shards(images):
        for s in iter_image_shard(images, shard):
            total += 1
            try:
                caption = check_caption(s.key, s.caption, ValidationConfig())
                decoded.append((check_image(s.key, s.status, s.jpg, s.error_message, ValidationConfig()),
                                caption))
            except SampleError:
                continue
    spans = extractor.extract([c for _, c in decoded])
    batch = [GroundingInput(img, c, sp) for (img, c), sp in zip(decoded, spans) if sp]
    teacher.ground(batch[: args.batch_size])      # warm-up, as the job's actors are warm
    worker = _ShardWorkProcess(world_dir, args, *beside) if beside is not None else None
    found = []
    try:
        start = time.perf_counter()
        for i in range(0, len(batch), args.batch_size):
            found.extend(teacher.ground(batch[i: i + args.batch_size]))
        seconds = time.perf_counter() - start
    finally:
        shard_samples = worker.stop() if worker is not None else None
    # Keyed after the clock stops: the timed loop is the teacher's work only.
    answers = {_answer_key(x.caption, x.spans): [(pb.boxes, pb.scores) for pb in phrases]
               for x, phrases in zip(batch, found)}
    result = {"samples": total, "grounded": len(batch), "seconds": seconds, "samples_per_s": total / seconds}
    if shard_samples is not None:
        result["shard_work_samples_per_s"] = shard_samples / seconds
    return result, answers


def _answer_key(caption: str, spans) -> tuple:
    return caption, tuple(tuple(span) for span in spans)


class _ReplayClient:
    """A teacher client answering from a finished pass's answers, no faster than ``per_s`` samples a second
    (the teacher's pace, which the job's shard work waits for), so only the shard work costs CPU."""

    local_cpu_s = 0.0

    def __init__(self, answers: dict, per_s: float):
        self.answers, self.per_s = answers, per_s
        self.due = time.perf_counter()

    def submit(self, batches: list):
        return [sample for batch in batches for sample in batch]

    def collect(self, samples: list) -> list:
        self.due = max(self.due, time.perf_counter()) + len(samples) / self.per_s
        time.sleep(max(0.0, self.due - time.perf_counter()))
        return [self.answers[_answer_key(caption, spans)] for _, caption, spans in samples]


def _replay_task(world_dir: Path, args, out: Path):
    """``(ShardTask, PhraseExtractor)`` of the job's shard work on ``world_dir``, writing under ``out``."""
    from pipeline.labeler import ShardTask
    from pipeline.phrases import PhraseExtractor
    from shards.labels import LabelSetInfo

    extractor = PhraseExtractor()
    info = LabelSetInfo("replay", "replay", extractor.extractor_id, args.score_floor, args.score_threshold)
    task = ShardTask(str(world_dir / "images"), str(world_dir / "regions"), str(out), info,
                     gt_uri=str(world_dir / "gt"), batch_size=args.batch_size, decode=args.decode)
    return task, extractor


def shard_work_alone(world_dir: Path, args, answers: dict) -> dict:
    """The job's shard work in this process with the teacher's answers replayed at once, the other core
    idle: the non-teacher CPU per sample of the code itself, without a teacher sharing the machine.
    The first shard warms up and is not counted."""
    from threadpoolctl import threadpool_limits

    from pipeline.labeler import label_shard
    from shards.images import list_shards

    out = Path(tempfile.mkdtemp(prefix="bench-shard-alone-"))
    try:
        task, extractor = _replay_task(world_dir, args, out)
        client, shards = _ReplayClient(answers, float("inf")), list_shards(str(world_dir / "images"))
        with threadpool_limits(1, user_api="blas"):
            stats = [label_shard(task, shard, extractor, client) for shard in shards]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    samples = sum(s["samples"] for s in stats[1:])
    return {"ms_per_sample": 1000 * sum(s["prep_cpu_s"] for s in stats[1:]) / max(samples, 1),
            "scoring_ms_per_sample": 1000 * sum(s["scoring_cpu_s"] for s in stats[1:]) / max(samples, 1)}


class _ShardWorkProcess:
    """The job's shard work (read, decode, parse, match, write; the teacher's answers replayed at its pace)
    looping over a world's shards in a forked process until stopped; it counts only after one warm shard."""

    def __init__(self, world_dir: Path, args, answers: dict, per_s: float):
        import multiprocessing

        context = multiprocessing.get_context("fork")    # the child inherits the answers, nothing is pickled
        self.ready, self.done = context.Event(), context.Event()
        self.samples = context.Value("q", 0)
        self.process = context.Process(target=self._loop, args=(world_dir, args, answers, per_s),
                                       daemon=True)
        self.process.start()
        while not self.ready.wait(1.0):
            if not self.process.is_alive():
                raise RuntimeError(f"the shard work process exited with {self.process.exitcode}")

    def _loop(self, world_dir: Path, args, answers: dict, per_s: float) -> None:
        from threadpoolctl import threadpool_limits

        from pipeline.labeler import label_shard
        from shards.images import list_shards

        threadpool_limits(1, user_api="blas")     # as the job's one-CPU shard worker
        out = Path(tempfile.mkdtemp(prefix="bench-shard-work-"))
        task, extractor = _replay_task(world_dir, args, out)
        client, shards = _ReplayClient(answers, per_s), list_shards(str(world_dir / "images"))
        try:
            for n, shard in enumerate(itertools.cycle(shards)):
                samples = label_shard(task, shard, extractor, client)["samples"]
                if n:
                    self.samples.value += samples
                self.ready.set()
                shutil.rmtree(out)             # the phrase cache and the extractor's memory: every pass
                out.mkdir()                    # parses its captions
                extractor.memo.clear()
                if self.done.is_set():
                    return
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def stop(self) -> int:
        """Stops the loop (after its current shard) and returns the samples it labelled while timed."""
        samples = self.samples.value
        self.done.set()
        self.process.join()
        return samples


def label_payload_bytes(labelset: str) -> tuple[int, int]:
    """(label JSON bytes, labelled samples) over a label set's tars."""
    from shards.labels import label_shard_uri, list_label_shards
    from shards.tario import iter_tar

    payload = samples = 0
    for shard in list_label_shards(labelset):
        for sample in iter_tar(label_shard_uri(labelset, shard)):
            payload += sum(len(v) for v in sample.members.values())
            samples += 1
    return payload, samples


def whole_job(world_dir: Path, out: Path, args) -> dict:
    from pipeline.heap import peak_rss_mb
    from pipeline.job import run_label_job
    from pipeline.plan import LabelJobConfig

    config = LabelJobConfig(images=str(world_dir / "images"), regions=str(world_dir / "regions"),
                            out=str(out), gt=str(world_dir / "gt"), teacher=args.teacher,
                            num_cpus=args.num_cpus, shard_workers=args.shard_workers,
                            cpus_per_shard_worker=args.cpus_per_shard_worker, decode=args.decode,
                            batch_size=args.batch_size, score_floor=args.score_floor,
                            score_threshold=args.score_threshold)
    summary = run_label_job(config)
    payload, labelled = label_payload_bytes(summary["labels"])
    summary["payload_bytes_per_sample"] = payload / max(labelled, 1)
    summary["driver_peak_rss_mb"] = peak_rss_mb()
    return summary


def bracketed(world_dir: Path, root: Path, tag: str, args) -> list[tuple[dict, dict]]:
    """``args.repeats`` jobs on ``world_dir``, each between two teacher-alone passes (alone, job, alone, job,
    ..., alone): ``(alone, job)`` per job, ``alone`` timed as the mean of its two neighbours.

    This host's speed drifts by 10-20 % over minutes; against the passes on both sides of it, a job's ratio
    cancels a steady drift instead of measuring it.
    """
    alone = [teacher_alone(world_dir, args)[0]]
    pairs = []
    for r in range(args.repeats):
        job = whole_job(world_dir, root / f"labels-{tag}-{r}", args)
        alone.append(teacher_alone(world_dir, args)[0])
        seconds = statistics.mean(a["seconds"] for a in alone[-2:])
        reference = {**alone[-1], "seconds": seconds, "samples_per_s": alone[-1]["samples"] / seconds}
        pairs.append((reference, job))
    return pairs


def run_rounds(args, small: Path, large: Path, root: Path) -> list[dict]:
    """``args.repeats`` rounds of (teacher alone, job) at N and at scale x N (see :func:`bracketed`)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    at_n, at_10n = bracketed(small, root, f"{stamp}-n", args), bracketed(large, root, f"{stamp}-10n", args)
    return [{"alone_n": an, "job_n": jn, "alone_10n": a10, "job_10n": j10}
            for (an, jn), (a10, j10) in zip(at_n, at_10n)]


def summarise(rounds: list[dict], beside_10n: dict, args) -> dict:
    """Medians over rounds (the per-round values alongside) of every figure the issue asks for."""
    def per_round(fn) -> list[float]:
        return [fn(r) for r in rounds]

    def med(fn) -> float:
        return statistics.median(per_round(fn))

    def actors(job) -> float:
        return job["peak_rss_mb"]["actors"]

    ratio_n = per_round(lambda r: r["job_n"]["samples_per_s"] / r["alone_n"]["samples_per_s"])
    ratio_10n = per_round(lambda r: r["job_10n"]["samples_per_s"] / r["alone_10n"]["samples_per_s"])
    rss_ratio = per_round(lambda r: actors(r["job_10n"]) / actors(r["job_n"]))
    last = rounds[-1]

    def teacher_ms(kind: str) -> float:
        """Median teacher ms per grounded sample: alone (its pass's seconds) or in the job (busy seconds)."""
        key = "seconds" if kind.startswith("alone") else "teacher_busy_s"
        return med(lambda r: 1000 * r[kind][key] / r[kind]["grounded"])
    return {
        "teacher": last["job_n"]["teacher"], "samples": args.samples, "scale": args.scale,
        "rounds": len(rounds),
        "teacher_alone_samples_per_s": med(lambda r: r["alone_n"]["samples_per_s"]),
        "job_samples_per_s": med(lambda r: r["job_n"]["samples_per_s"]),
        "ratio_job_to_teacher": statistics.median(ratio_n), "ratio_job_to_teacher_by_round": ratio_n,
        "teacher_alone_samples_per_s_10n": med(lambda r: r["alone_10n"]["samples_per_s"]),
        "job_10n_samples_per_s": med(lambda r: r["job_10n"]["samples_per_s"]),
        "ratio_job_to_teacher_10n": statistics.median(ratio_10n),
        "ratio_job_to_teacher_10n_by_round": ratio_10n,
        "job_end_to_end_samples_per_s": med(lambda r: r["job_n"]["samples"] / r["job_n"]["wall_s"]),
        "non_teacher_ms_per_sample_per_core": med(lambda r: r["job_n"]["prep_ms_per_sample"]),
        "non_teacher_ms_per_sample_per_core_10n": med(lambda r: r["job_10n"]["prep_ms_per_sample"]),
        "ground_truth_scoring_ms_per_sample_10n": med(lambda r: r["job_10n"]["scoring_ms_per_sample"]),
        # What a job on real data (no hidden truth to score against) pays per sample besides the teacher.
        "non_teacher_ms_per_sample_per_core_10n_without_scoring":
            med(lambda r: r["job_10n"]["prep_ms_per_sample"] - r["job_10n"]["scoring_ms_per_sample"]),
        "non_teacher_ms_per_sample_per_core_10n_by_round":
            per_round(lambda r: r["job_10n"]["prep_ms_per_sample"]),
        "teacher_busy_fraction": med(lambda r: r["job_n"]["teacher_busy_fraction"]),
        "teacher_busy_fraction_10n": med(lambda r: r["job_10n"]["teacher_busy_fraction"]),
        # The ratio's two factors: idle teacher (busy fraction) and a slower teacher (per-sample time in the
        # job's actor against alone).
        "teacher_ms_per_grounded_sample_alone": teacher_ms("alone_n"),
        "teacher_ms_per_grounded_sample_job": teacher_ms("job_n"),
        "teacher_ms_per_grounded_sample_alone_10n": teacher_ms("alone_10n"),
        "teacher_ms_per_grounded_sample_job_10n": teacher_ms("job_10n"),
        # What sharing the cores costs the teacher: alone, but with the job's shard work looping beside it.
        "teacher_ms_per_grounded_sample_beside_shard_work_10n":
            1000 * beside_10n["seconds"] / beside_10n["grounded"],
        "shard_work_samples_per_s_beside_teacher_10n": beside_10n["shard_work_samples_per_s"],
        "peak_rss_mb_n": med(lambda r: actors(r["job_n"])),
        "peak_rss_mb_10n": med(lambda r: actors(r["job_10n"])),
        "peak_rss_ratio_10n_to_n": statistics.median(rss_ratio),
        "peak_rss_ratio_10n_to_n_by_round": rss_ratio,
        "peak_rss_mb_by_actor_n": last["job_n"]["peak_rss_mb"],
        "peak_rss_mb_by_actor_10n": last["job_10n"]["peak_rss_mb"],
        "teacher_heap_trims_10n": last["job_10n"].get("teacher_heap_trims"),
        "label_bytes_per_sample_on_disk": last["job_10n"]["label_bytes_per_sample"],
        "label_payload_bytes_per_sample": last["job_10n"]["payload_bytes_per_sample"],
        "precision": last["job_10n"].get("precision"), "recall": last["job_10n"].get("recall"),
        "cpus": args.num_cpus, "batch_size": args.batch_size,
        "teachers": last["job_n"]["teachers"], "shard_workers_10n": last["job_10n"]["shard_workers"],
        "decode": args.decode,
    }


def main(argv=None) -> int:
    from pipeline.heap import steady_teacher_memory

    args = parse_args(argv)
    os.environ.setdefault("SGA_PROGRESS", "0")
    # The teacher alone runs in this process as in the job's teacher actor (the forked shard work inherits).
    steady_teacher_memory()
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-label-"))
    root.mkdir(parents=True, exist_ok=True)
    small = world(root, args.samples, args.per_shard)
    large = world(root, args.samples * args.scale, args.per_shard)
    # Before any job: the shard work is forked from this process, which must not hold a Ray driver yet.
    alone_10n, answers = teacher_alone(large, args)
    beside_10n, _ = teacher_alone(large, args, beside=(answers, alone_10n["grounded"] / alone_10n["seconds"]))
    quiet = shard_work_alone(large, args, answers)
    result = summarise(run_rounds(args, small, large, root), beside_10n, args)
    # The code's own cost, apart from what sharing two cores with the teacher adds to it in the job.
    result["non_teacher_ms_per_sample_per_core_10n_other_core_idle"] = quiet["ms_per_sample"]
    result["non_teacher_ms_per_sample_per_core_10n_other_core_idle_without_scoring"] = (
        quiet["ms_per_sample"] - quiet["scoring_ms_per_sample"])
    result["workdir"] = str(root)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        width = max(len(k) for k in result)
        for key, value in result.items():
            if isinstance(value, list):
                value = " ".join(f"{v:.4g}" for v in value)
            print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
