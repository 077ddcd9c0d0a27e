"""Test-only exporters: a diffusers SD3 folder written in the official single-file release layout.

The exact inverses of diffusers' single-file converters (transformer: SAI keys; VAE: ldm keys),
so the tests can build ``sd3.5_large.safetensors`` + ``text_encoders/`` from the tiny family and
prove the studio's single-file loading gives back bit-identical weights. Not part of the product.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from studio.catalog import get_variant, variant_for_transformer_config
from studio.errors import ModelError
from studio.models.singlefile import SAI_PREFIX, TEXT_ENCODER_DIR, VAE_PREFIX

# --- export (the inverse of diffusers' converters) -------------------------------------------------


def _swap_halves(t):
    """SAI's AdaLayerNormContinuous splits (shift, scale); diffusers (scale, shift). Self-inverse."""
    import torch

    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def diffusers_to_sai_transformer(sd: dict, num_layers: int | None = None) -> dict:
    """An SD3Transformer2DModel state dict in the original SAI key layout (without the prefix).

    The exact inverse of ``diffusers.loaders.single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers``.
    Every input tensor must be consumed; a leftover raises (the layout would be incomplete).
    """
    import torch

    src = dict(sd)
    out = {}

    def take(k):
        return src.pop(k)

    def cat(*ks):
        return torch.cat([take(k) for k in ks], dim=0)

    if num_layers is None:
        num_layers = 1 + max(int(k.split(".")[1]) for k in src if k.startswith("transformer_blocks."))
    out["pos_embed"] = take("pos_embed.pos_embed")
    out["x_embedder.proj.weight"] = take("pos_embed.proj.weight")
    out["x_embedder.proj.bias"] = take("pos_embed.proj.bias")
    for sai, dif in (
        ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
        ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
        ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
        ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
        ("context_embedder", "context_embedder"),
        ("final_layer.linear", "proj_out"),
    ):
        for p in ("weight", "bias"):
            out[f"{sai}.{p}"] = take(f"{dif}.{p}")
    for p in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{p}"] = _swap_halves(take(f"norm_out.linear.{p}"))

    for i in range(num_layers):
        d = f"transformer_blocks.{i}."
        x = f"joint_blocks.{i}.x_block."
        c = f"joint_blocks.{i}.context_block."
        last = i == num_layers - 1
        for p in ("weight", "bias"):
            out[f"{x}attn.qkv.{p}"] = cat(f"{d}attn.to_q.{p}", f"{d}attn.to_k.{p}", f"{d}attn.to_v.{p}")
            out[f"{c}attn.qkv.{p}"] = cat(
                f"{d}attn.add_q_proj.{p}", f"{d}attn.add_k_proj.{p}", f"{d}attn.add_v_proj.{p}"
            )
            out[f"{x}attn.proj.{p}"] = take(f"{d}attn.to_out.0.{p}")
            if not last:
                out[f"{c}attn.proj.{p}"] = take(f"{d}attn.to_add_out.{p}")
            out[f"{x}adaLN_modulation.1.{p}"] = take(f"{d}norm1.linear.{p}")
            ctx_ada = take(f"{d}norm1_context.linear.{p}")
            out[f"{c}adaLN_modulation.1.{p}"] = _swap_halves(ctx_ada) if last else ctx_ada
            out[f"{x}mlp.fc1.{p}"] = take(f"{d}ff.net.0.proj.{p}")
            out[f"{x}mlp.fc2.{p}"] = take(f"{d}ff.net.2.{p}")
            if not last:
                out[f"{c}mlp.fc1.{p}"] = take(f"{d}ff_context.net.0.proj.{p}")
                out[f"{c}mlp.fc2.{p}"] = take(f"{d}ff_context.net.2.{p}")
        if f"{d}attn.norm_q.weight" in src:
            out[f"{x}attn.ln_q.weight"] = take(f"{d}attn.norm_q.weight")
            out[f"{x}attn.ln_k.weight"] = take(f"{d}attn.norm_k.weight")
            out[f"{c}attn.ln_q.weight"] = take(f"{d}attn.norm_added_q.weight")
            out[f"{c}attn.ln_k.weight"] = take(f"{d}attn.norm_added_k.weight")
        if f"{d}attn2.to_q.weight" in src:
            for p in ("weight", "bias"):
                out[f"{x}attn2.qkv.{p}"] = cat(f"{d}attn2.to_q.{p}", f"{d}attn2.to_k.{p}", f"{d}attn2.to_v.{p}")
                out[f"{x}attn2.proj.{p}"] = take(f"{d}attn2.to_out.0.{p}")
            if f"{d}attn2.norm_q.weight" in src:
                out[f"{x}attn2.ln_q.weight"] = take(f"{d}attn2.norm_q.weight")
                out[f"{x}attn2.ln_k.weight"] = take(f"{d}attn2.norm_k.weight")
    if src:
        raise ValueError(f"Unmapped transformer tensors: {sorted(src)[:5]}")
    return out


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def diffusers_to_ldm_vae(sd: dict, num_blocks: int) -> dict:
    """An AutoencoderKL state dict in the ldm layout (without the prefix).

    The exact inverse of ``diffusers.loaders.single_file_utils.convert_ldm_vae_checkpoint``
    (attention projections as 1×1 convs, as in the original checkpoints).
    """
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k)
        if m:
            out[f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"] = v
            continue
        m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", k)
        if m:
            out[f"encoder.down.{m[1]}.downsample.conv.{m[2]}"] = v
            continue
        m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k)
        if m:
            b = num_blocks - 1 - int(m[1])
            out[f"decoder.up.{b}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"] = v
            continue
        m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", k)
        if m:
            out[f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"] = v
            continue
        m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", k)
        if m:
            out[f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"] = v
            continue
        m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", k)
        if m:
            name = _VAE_ATTN[m[2]]
            if m[3] == "weight" and name != "norm" and v.ndim == 2:
                v = v[:, :, None, None]  # linear → 1×1 conv
            out[f"{m[1]}.mid.attn_1.{name}.{m[3]}"] = v
            continue
        m = re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(weight|bias)", k)
        if m:
            out[f"{m[1]}.norm_out.{m[2]}"] = v
            continue
        if re.fullmatch(r"((encoder|decoder)\.conv_(in|out)|quant_conv|post_quant_conv)\.(weight|bias)", k):
            out[k] = v
            continue
        raise ValueError(f"Unmapped VAE tensor: {k}")
    return out


def _folder_weights(sub: Path) -> dict:
    """All tensors of a diffusers/transformers component folder (single or sharded safetensors)."""
    from safetensors.torch import load_file

    for index in sorted(sub.glob("*.safetensors.index.json")):
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out = {}
        for f in files:
            out.update(load_file(str(sub / f)))
        return out
    files = sorted(sub.glob("*.safetensors"))
    if len(files) != 1:
        raise ModelError(f"Expected one .safetensors file in {sub}, found {len(files)}.")
    return load_file(str(files[0]))


def _save(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def export_official_layout(
    diffusers_folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    variant: str | None = None,
    *,
    dtype=None,
    include_vae: bool = True,
) -> Path:
    """Write a diffusers SD3 folder in the official single-file release layout; returns the file.

    ``out_dir/<single_file name>`` holds the transformer (SAI keys, ``model.diffusion_model.``)
    and — unless ``include_vae=False`` — the VAE (ldm keys, ``first_stage_model.``), in ``dtype``
    (None keeps the folder's dtype). ``out_dir/text_encoders/`` gets clip_l and clip_g (fp16),
    t5xxl_fp16 and t5xxl_fp8_e4m3fn (matrices in float8_e4m3fn, vectors in fp16).
    """
    import torch

    folder = Path(diffusers_folder)
    out = Path(out_dir)
    if variant is None:
        from studio.demo.tiny import tiny_variant_of

        variant = tiny_variant_of(folder)
        if variant is None:
            guess = variant_for_transformer_config(json.loads((folder / "transformer" / "config.json").read_text()))
            variant = guess.name if guess else "sd3.5-medium"
    name = get_variant(variant).single_file

    def cast(sd, dt):
        return {k: (v.to(dt) if dt is not None and v.is_floating_point() else v) for k, v in sd.items()}

    tcfg = json.loads((folder / "transformer" / "config.json").read_text())
    sai = diffusers_to_sai_transformer(_folder_weights(folder / "transformer"), tcfg.get("num_layers"))
    tensors = {SAI_PREFIX + k: v for k, v in sai.items()}
    if include_vae:
        vcfg = json.loads((folder / "vae" / "config.json").read_text())
        ldm = diffusers_to_ldm_vae(_folder_weights(folder / "vae"), len(vcfg["block_out_channels"]))
        tensors.update({VAE_PREFIX + k: v for k, v in ldm.items()})
    file = out / name
    _save(cast(tensors, dtype), file)

    te = out / TEXT_ENCODER_DIR
    _save(cast(_folder_weights(folder / "text_encoder"), torch.float16), te / "clip_l.safetensors")
    _save(cast(_folder_weights(folder / "text_encoder_2"), torch.float16), te / "clip_g.safetensors")
    t5 = _folder_weights(folder / "text_encoder_3")
    _save(cast(t5, torch.float16), te / "t5xxl_fp16.safetensors")
    fp8 = {
        k: v.to(torch.float8_e4m3fn if v.ndim >= 2 else torch.float16) if v.is_floating_point() else v
        for k, v in t5.items()
    }
    _save(fp8, te / "t5xxl_fp8_e4m3fn.safetensors")
    return file
