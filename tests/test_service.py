"""The service decides the placement once, for every load path, and refuses what cannot run."""

from __future__ import annotations

import json

import pytest

from studio.config import ConfigError, StudioConfig
from studio.engine import GenerationRequest
from studio.errors import ModelError, ValidationError
from studio.service import Studio

FAST = dict(steps=1, width=256, height=256, seed=1)


@pytest.fixture
def bf16_studio(demo_config):
    demo_config.preset = "cpu-bf16"
    return Studio(demo_config)


def test_the_first_lazy_load_honours_the_configured_preset(bf16_studio):
    res = bf16_studio.generate(GenerationRequest("a cat", **FAST))
    assert res.images[0].metadata["preset"] == "cpu-bf16"
    assert str(bf16_studio.current.pipe.transformer.dtype) == "torch.bfloat16"


def test_a_swap_and_turbo_keep_the_chosen_preset(studio):
    studio.load_model(variant="sd3.5-large", preset="cpu-bf16")
    res = studio.generate(GenerationRequest("a cat", variant="sd3-medium", **FAST))
    assert res.images[0].metadata["preset"] == "cpu-bf16", "the swap to another variant"
    res = studio.generate(GenerationRequest("a cat", mode="turbo", **{**FAST, "steps": 1}))
    assert res.images[0].metadata["variant"] == "sd3.5-large-turbo"
    assert res.images[0].metadata["preset"] == "cpu-bf16", "Turbo reloads with the same preset"


def test_auto_in_the_demo_says_why_it_is_not_the_planners_choice(studio):
    placement = studio.placement_for("auto")
    assert placement.name == "cpu-fp32" and "demo" in placement.reason


def test_unknown_and_impossible_presets_are_refused_with_the_fix(studio):
    with pytest.raises(ModelError, match=r"Unknown memory preset 'no-such-preset'\. Valid presets: auto, full,"):
        studio.load_model(preset="no-such-preset")
    with pytest.raises(ModelError, match="cannot run here"):
        studio.load_model(preset="full")  # CUDA only
    assert studio.current is None


def test_a_bad_request_is_refused_before_any_model_loads(studio):
    with pytest.raises(ValidationError, match="Width 5000 is out of range") as e:
        studio.generate(GenerationRequest("a cat", width=5000))
    assert e.value.field == "width"
    assert not studio.is_built("models") or studio.current is None, "nothing was loaded"


def test_demo_with_model_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--demo runs the offline demo models"):
        StudioConfig(data_dir=tmp_path, demo=True, model=str(tmp_path / "x.safetensors"))


def test_cli_generate_records_the_preset_it_ran_with(demo_config, main_here):
    out = main_here("generate", "a red fox", "--demo", "--preset", "cpu-bf16", "--steps", "1", "--json",
                    "--data-dir", str(demo_config.data_dir))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["preset"] == "cpu-bf16"
    from studio.metadata import read_png_info

    assert read_png_info(result["images"][0]["path"]).fields["preset"] == "cpu-bf16"


@pytest.mark.parametrize("args, words", [
    (["--preset", "no-such-preset"], "Unknown memory preset 'no-such-preset'. Valid presets: auto"),
    (["--model", "/nowhere/x.safetensors"], "--demo runs the offline demo models"),
    (["--width", "5000"], "Width 5000 is out of range"),
])
def test_cli_refusals_are_one_line_errors(demo_config, args, words, main_here):
    out = main_here("generate", "a cat", "--demo", *args, "--data-dir", str(demo_config.data_dir))
    assert out.returncode == 2, out.stdout
    assert out.stderr.startswith("error: ") and words in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "Loading" not in out.stderr, "refused before any load"
