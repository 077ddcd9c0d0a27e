"""LoRA on the tiny SD3 family: files made offline with peft on the tiny transformer and saved with
``StableDiffusion3Pipeline.save_lora_weights`` (the diffusers/PEFT format real SD3 LoRAs use)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from studio.engine import Engine, GenerationRequest, ValidationError
from studio.metadata.loras import parse_selection, selection_from_fields, split_tags
from studio.models.lora import LoraError, LoraLibrary
from studio.models import ModelError, ModelManager, lora_blocker

FAST = dict(steps=2, width=256, height=256, seed=11)


def make_lora(dest: Path, folder: Path, seed: int = 0, strength: float = 0.5, text_encoder: bool = False) -> Path:
    """A random LoRA for the tiny transformer in ``folder`` (and optionally its CLIP-L), saved as
    ``dest`` (a .safetensors file) in the diffusers format."""
    import torch
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    t = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer")
    t.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                             target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in t.named_parameters():
            if "lora_" in name:
                p.normal_(0, strength)
    te_layers = None
    if text_encoder:
        from transformers import CLIPTextModelWithProjection

        te = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder")
        te.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                  target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
        with torch.no_grad():
            for name, p in te.named_parameters():
                if "lora_" in name:
                    p.normal_(0, strength)
        te_layers = get_peft_model_state_dict(te)
    dest.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusion3Pipeline.save_lora_weights(dest.parent, transformer_lora_layers=get_peft_model_state_dict(t),
                                               text_encoder_lora_layers=te_layers, weight_name=dest.name)
    return dest


def make_kohya(dest: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    dest.parent.mkdir(parents=True, exist_ok=True)
    k = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    save_file({f"{k}.lora_down.weight": torch.zeros(4, 32), f"{k}.lora_up.weight": torch.zeros(96, 4),
               f"{k}.alpha": torch.tensor(4.0)}, str(dest))
    return dest


def make_raw_peft(dest: Path) -> Path:
    """A LoRA in a layout the studio does not load (raw PEFT ``base_model.model.`` keys)."""
    import torch
    from safetensors.torch import save_file

    dest.parent.mkdir(parents=True, exist_ok=True)
    k = "base_model.model.transformer_blocks.0.attn.to_q"
    save_file({f"{k}.lora_A.weight": torch.zeros(4, 32), f"{k}.lora_B.weight": torch.zeros(32, 4)}, str(dest))
    return dest


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, tiny_family):
    d = tmp_path_factory.mktemp("lora-src")
    medium = tiny_family["sd3.5-medium"]
    return {
        "style-a": make_lora(d / "style-a.safetensors", medium, seed=1),
        "style-b": make_lora(d / "style-b.safetensors", medium, seed=2),
        "clip-a": make_lora(d / "clip-a.safetensors", medium, seed=3, text_encoder=True),
        "large": make_lora(d / "large.safetensors", tiny_family["sd3.5-large"], seed=4),
        "kohya": make_kohya(d / "kohya.safetensors"),
        "foreign": make_raw_peft(d / "foreign.safetensors"),
    }


@pytest.fixture
def engine(demo_config, lora_files):
    import shutil

    demo_config.loras_dir.mkdir(parents=True)
    for name in ("style-a", "style-b", "clip-a", "large", "kohya", "foreign"):
        shutil.copy(lora_files[name], demo_config.loras_dir)
    return Engine(ModelManager(demo_config))


def px(result) -> np.ndarray:
    return np.asarray(result.images[0].image, dtype=np.int16)


def run(engine, loras=(), prompt="a red fox", **kw):
    return engine.generate(GenerationRequest(prompt=prompt, loras=list(loras), **{**FAST, **kw}))


# --- the library ---------------------------------------------------------------------------------


def test_library_lists_inspects_and_refuses_other_formats(engine, lora_files, tmp_path):
    lib = engine.models.loras
    assert lib.names() == ["clip-a", "foreign", "kohya", "large", "style-a", "style-b"]
    a = lib.info("style-a")
    assert len(a.sha256) == 64 and not a.text_encoders and a.adapter_name.startswith("style_a_")
    assert lib.info("clip-a").text_encoders
    with pytest.raises(LoraError, match="Unsupported LoRA format: foreign.safetensors uses raw-PEFT keys"):
        lib.info("foreign")
    assert lib.info("kohya").sha256, "kohya files are converted now (tests/test_kohya.py), not refused"
    with pytest.raises(LoraError, match="No LoRA named 'nope'"):
        lib.info("nope")
    with pytest.raises(LoraError, match="not a LoRA name"):
        lib.info("../style-a")
    listing = {d["name"]: d for d in lib.describe()}
    assert listing["style-a"]["error"] is None and "Unsupported" in listing["foreign"]["error"]

    fresh = LoraLibrary(tmp_path / "loras")
    assert fresh.names() == []
    assert fresh.import_file(lora_files["style-b"], name="my style").name == "my style"
    assert fresh.names() == ["my style"]
    assert fresh.import_file(lora_files["style-b"], name="my style").name == "my style"  # same file: idempotent
    with pytest.raises(LoraError, match="already"):
        fresh.import_file(lora_files["style-a"], name="my style")
    with pytest.raises(LoraError, match="Unsupported LoRA format"):
        fresh.import_file(lora_files["foreign"])
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"pickle")
    with pytest.raises(LoraError, match=r"\.safetensors"):
        fresh.import_file(bad)
    with pytest.raises(LoraError, match="cannot be a LoRA name"):
        fresh.import_file(lora_files["style-a"], name="a:b")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 3)
    with pytest.raises(LoraError, match="not a safetensors file"):
        fresh.import_file(junk)


def test_diffusers_042_ignores_kohya_sd3_keys_silently(tiny_family, lora_files):
    """Why the studio refuses kohya files itself: diffusers loads nothing and says only a warning."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_family["sd3.5-medium"])
    pipe.load_lora_weights(str(lora_files["kohya"]), adapter_name="k")
    assert pipe.get_list_adapters() == {}


# --- generation --------------------------------------------------------------------------------


def test_lora_changes_output_weight_zero_and_unload_give_the_base_exactly(engine):
    base = px(run(engine))
    styled = run(engine, [("style-a", 1.0)])
    assert np.abs(px(styled) - base).mean() > 1.0
    assert np.array_equal(px(run(engine, [("style-a", 0.0)])), base)  # weight 0: off
    assert np.array_equal(px(run(engine)), base)  # none selected: adapters disabled, base exact
    assert np.array_equal(px(run(engine, [("style-a", 1.0)])), px(styled))  # cached adapter, same result
    assert engine.models.active_loras() == [engine.models.loras.info("style-a").adapter_name]
    assert engine.models.unload_loras() == 1
    assert engine.models.active_loras() == []
    assert np.array_equal(px(run(engine)), base)
    half = run(engine, [("style-a", 0.5)])
    assert 0 < np.abs(px(half) - base).mean() < np.abs(px(styled) - base).mean() * 1.5


def test_two_loras_combine(engine):
    a = px(run(engine, [("style-a", 1.0)]))
    b = px(run(engine, [("style-b", 1.0)]))
    ab = run(engine, [("style-a", 1.0), ("style-b", 1.0)])
    assert not np.array_equal(px(ab), a) and not np.array_equal(px(ab), b)
    meta = ab.images[0].metadata
    assert [d["name"] for d in meta["loras"]] == ["style-a", "style-b"]
    assert all(len(d["sha256"]) == 64 and d["weight"] == 1.0 for d in meta["loras"])
    assert sorted(engine.models.active_loras()) == sorted(
        engine.models.loras.info(n).adapter_name for n in ("style-a", "style-b"))


def test_text_encoder_lora_is_part_of_the_prompt_cache_key(engine):
    base = run(engine)
    with_te = run(engine, [("clip-a", 1.0)])
    assert not np.array_equal(px(with_te), px(base))
    from studio.engine.weighting import cache_key

    parsed = cache_key("a red fox")[2]
    keys = [k for k in engine.prompt_cache._entries if k[0][2] == parsed]
    assert len(keys) == 2 and {bool(k[-1]) for k in keys} == {False, True}
    assert np.array_equal(px(run(engine)), px(base))  # the base embeddings again, not the LoRA's


def test_refusals_are_clear(engine):
    with pytest.raises(ValidationError, match="Unsupported LoRA format") as e:
        run(engine, [("foreign", 1.0)])
    assert e.value.field == "loras"
    with pytest.raises(ValidationError, match="No LoRA named 'ghost'"):
        run(engine, [("ghost", 1.0)])
    with pytest.raises(ValidationError, match="selected twice"):
        run(engine, [("style-a", 1.0), ("style-a", 0.5)])
    with pytest.raises(ValidationError, match="weight of LoRA 'style-a'.*between"):
        run(engine, [("style-a", 9)])
    with pytest.raises(ModelError, match="does not fit"):
        run(engine, [("large", 1.0)])
    base = px(run(engine))  # a failed LoRA leaves the model usable and exact
    engine.models.unload_loras()
    assert np.array_equal(px(run(engine)), base)


def test_quantized_transformer_cannot_take_a_lora():
    import torch

    loaded = SimpleNamespace(pipe=SimpleNamespace(transformer=torch.nn.Linear(2, 2)),
                             placement=SimpleNamespace(name="nf4-t5-8bit"))
    assert "quantized" in lora_blocker(loaded) and "NF4" in lora_blocker(loaded)
    loaded.placement.name = "fp8-layerwise"
    assert "fp8" in lora_blocker(loaded)
    loaded.placement.name = "full"
    assert lora_blocker(loaded) is None
    loaded.pipe.transformer.weight.data = loaded.pipe.transformer.weight.data.to(torch.float8_e4m3fn)
    assert "fp8" in lora_blocker(loaded)


# --- metadata --------------------------------------------------------------------------------


def test_metadata_round_trip_json_and_infotext(engine, tmp_path):
    from studio.gallery import Gallery
    from studio.metadata import fields_from_infotext, read_png_info

    engine.gallery = Gallery(tmp_path / "g")
    res = run(engine, [("style-a", 0.8), ("style-b", 0.25)], prompt="a red fox, photo")
    path = res.images[0].path
    info = read_png_info(path)
    assert info.fields["loras"] == res.images[0].metadata["loras"]
    assert "a red fox, photo <lora:style-a:0.8> <lora:style-b:0.25>" in info.infotext.splitlines()[0]
    addnet_a = engine.models.loras.info("style-a").addnet  # A1111's "addnet" hash, as Civitai links it
    assert f"Lora hashes: \"style-a: {addnet_a[:12]}, style-b: " in info.infotext
    for fields in (info.fields, fields_from_infotext(info.infotext)):  # JSON chunk and A1111 text
        assert selection_from_fields(fields) == ("a red fox, photo", [("style-a", 0.8), ("style-b", 0.25)])


def test_tag_and_selection_parsing():
    assert split_tags("castle <lora:detail:0.6>, night") == ("castle, night", [("detail", 0.6)])
    assert split_tags("<lora:a:x> castle") == ("<lora:a:x> castle", [])
    assert parse_selection("a:0.5, b") == [("a", 0.5), ("b", 1.0)]
    assert parse_selection("<lora:a:0.3> <lora:b:2>") == [("a", 0.3), ("b", 2.0)]
    assert parse_selection([{"name": "a", "weight": 0.2}, ["b", 1]]) == [("a", 0.2), ("b", 1)]
    assert parse_selection("a:lots") == [("a", "lots")]  # the engine refuses it, with the reason
    assert selection_from_fields({"prompt": "p", "loras": [{"name": "pixel.safetensors", "weight": 0.7}]}) == (
        "p", [("pixel", 0.7)])  # ComfyUI's LoraLoader names


# --- the API (gradio_client against the app in demo mode) ---------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_family, lora_files):
    gradio_client = pytest.importorskip("gradio_client")
    from tests.conftest_ui import api_client, running_studio

    data = tmp_path_factory.mktemp("lora-api") / "data"
    (data / "loras").mkdir(parents=True)
    import shutil

    shutil.copy(lora_files["style-a"], data / "loras")
    with running_studio(data, tiny_family) as (url, studio):
        client = api_client(url, tmp_path_factory.mktemp("dl"))
        yield client, studio, gradio_client


def test_api_list_load_and_generate_with_loras(api, lora_files):
    from gradio_client.exceptions import AppError

    from studio.metadata import read_png_info

    client, studio, gc = api
    listing = client.predict(api_name="/list_loras")
    assert [d["name"] for d in listing["loras"]] == ["style-a"] and listing["active"] == []
    # upload: copied into the folder, loaded into the model (once one is loaded)
    client.predict(prompt="warm up", steps=1, api_name="/txt2img")
    out = client.predict(name="uploaded b", file=gc.handle_file(str(lora_files["style-b"])), api_name="/load_lora")
    assert out["name"] == "uploaded b" and out["loaded"] is True and len(out["sha256"]) == 64
    assert (studio.config.loras_dir / "uploaded b.safetensors").is_file()
    assert {d["name"] for d in client.predict(api_name="/list_loras")["loras"]} == {"style-a", "uploaded b"}
    assert client.predict(name="style-a", api_name="/load_lora")["loaded"] is True
    with pytest.raises(AppError, match="Unsupported LoRA format"):
        client.predict(file=gc.handle_file(str(lora_files["foreign"])), api_name="/load_lora")
    with pytest.raises(AppError, match="does not fit"):
        client.predict(file=gc.handle_file(str(lora_files["large"])), api_name="/load_lora")

    base, _, _ = client.predict(prompt="a red fox", steps=2, seed=4, api_name="/txt2img")
    styled, _, info = client.predict(prompt="a red fox", steps=2, seed=4, loras="style-a:0.9, uploaded b:0.5",
                                     api_name="/txt2img")
    meta = read_png_info(styled[0]).fields
    assert [(d["name"], d["weight"]) for d in meta["loras"]] == [("style-a", 0.9), ("uploaded b", 0.5)]
    assert "<lora:style-a:0.9> <lora:uploaded b:0.5>" in read_png_info(styled[0]).infotext
    with pytest.raises(AppError, match="No LoRA named 'nope'"):
        client.predict(prompt="x", steps=1, loras="nope", api_name="/txt2img")
    with pytest.raises(AppError, match="weight of LoRA"):
        client.predict(prompt="x", steps=1, loras="style-a:lots", api_name="/txt2img")
    again, _, _ = client.predict(prompt="a red fox", steps=2, seed=4, api_name="/txt2img")
    import numpy as np
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(again[0])), np.asarray(Image.open(base[0])))
    assert not np.array_equal(np.asarray(Image.open(styled[0])), np.asarray(Image.open(base[0])))
