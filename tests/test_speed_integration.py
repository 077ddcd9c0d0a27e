"""Speed (step caching) and --compile wired end to end (#19): the request's ``speed`` through
``Studio.generate`` in every mode, the metadata and infotext (and back through reuse), the
refusals (an unknown speed, group offload), the API's ``speed`` parameter, and the CLI's
``--speed`` and ``--compile`` (through ``Studio.placement_for``, the eager backend: never inductor).

The modules themselves are tested in test_stepcache / test_compile; here only what the wiring
adds. Tiny demo models at 256². The tiny random model changes too much between steps for the
real thresholds to cache anything, so the tests that count cached passes raise "fast"'s threshold
(``SPEED_THRESHOLDS`` is read per request) — the wiring is what is under test, not the threshold."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from studio.engine import build_request
from studio.engine import stepcache
from studio.engine.compile import COMPILE_SUFFIX
from studio.errors import ModelError, ValidationError
from studio.metadata import fields_from_infotext, read_png_info
from tests.a1111_parser import parse_generation_parameters as a1111_parse

FAST = dict(steps=2, width=256, height=256, seed=11)
FORCE = 0.9  # a threshold the tiny random model passes on most steps
NOTE = re.compile(r"Speed (\w+): (\d+) of (\d+) transformer passes cached")


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_family):
    """One demo Studio for the module (one model load per variant)."""
    from studio.config import StudioConfig
    from studio.service import Studio

    config = StudioConfig(data_dir=tmp_path_factory.mktemp("speed") / "data", demo=True)
    config.tiny_dir.parent.mkdir(parents=True)
    config.tiny_dir.symlink_to(next(iter(tiny_family.values())).parent, target_is_directory=True)
    return Studio(config)


@pytest.fixture
def forced(monkeypatch):
    monkeypatch.setitem(stepcache.SPEED_THRESHOLDS, "fast", FORCE)


def _px(result) -> np.ndarray:
    return np.asarray(result.images[0].image)


def _note(result):
    found = [NOTE.search(n) for n in result.notes]
    found = [m for m in found if m]
    assert len(found) == 1, result.notes
    speed, cached, passes = found[0].groups()
    return speed, int(cached), int(passes)


def test_speed_off_is_todays_image(studio):
    """No field and "off" give the same pixels ("" and None are the default); off is recorded as
    off in the JSON and left out of the infotext (as the other defaults A1111 does not write)."""
    assert build_request(dict(prompt="x", speed="")).speed == build_request(dict(prompt="x", speed=None)).speed == "off"
    plain = studio.generate(build_request(dict(prompt="a red fox", **FAST)))
    off = studio.generate(build_request(dict(prompt="a red fox", speed="off", **FAST)))
    assert np.array_equal(_px(plain), _px(off))
    meta = off.images[0].metadata
    assert meta["speed"] == "off" and "step_cache" not in meta
    assert not any(NOTE.search(n) for n in off.notes)
    with Image.open(off.images[0].path) as im:
        text = im.text["parameters"]
        assert json.loads(im.text["sd35studio"])["speed"] == "off"
    assert "Speed" not in a1111_parse(text)
    assert build_request(fields_from_infotext(text)).speed == "off"


def test_fast_is_recorded_counted_and_read_back(studio, forced):
    """8 steps at Speed fast: passes cached (the note and the metadata agree), speed in the PNG's
    JSON and infotext, read back by reuse both ways; afterwards off is exact again."""
    fields = dict(prompt="a red fox", steps=8, width=256, height=256, seed=5)
    before = studio.generate(build_request(fields))
    fast = studio.generate(build_request(dict(fields, speed="fast")))
    item = fast.images[0]
    meta = item.metadata
    speed, cached, passes = _note(fast)
    assert speed == "fast" and meta["speed"] == "fast"
    assert meta["step_cache"] == {"passes": passes, "cached": cached}
    assert passes >= 8 and 0 < cached < passes, (cached, passes)  # 8 steps, and SLG's extra passes (never cached)
    assert not np.array_equal(_px(fast), _px(before)), "cached steps change the image a little"
    assert np.abs(_px(fast).astype(int) - _px(before).astype(int)).mean() < 64

    with Image.open(item.path) as im:
        text = im.text["parameters"]
        stored = json.loads(im.text["sd35studio"])
    assert stored["speed"] == "fast" and stored["step_cache"]["cached"] == cached
    assert a1111_parse(text)["Speed"] == "fast" and "Speed: fast" in text
    info = read_png_info(item.path)
    assert info.fields["speed"] == "fast"
    for source_fields, source in ((info.fields, info.source), (fields_from_infotext(text), "a1111")):
        reuse, notes = studio.reuse_fields(source_fields, source)
        assert reuse["speed"] == "fast" and "step_cache" not in reuse, source
        assert build_request(reuse).speed == "fast"

    again = studio.generate(build_request(fields))  # the cache's hooks are gone: exact again
    assert np.array_equal(_px(again), _px(before))


def test_every_mode_and_both_hires_passes_run_cached(studio, forced, tmp_path, tiny_family):
    """img2img, inpaint, Turbo, ControlNet and the hires fix's two passes all go through the cache."""
    init = tmp_path / "init.png"
    Image.new("RGB", (256, 256), (200, 40, 40)).save(init)
    mask = tmp_path / "mask.png"
    m = Image.new("L", (256, 256), 0)
    m.paste(255, (64, 64, 192, 192))
    m.save(mask)
    base = dict(prompt="a red fox", width=256, height=256, seed=3, slg="off", speed="fast")
    runs = {
        "img2img": dict(base, mode="img2img", init_image=str(init), steps=4, strength=1.0),
        "inpaint": dict(base, mode="inpaint", init_image=str(init), mask_image=str(mask), steps=4, strength=1.0),
        "turbo": dict(base, mode="turbo", steps=4),
        "controlnet": dict(base, steps=4, control_image=str(init), preprocess="none"),
        "hires": dict(base, steps=3, hires_scale=1.5, hires_steps=3, hires_denoise=1.0),
    }
    counts, results = {}, {}
    for name, fields in runs.items():
        results[name] = result = studio.generate(build_request(fields, fields.get("mode")))
        speed, cached, passes = _note(result)
        assert speed == "fast" and result.images[0].metadata["step_cache"] == {"passes": passes, "cached": cached}
        counts[name] = (cached, passes)
    assert [counts[k][1] for k in ("img2img", "inpaint", "turbo", "controlnet")] == [4, 4, 4, 4]
    assert counts["hires"][1] == 3 + 3, "the second pass's transformer passes are counted too"
    assert all(cached > 0 for cached, _ in counts.values()), counts
    assert results["hires"].images[0].image.size == (384, 384)
    assert results["controlnet"].images[0].metadata["controlnets"], "the ControlNet ran"


def test_an_unknown_speed_is_refused_naming_the_field_and_the_modes(demo_config):
    from studio.service import Studio

    fresh = Studio(demo_config)
    for bad in ("turbo", "FAST", 0.5, ["fast"]):
        with pytest.raises(ValidationError) as e:
            fresh.generate(build_request(dict(prompt="x", speed=bad, **FAST)))
        assert e.value.field == "speed" and "off, fast, faster" in str(e.value), str(e.value)
    assert fresh.current is None, "refused before any model was loaded"


def test_group_offload_is_refused_with_the_reason_before_any_work(demo_config, monkeypatch):
    """A model placed with diffusers' real group offload (onto the CPU here: the hooks are the same
    as on a GPU), through the one placement decision: Speed fast/faster is refused naming speed, in
    generate and in the ZeroGPU path's main-process half, before anything runs; off still runs."""
    import dataclasses

    import torch

    from studio.service import Studio

    def group_offload(pipe):
        pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                              offload_type="block_level", num_blocks_per_group=1)
        return pipe

    studio = Studio(demo_config)
    base = studio.placement_for()
    monkeypatch.setattr(studio, "placement_for", lambda *a, **k: dataclasses.replace(
        base, name="group-offload-on-cpu", resident=False, apply=group_offload))
    off = studio.generate(build_request(dict(prompt="x", slg="off", **FAST)))
    assert off.images and studio.current.placement.name == "group-offload-on-cpu"
    ran = []
    monkeypatch.setattr(type(studio.engine), "_run", lambda *a, **k: ran.append(1))
    for call in (studio.generate, studio.prepare):
        with pytest.raises(ValidationError) as e:
            call(build_request(dict(prompt="x", speed="faster", **FAST)))
        assert e.value.field == "speed" and "group offload" in str(e.value)
        assert "set Speed to off" in str(e.value)
    assert ran == [], "nothing ran"


# --- the API and the CLI --------------------------------------------------------------------------


def test_api_speed_parameter_on_every_generation_endpoint(tmp_path_factory, tiny_family):
    gradio_client = pytest.importorskip("gradio_client")
    from gradio_client.exceptions import AppError

    from tests.conftest_ui import api_client, running_studio

    with running_studio(tmp_path_factory.mktemp("api19") / "data", tiny_family) as (url, _studio):
        client = api_client(url, tmp_path_factory.mktemp("dl19"))
        api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        for name in ("/txt2img", "/img2img", "/inpaint", "/turbo", "/controlnet"):
            params = api[name]["parameters"]
            assert params[-1]["parameter_name"] == "speed", name  # last: positional clients keep working
            assert params[-1]["parameter_default"] == "off", name
        images, _seed, info = client.predict(prompt="a red fox", speed="fast", slg="off", **FAST, api_name="/txt2img")
        with Image.open(images[0]) as im:
            assert json.loads(im.text["sd35studio"])["speed"] == "fast"
        assert "Speed fast:" in info
        with pytest.raises(AppError, match="off, fast, faster"):
            client.predict(prompt="x", speed="ludicrous", **FAST, api_name="/txt2img")


def test_cli_speed_and_compile(demo_config, capsys, monkeypatch):
    import torch

    from studio.app.cli import main
    from studio.engine import compile as compiling

    data = str(demo_config.data_dir)
    code = main(["generate", "a red fox", "--demo", "--data-dir", data, "--steps", "3", "--seed", "3",
                 "--speed", "fast", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads(out.out)
    assert any(NOTE.search(n) for n in result["notes"])
    assert read_png_info(result["images"][0]["path"]).fields["speed"] == "fast"
    with pytest.raises(SystemExit):
        main(["generate", "x", "--demo", "--data-dir", data, "--speed", "turbo"])
    assert "invalid choice: 'turbo'" in capsys.readouterr().err

    monkeypatch.setattr(compiling, "COMPILE_BACKEND", "eager")  # the real one is inductor: minutes on a CPU
    try:
        code = main(["generate", "a red fox", "--demo", "--data-dir", data, "--steps", "2", "--compile", "--json"])
        out = capsys.readouterr()
        assert code == 0, out.err
        result = json.loads(out.out)
        assert result["preset"].endswith(COMPILE_SUFFIX)
        assert "Compiled in" in out.err, "the first run's compilation is said"
        meta = read_png_info(result["images"][0]["path"]).fields
        assert meta["preset"].endswith(COMPILE_SUFFIX)
    finally:
        torch._dynamo.reset()

    # a preset compile refuses: said before the server starts, and by the one placement decision
    assert main(["--demo", "--data-dir", data, "--compile", "--preset", "sequential-offload"]) == 2
    assert "--compile does not combine with sequential offload" in capsys.readouterr().err


def test_placement_for_compiles_or_refuses_with_the_reason(demo_config, monkeypatch):
    from dataclasses import replace

    from studio.engine import compile as compiling
    from studio.engine.compile import is_compiled
    from studio.hardware import Gpu, Hardware
    from studio.service import Studio

    plain = Studio(demo_config).placement_for()
    assert not plain.name.endswith(COMPILE_SUFFIX)
    studio = Studio(replace(demo_config, compile=True))
    monkeypatch.setattr(compiling, "COMPILE_BACKEND", "eager")
    placement = studio.placement_for()
    assert placement.name == plain.name + COMPILE_SUFFIX
    gpu = Hardware(gpus=[Gpu(0, "sim", 24 << 30, 24 << 30, (9, 0))], ram_total_bytes=64 << 30,
                   ram_available_bytes=60 << 30, device="cuda", simulated=("gpus", "ram"))
    assert studio.placement_for("model-offload", hardware=gpu).name == "model-offload" + COMPILE_SUFFIX
    for preset, words in (("sequential-offload", "sequential offload"), ("group-offload", "group offload")):
        with pytest.raises(ModelError, match=words) as e:
            studio.placement_for(preset, hardware=gpu)
        assert preset in str(e.value)
    try:
        loaded = studio.load_model()
        assert is_compiled(loaded.pipe.transformer) and loaded.placement.name.endswith(COMPILE_SUFFIX)
    finally:
        import torch

        torch._dynamo.reset()
