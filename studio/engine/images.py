"""Image inputs: every one is checked from its header before a single pixel is decoded.

The init image, the inpaint mask, a control image and an image to upscale all come through
:func:`open_image`, from the API and the UI alike (Gradio hands over file paths, so nothing is
decoded before this check). The file's size, width × height, pixel count and aspect ratio are
read from the header; only an image within every limit of ``studio.engine.limits`` is decoded.
Messages name the upload by its own file name, never by a server path.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from studio.engine.limits import MAX_IMAGE_ASPECT, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
from studio.errors import ValidationError

# field → how messages name the input
LABELS = {
    "init_image": "The init image",
    "mask_image": "The mask",
    "control_image": "The control image",
    "image": "The image",
}


def _label(field: str) -> str:
    return LABELS.get(field, "The image")


def _source(src) -> tuple[object, str]:
    """(something PIL can open, the name to show) for a path, FileData dict, bytes or file."""
    if isinstance(src, dict):  # Gradio FileData
        src = src.get("path") or src.get("name")
    if isinstance(src, (bytes, bytearray)):
        return io.BytesIO(src), "the uploaded image"
    if isinstance(src, (str, os.PathLike)):
        return src, Path(src).name or "the image"
    raise TypeError(type(src).__name__)


def _size_of(fp, field: str, name: str) -> int | None:
    try:
        if isinstance(fp, io.BytesIO):
            return fp.getbuffer().nbytes
        return os.path.getsize(fp)
    except FileNotFoundError:
        raise ValidationError(f"{_label(field)} ({name}) was not found: upload it again.", field) from None
    except OSError as e:
        raise ValidationError(f"{_label(field)} ({name}) could not be read ({e.strerror}).", field) from None


def check_dimensions(width: int, height: int, field: str = "init_image", name: str = "") -> None:
    """Refuse sizes past the limits: no pixels, too many pixels, too extreme an aspect ratio."""
    label = _label(field) + (f" ({name})" if name else "")
    if width < 1 or height < 1:
        raise ValidationError(f"{label} is empty ({width}×{height} pixels).", field)
    pixels = width * height
    if pixels > MAX_IMAGE_PIXELS:
        raise ValidationError(
            f"{label} is {width}×{height} = {pixels / 1e6:.0f} MP; the limit is {MAX_IMAGE_PIXELS / 1e6:.0f} MP "
            "(large images are refused before they are decoded). Downscale it first.", field)
    aspect = max(width, height) / min(width, height)
    if aspect > MAX_IMAGE_ASPECT:
        raise ValidationError(
            f"{label} is {width}×{height}, an aspect ratio of {aspect:,.0f}:1; the limit is "
            f"{MAX_IMAGE_ASPECT}:1 (the widest image SD3 makes is 2048×256). Crop it first.", field)


def open_image(src, field: str = "init_image"):
    """Open an image from a path, Gradio FileData, bytes or a PIL image, checking its header first.

    Returns a loaded PIL image. Raises ValidationError naming ``field`` and the fix: a file that
    is not an image, too big on disk, too many pixels, too extreme an aspect ratio, or corrupt.
    """
    from PIL import Image

    if isinstance(src, Image.Image):
        check_dimensions(*src.size, field=field)
        return src
    try:
        fp, name = _source(src)
    except TypeError as e:
        raise ValidationError(f"{_label(field)} must be an image file, not {e}.", field) from None
    if (_size_of(fp, field, name) or 0) > MAX_IMAGE_BYTES:
        raise ValidationError(f"{_label(field)} ({name}) is over {MAX_IMAGE_BYTES >> 20} MB; use a smaller file.",
                              field)
    try:
        image = Image.open(fp)  # reads the header only
    except Image.DecompressionBombError as e:  # Pillow's own guard, from the header (its text holds no path)
        raise ValidationError(f"{_label(field)} ({name}) is too large to decode safely: {e}", field) from None
    except (OSError, ValueError, SyntaxError):
        raise ValidationError(
            f"{_label(field)} ({name}) is not an image the studio can read: use a PNG, JPEG or WebP file.",
            field) from None
    check_dimensions(*image.size, field=field, name=name)
    try:
        image.load()
    except Image.DecompressionBombError:
        raise ValidationError(f"{_label(field)} ({name}) is too large to decode safely.", field) from None
    except (OSError, ValueError, SyntaxError, EOFError):
        raise ValidationError(
            f"{_label(field)} ({name}) is damaged and could not be decoded: re-save it as PNG or JPEG.",
            field) from None
    return image


def normalize_init_image(image, field: str = "init_image"):
    """Any image (RGBA, P, L, CMYK, 16-bit, EXIF-rotated, animated) → an RGB PIL image.

    Paths, bytes and FileData go through :func:`open_image` first (header checked before
    decoding). Transparent pixels become white."""
    from PIL import Image, ImageOps

    image = open_image(image, field)
    if getattr(image, "is_animated", False):
        image.seek(0)
    try:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            image = image.point(lambda v: v / 256).convert("L")
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        return image.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValidationError(f"{_label(field)} could not be decoded ({type(e).__name__}). Try re-saving it as "
                              "PNG or JPEG.", field) from None
