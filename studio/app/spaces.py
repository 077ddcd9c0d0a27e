"""Running as a Hugging Face Space (``app.py`` at the repo root is the entry file).

* Detection: ``SPACE_ID`` is set on every Space.
* ZeroGPU: :func:`gpu` wraps a function in ``spaces.GPU(duration=...)`` when the ``spaces``
  package is installed (it is on Spaces) and is a no-op elsewhere. ``app.py`` imports ``spaces``
  before anything imports torch, as ZeroGPU requires. The two GPU entry points are
  :func:`run_generate` (every generation, from ``studio/ui/jobs.py``) and :func:`run_load`
  (model loads, from ``Studio.load_model``); both are decorated at import time, before launch.
* Space mode: the studio is ``shared`` (a gallery per browser session, catalog models only, no
  token field, no unload), the data dir is ``/data/sd35-studio`` on persistent storage or a temp
  dir, the real default model (``SD35_STUDIO_DEMO=1`` runs the offline demo family instead),
  listening on ``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT`` (0.0.0.0:7860). Nothing is
  generated at start-up (no examples are cached) and the model loads on the first Generate.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from studio.config import on_space  # noqa: F401 — part of this module's interface

GENERATE_S = int(os.environ.get("SD35_STUDIO_GPU_DURATION", "120"))  # ZeroGPU seconds per call
LOAD_S = int(os.environ.get("SD35_STUDIO_LOAD_DURATION", "180"))
TRUE = ("1", "true", "yes", "on")


def demo_requested() -> bool:
    return os.environ.get("SD35_STUDIO_DEMO", "").strip().lower() in TRUE


def gpu(fn=None, *, duration: int = 60):
    """``spaces.GPU(fn, duration=duration)`` where the ``spaces`` package exists, else ``fn``.

    Usable as ``gpu(fn, duration=...)`` or as a decorator ``@gpu(duration=...)``."""
    if fn is None:
        return lambda f: gpu(f, duration=duration)
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn, duration=duration)


@gpu(duration=GENERATE_S)
def run_generate(engine, req, **kwargs):
    """The engine's generate call, holding a (Zero)GPU for its duration."""
    return engine.generate(req, **kwargs)


@gpu(duration=LOAD_S)
def run_load(models, source, **kwargs):
    """A model load, holding a (Zero)GPU for its duration."""
    return models.load(source, **kwargs)


def space_data_dir(persistent: str | os.PathLike = "/data") -> Path:
    """``<persistent>/sd35-studio`` when the Space has persistent storage (the folder exists and
    is writable), else a folder in the temp dir (the Space's disk is ephemeral anyway)."""
    root = Path(persistent)
    if root.is_dir() and os.access(root, os.W_OK | os.X_OK):
        target = root / "sd35-studio"
        try:
            target.mkdir(parents=True, exist_ok=True)
            return target
        except OSError:
            pass
    return Path(tempfile.gettempdir()) / "sd35-studio"


def space_config():
    """The StudioConfig of a Space run (``SD35_STUDIO_DATA_DIR`` still wins for the data dir)."""
    from studio.config import StudioConfig

    data_dir = os.environ.get("SD35_STUDIO_DATA_DIR") or space_data_dir()
    return StudioConfig(
        data_dir=data_dir,
        demo=demo_requested(),
        host=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
        port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
    )


def build_space(config=None):
    """(studio, demo, launch kwargs) for a Space run; nothing is loaded or generated yet."""
    from types import SimpleNamespace

    from studio.app.server import launch_kwargs
    from studio.logs import install_logging
    from studio.service import Studio
    from studio.ui.app import build_app, launch_options

    install_logging()
    config = config or space_config()
    studio = Studio(config, shared=True)
    studio.start()
    demo = build_app(studio)
    demo.queue(default_concurrency_limit=1, max_size=64)
    kwargs = launch_kwargs(config, SimpleNamespace())  # no share link, no auth (Space settings decide)
    kwargs.update(launch_options())
    return studio, demo, kwargs


def main() -> None:
    """Entry of ``app.py``."""
    from studio.app.server import launch
    from studio.logs import install_logging, quiet_libraries, redact_streams

    redact_streams()
    if os.environ.get("SD35_STUDIO_OFFLINE", "").strip().lower() in TRUE:
        os.environ["HF_HUB_OFFLINE"] = "1"
    quiet_libraries()
    studio, demo, kwargs = build_space()
    ok, message = studio.availability()
    print(("Model: " if ok else "No model yet: ") + message, flush=True)
    install_logging()
    launch(demo, kwargs, share_requested=False)
