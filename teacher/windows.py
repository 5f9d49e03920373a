"""Captions longer than a text encoder's window, split into windows of whole phrases.

A grounding model reads at most ``max_tokens`` tokens of a caption (the tiny teacher 63, MDETR 255);
truncated, every phrase past the cut gets no box. Dense captions that list dozens of objects are that long:
8 of the 1,960 captions of a fresh synthetic world, holding one visible phrase in seven. A window is a
substring of the caption that holds whole phrases and the words between them, and fits the encoder; the
teacher grounds each window as a caption of its own, with the same image, and every phrase takes its answer
from the window that holds it. A caption that fits is one window, so short captions are grounded exactly as
before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

Span = tuple[int, int]


@dataclass(frozen=True)
class Window:
    """Characters ``[start, end)`` of a caption and the indices (into its span list) of the phrases inside."""

    start: int
    end: int
    phrases: tuple[int, ...]

    def local(self, span: Span) -> Span:
        """A caption span as a span of this window's text."""
        return span[0] - self.start, span[1] - self.start


def caption_windows(caption: str, spans: Sequence[Span], count_tokens: Callable[[str], int],
                    max_tokens: int) -> list[Window]:
    """Greedy windows over ``spans`` in caption order, each as long as ``count_tokens`` (special tokens
    included) allows; the whole caption when it fits.

    A window starts at the caption's start (the first) or at its first phrase (the others) and ends at its
    last phrase's end. A phrase too long for a window of its own still gets one (the encoder truncates it, as
    it would have truncated the caption). Nested or overlapping spans share a window when they fit together.
    """
    if not spans or count_tokens(caption) <= max_tokens:
        return [Window(0, len(caption), tuple(range(len(spans))))]
    order = sorted(range(len(spans)), key=lambda i: (spans[i][0], spans[i][1]))
    windows: list[Window] = []
    start, end, members = 0, 0, []
    for i in order:
        s, e = spans[i]
        if members and count_tokens(caption[start: max(end, e)]) > max_tokens:
            windows.append(Window(start, end, tuple(members)))
            start, end, members = s, e, [i]
        else:
            end = max(end, e)
            members.append(i)
    windows.append(Window(start, end, tuple(members)))
    return windows
