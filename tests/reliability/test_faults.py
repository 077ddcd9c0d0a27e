"""Faults: out of memory mid-denoise, a model load that dies half way, cancel mid-batch, a full
or read-only disk at save, and SIGKILL while saving. After each one the studio still serves, and
nothing that was finished is lost."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gradio_client.exceptions import AppError

from studio.metadata import png as pnginfo
from studio.engine import CancelToken, Engine, GenerationError, GenerationRequest
from studio.gallery import Gallery
from studio.models import ModelError, ModelManager
from tests.reliability.kit import FAST

ROOT = Path(__file__).resolve().parents[2]


def req(prompt="a red fox", **kw) -> GenerationRequest:
    args = dict(steps=1, width=256, height=256, seed=1)
    args.update(kw)
    return GenerationRequest(prompt, **args)


def txt2img(client, **kw):
    args = dict(prompt="a red fox", seed=7, **FAST)
    args.update(kw)
    return client.predict(**args, api_name="/txt2img")


def still_serving(app) -> None:
    images, _, info = txt2img(app.client, prompt="still serving", seed=1)
    assert len(images) == 1 and Path(images[0]).is_file()


def index_ids(gallery) -> set[str]:
    return {i.id for i in gallery.list(page_size=1000).items}


def png_ids(gallery) -> set[str]:
    return {p.stem for p in gallery.images_dir.glob("*/*.png")}


def pixels(result):
    return [np.asarray(i.image) for i in result.images]


# --- out of memory -----------------------------------------------------------------------------


def _oom_forward(refs: list):
    """A transformer forward that allocates activations, then runs out of memory."""
    import torch

    def forward(self, *a, **k):
        activations = torch.ones(2_000_000)  # 8 MB that only the failed step's frames hold
        refs.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    return forward


def test_out_of_memory_frees_the_failed_step_and_keeps_the_model(demo_config, monkeypatch):
    import studio.engine.run as engine_module

    engine = Engine(ModelManager(demo_config))
    before = engine.generate(req(seed=11))
    loaded = engine.models.current
    refs: list = []
    alive_when_freeing = []
    real_free = engine_module.free_memory

    def free_memory():
        real_free()
        alive_when_freeing.append(refs[-1]() is not None)

    monkeypatch.setattr(type(loaded.pipe.transformer), "forward", _oom_forward(refs))
    monkeypatch.setattr(engine_module, "free_memory", free_memory)
    with pytest.raises(GenerationError) as e:
        engine.generate(req(seed=11, steps=2))
    message = str(e.value)
    assert "Out of GPU memory at 256×256" in message and "The model is still loaded" in message
    assert "lower preset" in message and "Models & Memory" in message
    # memory: the failed step's tensors were already gone when the cache was emptied, and the
    # error the caller holds does not keep them alive (no traceback chained to it)
    assert alive_when_freeing == [False]
    assert refs[-1]() is None
    monkeypatch.undo()
    assert engine.models.current is loaded, "no reload after an OOM"
    after = engine.generate(req(seed=11))
    assert np.array_equal(pixels(before)[0], pixels(after)[0]), "the model is unharmed"


def test_out_of_memory_through_the_api(app, monkeypatch):
    txt2img(app.client)  # a model is loaded
    loaded = app.studio.models.current
    count = app.studio.gallery.count()
    monkeypatch.setattr(type(loaded.pipe.transformer), "forward", _oom_forward([]))
    with pytest.raises(AppError) as e:
        txt2img(app.client, steps=2)
    assert "Out of GPU memory" in str(e.value) and "lower preset" in str(e.value)
    monkeypatch.undo()
    assert app.studio.models.current is loaded
    assert app.studio.gallery.count() == count
    still_serving(app)


# --- a model load that fails half way ----------------------------------------------------------


def _fail_on_text_encoder(monkeypatch, calls: list):
    """Loading components: the transformer and the VAE load, then CLIP-L fails to read."""
    import transformers

    real = transformers.CLIPTextModelWithProjection.from_pretrained.__func__
    real_load = ModelManager._load_component

    def load_component(self, folder, name, lib_cls, placement):
        calls.append(name)
        return real_load(self, folder, name, lib_cls, placement)

    def from_pretrained(cls, *a, subfolder=None, **k):
        if subfolder == "text_encoder":
            raise OSError(errno.EIO, "Input/output error")
        return real(cls, *a, subfolder=subfolder, **k)

    monkeypatch.setattr(ModelManager, "_load_component", load_component)
    monkeypatch.setattr(transformers.CLIPTextModelWithProjection, "from_pretrained", classmethod(from_pretrained))


def test_a_load_that_fails_half_way_leaves_the_previous_model_usable(demo_config, monkeypatch):
    import torch

    from studio.models import Placement

    manager = ModelManager(demo_config)
    engine = Engine(manager)
    before = engine.generate(req(seed=5))
    loaded = manager.current
    calls: list = []
    _fail_on_text_encoder(monkeypatch, calls)
    with pytest.raises(ModelError, match=r"Could not load text_encoder .*Input/output error"):
        manager.load(variant="sd3-medium", placement=Placement("bf16", "cpu", torch.bfloat16))
    assert calls == ["transformer", "vae", "text_encoder"], "it failed half way, after two components"
    monkeypatch.undo()
    assert manager.current is loaded and loaded.pipe.transformer.dtype == torch.float32
    after = engine.generate(req(seed=5))
    assert np.array_equal(pixels(before)[0], pixels(after)[0])
    # and a later load of the same thing works (nothing half-made is reused)
    manager.load(variant="sd3-medium", placement=Placement("bf16", "cpu", torch.bfloat16))
    assert manager.current.pipe.text_encoder.dtype == torch.bfloat16  # (not run: bf16 is slow on a CPU)


def test_a_failed_load_through_the_api_keeps_serving_the_previous_model(app, monkeypatch):
    txt2img(app.client)
    loaded = app.studio.models.current
    _fail_on_text_encoder(monkeypatch, [])
    with pytest.raises(AppError, match=r"Could not load text_encoder .*Input/output error"):
        app.client.predict(variant="sd3-medium", source="", preset="cpu-bf16", api_name="/load_model")
    monkeypatch.undo()
    assert app.studio.models.current is loaded
    images, _, info = txt2img(app.client, prompt="after the failed load")
    assert loaded.label in info
    still_serving(app)


# --- cancel during a batch ---------------------------------------------------------------------


def test_cancel_mid_batch_keeps_the_finished_images_in_the_gallery(demo_config):
    gallery = Gallery(demo_config.data_dir)
    engine = Engine(ModelManager(demo_config), gallery)
    token = CancelToken()
    finished = []

    def on_image(item):
        finished.append(item)
        if len(finished) == 2:
            token.cancel()  # the user presses Cancel while run 3 of 5 starts

    result = engine.generate(req(batch_count=5, steps=2, seed=20), cancel=token, on_image=on_image)
    assert result.cancelled and [i.seed for i in result.images] == [20, 21]
    records = result.wait_saved()
    assert {r.id for r in records} == index_ids(gallery) == png_ids(gallery)
    assert [gallery.get(r.id).seed for r in records] == [20, 21]
    assert "Cancelled: the finished images were kept." in result.info
    assert gallery.integrity_ok()
    gallery.close()


def test_cancel_through_the_jobs_wrapper_and_when_the_client_leaves(app):
    """The UI's job runner: Cancel for this session, and a consumer that goes away (closed tab)."""
    from studio.ui.jobs import Jobs

    jobs = Jobs(app.studio)
    before = app.studio.gallery.count()
    kept = []
    for update in jobs.stream(req(batch_count=4, steps=4, seed=30), None, None, previews=False):
        if update.kind == "image":
            kept.append(update.image)
            assert jobs.cancel(None) == 1
        if update.kind == "done":
            assert update.result.cancelled and len(update.result.images) == len(kept) == 1
    # the consumer leaves after the first image: the engine stops, the finished image is saved
    stream = jobs.stream(req(batch_count=4, steps=4, seed=40), None, None, previews=False)
    for update in stream:
        if update.kind == "image":
            kept.append(update.image)
            break
    stream.close()
    lock = app.studio.models.lock  # held by the worker while it generates
    assert lock.acquire(timeout=30), "the abandoned job never stopped"
    lock.release()
    app.studio.gallery.flush(30)
    assert [k.seed for k in kept] == [30, 40]
    assert all(Path(k.path).is_file() for k in kept)
    assert app.studio.gallery.count() == before + 2
    still_serving(app)


def _ui_tab(studio, cls_name: str = "Txt2ImgTab"):
    """The tab object behind a Generate button, and a value for each of its inputs."""
    from studio.ui.app import build_app

    demo = build_app(studio)
    for f in demo.fns.values():
        owner = getattr(f.fn, "__self__", None)
        if getattr(f.fn, "__name__", "") == "stream" and type(owner).__name__ == cls_name:
            return owner, {c: c.value for c in f.inputs}
    raise AssertionError(f"no {cls_name}")


def test_cancel_from_the_ui_keeps_the_finished_images(app):
    tab, values = _ui_tab(app.studio)
    values.update({tab.prompt_row.prompt: "cancel me", tab.sampling.steps: 4, tab.batch.batch_count: 4,
                   tab.seed_row.seed: 50})
    r = tab.result
    final = None
    for out in tab.stream(values, None, None):
        if out.get(r.gallery) and r.info not in out:  # the first finished image is on screen: Cancel
            tab._cancel(None)
        if r.paths in out:
            final = out
    assert "Cancelled: the finished images were kept." in final[r.info]
    assert len(final[r.paths]) == 1 and Path(final[r.paths][0]).is_file()
    still_serving(app)


# --- a full disk, a read-only data dir ---------------------------------------------------------


def _fail_saves(monkeypatch, gallery, where: str, err: int):
    def fail(*_a, **_k):
        raise OSError(err, os.strerror(err))

    if where == "write_png":
        monkeypatch.setattr(pnginfo, "write_png", fail)
    else:  # the rename of a finished PNG into the gallery (other renames — Gradio's own — still work)
        real = os.replace

        def replace(src, dst, *a, **k):
            if Path(dst).is_relative_to(gallery.images_dir):
                fail()
            return real(src, dst, *a, **k)

        monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("where, err, hint", [
    ("write_png", errno.ENOSPC, "Free some disk space"),
    ("os.replace", errno.EROFS, "read-only or not writable"),
])
def test_a_full_or_read_only_disk_is_a_clear_error_and_the_index_stays_whole(app, monkeypatch, where, err, hint):
    gallery = app.studio.gallery
    txt2img(app.client)
    ids = index_ids(gallery)
    _fail_saves(monkeypatch, gallery, where, err)
    with pytest.raises(AppError) as e:
        txt2img(app.client, batch_count=2)
    message = str(e.value)
    assert f"Could not save the image in {gallery.data_dir}" in message and hint in message
    assert "--data-dir" in message
    monkeypatch.undo()
    assert gallery.integrity_ok()
    assert index_ids(gallery) == ids == png_ids(gallery), "no half-saved row or file"
    assert not list(gallery.data_dir.rglob("*.tmp"))
    still_serving(app)


def test_a_full_disk_in_the_ui_is_a_clear_error(app, monkeypatch):
    import gradio as gr

    tab, values = _ui_tab(app.studio)
    values.update({tab.prompt_row.prompt: "disk full", tab.sampling.steps: 1})
    _fail_saves(monkeypatch, app.studio.gallery, "write_png", errno.ENOSPC)
    with pytest.raises(gr.Error) as e:
        for _ in tab.stream(values, None, None):
            pass
    assert "Free some disk space" in e.value.message
    monkeypatch.undo()
    assert app.studio.gallery.integrity_ok()
    still_serving(app)


# --- SIGKILL while generating and saving -------------------------------------------------------

CHILD = textwrap.dedent(r"""
    import itertools, sys
    from pathlib import Path
    from studio.config import StudioConfig
    from studio.engine import Engine, GenerationRequest
    from studio.gallery import Gallery
    from studio.models import ModelManager

    config = StudioConfig(data_dir=Path(sys.argv[1]), demo=True)
    engine = Engine(ModelManager(config), Gallery(config.data_dir))
    side = int(sys.argv[2])
    for i in itertools.count():
        # each run hands its images to the gallery's writer thread and starts the next at once
        engine.generate(GenerationRequest(f"killed fox {i}", steps=1, width=side, height=side, seed=i,
                                          batch_size=2))
        print(i, flush=True)
""")


@pytest.mark.slow
def test_sigkill_while_generating_and_saving_then_reconcile_repairs(demo_config):
    data = demo_config.data_dir
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    # One child (starting one costs ~10 s on a CI core); 384² images make the PNG writes long
    # enough that the kill often lands inside a save. tests/test_gallery.py kills a bare gallery
    # writer in every phase of save(); this is the whole engine + background writer.
    for side, runs, delay in ((384, 4, 0.03),):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(data), str(side)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        try:
            for _ in range(runs):
                line = child.stdout.readline()
                assert line, child.stderr.read()[-3000:]
            time.sleep(delay)
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(30)
            child.stdout.close()
            child.stderr.close()
        gallery = Gallery(data)  # the next start
        report = gallery.reconcile(temp_grace_s=0)
        assert report.errors == [] and report.skipped == [], report.summary()
        assert gallery.integrity_ok()
        assert not list(data.rglob("*.tmp")), "no half-written file survives"
        assert index_ids(gallery) == png_ids(gallery), "every complete image is indexed, no row without one"
        items = gallery.list(page_size=1000).items
        for item in items:  # no corrupt row: the file is complete and is the row's image
            with Image.open(item.path) as im:
                im.load()
                assert im.size == (item.width, item.height)
            assert item.thumb_path.is_file()
            assert pnginfo.read_png_info(item.path).fields["prompt"] == item.prompt
        gallery.close()
    # images still queued for the writer when the process died are lost (SIGKILL cannot be
    # caught); the rest are there
    assert len(items) >= 2
