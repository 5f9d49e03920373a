"""The embedded default of ``sga label``: a synthetic world in a cache folder, made once and reused.

The world's folder is named by a hash of its config, so a changed default config builds a new world instead
of reusing a stale one, and an interrupted build (no ``world.json``, which is written last) is rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys

from shards import fs


def cache_root(cache: str | None = None) -> str:
    """``cache``, else ``$SGA_CACHE``, else ``~/.cache/sga``."""
    return cache or os.environ.get("SGA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sga")


def embedded_default(cache: str | None = None, samples: int | None = None,
                     quiet: bool = False) -> tuple[str, str, str, str]:
    """``(images, regions, out, gt)`` of the default world under the cache, building it if needed.

    ``samples`` asks for a corpus-only world of that size instead (no held-out task images): quick to build
    for a first look or a test.
    """
    from shards.synthetic.world import WorldConfig, build_world

    config = WorldConfig() if samples is None else WorldConfig(samples=samples, task_samples=0)
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode()).hexdigest()[:10]
    root = cache_root(cache)
    world = fs.join(root, "worlds", digest)
    if not fs.exists(fs.join(world, "world.json")):
        if not quiet:
            print(f"sga label: building the default synthetic world in {world}", file=sys.stderr)
        build_world(config, world, show_progress=not quiet)
    return (fs.join(world, "images"), fs.join(world, "regions"), fs.join(root, "labels", digest),
            fs.join(world, "gt"))
