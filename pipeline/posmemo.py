"""Part-of-speech tags for noun chunks at a fraction of spaCy's attribute-ruler cost, with identical results.

English pipelines derive coarse POS (which ``Doc.noun_chunks`` reads) from the tagger's fine tags with an
``attribute_ruler``: ~180 single- and two-token patterns on ``TAG``, ``LOWER``, ``DEP`` and ``IS_SPACE``, run
through a ``Matcher`` on every doc. That costs as much as the parser (0.19 ms per caption here, measured
component by component over a world's captions), yet its answer for a token depends only on those
attributes of the token and of its neighbours within the longest pattern.

:class:`PosMemo` therefore remembers, per token, the POS the real ruler gave for that exact context (the
attributes the patterns read, of the token and of its neighbours), and sets POS from memory when every token
of a doc has been seen before; any doc with an unseen context goes through the real ruler, whose answers are
then remembered. Captions reuse a small vocabulary, so after a few hundred captions almost every doc is
answered from memory. When a pipeline's patterns use anything else (other attributes, quantifiers), the
memo stays off and the ruler runs on every doc. Only POS is replayed: morphology and lemmas, which noun
chunks never read, are left unset on memorised docs.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from spacy.attrs import DEP, IS_SPACE, LOWER, POS, TAG
from spacy.tokens import Doc

# Pattern keys this memo understands, in the column order of ``Doc.to_array``.
_ATTRS = {"TAG": TAG, "LOWER": LOWER, "DEP": DEP, "IS_SPACE": IS_SPACE}
_COLUMNS = list(_ATTRS)
_MAX_ENTRIES = 1_000_000  # bounded memory on endless streams; past it, unseen contexts just use the ruler


def _context(rules: Iterable[dict]) -> dict[int, tuple[int, ...]] | None:
    """Which attributes (column indices) at which offsets from a token its POS can depend on: a pattern
    ``[{"DEP": "expl"}, {"LOWER": "is"}]`` that sets the attributes of its token 1 makes the token's own
    LOWER and the previous token's DEP part of the context. None when a pattern is outside this model."""
    reads: dict[int, set[int]] = {}
    for rule in rules:
        if "POS" not in rule["attrs"]:
            continue   # the Matcher matches every pattern before any attribute is set: no rule feeds another
        for pattern in rule["patterns"]:
            index = rule.get("index", 0)
            target = index if index >= 0 else len(pattern) + index
            for position, token in enumerate(pattern):
                if not set(token) <= set(_ATTRS):
                    return None   # OP quantifiers, other attributes: lengths and contexts are unbounded
                reads.setdefault(position - target, set()).update(_COLUMNS.index(a) for a in token)
    return {offset: tuple(sorted(cols)) for offset, cols in sorted(reads.items())}


class PosMemo:
    """Set ``token.pos`` on docs that went through the tagger and parser (not the ruler).

    ``ruler``: the pipeline's ``AttributeRuler`` (run on the docs the memo cannot answer). ``enabled`` is
    False when its patterns are outside what the memo models; then :meth:`__call__` just runs the ruler.
    """

    def __init__(self, ruler):
        self.ruler = ruler
        self.context = _context(ruler.patterns)
        self.enabled = self.context is not None
        self.memo: dict[tuple, int] = {}
        self.hits = 0
        self.misses = 0

    def _keys(self, doc: Doc) -> list[tuple]:
        """Per token, the attributes its context reads (``None`` for positions outside the doc)."""
        rows = doc.to_array([_ATTRS[a] for a in _COLUMNS]).tolist()
        n = len(rows)
        return [tuple(tuple(rows[i + off][c] for c in cols) if 0 <= i + off < n else None
                      for off, cols in self.context.items())
                for i in range(n)]

    def __call__(self, doc: Doc) -> Doc:
        if not self.enabled:
            return self.ruler(doc)
        keys = self._keys(doc)
        memo = self.memo
        if all(k in memo for k in keys):
            doc.from_array([POS], np.asarray([memo[k] for k in keys], dtype=np.uint64).reshape(-1, 1))
            self.hits += 1
            return doc
        self.misses += 1
        doc = self.ruler(doc)
        if len(memo) < _MAX_ENTRIES:
            memo.update(zip(keys, doc.to_array([POS]).tolist()))
        return doc
