"""Shard formats, readers, writers and manifests shared by every stage of sga.

See ``shards/FORMAT.md`` for the on-disk contract.
"""
