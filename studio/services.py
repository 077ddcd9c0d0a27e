"""The studio's long-lived services, built once per process and shared by the UI and the API."""

from __future__ import annotations

import secrets
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

    # True behind a share link, with --shared, or on a Space. Then: a gallery per login / browser
    # session (owner_for), models from the catalog only (load_model), no unload, and the UI hides
    # what only the machine's owner should change (token field, model source, unload).
    shared: bool = False

    def load_model(self, source: str | None = None, variant: str | None = None,
                   preset: str | None = "auto", progress=None):
        """Load (or hot-swap to) a model with a memory preset ("auto": the planner's choice).

        Raises ModelError with a message for the user. The previous model stays loaded on failure.
        """
        from .models import ModelError, placement_for
        from .spaces_support import run_load

        if self.shared:
            from .catalog import VARIANTS

            if source:
                raise ModelError(
                    "This studio is shared: models come from the catalog only, so a source (a Hub id "
                    "or a path) is not accepted. Choose a variant instead: " + ", ".join(VARIANTS) + ".")
            if variant and variant not in VARIANTS:
                raise ModelError(f"Unknown variant {str(variant)[:60]!r}; choose one of: {', '.join(VARIANTS)}.")
        placement = placement_for(self.config, preset, variant)
        return run_load(self.models, source, variant=variant, placement=placement, progress=progress)

    def unload_model(self) -> None:
        """Free the model's memory. Not on shared deployments: the model is everyone's."""
        from .models import ModelError

        if self.shared:
            raise ModelError("This studio is shared: the model stays loaded for everyone using it.")
        self.models.unload()

    def owner_for(self, request) -> str | None:
        """Whose gallery a web request sees: None (everything) on a private local run. On shared
        deployments: the login (``u:<name>``) when the studio runs with --auth, else the browser
        session (``s:<session hash>``); the prefixes keep a client-chosen session hash from ever
        naming a login. A request without either gets a fresh owner that matches nothing."""
        if not self.shared:
            return None
        username = getattr(request, "username", None)
        if username:
            return f"u:{username}"
        session = getattr(request, "session_hash", None)
        if session:
            return f"s:{session}"
        return f"none:{secrets.token_hex(8)}"
