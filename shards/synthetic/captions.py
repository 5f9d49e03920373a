"""Conceptual-Captions-style captions of a scene, with the character span of every noun phrase.

A caption is lower-case web alt-text built from a few templates. Its noun phrases are of four kinds:

- ``object``: one object, described so that it is unique in the scene ("a small striped red square");
- ``group``: every object sharing a shape or colour ("two circles", "three red shapes");
- ``nonvisible``: refers to nothing in the image ("a sunny day", "the artist");
- ``relation``: the noun inside "to the left of" ("the left"); spaCy extracts it, nothing shows it.

Relations ("above", "left of", "next to", ...) always agree with the layout. The phrase spans are what
spaCy's ``noun_chunks`` return for these captions (``tests/test_world.py`` measures the agreement).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .scene import Scene, SceneObject

SIZE_WORDS = {"small": ("small", "little", "tiny"), "medium": ("medium-sized",), "large": ("large", "big")}
TEXTURE_WORDS = {"solid": ("plain",), "striped": ("striped",), "dotted": ("dotted", "spotted"),
                 "checkered": ("checkered",)}
GENERIC_NOUNS = ("shape", "object")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
# (preposition, phrase): tails naming something that is not in the picture.
NONVISIBLE_TAILS = (("on", "a sunny day"), ("by", "the artist"), ("for", "the holidays"),
                    ("in", "the morning"), ("at", "the studio"), ("from", "the new collection"),
                    ("for", "a birthday party"), ("in", "the gallery"), ("by", "a local designer"),
                    ("during", "the summer"), ("for", "my grandmother"), ("at", "the weekend market"))
# (subject, verb): openings naming someone who is not in the picture.
NONVISIBLE_SUBJECTS = (("the artist", "paints"), ("my daughter", "drew"), ("the designer", "created"),
                       ("a child", "made"), ("the teacher", "shows"), ("our team", "presents"))
# Captions without any noun phrase (checked against spaCy's noun_chunks).
NO_PHRASE_CAPTIONS = ("so beautiful", "simply stunning", "absolutely gorgeous", "just perfect",
                      "very colorful", "looking good", "ready to go", "welcome back", "wow", "lovely")
EMPTY_CAPTIONS = ("", " ", "   ", "\n")


@dataclass
class Phrase:
    """A noun phrase ``text == caption[start:end]`` and the objects it refers to (empty: not visible)."""

    text: str
    start: int
    end: int
    kind: str
    object_ids: tuple[int, ...] = ()

    @property
    def visible(self) -> bool:
        return bool(self.object_ids)


@dataclass
class Caption:
    """A caption, its phrases in text order and its style: ``normal | no_phrase | empty | overlong``."""

    text: str
    phrases: list[Phrase] = field(default_factory=list)
    style: str = "normal"


class _Builder:
    """Concatenates text pieces and records the spans of the phrase pieces."""

    def __init__(self):
        self.parts: list[str] = []
        self.length = 0
        self.phrases: list[Phrase] = []

    def text(self, s: str) -> _Builder:
        self.parts.append(s)
        self.length += len(s)
        return self

    def phrase(self, s: str, kind: str, object_ids: tuple[int, ...] = ()) -> _Builder:
        self.phrases.append(Phrase(s, self.length, self.length + len(s), kind, object_ids))
        return self.text(s)

    def build(self, style: str = "normal") -> Caption:
        return Caption("".join(self.parts), self.phrases, style)


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _article(words: list[str], rng: np.random.Generator, definite_prob: float = 0.4) -> str:
    r = rng.random()
    if r < 0.05:
        return ""          # CC often drops the article: "red circle on a sunny day"
    if r < 0.05 + definite_prob:
        return "the"
    return "an" if words[0][0] in "aeiou" else "a"


def _matches(obj: SceneObject, used: dict[str, str]) -> bool:
    return all(getattr(obj, attr) == value for attr, value in used.items())


def describe(obj: SceneObject, scene: Scene, rng: np.random.Generator, article: bool = True,
             generic_prob: float = 0.1, exclude: tuple[str, ...] = ()) -> str | None:
    """A noun phrase naming ``obj`` and no other object of ``scene``, e.g. ``"the small striped red square"``.

    Attributes are drawn at random, then added (colour, texture, size, shape) until the description is
    unique; a generic noun ("shape", "object") stands in for the shape noun when colour and the rest suffice.
    Attributes in ``exclude`` are never named; ``None`` when the others cannot single ``obj`` out.
    """
    used: dict[str, str] = {}
    if "shape" not in exclude and rng.random() >= generic_prob:
        used["shape"] = obj.shape
    for attr, prob in (("colour", 0.75), ("texture", 0.25), ("size", 0.25)):
        if attr not in exclude and rng.random() < prob:
            used[attr] = getattr(obj, attr)
    for attr in ("colour", "texture", "size", "shape"):
        if sum(_matches(o, used) for o in scene.objects) == 1:
            break
        if attr not in exclude:
            used[attr] = getattr(obj, attr)
    if sum(_matches(o, used) for o in scene.objects) != 1:
        return None
    words = []
    if "size" in used:
        words.append(_pick(rng, SIZE_WORDS[obj.size]))
    if "texture" in used:
        words.append(_pick(rng, TEXTURE_WORDS[obj.texture]))
    if "colour" in used:
        words.append(obj.colour)
    words.append(obj.shape if "shape" in used else _pick(rng, GENERIC_NOUNS))
    if article:
        det = _article(words, rng)
        if det:
            words.insert(0, det)
    return " ".join(words)


def relation(a: SceneObject, b: SceneObject, short_side: float) -> list[str]:
    """Relation words true of "a REL b" (may be empty when the layout is ambiguous)."""
    (ax, ay), (bx, by) = a.center, b.center
    dx, dy = bx - ax, by - ay
    rels = []
    if abs(dx) > 1.5 * abs(dy):
        rels += ["left of", "to the left of"] if dx > 0 else ["to the right of"]
    if abs(dy) > 1.5 * abs(dx):
        rels += ["above"] if dy > 0 else ["below"]
    gap = max(max(a.box[0], b.box[0]) - min(a.box[2], b.box[2]),
              max(a.box[1], b.box[1]) - min(a.box[3], b.box[3]))
    if gap < 0.2 * short_side:
        rels += ["next to", "beside"]
    return rels


def _group(scene: Scene, rng: np.random.Generator) -> tuple[str, tuple[int, ...]] | None:
    """A plural phrase naming every object that shares a shape or a colour, if any attribute is shared."""
    options = []
    for attr in ("shape", "colour"):
        values = [getattr(o, attr) for o in scene.objects]
        for v in sorted(set(values)):
            ids = tuple(o.oid for o in scene.objects if getattr(o, attr) == v)
            if len(ids) >= 2:
                options.append((attr, v, ids))
    if not options:
        return None
    attr, value, ids = _pick(rng, options)
    noun = value + "s" if attr == "shape" else f"{value} {_pick(rng, GENERIC_NOUNS)}s"
    lead = NUMBER_WORDS[len(ids)] if rng.random() < 0.8 else f"the {NUMBER_WORDS[len(ids)]}"
    return f"{lead} {noun}", ids


def _mention(b: _Builder, obj: SceneObject, scene: Scene, rng: np.random.Generator) -> None:
    text = describe(obj, scene, rng)
    assert text is not None, "scenes never hold two objects with the same four attributes"
    b.phrase(text, "object", (obj.oid,))


def _relation_words(b: _Builder, rel: str) -> None:
    """Append " REL " and mark the relation's own noun ("the left") as a phrase that shows nothing."""
    if rel.startswith("to the "):
        b.text(" to ").phrase(rel[3:-3], "relation").text(" of ")
    else:
        b.text(f" {rel} ")


def _clause(b: _Builder, scene: Scene, rng: np.random.Generator, group_prob: float) -> None:
    """One clause mentioning 1–3 objects (or a group), with a relation when the layout gives one."""
    group = _group(scene, rng) if rng.random() < group_prob else None
    if group is not None:
        b.phrase(group[0], "group", group[1])
        rest = [o for o in scene.objects if o.oid not in group[1]]
        if rest and rng.random() < 0.5:
            b.text(_pick(rng, (" and ", " with ")))
            _mention(b, _pick(rng, rest), scene, rng)
        return
    k = min(len(scene.objects), int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2])))
    objs = [scene.objects[i] for i in rng.permutation(len(scene.objects))[:k]]
    short = min(scene.width, scene.height)
    rels = relation(objs[0], objs[1], short) if k >= 2 else []
    _mention(b, objs[0], scene, rng)
    if k == 1:
        return
    if rels and rng.random() < 0.7:
        _relation_words(b, _pick(rng, rels))
    else:
        b.text(_pick(rng, (" and ", " with ")))
    _mention(b, objs[1], scene, rng)
    if k == 3:
        b.text(_pick(rng, (" and ", " with ")))
        _mention(b, objs[2], scene, rng)


def _normal(b: _Builder, scene: Scene, rng: np.random.Generator, nonvisible_prob: float,
            group_prob: float) -> None:
    """A clause, optionally opened by a non-visible subject or closed by a non-visible tail."""
    r = rng.random()
    if r < nonvisible_prob / 3:
        subj, verb = _pick(rng, NONVISIBLE_SUBJECTS)
        b.phrase(subj, "nonvisible").text(f" {verb} ")
        _clause(b, scene, rng, group_prob)
    elif r < nonvisible_prob:
        _clause(b, scene, rng, group_prob)
        prep, tail = _pick(rng, NONVISIBLE_TAILS)
        b.text(f" {prep} ").phrase(tail, "nonvisible")
    else:
        _clause(b, scene, rng, group_prob)


def make_caption(scene: Scene, rng: np.random.Generator, style: str = "normal", nonvisible_prob: float = 0.4,
                 group_prob: float = 0.1, overlong_chars: int = 1500) -> Caption:
    """A caption of ``style`` for ``scene``: ``normal``, ``no_phrase``, ``empty`` or ``overlong`` (clauses
    joined by commas until the text passes ``overlong_chars`` characters)."""
    if style == "empty":
        return Caption(_pick(rng, EMPTY_CAPTIONS), [], style)
    if style == "no_phrase":
        return Caption(_pick(rng, NO_PHRASE_CAPTIONS), [], style)
    b = _Builder()
    _normal(b, scene, rng, nonvisible_prob, group_prob)
    while style == "overlong" and b.length < overlong_chars:
        b.text(", ")
        _normal(b, scene, rng, nonvisible_prob, group_prob)
    return b.build(style)
