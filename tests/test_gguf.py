"""GGUF transformers (city96's SD3.5 GGUFs), written here with the ``gguf`` package from the tiny
family's transformer the way city96's ComfyUI-GGUF ``tools/convert.py`` writes SD3 files:
reference (SAI) key names without the ``model.diffusion_model.`` prefix, architecture "sd3",
1-D tensors and tensors of at most 1024 values in F32, 4-D convs in F16, the rest (the 3-D
``pos_embed`` too) quantized, F16 where the quantization's block size does not fit.

Measured on the tiny SD3.5 Medium, 2 steps, 256², fp32, against the unquantized official single
file (mean |pixel difference| on a 0–1 scale): Q8_0 0.00063 (max 0.013), Q4_0 0.0119 (max 0.17)
— the limits below leave room over these.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from studio.config import StudioConfig
from studio.models import ModelError, ModelManager, default_placement
from studio.models.gguf import gguf_tensor_bytes
from studio.models.singlefile import file_storage, inspect_file, resolve_single_file
from tests.exporters import diffusers_to_sai_transformer, export_official_layout

gguf = pytest.importorskip("gguf")

VARIANT = "sd3.5-medium"
PROMPT = "a photo of a red fox"
GEN = dict(height=256, width=256, num_inference_steps=2, guidance_scale=4.5, output_type="np")
THRESHOLD = 1024  # city96's QUANTIZATION_THRESHOLD
LIMITS = {"Q8_0": 0.002, "Q4_0": 0.03}  # mean |pixel difference| allowed (measured: see the docstring)


def write_city96_gguf(folder, dest, qtype_name: str):
    """The tiny transformer of ``folder`` as city96's convert.py would write it."""
    from safetensors.torch import load_file

    Q = gguf.GGMLQuantizationType
    qtype = getattr(Q, qtype_name)
    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    sai = diffusers_to_sai_transformer(load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors")),
                                       cfg["num_layers"])
    writer = gguf.GGUFWriter(path=None, arch="sd3")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(qtype)
    types = {}
    for key, tensor in sai.items():
        data = tensor.float().numpy()
        t = qtype
        if data.ndim == 1 or data.size <= THRESHOLD:
            t = Q.F32
        elif data.ndim == 4:
            t = Q.F16
        try:
            raw = gguf.quants.quantize(data, t)
        except gguf.QuantError:  # the block size does not divide the rows
            t = Q.F16
            raw = gguf.quants.quantize(data, t)
        writer.add_tensor(key, raw, raw_dtype=t)
        types[key] = t.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file(path=str(dest))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


@pytest.fixture(scope="module")
def ggufs(tiny_family, tmp_path_factory):
    """{qtype: (file, tensor types)} in ComfyUI's models/unet/ + models/text_encoders/ layout,
    and the unquantized official single file for reference."""
    folder = tiny_family[VARIANT]
    root = tmp_path_factory.mktemp("gguf")
    official = export_official_layout(folder, root / "official", VARIANT)
    shutil.copytree(official.parent / "text_encoders", root / "models" / "text_encoders")
    out = {}
    for q in LIMITS:
        file = root / "models" / "unet" / f"sd3.5_medium-{q}.gguf"
        out[q] = (file, write_city96_gguf(folder, file, q))
    out["official"] = official
    return out


def _config(tmp_path, base) -> StudioConfig:
    config = StudioConfig(data_dir=tmp_path / "data")
    config.single_file_config_dir = base
    return config


def _image(pipe):
    return pipe(PROMPT, generator=torch.Generator().manual_seed(7), **GEN).images[0]


def test_bytes_come_from_the_gguf_header(ggufs):
    file, types = ggufs["Q8_0"]
    info = gguf_tensor_bytes(file)
    assert set(info["by_type"]) == set(types.values()) >= {"Q8_0", "F32"}
    assert info["by_type"]["Q8_0"]["count"] == sum(1 for t in types.values() if t == "Q8_0")
    # Q8_0: blocks of 32 values in 34 bytes (an fp16 scale + 32 int8), exactly
    assert info["by_type"]["Q8_0"]["bytes"] == info["by_type"]["Q8_0"]["params"] // 32 * 34
    assert info["by_type"]["F32"]["bytes"] == info["by_type"]["F32"]["params"] * 4
    assert info["total_bytes"] == sum(t["bytes"] for t in info["by_type"].values()) < info["file_bytes"]
    q4 = gguf_tensor_bytes(ggufs["Q4_0"][0])
    assert q4["by_type"]["Q4_0"]["bytes"] == q4["by_type"]["Q4_0"]["params"] // 32 * 18
    assert q4["quantized_bytes"] < info["quantized_bytes"] and q4["params"] == info["params"]
    # the single-file entry point reports the same, plus how it loads
    storage = file_storage(file)
    assert storage["kind"] == "gguf" and storage["total_bytes"] == info["total_bytes"]


def test_gguf_is_detected_and_resolved_like_a_single_file(tiny_family, ggufs, tmp_path):
    file, _ = ggufs["Q4_0"]
    info = inspect_file(file)
    assert info.kind == "gguf" and info.variant == VARIANT and not info.has_vae and info.prefix == ""
    _, overrides = resolve_single_file(file, _config(tmp_path, tiny_family[VARIANT]))
    assert overrides["text_encoder"].file == file.parent.parent / "text_encoders" / "clip_l.safetensors"
    assert "vae" not in overrides, "the VAE comes from the config folder"


@pytest.mark.parametrize("qtype", list(LIMITS))
def test_gguf_generates_close_to_the_unquantized_file(tiny_family, ggufs, qtype, tmp_path):
    file, _ = ggufs[qtype]
    config = _config(tmp_path, tiny_family[VARIANT])
    manager = ModelManager(config, placement=default_placement("cpu"))
    loaded = manager.load(str(file))
    t = loaded.pipe.transformer
    assert type(t.transformer_blocks[0].attn.to_q).__name__ == "GGUFLinear"
    assert getattr(t.transformer_blocks[0].attn.to_q.weight, "quant_type", None) == getattr(gguf.GGMLQuantizationType, qtype)
    # resident bytes as the header says: quantized bytes + unquantized params × 4 (fp32 here)
    info = gguf_tensor_bytes(file)
    resident = sum(v.numel() * v.element_size() for v in t.state_dict().values())
    assert resident == info["quantized_bytes"] + info["unquantized_params"] * 4
    image = _image(loaded.pipe)

    reference = ModelManager(_config(tmp_path / "ref", tiny_family[VARIANT]), placement=default_placement("cpu"))
    want = _image(reference.load(str(ggufs["official"])).pipe)
    diff = float(np.abs(image - want).mean())
    print(f"{qtype}: mean |pixel difference| {diff:.5f}, max {np.abs(image - want).max():.4f}")
    assert diff < LIMITS[qtype], f"{qtype}: mean |pixel difference| {diff:.5f}"
    assert diff > 0, "a quantized model that draws bit-identical pixels was not quantized"


def test_not_an_sd3_gguf_is_refused(tiny_family, tmp_path):
    writer = gguf.GGUFWriter(path=None, arch="flux")
    writer.add_tensor("double_blocks.0.img_attn.proj.weight", np.zeros((32, 32), dtype=np.float32))
    path = tmp_path / "flux1-dev-Q8_0.gguf"
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match=r"flux1-dev-Q8_0\.gguf is a GGUF file for 'flux', not SD3"):
        inspect_file(path)
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(ModelError, match=r"broken\.gguf is not a readable GGUF file"):
        inspect_file(bad)


def test_the_one_placement_decision_plans_a_gguf_at_its_header_bytes(ggufs, tmp_path):
    """``Studio.placement_for(source=…gguf)`` hands the planner the file's real bytes and fixes the
    transformer's storage to gguf; any other source plans at the catalog's counts."""
    from studio.hardware import Hardware
    from studio.memory import choose
    from studio.service import Studio

    file, _ = ggufs["Q4_0"]
    info = gguf_tensor_bytes(file)
    component_bytes, fmt = Studio.file_bytes(str(file))
    assert fmt == "gguf"
    assert component_bytes == {"transformer": info["quantized_bytes"] + 2 * info["unquantized_params"]}
    assert Studio.file_bytes("stabilityai/stable-diffusion-3.5-large") == (None, None)
    assert Studio.file_bytes(str(tmp_path / "missing.gguf")) == (None, None)

    from studio.hardware import Gpu

    gpu = Hardware(gpus=[Gpu(0, "sim", 12 << 30, 12 << 30, (8, 9))], ram_total_bytes=64 << 30,
                   ram_available_bytes=60 << 30, device="cuda")
    plan = choose(gpu, "sd3.5-large", component_bytes=component_bytes, transformer_format=fmt)
    assert plan.preset_obj.axes["transformer"] == "gguf"
    d = plan.to_dict()
    assert d["component_bytes"] == component_bytes
    row = next(r for r in d["components"] if r["name"] == "transformer")
    assert row["bytes"] == component_bytes["transformer"]
