"""Inpainting helpers: masks in, the region to repaint, and pasting the result back.

* :func:`mask_from_editor` — a ``gr.ImageEditor``/``gr.ImageMask`` value (``background``,
  ``layers``, ``composite``) → (image, mask); the mask is the alpha of the painted layer.
* :func:`normalize_mask` — any mask image → an ``L`` mask (white = repaint) of the image's size.
* :func:`plan` — the box to repaint and the size to repaint it at: the whole picture, or only the
  masked region (mask bbox + padding, like A1111's "inpaint at full resolution"), scaled so the
  model works near its native pixel count.
* :func:`paste_back` — the repainted box, resized back, composited over the source through the
  blurred mask: pixels away from the mask are the source's, exactly.
Masks are stored by content in ``studio.blobs`` (``<data-dir>/masks/<sha256>.png``).

No torch, no Gradio: PIL only. Every image that comes in goes through
``studio.engine.images.open_image`` (header checked before decoding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageChops, ImageFilter, ImageOps

from studio.catalog import SIZE_MULTIPLE
from studio.engine.images import open_image
from studio.engine.limits import snap


class MaskError(ValueError):
    """A mask that cannot be used (empty); the message says what to paint."""


def _open(value, field: str) -> Image.Image | None:
    if value is None or (isinstance(value, dict) and not (value.get("path") or value.get("name"))):
        return None
    return open_image(value, field)


def mask_from_editor(value) -> tuple[Image.Image | None, Image.Image | None]:
    """(background image, mask from the painted layers' alpha) from an ImageEditor value.

    All layers count (union of their alphas); a layer with no alpha at all counts by luminance.
    Returns (None, None) when the editor is empty.
    """
    if not isinstance(value, dict):
        return _open(value, "init_image"), None
    background = _open(value.get("background"), "init_image")
    mask = None
    for layer in value.get("layers") or []:
        layer = _open(layer, "mask_image")
        if layer is None:
            continue
        alpha = layer.getchannel("A") if "A" in layer.getbands() else layer.convert("L")
        mask = alpha if mask is None else ImageChops.lighter(mask, alpha.resize(mask.size))
    if background is None:
        background = _open(value.get("composite"), "init_image")
    return background, mask


def normalize_mask(mask, size: tuple[int, int]) -> tuple[Image.Image, list[str]]:
    """A mask (PIL or path) → ``L`` at ``size`` (white = repaint, black = keep) and notes.

    RGBA/LA masks with any transparency count by alpha (an editor layer); others by luminance.
    Grey values are kept (soft masks). Raises MaskError when the mask is empty.
    """
    notes: list[str] = []
    mask = _open(mask, "mask_image")
    if getattr(mask, "is_animated", False):
        mask.seek(0)
    mask = ImageOps.exif_transpose(mask)
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        rgba = mask.convert("RGBA")
        alpha = rgba.getchannel("A")
        mask = alpha if alpha.getextrema()[0] < 255 else rgba.convert("L")
    elif mask.mode in ("I;16", "I;16B", "I;16L", "I"):
        mask = mask.point(lambda v: v / 256).convert("L")
    else:
        mask = mask.convert("L")
    if mask.size != tuple(size):
        notes.append(f"The mask is {mask.size[0]}×{mask.size[1]}; it was resized to the image's "
                     f"{size[0]}×{size[1]}.")
        mask = mask.resize(tuple(size), Image.Resampling.BILINEAR)
    if mask.getextrema()[1] < 128:
        raise MaskError("The mask is empty: paint the area to change (white in an uploaded mask).")
    return mask, notes


def blurred(mask: Image.Image, radius: int) -> Image.Image:
    """The mask feathered by a Gaussian blur of ``radius`` px (unchanged for 0)."""
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius and radius > 0 else mask


@dataclass
class Plan:
    """Where to repaint: the source's box and the size the model works at."""
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) of the source that is repainted
    size: tuple[int, int]  # (width, height) the model works at, multiples of the model's multiple


def work_size(w: int, h: int, target_pixels: int, min_side: int, max_side: int,
              multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """A size near ``target_pixels`` with the aspect of w×h, sides within the limits, snapped to
    ``multiple`` (the model's: 16 for SD3)."""
    scale = math.sqrt(target_pixels / (w * h))
    scale = min(scale, max_side / max(w, h))
    scale = max(scale, min_side / min(w, h))
    return (min(max_side, snap(w * scale, multiple)), min(max_side, snap(h * scale, multiple)))


def plan(mask: Image.Image, only_masked: bool, padding: int, target_pixels: int,
         min_side: int, max_side: int, size: tuple[int, int] | None = None,
         multiple: int = SIZE_MULTIPLE) -> Plan:
    """Where to repaint and at what size. ``size`` (the request's width/height) overrides the
    working size; the box is always the whole picture unless ``only_masked``."""
    W, H = mask.size
    box = (0, 0, W, H)
    if only_masked:
        bbox = mask.point(lambda v: 255 if v >= 128 else 0).getbbox() or mask.getbbox()
        x0, y0, x1, y1 = bbox
        x0, y0 = max(0, x0 - padding), max(0, y0 - padding)
        x1, y1 = min(W, x1 + padding), min(H, y1 + padding)
        # at least min_side/4 px around small masks so the model sees some context
        need = max(16, min_side // 4)
        if x1 - x0 < need:
            cx = (x0 + x1) // 2
            x0, x1 = max(0, cx - need // 2), min(W, max(0, cx - need // 2) + need)
        if y1 - y0 < need:
            cy = (y0 + y1) // 2
            y0, y1 = max(0, cy - need // 2), min(H, max(0, cy - need // 2) + need)
        box = (x0, y0, x1, y1)
    bw, bh = box[2] - box[0], box[3] - box[1]
    if size is not None:
        return Plan(box, size)
    return Plan(box, work_size(bw, bh, target_pixels, min_side, max_side, multiple))


def crop_inputs(image: Image.Image, mask: Image.Image, p: Plan) -> tuple[Image.Image, Image.Image]:
    """The source and mask cut to the plan's box, at the working size."""
    img = image.crop(p.box)
    m = mask.crop(p.box)
    if img.size != p.size:
        img = img.resize(p.size, Image.Resampling.LANCZOS)
        m = m.resize(p.size, Image.Resampling.BILINEAR)
    return img, m


def paste_back(source: Image.Image, result: Image.Image, soft_mask: Image.Image, p: Plan) -> Image.Image:
    """The repainted box composited over the source through the (blurred) mask."""
    x0, y0, x1, y1 = p.box
    patch = result.convert("RGB")
    if patch.size != (x1 - x0, y1 - y0):
        patch = patch.resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS)
    out = source.copy()
    out.paste(patch, (x0, y0), soft_mask.crop(p.box))
    return out


def editor_value(image, mask=None) -> dict:
    """An ImageEditor value showing ``image`` with ``mask`` painted over it (white strokes where
    the mask is white): what "reuse parameters" puts back into the Inpaint tab. Both are files
    (stored inputs); they are opened with the header check."""
    background = open_image(image, "init_image").convert("RGBA")
    layers = []
    if mask is not None:
        m = open_image(mask, "mask_image").convert("L")
        if m.size != background.size:
            m = m.resize(background.size, Image.Resampling.BILINEAR)
        layer = Image.new("RGBA", background.size, (255, 255, 255, 0))
        layer.putalpha(m)
        layers.append(layer)
    return {"background": background, "layers": layers, "composite": None}
