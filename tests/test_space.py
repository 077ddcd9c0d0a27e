"""Hugging Face Space mode: README front matter, app.py (``spaces`` before torch, GPU wrappers),
the data dir, the demo switch, and what a Space hides or refuses. The isolation and file-access
tests run against a Space-mode app in tests/test_security.py (the ``space`` deployment)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest_ui import free_port
from tests.test_security import FAST, _link_tiny, space_studio

ROOT = Path(__file__).resolve().parents[1]

FAKE_SPACES = '''
import json, os, sys
def _write(**kw):
    with open(os.environ["FAKE_SPACES_LOG"], "a") as f:
        f.write(json.dumps(kw) + "\\n")
_write(event="import", torch_loaded="torch" in sys.modules)
def GPU(fn=None, duration=60):
    if fn is None:
        return lambda f: GPU(f, duration=duration)
    _write(event="wrap", name=fn.__name__, duration=duration)
    def wrapper(*a, **k):
        _write(event="call", name=fn.__name__)
        return fn(*a, **k)
    wrapper.__name__ = fn.__name__
    return wrapper
'''


def _front_matter() -> tuple[dict, str]:
    text = (ROOT / "README.md").read_text()
    assert text.startswith("---\n"), "the front matter must be at the very top of README.md"
    head, _, body = text[4:].partition("\n---\n")
    meta = {}
    for line in head.splitlines():
        key, _, value = line.partition(":")
        meta[key.strip()] = value.strip()
    return meta, body


def test_readme_front_matter_makes_the_repo_a_gradio_space():
    import gradio

    meta, body = _front_matter()
    assert meta["sdk"] == "gradio"
    assert meta["sdk_version"] == gradio.__version__ == "6.31.0"
    assert meta["python_version"] == '"3.12"'
    assert meta["app_file"] == "app.py" and (ROOT / "app.py").is_file()
    assert meta["pinned"] == "false"
    assert meta["title"] and meta["emoji"] and 0 < len(meta["short_description"]) <= 60
    assert "# SD3.5 Studio" in body and "## Deploying: Space, share link, security" in body


def test_gpu_is_a_no_op_without_spaces_and_wraps_with_it(monkeypatch):
    from studio.app import spaces as spaces_support

    def f(x):
        return x + 1

    monkeypatch.setitem(sys.modules, "spaces", None)  # import spaces -> ImportError
    assert spaces_support.gpu(f, duration=5) is f
    calls = []
    fake = SimpleNamespace(GPU=lambda fn, duration: calls.append((fn, duration)) or (lambda *a: fn(*a) * 10))
    monkeypatch.setitem(sys.modules, "spaces", fake)
    assert spaces_support.gpu(f, duration=42)(1) == 20
    assert spaces_support.gpu(duration=7)(f)(2) == 30
    assert calls == [(f, 42), (f, 7)]


def test_space_data_dir(tmp_path):
    from studio.app.spaces import space_data_dir

    persistent = tmp_path / "data"
    persistent.mkdir()
    assert space_data_dir(persistent) == persistent / "sd35-studio"
    assert (persistent / "sd35-studio").is_dir()
    fallback = space_data_dir(tmp_path / "no-persistent-storage")
    assert fallback.parent == Path(__import__("tempfile").gettempdir())
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        assert space_data_dir(ro).parent == fallback.parent


def test_space_config_real_model_by_default_demo_on_request(monkeypatch, tmp_path):
    from studio.app.spaces import on_space, space_config

    monkeypatch.setenv("SPACE_ID", "me/studio")
    monkeypatch.setenv("SD35_STUDIO_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.delenv("SD35_STUDIO_DEMO", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    assert on_space()
    config = space_config()
    assert config.demo is False and config.model is None  # the catalog's default variant
    assert config.host == "0.0.0.0" and config.port == 7860
    assert config.data_dir == (tmp_path / "d").resolve()
    monkeypatch.setenv("SD35_STUDIO_DEMO", "1")
    assert space_config().demo is True


def test_owner_is_session_or_login_and_never_everything(tmp_path):
    from studio.config import StudioConfig
    from studio.service import Studio

    studio = Studio(StudioConfig(data_dir=tmp_path / "d", demo=True))
    req = SimpleNamespace(session_hash="abc", username=None)
    assert studio.owner_for(req) is None  # a private run sees everything
    studio.shared = True
    assert studio.owner_for(req) == "s:abc"
    assert studio.owner_for(SimpleNamespace(session_hash="abc", username="alice")) == "u:alice"
    # a client-chosen session hash cannot name a login, and no request means no one's images
    assert studio.owner_for(SimpleNamespace(session_hash="u:alice", username=None)) != "u:alice"
    a, b = studio.owner_for(None), studio.owner_for(None)
    assert a and b and a != b


@pytest.fixture(scope="module")
def space_app(tmp_path_factory, tiny_family):
    with space_studio(tmp_path_factory.mktemp("space") / "data", tiny_family) as (url, studio):
        yield url, studio


def test_space_mode_hides_owner_settings_and_starts_idle(space_app):
    import httpx

    url, studio = space_app
    assert studio.shared is True and studio.config.demo is True
    config = httpx.get(url + "config", timeout=10).json()
    by_id = {c.get("props", {}).get("elem_id"): c for c in config["components"]}
    for elem_id in ("models-source", "models-unload", "models-hf"):
        assert by_id[elem_id]["props"].get("visible") is False, elem_id
    assert by_id["models-variant"]["props"].get("visible") is not False
    assert not any(c.get("type") in ("dataset", "examples") for c in config["components"])  # no examples
    # nothing ran at start-up: no model loaded, nothing generated
    assert "models" not in studio.__dict__ or studio.models.current is None
    assert studio.gallery.count() == 0


def test_space_refuses_unload_and_foreign_variants(space_app):
    from studio.models import ModelError

    _, studio = space_app
    with pytest.raises(ModelError, match="stays loaded for everyone"):
        studio.unload_model()
    with pytest.raises(ModelError, match="Unknown variant"):
        studio.load_model(variant="../../etc")
    with pytest.raises(ModelError, match="catalog only"):
        studio.load_model(source="/root/.cache/huggingface")


def test_app_py_runs_the_space_with_spaces_imported_before_torch(tmp_path, tiny_family):
    """`python app.py` as a Space runs it: a stand-in `spaces` package records when it was
    imported and which functions it wrapped and ran."""
    import gradio_client
    import httpx

    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "spaces.py").write_text(FAKE_SPACES)
    log = tmp_path / "spaces.log"
    data = tmp_path / "data"
    _link_tiny(data, tiny_family)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{ROOT}", "FAKE_SPACES_LOG": str(log),
           "SPACE_ID": "tester/sd35-studio", "SD35_STUDIO_DEMO": "1", "SD35_STUDIO_DATA_DIR": str(data),
           "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out.txt"
    with open(out, "wb") as fo:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=fo, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, out.read_text()
            try:
                if httpx.get(url + "config", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "app.py did not start"
            time.sleep(0.5)
        client = gradio_client.Client(url, verbose=False, analytics_enabled=False, download_files=False)
        client.predict(variant="sd3.5-medium", source="", preset="auto", api_name="/load_model")
        images, _, _ = client.predict(prompt="a space fox", seed=2, **FAST, api_name="/txt2img")
        assert len(images) == 1
        assert client.predict(api_name="/gallery_list")["total"] == 1
        other = gradio_client.Client(url, verbose=False, analytics_enabled=False, download_files=False)
        assert other.predict(api_name="/gallery_list")["total"] == 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert events[0] == {"event": "import", "torch_loaded": False}
    wraps = {e["name"]: e["duration"] for e in events if e["event"] == "wrap"}
    assert set(wraps) == {"run_generate", "run_load"} and all(d >= 60 for d in wraps.values())
    calls = [e["name"] for e in events if e["event"] == "call"]
    assert "run_generate" in calls and "run_load" in calls
    assert (data / "gallery.sqlite").is_file()  # the data dir came from the environment
