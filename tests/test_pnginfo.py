"""Metadata in and out of PNGs: our own files, A1111 compatibility, foreign and hostile files."""

from __future__ import annotations

import io
import json
import re
import struct
import tempfile
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from PIL.PngImagePlugin import PngInfo as PilPngInfo

from studio.metadata import png as pnginfo
from studio.metadata import fields_from_infotext, infotext_to_fields, parse_infotext, read_png_info, to_infotext, write_png
from studio.metadata.infotext import PARAMS, parse_param_line

META = {
    "studio_version": "0.1.0", "mode": "txt2img",
    "prompt": "a cat in a hat, <lora:fluffy:0.8>, detailed: 8k\nsecond line",
    "negative_prompt": "blurry, low quality", "steps": 28, "guidance": 3.5, "seed": 123456789,
    "width": 1216, "height": 832, "variant": "sd3.5-medium", "model": "SD3.5 Medium",
    "source": "stabilityai/stable-diffusion-3.5-medium", "preset": "balanced", "sampler": "Euler",
    "scheduler": "FlowMatchEulerDiscreteScheduler", "shift": 3.0,
    "slg": {"layers": [7, 8, 9], "scale": 2.8, "start": 0.01, "stop": 0.2},
    "max_sequence_length": 256, "strength": None, "init_image_sha256": None,
    "batch_size": 1, "batch_count": 1, "batch_index": 0, "image_index": 0,
    "timings": {"total_s": 12.5, "denoise_s": 11.0}, "created_at": "2025-01-02T03:04:05+00:00",
    "some_future_key": {"nested": [1, 2, {"x": "ü"}]},
}
# The fields infotext carries (the rest only travel in the JSON chunk).
INFOTEXT_FIELDS = ("prompt", "negative_prompt", "steps", "sampler", "scheduler", "guidance",
                   "seed", "width", "height", "variant", "shift", "slg", "max_sequence_length",
                   "studio_version")


# --- an independent, minimal A1111 parser (what other tools run on our files) -----------------

A1111_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def a1111_parse(x: str) -> dict:
    """A re-implementation of A1111's parse_generation_parameters (the parts that matter)."""
    res = {}
    prompt, negative, done_with_prompt = "", "", False
    *lines, lastline = x.strip().split("\n")
    if len(A1111_RE.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative
    for k, v in A1111_RE.findall(lastline):
        if v and v[0] == '"' and v[-1] == '"':
            try:
                v = json.loads(v)
            except ValueError:
                pass
        res[k] = v
    return res


# --- helpers ------------------------------------------------------------------------------------


def png_bytes(size=(8, 8), text: dict | None = None) -> bytes:
    info = PilPngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def with_chunks(png: bytes, *chunks: bytes) -> bytes:
    """Insert raw chunks right after IHDR (8-byte signature + 25-byte IHDR chunk)."""
    return png[:33] + b"".join(chunks) + png[33:]


def itxt(key: str, payload: bytes, compressed=False) -> bytes:
    if compressed:
        payload = zlib.compress(payload)
    return chunk(b"iTXt", key.encode() + b"\0" + bytes([int(compressed), 0]) + b"\0\0" + payload)


# --- our own files ----------------------------------------------------------------------------


def test_round_trip_json_chunk_is_exact(tmp_path):
    path = write_png(Image.new("RGB", (16, 16)), META, tmp_path / "a.png")
    info = read_png_info(path)
    assert info.error is None and info.source == "studio"
    assert info.fields == META  # every field, types and unknown extra keys included
    assert (info.width, info.height) == (16, 16)
    assert info.raw["parameters"] == to_infotext(META)
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file was renamed away


def test_round_trip_through_infotext_only(tmp_path):
    fields = fields_from_infotext(to_infotext(META))
    for key in INFOTEXT_FIELDS:
        assert fields[key] == META[key], key
    assert "strength" not in fields and "extra_params" not in fields


def test_sources_path_bytes_and_pil_image(tmp_path):
    path = write_png(Image.new("RGBA", (8, 4)), META, tmp_path / "a.png")
    for src in (path, str(path), path.read_bytes()):
        assert read_png_info(src).fields == META
    with Image.open(path) as im:
        info = read_png_info(im)
    assert info.source == "studio" and info.fields == META and (info.width, info.height) == (8, 4)


def test_infotext_layout_and_registry_keys():
    text = to_infotext(META)
    prompt_line, second, neg, params = text.split("\n")
    assert prompt_line.startswith("a cat in a hat, <lora:fluffy:0.8>")  # prompt left alone
    assert neg == "Negative prompt: blurry, low quality"
    assert params.startswith("Steps: 28, Sampler: Euler, ")
    for needed in ("CFG scale: 3.5", "Seed: 123456789", "Size: 1216x832", "Model: sd3.5-medium",
                   "Shift: 3.0", 'SLG layers: "[7, 8, 9]"', "SLG scale: 2.8",
                   "Max sequence length: 256", "Version: SD3.5 Studio 0.1.0"):
        assert needed in params
    assert "Denoising strength" not in params and "Batch size" not in params
    # every registry key is written for a full img2img request
    full = dict(META, strength=0.6, mode="img2img", batch_size=4, schedule="Karras", prompt_3="t5 text",
                negative_prompt_3="t5 negative", emphasis="No norm", prompt_weighting=False, speed="fast")
    written = [k for k, _ in parse_param_line(to_infotext(full).split("\n")[-1])]
    assert written[: len(PARAMS)] == [p.key for p in PARAMS]
    assert fields_from_infotext(to_infotext(full))["strength"] == 0.6
    assert fields_from_infotext(to_infotext(full))["mode"] == "img2img"


def test_empty_negative_and_empty_prompt_lines_are_omitted():
    text = to_infotext(dict(META, negative_prompt=""))
    assert "Negative prompt" not in text
    assert fields_from_infotext(text)["negative_prompt"] == ""
    only_params = to_infotext(dict(META, prompt="", negative_prompt=""))
    assert only_params.startswith("Steps: 28")
    assert fields_from_infotext(only_params)["prompt"] == ""


@pytest.mark.parametrize(
    "field,value",
    [
        ("sampler", "Euler, a"),
        ("sampler", "key: value"),
        ("sampler", '"quoted"'),
        ("sampler", 'say "hi"'),
        ("sampler", "back\\slash, and \"quote\""),
        ("sampler", "two\nlines"),
        ("sampler", "  padded  "),
        ("scheduler", "ünïcødé, 日本語: 🎨"),
        ("variant", "C:\\models\\my, model.safetensors"),
        ("sampler", "x" * 5000 + ","),
    ],
)
def test_quoting_edge_cases_readable_by_a1111(field, value):
    meta = dict(META, **{field: value})
    text = to_infotext(meta)
    key = {"sampler": "Sampler", "scheduler": "Scheduler", "variant": "Model"}[field]
    assert a1111_parse(text)[key] == value  # their parser
    assert parse_infotext(text)[key] == value  # ours
    back = fields_from_infotext(text)
    assert back.get(field, back.get("model")) == value
    assert back["seed"] == META["seed"]  # neighbours were not swallowed


@pytest.mark.parametrize(
    "prompt,negative",
    [
        ("a, b: c", ""),
        ('he said "hello", then: left', 'no "quotes"'),
        ("línea uno\nline two, with comma\n\nafter blank", "neg one\nneg two"),
        ("emoji 🐱 and 中文", "ненужное"),
        ("<lora:name:0.7> castle", "Steps: 1, Seed: 2, Size: 3x3"),  # params-looking negative
        ("Steps: 1, Seed: 2, Size: 3x3", ""),  # params-looking prompt
    ],
)
def test_prompts_survive_ours_and_a1111(prompt, negative):
    text = to_infotext(dict(META, prompt=prompt, negative_prompt=negative))
    for parsed in (a1111_parse(text), parse_infotext(text)):
        assert parsed["Prompt"] == prompt
        assert parsed["Negative prompt"] == negative
        assert parsed["Seed"] == str(META["seed"])


def test_parse_real_a1111_infotext():
    text = (
        "masterpiece, 1girl, <lora:detail:0.6>\nstanding in rain\n"
        "Negative prompt: lowres, bad anatomy\nextra digit\n"
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3501057452, "
        "Size: 832x1216, Model hash: 4496b36d48, Model: sd3.5_large, Denoising strength: 0.45, "
        'Lora hashes: "detail: 6e8ed4f7, other: 1a2b", Version: v1.10.1'
    )
    raw = parse_infotext(text)
    assert raw == a1111_parse(text)
    assert raw["Lora hashes"] == "detail: 6e8ed4f7, other: 1a2b"
    f = infotext_to_fields(raw)
    assert f["prompt"] == "masterpiece, 1girl, <lora:detail:0.6>\nstanding in rain"
    assert f["negative_prompt"] == "lowres, bad anatomy\nextra digit"
    assert (f["steps"], f["guidance"], f["seed"]) == (30, 7.0, 3501057452)
    assert (f["width"], f["height"]) == (832, 1216)
    assert f["variant"] == "sd3.5-large" and f["model"] == "sd3.5_large"
    assert f["schedule"] == "Karras" and f["sampler"] == "DPM++ 2M"
    assert f["strength"] == 0.45 and f["mode"] == "img2img"
    assert f["model_hash"] == "4496b36d48" and f["lora_hashes"]["detail"] == "6e8ed4f7"  # A1111's hashes, read
    assert f["extra_params"] == {"Version": "v1.10.1"}
    # keys go back out (A1111 -> studio -> A1111 keeps them)
    again = parse_infotext(to_infotext(f))
    assert again["Model hash"] == "4496b36d48"


def test_infotext_to_fields_accepts_a1111_split_size_and_bad_values():
    f = infotext_to_fields({"Prompt": "p", "Size-1": "512", "Size-2": "768", "Steps": "many",
                            "Seed": "12.0", "Model": "sd3.5_large_turbo"})
    assert (f["width"], f["height"], f["seed"]) == (512, 768, 12)
    assert f["variant"] == "sd3.5-large-turbo"
    assert f["extra_params"] == {"Steps": "many"}  # unparseable: kept, not guessed


def test_last_line_with_fewer_than_three_pairs_is_prompt():
    raw = parse_infotext("a photo\nStyle: noir, Mood: dark")
    assert raw == {"Prompt": "a photo\nStyle: noir, Mood: dark", "Negative prompt": ""}


def test_long_hostile_param_line_is_linear():
    line = "a" * 300_000 + " b" * 100_000  # the A1111 regex backtracks quadratically on this
    t0 = time.perf_counter()
    assert parse_infotext(line)["Prompt"] == line
    assert parse_param_line(line[:200_000]) == []
    assert time.perf_counter() - t0 < 2.0


_line_chars = st.sampled_from(list('ab Z9_-/:,"\\ \t\u00e9\u4e2d'))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(_line_chars, st.sampled_from(["Steps", ": ", ", ", '"x, y"', '"\\"'])),
                max_size=40).map("".join))
def test_linear_param_parser_equals_a1111_regex(line):
    assert parse_param_line(line) == A1111_RE.findall(line)


# --- property: writer/reader round trip --------------------------------------------------------

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)
_line = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=30)
_floats = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


def _normalize(text: str) -> str:
    """What any A1111 parser gives back for a prompt: lines stripped, leading blanks dropped."""
    lines = [ln.strip() for ln in text.replace("\r\n", "\n").split("\n")]
    while lines and lines[0] == "":
        lines.pop(0)
    return "\n".join(lines)


metas = st.fixed_dictionaries(
    {
        "prompt": st.lists(_line, max_size=4).map("\n".join),
        "negative_prompt": st.lists(_line, max_size=3).map("\n".join),
        "steps": st.integers(1, 200), "seed": st.integers(0, 2**64 - 1),
        "guidance": _floats, "shift": _floats,
        "width": st.integers(16, 4096), "height": st.integers(16, 4096),
        "sampler": _text.filter(bool), "scheduler": _text.filter(bool),
        "variant": st.sampled_from(["sd3.5-medium", "sd3.5-large", "sd3.5-large-turbo"]),
        "strength": st.one_of(st.none(), st.floats(0, 1)),
        "slg": st.one_of(st.none(), st.fixed_dictionaries({
            "layers": st.lists(st.integers(0, 40), min_size=1, max_size=5),
            "scale": _floats, "start": st.floats(0, 1), "stop": st.floats(0, 1)})),
        "max_sequence_length": st.integers(1, 512),
    },
    optional={"extra": st.dictionaries(st.text(max_size=8), _text, max_size=3)},
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(metas)
def test_property_write_read_round_trip(meta):
    with tempfile.TemporaryDirectory() as d:
        info = read_png_info(write_png(Image.new("L", (2, 2)), meta, Path(d) / "x.png"))
    assert info.error is None and info.fields == meta


@settings(max_examples=300, deadline=None)
@given(metas)
def test_property_infotext_round_trip(meta):
    for part in ("prompt", "negative_prompt"):
        assume(not any(ln.strip().startswith("Negative prompt:") for ln in meta[part].split("\n")))
    text = to_infotext(meta)
    fields = fields_from_infotext(text)
    ours, theirs = parse_infotext(text), a1111_parse(text)
    assert fields["prompt"] == _normalize(meta["prompt"])
    assert fields["negative_prompt"] == _normalize(meta["negative_prompt"])
    assert ours == theirs  # same reading as A1111's own parser
    for key in ("steps", "seed", "guidance", "shift", "width", "height", "sampler", "scheduler",
                "variant", "strength", "max_sequence_length", "slg"):
        assert fields.get(key) == meta[key], key


# --- foreign files ----------------------------------------------------------------------------


def test_a1111_png():
    text = "a dog\nNegative prompt: cat\nSteps: 20, Sampler: Euler a, CFG scale: 5, Seed: 7, Size: 512x512, Model: sd3_medium_incl_clips"
    info = read_png_info(png_bytes(text={"parameters": text}))
    assert info.source == "a1111" and info.error is None and info.infotext == text
    f = info.fields
    assert (f["prompt"], f["negative_prompt"], f["steps"], f["seed"]) == ("a dog", "cat", 20, 7)
    assert f["variant"] == "sd3-medium"


def test_a1111_png_with_unicode_itxt():
    text = "夜の東京, ネオン\nSteps: 20, Sampler: Euler, Seed: 1, Size: 64x64"
    info = read_png_info(png_bytes(text={"parameters": text}))  # PIL writes iTXt for this
    assert info.fields["prompt"] == "夜の東京, ネオン" and info.error is None


COMFY_PROMPT = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3.5_large.safetensors"}},
    "13": {"class_type": "ModelSamplingSD3", "inputs": {"shift": 3.0, "model": ["30", 0]}},
    "30": {"class_type": "LoraLoader", "inputs": {"lora_name": "pixel.safetensors", "strength_model": 0.7,
                                                  "strength_clip": 1, "model": ["4", 0], "clip": ["4", 1]}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox, in snow: winter", "clip": ["30", 1]}},
    "71": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["30", 1]}},
    "67": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["71", 0]}},
    "68": {"class_type": "ConditioningSetTimestepRange", "inputs": {"start": 0.1, "end": 1.0, "conditioning": ["67", 0]}},
    "70": {"class_type": "ConditioningSetTimestepRange", "inputs": {"start": 0.0, "end": 0.1, "conditioning": ["71", 0]}},
    "69": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["68", 0], "conditioning_2": ["70", 0]}},
    "135": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1216, "height": 832, "batch_size": 2}},
    "20": {"class_type": "PrimitiveInt", "inputs": {"value": 424242}},
    "3": {"class_type": "KSampler", "inputs": {
        "seed": ["20", 0], "steps": 28, "cfg": 4.5, "sampler_name": "euler", "scheduler": "sgm_uniform",
        "denoise": 1.0, "model": ["13", 0], "positive": ["6", 0], "negative": ["69", 0],
        "latent_image": ["135", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}


def test_comfyui_prompt_png():
    data = png_bytes(text={"prompt": json.dumps(COMFY_PROMPT), "workflow": json.dumps({"nodes": []})})
    info = read_png_info(data)
    assert info.source == "comfyui" and info.error is None
    f = info.fields
    assert f["prompt"] == "a fox, in snow: winter" and f["negative_prompt"] == "blurry"
    assert (f["seed"], f["steps"], f["guidance"]) == (424242, 28, 4.5)
    assert (f["width"], f["height"], f["batch_size"]) == (1216, 832, 2)
    assert (f["sampler"], f["scheduler"], f["shift"]) == ("euler", "sgm_uniform", 3.0)
    assert f["model"] == "sd3.5_large.safetensors" and f["variant"] == "sd3.5-large"
    assert f["loras"] == [{"name": "pixel.safetensors", "weight": 0.7}]
    assert f["mode"] == "txt2img"
    assert fields_from_infotext(info.infotext)["seed"] == 424242  # displayable as infotext


def test_comfyui_workflow_only_png():
    workflow = {
        "nodes": [
            {"id": 1, "type": "CheckpointLoaderSimple", "widgets_values": ["sd3.5_medium.safetensors"]},
            {"id": 2, "type": "CLIPTextEncode", "widgets_values": ["a red bicycle"]},
            {"id": 3, "type": "CLIPTextEncode", "widgets_values": ["rust"]},
            {"id": 4, "type": "EmptySD3LatentImage", "widgets_values": [896, 1152, 1]},
            {"id": 5, "type": "KSampler", "widgets_values": [99, "fixed", 40, 5.0, "euler", "simple", 1],
             "inputs": [{"name": "model", "link": 10}, {"name": "positive", "link": 11},
                        {"name": "negative", "link": 12}, {"name": "latent_image", "link": 13}]},
        ],
        "links": [[10, 1, 0, 5, 0, "MODEL"], [11, 2, 0, 5, 1, "CONDITIONING"],
                  [12, 3, 0, 5, 2, "CONDITIONING"], [13, 4, 0, 5, 3, "LATENT"]],
    }
    info = read_png_info(png_bytes(text={"workflow": json.dumps(workflow)}))
    f = info.fields
    assert info.source == "comfyui" and info.error is None
    assert (f["prompt"], f["negative_prompt"], f["seed"], f["steps"]) == ("a red bicycle", "rust", 99, 40)
    assert (f["width"], f["height"], f["variant"]) == (896, 1152, "sd3.5-medium")


def test_comfyui_img2img_and_garbage_graph():
    prompt = json.loads(json.dumps(COMFY_PROMPT))
    prompt["135"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["50", 0], "vae": ["4", 2]}}
    prompt["50"] = {"class_type": "LoadImage", "inputs": {"image": "in.png"}}
    prompt["3"]["inputs"]["denoise"] = 0.55
    f = read_png_info(png_bytes(text={"prompt": json.dumps(prompt)})).fields
    assert f["mode"] == "img2img" and f["strength"] == 0.55
    for garbage in ("{not json", "[1, 2]", json.dumps({"1": {"class_type": "KSampler", "inputs": {"seed": ["1", 0]}}})):
        info = read_png_info(png_bytes(text={"prompt": garbage}))  # never raises
        assert isinstance(info.fields, dict)


def test_invokeai_png():
    meta = {"positive_prompt": "a lighthouse", "negative_prompt": "fog", "seed": 5, "steps": 30,
            "cfg_scale": 5.0, "width": 1024, "height": 768, "scheduler": "euler",
            "model": {"name": "SD3.5 Medium", "base": "sd-3"}, "generation_mode": "sd3_txt2img"}
    info = read_png_info(png_bytes(text={"invokeai_metadata": json.dumps(meta)}))
    f = info.fields
    assert info.source == "invokeai" and info.error is None
    assert (f["prompt"], f["negative_prompt"], f["seed"], f["guidance"]) == ("a lighthouse", "fog", 5, 5.0)
    assert f["variant"] == "sd3.5-medium" and f["mode"] == "txt2img"


def test_no_metadata():
    info = read_png_info(png_bytes())
    assert info.source == "none" and info.fields == {} and info.error is None


def test_garbage_studio_chunk_falls_back_to_infotext():
    data = png_bytes(text={"sd35studio": "{not json", "parameters": to_infotext(META)})
    info = read_png_info(data)
    assert info.source == "studio" and "not valid JSON" in info.error
    assert info.error.startswith("could not read")
    assert info.fields["seed"] == META["seed"]  # recovered from the infotext


def test_invalid_utf8_itxt():
    data = with_chunks(png_bytes(), itxt("parameters", b"caf\xe9 \xff\xfe"))
    info = read_png_info(data)
    assert info.error and "UTF-8" in info.error and info.fields == {}


def test_bad_crc_chunk_is_skipped():
    bad = bytearray(chunk(b"tEXt", b"parameters\0Steps: 1, Seed: 2, Size: 3x3"))
    bad[-1] ^= 0xFF
    info = read_png_info(with_chunks(png_bytes(), bytes(bad)))
    assert "checksum" in info.error and info.fields == {}


def test_huge_text_chunk_is_refused():
    huge = chunk(b"tEXt", b"parameters\0" + b"a" * (pnginfo.MAX_TEXT_CHUNK_BYTES + 10))
    ok = chunk(b"tEXt", b"sd35studio\0" + json.dumps(META).encode())
    info = read_png_info(with_chunks(png_bytes(), huge, ok))
    assert "limit" in info.error and info.error.startswith("could not read")
    assert info.fields == META  # what was within limits is still recovered


def test_decompression_bomb_text_chunk():
    bomb = itxt("parameters", b"\0" * (20 * 1024 * 1024), compressed=True)
    assert len(bomb) < 100_000
    info = read_png_info(with_chunks(png_bytes(), bomb))
    assert "decompression bomb" in info.error
    ztxt = chunk(b"zTXt", b"parameters\0\0" + zlib.compress(b"a" * 5000))
    assert "limit" in read_png_info(with_chunks(png_bytes(), ztxt), max_text_bytes=1000).error


def test_huge_image_dimensions_are_not_decoded():
    data = bytearray(png_bytes(text={"parameters": "x\nSteps: 1, Seed: 2, Size: 3x3"}))
    data[16:24] = struct.pack(">II", 100_000, 100_000)  # IHDR claims 10 gigapixels
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    info = read_png_info(bytes(data))
    assert info.error is None and (info.width, info.height) == (100_000, 100_000)
    assert info.fields["seed"] == 2


@pytest.mark.parametrize("data", [b"", b"GIF89a" + b"\0" * 20, b"\xff\xd8\xff\xe0JFIF", b"hello world"])
def test_not_a_png(data):
    info = read_png_info(data)
    assert info.error == "could not read all metadata: this is not a PNG file"
    assert info.fields == {} and info.source == "none"


def test_truncated_and_missing_files(tmp_path):
    data = (write_png(Image.new("RGB", (32, 32)), META, tmp_path / "a.png")).read_bytes()
    cut = read_png_info(data[: len(data) - 20])  # text chunks come before the pixels
    assert "truncated" in cut.error and cut.fields == META
    mid = read_png_info(data[:60])
    assert "truncated" in mid.error
    missing = read_png_info(tmp_path / "nope.png")
    assert missing.error.startswith("could not read") and "nope.png" in missing.error
    assert read_png_info(tmp_path).error.startswith("could not read")  # a directory


def test_write_png_is_atomic_on_failure(tmp_path, monkeypatch):
    target = write_png(Image.new("RGB", (4, 4)), META, tmp_path / "a.png")
    before = target.read_bytes()

    def boom(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pnginfo.os, "fsync", boom)
    with pytest.raises(OSError):
        write_png(Image.new("RGB", (4, 4)), dict(META, seed=1), target)
    assert target.read_bytes() == before  # old file untouched
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temp left behind
