"""Kohya / Civitai and ComfyUI SD3 LoRAs, converted by the studio (diffusers 0.42 loads none of them).

The check is numerical and independent of the studio's mapping: a random kohya LoRA is built on
the tiny SD3.5 Medium transformer *in the reference (SAI) key layout*, merged by hand into a copy
of the reference weights (W + alpha/rank · up @ down), and that copy is converted to diffusers by
diffusers' own single-file converter. The studio loading the kohya file through PEFT must give
the same transformer outputs.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from studio.models.kohya import convert, plan_keys
from studio.models.lora import LoraError, LoraLibrary
from tests.exporters import diffusers_to_sai_transformer

VARIANT = "sd3.5-medium"  # qk-norm and dual attention (attn2) in blocks 0-1: every module kind
TOL = 1e-4  # max |difference| / max |output|, float32 (measured: ~1e-6)


def _linear_modules(sai: dict) -> dict[str, tuple]:
    """Reference module path → weight shape, for every weight the LoRA can touch."""
    return {k[: -len(".weight")]: tuple(v.shape) for k, v in sai.items()
            if k.endswith(".weight") and v.ndim in (2, 4) and k != "pos_embed"}


def _kohya_lora(sai: dict, seed: int = 0) -> tuple[dict, dict]:
    """(kohya state dict, {module: (scale, up, down)}) with random factors on every module.

    Ranks and alphas vary (so does the scale alpha/rank); one qkv uses kohya's split-qkv save
    (down of 3·r rows, block-diagonal up); x_embedder is a conv LoRA."""
    g = torch.Generator().manual_seed(seed)
    lora, parts = {}, {}
    for i, (module, shape) in enumerate(sorted(_linear_modules(sai).items())):
        rank = (2, 4, 3)[i % 3]
        alpha = (1.0, 4.0, 6.0)[i % 3]
        name = "lora_unet_" + module.replace(".", "_")
        if len(shape) == 4:  # x_embedder.proj: Conv2d(16, hidden, 2, 2)
            down = torch.randn(rank, *shape[1:], generator=g) * 0.3
            up = torch.randn(shape[0], rank, 1, 1, generator=g) * 0.3
        elif module == "joint_blocks.1.x_block.attn.qkv":  # kohya split_qkv=True
            out = shape[0] // 3
            downs = [torch.randn(rank, shape[1], generator=g) * 0.3 for _ in range(3)]
            up = torch.zeros(shape[0], 3 * rank)
            for j in range(3):
                up[j * out:(j + 1) * out, j * rank:(j + 1) * rank] = torch.randn(out, rank, generator=g) * 0.3
            down = torch.cat(downs)
            rank = 3 * rank
        else:
            down = torch.randn(rank, shape[1], generator=g) * 0.3
            up = torch.randn(shape[0], rank, generator=g) * 0.3
        lora[f"{name}.lora_down.weight"] = down
        lora[f"{name}.lora_up.weight"] = up
        lora[f"{name}.alpha"] = torch.tensor(alpha)
        parts[module] = (alpha / rank, up, down)
    return lora, parts


def _merge(sai: dict, parts: dict, weight: float = 1.0) -> dict:
    """W + weight · scale · up @ down, in the reference layout (conv LoRAs flattened)."""
    out = dict(sai)
    for module, (scale, up, down) in parts.items():
        w = out[module + ".weight"]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        out[module + ".weight"] = w + weight * scale * delta
    return out


def _to_diffusers(sai: dict, folder):
    """The reference weights → an SD3Transformer2DModel, through diffusers' own converter."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    sd = convert_sd3_transformer_checkpoint_to_diffusers({"model.diffusion_model." + k: v.clone() for k, v in sai.items()})
    model = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer")
    missing, unexpected = model.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    return model.eval()


def _inputs(transformer, seed=3):
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    return dict(
        hidden_states=torch.randn(1, cfg.in_channels, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(1, 7, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
        timestep=torch.tensor([500.0]),
    )


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def reference(tiny_family):
    from safetensors.torch import load_file

    folder = tiny_family[VARIANT]
    cfg = __import__("json").loads((folder / "transformer" / "config.json").read_text())
    sd = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    return folder, diffusers_to_sai_transformer(sd, cfg["num_layers"])


@pytest.fixture
def manager(demo_config):
    from studio.models import ModelManager

    demo_config.loras_dir.mkdir(parents=True, exist_ok=True)
    return ModelManager(demo_config)


def _activate(manager, path, weight=1.0):
    shutil.copy(path, manager.loras.folder / path.name)
    info = manager.loras.info(path.stem)
    loaded = manager.load(variant=VARIANT)
    manager.activate_loras(loaded, [(info, weight)])
    return info, loaded


# --- the numerical check --------------------------------------------------------------------------


def test_kohya_lora_equals_a_hand_merge_into_the_reference_weights(reference, manager, tmp_path):
    folder, sai = reference
    lora, parts = _kohya_lora(sai)
    path = tmp_path / "kohya_style.safetensors"
    save_file(lora, str(path))
    assert len(parts) > 40 and any(".attn2." in m for m in parts) and "final_layer.adaLN_modulation.1" in parts

    info, loaded = _activate(manager, path)
    assert info.format == "kohya" and info.notes == ()  # every module converted
    merged = _to_diffusers(_merge(sai, parts), folder)
    base = _to_diffusers(sai, folder)
    x = _inputs(merged)
    with torch.no_grad():
        want = merged(**x).sample
        got = loaded.pipe.transformer(**x).sample
        plain = base(**x).sample
    assert _rel(plain, want) > 0.05, "the LoRA must change the output for the test to mean anything"
    assert _rel(got, want) < TOL, f"studio vs hand merge: relative difference {_rel(got, want):.2e}"

    # the adapter weight scales the LoRA: 0.5 equals a half-strength hand merge
    manager.activate_loras(loaded, [(info, 0.5)])
    with torch.no_grad():
        half = loaded.pipe.transformer(**x).sample
        want_half = _to_diffusers(_merge(sai, parts, 0.5), folder)(**x).sample
    assert _rel(half, want_half) < TOL


def test_comfyui_diffusion_model_lora_converts_like_kohya(reference, manager, tmp_path):
    """ComfyUI's own LoRA files: reference paths after ``diffusion_model.``, lora_A/lora_B (or
    lora_down/lora_up) and alpha."""
    folder, sai = reference
    lora, parts = _kohya_lora(sai, seed=1)
    comfy = {}
    for k, v in lora.items():
        module, _, suffix = k.partition(".")
        dotted = "diffusion_model." + next(m for m in parts if "lora_unet_" + m.replace(".", "_") == module)
        suffix = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(suffix, suffix)
        comfy[f"{dotted}.{suffix}"] = v
    assert "diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_A.weight" in comfy
    a, _ = convert(lora, num_layers=4)
    b, _ = convert(comfy, num_layers=4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    path = tmp_path / "comfy_style.safetensors"
    save_file(comfy, str(path))
    info, loaded = _activate(manager, path)
    x = _inputs(loaded.pipe.transformer)
    with torch.no_grad():
        got = loaded.pipe.transformer(**x).sample
        want = _to_diffusers(_merge(sai, parts), folder)(**x).sample
    assert _rel(got, want) < TOL


def test_text_encoder_parts_and_t5_left_out(tiny_family, manager, tmp_path):
    """lora_te1_ (CLIP-L) is applied; lora_te3_ (T5) cannot be (diffusers' SD3 loader has no
    text_encoder_3) and is counted in the note the user sees."""
    from transformers import CLIPTextModelWithProjection

    folder = tiny_family[VARIANT]
    clip = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder").eval()
    g = torch.Generator().manual_seed(5)
    lora, merged = {}, {k: v.clone() for k, v in clip.state_dict().items()}
    for name, mod in clip.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("text_model.encoder.layers."):
            key = "lora_te1_" + name.replace(".", "_")
            down = torch.randn(2, mod.in_features, generator=g) * 0.3
            up = torch.randn(mod.out_features, 2, generator=g) * 0.3
            lora.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(1.0)})
            merged[name + ".weight"] += 0.5 * up @ down
    t5 = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    lora.update({f"{t5}.lora_down.weight": torch.zeros(2, 64), f"{t5}.lora_up.weight": torch.zeros(64, 2)})
    path = tmp_path / "te.safetensors"
    save_file(lora, str(path))

    info, loaded = _activate(manager, path)
    n = sum(1 for k in lora if k.endswith("lora_down.weight"))
    assert info.text_encoders
    assert info.notes == (f"LoRA te.safetensors: 1 of {n} modules were not applied — 1 T5 (lora_te3_) parts "
                          "are not applied: diffusers' SD3 LoRA loader only loads the transformer, CLIP-L and "
                          f"CLIP-G (e.g. {t5}).",)
    clip.load_state_dict(merged)
    ids = torch.tensor([[0, 5, 6, 7, 1]])
    with torch.no_grad():
        want = clip(ids).text_embeds
        got = loaded.pipe.text_encoder(ids).text_embeds
    assert _rel(got, want) < TOL


def test_unmatched_modules_are_counted_and_a_file_matching_nothing_is_refused(tmp_path):
    lib = LoraLibrary(tmp_path / "loras")
    ok = {"lora_unet_joint_blocks_0_x_block_attn_proj.lora_down.weight": torch.zeros(2, 32),
          "lora_unet_joint_blocks_0_x_block_attn_proj.lora_up.weight": torch.zeros(32, 2)}
    odd = {"lora_unet_joint_blocks_0_x_block_nonsense.lora_down.weight": torch.zeros(2, 32),
           "lora_unet_joint_blocks_0_x_block_nonsense.lora_up.weight": torch.zeros(32, 2),
           "lora_unet_joint_blocks_1_x_block_attn_proj.hada_w1_a": torch.zeros(2, 32)}
    save_file({**ok, **odd}, str(tmp_path / "partial.safetensors"))
    info = lib.import_file(tmp_path / "partial.safetensors")
    assert info.format == "kohya" and len(info.notes) == 1
    assert info.notes[0].startswith("LoRA partial.safetensors: 2 of 3 modules were not applied — ")
    assert "LyCORIS LoHa" in info.notes[0] and "no SD3 module of that name" in info.notes[0]
    assert {d["name"]: d["notes"] for d in lib.describe()}["partial"] == list(info.notes)

    save_file(odd, str(tmp_path / "nothing.safetensors"))
    with pytest.raises(LoraError, match=r"none of the 2 modules of nothing\.safetensors maps to SD3"):
        lib.import_file(tmp_path / "nothing.safetensors")
    t5_only = {"lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.zeros(2, 64),
               "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": torch.zeros(64, 2)}
    save_file(t5_only, str(tmp_path / "t5.safetensors"))
    with pytest.raises(LoraError, match=r"T5 \(lora_te3_\) parts are not applied"):
        lib.import_file(tmp_path / "t5.safetensors")


def test_mapping_follows_diffusers_converter_names():
    """Spot checks of the correspondence (the numerical test above is the proof)."""
    keys = [f"lora_unet_{m}.lora_{r}.weight" for m in (
        "joint_blocks_3_context_block_adaLN_modulation_1", "final_layer_adaLN_modulation_1",
        "joint_blocks_0_context_block_attn_qkv", "joint_blocks_2_x_block_mlp_fc2", "t_embedder_mlp_0",
        "y_embedder_mlp_2", "x_embedder_proj", "context_embedder", "joint_blocks_0_x_block_attn2_proj",
    ) for r in ("down", "up")]
    plan = plan_keys(keys)
    t = {m.removeprefix("lora_unet_"): v for m, v in plan.targets.items()}
    assert t["joint_blocks_3_context_block_adaLN_modulation_1"].modules == ("transformer_blocks.3.norm1_context.linear",)
    assert t["joint_blocks_3_context_block_adaLN_modulation_1"].swap == "last_block"
    assert t["final_layer_adaLN_modulation_1"].modules == ("norm_out.linear",)
    assert t["final_layer_adaLN_modulation_1"].swap == "always"
    assert t["joint_blocks_0_context_block_attn_qkv"].modules == tuple(
        f"transformer_blocks.0.attn.{n}" for n in ("add_q_proj", "add_k_proj", "add_v_proj"))
    assert t["joint_blocks_2_x_block_mlp_fc2"].modules == ("transformer_blocks.2.ff.net.2",)
    assert t["t_embedder_mlp_0"].modules == ("time_text_embed.timestep_embedder.linear_1",)
    assert t["y_embedder_mlp_2"].modules == ("time_text_embed.text_embedder.linear_2",)
    assert t["x_embedder_proj"].modules == ("pos_embed.proj",)
    assert t["joint_blocks_0_x_block_attn2_proj"].modules == ("transformer_blocks.0.attn2.to_out.0",)
    assert not plan.unmatched
