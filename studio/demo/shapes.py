"""Procedural training data for the demo model: flat coloured shapes on a flat background.

One or two objects a picture, drawn at 256×256 with Pillow (2× supersampled, so edges are
anti-aliased), each described by a prompt in one small grammar::

    a red circle on a white background
    a large blue square at the left and a small yellow triangle at the right

Everything is deterministic from a seed (``numpy.random.Generator``). The same module is what
the quality check (``studio.demo.quality``) and the semantic tests read: the palette, the anchor
of each named position, and which colour×shape×position combinations are held out of training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

SIZE = 256  # the training and measuring resolution, pixels

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 165, 60),
    "blue": (40, 80, 225),
    "yellow": (245, 215, 35),
    "orange": (245, 135, 20),
    "purple": (140, 50, 185),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
GREY = (128, 128, 128)  # the background when the prompt names none
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")

# Where a named position puts an object's centre, as a fraction of the picture (x, y).
ANCHORS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
# Half the object's extent as a fraction of the picture: small, unnamed, large.
RADII: dict[str | None, tuple[float, float]] = {"small": (0.09, 0.12), None: (0.13, 0.17), "large": (0.19, 0.24)}
JITTER = 0.05  # ± around a named anchor
FREE = (0.3, 0.7)  # an unplaced object's centre, each axis
PAIRS = (("left", "right"), ("top", "bottom"))  # the positions two objects take

# Every word the grammar uses: the shared tiny tokenizers hold each as one token.
VOCABULARY = tuple(dict.fromkeys(
    ["a", "an", "at", "the", "in", "and", "on", "background"]
    + list(COLOURS) + ["grey", "gray"] + list(SHAPES) + list(SIZES) + list(POSITIONS)
))

_MIRROR = {"left": "right", "right": "left"}


def is_held_out(colour: str, shape: str, position: str | None) -> bool:
    """Colour×shape×position combinations never drawn in training (the quality check's test set).

    One colour per (shape, position) pair: 20 of the 160 combinations, every colour, shape and
    position still seen in others. Left and right are held out together, so the left↔right
    flip of a training picture is never a held-out one.
    """
    if position is None:
        return False
    pos_class = {"left": 0, "right": 0, "top": 1, "bottom": 2, "center": 3}[position]
    ci, si = list(COLOURS).index(colour), SHAPES.index(shape)
    return (ci + 2 * si + 3 * pos_class) % 8 == 0


HELD_OUT = tuple((c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS if is_held_out(c, s, p))


@dataclass(frozen=True)
class Shape:
    """One object of a scene: its colour, shape, optional size and position words, and where it is drawn."""
    colour: str
    shape: str
    size: str | None  # named size, or None
    position: str | None  # named position, or None
    cx: float  # centre and half-extent, fractions of the picture
    cy: float
    r: float
    colour_named: bool = True  # "a large circle": the colour left to the model

    def phrase(self) -> str:
        """The object's words in a prompt, e.g. "a large blue square at the left"."""
        words = [w for w in (self.size, self.colour if self.colour_named else None, self.shape) if w]
        article = "an" if words[0][0] in "aeiou" else "a"
        text = " ".join([article, *words])
        if self.position == "center":
            text += " in the center"
        elif self.position:
            text += f" at the {self.position}"
        return text


@dataclass(frozen=True)
class Scene:
    """One training picture: one or two objects on a background (None: the default grey)."""
    objects: tuple[Shape, ...]
    background: str | None  # named background colour, or None for the default grey

    @property
    def prompt(self) -> str:
        """The scene's prompt, e.g. "a red circle on a white background"."""
        text = " and ".join(o.phrase() for o in self.objects)
        if self.background:
            text += f" on a {self.background} background"
        return text

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        """The background's RGB colour."""
        return COLOURS[self.background] if self.background else GREY

    def mirrored(self) -> Scene:
        """The left↔right flip of the scene, prompt words swapped."""
        return Scene(tuple(replace(o, cx=1.0 - o.cx, position=_MIRROR.get(o.position, o.position))
                           for o in self.objects), self.background)


def _place(rng: np.random.Generator, position: str | None, r: float) -> tuple[float, float]:
    if position is None:
        cx, cy = rng.uniform(*FREE, size=2)
    else:
        ax, ay = ANCHORS[position]
        cx, cy = ax + rng.uniform(-JITTER, JITTER), ay + rng.uniform(-JITTER, JITTER)
    margin = r + 0.02  # keep the whole shape inside the picture
    return float(np.clip(cx, margin, 1 - margin)), float(np.clip(cy, margin, 1 - margin))


def _shape(rng, colour, shape, size, position, named_size: bool) -> Shape:
    r = float(rng.uniform(*RADII[size]))
    cx, cy = _place(rng, position, r)
    return Shape(colour, shape, size if named_size else None, position, cx, cy, r)


def sample_scene(
    rng: np.random.Generator,
    *,
    two_objects: float = 0.2,
    held_out: bool = False,
) -> Scene:
    """A random scene; ``held_out=False`` never draws a held-out combination (training),
    ``held_out=True`` draws one object of a held-out combination only (the quality check)."""
    colours = list(COLOURS)
    background = str(rng.choice(colours)) if rng.random() < 0.5 else None
    palette = [c for c in colours if c != background]
    if held_out:
        choices = [h for h in HELD_OUT if h[0] != background]
        colour, shape, position = choices[rng.integers(len(choices))]
        size = str(rng.choice(SIZES)) if rng.random() < 0.7 else None
        return Scene((_shape(rng, colour, shape, size, position, size is not None),), background)
    while True:
        if rng.random() < two_objects:
            positions = PAIRS[rng.integers(len(PAIRS))]
            if rng.random() < 0.5:
                positions = positions[::-1]
            picked = rng.choice(len(palette), size=2, replace=False)
            objects = []
            for position, ci in zip(positions, picked):
                size = str(rng.choice(SIZES))
                objects.append(_shape(rng, palette[ci], str(rng.choice(SHAPES)), size, position,
                                      rng.random() < 0.7))
        else:
            position = str(rng.choice(POSITIONS)) if rng.random() < 0.8 else None
            size = str(rng.choice(SIZES)) if rng.random() < 0.7 else None
            obj = _shape(rng, str(rng.choice(palette)), str(rng.choice(SHAPES)), size, position, size is not None)
            objects = [obj if rng.random() < 0.9 else replace(obj, colour_named=False)]
        if not any(is_held_out(o.colour, o.shape, o.position) for o in objects):
            return Scene(tuple(objects), background)


def outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """The polygon of a shape in the same units as its centre (None for a circle)."""
    if shape == "square":
        h = 0.9 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # equilateral, point up, centred on its bounding box
        h = r * math.sqrt(3)
        return [(cx, cy - h / 2), (cx + r, cy + h / 2), (cx - r, cy + h / 2)]
    if shape == "star":  # five points, point up
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else 0.45 * r
            angle = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(angle), cy + rad * math.sin(angle) + 0.1 * r))
        return pts
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")


def _draw(scene: Scene, size: int, mode: str, background, fill):
    from PIL import Image, ImageDraw

    big = 2 * size
    image = Image.new(mode, (big, big), background)
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        cx, cy, r = o.cx * big, o.cy * big, o.r * big
        points = outline(o.shape, cx, cy, r)
        if points is None:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill(o))
        else:
            draw.polygon(points, fill=fill(o))
    return image.resize((size, size), Image.Resampling.BOX)


def render(scene: Scene, size: int = SIZE):
    """The scene as an RGB PIL image (drawn at 2× and box-filtered down)."""
    return _draw(scene, size, "RGB", scene.background_rgb, lambda o: COLOURS[o.colour])


def object_mask(scene: Scene, size: int = SIZE):
    """Where the objects are: an L image, 255 inside (anti-aliased edges)."""
    return _draw(scene, size, "L", 0, lambda o: 255)


def scenes(seed: int, count: int, **kwargs) -> list[Scene]:
    """``count`` scenes drawn from ``seed`` (keyword arguments go to :func:`sample_scene`)."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, **kwargs) for _ in range(count)]
