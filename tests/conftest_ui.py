"""Launching the studio's web app in-process for the API and browser tests (demo mode: the tiny
offline SD3 family), and the helpers the browser suites share. Imported by the API and browser
tests; the Chromium launch options are a fixture in tests/conftest.py."""

from __future__ import annotations

import socket
from contextlib import contextmanager
from types import SimpleNamespace

API_TIMEOUT_S = 120


def api_client(url: str, downloads=False, **kw):
    """A gradio_client for the API tests, with a patient HTTP timeout. httpx's default (5 s)
    covers every POST the client makes, /queue/join included; on two cores that are also
    generating, an answer can take longer than that, which is slowness, not a failure.
    ``downloads``: a folder for returned files, or False for the server's FileData."""
    import gradio_client

    return gradio_client.Client(url, verbose=False, analytics_enabled=False,
                                download_files=str(downloads) if downloads else False,
                                httpx_kwargs={"timeout": API_TIMEOUT_S}, **kw)


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
    from studio.app.server import launch_kwargs
    from studio.config import StudioConfig
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
    expect.set_options(timeout=20_000)  # assertions too: a queued handler can take seconds on a busy CPU
    page.goto(url)
    expect(page.locator("#txt2img-generate")).to_be_visible(timeout=BROWSER_TIMEOUT_MS)  # a busy CPU is slow
    return page


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def open_tab(page, name: str) -> None:
    """Open a tab by its label; on a narrow screen Gradio moves the tabs that do not fit into a
    "More tabs" menu, so the tab is picked from there."""
    tab = page.locator("#sd-tabs [role=tablist]").get_by_role("tab", name=name, exact=True)
    if tab.count() and tab.first.is_visible():
        tab.first.click()
        return
    page.locator("#sd-tabs .overflow-menu > button").click()
    page.locator("#sd-tabs .overflow-dropdown").get_by_role("button", name=name, exact=True).click()


def screenshot_dir():
    """Where the browser suites save screenshots: $STUDIO_SCREENSHOTS, else $OUT/screenshots, else
    tests/screenshots (git-ignored)."""
    import os
    from pathlib import Path

    folder = os.environ.get("STUDIO_SCREENSHOTS") or (
        str(Path(os.environ["OUT"]) / "screenshots") if os.environ.get("OUT") else None)
    path = Path(folder) if folder else Path(__file__).resolve().parent / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


def boxes(page, selector: str) -> list[dict]:
    """The bounding boxes of every element matching ``selector`` (page coordinates)."""
    return page.eval_on_selector_all(selector, """els => els.map(e => {
        const r = e.getBoundingClientRect();
        return {x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height};
    })""")
