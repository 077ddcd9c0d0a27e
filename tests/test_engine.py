"""The one engine: validation that teaches, txt2img / img2img / turbo, determinism, cancel."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.catalog import VARIANTS
from studio.engine import (
    MAX_SEED,
    CancelToken,
    Engine,
    GenerationRequest,
    ValidationError,
    latents_to_preview,
    validate,
)
from studio.models import ModelManager

MEDIUM = VARIANTS["sd3.5-medium"]
LARGE = VARIANTS["sd3.5-large"]


@pytest.fixture
def engine(demo_config):
    return Engine(ModelManager(demo_config))


def _pixels(result):
    return [np.asarray(i.image) for i in result.images]


# --- validation (no model needed) ---


def test_defaults_come_from_the_variant():
    r = validate(GenerationRequest("a cat"), LARGE)
    assert (r.steps, r.guidance, r.width, r.height) == (28, 3.5, 1024, 1024)
    r = validate(GenerationRequest("a cat"), MEDIUM)
    assert (r.steps, r.guidance) == (40, 4.5)
    assert r.slg == {"layers": [7, 8, 9], "scale": 2.8, "start": 0.01, "stop": 0.2}, "SLG on for Medium"
    assert validate(GenerationRequest("a cat"), LARGE).slg is None, "SLG off by default for Large"


def test_sizes_are_snapped_and_the_snap_is_reported():
    r = validate(GenerationRequest("x", width=1000, height=1030), LARGE)
    assert (r.width, r.height) == (992, 1024)
    assert any("1000 was snapped to 992" in n for n in r.notes)
    assert any("1030 was snapped to 1024" in n for n in r.notes)
    assert not validate(GenerationRequest("x", width=1024, height=1024), LARGE).notes


@pytest.mark.parametrize(
    "kwargs, field, words",
    [
        ({"width": 0}, "width", "256–2048"),
        ({"width": -64}, "width", "256–2048"),
        ({"height": 4096}, "height", "256–2048"),
        ({"steps": 0}, "steps", "between 1 and 150"),
        ({"steps": 10_000}, "steps", "between 1 and 150"),
        ({"steps": 2.5}, "steps", "whole number"),
        ({"guidance": float("nan")}, "guidance", "finite"),
        ({"guidance": float("inf")}, "guidance", "finite"),
        ({"guidance": -1}, "guidance", "between 0"),
        ({"seed": MAX_SEED + 1}, "seed", "between -1 and 18,446,744,073,709,551,615"),
        ({"batch_size": 0}, "batch_size", "between 1 and 8"),
        ({"batch_count": 1000}, "batch_count", "between 1 and 100"),
        ({"max_sequence_length": 1024}, "max_sequence_length", "between 1 and 512"),
        ({"mode": "video"}, "mode", "txt2img, img2img, inpaint, turbo"),
        ({"prompt": "x" * 20_000}, "prompt", "limit is 10,000"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_range(kwargs, field, words):
    req = GenerationRequest(**{"prompt": "a cat", **kwargs})
    with pytest.raises(ValidationError) as e:
        validate(req, LARGE)
    assert e.value.field == field
    assert words in str(e.value)


def test_img2img_rules():
    with pytest.raises(ValidationError, match="needs an init image"):
        validate(GenerationRequest("x", mode="img2img"), MEDIUM)
    init = Image.new("RGB", (512, 512), "red")
    with pytest.raises(ValidationError, match="Strength 0"):
        validate(GenerationRequest("x", mode="img2img", init_image=init, strength=0), MEDIUM)
    with pytest.raises(ValidationError, match="between 0 and 1"):
        validate(GenerationRequest("x", mode="img2img", init_image=init, strength=1.5), MEDIUM)
    with pytest.raises(ValidationError) as e:
        validate(GenerationRequest("x", mode="img2img", init_image=init, strength=0.2, steps=4), MEDIUM)
    message = str(e.value)
    assert "4 × 0.2 = 0.80" in message and "at least 0.25" in message and "at least 5" in message
    ok = validate(GenerationRequest("x", mode="img2img", init_image=init, strength=0.25, steps=4), MEDIUM)
    assert ok.effective_steps == 1
    assert validate(GenerationRequest("x", mode="img2img", init_image=init, strength=1.0, steps=4), MEDIUM).effective_steps == 4


def test_init_images_of_any_mode_become_rgb():
    for mode in ("RGBA", "L", "P", "CMYK", "I;16", "LA"):
        image = Image.new(mode, (300, 200))
        r = validate(GenerationRequest("x", mode="img2img", init_image=image, steps=10), MEDIUM)
        assert r.init_image.mode == "RGB" and r.init_image.size == (300, 200)
    with pytest.raises(ValidationError, match="0 pixels|empty"):
        validate(GenerationRequest("x", mode="img2img", init_image=Image.new("RGB", (0, 0))), MEDIUM)


def test_slg_and_turbo_notes():
    r = validate(GenerationRequest("x", slg=True), LARGE)
    assert r.slg is not None and any("degrades SD3.5 Large" in n for n in r.notes)
    r = validate(GenerationRequest("x", slg=True, guidance=1.0), MEDIUM)
    assert r.slg is None and any("needs CFG" in n for n in r.notes)
    turbo = VARIANTS["sd3.5-large-turbo"]
    r = validate(GenerationRequest("x", negative_prompt="blurry", mode="turbo"), turbo)
    assert (r.steps, r.guidance) == (4, 0.0)
    assert any("negative prompt has no effect" in n for n in r.notes)
    r = validate(GenerationRequest("x", max_sequence_length=400), MEDIUM)
    assert any("past 256 T5 tokens" in n for n in r.notes)


def test_random_seed_is_drawn_and_reported():
    seeds = {validate(GenerationRequest("x"), LARGE).seed for _ in range(5)}
    assert all(0 <= s <= MAX_SEED for s in seeds) and len(seeds) > 1


# --- generation on the tiny family ---


def test_txt2img_gives_the_snapped_size_and_metadata(engine):
    result = engine.generate(GenerationRequest("a red fox", steps=3, seed=7, width=250, height=320))
    assert len(result.images) == 1 and not result.cancelled
    image = result.images[0]
    assert image.image.size == (256, 320)
    assert any("snapped" in n for n in result.notes)
    m = image.metadata
    assert (m["prompt"], m["seed"], m["steps"], m["width"], m["height"]) == ("a red fox", 7, 3, 256, 320)
    assert m["variant"] == "sd3.5-medium" and m["mode"] == "txt2img" and m["shift"] == 3.0
    assert m["slg"]["layers"] == [1]  # Medium's 7–9 of 24 blocks, at the same depth of the tiny model's 4
    assert "seed 7" in result.info


def test_same_seed_same_pixels_and_batches_are_reproducible(engine):
    req = GenerationRequest("a red fox", steps=3, seed=42, batch_size=2, batch_count=2, width=256, height=256)
    a, b = engine.generate(req), engine.generate(req)
    assert [i.seed for i in a.images] == [42, 43, 44, 45]
    for x, y in zip(_pixels(a), _pixels(b)):
        assert np.array_equal(x, y)
    assert not np.array_equal(_pixels(a)[0], _pixels(a)[1]), "different seeds differ"
    # the third image alone, from its own seed, is the same picture
    single = engine.generate(GenerationRequest("a red fox", steps=3, seed=44, width=256, height=256))
    assert np.abs(_pixels(single)[0].astype(int) - _pixels(a)[2].astype(int)).max() <= 1


def test_img2img_through_from_pipe_keeps_dtype(engine, demo_config):
    first = engine.generate(GenerationRequest("a red fox", steps=3, seed=1, width=256, height=256))
    init = first.images[0].image.resize((320, 256))
    result = engine.generate(
        GenerationRequest("a red fox", mode="img2img", init_image=init, strength=0.5, steps=4, seed=1)
    )
    assert result.images[0].image.size == (320, 256)
    assert result.images[0].metadata["strength"] == 0.5
    assert result.images[0].metadata["init_image_sha256"]
    loaded = engine.models.current
    i2i = engine.models.img2img(loaded)
    assert i2i.transformer is loaded.pipe.transformer, "components are shared, not copied"
    assert i2i.transformer.dtype == loaded.dtype and i2i.vae.dtype == loaded.dtype


def test_img2img_dtype_is_explicit_for_half_precision(tiny_family, tmp_path):
    """from_pipe without dtype upcasts shared modules to fp32; the manager passes it."""
    import torch

    from studio.config import StudioConfig
    from studio.models import ModelManager, Placement

    manager = ModelManager(StudioConfig(data_dir=tmp_path), placement=Placement("bf16", "cpu", torch.bfloat16))
    loaded = manager.load(str(tiny_family["sd3-medium"]))
    i2i = manager.img2img(loaded)
    assert loaded.pipe.transformer.dtype == torch.bfloat16
    assert i2i.transformer.dtype == torch.bfloat16 and i2i.text_encoder_3.dtype == torch.bfloat16


def test_img2img_and_inpaint_keep_an_fp8_transformer_in_fp8(tiny_family, tmp_path):
    """The sibling pipelines reuse the component objects as they are: fp8 layerwise storage is not
    undone (from_pipe(dtype=bf16) would cast it back to a full bf16 copy)."""
    import torch

    from studio.config import StudioConfig
    from studio.memory import get_preset
    from studio.models import ModelManager, placement_from_preset

    placement = placement_from_preset(get_preset("fp8-layerwise"), "cpu", validate_on_cpu=True)
    manager = ModelManager(StudioConfig(data_dir=tmp_path), placement=placement)
    loaded = manager.load(str(tiny_family["sd3-medium"]))

    def fp8_params(pipe):
        return sum(p.dtype == torch.float8_e4m3fn for p in pipe.transformer.parameters())

    assert fp8_params(loaded.pipe) > 0
    for sibling in (manager.img2img(loaded), manager.inpaint(loaded)):
        assert sibling.transformer is loaded.pipe.transformer and fp8_params(sibling) == fp8_params(loaded.pipe)


def test_turbo_uses_the_turbo_variant(engine):
    result = engine.generate(GenerationRequest("a red fox", mode="turbo", seed=3))
    m = result.images[0].metadata
    assert m["variant"] == "sd3.5-large-turbo" and m["steps"] == 4 and m["guidance"] == 0.0
    assert result.images[0].image.size == (256, 256)


def test_progress_reports_every_step(engine):
    events = []
    engine.generate(GenerationRequest("x", steps=5, seed=1, batch_count=2, width=256, height=256),
                    on_progress=events.append)
    assert [(e.run, e.step) for e in events] == [(r, s) for r in range(2) for s in range(1, 6)]
    assert events[-1].fraction == pytest.approx(1.0)
    assert all(e.steps == 5 and e.runs == 2 for e in events)
    preview = latents_to_preview(events[0].latents)
    assert preview.mode == "RGB" and max(preview.size) == 256


def test_cancel_stops_between_steps_and_keeps_finished_images(engine):
    cancel = CancelToken()
    steps_seen = []

    def on_progress(ev):
        steps_seen.append((ev.run, ev.step))
        if ev.run == 1 and ev.step == 2:
            cancel.cancel()

    result = engine.generate(
        GenerationRequest("x", steps=6, seed=1, batch_count=3, width=256, height=256),
        on_progress=on_progress, cancel=cancel,
    )
    assert result.cancelled
    assert [i.seed for i in result.images] == [1], "the finished run is kept, the interrupted one is not"
    assert (1, 3) not in steps_seen and all(run < 2 for run, _ in steps_seen), "stopped between steps"
    assert "Cancelled" in result.info
    # the pipeline is usable again afterwards
    again = engine.generate(GenerationRequest("x", steps=2, seed=1, width=256, height=256))
    assert len(again.images) == 1 and not again.cancelled


def test_out_of_memory_is_reported_and_the_model_stays(engine, monkeypatch):
    import torch

    from studio.engine import GenerationError

    engine.generate(GenerationRequest("x", steps=1, seed=1, width=256, height=256))
    loaded = engine.models.current
    calls = {"n": 0}

    def boom(self, *a, **k):
        calls["n"] += 1
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(type(loaded.pipe.transformer), "forward", boom)
    with pytest.raises(GenerationError, match="Out of GPU memory.*lower preset"):
        engine.generate(GenerationRequest("x", steps=2, seed=1, width=256, height=256))
    monkeypatch.undo()
    assert engine.models.current is loaded
    assert len(engine.generate(GenerationRequest("x", steps=1, seed=1, width=256, height=256)).images) == 1


# --- the prompt-embedding cache ---


def _count_text_encoder_calls(pipe, monkeypatch):
    calls = {"n": 0}
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name)
        original = module.forward

        def counting(*a, _orig=original, **k):
            calls["n"] += 1
            return _orig(*a, **k)

        monkeypatch.setattr(module, "forward", counting)
    return calls


def test_prompt_cache_skips_every_text_encoder_on_a_hit(engine, monkeypatch):
    req = GenerationRequest("a red fox", negative_prompt="blurry", steps=2, seed=9, width=256, height=256)
    first = engine.generate(req)
    calls = _count_text_encoder_calls(engine.models.current.pipe, monkeypatch)
    second = engine.generate(req)
    assert calls["n"] == 0, "a repeat prompt runs no text encoder"
    assert np.array_equal(_pixels(first)[0], _pixels(second)[0])
    engine.generate(GenerationRequest("a blue fox", negative_prompt="blurry", steps=2, seed=9, width=256, height=256))
    assert calls["n"] == 6, "a new prompt runs CLIP-L, CLIP-G and T5 for prompt and negative"
    assert engine.prompt_cache.hits >= 1


def test_cached_and_uncached_images_are_identical(demo_config):
    from studio.engine import PromptCache

    req = GenerationRequest("a red fox", steps=2, seed=4, batch_size=2, width=256, height=256)
    cached = Engine(ModelManager(demo_config))
    cached.generate(req)
    with_cache = cached.generate(req)
    without = Engine(ModelManager(demo_config), prompt_cache=PromptCache(max_entries=0)).generate(req)
    for a, b in zip(_pixels(with_cache), _pixels(without)):
        assert np.array_equal(a, b)
    # and equal to a bare diffusers call with the same seeds
    import torch

    pipe = cached.models.current.pipe
    bare = pipe("a red fox", num_inference_steps=2, guidance_scale=4.5, height=256, width=256,
                num_images_per_prompt=2, generator=[torch.Generator().manual_seed(s) for s in (4, 5)],
                skip_guidance_layers=[7, 8, 9])
    for a, b in zip(_pixels(with_cache), bare.images):
        assert np.abs(a.astype(int) - np.asarray(b).astype(int)).max() <= 1


def test_prompt_cache_is_bounded():
    from studio.engine import PromptCache

    cache = PromptCache(max_entries=2)
    for i in range(5):
        cache.put(i, i)
    assert len(cache) == 2 and cache.get(4) == 4 and cache.get(0) is None


def test_long_prompts_report_truncation(engine):
    long_prompt = " ".join(["a red fox"] * 40)
    result = engine.generate(GenerationRequest(long_prompt, steps=1, seed=1, width=256, height=256,
                                               max_sequence_length=64))
    # prompt weighting (on by default) reads CLIP in 75-token chunks: nothing of it is cut (#16)
    assert not any("CLIP reads" in n for n in result.notes)
    assert any("T5 reads 64 and will not see" in n for n in result.notes)


# --- saving off the critical path ---


def test_gallery_saves_do_not_delay_the_result_and_are_never_lost(demo_config, monkeypatch):
    import threading
    import time

    from studio.gallery import Gallery

    gallery = Gallery(demo_config.data_dir)
    engine = Engine(ModelManager(demo_config), gallery)
    engine.generate(GenerationRequest("warm", steps=1, seed=1, width=256, height=256)).wait_saved()
    release = threading.Event()
    original = Gallery.save

    def slow_save(self, *a, **k):
        release.wait(30)
        return original(self, *a, **k)

    monkeypatch.setattr(Gallery, "save", slow_save)
    t0 = time.perf_counter()
    result = engine.generate(GenerationRequest("a fox", steps=1, seed=3, batch_count=2, width=256, height=256))
    returned_s = time.perf_counter() - t0
    assert len(result.images) == 2 and all(not i.saving.done() for i in result.images), \
        "the images came back while their saves were still pending"
    assert returned_s < 25
    release.set()
    assert gallery.flush(timeout=30)
    records = result.wait_saved()
    assert [r.seed for r in records] == [3, 4]
    assert all(Path(i.path).is_file() for i in result.images)
    assert gallery.count() == 3


def test_a_failed_save_is_a_clear_error_not_a_lost_image(demo_config, monkeypatch):
    import errno

    from studio.gallery import Gallery, GalleryError

    gallery = Gallery(demo_config.data_dir)
    engine = Engine(ModelManager(demo_config), gallery)

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("studio.metadata.png.write_png", full_disk)
    result = engine.generate(GenerationRequest("a fox", steps=1, seed=3, width=256, height=256))
    assert result.images[0].image.size == (256, 256), "the image itself is still in hand"
    with pytest.raises(GalleryError, match="(?i)space|full"):
        result.wait_saved()
    assert gallery.integrity_ok() and gallery.count() == 0
