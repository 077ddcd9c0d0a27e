"""Fixtures of the reliability suite: the studio launched in-process (demo mode, the tiny offline
SD3 family) through the same launcher as tests/test_api.py, and a client for it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

gradio_client = pytest.importorskip("gradio_client")

from tests.conftest_ui import running_studio  # noqa: E402
from tests.reliability.kit import new_client  # noqa: E402


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_family):
    """One launched studio per test module: ``app.client``, ``app.studio``, ``app.url``."""
    with running_studio(tmp_path_factory.mktemp("rel") / "data", tiny_family) as (url, studio):
        client = new_client(url, tmp_path_factory.mktemp("downloads"))
        yield SimpleNamespace(url=url, studio=studio, client=client,
                              new_client=lambda: new_client(url, tmp_path_factory.mktemp("downloads")))
