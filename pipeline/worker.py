"""Ray actors of the labeling job: teachers that load their weights once, and shard workers that feed them.

- :class:`TeacherActor` holds one teacher (one per GPU, or per CPU slot) for the whole job and answers
  ``ground(batches)`` calls; it counts the seconds it spends inside the teacher so the driver can report how
  busy the teachers were. Its process keeps its heap between batches and runs oneDNN without a primitive
  cache (``pipeline.heap``: a fresh process spent 10-15 % of the teacher's time faulting memory back in).
- :class:`ShardActor` holds the spaCy pipeline and runs :func:`pipeline.labeler.label_shard` for one shard
  per call, sending its batches round-robin to the teacher actors (``batches_per_call`` per actor call), at
  most ``max_inflight`` at a time. It runs ``SHARDS_IN_FLIGHT`` calls in threads, one reading and submitting
  at a time (``prep_lock``), so the next shard feeds the teachers while the last one drains and writes its
  files.
- :class:`ProgressActor` counts each running shard's finished samples for the driver's progress bar.

Both kinds of actors restart when their process or node dies (``max_restarts=-1``); a call in flight is
retried on the restarted actor a few times (``max_task_retries``), so a killed worker or a lost node costs
only the shard it was on, which is redone from scratch (its files are atomic and its marker is written
last). An input that kills the teacher process every time runs out of retries and becomes a ``teacher``
error row instead of stalling the job.
"""

from __future__ import annotations

import gc
import itertools
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from shards.errors import SgaError

from .heap import HeapTrimmer, keep_heap, peak_rss_mb, steady_teacher_memory
from .labeler import ShardTask, ground_plain, label_shard
from .phrases import PhraseConfig, PhraseExtractor

MAX_TASK_RETRIES = 3
SHARDS_IN_FLIGHT = 2   # shard calls a shard worker runs at once (threads; see label_shard's prep_lock)


def _threads(num_cpus: float) -> int:
    """Compute threads for an actor holding ``num_cpus`` logical CPUs (at least one)."""
    return max(1, int(num_cpus))


def _own_cpus(num_cpus: float) -> None:
    """Give torch and numpy's BLAS (spaCy's matrix products) only the threads of the actor's CPUs: two
    processes each spreading over every core of a small machine ran several times slower than one each."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(_threads(num_cpus))
    threadpool_limits(_threads(num_cpus), user_api="blas")


@dataclass
class TeacherSpec:
    """How teacher actors build their teacher (``teacher.base.load_teacher`` arguments)."""

    spec: str
    device: str
    score_floor: float
    top_k: int


class TeacherActor:
    """One teacher for the job's lifetime; ``ground`` is ``Teacher.ground`` plus busy-time accounting."""

    def __init__(self, spec: TeacherSpec, num_cpus: float):
        from teacher.base import load_teacher

        _own_cpus(num_cpus)
        self.heap_kept = steady_teacher_memory()
        self.teacher = load_teacher(spec.spec, device=spec.device, score_floor=spec.score_floor,
                                    top_k=spec.top_k)
        self.busy_s = 0.0
        self.calls = 0
        self.samples = 0
        self.started = time.perf_counter()
        self.heap = HeapTrimmer()

    def ready(self) -> dict[str, str]:
        return {"name": self.teacher.name, "fingerprint": self.teacher.fingerprint}

    def ground(self, batches: list[list[tuple]]) -> tuple[np.ndarray, ...]:
        """:func:`pipeline.labeler.ground_plain` on each batch of ``(image, caption, spans)`` tuples, the
        answers of all of them packed (:func:`pack_answers`)."""
        start = time.perf_counter()
        try:
            return pack_answers([answer for batch in batches for answer in ground_plain(self.teacher, batch)])
        finally:
            self.calls += 1
            self.heap.after_call()
            self.busy_s += time.perf_counter() - start
            self.samples += sum(len(batch) for batch in batches)

    def stats(self) -> dict[str, Any]:
        return {"busy_s": self.busy_s, "alive_s": time.perf_counter() - self.started, "calls": self.calls,
                "samples": self.samples, "peak_rss_mb": peak_rss_mb(), "heap_trims": self.heap.trims,
                "heap_kept": self.heap_kept, "pid": os.getpid()}


def pack_answers(answers: list[list[tuple[np.ndarray, np.ndarray]]]) -> tuple[np.ndarray, ...]:
    """A call's answers (``[sample][phrase] -> (boxes [K, 4], scores [K])``) as four arrays for the trip
    from a teacher actor: ``phrases`` int64 ``[S]`` (phrases per sample), ``counts`` int64 ``[P]`` (boxes per
    phrase), ``boxes`` float32 ``[B, 4]``, ``scores`` float32 ``[B]`` (float32 is what the labels store).

    Ray pickles every array of an answer separately, at both ends: for 16 samples of 3 phrases, packing cut
    the caller's CPU per call from 1.2-1.4 to 0.7-0.8 ms and the round trip from 4.6-5.6 to 3.0-3.6 ms, time
    the teacher's process spends between batches. A phrase whose boxes and scores disagree in length is a
    ``ValueError`` here, so it fails its batch like any other teacher error.
    """
    phrases = [len(sample) for sample in answers]
    flat = [(np.asarray(b, np.float32).reshape(-1, 4), np.asarray(s, np.float32).reshape(-1))
            for sample in answers for b, s in sample]
    if any(len(b) != len(s) for b, s in flat):
        raise ValueError(f"teacher answered boxes and scores of different lengths: "
                         f"{[(len(b), len(s)) for b, s in flat]}")
    counts = np.asarray([len(s) for _, s in flat], np.int64)
    boxes = np.concatenate([b for b, _ in flat]) if flat else np.zeros((0, 4), np.float32)
    scores = np.concatenate([s for _, s in flat]) if flat else np.zeros(0, np.float32)
    return np.asarray(phrases, np.int64), counts, boxes, scores


def unpack_answers(packed: tuple[np.ndarray, ...]) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """The inverse of :func:`pack_answers` (each phrase's arrays are views of the packed ones)."""
    phrases, counts, boxes, scores = packed
    ends = np.cumsum(counts).tolist()
    pairs = [(boxes[end - n: end], scores[end - n: end]) for end, n in zip(ends, counts.tolist())]
    sample_ends = np.cumsum(phrases).tolist()
    return [pairs[end - n: end] for end, n in zip(sample_ends, phrases.tolist())]


class RayTeacherClient:
    """Sends calls round-robin over teacher actors; ``collect`` is ``ray.get`` of the packed answers,
    unpacked."""

    local_cpu_s = 0.0

    def __init__(self, teachers: list, offset: int = 0):
        self._next = itertools.cycle(teachers[offset % len(teachers):] + teachers[:offset % len(teachers)])

    def submit(self, batches: list[list]) -> Any:
        return next(self._next).ground.remote(batches)

    def collect(self, token: Any) -> list[list]:
        return unpack_answers(ray.get(token))


class ShardActor:
    """Labels one shard per call, ``SHARDS_IN_FLIGHT`` calls at once in threads that take turns reading and
    submitting (``prep_lock``); holds the spaCy pipeline so it loads once."""

    def __init__(self, phrase_config: PhraseConfig, teacher_names: list[str], num_cpus: float, index: int,
                 progress_name: str | None = None):
        _own_cpus(num_cpus)
        keep_heap()
        self.extractor = PhraseExtractor(phrase_config)
        # Actors are found by name rather than passed as handles: a restarted actor re-runs this
        # constructor, and plain strings, unlike handles, never depend on objects that may be gone.
        self.client = RayTeacherClient([ray.get_actor(n) for n in teacher_names], offset=index)
        self.progress = ray.get_actor(progress_name) if progress_name else None
        # Pay one-off costs (spaCy's first batch, lazy imports) now, not inside the first shard's timing.
        self.extractor.extract(["a warm-up caption with a noun phrase"])
        import PIL.Image  # noqa: F401
        self.prep_lock = threading.Lock()
        self.stats_lock = threading.Lock()
        self.shards = 0
        self.cpu_s = 0.0
        # What is loaded by now (spaCy, Ray, pyarrow: ~260k objects) lives as long as the actor; frozen, the
        # full collections a shard's allocations trigger skip it: 0.16-0.17 CPU-s per 2,500-sample job less.
        gc.freeze()

    def ready(self) -> bool:
        return True

    def label(self, task: ShardTask, shard: str) -> dict[str, Any]:
        done = 0

        def report(n: int) -> None:
            nonlocal done
            done += n
            if self.progress is not None and n:
                self.progress.set.remote(shard, done)

        stats = label_shard(task, shard, self.extractor, self.client, on_progress=report,
                            prep_lock=self.prep_lock)
        with self.stats_lock:
            self.shards += 1
            self.cpu_s += stats["prep_cpu_s"]
        return stats

    def stats(self) -> dict[str, Any]:
        return {"shards": self.shards, "prep_cpu_s": self.cpu_s, "peak_rss_mb": peak_rss_mb(),
                "pid": os.getpid()}


class ProgressActor:
    """Samples finished so far in each shard being labelled, for the driver's progress bar.

    A shard worker sets its shard's count rather than adding to a total: a shard redone after its worker died
    starts again from zero, so its samples are never counted twice. The driver asks only about the shards it
    is still waiting for and counts finished ones from their results.
    """

    def __init__(self):
        self.done: dict[str, int] = {}

    def set(self, shard: str, n: int) -> None:
        self.done[shard] = n

    def value(self, shards: list[str]) -> int:
        return sum(self.done.get(shard, 0) for shard in shards)


@dataclass
class LabelActors:
    """The actors of one job: named teachers, shard workers and the progress counter."""

    teacher_names: list[str]
    teachers: list
    workers: list
    progress: Any

    def kill(self) -> None:
        for actor in [*self.workers, *self.teachers, self.progress]:
            ray.kill(actor)


def launch(spec: TeacherSpec, phrase_config: PhraseConfig, teachers: int, teacher_cpus: float,
           teacher_gpus: float, workers: int, worker_cpus: float, prefix: str) -> LabelActors:
    """Create every actor of a job at once (their slow imports and model loads overlap); nothing waits.

    Teachers are named ``{prefix}-teacher-{i}`` so shard workers find them by name.
    """
    names = [f"{prefix}-teacher-{i}" for i in range(teachers)]
    teacher_cls = ray.remote(TeacherActor)
    teacher_handles = [teacher_cls.options(name=n, num_cpus=teacher_cpus, num_gpus=teacher_gpus,
                                           max_restarts=-1, max_task_retries=MAX_TASK_RETRIES)
                       .remote(spec, teacher_cpus) for n in names]
    progress_name = f"{prefix}-progress"
    counter = ray.remote(ProgressActor).options(name=progress_name, num_cpus=0, max_restarts=-1,
                                                max_task_retries=-1).remote()
    worker_cls = ray.remote(ShardActor).options(num_cpus=worker_cpus, max_restarts=-1,
                                                max_task_retries=MAX_TASK_RETRIES,
                                                max_concurrency=SHARDS_IN_FLIGHT)
    worker_handles = [worker_cls.remote(phrase_config, names, worker_cpus, i, progress_name)
                      for i in range(workers)]
    return LabelActors(names, teacher_handles, worker_handles, counter)


def await_teachers(actors: LabelActors, spec: TeacherSpec) -> dict[str, str]:
    """The ``{"name", "fingerprint"}`` every teacher actor loaded, once all have loaded.

    Every actor must report the same fingerprint: a node holding other weights at the same path would
    silently mix two teachers in one label set. A teacher that fails to load is an :class:`SgaError`.
    """
    try:
        found = ray.get([a.ready.remote() for a in actors.teachers])
    except ray.exceptions.RayError as exc:
        cause = getattr(exc, "cause", None) or exc
        raise SgaError(f"teacher {spec.spec!r} failed to load on a Ray worker: {cause}") from exc
    prints = sorted({f["fingerprint"] for f in found})
    if len(prints) > 1:
        raise SgaError(f"Ray workers loaded teacher {spec.spec!r} with different fingerprints {prints}; "
                       "install the same teacher on every node")
    return found[0]


def await_workers(actors: LabelActors) -> None:
    """Return once every shard worker has loaded spaCy and found its teachers."""
    ray.get([a.ready.remote() for a in actors.workers])
