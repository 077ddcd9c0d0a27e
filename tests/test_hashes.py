"""Hashes other tools link images by: ``Model``, ``Model hash`` and ``Lora hashes``, written the
way A1111 computes them and read back by A1111's own parser (tests/a1111_parser.py, not the
studio's reader) as well as by the studio."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import save_file

from studio.engine import Engine, GenerationRequest
from studio.metadata import fields_from_infotext, to_infotext
from studio.models import HashCache, ModelManager, ModelSource
from studio.models.hashes import loaded_model_identity, model_hash, model_name, transformer_folder_hash
from tests import a1111_parser as a1111

FAST = dict(steps=2, width=256, height=256, seed=11)


def _safetensors_with_metadata(path, tensors, metadata):
    save_file(tensors, str(path), metadata=metadata)
    return path


def _kohya_file(path):
    """A small kohya LoRA for the tiny SD3.5 Medium, plus one T5 module (not applicable)."""
    g = torch.Generator().manual_seed(0)
    k = "lora_unet_joint_blocks_0_x_block_attn_proj"
    t5 = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    return _safetensors_with_metadata(path, {
        f"{k}.lora_down.weight": torch.randn(4, 32, generator=g), f"{k}.lora_up.weight": torch.randn(32, 4, generator=g),
        f"{k}.alpha": torch.tensor(4.0),
        f"{t5}.lora_down.weight": torch.zeros(4, 64), f"{t5}.lora_up.weight": torch.zeros(64, 4),
    }, {"ss_output_name": "detail"})


def _count_digests(monkeypatch) -> list:
    """Every whole-file sha256 the HashCache computes from now on."""
    seen: list = []
    real = HashCache._digest
    monkeypatch.setattr(HashCache, "_digest", staticmethod(lambda p: seen.append(p) or real(p)))
    return seen


def test_addnet_hash_is_a1111s_and_survives_a_metadata_edit(tmp_path, monkeypatch):
    tensors = {"a.lora_down.weight": torch.arange(12.0).reshape(3, 4)}
    one = _safetensors_with_metadata(tmp_path / "one.safetensors", tensors, {"ss_output_name": "x"})
    two = _safetensors_with_metadata(tmp_path / "two.safetensors", tensors, {"ss_output_name": "a longer name"})
    cache = HashCache(tmp_path / "hashes.json")
    with open(one, "rb") as f:
        assert cache.addnet_hash(one) == a1111.addnet_hash_safetensors(f)
    assert cache.addnet_hash(one) == cache.addnet_hash(two), "the tensor data is the same"
    assert cache.file_hash(one) != cache.file_hash(two), "the files are not"
    # cached on disk with the file hash, keyed the same way (path, size, mtime)
    import studio.models.identity as identity

    monkeypatch.setattr(identity, "addnet_digest", lambda p: pytest.fail("re-hashed a cached file"))
    assert HashCache(tmp_path / "hashes.json").addnet_hash(one) == cache.addnet_hash(one)
    assert any(k.startswith("addnet:") for k in json.loads((tmp_path / "hashes.json").read_text()))


def test_folder_hash_is_the_documented_sha256sum_of_the_transformer_files(tiny_family, tmp_path):
    folder = tiny_family["sd3.5-medium"]
    cache = HashCache(None)
    lines = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n"
                    for p in sorted((folder / "transformer").glob("*.safetensors")))
    want = hashlib.sha256(lines.encode()).hexdigest()
    assert transformer_folder_hash(folder / "transformer", cache) == want
    if shutil.which("sha256sum"):  # the shell recipe in studio/models/hashes.py, literally
        out = subprocess.run("LC_ALL=C sha256sum *.safetensors | sha256sum | cut -c1-10", shell=True,
                             cwd=folder / "transformer", capture_output=True, text=True, check=True).stdout.strip()
        assert out == want[:10]
    assert model_hash(ModelSource("folder", str(folder)), cache) == want[:10]
    # another variant's weights hash differently; the same weights in another folder the same
    assert model_hash(ModelSource("folder", str(tiny_family["sd3-medium"])), cache) != want[:10]
    copy = tmp_path / "my-finetune"
    shutil.copytree(folder, copy)
    assert model_hash(ModelSource("folder", str(copy)), cache) == want[:10]


def test_model_names():
    assert model_name(ModelSource("file", "/m/checkpoints/sd3.5_large_fp8_scaled.safetensors")) == "sd3.5_large_fp8_scaled"
    assert model_name(ModelSource("file", "/m/unet/sd3.5_large-Q4_K_S.gguf")) == "sd3.5_large-Q4_K_S"
    assert model_name(ModelSource("folder", "/models/my-finetune")) == "my-finetune"
    assert model_name(ModelSource("hub", "stabilityai/stable-diffusion-3.5-large-turbo")) == "sd3.5-large-turbo"
    assert model_name(ModelSource("hub", "someone/sd35-anime-v2")) == "sd35-anime-v2"


def test_infotext_carries_a1111_hashes_and_both_parsers_read_them(demo_config, tiny_family, tmp_path, monkeypatch):
    demo_config.loras_dir.mkdir(parents=True)
    lora = _kohya_file(demo_config.loras_dir / "detail.safetensors")
    engine = Engine(ModelManager(demo_config))
    digests = _count_digests(monkeypatch)
    res = engine.generate(GenerationRequest(prompt="a red fox", loras=[("detail", 0.8)], **FAST))
    res2 = engine.generate(GenerationRequest(prompt="a red fox", loras=[("detail", 0.8)], **dict(FAST, seed=12)))
    assert len(digests) == len(set(digests)), "every file is hashed once"
    assert len(res2.images) == 1

    meta = res.images[0].metadata
    folder = tiny_family["sd3.5-medium"]
    text = to_infotext(meta)
    theirs = a1111.parse_generation_parameters(text)
    assert theirs["Model"] == folder.name == "sd3.5-medium"
    lines = "".join(f"{a1111.calculate_sha256(p)}  {p.name}\n" for p in sorted((folder / "transformer").glob("*.safetensors")))
    assert theirs["Model hash"] == hashlib.sha256(lines.encode()).hexdigest()[:10]
    assert a1111.lora_hashes(theirs) == {"detail": a1111.lora_shorthash(lora)}
    assert "<lora:detail:0.8>" in theirs["Prompt"]
    assert meta["loras"][0]["hash"] == a1111.lora_shorthash(lora)
    assert meta["loras"][0]["sha256"] == a1111.calculate_sha256(lora), "the JSON keeps the file's sha256 too"
    assert meta["variant"] == "sd3.5-medium"
    # the kohya file's T5 module is not applied, and the user is told
    assert any("1 of 2 modules were not applied" in n and "T5" in n for n in res.notes)

    ours = fields_from_infotext(text)  # read back by the studio
    assert ours["model_hash"] == theirs["Model hash"] and ours["model_name"] == "sd3.5-medium"
    assert ours["lora_hashes"] == {"detail": a1111.lora_shorthash(lora)}
    assert ours["variant"] == "sd3.5-medium"
    assert "extra_params" not in ours or not ({"Model hash", "Lora hashes"} & set(ours["extra_params"]))
    assert a1111.parse_generation_parameters(to_infotext(ours))["Lora hashes"] == theirs["Lora hashes"]


def test_single_file_model_hash_is_a1111s(tiny_family, tmp_path, monkeypatch):
    from tests.exporters import export_official_layout

    file = export_official_layout(tiny_family["sd3.5-large"], tmp_path / "rel", "sd3.5-large")
    renamed = file.with_name("my_sd35_merge.safetensors")
    file.rename(renamed)
    from studio.config import StudioConfig
    from studio.models import default_placement

    config = StudioConfig(data_dir=tmp_path / "data")
    config.single_file_config_dir = tiny_family["sd3.5-large"]
    manager = ModelManager(config, placement=default_placement("cpu"))
    loaded = manager.load(str(renamed))
    digests = _count_digests(monkeypatch)
    name, digest = loaded_model_identity(loaded, manager.hashes)
    assert not digests, "the file was hashed once, when it was loaded"
    assert (name, digest) == ("my_sd35_merge", a1111.model_shorthash(renamed))
    meta = {"prompt": "p", "steps": 2, "guidance": 1.0, "seed": 1, "width": 256, "height": 256,
            "variant": "sd3.5-large", "model_name": name, "model_hash": digest}
    parsed = a1111.parse_generation_parameters(to_infotext(meta))
    assert parsed["Model"] == "my_sd35_merge" and parsed["Model hash"] == a1111.model_shorthash(renamed)
    assert (parsed["Size-1"], parsed["Size-2"]) == ("256", "256")
