"""LoRA files: where they live, what format they are in, and how a selection is written down.

LoRAs are ``.safetensors`` files in ``<data-dir>/loras/`` (``StudioConfig.loras_dir``); a LoRA's
*name* is its file name without the suffix. Uploads are copied into that folder. Two families of
layouts load:

* diffusers / PEFT (``transformer.…lora_A.weight`` / ``lora_B``, optionally ``text_encoder.…`` /
  ``text_encoder_2.…``) — what ``StableDiffusion3Pipeline.save_lora_weights`` writes and most
  SD3 LoRAs on the Hub use; loaded as is;
* kohya / Civitai (``lora_unet_…``, ``lora_te1_…``) and ComfyUI (``diffusion_model.…``) —
  converted by ``studio.models.kohya`` (diffusers 0.42 would load nothing from them). Modules
  that cannot be converted are counted in ``LoraInfo.notes``; a file of which nothing converts
  is refused.

Anything else is recognised from its keys *before* loading and refused with a message.

This module reads only safetensors headers (never tensors) and knows nothing of torch or
diffusers; ``ModelManager.activate_loras`` does the loading.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from studio.errors import StudioError
from studio.models.identity import file_sha256
from studio.models import kohya
from studio.models.identity import addnet_digest

MAX_LORA_BYTES = 4 << 30
MAX_HEADER_BYTES = 64 << 20
NAME_RE = re.compile(r"^[\w][\w.\- ]{0,99}$")  # no ':' '<' '>' (infotext tags) nor path separators
DIFFUSERS_PREFIXES = ("transformer.", "text_encoder.", "text_encoder_2.")


class LoraError(StudioError, ValueError):
    """A LoRA that cannot be used. The message says why and what to do."""


@dataclass(frozen=True)
class LoraFormat:
    """What a LoRA file's keys say: its layout, whether it changes the text encoders, and what
    of it will not be applied (sentences for the user)."""

    kind: str  # "diffusers" (loaded as is) | "kohya" (kohya / ComfyUI keys, converted on load)
    text_encoders: bool
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoraInfo:
    """One inspected LoRA file: its name, path, hashes, size, format, whether it changes the text
    encoders, and what of it is not applied."""
    name: str
    path: Path
    sha256: str
    size: int
    text_encoders: bool  # the file also changes CLIP-L / CLIP-G (prompt embeddings differ)
    addnet: str = ""  # A1111's "addnet" hash (sha256 of the tensor data), full hex
    format: str = "diffusers"  # LoraFormat.kind
    notes: tuple[str, ...] = ()  # what of the file is not applied (kohya files: unmatched modules)

    @property
    def adapter_name(self) -> str:
        """The PEFT adapter name: the file name plus its content hash, so a replaced file with the
        same name is a new adapter."""
        return re.sub(r"\W", "_", self.name)[:40] + "_" + self.sha256[:12]

    def as_meta(self, weight: float) -> dict:
        """The metadata entry: ``hash`` is A1111's ``Lora hashes`` value (addnet, 12 hex digits)."""
        meta = {"name": self.name, "sha256": self.sha256, "weight": float(weight)}
        if self.addnet:
            meta["hash"] = self.addnet[:12]
        return meta


def read_keys(path: Path) -> tuple[list[str], dict]:
    """The tensor names and ``__metadata__`` of a safetensors file, from its header only."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LoraError(f"{path.name} is not a safetensors file (it is empty or truncated).")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise LoraError(f"{path.name}: the safetensors header is {n} bytes; that is not a LoRA.")
            header = json.loads(f.read(n))
    except LoraError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise LoraError(f"{path.name} is not a readable safetensors file ({e}).") from None
    if not isinstance(header, dict):
        raise LoraError(f"{path.name} is not a safetensors file (bad header).")
    meta = header.pop("__metadata__", None) or {}
    return list(header), meta if isinstance(meta, dict) else {}


def inspect_keys(keys: list[str], filename: str = "the file") -> LoraFormat:
    """The layout of a LoRA from its key names; raises LoraError for a file the studio cannot use."""
    if not keys:
        raise LoraError(f"{filename} holds no tensors; it is not a LoRA.")
    if kohya.is_foreign_layout(keys):
        plan = kohya.plan_keys(keys)
        if not plan.targets:
            raise LoraError(
                f"Unsupported LoRA: none of the {plan.total} modules of {filename} maps to SD3 "
                f"({plan.reasons()}). The studio converts kohya/Civitai (lora_unet_…, lora_te1_…, "
                "lora_te2_…) and ComfyUI (diffusion_model.…) SD3/SD3.5 LoRAs, and loads the "
                "diffusers/PEFT layout (transformer.….lora_A.weight); is it a LoRA for another model?"
            )
        note = plan.note(filename)
        return LoraFormat("kohya", plan.text_encoders, (note,) if note else ())
    return LoraFormat("diffusers", check_format(keys, filename))


def check_format(keys: list[str], filename: str = "the file") -> bool:
    """Raise LoraError unless the keys are the diffusers/PEFT SD3 layout; returns whether the
    LoRA also touches the text encoders. (kohya/ComfyUI files: :func:`inspect_keys`.)"""
    if not keys:
        raise LoraError(f"{filename} holds no tensors; it is not a LoRA.")
    if kohya.is_foreign_layout(keys):
        return inspect_keys(keys, filename).text_encoders
    if any(k.startswith("base_model.model.") for k in keys):
        raise LoraError(
            f"Unsupported LoRA format: {filename} uses raw-PEFT keys (base_model.model.…). The "
            "studio loads the diffusers/PEFT layout written by StableDiffusion3Pipeline.save_lora_weights "
            "(transformer.….lora_A.weight), and kohya/ComfyUI SD3 LoRAs (lora_unet_…, diffusion_model.…)."
        )
    bad = [k for k in keys if not (k.startswith(DIFFUSERS_PREFIXES) and "lora" in k)]
    if bad:
        raise LoraError(
            f"Unsupported LoRA format: {filename} has keys the studio cannot place (e.g. {bad[0]!r}). "
            "Expected the diffusers/PEFT layout: transformer.….lora_A.weight / lora_B.weight."
        )
    if not any(k.startswith("transformer.") for k in keys) and not any(
            k.startswith(("text_encoder.", "text_encoder_2.")) for k in keys):
        raise LoraError(f"{filename} changes nothing the SD3 pipeline has.")
    return any(k.startswith(("text_encoder.", "text_encoder_2.")) for k in keys)


class LoraLibrary:
    """The LoRA folder: list, inspect, import. ``hashes`` (models.HashCache) avoids re-hashing."""

    def __init__(self, folder: Path, hashes=None):
        self.folder = Path(folder)
        self.hashes = hashes

    def _sha(self, path: Path) -> str:
        return self.hashes.file_hash(path) if self.hashes is not None else file_sha256(path)

    def _addnet(self, path: Path) -> str:
        return self.hashes.addnet_hash(path) if self.hashes is not None else addnet_digest(path)

    def names(self) -> list[str]:
        """Every loadable-looking LoRA file name in the folder (sorted, case-insensitively)."""
        if not self.folder.is_dir():
            return []
        return sorted((p.stem for p in self.folder.glob("*.safetensors")
                       if p.is_file() and NAME_RE.match(p.stem)), key=str.lower)

    def path_for(self, name: str) -> Path:
        """The file of the LoRA called ``name`` (LoraError when the name is malformed or not in the
        folder)."""
        if not isinstance(name, str) or not NAME_RE.match(name.strip()):
            raise LoraError(f"{name!r} is not a LoRA name: use the file name without .safetensors "
                            "(letters, digits, spaces, '_', '-', '.').")
        path = self.folder / f"{name.strip()}.safetensors"
        if not path.is_file():
            have = ", ".join(self.names()[:10]) or "none"
            raise LoraError(f"No LoRA named {name!r}: put {name}.safetensors in the loras folder of the data "
                            f"dir, or upload it (available: {have}).")
        return path

    def info(self, name: str) -> LoraInfo:
        """Inspect a LoRA (format checked from the header; raises LoraError)."""
        path = self.path_for(name)
        keys, _ = read_keys(path)
        fmt = inspect_keys(keys, path.name)
        return LoraInfo(path.stem, path, self._sha(path), path.stat().st_size, fmt.text_encoders,
                        addnet=self._addnet(path), format=fmt.kind, notes=fmt.notes)

    def describe(self) -> list[dict]:
        """{name, sha256, size, text_encoders, format, notes, error} per file (for /list_loras)."""
        out = []
        for name in self.names():
            try:
                i = self.info(name)
                out.append({"name": i.name, "sha256": i.sha256, "size": i.size,
                            "text_encoders": i.text_encoders, "format": i.format, "notes": list(i.notes),
                            "error": None})
            except (LoraError, OSError) as e:
                out.append({"name": name, "sha256": None, "size": None, "text_encoders": None,
                            "format": None, "notes": [], "error": str(e)})
        return out

    def import_file(self, src: str | os.PathLike, name: str | None = None) -> LoraInfo:
        """Copy an uploaded file into the folder (format checked first; an existing file with the
        same name and different content is refused, not overwritten)."""
        src = Path(src)
        if src.suffix.lower() != ".safetensors":
            raise LoraError(f"{src.name}: LoRAs must be .safetensors files (pickled .ckpt/.pt/.bin files "
                            "are refused: loading them can run code).")
        if src.stat().st_size > MAX_LORA_BYTES:
            raise LoraError(f"{src.name} is over {MAX_LORA_BYTES >> 30} GB; that is not a LoRA.")
        name = (name or src.stem).strip()
        if not NAME_RE.match(name):
            raise LoraError(f"{name!r} cannot be a LoRA name: use letters, digits, spaces, '_', '-' or '.' "
                            "(no ':' '<' '>' or slashes — they would break <lora:name:weight> tags).")
        keys, _ = read_keys(src)
        inspect_keys(keys, src.name)
        self.folder.mkdir(parents=True, exist_ok=True)
        dest = self.folder / f"{name}.safetensors"
        if dest.exists():
            if file_sha256(dest) != file_sha256(src):
                raise LoraError(f"A different LoRA named {name!r} is already in the loras folder; rename the file.")
            return self.info(name)
        tmp = self.folder / f".{name}.upload.tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        return self.info(name)


# --- writing a selection down -------------------------------------------------------------------
