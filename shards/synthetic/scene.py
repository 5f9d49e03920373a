"""Scenes of the synthetic world: 1–5 objects (shape, colour, size, texture, box) on a background.

A scene is pure data; :mod:`render` draws it and :mod:`captions` describes it. Objects are placed so that
they barely overlap, which keeps the ground truth (phrase -> boxes) clean. No two objects of a scene share
all four attributes, so every object has at least one description that names it uniquely.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Vocabulary of the world. Order matters: indices are the detector's class ids and the feature one-hots.
SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon", "heart", "arrow")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "green": (40, 160, 60),
    "blue": (35, 70, 210),
    "yellow": (245, 210, 30),
    "orange": (245, 130, 20),
    "purple": (130, 45, 170),
    "pink": (245, 110, 185),
    "black": (25, 25, 25),
}
# Object side as a fraction of the image's shorter side.
SIZES: dict[str, tuple[float, float]] = {"small": (0.16, 0.22), "medium": (0.26, 0.33), "large": (0.38, 0.46)}
TEXTURES = ("solid", "striped", "dotted", "checkered")
BACKGROUNDS = ("solid", "gradient", "noise")
# Muted tones, so that every object colour stands out from every background.
BACKGROUND_TONES = ((200, 200, 200), (225, 215, 195), (185, 205, 215), (210, 225, 200), (235, 235, 228),
                    (160, 165, 170), (215, 200, 215))


@dataclass
class SceneObject:
    """One object: attribute names and its tight box ``[x1, y1, x2, y2]`` in pixels (float)."""

    oid: int
    shape: str
    colour: str
    size: str
    texture: str
    box: tuple[float, float, float, float]

    @property
    def attributes(self) -> tuple[str, str, str, str]:
        return (self.shape, self.colour, self.size, self.texture)

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return ((x1 + x2) / 2, (y1 + y2) / 2)


@dataclass
class Scene:
    """An image's content: size, background (kind + two RGB tones) and objects (box order = ``oid``)."""

    width: int
    height: int
    background: str
    tones: tuple[tuple[int, int, int], tuple[int, int, int]]
    objects: list[SceneObject] = field(default_factory=list)

    def boxes(self) -> np.ndarray:
        """float32 ``[N, 4]`` pixel xyxy of the objects, in ``oid`` order."""
        return np.asarray([o.box for o in self.objects], dtype=np.float32).reshape(-1, 4)


@dataclass
class SceneConfig:
    """Ranges the scene sampler draws from."""

    min_side: int = 128
    max_side: int = 224
    min_objects: int = 1
    max_objects: int = 5
    max_overlap: float = 0.08   # intersection / smaller box area allowed between two objects
    share_prob: float = 0.3     # a new object copies the shape or colour of one already placed
    place_tries: int = 40


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over the smaller box's area."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator, config: SceneConfig) -> Scene:
    """Draw one scene. Objects that find no free place after ``place_tries`` tries are dropped, but a
    scene always keeps at least one object (the first is placed on an empty canvas)."""
    width = int(rng.integers(config.min_side, config.max_side + 1))
    height = int(rng.integers(config.min_side, config.max_side + 1))
    tones_idx = rng.choice(len(BACKGROUND_TONES), size=2, replace=False)
    scene = Scene(width, height, _pick(rng, BACKGROUNDS),
                  (BACKGROUND_TONES[tones_idx[0]], BACKGROUND_TONES[tones_idx[1]]))
    wanted = int(rng.integers(config.min_objects, config.max_objects + 1))
    short = min(width, height)
    taken: set[tuple[str, str, str, str]] = set()
    for _ in range(wanted):
        attrs = (_pick(rng, SHAPES), _pick(rng, tuple(COLOURS)), _pick(rng, tuple(SIZES)),
                 _pick(rng, TEXTURES))
        if scene.objects and rng.random() < config.share_prob:
            # Objects alike in shape or colour make descriptions, questions and grounding non-trivial.
            other = scene.objects[int(rng.integers(len(scene.objects)))]
            attrs = (other.shape, attrs[1], *attrs[2:]) if rng.random() < 0.5 else (attrs[0], other.colour,
                                                                                  *attrs[2:])
        if attrs in taken:
            continue
        lo, hi = SIZES[attrs[2]]
        side = short * rng.uniform(lo, hi)
        # Mild aspect variation; round shapes stay roughly round.
        bw, bh = side * rng.uniform(0.85, 1.15), side * rng.uniform(0.85, 1.15)
        for _ in range(config.place_tries):
            x1 = rng.uniform(1, width - bw - 1)
            y1 = rng.uniform(1, height - bh - 1)
            box = (float(x1), float(y1), float(x1 + bw), float(y1 + bh))
            if all(_overlap(box, o.box) <= config.max_overlap for o in scene.objects):
                scene.objects.append(SceneObject(len(scene.objects), *attrs, box=box))
                taken.add(attrs)
                break
    return scene
