"""Gradio components that hand the studio what the client sent, undecoded.

Gradio's own image components open (and the editor fully decodes) every upload in their
``preprocess`` — before the studio can check the image's header. A text file renamed ``.png``
then fails inside Gradio with a generic error and a traceback, and a 169-megapixel PNG is
decoded before anyone refuses it. These subclasses pass file paths through instead; the engine
opens them with ``studio.engine.images.open_image`` (size, pixels and aspect from the header,
then decode) and refuses what is wrong with a message that names the input.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import gradio as gr
from gradio.data_classes import FileData


class _Builtin:
    """The browser draws these with Gradio's own component of the same name: without this, a
    subclass counts as a custom component, whose files the page fetches one by one (and Gradio
    prints a line in the server's console for each)."""

    BLOCK_NAME = ""
    BASE: type | None = None  # the Gradio class whose constructor names the props sent to the page

    def get_block_name(self) -> str:
        return self.BLOCK_NAME

    def get_block_class(self) -> str:
        return self.BLOCK_NAME

    def get_config(self, cls=None):
        # Gradio reads the props from the constructor's signature: ours is (*args, **kwargs), so
        # without this the page would get none of them (height, sources, brush, label…)
        return super().get_config(cls or self.BASE)


class RawNumber(_Builtin, gr.Number):
    """A number input that hands the engine what the client sent (no rounding, no coercion): the
    engine refuses what is wrong with a message that names the field."""

    BLOCK_NAME, BASE = "number", gr.Number

    def preprocess(self, payload):
        """The value as the client sent it."""
        return payload


class ImagePath(_Builtin, gr.Image):
    """``gr.Image(type="filepath")`` that does not open the file: the path, as uploaded."""

    BLOCK_NAME, BASE = "image", gr.Image

    def __init__(self, *args, **kwargs):
        kwargs["type"] = "filepath"
        super().__init__(*args, **kwargs)

    def preprocess(self, payload):
        """The uploaded file's path (pasted data URLs are written to Gradio's cache first)."""
        if payload is None:
            return None
        if getattr(payload, "url", None) and str(payload.url).startswith("data:"):
            return super().preprocess(payload)  # pasted data URLs: Gradio writes them to its cache
        return payload.path


class ImageMaskPaths(_Builtin, gr.ImageMask):
    """``gr.ImageMask(type="filepath")`` whose background and layers arrive as file paths,
    undecoded (canvas layers sent as bytes are written to Gradio's cache as they are)."""

    BLOCK_NAME, BASE = "imageeditor", gr.ImageMask

    def __init__(self, *args, **kwargs):
        kwargs["type"] = "filepath"
        super().__init__(*args, **kwargs)

    def convert_and_format_image(self, file, flatten_on_white: bool = False):
        """A layer's file path, as uploaded (bytes are written to Gradio's cache)."""
        if file is None:
            return None
        if isinstance(file, FileData):
            return file.path
        folder = Path(self.GRADIO_CACHE) / secrets.token_hex(16)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "layer.png"
        path.write_bytes(bytes(file))
        return str(path)
