"""Draw a :class:`~shards.synthetic.scene.Scene` with PIL and encode it as JPEG.

Every shape's outline is normalised to fill its unit box, so an object's box in the scene is the tight box
of its drawn pixels (up to rounding). Textures recolour the shape's inside with a lighter tint of its own
colour, so the colour name stays true for every texture.
"""

from __future__ import annotations

import io
import math
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

from .scene import COLOURS, Scene, SceneObject

_SUPERSAMPLE = 3   # masks are drawn this much larger, then downsampled: cheap anti-aliasing


def _normalise(points: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, y0, sx, sy = min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)
    return tuple(((x - x0) / sx, (y - y0) / sy) for x, y in points)


@cache
def shape_outline(shape: str) -> tuple[tuple[float, float], ...]:
    """Polygon of ``shape`` in the unit square, touching all four sides (circles are drawn as ellipses)."""
    if shape == "square":
        pts = [(0, 0), (1, 0), (1, 1), (0, 1)]
    elif shape == "triangle":
        pts = [(0.5, 0), (1, 1), (0, 1)]
    elif shape == "diamond":
        pts = [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]
    elif shape == "hexagon":
        pts = [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 7)[:-1]]
    elif shape == "star":
        pts = [((1.0 if i % 2 == 0 else 0.45) * math.sin(i * math.pi / 5),
                -(1.0 if i % 2 == 0 else 0.45) * math.cos(i * math.pi / 5)) for i in range(10)]
    elif shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        pts = [(16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
                                         - math.cos(4 * t))) for t in ts]
    elif shape == "arrow":  # pointing right: a shaft and a head
        pts = [(0, 0.3), (0.55, 0.3), (0.55, 0), (1, 0.5), (0.55, 1), (0.55, 0.7), (0, 0.7)]
    elif shape == "circle":
        return ()
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return _normalise(pts)


def _mask(shape: str, w: int, h: int) -> Image.Image:
    """Anti-aliased ``L`` mask of ``shape`` filling a ``w`` x ``h`` box."""
    s = _SUPERSAMPLE
    big = Image.new("L", (w * s, h * s), 0)
    draw = ImageDraw.Draw(big)
    if shape == "circle":
        draw.ellipse((0, 0, w * s - 1, h * s - 1), fill=255)
    else:
        draw.polygon([(x * (w * s - 1), y * (h * s - 1)) for x, y in shape_outline(shape)], fill=255)
    return big.resize((w, h), Image.BILINEAR)


def _texture(obj: SceneObject, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[h, w, 3]`` fill: the colour, with a lighter tint in stripes, dots or checks."""
    base = np.asarray(COLOURS[obj.colour], dtype=np.float32)
    tint = base + 0.55 * (255 - base)
    out = np.empty((h, w, 3), dtype=np.float32)
    out[:] = base
    if obj.texture == "solid":
        return out.astype(np.uint8)
    period = max(4, int(min(w, h) / rng.uniform(3.5, 5.5)))
    yy, xx = np.mgrid[0:h, 0:w]
    phase = int(rng.integers(period))
    if obj.texture == "striped":
        on = ((xx + yy + phase) // max(2, period // 2)) % 2 == 1
    elif obj.texture == "dotted":
        cx = (xx + phase) % period - period / 2
        cy = (yy + phase) % period - period / 2
        on = cx * cx + cy * cy <= (period * 0.28) ** 2
    else:  # checkered
        on = (((xx + phase) // period) + ((yy + phase) // period)) % 2 == 1
    out[on] = tint
    return out.astype(np.uint8)


def _background(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[H, W, 3]`` background of the scene's kind."""
    h, w = scene.height, scene.width
    a = np.asarray(scene.tones[0], dtype=np.float32)
    b = np.asarray(scene.tones[1], dtype=np.float32)
    if scene.background == "solid":
        img = np.broadcast_to(a, (h, w, 3)).copy()
    elif scene.background == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = xx / w * math.cos(angle) + yy / h * math.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = a + t[..., None] * (b - a)
    else:  # noise: per-pixel grain on a coarse blotchy field
        coarse = rng.normal(0.0, 1.0, size=(h // 16 + 2, w // 16 + 2)).astype(np.float32)
        field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))
        img = a + field[..., None] * 0.35 * (b - a) + rng.normal(0.0, 12.0, size=(h, w, 1)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def render_scene(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """The scene as an RGB image of size ``(scene.width, scene.height)``."""
    image = Image.fromarray(_background(scene, rng), "RGB")
    for obj in scene.objects:
        x1, y1, x2, y2 = (round(v) for v in obj.box)
        w, h = max(x2 - x1, 2), max(y2 - y1, 2)
        fill = Image.fromarray(_texture(obj, w, h, rng), "RGB")
        image.paste(fill, (x1, y1), _mask(obj.shape, w, h))
    return image


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes (baseline, no EXIF: identical output for identical pixels)."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
