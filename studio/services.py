"""The studio's long-lived services, built once per process and shared by the UI and the API."""

from __future__ import annotations

from functools import cached_property

from .config import StudioConfig


class Studio:
    """Owns the model manager, the engine and the gallery. Nothing heavy is imported until used,
    so the web page is served before any model (or torch) is loaded."""

    def __init__(self, config: StudioConfig):
        self.config = config
        config.ensure_dirs()

    @cached_property
    def models(self):
        from .models import ModelManager

        return ModelManager(self.config)

    @cached_property
    def gallery(self):
        from .gallery import Gallery

        return Gallery(self.config.data_dir)

    @cached_property
    def engine(self):
        from .engine import Engine

        return Engine(self.models, self.gallery)

    def availability(self, variant: str | None = None) -> tuple[bool, str]:
        """Whether the weights for a variant are here; if not, how to get them (no network)."""
        if self.config.demo:
            return True, "Demo mode: the offline tiny SD3 family (random weights)."
        return self.models.availability(variant)

    # -- the single entry points the UI and API use --

    shared: bool = False  # True behind a share link or on a Space: hide owner-only settings

    def load_model(self, source: str | None = None, variant: str | None = None,
                   preset: str | None = "auto", progress=None):
        """Load (or hot-swap to) a model with a memory preset ("auto": the planner's choice).

        Raises ModelError with a message for the user. The previous model stays loaded on failure.
        """
        from .models import placement_for

        placement = placement_for(self.config, preset, variant)
        return self.models.load(source, variant=variant, placement=placement, progress=progress)

    def owner_for(self, request) -> str | None:
        """Whose gallery a web request sees: None (everything) on a private local run; the
        browser session on shared deployments."""
        if not self.shared or request is None:
            return None
        return getattr(request, "session_hash", None)
