"""``sga inspect``'s drawing: matched regions are filled in their phrase's colour, unmatched ones are not."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline.inspect import draw
from shards.labels import LabelRecord, PhraseLabel

GREEN = (0, 255, 0)      # the image: a colour nothing in the drawing uses
REGIONS = np.array([[10, 10, 90, 90], [110, 10, 190, 90]], np.float32)


def render(align: list[list[bool]]) -> np.ndarray:
    image = np.zeros((100, 200, 3), np.uint8)
    image[:] = GREEN
    phrase = PhraseLabel("a box", 0, 5, np.array([[12, 12, 88, 88]], np.float32), np.array([0.9], np.float32))
    rec = LabelRecord("k", "a box", 200, 100, 2, [phrase], np.array(align, bool))
    return np.asarray(Image.open(io.BytesIO(draw(image, REGIONS, rec, 0.1, "k"))).convert("RGB")).astype(int)


def to_png(box: np.ndarray, extent: tuple[int, int, int, int]) -> tuple[slice, slice]:
    """The inner part of an image-pixel box in PNG pixels, a few pixels in from its outline."""
    top, left, bottom, right = extent
    sx, sy = (right - left) / 200, (bottom - top) / 100
    x0, y0, x1, y1 = box
    return slice(int(top + y0 * sy) + 6, int(top + y1 * sy) - 6), slice(int(left + x0 * sx) + 6,
                                                                         int(left + x1 * sx) - 6)


def test_matched_regions_are_filled_in_their_phrases_colour():
    from matplotlib import colormaps

    matched, unmatched = render([[True, False]]), render([[False, False]])
    assert matched.shape == unmatched.shape
    green = np.all(unmatched == GREEN, axis=-1)
    rows, cols = np.flatnonzero(green.any(axis=1)), np.flatnonzero(green.any(axis=0))
    extent = (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1)           # where the image landed in the PNG
    inside_first, inside_second = to_png(REGIONS[0], extent), to_png(REGIONS[1], extent)
    colour = np.array(colormaps["tab10"].colors[0]) * 255
    # Region 0 is the phrase's: its inside turns from green towards the phrase's colour, away from the teacher
    # box's outline; region 1 stays the image's green in both drawings.
    fill = matched[inside_first][10:-10, 10:-10].reshape(-1, 3).mean(axis=0)
    expected = 0.82 * np.array(GREEN) + 0.18 * colour
    assert np.abs(fill - expected).max() < 12, (fill, expected)
    assert np.all(unmatched[inside_first][10:-10, 10:-10] == GREEN)
    assert np.all(matched[inside_second] == GREEN) and np.all(unmatched[inside_second] == GREEN)
