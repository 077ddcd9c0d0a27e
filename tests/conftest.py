"""Shared fixtures. Tests never touch the network: the Hub is switched off before anything imports it."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """The four tiny variants, built once per test session: {variant: folder}."""
    from studio.demo.tiny import build_tiny_family

    return build_tiny_family(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def demo_config(tmp_path, tiny_family):
    """A demo-mode config whose data dir already holds the tiny family (no rebuild)."""
    from studio.config import StudioConfig

    config = StudioConfig(data_dir=tmp_path / "data", demo=True)
    config.tiny_dir.parent.mkdir(parents=True)
    config.tiny_dir.symlink_to(next(iter(tiny_family.values())).parent, target_is_directory=True)
    return config


@pytest.fixture
def studio(demo_config):
    from studio.service import Studio

    return Studio(demo_config)


@pytest.fixture
def main_here(capsys, monkeypatch, tmp_path):
    """``launch.py ARGS`` in this process (``studio.app.cli.main``, what launch.py runs): a callable
    that returns the exit status, stdout and stderr, as a subprocess's would be. The Hub cache is
    an empty one of the test's own, so no model that happens to be cached here is found. It spares
    a test the interpreter start and the torch/diffusers imports of a subprocess."""
    from types import SimpleNamespace

    import huggingface_hub.constants

    from studio.app.cli import main

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))

    def call(*args):
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's refusals
            code = e.code
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return call


@pytest.fixture(autouse=True, scope="session")
def patient_gradio_self_check():
    """Gradio's ``launch()`` asks its own URL whether it is up (``networking.url_ok``): a HEAD
    with a 3 s timeout, which gives up on the first timeout and then refuses to start ("When
    localhost is not accessible, a shareable link must be created"). On two cores busy with the
    rest of the suite the first answer can take longer (CI failed so, three module fixtures at
    once). The in-process test servers get the same check with patience: up to 60 s."""
    import time

    import gradio.networking as networking
    import httpx

    original = networking.url_ok

    def url_ok(url: str) -> bool:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.head(url, timeout=10, verify=False).status_code in (200, 401, 301, 302, 303, 307, 308):
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        return False

    networking.url_ok = url_ok
    yield
    networking.url_ok = original


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    """pytest-playwright drives Debian's Chromium (no browser download), headless and offline."""
    from tests.conftest_ui import CHROMIUM

    return {
        **browser_type_launch_args,
        "executable_path": CHROMIUM,
        "args": ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"],
    }
