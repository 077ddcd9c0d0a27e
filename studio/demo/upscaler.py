"""A tiny ESRGAN upscaler (random weights, 0.9 MB) for the tests and the offline demo.

:func:`build_tiny_upscaler` writes a ``.safetensors`` file in the original ESRGAN ("old arch")
key layout — the layout of 4x-UltraSharp and most community ESRGAN models, and the one spandrel
converts every RRDBNet variant to — so spandrel's ESRGAN loader identifies it and infers every
hyperparameter from the tensors, exactly as it does for a real model:

    model.0                          first conv, 3 → nf          (nf: ``model.0.weight`` rows)
    model.1.sub.{i}.RDB{1,2,3}.conv{1..5}.0   the RRDB trunk     (nb: how many ``sub.{i}``)
    model.1.sub.{nb}                 the trunk's last conv, nf → nf
    model.3, model.6, ...            one upconv a 2× (nearest upsample, conv, LeakyReLU)
    model.{3k+2}, model.{3k+4}       HR conv and the last conv, nf → 3

spandrel reads the scale from the length of that ``model.*`` sequence: ``(len - 5) // 3`` upconvs,
so 8 entries is 2×, 11 is 4×. The trunk's growth channels are 32 (spandrel's RRDBNet fixes
``gc=32``), whatever ``nf`` is.

The weights are random but start near the identity: the first, upconv, HR and last convs pass the
RGB channels straight through (a centre tap of 1) and everything else is small noise, so the
result looks like a nearest-neighbour enlargement with a faint random texture — a picture, not
noise, in the demo — and a 64×64 input runs in milliseconds on a CPU.

Only torch and safetensors: no spandrel needed to build one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

GROWTH = 32  # spandrel's RRDBNet growth channels (gc), fixed there
TINY_UPSCALER_NAME = "tiny-esrgan-2x"  # the name the demo's upscalers folder gives the 2× model


def tiny_upscaler_state_dict(scale: int = 2, nf: int = 8, nb: int = 1, seed: int = 0) -> dict:
    """The state dict (name → float32 tensor) of a tiny ESRGAN of ``scale`` 2, 4 or 8."""
    import torch

    if scale not in (2, 4, 8):
        raise ValueError(f"scale must be 2, 4 or 8 (one 2× upconv each), not {scale}")
    if nf < 3 or nb < 1:
        raise ValueError("nf must be at least 3 (the RGB channels pass through it) and nb at least 1")
    gen = torch.Generator("cpu").manual_seed(seed)

    def noise(*shape, std):
        return torch.randn(*shape, generator=gen) * std

    def identity_conv(out_c, in_c, std=0.01):
        w = noise(out_c, in_c, 3, 3, std=std)
        for c in range(min(out_c, in_c)):
            w[c, c, 1, 1] += 1.0
        return w

    sd: dict = {"model.0.weight": identity_conv(nf, 3), "model.0.bias": torch.zeros(nf)}
    for b in range(nb):
        for r in (1, 2, 3):
            for c in range(1, 6):
                in_c = nf + (c - 1) * GROWTH
                out_c = nf if c == 5 else GROWTH
                key = f"model.1.sub.{b}.RDB{r}.conv{c}.0"
                sd[f"{key}.weight"] = noise(out_c, in_c, 3, 3, std=0.05 / math.sqrt(in_c))
                sd[f"{key}.bias"] = torch.zeros(out_c)
    sd[f"model.1.sub.{nb}.weight"] = noise(nf, nf, 3, 3, std=0.02)
    sd[f"model.1.sub.{nb}.bias"] = torch.zeros(nf)
    ups = int(math.log2(scale))
    for k in range(1, ups + 1):
        sd[f"model.{3 * k}.weight"] = identity_conv(nf, nf)
        sd[f"model.{3 * k}.bias"] = torch.zeros(nf)
    hr = 3 * ups + 2
    sd[f"model.{hr}.weight"] = identity_conv(nf, nf)
    sd[f"model.{hr}.bias"] = torch.zeros(nf)
    sd[f"model.{hr + 2}.weight"] = identity_conv(3, nf)
    sd[f"model.{hr + 2}.bias"] = torch.zeros(3)
    return {k: v.contiguous() for k, v in sd.items()}


def build_tiny_upscaler(path: str | os.PathLike, scale: int = 2, nf: int = 8, nb: int = 1, seed: int = 0) -> Path:
    """Write a tiny ESRGAN ``.safetensors`` to ``path`` (a file, or a folder to put
    ``tiny-esrgan-{scale}x.safetensors`` in) and return the file's path.

    Deterministic: the same arguments write the same bytes, so its content hash is stable. The
    file is written under a temporary name and renamed, never left half-written."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        path = path / f"tiny-esrgan-{scale}x.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    # one metadata key: safetensors writes several in no fixed order, and the bytes must not vary
    about = json.dumps({"architecture": "ESRGAN", "scale": scale, "nf": nf, "nb": nb, "seed": seed}, sort_keys=True)
    save_file(tiny_upscaler_state_dict(scale, nf, nb, seed), str(tmp), metadata={"studio_tiny_esrgan": about})
    os.replace(tmp, path)
    return path
