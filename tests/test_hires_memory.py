"""The hires fix against the memory planner (#17): the second pass — the larger of the two — is
planned at its size for the preset the model runs with; a decode that fits only in VAE tiles
turns tiling on, and a size that does not fit even so is refused with the largest that does.
Real SD3.5 configs counted on the meta device; the machines are simulated."""

from __future__ import annotations

import pytest

from studio.hardware import Gpu, Hardware
from studio.memory import hires_fit, plan_for


def gpu(gb: float) -> Hardware:
    return Hardware(gpus=[Gpu(0, "sim", int(gb * 2**30), int(gb * 2**30), (8, 9))], ram_total_bytes=64 << 30,
                    ram_available_bytes=60 << 30, device="cuda", simulated=("gpus", "ram"))


def cpu(gb: float) -> Hardware:
    return Hardware(ram_total_bytes=int(gb * 2**30), ram_available_bytes=int(gb * 2**30), device="cpu",
                    simulated=("ram",))


def test_a_size_that_fits_as_it_is_needs_nothing():
    fit = hires_fit(gpu(80), "sd3.5-medium", "full", 1536, 1536, first=(1024, 1024))
    assert fit.fits and not fit.tiled and fit.largest is None


def test_a_decode_that_fits_only_in_tiles_turns_tiling_on():
    # find a card where the untiled 2048² decode is the one thing that does not fit
    for vram in range(8, 81, 2):
        untiled = plan_for(gpu(vram), "sd3.5-medium", "model-offload", 2048, 2048)
        fit = hires_fit(gpu(vram), "sd3.5-medium", "model-offload", 2048, 2048, first=(1024, 1024))
        if not untiled.fits and fit.fits:
            assert fit.tiled and "peak: decode" in untiled.reason and fit.reason == untiled.reason
            return
    pytest.fail("no card size where only the tiled decode fits")


def test_too_large_even_in_tiles_is_refused_with_the_largest_size_that_fits():
    hw = cpu(28)  # the first pass (1024×576) fits in 28 GB; the 2048×1152 second pass does not
    fit = hires_fit(hw, "sd3.5-large", "cpu-bf16", 2048, 1152, first=(1024, 576))
    assert not fit.fits and fit.largest is not None and fit.reason
    w, h = fit.largest
    assert 1024 <= w < 2048 and w % 16 == 0 and h % 16 == 0 and abs(w / h - 2048 / 1152) < 0.05
    from studio.memory.presets import compose, get_preset

    p = get_preset("cpu-bf16")
    tiled = compose(p.device, p.dtype, p.transformer, p.t5, p.placement, "tiled")
    assert plan_for(hw, "sd3.5-large", tiled, w, h).fits  # the largest fits …
    assert not plan_for(hw, "sd3.5-large", tiled, w + 64, round((w + 64) * 1152 / 2048 / 16) * 16).fits  # … more not


def test_the_service_tiles_or_refuses_before_any_load(tmp_path, monkeypatch):
    from studio.config import StudioConfig
    from studio.engine import build_request
    from studio.errors import ValidationError
    from studio.service import Studio

    studio = Studio(StudioConfig(data_dir=tmp_path / "data", variant="sd3.5-large", preset="cpu-bf16"))
    monkeypatch.setattr(studio, "hardware", lambda: cpu(28))
    fine = build_request(dict(prompt="x", width=512, height=512, hires_scale=1.5))
    studio.check_request(fine)
    assert fine.hires_vae_tiling is None  # 768² fits as it is: nothing said, nothing changed
    big = build_request(dict(prompt="x", width=1024, height=576, hires_scale=2))
    with pytest.raises(ValidationError) as e:
        studio.check_request(big)
    assert e.value.field == "hires_scale"
    assert "does not fit preset 'cpu-bf16'" in str(e.value) and "the largest that fits is" in str(e.value)
    assert studio.current is None  # refused before any load
    # Medium on 20 GB: the 2048² decode fits only in tiles, so the request says so (the engine tiles)
    medium = Studio(StudioConfig(data_dir=tmp_path / "m", variant="sd3.5-medium", preset="cpu-bf16"))
    monkeypatch.setattr(medium, "hardware", lambda: cpu(20))
    tiles = build_request(dict(prompt="x", width=1024, height=1024, hires_scale=2))
    medium.check_request(tiles)
    assert tiles.hires_vae_tiling is True
    # a preset that does not fit the first pass either: the load's plan says so, the hires check does not
    monkeypatch.setattr(studio, "hardware", lambda: cpu(8))
    studio.check_request(build_request(dict(prompt="x", width=1024, height=576, hires_scale=2)))
    demo = Studio(StudioConfig(data_dir=tmp_path / "demo", demo=True))
    monkeypatch.setattr(demo, "hardware", lambda: cpu(1))
    demo.check_request(build_request(dict(prompt="x", width=256, height=256, hires_scale=2)))  # tiny models: not planned
