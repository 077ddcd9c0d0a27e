"""ComfyUI PNGs the way ComfyUI writes them: the API graph ("prompt" chunk) and the UI graph
("workflow" chunk), for the custom-sampler SD3.5 workflows (SamplerCustom /
SamplerCustomAdvanced with RandomNoise, CFGGuider, BasicScheduler, ModelSamplingSD3,
SkipLayerGuidanceSD3, CLIPTextEncodeSD3, EmptySD3LatentImage) and an empty negative prompt.

The UI graphs are built from the API graphs with the widget order of ComfyUI's own node
definitions (comfy_extras/nodes_custom_sampler.py, nodes_sd3.py, nodes_model_advanced.py,
nodes_slg.py, nodes.py), written out here independently of the studio's reader."""

from __future__ import annotations

import io
import json

from PIL import Image
from PIL.PngImagePlugin import PngInfo as PilPngInfo

from studio.metadata import clean, read_png_info, request_fields

# ComfyUI's widget order per node type (widgets only, in INPUT_TYPES order; "control" is the
# control_after_generate combo the frontend adds after a seed).
WIDGETS = {
    "CheckpointLoaderSimple": ["ckpt_name"],
    "UNETLoader": ["unet_name", "weight_dtype"],
    "TripleCLIPLoader": ["clip_name1", "clip_name2", "clip_name3"],
    "CLIPTextEncode": ["text"],
    "CLIPTextEncodeSD3": ["clip_l", "clip_g", "t5xxl", "empty_padding"],
    "EmptySD3LatentImage": ["width", "height", "batch_size"],
    "ModelSamplingSD3": ["shift"],
    "SkipLayerGuidanceSD3": ["layers", "scale", "start_percent", "end_percent"],
    "RandomNoise": ["noise_seed", "control"],
    "CFGGuider": ["cfg"],
    "BasicScheduler": ["scheduler", "steps", "denoise"],
    "KSamplerSelect": ["sampler_name"],
    "SamplerCustom": ["add_noise", "noise_seed", "control", "cfg"],
    "SamplerCustomAdvanced": [],
    "KSampler": ["seed", "control", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
    "VAEDecode": [],
    "SaveImage": ["filename_prefix"],
}
SEED = 585483408983215  # the seed of ComfyUI's SD3.5 template: above 2^32
PROMPT = "a tiny astronaut hatching from an egg on the moon"


def custom_advanced() -> dict:
    """SD3.5 Large with the custom sampler nodes, in the API ("prompt") format."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3.5_large_fp8_scaled.safetensors"}},
        "11": {"class_type": "SkipLayerGuidanceSD3", "inputs": {
            "model": ["4", 0], "layers": "7, 8, 9", "scale": 3.0, "start_percent": 0.01, "end_percent": 0.15}},
        "13": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["11", 0], "shift": 3.0}},
        "16": {"class_type": "CLIPTextEncodeSD3", "inputs": {
            "clip": ["4", 1], "clip_l": PROMPT, "clip_g": PROMPT, "t5xxl": PROMPT, "empty_padding": "none"}},
        "40": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": ""}},
        "22": {"class_type": "CFGGuider", "inputs": {"model": ["13", 0], "positive": ["16", 0], "negative": ["40", 0],
                                                     "cfg": 4.5}},
        "25": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
        "17": {"class_type": "BasicScheduler", "inputs": {"model": ["13", 0], "scheduler": "sgm_uniform",
                                                          "steps": 40, "denoise": 1.0}},
        "26": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m"}},
        "27": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1152, "height": 896, "batch_size": 2}},
        "24": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["25", 0], "guider": ["22", 0], "sampler": ["26", 0], "sigmas": ["17", 0],
            "latent_image": ["27", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["24", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "ComfyUI"}},
    }


def custom_sampler() -> dict:
    """The same with SamplerCustom: seed and CFG are widgets of the sampler itself."""
    g = custom_advanced()
    for nid in ("22", "25", "24"):
        del g[nid]
    g["24"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["13", 0], "add_noise": True, "noise_seed": SEED, "cfg": 5.5, "positive": ["16", 0],
        "negative": ["40", 0], "sampler": ["26", 0], "sigmas": ["17", 0], "latent_image": ["27", 0]}}
    return g


def to_workflow(api: dict) -> dict:
    """The UI ("workflow") form of an API graph: widgets_values in ComfyUI's widget order, links
    as [id, origin, origin_slot, target, target_slot, type]."""
    nodes, links = [], []
    for nid, node in api.items():
        ctype, inputs = node["class_type"], node["inputs"]
        widgets = [inputs.get(name, "fixed" if name == "control" else None) for name in WIDGETS[ctype]]
        slots = []
        for name, value in inputs.items():
            if isinstance(value, list):
                link_id = len(links) + 1
                links.append([link_id, int(value[0]), value[1], int(nid), len(slots), "*"])
                slots.append({"name": name, "type": "*", "link": link_id})
        nodes.append({"id": int(nid), "type": ctype, "inputs": slots, "widgets_values": widgets})
    return {"last_node_id": max(int(n) for n in api), "nodes": nodes, "links": links, "version": 0.4}


def png(**chunks) -> bytes:
    info = PilPngInfo()
    for k, v in chunks.items():
        info.add_text(k, json.dumps(v))
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _fields(**chunks) -> dict:
    info = read_png_info(png(**chunks))
    assert info.source == "comfyui" and info.error is None, info.error
    return info.fields


def test_sampler_custom_advanced_in_both_formats():
    graph = custom_advanced()
    for f in (_fields(prompt=graph, workflow=to_workflow(graph)), _fields(workflow=to_workflow(graph))):
        assert f["seed"] == SEED
        assert f["guidance"] == 4.5
        assert (f["steps"], f["scheduler"], f["sampler"]) == (40, "sgm_uniform", "dpmpp_2m")
        assert f["shift"] == 3.0
        assert f["slg"] == {"layers": [7, 8, 9], "scale": 3.0, "start": 0.01, "stop": 0.15}
        assert f["prompt"] == PROMPT and f["negative_prompt"] == ""
        assert (f["width"], f["height"], f["batch_size"]) == (1152, 896, 2)
        assert f["mode"] == "txt2img" and f["variant"] == "sd3.5-large"
        assert clean(f) == f, "every field is one the schema knows, of its type"
        reuse = request_fields(f)
        assert reuse["seed"] == SEED and reuse["negative_prompt"] == "" and reuse["slg"]["layers"] == [7, 8, 9]


def test_sampler_custom_in_both_formats():
    graph = custom_sampler()
    for f in (_fields(prompt=graph), _fields(workflow=to_workflow(graph))):
        assert (f["seed"], f["guidance"], f["steps"]) == (SEED, 5.5, 40)
        assert f["slg"]["scale"] == 3.0 and f["shift"] == 3.0
        assert f["negative_prompt"] == ""


def test_img2img_denoise_comes_from_the_basic_scheduler():
    graph = custom_advanced()
    graph["27"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["50", 0], "vae": ["4", 2]}}
    graph["50"] = {"class_type": "LoadImage", "inputs": {"image": "in.png"}}
    graph["17"]["inputs"]["denoise"] = 0.6
    f = _fields(prompt=graph)
    assert f["mode"] == "img2img" and f["strength"] == 0.6


def test_empty_negative_reads_back_as_empty_not_absent():
    """Reuse must clear an old negative prompt: "" is a value."""
    ksampler = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3.5_medium.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "a red bicycle"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": ""}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 7, "steps": 40, "cfg": 4.5, "sampler_name": "euler", "scheduler": "sgm_uniform", "denoise": 1.0,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    }
    for f in (_fields(prompt=ksampler), _fields(workflow=to_workflow(ksampler))):
        assert f["prompt"] == "a red bicycle"
        assert "negative_prompt" in f and f["negative_prompt"] == ""
        assert request_fields(f)["negative_prompt"] == ""
    # an SD3 encoder with every text empty is an empty negative too
    ksampler["7"] = {"class_type": "CLIPTextEncodeSD3", "inputs": {"clip": ["4", 1], "clip_l": "", "clip_g": "",
                                                                    "t5xxl": "", "empty_padding": "none"}}
    assert _fields(prompt=ksampler)["negative_prompt"] == ""


def test_sd3_encoder_texts_prefer_t5_when_they_differ():
    graph = custom_advanced()
    graph["16"]["inputs"].update(clip_l="photo", clip_g="photo, moon", t5xxl=PROMPT)
    assert _fields(prompt=graph)["prompt"] == PROMPT
    graph["16"]["inputs"]["t5xxl"] = ""
    assert _fields(prompt=graph)["prompt"] == "photo, moon"
