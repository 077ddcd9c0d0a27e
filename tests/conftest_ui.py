"""Launching the studio's web app in-process for the API and browser tests (demo mode: the tiny
offline SD3 family), and the helpers the browser suites share. Imported by the API and browser
tests; the Chromium launch options are a fixture in tests/conftest.py."""

from __future__ import annotations

import socket
from contextlib import contextmanager
from types import SimpleNamespace


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_studio(data_dir, tiny_family=None, shared: bool = False):
    """Yield (url, studio) for a launched app; closes it afterwards.

    ``tiny_family`` (the session fixture from conftest.py) is linked in so the demo models are
    not rebuilt per module.
    """
    from studio.config import StudioConfig
    from studio.app.server import launch_kwargs
    from studio.service import Studio
    from studio.ui.app import build_app, launch_options

    config = StudioConfig(data_dir=data_dir, demo=True, port=free_port())
    if tiny_family:
        config.tiny_dir.parent.mkdir(parents=True, exist_ok=True)
        config.tiny_dir.symlink_to(next(iter(tiny_family.values())).parent, target_is_directory=True)
    studio = Studio(config)
    studio.shared = shared
    demo = build_app(studio)
    demo.queue(default_concurrency_limit=1, max_size=64)
    kwargs = launch_kwargs(config, SimpleNamespace())
    kwargs.update(quiet=True, prevent_thread_lock=True)
    demo.launch(**kwargs, **launch_options())
    try:
        yield f"http://127.0.0.1:{config.port}/", studio
    finally:
        demo.close()


# --- browser suites ------------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
BROWSER_TIMEOUT_MS = 60_000  # generous: the CPU is shared


def open_studio(page, url: str):
    """Open the studio in ``page`` and wait until the first tab is usable."""
    from playwright.sync_api import expect

    page.set_default_timeout(BROWSER_TIMEOUT_MS)
    page.goto(url)
    expect(page.locator("#txt2img-generate")).to_be_visible()
    return page


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")
