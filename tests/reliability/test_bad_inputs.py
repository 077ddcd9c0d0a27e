"""Bad inputs, as users and accidents send them: each gets a clear message that names the field
(or, where the input is usable, runs with a note saying what was changed), and the studio keeps
serving — every refusal is followed by a request that must work.

Driven through the API (gradio_client against the app launched in-process, demo mode) and, where
the API cannot carry the input, through the engine or raw HTTP."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import gradio_client
from gradio_client.exceptions import AppError

from studio.catalog import VARIANTS
from studio.engine import GenerationRequest, ValidationError, normalize_init_image, open_image, validate
from tests.reliability.kit import (
    FAST,
    broken_image_files,
    crafted_png,
    init_image_files,
    itxt_chunk,
    peak_rss,
    reset_peak_rss,
    rss,
    text_chunk,
)


def txt2img(client, **kw):
    args = dict(prompt="a red fox", seed=7, **FAST)
    args.update(kw)
    return client.predict(**args, api_name="/txt2img")


def still_serving(app) -> None:
    """The next good request works (and is saved)."""
    images, seed, info = txt2img(app.client, prompt="still serving", seed=1)
    assert len(images) == 1 and seed == 1 and "1 image(s)" in info


def png_meta(path) -> dict:
    with Image.open(path) as im:
        return json.loads(im.text["sd35studio"])


# --- prompts -----------------------------------------------------------------------------------

EMPTY_NOTE = "The prompt is empty: the image is not conditioned on any text."


@pytest.mark.parametrize("prompt", ["", "   \n\t "], ids=["empty", "whitespace"])
def test_empty_prompts_run_with_a_note_through_the_api(app, prompt):
    """Decision: an empty prompt is allowed (SD3 draws unconditioned images) and always noted."""
    images, _, info = txt2img(app.client, prompt=prompt)
    assert len(images) == 1 and EMPTY_NOTE in info
    assert png_meta(images[0])["prompt"] == prompt  # stored as given, not "fixed"


@pytest.mark.parametrize("prompt", ["", "   "], ids=["empty", "whitespace"])
def test_empty_prompts_run_with_the_same_note_from_the_cli(demo_config, capsys, prompt):
    from studio.app.cli import main

    code = main(["generate", prompt, "--demo", "--steps", "1", "--width", "256", "--height", "256",
                 "--seed", "3", "--data-dir", str(demo_config.data_dir), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and len(out["images"]) == 1
    assert EMPTY_NOTE in out["notes"]


def test_long_prompts_run_and_report_what_the_encoders_cut(app):
    clause = "a red fox in the snow, "
    medium = clause * 30  # ~300 tiny tokens (5 CLIP chunks): past CLIP's 77 and T5's default 256
    # prompt weighting on (the default): CLIP reads the prompt in 75-token chunks, T5 is cut
    images, _, info = txt2img(app.client, prompt=medium, max_sequence_length=256)
    assert "CLIP reads the first" not in info
    assert "T5 reads 256 and will not see" in info and "raise max sequence length (up to 512)" in info
    assert png_meta(images[0])["prompt"] == medium, "the whole prompt is kept in the metadata"
    # literal text: CLIP reads one window of 77 and says what it will not see
    images, _, info = txt2img(app.client, prompt=medium, max_sequence_length=256, prompt_weighting=False)
    assert "CLIP reads the first 75 tokens of the prompt; it will not see" in info
    assert "turn prompt weighting on" in info

    long = clause * 60  # ~600 tiny tokens: past T5's 512 maximum, and past 8 CLIP chunks
    with pytest.raises(AppError, match=r"CLIP chunks of 75 tokens; at most 8 are read"):
        txt2img(app.client, prompt=long, max_sequence_length=512)
    images, _, info = txt2img(app.client, prompt=long, max_sequence_length=512, prompt_weighting=False)
    assert "T5 reads 512 and will not see" in info and "raise max sequence length" not in info
    with pytest.raises(AppError, match=r"10,001 characters; the limit is 10,000"):
        txt2img(app.client, prompt="x" * 10_001)
    still_serving(app)


# --- numbers -----------------------------------------------------------------------------------

BAD_NUMBERS = [
    (dict(width=0), "Width 0 is out of range: use 256–"),
    (dict(width=-64), "Width -64 is out of range"),
    (dict(height=100), "Height 100 is out of range"),
    (dict(width=4096), "Width 4096 is out of range"),
    (dict(height=10**7), "is out of range"),
    (dict(steps=0), "Steps is 0; it must be between 1 and 150"),
    (dict(steps=-3), "Steps is -3; it must be between 1 and 150"),
    (dict(steps=10_000), "Steps is 10000; it must be between 1 and 150"),
    (dict(guidance=-1), "Guidance (CFG scale) is -1"),
    (dict(guidance=1e308), "Guidance (CFG scale) is 1e+308"),
    (dict(seed=2**64), "Seed is 18,446,744,073,709,551,616; it must be between -1 and 18,446,744,073,709,551,615"),
    (dict(seed=-2), "Seed is -2; it must be between -1 and 18,446,744,073,709,551,615"),
    (dict(seed=10**400), "Seed is far out of range; it must be between -1 and 18,446,744,073,709,551,615"),
    (dict(batch_count=0), "Batch count is 0; it must be between 1 and 100"),
    (dict(batch_count=1000), "Batch count is 1000; it must be between 1 and 100"),
    (dict(batch_size=0), "Batch size is 0; it must be between 1 and 8"),
    (dict(batch_size=1000), "Batch size is 1000; it must be between 1 and 8"),
    (dict(batch_count=20, batch_size=8), "= 160 images; the limit is 100 per request"),
    (dict(max_sequence_length=0), "Max sequence length (T5 tokens) is 0"),
    (dict(shift=0), "Scheduler shift is 0; it must be between 0.1 and 20"),
]


@pytest.mark.parametrize("kw, message", BAD_NUMBERS, ids=[",".join(f"{k}={v}" for k, v in kw.items())[:40]
                                                          for kw, _ in BAD_NUMBERS])
def test_out_of_range_numbers_are_refused_and_the_studio_keeps_serving(app, kw, message):
    before = app.studio.gallery.count()
    with pytest.raises(AppError) as e:
        txt2img(app.client, **kw)
    assert message in str(e.value)
    assert app.studio.gallery.count() == before, "a refused request saves nothing"
    still_serving(app)


def test_off_grid_sizes_are_snapped_and_the_snap_is_said(app):
    images, _, info = txt2img(app.client, width=250, height=270)
    assert "Width 250 was snapped to 256" in info and "Height 270 was snapped to 272" in info
    with Image.open(images[0]) as im:
        assert im.size == (256, 272)


def _raw_call(client, url, api_name: str, body_values: dict) -> str:
    """POST an endpoint over plain HTTP with a hand-written JSON body (NaN and Infinity are not
    JSON, so no client sends them — but a hand-rolled one can). Returns the SSE stream text."""
    import httpx

    params = client.view_api(print_info=False, return_format="dict")["named_endpoints"][api_name]["parameters"]
    data = []
    for p in params:
        name = p["parameter_name"]
        data.append(body_values[name] if name in body_values else json.dumps(p.get("parameter_default")))
    body = '{"data": [' + ", ".join(data) + "]}"
    r = httpx.post(url + f"gradio_api/call/{api_name.strip('/')}", content=body,
                   headers={"content-type": "application/json"}, timeout=30)
    r.raise_for_status()
    with httpx.stream("GET", url + f"gradio_api/call/{api_name.strip('/')}/{r.json()['event_id']}",
                      timeout=60) as s:
        return s.read().decode()


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_guidance_is_refused(app, value):
    # gradio_client will not even send it: the error is raised before anything leaves
    with pytest.raises(ValueError, match="not JSON compliant"):
        txt2img(app.client, guidance=float(value.replace("Infinity", "inf")))
    # a hand-written body reaches the engine, which names the field and the range
    stream = _raw_call(app.client, app.url, "/txt2img",
                       {"prompt": '"x"', "guidance": value, "steps": "1", "width": "256", "height": "256"})
    assert "event: error" in stream and "Guidance (CFG scale) must be a finite number between 0 and 30" in stream
    # and the engine refuses it for every caller (CLI: --guidance nan parses as a float)
    for field in ("guidance", "width", "steps", "seed", "shift"):
        with pytest.raises(ValidationError) as e:
            validate(GenerationRequest("x", **{field: float(value.replace("Infinity", "inf"))}),
                     VARIANTS["sd3.5-medium"])
        assert e.value.field == field
    still_serving(app)


# --- img2img strength --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def init_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("init") / "init.png"
    Image.new("RGB", (256, 256), (30, 120, 200)).save(path)
    return gradio_client.handle_file(str(path))


@pytest.mark.parametrize("strength, steps, message", [
    (0, 4, "Strength 0 would return the init image unchanged"),
    (1.5, 4, "Strength is 1.5; it must be between 0 and 1"),
    (-0.2, 4, "Strength is -0.2"),
    (0.1, 4, "4 × 0.1 = 0.40, less than one step. Raise the strength to at least 0.25 or the steps to at least 10"),
])
def test_bad_strength_is_refused(app, init_png, strength, steps, message):
    with pytest.raises(AppError) as e:
        app.client.predict(init_image=init_png, prompt="x", strength=strength, steps=steps, api_name="/img2img")
    assert message in str(e.value)
    still_serving(app)


def test_strength_one_repaints_fully(app, init_png):
    images, _, info = app.client.predict(init_image=init_png, prompt="x", strength=1.0, steps=2, seed=5,
                                         api_name="/img2img")
    meta = png_meta(images[0])
    assert meta["strength"] == 1.0 and meta["steps"] == 2 and len(images) == 1


# --- init images -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return broken_image_files(tmp_path_factory.mktemp("broken"))


@pytest.mark.parametrize("name, message", [
    ("corrupt.png", "The init image (corrupt.png) is not an image the studio can read"),
    ("not-an-image.png", "The init image (not-an-image.png) is not an image the studio can read"),
    ("truncated.png", "The init image (truncated.png) is damaged and could not be decoded"),
    ("zero.png", "The init image (zero.png) is not an image the studio can read"),
    ("bomb.png", "too large to decode safely"),
])
def test_broken_init_images_are_refused_with_a_message(app, broken, name, message):
    with pytest.raises(AppError) as e:
        app.client.predict(init_image=gradio_client.handle_file(str(broken[name])), prompt="x", steps=4,
                           api_name="/img2img")
    assert message in str(e.value)
    assert "/tmp" not in str(e.value) and "gradio" not in str(e.value), "no server path in the message"
    # the same file through the engine: the same refusal, naming the field
    with pytest.raises(ValidationError) as e:
        normalize_init_image(str(broken[name]))
    assert e.value.field == "init_image"
    still_serving(app)


def test_a_decompression_bomb_is_refused_before_decoding(app, broken, tmp_path):
    """A 30,000² PNG header (2.7 GB of RGB if decoded): refused from its header, with no large
    allocation — the process's peak RSS stays within 100 MB of where it was, through the upload,
    the API and the engine (decoding it would add 2,700 MB)."""
    blob = broken["bomb.png"].read_bytes()
    assert len(blob) < 100_000
    if not reset_peak_rss():
        pytest.skip("the kernel does not allow resetting the peak RSS")
    base = rss()
    with pytest.raises(AppError, match="too large to decode safely"):
        app.client.predict(init_image=gradio_client.handle_file(str(broken["bomb.png"])), prompt="x", steps=4,
                           api_name="/img2img")
    for src in (blob, str(broken["bomb.png"])):
        with pytest.raises(ValidationError, match="too large"):
            open_image(src)
    # below Pillow's own bomb limit (179 MP) the studio's 40 MP limit refuses it, also from the header
    mid = tmp_path / "81mp.png"
    mid.write_bytes(crafted_png(9000, 9000, b"\0" * 64))
    with pytest.raises(ValidationError, match=r"9000×9000 = 81 MP; the limit is 40 MP"):
        open_image(str(mid))
    assert peak_rss() - base < 100 << 20
    still_serving(app)


def _expected_init_sha(app, path) -> str:
    """What the engine must have stored for this file: its own normalisation of the original
    file (the API may not pre-decode or convert it), by content."""
    from studio.blobs import image_sha256

    loaded = app.studio.models.current
    r = validate(GenerationRequest("x", mode="img2img", init_image=str(path), steps=4), loaded.variant,
                 loaded.max_side, loaded.native_size)
    return image_sha256(r.init_image)


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    return init_image_files(tmp_path_factory.mktemp("awkward"))


@pytest.mark.parametrize("name", ["rgba.png", "grey.png", "palette-transparent.png", "cmyk.jpg", "16bit.png",
                                  "exif-rotated.jpg", "animated.gif", "animated.png"])
def test_every_image_mode_reaches_the_engine_untouched_and_runs(app, awkward, name):
    """Through the API the engine gets the original file: the init image it used (recorded as
    init_image_sha256) is exactly its own normalisation of that file."""
    images, _, info = app.client.predict(init_image=gradio_client.handle_file(str(awkward[name])), prompt="x",
                                         strength=0.5, steps=4, seed=2, api_name="/img2img")
    meta = png_meta(images[0])
    assert meta["init_image_sha256"] == _expected_init_sha(app, awkward[name])
    if name == "exif-rotated.jpg":
        assert (meta["width"], meta["height"]) == (256, 320), "portrait: the EXIF rotation was applied"


def test_normalisation_is_right_for_each_mode(awkward):
    """What 'normalised' means, mode by mode (engine level, the pixels checked)."""
    def px(name):
        return np.asarray(normalize_init_image(str(awkward[name])))

    assert (px("rgba.png") == 255).all(), "transparent pixels become white, not black"
    assert (px("palette-transparent.png") == 255).all(), "so do transparent palette entries"
    grey = px("grey.png")
    assert grey.shape == (256, 256, 3) and grey[0, 0, 0] == 0 and grey[-1, 0, 0] == 255
    cmyk = px("cmyk.jpg")
    assert abs(int(cmyk[0, 0, 0]) - 255) < 8 and cmyk[0, 0, 1] < 8 and cmyk[0, 0, 2] < 8, "CMYK red stays red"
    ramp = px("16bit.png")[0, :, 0].astype(int)
    assert ramp[0] == 0 and ramp[-1] == 255 and abs(ramp[128] - 128) <= 2, "16 bits scaled, not clipped"
    assert (np.diff(ramp) >= 0).all()
    rotated = normalize_init_image(str(awkward["exif-rotated.jpg"]))
    assert rotated.size == (256, 320)
    top, bottom = np.asarray(rotated)[10, 128], np.asarray(rotated)[-10, 128]
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50, "red on top, as displayed"
    for name, first in (("animated.gif", (0, 200, 0)), ("animated.png", (0, 200, 0))):
        pixel = px(name)[0, 0]
        assert np.abs(pixel.astype(int) - first).max() <= 6, "the first frame is used"


def test_the_ui_init_image_hands_the_original_file_to_the_engine(app, awkward):
    """The img2img tab's image component must not convert uploads itself (gr.Image's default
    image_mode="RGB" would flatten transparency to black and clip 16-bit images to white before
    the engine sees them)."""
    from gradio.data_classes import FileData

    from studio.ui.app import build_app

    demo = build_app(app.studio)
    tabs = {type(f.fn.__self__).__name__: f.fn.__self__ for f in demo.fns.values()
            if getattr(f.fn, "__name__", "") == "stream" and hasattr(f.fn, "__self__")}
    component = tabs["Img2ImgTab"].init_image
    for name in ("16bit.png", "rgba.png", "cmyk.jpg"):
        path = awkward[name]
        out = component.preprocess(FileData(path=str(path), orig_name=name))
        assert open(out, "rb").read() == path.read_bytes(), f"{name} was re-encoded before the engine saw it"


# --- PNG info: malformed and hostile metadata ----------------------------------------------------

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)> & "quotes" \'single\'\nline two'


@pytest.fixture(scope="module")
def hostile_pngs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    base = crafted_png(8, 8, b"")  # header only: reading metadata never decodes pixels

    def with_chunks(name, *chunks):
        path = folder / name
        path.write_bytes(base[:33] + b"".join(chunks) + base[33:])
        return path

    from PIL.PngImagePlugin import PngInfo

    meta = {"prompt": HOSTILE, "negative_prompt": "</textarea><b>bold</b>", "seed": 1, "steps": 4}
    info = PngInfo()
    info.add_text("parameters",
                  f"{HOSTILE}\nNegative prompt: </textarea><b>bold</b>\nSteps: 4, Seed: 1, Sampler: Euler")
    info.add_text("sd35studio", json.dumps(meta), zip=True)
    script = folder / "script.png"
    Image.new("RGB", (8, 8)).save(script, pnginfo=info)
    return {
        "script": script,
        "huge": with_chunks("huge.png", text_chunk("parameters", b"a" * (9 << 20))),  # over the 8 MB limit
        "bad-utf8": with_chunks("bad-utf8.png", itxt_chunk("parameters", b"caf\xc3\x28 \xff\xfe prompt")),
        "bad-json": with_chunks("bad-json.png", text_chunk("sd35studio", b'{"prompt": "unterminated'),
                                text_chunk("parameters", b"fallback fox\nSteps: 3, Seed: 9, Sampler: Euler")),
        "bad-crc": with_chunks("bad-crc.png", text_chunk("parameters", b"x")[:-4] + b"\0\0\0\0"),
    }


def test_hostile_text_comes_back_verbatim_as_text(app, hostile_pngs):
    fields, infotext, source, error = app.client.predict(file=gradio_client.handle_file(str(hostile_pngs["script"])),
                                                         api_name="/read_png_info")
    assert source == "studio" and not error
    assert fields["prompt"] == HOSTILE and fields["negative_prompt"] == "</textarea><b>bold</b>"
    assert HOSTILE in infotext  # not escaped, not stripped: it is text, shown as text


@pytest.mark.parametrize("name, problem", [
    ("huge", "over the 8.0 MB limit; it was skipped"),
    ("bad-utf8", "is not valid UTF-8"),
    ("bad-json", "is not valid JSON"),
    ("bad-crc", "damaged (bad checksum)"),
])
def test_malformed_metadata_is_reported_not_raised(app, hostile_pngs, name, problem):
    fields, infotext, source, error = app.client.predict(file=gradio_client.handle_file(str(hostile_pngs[name])),
                                                         api_name="/read_png_info")
    assert problem in error
    if name == "bad-json":  # what could be read still comes back
        assert fields["prompt"] == "fallback fox" and fields["seed"] == 9
    still_serving(app)


def test_generated_hostile_prompts_round_trip_through_the_gallery_as_text(app):
    images, _, _ = txt2img(app.client, prompt=HOSTILE, negative_prompt="<b>x</b>")
    listing = app.client.predict(query="script alert", api_name="/gallery_list")
    item = next(i for i in listing["items"] if i["prompt"] == HOSTILE)
    png, details, infotext = app.client.predict(image_id=item["id"], api_name="/gallery_get")
    assert details["metadata"]["prompt"] == HOSTILE and HOSTILE in infotext


def test_the_ui_shows_metadata_in_text_components_only(app, hostile_pngs):
    """Every component that displays read or stored metadata is a Textbox or JSON (rendered as
    text by the browser, never as markup) — and the handler puts the hostile text there as is."""
    import gradio as gr

    from studio.ui.app import build_app

    demo = build_app(app.studio)
    text_kinds = (gr.Textbox, gr.JSON, gr.State, gr.Button, gr.Image, gr.DownloadButton, gr.Row, gr.File)
    gallery_tab = None
    for f in demo.fns.values():
        name = getattr(f.fn, "__name__", "")
        if name in ("_read_png", "_select", "_delete", "read_png_info", "gallery_get", "gallery_list"):
            for out in f.outputs:
                assert isinstance(out, text_kinds), f"{name} writes metadata into a {type(out).__name__}"
        if name == "_read_png":
            gallery_tab = f.fn.__self__
    out = gallery_tab._read_png(str(hostile_pngs["script"]))
    assert isinstance(gallery_tab.png_text, gr.Textbox) and out[gallery_tab.png_text].startswith(HOSTILE)
    assert out[gallery_tab.png_json]["prompt"] == HOSTILE
