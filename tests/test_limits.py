"""One table of limits and defaults: the engine, the UI, the API, the CLI and the planner agree."""

from __future__ import annotations

import gradio as gr
import pytest

from studio.catalog import VARIANTS
from studio.engine import GenerationRequest, ValidationError, validate
from studio.engine.limits import LIMITS, MODES, snap
from studio.engine.request import build_request


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from studio.config import StudioConfig
    from studio.service import Studio
    from studio.ui.app import build_app

    studio = Studio(StudioConfig(data_dir=tmp_path_factory.mktemp("limits"), demo=True))
    return build_app(studio)


def _sliders(app) -> dict[str, list[gr.Slider]]:
    out: dict[str, list[gr.Slider]] = {}
    for block in app.blocks.values():
        if isinstance(block, gr.Slider) and block.elem_id:
            out.setdefault(block.elem_id, []).append(block)
    return out


# elem_id suffix → the limits entry it stands for
# (the longer suffixes first: "-hires-steps" is hires_steps, not steps)
SUFFIX = {"-hires-steps": "hires_steps", "-hires-scale": "hires_scale", "-hires-denoise": "hires_denoise",
          "-upscale-by": "upscale_scale", "-refine-denoise": "refine_denoise", "control-scale": "control_scale",
          "control-start": "control_start", "control-end": "control_end", "-canny-low": "canny_low",
          "-canny-high": "canny_high", "control-blur": "blur_radius",
          "-steps": "steps", "-guidance": "guidance", "-batch-count": "batch_count", "-batch-size": "batch_size",
          "-shift": "shift", "-msl": "max_sequence_length", "-strength": "strength", "-mask-blur": "mask_blur",
          "-padding": "padding"}


def test_every_slider_offers_exactly_the_engines_range(app):
    checked = 0
    for elem_id, sliders in _sliders(app).items():
        name = next((n for s, n in SUFFIX.items() if elem_id.endswith(s)), None)
        if name is None and "-lora-weight-" in elem_id:
            name = "lora_weight"
        if name is None:
            continue
        lim = LIMITS[name]
        for s in sliders:
            assert (s.minimum, s.maximum) == (lim.lo, lim.hi), (elem_id, s.minimum, s.maximum, lim)
            checked += 1
    assert checked >= 40, f"only {checked} sliders found"


@pytest.mark.parametrize("name", ["steps", "guidance", "batch_count", "batch_size", "shift", "max_sequence_length",
                                  "mask_blur", "padding", "strength"])
def test_the_engine_accepts_both_ends_and_refuses_past_them(name):
    lim = LIMITS[name]
    mode = "inpaint" if name in ("mask_blur", "padding") else ("img2img" if name == "strength" else "txt2img")
    base = dict(prompt="x", mode=mode, steps=20)
    if mode != "txt2img":
        from PIL import Image

        base["init_image"] = Image.new("RGB", (256, 256), "white")
        if mode == "inpaint":
            base["mask_image"] = Image.new("L", (256, 256), 255)
    variant = VARIANTS["sd3.5-large"]
    ok_values = [lim.lo, lim.hi] if name != "strength" else [0.05, lim.hi]
    for value in ok_values:
        req = GenerationRequest(**{**base, name: value})
        if name == "batch_count":
            req.batch_size = 1
        validate(req, variant)
    for value in (lim.lo - (1 if lim.integer else 0.05), lim.hi + (1 if lim.integer else 0.05)):
        with pytest.raises(ValidationError) as e:
            validate(GenerationRequest(**{**base, name: value}), variant)
        assert e.value.field == name


def test_defaults_come_from_one_place_for_every_caller():
    """build_request (UI, API, CLI, reuse) fills the mode's defaults from the table."""
    assert build_request({"prompt": "x"}, "img2img").strength == LIMITS["strength"].default_for("img2img") == 0.6
    assert build_request({"prompt": "x"}, "inpaint").strength == LIMITS["strength"].default_for("inpaint") == 0.85
    req = build_request({"prompt": "x", "width": None, "steps": ""}, "txt2img")
    assert (req.width, req.steps, req.mask_blur, req.padding, req.max_sequence_length) == (
        None, None, LIMITS["mask_blur"].default, LIMITS["padding"].default, LIMITS["max_sequence_length"].default)


def test_build_request_never_rounds_or_coerces():
    req = build_request({"prompt": "x", "steps": 1.5, "width": "abc", "seed": "7"}, "txt2img")
    assert (req.steps, req.width, req.seed) == (1.5, "abc", "7")
    for field, value, words in (("steps", 1.5, "whole number"), ("width", "abc", "must be a number"),
                                ("seed", "7", "must be a number"), ("seed", 1.5, "whole number"),
                                ("width", [256], "must be a number"), ("steps", True, "must be a number")):
        with pytest.raises(ValidationError, match=words) as e:
            validate(build_request({"prompt": "x", field: value}, "txt2img"), VARIANTS["sd3.5-large"])
        assert e.value.field == field


def test_the_mode_list_includes_inpaint_everywhere(app):
    assert "inpaint" in MODES
    from studio.app.cli import build_parser

    gen = build_parser()._subparsers._group_actions[0].choices["generate"]
    mode = next(a for a in gen._actions if a.dest == "mode")
    assert tuple(mode.choices) == MODES
    gallery_modes = [b for b in app.blocks.values() if isinstance(b, gr.Dropdown) and b.elem_id == "gallery-mode"]
    assert gallery_modes and {v for _, v in gallery_modes[0].choices} >= set(MODES)


@pytest.mark.parametrize("value, expected", [(8, 16), (1000, 992), (1016, 1024), (1030, 1024), (1024, 1024),
                                             (1048, 1056), (255, 256)])
def test_snapping_gives_the_same_answer_everywhere(value, expected, capsys):
    """The engine, the planner's command and inpaint's working size all snap through one function."""
    assert snap(value) == expected
    r = validate(GenerationRequest("x", width=max(value, 256), height=1024), VARIANTS["sd3.5-large"])
    assert r.width == snap(max(value, 256))
    from studio.engine.inpaint import work_size

    assert work_size(value * 4, value * 4, (value * 4) ** 2, 16, 10**6)[0] == snap(value * 4)


def test_plan_snaps_like_generate(capsys):
    import argparse

    from studio.app.cli import add_plan_arguments
    from studio.app.plan import run_plan_command

    p = argparse.ArgumentParser()
    add_plan_arguments(p)
    run_plan_command(p.parse_args(["--vram", "24", "--width", "1016", "--height", "1000", "--json"]))
    err = capsys.readouterr().err
    assert "1016×1000 snapped to 1024×992" in err
    assert run_plan_command(p.parse_args(["--vram", "24", "--width", "8", "--json"])) == 2
    assert "out of range" in capsys.readouterr().err


def test_cli_help_shows_defaults_ranges_and_presets(capsys):
    from studio.app.cli import build_parser
    from studio.memory.names import PRESET_NAMES

    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "1–150" in out and "256–2048" in out and "inpaint" in out
    assert all(name in out for name in PRESET_NAMES)


def test_preset_names_list_matches_the_presets():
    from studio.memory import PRESETS
    from studio.memory.names import PRESET_NAMES

    assert tuple(PRESETS) == PRESET_NAMES
