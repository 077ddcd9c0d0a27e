"""Security of a public studio: which files are served, isolation between sessions on shared
deployments, secrets, limits, auth and the share link.

The isolation and file-access tests run against two deployments: a local shared run (what
``--share`` gives) and a Space-mode run (``SPACE_ID`` set, built by ``studio.spaces_support``).
Raw HTTP goes through ``http.client`` so paths reach the server exactly as written (httpx would
normalise ``..`` away).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import sqlite3
import struct
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, urlparse

import pytest

gradio_client = pytest.importorskip("gradio_client")
from gradio_client.exceptions import AppError  # noqa: E402

from tests.conftest_ui import api_client, free_port, running_studio  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(steps=2, width=256, height=256)
PLANTED = "hf_planted" + "Q7xZk2" * 5  # looks like a real token (hf_ + 40 alphanumerics)


def _link_tiny(data_dir: Path, tiny_family) -> None:
    tiny = data_dir / "models" / "tiny"
    tiny.parent.mkdir(parents=True, exist_ok=True)
    if not tiny.exists():
        tiny.symlink_to(next(iter(tiny_family.values())).parent, target_is_directory=True)


@contextmanager
def space_studio(data_dir: Path, tiny_family, extra_env: dict | None = None):
    """Launch the studio as a Space would (SPACE_ID set, SD35_STUDIO_DEMO=1), in-process."""
    from studio.app.spaces import build_space, space_config

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPACE_ID", "tester/sd35-studio")
        mp.setenv("SD35_STUDIO_DEMO", "1")
        mp.setenv("SD35_STUDIO_DATA_DIR", str(data_dir))
        mp.setenv("GRADIO_SERVER_NAME", "127.0.0.1")
        mp.setenv("GRADIO_SERVER_PORT", str(free_port()))
        for k, v in (extra_env or {}).items():
            mp.setenv(k, v)
        config = space_config()
        _link_tiny(config.data_dir, tiny_family)
        studio, demo, kwargs = build_space(config)
        demo.launch(**{**kwargs, "quiet": True, "prevent_thread_lock": True})
        try:
            yield f"http://127.0.0.1:{config.port}/", studio
        finally:
            demo.close()


def _client(url, tmp_path_factory=None, **kw):
    """Without tmp_path_factory: files come back as the server's FileData (path and url)."""
    download = str(tmp_path_factory.mktemp("dl")) if tmp_path_factory else False
    return api_client(url, download, **kw)


@pytest.fixture(scope="module", params=["shared", "space"])
def deployment(request, tmp_path_factory, tiny_family):
    data_dir = tmp_path_factory.mktemp(request.param) / "data"
    if request.param == "shared":
        ctx = running_studio(data_dir, tiny_family, shared=True)
    else:
        ctx = space_studio(data_dir, tiny_family)
    with ctx as (url, studio):
        alice, bob = _client(url), _client(url, tmp_path_factory)
        assert alice.session_hash != bob.session_hash
        images, _, _ = alice.predict(prompt="alice's secret garden", seed=5, **FAST, api_name="/txt2img")
        yield dict(url=url, studio=studio, alice=alice, bob=bob, alice_images=images, kind=request.param)


def _raw_get(url: str, path: str) -> int:
    """GET a path exactly as written; returns the status code."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _alice_item(d):
    listing = d["alice"].predict(query="garden", api_name="/gallery_list")
    assert listing["total"] == 1
    return listing["items"][0]


# --- isolation -----------------------------------------------------------------------------------


def test_sessions_see_only_their_own_gallery(deployment):
    d = deployment
    item = _alice_item(d)
    assert len(item["id"]) == 16 and re.fullmatch(r"[0-9a-f]{16}", item["id"])  # random 64-bit ids
    bob = d["bob"]
    assert bob.predict(api_name="/gallery_list")["total"] == 0
    assert bob.predict(query="garden", api_name="/gallery_list")["total"] == 0
    for api_name, kw in (("/gallery_get", {}), ("/gallery_star", {"starred": True}), ("/gallery_delete", {})):
        with pytest.raises(AppError, match="No image with id"):
            bob.predict(image_id=item["id"], **kw, api_name=api_name)
    # guessed ids and path-like ids fare no better
    for guess in ("0" * 16, "../../gallery.sqlite", item["id"].upper(), item["id"] + "%", "*"):
        with pytest.raises(AppError):
            bob.predict(image_id=guess, api_name="/gallery_get")
    # Bob's own image is his alone; Alice's is untouched by his attempts
    bob.predict(prompt="bob's boat", seed=1, **FAST, api_name="/txt2img")
    assert [i["prompt"] for i in bob.predict(api_name="/gallery_list")["items"]] == ["bob's boat"]
    again = _alice_item(d)
    assert again["id"] == item["id"] and again["starred"] is False
    assert "bob's boat" not in json.dumps(d["alice"].predict(api_name="/gallery_list"))


def test_a_new_session_starts_with_an_empty_gallery(deployment, tmp_path_factory):
    carol = _client(deployment["url"], tmp_path_factory)
    assert carol.predict(api_name="/gallery_list")["total"] == 0


def test_returned_files_are_cached_copies_and_originals_are_never_served(deployment):
    d = deployment
    studio, url = d["studio"], d["url"]
    item = _alice_item(d)
    original = studio.gallery.get(item["id"]).path
    assert original.is_file()
    # What a session receives is a URL into Gradio's cache under a secret content hash, never
    # the gallery path: nobody can derive it from an id.
    png, details, _ = d["alice"].predict(image_id=item["id"], api_name="/gallery_get")
    served_path = png["path"]
    assert not str(served_path).startswith(str(studio.config.data_dir))
    assert re.search(r"/[0-9a-f]{64}/" + item["id"] + r"\.png$", str(served_path))
    assert _raw_get(url, "/gradio_api/file=" + quote(str(served_path))) == 200  # the control
    for generated in d["alice_images"]:
        assert re.search(r"/[0-9a-f]{64}/[0-9a-f]{16}\.png$", generated["path"])
        assert not generated["path"].startswith(str(studio.config.data_dir))
    # the directory of the copy is not listable
    assert _raw_get(url, "/gradio_api/file=" + quote(str(Path(served_path).parent))) != 200
    # the original (and its thumbnail) are refused to everyone, whichever spelling
    for path in (original, studio.gallery.thumbs_dir / f"{item['id']}.webp"):
        assert _raw_get(url, "/gradio_api/file=" + str(path)) == 403
        assert _raw_get(url, "/gradio_api/file=" + quote(str(path))) == 403
        assert _raw_get(url, "/gradio_api/file/" + str(path)) == 403


# --- file access ----------------------------------------------------------------------------------


def _attack_paths(studio) -> list[str]:
    data = studio.config.data_dir
    images = data / "images"
    (data / "cache").mkdir(exist_ok=True)
    (data / "cache" / "hashes.json").write_text('{"secret": "hash cache"}')
    (data / "settings.json").write_text('{"secret": "settings"}')
    outside = data.parent / "outside.txt"
    outside.write_text("not for the web")
    for name, target in (("evil.png", Path("/etc/passwd")), ("index.png", data / "gallery.sqlite"),
                         ("out.png", outside)):
        link = images / name
        if not link.is_symlink():
            link.symlink_to(target)
    model_file = next(p for p in (data / "models" / "tiny").rglob("*.json"))
    sqlite_path = str(data / "gallery.sqlite")
    rel_up = str(images) + "/../gallery.sqlite"
    paths = [
        "/etc/passwd", sqlite_path, sqlite_path + "-wal", str(data / "cache" / "hashes.json"),
        str(data / "settings.json"), str(model_file), str(data / "models"), str(outside),
        rel_up,
        str(images) + "/%2e%2e/gallery.sqlite",
        str(images) + "%2f%2e%2e%2fgallery.sqlite",
        str(images) + "/%252e%252e%252fgallery.sqlite",
        str(images) + "/..%2fgallery.sqlite",
        str(images) + "\\..\\gallery.sqlite",
        str(images) + "/..\\gallery.sqlite",
        "%2fetc%2fpasswd", "//etc/passwd", "/../../../../etc/passwd", "../../../../../../etc/passwd",
        quote(sqlite_path, safe=""), quote(quote(sqlite_path, safe=""), safe=""),
        str(images / "evil.png"), str(images / "index.png"), str(images / "out.png"),
        str(data), str(images),
    ]
    return paths


def test_file_route_refuses_everything_but_gradio_cache(deployment):
    url, studio = deployment["url"], deployment["studio"]
    failures = []
    for path in _attack_paths(studio):
        for prefix in ("/gradio_api/file=", "/gradio_api/file/", "/file="):
            status = _raw_get(url, prefix + path)
            if status == 200:
                failures.append(prefix + path)
    assert not failures, failures


def test_read_png_info_and_img2img_read_only_uploaded_files(deployment):
    """A FileData naming a server path is refused: only files uploaded to Gradio are read."""
    import httpx

    url, studio = deployment["url"], deployment["studio"]
    item = _alice_item(deployment)
    targets = ["/etc/passwd", str(studio.config.data_dir / "gallery.sqlite"),
               str(studio.gallery.get(item["id"]).path)]
    for target in targets:
        for api, data in (("read_png_info", [{"path": target, "meta": {"_type": "gradio.FileData"}}]),
                          ("img2img", [{"path": target, "meta": {"_type": "gradio.FileData"}}, "x", "", 0.6,
                                       256, 256, 4, None, 1, 1, 1, 256, None])):
            r = httpx.post(f"{url}gradio_api/call/{api}", json={"data": data}, timeout=30)
            assert r.status_code == 200, r.text
            event_id = r.json()["event_id"]
            body = httpx.get(f"{url}gradio_api/call/{api}/{event_id}", timeout=60).text
            assert "event: error" in body, (api, target, body[:300])
            assert "root:" not in body and "SQLite" not in body


# --- models on shared deployments --------------------------------------------------------------


def test_shared_load_model_takes_catalog_variants_only(deployment, tmp_path):
    bob = deployment["bob"]
    for source in ("/etc", str(tmp_path), "someone/some-model", "stabilityai/stable-diffusion-3.5-large"):
        with pytest.raises(AppError, match="models come from the catalog only"):
            bob.predict(variant="", source=source, preset="auto", api_name="/load_model")


# --- limits ----------------------------------------------------------------------------------------


def _bomb_png(path: Path, w: int = 30000, h: int = 30000) -> Path:
    """A tiny PNG whose header claims w×h pixels (a decompression bomb in waiting)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def shared_app(tmp_path_factory, tiny_family):
    with running_studio(tmp_path_factory.mktemp("limits") / "data", tiny_family, shared=True) as (url, studio):
        yield url, studio, _client(url, tmp_path_factory)


def test_decompression_bomb_is_refused_before_decoding(shared_app, tmp_path):
    _, _, client = shared_app
    # 900 MP: Pillow's own guard refuses it at open (header only), with the engine's wording
    bomb = _bomb_png(tmp_path / "bomb.png")
    with pytest.raises(AppError, match=r"The init image \(bomb.png\) is too large to decode safely: Image size \(900000000 pixels\)"):
        client.predict(init_image=gradio_client.handle_file(str(bomb)), prompt="x", steps=4,
                       api_name="/img2img")
    # 50 MP: under Pillow's limit, over the studio's; refused from the header, before decoding
    big = _bomb_png(tmp_path / "big.png", 10_000, 5_000)
    with pytest.raises(AppError, match=r"10000×5000 = 50 MP; the limit is 40 MP"):
        client.predict(init_image=gradio_client.handle_file(str(big)), prompt="x", steps=4,
                       api_name="/img2img")


def test_limits_have_clear_messages(shared_app):
    _, _, client = shared_app
    cases = [
        (dict(prompt="a" * 10_001), "10,000"),
        (dict(batch_size=9), "Batch size is 9"),
        (dict(batch_count=20, batch_size=8), "the limit is 100 per request"),
        (dict(batch_count=101), "Batch count is 101"),
    ]
    for kw, message in cases:
        args = dict(prompt="x", **FAST)
        args.update(kw)
        with pytest.raises(AppError, match=re.escape(message)):
            client.predict(**args, api_name="/txt2img")


def test_uploads_over_the_size_limit_are_refused(shared_app, tmp_path):
    import httpx

    url, _, _ = shared_app
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(51 * 1024 * 1024)
    with open(big, "rb") as f:
        r = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.png", f, "image/png")}, timeout=60)
    assert r.status_code == 413
    assert "maximum allowed size of 52428800 bytes" in r.text


# --- secrets -----------------------------------------------------------------------------------------


def test_redacting_filter_on_every_installed_handler(capfd):
    from studio.logs import RedactSecrets, install_logging, redact

    assert redact(f"token={PLANTED}!") == "token=hf_***!"
    assert redact("hf_short") == "hf_short"
    handler = install_logging()
    assert any(isinstance(f, RedactSecrets) for f in handler.filters)
    logging.getLogger("studio.test").warning("loading with %s", PLANTED)
    try:
        raise RuntimeError(f"401 for token {PLANTED}")
    except RuntimeError:
        logging.getLogger("gradio").exception("failed")
    out, err = capfd.readouterr()
    assert PLANTED not in out + err
    assert "loading with hf_***" in err and "401 for token hf_***" in err
    for h in logging.getLogger().handlers:
        if getattr(h, "_sd35_studio", False):
            assert any(isinstance(f, RedactSecrets) for f in h.filters)


def _wait_for(url: str, proc, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the studio exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code in (200, 401):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("the studio did not start")


def test_planted_token_share_fallback_and_auth_file(tmp_path, tiny_family):
    """A studio subprocess with HF_TOKEN planted, --share (no network here) and --auth FILE:
    the share link falls back to local with a clear line, login is required, and the token is
    nowhere: logs, stdout/stderr, PNGs, the index, API responses, /config, /gradio_api/info."""
    import httpx

    data = tmp_path / "data"
    _link_tiny(data, tiny_family)
    creds = tmp_path / "users.txt"
    creds.write_text("# users\nalice:wonderland\nbob:builder\n")
    port = free_port()
    env = {**os.environ, "HF_TOKEN": PLANTED, "HUGGING_FACE_HUB_TOKEN": PLANTED, "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    env.pop("SPACE_ID", None)
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen([sys.executable, "launch.py", "--demo", "--data-dir", str(data), "--port", str(port),
                                 "--share", "--auth", str(creds)], cwd=ROOT, env=env, stdout=fo, stderr=fe)
    url = f"http://127.0.0.1:{port}/"
    responses = []
    try:
        _wait_for(url + "config", proc)
        assert httpx.get(url + "config", timeout=10).status_code == 401  # login first
        assert _raw_get(url, "/gradio_api/file=/etc/passwd") != 200
        client = api_client(url, tmp_path / "dl", auth=("alice", "wonderland"))
        images, seed, info = client.predict(prompt="planted token check", seed=3, **FAST, api_name="/txt2img")
        responses += [images, seed, info]
        listing = client.predict(api_name="/gallery_list")
        responses.append(listing)
        responses.append(client.predict(image_id=listing["items"][0]["id"], api_name="/gallery_get"))
        with pytest.raises(AppError) as e:
            client.predict(variant="", source="some/repo", preset="auto", api_name="/load_model")
        responses.append(str(e.value))
        with httpx.Client(base_url=url, timeout=10) as h:
            assert h.post("login", data={"username": "alice", "password": "wonderland"}).status_code == 200
            for path in ("config", "gradio_api/info", "gradio_api/info?all_endpoints=true"):
                r = h.get(path)
                assert r.status_code == 200
                responses.append(r.text)
        # a second login sees its own (empty) gallery: per-login galleries on a shared run
        bob = api_client(url, tmp_path / "dl2", auth=("bob", "builder"))
        assert bob.predict(api_name="/gallery_list")["total"] == 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
    assert "Could not open a share link" in stdout
    assert f"running locally only at http://127.0.0.1:{port}" in stdout
    haystack = [stdout, stderr, json.dumps(responses, default=str)]
    for png in data.rglob("*.png"):
        haystack.append(png.read_bytes().decode("latin-1"))
    for f in data.glob("gallery.sqlite*"):
        haystack.append(f.read_bytes().decode("latin-1"))
    with sqlite3.connect(data / "gallery.sqlite") as db:
        haystack.append(json.dumps(db.execute("SELECT * FROM images").fetchall()))
        assert db.execute("SELECT count(*) FROM images").fetchone()[0] >= 1
    for text in haystack:
        assert PLANTED not in text
        assert "hf_planted" not in text


def test_planted_token_in_process(tmp_path_factory, tiny_family, capfd):
    """The same with the token in this process's environment, against the Space-mode app."""
    import httpx

    data = tmp_path_factory.mktemp("planted") / "data"
    with space_studio(data, tiny_family, extra_env={"HF_TOKEN": PLANTED}) as (url, studio):
        client = _client(url, tmp_path_factory)
        responses = [client.predict(prompt="token?", seed=1, **FAST, api_name="/txt2img"),
                     client.predict(api_name="/gallery_list")]
        for path in ("config", "gradio_api/info", "gradio_api/info?all_endpoints=true"):
            responses.append(httpx.get(url + path, timeout=10).text)
        logging.getLogger("studio").error("env token is %s", os.environ["HF_TOKEN"])
    out, err = capfd.readouterr()
    blobs = [out, err, json.dumps(responses, default=str)]
    blobs += [p.read_bytes().decode("latin-1") for p in data.rglob("*.png")]
    blobs += [p.read_bytes().decode("latin-1") for p in data.glob("gallery.sqlite*")]
    assert all(PLANTED not in b for b in blobs)


# --- auth and the share flag -------------------------------------------------------------------------


def test_share_without_auth_refuses_naming_auth(tmp_path, capsys):
    from studio.app.cli import main

    code = main(["--demo", "--data-dir", str(tmp_path / "d"), "--share"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--auth USER:PASS" in err and "--insecure-no-auth" in err


def test_parse_auth_user_pass_and_file(tmp_path):
    from studio.app.server import StartupError, parse_auth

    assert parse_auth("alice:secret:with:colons") == [("alice", "secret:with:colons")]
    f = tmp_path / "creds"
    f.write_text("alice:a\n\n# comment\nbob:b\n")
    assert parse_auth(str(f)) == [("alice", "a"), ("bob", "b")]
    for bad in ("alice:", ":pw", str(tmp_path / "missing")):
        with pytest.raises(StartupError):
            parse_auth(bad)
    (tmp_path / "empty").write_text("# nobody\n")
    with pytest.raises(StartupError, match="no USER:PASS"):
        parse_auth(str(tmp_path / "empty"))


def test_shared_decision(monkeypatch):
    from types import SimpleNamespace

    from studio.app.server import is_loopback, is_shared

    monkeypatch.delenv("SPACE_ID", raising=False)
    assert not is_shared(SimpleNamespace())
    assert not is_shared(SimpleNamespace(share=False))
    assert is_shared(SimpleNamespace(share=True))
    assert is_shared(SimpleNamespace(shared=True))
    monkeypatch.setenv("SPACE_ID", "me/space")
    assert is_shared(SimpleNamespace())
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


def test_guard_unit(tmp_path):
    from studio.app.guards import FileRouteGuard

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    g = FileRouteGuard(None, data)
    assert g.refused(f"/gradio_api/file={data}/gallery.sqlite")
    assert g.refused(f"/gradio_api/file={data}/images/../gallery.sqlite")
    assert g.refused(f"/gradio_api/file/{data}/images/x.png")
    assert g.refused(f"/gradio_api/file={data}/images/%2e%2e/x")
    assert not g.refused("/gradio_api/file=/tmp/gradio/abc/x.png")
    assert not g.refused("/gradio_api/info")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "link").symlink_to(data / "gallery.sqlite")
    assert g.refused(f"/gradio_api/file={outside}/link")  # a symlink into the data dir
