"""Helpers for the semantic tests: what a picture holds, read the way the quality check reads it.

Pixels are labelled with the nearest colour of the demo palette (``studio.demo.shapes``), so
"the red fraction" means the fraction of pixels nearer red than any other palette colour
(and near enough to be called a palette colour at all).
"""

from __future__ import annotations

import numpy as np

from studio.demo import quality, shapes


def fraction(image, colour: str) -> float:
    """Fraction of the picture labelled ``colour`` (a palette name, or "grey")."""
    return quality.colour_fractions(image)[colour]


def fractions(image) -> dict[str, float]:
    return quality.colour_fractions(image)


def dominant_object_colour(image, background: str = "grey") -> str | None:
    """The most common palette colour other than ``background`` (None: nothing else there)."""
    f = quality.colour_fractions(image)
    f.pop("none")
    f.pop(background)
    name = max(f, key=f.get)
    return name if f[name] >= 0.002 else None


def reading(image, colour: str, background: str | None = None) -> quality.Reading:
    """Background, dominant colour, shape and position of the ``colour`` blob."""
    rgb = shapes.COLOURS[background] if background else shapes.GREY
    return quality.read_image(image, colour, rgb)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def distance(a, b) -> float:
    """Mean absolute pixel difference, 0..1."""
    return float(np.abs(pixels(a) - pixels(b)).mean())


def region_fraction(image, colour: str, box) -> float:
    """Fraction of the pixels inside ``box`` (x0, y0, x1, y1) labelled ``colour``."""
    labels = quality.label_map(image)
    x0, y0, x1, y1 = box
    return float((labels[y0:y1, x0:x1] == quality.PALETTE_NAMES.index(colour)).mean())


def toward(image, colour: str) -> float:
    """Mean over the picture of how much nearer (in RGB) each pixel is to ``colour`` than to the
    default grey background: a movement of the colour, not a palette label, so a background half
    way from grey to ``colour`` counts half way."""
    a = pixels(image) * 255.0
    nearer = np.linalg.norm(a - shapes.GREY, axis=-1) - np.linalg.norm(a - shapes.COLOURS[colour], axis=-1)
    return float(nearer.mean())
