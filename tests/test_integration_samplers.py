"""Samplers, schedules, prompt weighting, the T5 prompt and styles, wired end to end (#16):
through ``Studio.generate``, the metadata and infotext (read back with an A1111-faithful parser),
"reuse parameters" (A1111/Forge and ComfyUI names mapped onto ours), the API and the CLI.

The modules themselves are tested in test_samplers / test_weighting / test_tokens / test_styles;
here only what the wiring adds. Tiny demo models, 256², 2 steps, SLG off where the default does
not matter: a handful of generations in all."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from studio.engine import build_request
from studio.errors import ValidationError
from studio.metadata import fields_from_infotext, read_png_info, to_infotext
from tests.a1111_parser import parse_generation_parameters as a1111_parse

FAST = dict(steps=2, width=256, height=256, seed=11)


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_family):
    """One demo Studio for the module (one model load)."""
    from studio.config import StudioConfig
    from studio.service import Studio

    config = StudioConfig(data_dir=tmp_path_factory.mktemp("samplers") / "data", demo=True)
    config.tiny_dir.parent.mkdir(parents=True)
    config.tiny_dir.symlink_to(next(iter(tiny_family.values())).parent, target_is_directory=True)
    return Studio(config)


@pytest.fixture(scope="module")
def default_run(studio):
    """Today's request: no sampler, no schedule, a plain prompt (the variant's SLG advice)."""
    return studio.generate(build_request(dict(prompt="a red fox", **FAST)))


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image)


def test_the_default_request_is_todays_image(studio, default_run):
    """Euler + Normal with a plain prompt is exactly what the pipeline makes on its own."""
    import torch

    meta = default_run.images[0].metadata
    assert (meta["sampler"], meta["schedule"], meta["scheduler"]) == ("Euler", "Normal",
                                                                       "FlowMatchEulerDiscreteScheduler")
    assert meta["prompt_weighting"] is True and meta.get("styles") is None
    pipe = studio.current.pipe
    kwargs = {}
    if meta["slg"]:
        s = meta["slg"]
        kwargs = dict(skip_guidance_layers=s["layers"], skip_layer_guidance_scale=s["scale"],
                      skip_layer_guidance_start=s["start"], skip_layer_guidance_stop=s["stop"])
    today = pipe(prompt="a red fox", negative_prompt="", num_inference_steps=2, guidance_scale=meta["guidance"],
                 width=256, height=256, generator=[torch.Generator("cpu").manual_seed(11)],
                 max_sequence_length=256, **kwargs).images[0]
    assert np.array_equal(np.asarray(today), _pixels(default_run))
    assert "Schedule type: Normal" in to_infotext(meta)


def test_weighting_is_read_and_the_prompt_cache_keys_on_the_parsed_prompt(studio, default_run):
    cache = studio.engine.prompt_cache
    misses = cache.misses
    one = studio.generate(build_request(dict(prompt="a (red:1.0) fox", **FAST)))
    assert cache.misses == misses, "(red:1.0) fox parses to the prompt already encoded: a cache hit"
    assert np.array_equal(_pixels(one), _pixels(default_run))
    more = studio.generate(build_request(dict(prompt="a (red:1.5) fox", **FAST)))
    assert cache.misses == misses + 1
    assert not np.array_equal(_pixels(more), _pixels(default_run))


def test_sampler_schedule_t5_prompt_and_styles_through_metadata_infotext_and_reuse(studio, default_run):
    req = build_request(dict(prompt="a red fox", sampler="DPM++ 2M", schedule="Automatic", styles="Photo",
                             prompt_3="a fox in deep snow", emphasis="No norm", slg="off", **FAST))
    result = studio.generate(req)
    item = result.images[0]
    meta = item.metadata
    assert (meta["sampler"], meta["schedule"], meta["scheduler"]) == ("DPM++ 2M", "Karras",
                                                                       "DPMSolverMultistepScheduler")
    photo = studio.styles.styles["Photo"]
    assert meta["styles"] == ["Photo"] and meta["prompt"] == "a red fox"
    assert meta["styled_prompt"] == f"a red fox, {photo.prompt}"
    assert meta["styled_negative_prompt"] == photo.negative_prompt
    assert (meta["prompt_3"], meta["emphasis"]) == ("a fox in deep snow", "No norm")
    assert not np.array_equal(_pixels(result), _pixels(default_run))

    # the infotext, as A1111 reads it: Forge's keys, the styled prompt, no style names
    with Image.open(item.path) as im:
        text = im.text["parameters"]
    params = a1111_parse(text)
    assert (params["Sampler"], params["Schedule type"]) == ("DPM++ 2M", "Karras")
    assert params["Prompt"] == meta["styled_prompt"] and params["Negative prompt"] == photo.negative_prompt
    assert (params["T5 prompt"], params["Emphasis"]) == ("a fox in deep snow", "No norm")
    assert "Styles" not in text

    # reuse: our JSON chunk gives the request back as it was asked
    info = read_png_info(item.path)
    fields, notes = studio.reuse_fields(info.fields, info.source)
    assert notes == []
    for key, value in (("sampler", "DPM++ 2M"), ("schedule", "Karras"), ("styles", ["Photo"]),
                       ("prompt", "a red fox"), ("prompt_3", "a fox in deep snow"), ("emphasis", "No norm")):
        assert fields[key] == value, key
    # and the infotext alone (another app's copy): the styles are inferred back, as A1111 does
    fields, notes = studio.reuse_fields(fields_from_infotext(text), "a1111")
    assert (fields["sampler"], fields["schedule"], fields["styles"]) == ("DPM++ 2M", "Karras", ["Photo"])
    assert (fields["prompt"], fields["negative_prompt"]) == ("a red fox", "")
    again = studio.engine.prepare(build_request(fields), studio.current)
    assert (again.sampler, again.schedule, again.prompt) == ("DPM++ 2M", "Karras", meta["styled_prompt"])


def _comfy_png(path, sampler_name: str, scheduler: str):
    graph = {
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 5, "steps": 30, "cfg": 4.5, "sampler_name": sampler_name, "scheduler": scheduler,
            "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
            "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3.5_medium.safetensors"}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
    }
    png = PngInfo()
    png.add_text("prompt", json.dumps(graph))
    Image.new("RGB", (8, 8)).save(path, pnginfo=png)
    return path


def test_peer_names_map_onto_ours_on_reuse(studio, tmp_path):
    forge = ("a red fox\nSteps: 30, Sampler: DPM++ 2M Karras, CFG scale: 4.5, Seed: 5, Size: 1024x1024, "
             "Model: sd3.5_medium")
    fields, notes = studio.reuse_fields(fields_from_infotext(forge), "a1111")
    assert (fields["sampler"], fields["schedule"]) == ("DPM++ 2M", "Karras") and notes == []
    a1111 = forge.replace("DPM++ 2M Karras", "DPM++ 2M SDE, Schedule type: Automatic")
    fields, _ = studio.reuse_fields(fields_from_infotext(a1111), "a1111")
    assert (fields["sampler"], fields["schedule"]) == ("DPM++ 2M SDE", "Exponential")

    info = read_png_info(_comfy_png(tmp_path / "comfy.png", "dpmpp_2m", "karras"))
    assert info.source == "comfyui"
    fields, notes = studio.reuse_fields(info.fields, info.source)
    assert (fields["sampler"], fields["schedule"], fields["steps"]) == ("DPM++ 2M", "Karras", 30) and notes == []

    info = read_png_info(_comfy_png(tmp_path / "unknown.png", "dpm_fast", "ddim_uniform"))
    fields, notes = studio.reuse_fields(info.fields, info.source)
    assert "sampler" not in fields and "schedule" not in fields, "unknown names are reported, never guessed"
    assert any("'dpm_fast' is not available" in n and "DPM++ 2M" in n for n in notes)
    assert any("'ddim_uniform' is not available" in n for n in notes)
    assert fields["steps"] == 30, "the rest of the parameters still load"


def test_bad_sampling_requests_are_refused_naming_the_field(studio, default_run):
    for fields, field, words in (
        (dict(sampler="dpmpp_2m"), "sampler", "written 'DPM++ 2M'"),
        (dict(sampler="Euler", schedule="Bogus"), "schedule", "Karras"),
        (dict(prompt_weighting="yes"), "prompt_weighting", "true or false"),
        (dict(emphasis="Loud"), "emphasis", "No norm"),
        (dict(styles=["No such style"]), "styles", "Unknown style"),
        (dict(styles=[f"s{i}" for i in range(17)]), "styles", "at most 16"),
    ):
        with pytest.raises(ValidationError) as e:
            studio.generate(build_request(dict(prompt="x", **FAST, **fields)))
        assert e.value.field == field and words in str(e.value), (fields, str(e.value))
    with pytest.raises(ValidationError) as e:  # 9 chunks of 75 CLIP tokens: refused before it runs
        studio.engine.prepare(build_request(dict(prompt="fox " * 660, **FAST)), studio.current)
    assert e.value.field == "prompt" and "9 CLIP chunks" in str(e.value)


def test_token_notes_and_the_live_counter(studio, default_run):
    from studio.engine.tokens import count_for

    long = " ".join(["fox"] * 100)
    r = studio.engine.prepare(build_request(dict(prompt=long, prompt_weighting=False, **FAST)), studio.current)
    assert any("CLIP reads the first 75 tokens" in n for n in r.notes)
    r = studio.engine.prepare(build_request(dict(prompt=long, **FAST)), studio.current)
    assert not any("CLIP reads" in n for n in r.notes), "weighted: read in chunks, nothing cut"
    expected = count_for(studio.current.pipe, long, 256).text()
    assert studio.count_tokens(long, 256) == expected and "2 chunks" in expected
    assert "cut" in studio.count_tokens(long, 256, prompt_weighting=False)


def test_the_counter_waits_for_a_model_and_styles_list(demo_config):
    from studio.service import Studio

    fresh = Studio(demo_config)
    assert fresh.count_tokens("a red fox") == "", "no model loaded: nothing to count with (and nothing loads)"
    assert fresh.current is None
    (demo_config.data_dir / "styles.csv").write_text('name,prompt,negative_prompt\nMine,"{prompt}, in ink",\n')
    assert "Mine" in fresh.style_names() and "Photo" in fresh.style_names()
    assert {"name": "Mine", "prompt": "{prompt}, in ink", "negative_prompt": ""} in fresh.describe_styles()


# --- the API and the CLI --------------------------------------------------------------------------


def test_api_sampler_schedule_styles_and_token_count(tmp_path_factory, tiny_family):
    gradio_client = pytest.importorskip("gradio_client")
    from gradio_client.exceptions import AppError

    from tests.conftest_ui import api_client, running_studio

    with running_studio(tmp_path_factory.mktemp("api16") / "data", tiny_family) as (url, _studio):
        client = api_client(url, tmp_path_factory.mktemp("dl16"))
        styles = client.predict(api_name="/styles")
        assert any(s["name"] == "Photo" for s in styles)
        images, seed, info = client.predict(prompt="a red fox", sampler="Euler a", schedule="Simple",
                                            styles=["Photo"], slg="off", **FAST, api_name="/txt2img")
        with Image.open(images[0]) as im:
            params = a1111_parse(im.text["parameters"])
            meta = json.loads(im.text["sd35studio"])
        assert (params["Sampler"], params["Schedule type"]) == ("Euler a", "Simple")
        assert meta["styles"] == ["Photo"]
        count = client.predict(prompt="a red fox", max_sequence_length=256, api_name="/token_count")
        assert count.startswith("CLIP ") and "T5 " in count
        with pytest.raises(AppError, match="written 'DPM\\+\\+ 2M'"):
            client.predict(prompt="x", sampler="dpmpp_2m", **FAST, api_name="/txt2img")


def test_cli_sampler_schedule_style_flags(demo_config, capsys):
    from studio.app.cli import main

    data = str(demo_config.data_dir)
    code = main(["generate", "a red fox", "--demo", "--data-dir", data, "--steps", "2", "--seed", "3",
                 "--slg", "off", "--sampler", "Heun", "--schedule", "Beta", "--style", "Photo",
                 "--prompt-3", "snow fox", "--no-prompt-weighting"])
    out = capsys.readouterr()
    assert code == 0, out.err
    meta = read_png_info(out.out.split()[0]).fields
    assert (meta["sampler"], meta["schedule"], meta["styles"]) == ("Heun", "Beta", ["Photo"])
    assert (meta["prompt_3"], meta["prompt_weighting"]) == ("snow fox", False)
    assert "3 model evaluations" in out.err, "Heun's cost is said"
    with pytest.raises(SystemExit):
        main(["generate", "x", "--demo", "--data-dir", data, "--schedule", "karras"])
    assert "written 'Karras' here" in capsys.readouterr().err
