"""The teacher processes' memory set-up (``pipeline.heap``): each behaviour checked in a fresh interpreter,
where glibc's and oneDNN's defaults are still in force."""

from __future__ import annotations

import platform

import pytest
from pipeline_fixtures import run_fresh

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A teacher's batches in miniature: 32 arrays of 0.9 MB, all freed at the end of each round. One 1 MB array
# freed first makes glibc's default thresholds deterministic (mmap 1 MB, trim 2 MB), as a teacher's first
# batch does. Printed: the minor page faults per round once warm.
BATCHES = """
import json, resource, sys
import numpy as np
from pipeline.heap import keep_heap
kept = keep_heap() if sys.argv[1] == "kept" else None
np.ones(125_000).sum()
def batch():
    blocks = [np.ones(110_000) for _ in range(32)]
    return sum(len(b) for b in blocks)
for _ in range(3):
    batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    batch()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
print(json.dumps({"kept": kept, "faults": faults}))
"""

# Small convolutions over 81 input sizes, as a teacher's batches padded to new sizes: how much the resident
# set grows (oneDNN's primitive cache compiles and keeps primitives per shape).
SHAPES = """
import json, os
from pipeline.heap import resident_mb, steady_teacher_memory
steady_teacher_memory()
import torch
torch.set_num_threads(1)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, 2, 1),
                          torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, 2, 1))
with torch.inference_mode():
    net(torch.zeros(8, 3, 64, 64))
    start = resident_mb()
    for h in range(64, 193, 16):
        for w in range(64, 193, 16):
            net(torch.zeros(8, 3, h, w))
growth = resident_mb() - start
print(json.dumps({"growth_mb": growth, "capacity": os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]}))
"""


def test_kept_heap_serves_the_next_batch_without_page_faults():
    default, kept = run_fresh(BATCHES, "default"), run_fresh(BATCHES, "kept")
    if not GLIBC:
        assert kept["kept"] is False
        return
    assert kept["kept"] is True
    # Left to its defaults glibc hands each round's 28 MB back and faults them in again (~6,400 faults);
    # with the thresholds at their ceiling the heap keeps them.
    assert default["faults"] > 3000, default
    assert kept["faults"] < 0.05 * default["faults"], (default, kept)


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/self/statm")
def test_teacher_memory_stays_flat_over_new_input_sizes_unless_the_user_sets_the_onednn_cache():
    steady = run_fresh(SHAPES)
    cached = run_fresh(SHAPES, ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024")   # a user's setting is left alone
    assert steady["capacity"] == "0" and cached["capacity"] == "1024"
    # Here: +133 MB with the cache, +22 MB without it (glibc's heap settling).
    assert cached["growth_mb"] > steady["growth_mb"] + 40, (steady, cached)
    assert steady["growth_mb"] < 60, steady


def test_teacher_actor_sets_up_its_process_before_loading_the_teacher():
    """The job's teacher actor (its class, outside Ray) keeps its heap and turns oneDNN's cache off."""
    code = """
import json, os
from pipeline.worker import TeacherActor, TeacherSpec
actor = TeacherActor(TeacherSpec("tiny", "cpu", 0.05, 10), 1)
print(json.dumps({"kept": actor.stats()["heap_kept"],
                  "capacity": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY")}))
"""
    found = run_fresh(code)
    assert found == {"kept": GLIBC, "capacity": "0"}


def fragment_heap(megabytes: int) -> list:
    """Allocate ``megabytes`` of 2 KB malloc blocks and free all but every 64th: the freed blocks sit
    between live ones, where glibc cannot shrink the heap by itself. Returns the kept blocks."""
    blocks = [bytearray(2048) for _ in range(megabytes * 512)]
    return blocks[::64]


def test_heap_trimmer_trims_past_its_bound_and_not_again_within_its_cooldown():
    """The teacher actors' trimmer leaves a steady heap alone and hands back a fragmented one (glibc)."""
    from pipeline.heap import HeapTrimmer, malloc_trim, resident_mb

    # A small slack, and a heap trimmed beforehand, so the blocks below need fresh pages and push the
    # resident set past the bound however much memory earlier tests left in this process.
    trimmer = HeapTrimmer(slack=0.02, warmup=1, cooldown=3)
    if not GLIBC:
        trimmer.after_call()
        assert trimmer.trims == 0
        return
    malloc_trim()(0)
    trimmer.after_call()                      # warm-up: sets the bound
    trimmer.after_call()
    assert trimmer.trims == 0
    kept = fragment_heap(400)
    before = resident_mb()
    trimmer.after_call()
    assert trimmer.trims == 1
    assert resident_mb() < before - 200, (before, resident_mb())
    kept += fragment_heap(400)
    trimmer.after_call()                      # past the bound again, but within the cooldown
    trimmer.after_call()
    assert trimmer.trims == 1
    trimmer.after_call()                      # the cooldown is over
    assert trimmer.trims == 2 and len(kept) == 2 * 3200
