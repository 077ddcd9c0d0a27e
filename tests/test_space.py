"""Hugging Face Space mode: README front matter, app.py (``spaces`` before torch), the data dir,
the demo switch, what a Space hides or refuses, the model loaded at start-up — and ``python
app.py`` on ZeroGPU with the stand-in ``spaces`` (tests/zerogpu_standin): loading here, inference
in a forked worker, saving here. The isolation and file-access tests run against a Space-mode app
in tests/test_security.py (the ``space`` deployment); the ZeroGPU model piece by piece is in
tests/test_zerogpu.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest_ui import api_client, free_port
from tests.test_security import FAST, _link_tiny, space_studio

ROOT = Path(__file__).resolve().parents[1]

STANDIN = ROOT / "tests" / "zerogpu_standin"


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


def test_space_mode_hides_owner_settings_and_starts_with_the_model_loaded(space_app):
    import httpx

    url, studio = space_app
    assert studio.shared is True and studio.config.demo is True
    config = httpx.get(url + "config", timeout=10).json()
    by_id = {c.get("props", {}).get("elem_id"): c for c in config["components"]}
    for elem_id in ("models-source", "models-unload", "models-hf"):
        assert by_id[elem_id]["props"].get("visible") is False, elem_id
    assert by_id["models-variant"]["props"].get("visible") is not False
    assert not any(c.get("type") in ("dataset", "examples") for c in config["components"])  # no examples
    # the default variant was loaded before launch, in this process; nothing was generated
    assert studio.current is not None and studio.current.variant.name == "sd3.5-medium"
    assert studio.gpu_runner is None  # no ZeroGPU here: the local path
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


def _start_app(tmp_path, tiny_family, extra_env: dict):
    data = tmp_path / "data"
    _link_tiny(data, tiny_family)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{STANDIN}{os.pathsep}{ROOT}", "SPACE_ID": "tester/sd35-studio",
           "SD35_STUDIO_DEMO": "1", "SD35_STUDIO_DATA_DIR": str(data), "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1", **extra_env}
    out = tmp_path / "out.txt"
    with open(out, "wb") as fo:
        # a session of its own: the stand-in's forked GPU worker is stopped with it (see _stop)
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=fo, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, f"http://127.0.0.1:{port}/", out, data


def _wait_up(proc, url, out):
    import httpx

    deadline = time.time() + 300  # a loaded 2-core machine
    while True:
        assert proc.poll() is None, out.read_text()
        try:
            if httpx.get(url + "config", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "app.py did not start:\n" + out.read_text()[-3000:]
        time.sleep(0.5)


def _stop(proc):
    """Stop app.py and everything it started (the ZeroGPU stand-in forks a worker that would
    otherwise outlive it, holding its memory)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # a worker still there after the server stopped
    except ProcessLookupError:
        pass


def test_app_py_on_zerogpu_loads_here_infers_in_a_worker_and_saves_here(tmp_path, tiny_family):
    """`python app.py` on ZeroGPU (the stand-in, SPACES_ZERO_GPU=1): two generations, a variant
    switch, a third; the gallery holds all three; the second costs no load; progress reaches the
    client."""

    log = tmp_path / "standin.log"
    proc, url, out, data = _start_app(tmp_path, tiny_family, {"SPACES_ZERO_GPU": "1",
                                                              "ZEROGPU_STANDIN_LOG": str(log)})
    progress: list[str] = []
    try:
        _wait_up(proc, url, out)
        client = api_client(url)
        loads_at_start = out.read_text().count("model load:")
        first, _, _ = client.predict(prompt="a space fox", seed=2, **FAST, api_name="/txt2img")
        second, _, _ = client.predict(prompt="a space owl", seed=3, **FAST, api_name="/txt2img")
        loads_after_two = out.read_text().count("model load:")
        client.predict(variant="sd3.5-large", source="", preset="auto", api_name="/load_model")
        third, _, _ = client.predict(prompt="a space whale", seed=4, **FAST, api_name="/txt2img")
        assert len(first) == len(second) == len(third) == 1
        listing = client.predict(api_name="/gallery_list")
        assert listing["total"] == 3
        assert sorted(i["prompt"] for i in listing["items"]) == ["a space fox", "a space owl", "a space whale"]
        other = api_client(url)
        assert other.predict(api_name="/gallery_list")["total"] == 0  # per-session galleries still
        job = client.submit(prompt="a slow space heron", seed=5, steps=30, width=256, height=256,
                            api_name="/txt2img")
        while not job.done():
            status = job.status()
            progress += [p.desc for p in (status.progress_data or ()) if p.desc]
            time.sleep(0.05)
        assert len(job.result()[0]) == 1
    finally:
        _stop(proc)
    text = out.read_text()
    events = [json.loads(line) for line in log.read_text().splitlines()]
    main_pid = events[0]["pid"]
    assert events[0] == {"event": "import", "pid": main_pid, "torch_loaded": False, "zero_gpu": True}
    assert [e["function"] for e in events if e["event"] == "wrap"] == ["_gpu_generate"]
    # loads: one at start-up, one for the switch (the shared components reused), none in a worker
    loads = re.findall(r"model load: (.*)", text)
    assert loads_at_start == loads_after_two == 1 and len(loads) == 2, text
    assert loads[0].startswith("SD3.5 Medium (tiny demo)") and "transformer, vae" in loads[0]
    assert loads[1].startswith("SD3.5 Large (tiny demo)") and "read from disk: transformer (" in loads[1]
    assert "inside a GPU worker" not in text
    # the worker: forked for the first call, reused for the second (nothing reloaded), answers
    # "stale" after the switch and is replaced; every call asked for a duration within limits
    calls = [e for e in events if e["event"] == "call"]
    assert len(calls) == 5 and all(c["pid"] == main_pid != c["worker"] for c in calls)
    assert [c["fresh"] for c in calls[:4]] == [True, False, False, True]
    assert calls[0]["worker"] == calls[1]["worker"] == calls[2]["worker"] != calls[3]["worker"]
    assert "holds an older model state" in text
    assert all(16 <= c["duration"] <= 300 for c in calls)
    assert any(re.match(r"step \d+/30", d) for d in progress), progress  # from the worker to the client
    assert (data / "gallery.sqlite").is_file()  # the data dir came from the environment


def test_app_py_on_a_dedicated_gpu_space_keeps_one_process(tmp_path, tiny_family):
    """`spaces` installed but no ZeroGPU (an L4, A10G, L40S or A100 Space): spaces.GPU is
    effect-free, generations run in the server process."""

    log = tmp_path / "standin.log"
    proc, url, out, _ = _start_app(tmp_path, tiny_family, {"ZEROGPU_STANDIN_LOG": str(log)})
    try:
        _wait_up(proc, url, out)
        client = api_client(url)
        images, _, _ = client.predict(prompt="a dedicated fox", seed=2, **FAST, api_name="/txt2img")
        assert len(images) == 1
    finally:
        _stop(proc)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    text = out.read_text()
    assert events == [{"event": "import", "pid": events[0]["pid"], "torch_loaded": False, "zero_gpu": False}], text
    assert text.count("model load:") == 1, text
