"""Issue #12's breaks, each held shut: metadata is data, image inputs are checked from their
headers, the gallery recovers (owners included) at every start, and the smaller breaks."""

from __future__ import annotations

import json
import sqlite3
import sys
import time
import tracemalloc
import zlib
from types import SimpleNamespace

import pytest
from gradio_client.exceptions import AppError
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from studio.config import StudioConfig
from studio.engine import GenerationRequest, ValidationError, open_image, validate
from studio.errors import GalleryError, ModelError
from studio.metadata import request_fields
from studio.service import Studio
from tests.conftest_ui import api_client, running_studio
from tests.reliability.kit import crafted_png

FAST = dict(steps=1, width=256, height=256, seed=1)


def _png_with_json(path, meta: dict):
    info = PngInfo()
    info.add_text("sd35studio", json.dumps(meta))
    Image.new("RGB", (64, 64), "gray").save(path, pnginfo=info)
    return path


# --- 1. metadata names a path: it is never opened ---------------------------------------------------


def _ui_fn(demo, name: str):
    for block_fn in demo.fns.values():
        if getattr(block_fn.fn, "__name__", "") == name:
            return block_fn.fn
    raise KeyError(name)


def test_reuse_never_opens_a_path_or_hash_read_from_a_png(studio, tmp_path, monkeypatch):
    from studio.ui.app import build_app

    studio.shared = True
    secret = tmp_path / "secret.png"
    Image.new("RGB", (32, 32), "red").save(secret)
    victim = studio.generate(GenerationRequest("victim", mode="inpaint", init_image=Image.new("RGB", (256, 256)),
                                               mask_image=Image.new("L", (256, 256), 255), **{**FAST, "steps": 2}),
                             owner="u:victim").images[0]
    meta = {"mode": "inpaint", "prompt": "x", "_source_image": str(secret), "path": str(secret),
            "mask_sha256": victim.metadata["mask_sha256"], "init_image_sha256": victim.metadata["init_image_sha256"]}
    crafted = _png_with_json(tmp_path / "crafted.png", meta)
    fields = studio.read_png_info(str(crafted)).fields
    assert "_source_image" not in request_fields(fields) and "path" not in request_fields(fields)

    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(str(fp)) or real_open(fp, *a, **k))
    demo = build_app(studio)
    out = _ui_fn(demo, "reuse")(fields)
    assert str(secret) not in opened and not any("masks" in p or "inits" in p for p in opened), opened
    assert all(not (isinstance(v, dict) and v.get("background")) for v in out.values()), "no editor filled"
    # by id, another owner's image is simply not there
    with pytest.raises(GalleryError, match="No image with id"):
        studio.image_inputs(victim.id, owner="u:attacker")
    assert studio.image_inputs(victim.id, owner="u:victim").keys() == {"init_image", "mask_image"}


# --- 2. every image input is checked from its header, before any pixel buffer --------------------------


def _long_png(path, w, h):
    path.write_bytes(crafted_png(w, h, zlib.compress(b"\0" * 1024), color_type=0))
    return path


@pytest.mark.parametrize("field", ["init_image", "mask_image", "control_image", "image"])
def test_extreme_aspect_is_refused_from_the_header_without_allocating(tmp_path, field):
    wide = _long_png(tmp_path / "wide.png", 40_000_000, 1)
    tracemalloc.start()
    try:
        with pytest.raises(ValidationError, match=r"40000000×1, an aspect ratio of 40,000,000:1; the limit is 8:1") as e:
            open_image(str(wide), field)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.field == field and "wide.png" in str(e.value)
    assert peak < 2 << 20, f"{peak} bytes allocated before the refusal"


def test_inpaint_refuses_a_huge_mask_before_resizing_it(tmp_path):
    from studio.catalog import VARIANTS

    wide = _long_png(tmp_path / "mask.png", 40_000_000, 1)
    req = GenerationRequest("x", mode="inpaint", init_image=Image.new("RGB", (300, 300), "white"),
                            mask_image=str(wide), steps=4)
    tracemalloc.start()
    try:
        with pytest.raises(ValidationError, match="The mask") as e:
            validate(req, VARIANTS["sd3.5-medium"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.field == "mask_image" and "aspect ratio" in str(e.value)
    assert peak < 4 << 20, f"{peak} bytes allocated before the refusal"


def test_the_editor_and_mask_boxes_hand_over_paths_undecoded(tmp_path):
    """Gradio's own components decode uploads in preprocess; the studio's pass file paths on."""
    from gradio.data_classes import FileData

    from studio.ui.components import ImageMaskPaths, ImagePath

    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    assert ImagePath().preprocess(FileData(path=str(bad), orig_name="not-an-image.png")) == str(bad)
    value = ImageMaskPaths().preprocess(
        SimpleNamespace(id=None, background=FileData(path=str(bad)), layers=[FileData(path=str(bad))], composite=None))
    assert value == {"background": str(bad), "layers": [str(bad)], "composite": None}
    with pytest.raises(ValidationError, match=r"The init image \(not-an-image.png\) is not an image"):
        from studio.engine.inpaint import mask_from_editor

        mask_from_editor(value)


# --- 3. crash recovery runs at every start, and gives images back to their owners -----------------------


def _shared_studio(config):
    return Studio(config, shared=True)


def test_start_reindexes_lost_rows_with_their_owners_and_removes_old_temp_files(demo_config):
    first = _shared_studio(demo_config)
    alice = first.generate(GenerationRequest("alice's cat", **FAST), owner="u:alice").images[0]
    bob = first.generate(GenerationRequest("bob's dog", **FAST), owner="u:bob").images[0]
    first.gallery.flush()
    assert "alice" not in alice.saved.path.as_posix() and "u:" not in alice.saved.path.as_posix()
    with sqlite3.connect(demo_config.data_dir / "gallery.sqlite") as db:  # killed before the rows landed
        db.execute("DELETE FROM images")
    stale = alice.saved.path.parent / ".x.png.abcd.tmp"
    stale.write_bytes(b"half a png")
    old = time.time() - 3600
    import os

    os.utime(stale, (old, old))
    second = _shared_studio(demo_config)
    report = second.start()
    assert set(report.added) == {alice.id, bob.id} and stale.name in " ".join(report.temp_removed)
    assert [i.id for i in second.list_images(owner="u:alice").items] == [alice.id]
    assert [i.id for i in second.list_images(owner="u:bob").items] == [bob.id]
    assert second.list_images(owner="u:mallory").total == 0
    assert b"u:alice" not in alice.saved.path.read_bytes(), "the owner is never written into the PNG"


def test_a_corrupt_index_is_set_aside_and_rebuilt_from_the_pngs(demo_config):
    first = _shared_studio(demo_config)
    made = first.generate(GenerationRequest("kept through a corrupt index", **FAST), owner="u:carol").images[0]
    first.gallery.flush()
    first.gallery.close()
    (demo_config.data_dir / "gallery.sqlite").write_bytes(b"garbage" * 1000)
    for suffix in ("-wal", "-shm"):
        (demo_config.data_dir / f"gallery.sqlite{suffix}").unlink(missing_ok=True)
    second = _shared_studio(demo_config)
    second.start()
    assert second.gallery.rebuilt_from is not None and second.gallery.rebuilt_from.exists()
    assert [i.id for i in second.list_images(owner="u:carol").items] == [made.id]


def test_the_cli_and_server_run_the_check_at_start(demo_config, monkeypatch):
    calls = []
    monkeypatch.setattr(Studio, "start", lambda self: calls.append(self) or None)
    from studio.app.cli import main

    assert main(["generate", "x", "--demo", "--steps", "1", "--data-dir", str(demo_config.data_dir)]) == 0
    assert calls, "launch.py generate brings the gallery in order first"


# --- 4. the smaller breaks ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_app(tmp_path_factory, tiny_family):
    with running_studio(tmp_path_factory.mktemp("hard"), tiny_family, shared=True) as (url, studio):
        yield SimpleNamespace(url=url, studio=studio, client=api_client(url, tmp_path_factory.mktemp("dl")))


@pytest.mark.parametrize("kw, field_words", [
    (dict(width="abc"), "Width must be a number"),
    (dict(width="256.5"), "Width must be a number"),
    (dict(width=[256]), "Width must be a number"),
    (dict(steps="2"), "Steps must be a number between 1 and 150, not '2'"),
    (dict(seed="abc"), "Seed must be a number"),
    (dict(steps=1.5), "Steps must be a whole number between 1 and 150, not 1.5"),
    (dict(seed=1.5), "Seed must be a whole number"),
])
def test_text_where_a_number_belongs_is_refused_naming_the_field(shared_app, kw, field_words, capfd):
    with pytest.raises(AppError) as e:
        shared_app.client.predict(prompt="x", **kw, api_name="/txt2img")
    assert field_words in str(e.value)
    assert "Traceback" not in capfd.readouterr().err


def test_gallery_pages_are_bounded_and_inpaint_is_a_mode(shared_app):
    with pytest.raises(AppError, match=r"Page is 1,000,000,000,000,000,000; it must be between 0 and 1,000,000,000"):
        shared_app.client.predict(page=10**18, api_name="/gallery_list")
    assert shared_app.client.predict(mode="inpaint", api_name="/gallery_list")["total"] == 0


def test_shared_studios_refuse_unloading_loras_for_everyone(studio):
    studio.shared = True
    with pytest.raises(ModelError, match="LoRAs are chosen per generation"):
        studio.unload_loras()


def test_every_printed_line_is_redacted(capfd):
    from studio.logs import RedactingStream

    stream = RedactingStream(sys.stdout)
    stream.write("Traceback: token=hf_" + "a" * 30 + " in a request\n")
    stream.write("split hf_" + "b" * 12)
    stream.write("c" * 12 + " across writes\n")
    stream.flush()
    out = capfd.readouterr().out
    assert "hf_***" in out and "hf_aaaa" not in out and "hf_bbbb" not in out


def test_repeated_failed_logins_are_throttled_with_how_long():
    import asyncio
    import concurrent.futures

    from studio.app.guards import LoginThrottle

    clock = [1000.0]

    async def app(scope, receive, send):
        body = (await receive())["body"]
        ok = b"password=right" in body
        await send({"type": "http.response.start", "status": 200 if ok else 400, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    guard = LoginThrottle(app, clock=lambda: clock[0])

    def login(password, ip="10.0.0.1"):
        sent = []

        async def run():
            async def receive():
                return {"type": "http.request", "body": f"username=alice&password={password}".encode()}

            async def send(m):
                sent.append(m)

            await guard({"type": "http", "method": "POST", "path": "/login", "client": (ip, 1)}, receive, send)

        # in a thread of its own: an earlier test (Playwright's sync API) may leave this
        # thread's event loop marked as running
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, run()).result()
        status = sent[0]["status"]
        body = b"".join(m.get("body", b"") for m in sent[1:])
        return status, body

    assert [login("wrong")[0] for _ in range(5)] == [400] * 5
    status, body = login("right")
    assert status == 429 and b"try again in 60 s" in body, "even the right password waits"
    status, body = login("wrong", ip="10.0.0.2")
    assert status == 429, "the user name is locked from any address"
    clock[0] += 61
    assert login("right")[0] == 200


def test_login_throttle_and_cancel_guard_on_a_live_server(tmp_path, tiny_family):
    import httpx

    from studio.app.server import launch, launch_kwargs
    from studio.ui.app import build_app, launch_options
    from tests.conftest_ui import free_port

    config = StudioConfig(data_dir=tmp_path / "d", demo=True, port=free_port())
    studio = Studio(config, shared=True)
    demo = build_app(studio)
    demo.queue(default_concurrency_limit=1)
    kwargs = launch_kwargs(config, SimpleNamespace(auth="alice:right-password"))
    kwargs.update(quiet=True)
    launch(demo, {**kwargs, **launch_options()}, share_requested=False, block=False)
    try:
        base = f"http://127.0.0.1:{config.port}"
        answers = [httpx.post(f"{base}/login", data={"username": "alice", "password": "nope"}).status_code
                   for _ in range(6)]
        assert answers[:5] == [400] * 5 and answers[5] == 429
        r = httpx.post(f"{base}/gradio_api/cancel", json={"session_hash": "x", "fn_index": 0, "event_id": "y"})
        assert r.status_code == 403 and "log in first" in r.text
    finally:
        demo.close()
