"""Downstream tasks on the held-out task images, in the real datasets' file formats.

Written under ``TASKS`` (``DIR/tasks``), one split per image (``train``/``val``/``test``):

- ``refexp/{split}.json``: RefCOCO+-style referring expressions, a JSON list of
  ``{"ref_id", "image_key", "image_id", "object_id", "category", "expression", "box" (pixel xyxy),
  "image_w", "image_h", "split", "distractors"}``. Expressions name attributes only (no location words)
  and are unique in their image; ``distractors`` counts the other objects sharing the target's shape or
  colour, which only a grounded model can tell apart.
- ``vqa/v2_OpenEnded_synthetic_{split}_questions.json`` and ``vqa/v2_synthetic_{split}_annotations.json``:
  VQA 2.0 layout (``{"questions": [{"image_id", "question", "question_id"}]}``; ``{"annotations":
  [{"question_id", "image_id", "answers": 10 x {"answer", "answer_confidence", "answer_id"},
  "multiple_choice_answer", "answer_type", "question_type"}]}``). ``image_id`` is ``int(key)``; the
  10 answers carry annotator noise. Questions ask about colour, shape, counts, existence and relations.
- ``vcr/{split}.jsonl``: VCR's shape, one object per line: ``question``, 4 ``answer_choices``, 4
  ``rationale_choices`` (token lists of plain strings), ``answer_label``, ``rationale_label``, ``img_id``
  (the image key), ``img_fn``, ``objects``, ``annot_id`` and the ``*_orig`` strings. "What is above the
  striped circle?" with answers naming objects of the image, and rationales stating relations.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import fs
from .captions import describe, relation
from .scene import COLOURS, SHAPES, Scene, SceneObject

if TYPE_CHECKING:
    from .world import WorldConfig, WorldSample

QA_STREAM = 2                        # generator stream of the tasks (world.py uses 0 and 1)
QUESTIONS_PER_IMAGE = 4
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
DIRECTIONAL = {"above": "below", "below": "above", "to the left of": "to the right of",
               "to the right of": "to the left of"}


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _the(obj: SceneObject, scene: Scene, rng: np.random.Generator,
         exclude: tuple[str, ...] = ()) -> str | None:
    text = describe(obj, scene, rng, article=False, exclude=exclude)
    return None if text is None else f"the {text}"


def _pairs(scene: Scene, directional: bool) -> list[tuple[SceneObject, str, SceneObject]]:
    """Every ``(a, rel, b)`` with "a REL b" true, sorted for determinism."""
    short = min(scene.width, scene.height)
    out = []
    for a in scene.objects:
        for b in scene.objects:
            if a.oid != b.oid:
                out += [(a, r, b) for r in relation(a, b, short)
                        if r in DIRECTIONAL or (not directional and r in ("next to", "beside"))]
    return out


# ---------------------------------------------------------------------------------------------- refexp
def refexp_entries(key: str, scene: Scene, split: str, rng: np.random.Generator) -> list[dict[str, Any]]:
    """One RefCOCO+-style entry per object of the scene."""
    entries = []
    for obj in scene.objects:
        text = describe(obj, scene, rng, article=rng.random() < 0.3)
        distractors = sum(o.oid != obj.oid and (o.shape == obj.shape or o.colour == obj.colour)
                          for o in scene.objects)
        entries.append({"image_key": key, "image_id": int(key), "object_id": obj.oid, "category": obj.shape,
                        "expression": text, "box": [float(v) for v in obj.box], "image_w": scene.width,
                        "image_h": scene.height, "split": split, "distractors": int(distractors)})
    return entries


# ------------------------------------------------------------------------------------------------- VQA
def _q_colour(scene, rng):
    obj = _pick(rng, scene.objects)
    desc = _the(obj, scene, rng, exclude=("colour",))
    if desc is None:
        return None
    return f"what color is {desc}?", obj.colour, "other", "what color is the", tuple(COLOURS)


def _q_shape(scene, rng):
    obj = _pick(rng, scene.objects)
    desc = _the(obj, scene, rng, exclude=("shape",))
    if desc is None:
        return None
    return f"what shape is {desc}?", obj.shape, "other", "what shape is the", SHAPES


def _q_count(scene, rng):
    # Mostly count something present; a quarter of the time any shape or colour (often zero).
    pool = scene.objects if rng.random() < 0.75 else None
    if rng.random() < 0.5:
        shape = _pick(rng, SHAPES) if pool is None else _pick(rng, pool).shape
        n = sum(o.shape == shape for o in scene.objects)
        question = f"how many {shape}s are there?"
    else:
        colour = _pick(rng, tuple(COLOURS)) if pool is None else _pick(rng, pool).colour
        n = sum(o.colour == colour for o in scene.objects)
        question = f"how many {colour} shapes are in the picture?"
    near = tuple(str(max(0, n + d)) for d in (-1, 1, 2))
    return question, str(n), "number", "how many", near


def _q_exists(scene, rng):
    present = {(o.colour, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        colour, shape = _pick(rng, sorted(present))
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        colour, shape = _pick(rng, absent)
    answer = "yes" if (colour, shape) in present else "no"
    article = "an" if colour[0] in "aeiou" else "a"
    return f"is there {article} {colour} {shape}?", answer, "yes/no", "is there a", ("yes", "no")


def _q_relation(scene, rng):
    pairs = _pairs(scene, directional=True)
    if not pairs:
        return None
    a, rel, b = _pick(rng, pairs)
    da, db = _the(a, scene, rng), _the(b, scene, rng)
    answer = "yes"
    if rng.random() < 0.5:
        rel, answer = DIRECTIONAL[rel], "no"
    return f"is {da} {rel} {db}?", answer, "yes/no", "is the", ("yes", "no")


QUESTION_MAKERS = (_q_colour, _q_shape, _q_count, _q_exists, _q_relation)


def human_answers(answer: str, confusions: tuple[str, ...], rng: np.random.Generator) -> list[dict[str, Any]]:
    """Ten annotators: each answers right unless the question's noise level (0–25 %) makes them slip."""
    wrong = [c for c in confusions if c != answer] or [answer]
    noise = rng.uniform(0.0, 0.25)
    answers = []
    for i in range(10):
        if rng.random() < noise:
            text, conf = _pick(rng, wrong), _pick(rng, ("maybe", "no", "yes"))
        else:
            text, conf = answer, "yes" if rng.random() < 0.9 else "maybe"
        answers.append({"answer": text, "answer_confidence": conf, "answer_id": i + 1})
    return answers


def vqa_items(key: str, scene: Scene, rng: np.random.Generator) -> list[tuple[dict, dict]]:
    """Up to ``QUESTIONS_PER_IMAGE`` ``(question, annotation)`` pairs about the scene, distinct questions."""
    image_id = int(key)
    items, seen = [], set()
    for maker in rng.permutation(len(QUESTION_MAKERS))[:QUESTIONS_PER_IMAGE]:
        made = QUESTION_MAKERS[maker](scene, rng)
        if made is None or made[0] in seen:
            continue
        question, answer, answer_type, question_type, confusions = made
        seen.add(question)
        qid = image_id * 100 + len(items)
        answers = human_answers(answer, confusions, rng)
        majority = Counter(a["answer"] for a in answers).most_common(1)[0][0]
        items.append(({"image_id": image_id, "question": question, "question_id": qid},
                      {"question_id": qid, "image_id": image_id, "answers": answers,
                       "multiple_choice_answer": majority, "answer_type": answer_type,
                       "question_type": question_type}))
    return items


# ------------------------------------------------------------------------------------------------- VCR
def tokens(text: str) -> list[str]:
    return re.findall(r"[\w-]+|[^\w\s]", text)


def _absent_object(scene: Scene, rng: np.random.Generator) -> str:
    present = {(o.colour, o.shape) for o in scene.objects}
    colour, shape = _pick(rng, [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present])
    return f"the {colour} {shape}"


def _shuffle_in(right: str, wrong: list[str], rng: np.random.Generator) -> tuple[list[str], int]:
    label = int(rng.integers(4))
    choices = wrong[:3]
    choices.insert(label, right)
    return choices, label


def vcr_item(key: str, scene: Scene, rng: np.random.Generator) -> dict[str, Any] | None:
    """One "what is REL the B?" question with 4 answers and 4 rationales, or None without a relation."""
    pairs = _pairs(scene, directional=False)
    if not pairs:
        return None
    a, rel, b = _pick(rng, pairs)
    db, da = _the(b, scene, rng), _the(a, scene, rng)
    holds = {x.oid for x, r, y in pairs if r == rel and y.oid == b.oid}
    others = [o for o in scene.objects if o.oid not in holds and o.oid != b.oid]
    wrong_answers = [_the(o, scene, rng) for o in others]
    while len(wrong_answers) < 3 or len(set(wrong_answers)) < len(wrong_answers):
        wrong_answers = [*dict.fromkeys(wrong_answers), _absent_object(scene, rng)]
    order = rng.permutation(len(wrong_answers))[:3]
    answers, answer_label = _shuffle_in(da, [wrong_answers[i] for i in order], rng)
    true_rels = relation(a, b, min(scene.width, scene.height))
    false_rel = _pick(rng, [r for r in DIRECTIONAL if r not in true_rels])
    wrong_rationales = [f"{da} is {false_rel} {db} .", f"there is no {db[4:]} in the picture .",
                        f"{wrong_answers[order[0]]} is {rel} {db} .", f"{da} has the same shape as {db} ."
                        if a.shape != b.shape else f"{da} has a different shape from {db} ."]
    wrong_rationales = [wrong_rationales[i] for i in rng.permutation(4)[:3]]
    rationales, rationale_label = _shuffle_in(f"{da} is {rel} {db} .", wrong_rationales, rng)
    question = f"what is {rel} {db} ?"
    return {"img_id": key, "img_fn": f"{key}.jpg", "objects": [o.shape for o in scene.objects],
            "question": tokens(question), "answer_choices": [tokens(t) for t in answers],
            "rationale_choices": [tokens(t) for t in rationales], "answer_label": answer_label,
            "rationale_label": rationale_label, "question_orig": question, "answer_orig": da,
            "rationale_orig": rationales[rationale_label]}


# --------------------------------------------------------------------------------------------- writing
def assign_split(rng: np.random.Generator, splits: dict[str, float]) -> str:
    r, names = rng.random() * sum(splits.values()), list(splits)
    for name in names:
        r -= splits[name]
        if r < 0:
            return name
    return names[-1]


def write_tasks(config: WorldConfig, task_root: str,
                samples: list[WorldSample]) -> dict[str, dict[str, int]]:
    """Write refexp, VQA and VCR files for the held-out ``samples``; returns counts per task and split."""
    splits = {name: {"refexp": [], "questions": [], "annotations": [], "vcr": []}
              for name in config.task_splits}
    for sample in samples:
        rng = np.random.default_rng([config.seed, QA_STREAM, int(sample.key)])
        split = assign_split(rng, config.task_splits)
        out = splits[split]
        out["refexp"] += refexp_entries(sample.key, sample.scene, split, rng)
        for question, annotation in vqa_items(sample.key, sample.scene, rng):
            out["questions"].append(question)
            out["annotations"].append(annotation)
        item = vcr_item(sample.key, sample.scene, rng)
        if item is not None:
            out["vcr"].append({"annot_id": f"{split}-{len(out['vcr'])}", **item})
    counts: dict[str, dict[str, int]] = {"refexp": {}, "vqa": {}, "vcr": {}}
    ref_id = 0
    for split, out in splits.items():
        for entry in out["refexp"]:
            entry["ref_id"] = ref_id
            ref_id += 1
        fs.write_json(fs.join(task_root, "refexp", f"{split}.json"), out["refexp"])
        common = {"info": {"description": "sga synthetic world VQA", "seed": config.seed},
                  "license": {"name": "generated"}, "data_type": "synthetic", "data_subtype": split}
        fs.write_json(fs.join(task_root, "vqa", f"v2_OpenEnded_synthetic_{split}_questions.json"),
                      {**common, "task_type": "Open-Ended", "questions": out["questions"]})
        fs.write_json(fs.join(task_root, "vqa", f"v2_synthetic_{split}_annotations.json"),
                      {**common, "annotations": out["annotations"]})
        fs.write_bytes(fs.join(task_root, "vcr", f"{split}.jsonl"),
                       "".join(json.dumps(item, sort_keys=True) + "\n" for item in out["vcr"]).encode())
        counts["refexp"][split] = len(out["refexp"])
        counts["vqa"][split] = len(out["questions"])
        counts["vcr"][split] = len(out["vcr"])
    return counts
