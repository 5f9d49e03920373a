"""Memory of the labeling job's long-lived actors: a heap that keeps its pages between batches, and a
trimmer that hands them back only when the heap really grows.

A teacher actor runs the same kind of batch thousands of times, each with tensors of a new padded size.
Left to their defaults, two libraries made that costly on a CPU teacher:

- glibc starts with a 128 KB mmap threshold that only rises as large blocks are freed, and gives the top of
  its heap back to the OS whenever more than twice that threshold is free there. A fresh actor process
  therefore returned much of a batch's memory after every batch and faulted it in again on the next: the
  tiny teacher took 300-480 minor page faults and 1.0-1.7 ms of kernel time per grounded sample in the job's
  actor (10-15 % of its time), against 8-12 faults and 0.2 ms with the thresholds of :func:`keep_heap`.
- oneDNN, which runs torch's CPU convolutions, caches up to 1,024 compiled primitives keyed by input shape,
  so the resident set grew with every new padded size (+145 MB over the 144 batches of a 2,500-sample world,
  then flat). Without the cache the tiny teacher compiles its primitives anew each batch: 3.6 ms per
  16-image batch, against 1.6 ms on a first pass with it (0.1 ms per sample more), and its resident set
  stays at its first batch's.

Shard workers keep their heap too (11-29 -> 7 faults per sample); they run no convolutions.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import resource

TRIM_SLACK = 0.1   # trim once the resident set exceeds its first calls' by this much (HeapTrimmer)
# mallopt(3) parameters; glibc raises the mmap threshold by itself up to 4 MB x sizeof(long) (32 MB on 64-bit
# systems) and keeps the trim threshold at twice it.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)


@functools.cache
def _libc():
    """glibc's C library, or None where there is none (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def keep_heap() -> bool:
    """Start glibc's mmap and trim thresholds where its own dynamic rule ends (32 and 64 MB on 64-bit), so
    the blocks of one batch come from, and return to, a heap that keeps them for the next; blocks over 32 MB
    and a free heap top over 64 MB still go back to the OS as before. Returns whether glibc took them
    (False without glibc)."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
                and libc.mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_MAX))


def steady_teacher_memory() -> bool:
    """:func:`keep_heap`, and oneDNN's primitive cache off unless ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` is
    already set; call it before the teacher's first forward pass (oneDNN reads the variable at its first
    primitive). Returns :func:`keep_heap`'s answer."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")
    return keep_heap()


def malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere): hands freed heap pages back to the OS."""
    libc = _libc()
    return libc.malloc_trim if libc is not None else None


def resident_mb() -> float | None:
    """This process's current resident set in MB (Linux ``/proc``; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident set in MB (Linux reports ``ru_maxrss`` in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class HeapTrimmer:
    """Trims the heap when the resident set outgrows its first calls' by ``slack``, at most once per
    ``cooldown`` calls (:meth:`after_call`; a teacher actor's call grounds one or more batches).

    With :func:`steady_teacher_memory` the tiny teacher's resident set is nearly flat from its first batch,
    and this seldom fires (no trim in most 2,500-sample jobs, 2 in one); it guards long jobs against a heap
    that fragments all the same (another teacher, another allocation pattern). ``malloc_trim`` hands every
    free page back, and the next batches fault back in those they need: trimming after every second batch
    cost the tiny teacher 10-15 % of its throughput, and a bound alone can oscillate (trim, re-fault past the
    bound, trim). The bound starts at the largest resident set of the first ``warmup`` calls, which holds
    one call's working set; memory still resident after a trim is live, so the bound follows it.
    """

    def __init__(self, slack: float = TRIM_SLACK, warmup: int = 4, cooldown: int = 16):
        self.slack, self.warmup, self.cooldown = slack, warmup, cooldown
        self.trims = 0
        self._trim = malloc_trim()
        self._bound = 0.0
        self._calls = 0
        self._next_trim = 0

    def after_call(self) -> None:
        rss = resident_mb() if self._trim is not None else None
        if rss is None:
            return
        self._calls += 1
        if self._calls <= self.warmup:
            self._bound = max(self._bound, rss * (1 + self.slack))
        elif rss > self._bound and self._calls >= self._next_trim:
            self._trim(0)
            self.trims += 1
            self._next_trim = self._calls + self.cooldown
            self._bound = max(self._bound, (resident_mb() or rss) * (1 + self.slack))
