"""The errors whose message is meant for the user. Each one says what was wrong and what to do.

They live at the bottom of the package (no torch, no Gradio) so every layer can raise them and
the UI can catch them without importing the engine or the model manager.
"""

from __future__ import annotations


class StudioError(Exception):
    """Base of every error the studio shows to its user as it is."""


class ValidationError(StudioError, ValueError):
    """A request that cannot run. ``field`` names the offending input; the message says why."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class GenerationError(StudioError, RuntimeError):
    """A generation that failed while running (out of memory, ...). The message says what to do."""


class ModelError(StudioError):
    """A model could not be found or loaded. The message says what to do."""


class GalleryError(StudioError):
    """The gallery could not store or read an image (disk full, read-only folder, ...)."""
