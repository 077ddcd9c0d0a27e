"""Tiny ControlNets for the offline demo and the tests: one per demo base, random and untrained.

Each is built from its base's tiny transformer, in the design the real ControlNets of that base
use:

* SD3 Medium, SD3.5 Medium — InstantX's design: ``SD3ControlNetModel.from_transformer`` (its own
  patch + position embedding, context embedder and joint blocks copied from the transformer's
  first half);
* SD3.5 Large, Large Turbo — Stability's 8B design: no context embedder, single-stream blocks,
  ``use_pos_embed=False`` (the pipeline feeds it the transformer's position embedding), real
  pooled projections.

Both designs start with zeroed output projections (``controlnet_blocks``) and a zeroed control
patch embedder, so an untrained ControlNet changes nothing; these get small seeded random values
instead, so the demo and the tests can see that a control image steers the image. Saved in the
diffusers layout (``config.json`` + ``diffusion_pytorch_model.safetensors``) with a stamp naming
their base variant and control type; a folder with a matching stamp is reused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

TINY_CONTROLNET_FORMAT = 1
STAMP = "studio_controlnet.json"
CONTROL_TYPE = "canny"  # the demo's: its preprocessor needs no download
LARGE_DESIGN = ("sd3.5-large", "sd3.5-large-turbo")


def _seed(variant: str) -> int:
    return 100 + sum(ord(c) for c in variant)


def build_tiny_controlnet(transformer, variant: str, num_layers: int | None = None, extra_channels: int = 0):
    """A tiny SD3ControlNetModel for ``transformer`` (an SD3Transformer2DModel) in the design of
    ``variant``'s real ControlNets. ``num_layers`` defaults to half the transformer's blocks."""
    import torch
    from diffusers import SD3ControlNetModel

    t = transformer.config
    layers = num_layers or max(1, t.num_layers // 2)
    torch.manual_seed(_seed(variant))
    if variant in LARGE_DESIGN:
        net = SD3ControlNetModel(
            sample_size=t.sample_size, patch_size=t.patch_size, in_channels=t.in_channels, num_layers=layers,
            attention_head_dim=t.attention_head_dim, num_attention_heads=t.num_attention_heads,
            joint_attention_dim=None, caption_projection_dim=t.caption_projection_dim,
            pooled_projection_dim=t.pooled_projection_dim, out_channels=t.out_channels, pos_embed_max_size=None,
            extra_conditioning_channels=extra_channels, pos_embed_type=None, use_pos_embed=False,
            force_zeros_for_pooled_projection=False,
        )
    else:
        net = SD3ControlNetModel.from_transformer(transformer, num_layers=layers,
                                                  num_extra_conditioning_channels=extra_channels)
    with torch.no_grad():
        for module in list(net.controlnet_blocks) + [net.pos_embed_input.proj]:
            for p in module.parameters():
                p.normal_(0.0, 0.05)
    return net.eval()


def _stamp(variant: str, base_digest: str) -> dict:
    return {"format": TINY_CONTROLNET_FORMAT, "variant": variant, "control_type": CONTROL_TYPE,
            "base_transformer": base_digest}


def _digest(transformer_dir: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for path in sorted(transformer_dir.glob("*")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def build_tiny_controlnets(root: str | os.PathLike, base_folders: dict, force: bool = False) -> dict[str, Path]:
    """Write (or reuse) one tiny ControlNet per base under ``root``; returns {variant: folder}.

    ``base_folders``: {variant: diffusers pipeline folder} (the tiny or demo family). Folders are
    written under a temporary name and renamed, never left half-written."""
    from diffusers import SD3Transformer2DModel

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for variant, base in base_folders.items():
        folder = root / f"tiny-{variant}-{CONTROL_TYPE}"  # never a catalog id: reuse must not fetch a real one
        out[variant] = folder
        stamp = _stamp(variant, _digest(Path(base) / "transformer"))
        try:
            if not force and json.loads((folder / STAMP).read_text()) == stamp:
                continue
        except (OSError, ValueError):
            pass
        transformer = SD3Transformer2DModel.from_pretrained(base, subfolder="transformer")
        net = build_tiny_controlnet(transformer, variant)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=root))
        net.save_pretrained(tmp)
        (tmp / STAMP).write_text(json.dumps(stamp))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    return out


def tiny_controlnet_of(folder: str | os.PathLike) -> dict | None:
    """The stamp of a tiny ControlNet folder ({variant, control_type, …}), or None."""
    try:
        return json.loads((Path(folder) / STAMP).read_text())
    except (OSError, ValueError):
        return None
