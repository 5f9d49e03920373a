"""The ``sga label`` driver: plan, start Ray and the actors, hand out shards, collect, summarise.

Shards are handed out dynamically, at most two per shard worker at a time (one running, one queued so the
worker never waits for the driver). A finished job reruns as a no-op without starting Ray at all: planning
reads only the markers. A shard whose worker gave up (the teacher failed on all of it, or the actor died
more often than its retries) is reported under ``shards_failed`` and has no marker, so a rerun retries it.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

from shards import fs
from shards.errors import SgaError
from shards.images import shard_uris
from shards.progress import progress

from . import teacher_id
from .labelsets import JOB_NAME, marker_totals, top_errors
from .plan import JobPlan, LabelJobConfig, check_job, clean_partial, plan_job
from .worker import SHARDS_IN_FLIGHT, LabelActors, TeacherSpec, await_teachers, await_workers, launch

POLL_S = 0.5


@dataclass
class Resources:
    teachers: int
    shard_workers: int


def size_workers(config: LabelJobConfig, cpus: float, gpus: float, pending: int) -> Resources:
    """Teacher and shard-worker counts for a cluster with ``cpus``/``gpus``, unless the config fixes them.

    With GPUs: one teacher per ``gpus_per_worker`` and the remaining CPUs to shard workers. On CPUs only:
    about one shard worker per 8 CPUs and the rest to teachers (the teacher is the expensive part).
    """
    if config.gpus_per_worker > 0:
        teachers = config.workers or int(gpus // config.gpus_per_worker)
        if teachers < 1:
            raise SgaError(f"--gpus-per-worker {config.gpus_per_worker} but the Ray cluster has {gpus:g} "
                           "GPUs; pass --gpus-per-worker 0 to run teachers on CPUs")
        spare = cpus - teachers * config.cpus_per_worker
        shard_workers = config.shard_workers or max(1, int(spare // config.cpus_per_shard_worker))
    else:
        shard_workers = config.shard_workers or max(1, round(cpus / 8))
        spare = cpus - shard_workers * config.cpus_per_shard_worker
        teachers = config.workers or max(1, int(spare // config.cpus_per_worker))
    return Resources(teachers=teachers, shard_workers=max(1, min(shard_workers, pending)))


def local_cpus() -> int:
    """CPUs this process may use (its affinity mask, which containers and taskset narrow)."""
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@contextlib.contextmanager
def ray_session(config: LabelJobConfig):
    """Use the running Ray instance, connect to ``config.address`` (else ``$RAY_ADDRESS``), or start a local
    one sized to this machine; shut down only what this call started.

    The local instance is asked for by name (``address="local"``): left to itself, ``ray.init()`` joins a
    cluster that ``ray start`` left running on this machine, which the job did not ask for, and refuses the
    ``num_cpus`` that sizes a local instance.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=config.num_cpus or local_cpus(), include_dashboard=False,
                 logging_level="WARNING", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def expected_samples(images: str, shards: list[str]) -> int | None:
    """Total rows of ``shards`` from img2dataset's stats files, or None when any is missing."""
    total = 0
    for shard in shards:
        try:
            total += int(fs.read_json(shard_uris(images, shard)["stats"])["count"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None
    return total


def run_shards(plan: JobPlan, config: LabelJobConfig, actors: LabelActors) -> dict[str, Any]:
    """Label ``plan.pending`` with the job's actors; returns this run's metrics."""
    import ray

    await_workers(actors)
    workers, teachers, counter = actors.workers, actors.teachers, actors.progress
    queue = deque(plan.pending)
    inflight: dict[Any, tuple[str, int]] = {}
    load = [0] * len(workers)
    done_stats: list[dict] = []
    finished = 0                       # samples of the shards done (the progress actor counts the others)
    failed: dict[str, str] = {}
    quiet = {} if config.show_progress else {"disable": True}
    shard_bar = progress(total=len(plan.pending), desc="shards", unit="shard", position=0, **quiet)
    sample_bar = progress(total=expected_samples(config.images, plan.pending), desc="samples", unit="sample",
                          position=1, **quiet)
    before = ray.get([t.stats.remote() for t in teachers])
    start = time.perf_counter()
    try:
        while queue or inflight:
            for i in range(len(workers)):
                while queue and load[i] < SHARDS_IN_FLIGHT:
                    shard = queue.popleft()
                    inflight[workers[i].label.remote(plan.task, shard)] = (shard, i)
                    load[i] += 1
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=POLL_S)
            for ref in ready:
                shard, i = inflight.pop(ref)
                load[i] -= 1
                try:
                    done_stats.append(ray.get(ref))
                    finished += done_stats[-1]["samples"]
                except ray.exceptions.RayError as exc:
                    failed[shard] = _reason(exc)
                shard_bar.update(1)
            running = ray.get(counter.value.remote([shard for shard, _ in inflight.values()]))
            sample_bar.update(finished + running - sample_bar.n)
        wall = time.perf_counter() - start
        after = ray.get([t.stats.remote() for t in teachers])
        worker_stats = ray.get([w.stats.remote() for w in workers])
    finally:
        shard_bar.close()
        sample_bar.close()
    samples = sum(s["samples"] for s in done_stats)
    # A restarted teacher starts counting from zero again: clamp so it never subtracts.
    busy = sum(max(a["busy_s"] - (b["busy_s"] if a["pid"] == b["pid"] else 0), 0)
               for a, b in zip(after, before))
    return {
        "shards_labeled": len(done_stats), "shards_failed": failed, "samples_labeled": samples,
        "seconds": wall, "samples_per_s": samples / wall if wall > 0 else None,
        "teachers": len(teachers), "shard_workers": len(workers),
        "teacher_busy_fraction": busy / (wall * len(teachers)) if wall > 0 else None,
        "teacher_busy_s": busy,
        "prep_ms_per_sample": 1000 * sum(s["prep_cpu_s"] for s in done_stats) / max(samples, 1),
        # Part of prep: scoring M against a synthetic world's hidden truth (--gt), which real data lacks.
        "scoring_ms_per_sample": 1000 * sum(s["scoring_cpu_s"] for s in done_stats) / max(samples, 1),
        # Per kind, the largest actor's peak; "actors": the sum over every actor, the job's footprint.
        "peak_rss_mb": {"teacher": max(t["peak_rss_mb"] for t in after),
                        "shard_worker": max(w["peak_rss_mb"] for w in worker_stats),
                        "actors": sum(a["peak_rss_mb"] for a in [*after, *worker_stats])},
        "teacher_heap_trims": sum(t["heap_trims"] for t in after),
    }


def _reason(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    return f"{type(cause or exc).__name__}: {cause or exc}".splitlines()[0][:300]


def summarise(plan: JobPlan, run: dict[str, Any], start: float) -> dict[str, Any]:
    """The job's summary: the whole label set's totals (skipped shards included) and this run's metrics."""
    totals = marker_totals(plan.task.labelset_uri, plan.shards)
    rate = totals["errors"] / totals["samples"] if totals["samples"] else 0.0
    return {
        "labels": plan.task.labelset_uri, "labelset_id": plan.task.info.labelset_id,
        "teacher": plan.teacher_name, "teacher_fingerprint": plan.task.info.teacher_fingerprint,
        "shards": len(plan.shards), "shards_done": totals["shards_done"],
        "shards_skipped": len(plan.shards) - len(plan.pending),
        **{k: totals[k] for k in ("samples", "ok", "errors", "grounded", "phrases", "positives")},
        "error_rate": rate, "error_stages": totals["error_stages"],
        "top_errors": top_errors(plan.task.labelset_uri) if totals["errors"] else [],
        "label_bytes_per_sample": totals["label_bytes"] / max(totals["ok"], 1),
        **{k: totals[k] for k in ("precision", "recall") if k in totals},
        **run,
        "wall_s": time.perf_counter() - start,
    }


def run_label_job(config: LabelJobConfig) -> dict[str, Any]:
    """Check, plan, label what is pending, and summarise the whole label set.

    With the teacher's fingerprint in ``OUT/_teachers.json`` the plan is made before Ray starts, and a job
    with nothing pending never starts it. Otherwise the teacher actors report the fingerprint first.
    """
    start = time.perf_counter()
    checked = check_job(config)
    key = teacher_id.cache_key(config.teacher, config.teacher_device, config.score_floor, config.top_k)
    known = teacher_id.lookup(config.out, key)
    plan = plan_job(config, checked, known["name"], known["fingerprint"]) if known else None
    idle = {"shards_labeled": 0, "shards_failed": {}, "samples_labeled": 0}
    if plan is not None and not plan.pending:
        return check_outcome(plan, config, summarise(plan, idle, start))
    with ray_session(config):
        import ray

        resources = ray.cluster_resources()
        sized = size_workers(config, resources.get("CPU", 0), resources.get("GPU", 0),
                             len(plan.pending if plan is not None else checked.shards))
        spec = TeacherSpec(config.teacher, config.teacher_device, config.score_floor, config.top_k)
        prefix = f"sga-label-{uuid.uuid4().hex[:8]}"
        actors = launch(spec, config.phrases, sized.teachers, config.cpus_per_worker, config.gpus_per_worker,
                        sized.shard_workers, config.cpus_per_shard_worker, prefix)
        try:
            ident = await_teachers(actors, spec)
            teacher_id.record(config.out, key, ident["name"], ident["fingerprint"])
            if known != ident:
                plan = plan_job(config, checked, ident["name"], ident["fingerprint"])
            run = run_shards(plan, config, actors) if plan.pending else idle
        finally:
            actors.kill()
        clean_partial(plan.task)
    return check_outcome(plan, config, summarise(plan, run, start))


def check_outcome(plan: JobPlan, config: LabelJobConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """Record lost shards in ``job.json`` (so ``sga labels ls`` says failed) and raise :class:`JobFailed`
    when a shard was lost whole or the label set's error rate exceeds ``config.max_error_rate``."""
    from shards.errors import JobFailed

    job_uri = fs.join(plan.task.labelset_uri, JOB_NAME)
    failed = summary.get("shards_failed") or {}
    fs.write_json(job_uri, {**fs.read_json(job_uri), "shards_failed": failed})
    if failed:
        shard, reason = next(iter(failed.items()))
        raise JobFailed(f"{len(failed)} shard(s) failed whole (e.g. {shard}: {reason}); fix the cause and "
                        "rerun to retry them", summary)
    if summary["error_rate"] > config.max_error_rate:
        top = summary["top_errors"][0]
        raise JobFailed(f"{summary['errors']} of {summary['samples']} samples rejected (error rate "
                        f"{summary['error_rate']:.2f} > --max-error-rate {config.max_error_rate}); "
                        f"commonest: {top['stage']}: {top['reason']} ({top['count']}); see top_errors in the "
                        f"summary and the manifests under {plan.task.labelset_uri}", summary)
    return summary
