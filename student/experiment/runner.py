"""Run the whole experiment: prepare the data, run the grid's units on worker processes, write the report.

Units (one student and its fine-tunings, :mod:`.plan`) go to ``cfg.jobs`` spawned processes with one
torch thread each, longest first. A failed unit does not stop the others; its finished cells are kept,
the report is written from what exists, and the command then fails naming the unit, so a rerun resumes.
"""

from __future__ import annotations

import dataclasses
import datetime
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from shards import fs
from shards.errors import SgaError
from shards.progress import progress

from .config import ExperimentConfig, fingerprint, teacher_signature
from .plan import Unit, build_plan
from .report import collect_rows, write_report
from .stages import cell_path, prepare, run_unit, worker_env

INVOCATIONS = "invocations.json"


def _pending(units: list[Unit], cfg: ExperimentConfig, work: str) -> list[tuple[Unit, int]]:
    out = []
    for unit in units:
        missing = sum(not fs.exists(cell_path(work, c.cell_id(cfg))) for c in unit.cells)
        if missing:
            out.append((unit, missing))
    return out


def run_units(units: list[Unit], cfg: ExperimentConfig, record: dict[str, Any], work: str,
              show_progress: bool) -> dict[str, str]:
    """Run what is missing; returns ``{run_id: error}`` for the units that failed."""
    pending = _pending(units, cfg, work)
    bar = progress(total=sum(n for _, n in pending), desc="sga experiment", unit="cell",
                   **({} if show_progress else {"disable": True}))
    failures: dict[str, str] = {}
    if cfg.jobs <= 1:
        for unit, _ in pending:
            try:
                bar.update(len(run_unit(unit, cfg, record, work)))
            except Exception as exc:  # one failed student must not stop the grid
                failures[unit.spec.run_id(cfg)] = f"{type(exc).__name__}: {exc}"
        bar.close()
        return failures
    worker_env()
    with ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_unit, unit, cfg, record, work): unit for unit, _ in pending}
        for future in as_completed(futures):
            unit = futures[future]
            try:
                bar.update(len(future.result()))
            except Exception as exc:  # reported below; finished cells are kept
                failures[unit.spec.run_id(cfg)] = f"{type(exc).__name__}: {exc}"
                print(f"sga experiment: {unit.spec.run_id(cfg)} failed: {exc}", file=sys.stderr)
    bar.close()
    return failures


def log_invocation(work: str, plan_id: str, started: str, wall_s: float, cells_run: int) -> list[dict]:
    """Append this invocation to ``WORK/invocations.json``; returns the entries of the same plan.

    The report sums their wall time, so a run resumed three times still states what the whole grid took.
    """
    uri = fs.join(work, INVOCATIONS)
    entries = fs.read_json(uri) if fs.exists(uri) else []
    entries.append({"plan": plan_id, "started": started, "wall_s": round(wall_s, 1), "cells_run": cells_run})
    fs.write_json(uri, entries)
    return [e for e in entries if e["plan"] == plan_id]


def run_experiment(cfg: ExperimentConfig, out: str, work: str, show_progress: bool = True) -> dict[str, Any]:
    """Prepare, run every missing cell, write ``OUT/RESULTS.md``, CSVs and plots; returns a summary."""
    start, started = time.perf_counter(), datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    cfg = dataclasses.replace(cfg, teacher_signature=teacher_signature(cfg.teacher))
    record = prepare(cfg, work, show_progress)
    units = build_plan(cfg)
    before = len(collect_rows(units, cfg, work))
    failures = run_units(units, cfg, record, work, show_progress)
    rows = collect_rows(units, cfg, work)
    plan_id = fingerprint(sorted(c.cell_id(cfg) for u in units for c in u.cells))
    history = log_invocation(work, plan_id, started, time.perf_counter() - start, len(rows) - before)
    summary = write_report(cfg, out, rows, record, units, work, history)
    if failures:
        detail = "; ".join(f"{k}: {v}" for k, v in failures.items())
        raise SgaError(f"{len(failures)} student(s) failed ({detail}); the report in {out} covers the "
                       "finished cells. Rerun the same command to resume")
    return summary
