"""Test-only helpers for ControlNets: Stability's single-file layout written from a diffusers
model (the exact inverse of ``studio.models.controlnet.stability_to_diffusers``), a diffusers-key
single file, and a tiny local depth estimator. Not part of the product.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_PARTS = {"attn.to_out.0": "attn.proj", "ff.net.0.proj": "mlp.fc1", "ff.net.2": "mlp.fc2",
          "norm1.linear": "adaLN_modulation.1"}
_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(attn\.to_out\.0|ff\.net\.0\.proj|ff\.net\.2|norm1\.linear)\.(weight|bias)")
_QKV = re.compile(r"transformer_blocks\.(\d+)\.attn\.to_q\.(weight|bias)")
_SAME = re.compile(r"(controlnet_blocks\.\d+|pos_embed_input\.proj|"
                   r"time_text_embed\.(timestep_embedder|text_embedder)\.linear_[12])\.(weight|bias)")


def diffusers_to_stability(sd: dict) -> dict:
    """An 8B-design SD3ControlNetModel state dict in Stability's key layout. Every tensor must be
    consumed (a leftover means the design is not Stability's)."""
    import torch

    src = dict(sd)
    out = {}
    for key in list(src):
        m = _QKV.fullmatch(key)
        if m:
            i, p = m.groups()
            b = f"transformer_blocks.{i}.attn."
            out[f"transformer_blocks.{i}.attn.qkv.{p}"] = torch.cat(
                [src.pop(b + f"to_q.{p}"), src.pop(b + f"to_k.{p}"), src.pop(b + f"to_v.{p}")], dim=0)
    for key in list(src):
        m = _BLOCK.fullmatch(key)
        if m:
            i, part, p = m.groups()
            out[f"transformer_blocks.{i}.{_PARTS[part]}.{p}"] = src.pop(key)
        elif _SAME.fullmatch(key):
            out[key] = src.pop(key)
    if src:
        raise ValueError(f"Not Stability's ControlNet design; unmapped tensors: {sorted(src)[:5]}")
    return out


def _save(tensors: dict, path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    return path


def save_stability_file(net, path, control_type: int = 1, transformer=None) -> Path:
    """``net`` (8B design) as Stability's single file, with what the released files carry besides
    the weights: the ``control_type`` code and, when ``transformer`` is given, its patch embedder
    as ``pos_embed.proj.*`` (unused by the 8B ControlNets)."""
    import torch

    tensors = diffusers_to_stability(net.state_dict())
    tensors["control_type"] = torch.tensor([control_type], dtype=torch.int32)
    if transformer is not None:
        tensors["pos_embed.proj.weight"] = transformer.pos_embed.proj.weight
        tensors["pos_embed.proj.bias"] = transformer.pos_embed.proj.bias
    return _save(tensors, Path(path))


def save_diffusers_file(net, path) -> Path:
    """``net``'s state dict in one .safetensors file (diffusers keys, as the InstantX repacks)."""
    return _save(dict(net.state_dict()), Path(path))


def build_tiny_depth_model(folder, seed: int = 0) -> Path:
    """A tiny Depth Anything (DINOv2 backbone + DPT head, 56 px input) with its image processor,
    saved where ``AutoModelForDepthEstimation`` / ``AutoImageProcessor`` load it offline. The head
    gets random weights large enough that the predicted depth is not flat."""
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    folder = Path(folder)
    backbone = Dinov2Config(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2, patch_size=14,
                            image_size=56, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=16, patch_size=14,
                                 neck_hidden_sizes=[8, 16, 16, 16], fusion_hidden_size=16, head_hidden_size=8,
                                 depth_estimation_type="relative")
    torch.manual_seed(seed)
    model = DepthAnythingForDepthEstimation(config).eval()
    with torch.no_grad():  # random init leaves the DPT neck and head near zero (flat after the ReLU)
        for p in list(model.neck.parameters()) + list(model.head.parameters()):
            p.normal_(0.0, 0.3)
        model.head.conv3.bias.fill_(1.0)
    processor = DPTImageProcessor(do_resize=True, size={"height": 56, "width": 56}, keep_aspect_ratio=True,
                                  ensure_multiple_of=14, resample=3, do_rescale=True, do_normalize=True,
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
