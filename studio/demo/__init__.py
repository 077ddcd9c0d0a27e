"""The offline demo: the tiny SD3 family (random weights, for tests and the four architectures)
and the trained demo model shipped in ``assets/``.

- ``studio.demo.tiny``: the random tiny family and the shared tiny text encoders/tokenizers.
- ``studio.demo.shapes``: the procedural pictures and prompts the demo model learnt.
- ``studio.demo.train``: how the shipped weights were made (``python -m studio.demo.train``).
- ``studio.demo.quality``: how well they draw what is asked (``python -m studio.demo.quality``).

:func:`trained_folder` is the shipped pipeline folder; :func:`build_demo_family` writes the four
demo variants around it (the trained sd3.5-medium; the other three the random tiny transformers
with the trained VAE and the same frozen encoders), so a variant swap reloads only the transformer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "demo"
TRAINED_VARIANT = "sd3.5-medium"
PIPELINE_DIR = "sd3.5-medium-shapes"
LORA_FILE = "lora-purple-world.safetensors"
KOHYA_LORA_FILE = "lora-purple-world-kohya.safetensors"

# Bumped whenever what build_demo_family writes changes (besides the trained weights themselves,
# which the stamp records by digest).
DEMO_FORMAT = 1
_STAMP = "studio_tiny.json"  # the tiny family's stamp: studio.demo.tiny.tiny_variant_of reads it
_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
_FOLDERS = _COMPONENTS + ("tokenizer", "tokenizer_2", "tokenizer_3", "scheduler")


class DemoAssetsError(RuntimeError):
    """The shipped demo weights are missing or incomplete."""


def trained_folder(assets: str | os.PathLike | None = None) -> Path:
    """The trained demo pipeline folder (a complete diffusers folder), verified.

    Raises DemoAssetsError naming what is missing (for example when the package was installed
    without its ``assets/`` folder, or a Git LFS checkout left pointer files).
    """
    folder = Path(assets) / PIPELINE_DIR if assets else ASSETS / PIPELINE_DIR
    missing = [] if (folder / "model_index.json").is_file() else ["model_index.json"]
    for name in _FOLDERS:
        if not (folder / name).is_dir():
            missing.append(f"{name}/")
    for name in _COMPONENTS:
        weights = list((folder / name).glob("*.safetensors"))
        if (folder / name).is_dir() and (not weights or any(w.stat().st_size < 1024 for w in weights)):
            missing.append(f"{name}/*.safetensors")
    if missing:
        raise DemoAssetsError(
            f"The trained demo model at {folder} is incomplete (missing: {', '.join(missing)}). "
            "It ships in the repository's assets/demo/; rebuild it with "
            "`python -m studio.demo.train --out assets/demo`.")
    return folder


def trained_lora(layout: str = "diffusers", assets: str | os.PathLike | None = None) -> Path:
    """The demo LoRA ("purple-world"), in the diffusers/PEFT or the kohya key layout."""
    name = {"diffusers": LORA_FILE, "kohya": KOHYA_LORA_FILE}[layout]
    path = (Path(assets) if assets else ASSETS) / name
    if not path.is_file():
        raise DemoAssetsError(f"The demo LoRA {path} is missing; rebuild it with "
                              "`python -m studio.demo.train --out assets/demo`.")
    return path


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ("transformer", "vae"):
        for path in sorted((folder / name).glob("*")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def build_demo_family(root: str | os.PathLike, variants=None, force: bool = False) -> dict[str, Path]:
    """Write (or reuse) the demo family under ``root``; returns {variant: folder}.

    sd3.5-medium is a copy of the trained model; every other variant is that folder with the
    random tiny transformer of its architecture (``studio.demo.tiny.build_transformer``) in place
    of the trained one. VAE, text encoders, tokenizers and scheduler are byte-identical files in
    all four. Each folder carries the tiny family's stamp (so ``tiny_variant_of`` names its
    variant) plus the trained weights' digest; an intact folder with a matching stamp is reused,
    and folders are written under a temporary name and renamed, never left half-written.
    """
    from studio.demo.tiny import TINY_VARIANTS, build_transformer

    variants = TINY_VARIANTS if variants is None else tuple(variants)
    source = trained_folder()
    digest = _digest(source)
    # the random transformers keep the trained one's native size (256 px) whatever the VAE's factor
    native_latent = json.loads((source / "transformer" / "config.json").read_text())["sample_size"]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for variant in variants:
        if variant not in TINY_VARIANTS:
            raise KeyError(f"No demo build for {variant!r}; demo variants: {', '.join(TINY_VARIANTS)}")
        folder = root / variant
        out[variant] = folder
        stamp = {"format": DEMO_FORMAT, "variant": variant, "scale": 1, "demo": "shapes",
                 "trained": digest, "trained_variant": TRAINED_VARIANT}
        try:
            if not force and json.loads((folder / _STAMP).read_text()) == stamp:
                continue
        except (OSError, ValueError):
            pass
        tmp = Path(tempfile.mkdtemp(prefix=f".{variant}-", dir=root))
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        if variant != TRAINED_VARIANT:
            shutil.rmtree(tmp / "transformer")
            build_transformer(variant, sample_size=native_latent).save_pretrained(tmp / "transformer")
        (tmp / _STAMP).write_text(json.dumps(stamp))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    return out
