"""LoRA files: where they live, what format they are in, and how a selection is written down.

LoRAs are ``.safetensors`` files in ``<data-dir>/loras/`` (``StudioConfig.loras_dir``); a LoRA's
*name* is its file name without the suffix. Uploads are copied into that folder. Only the
diffusers / PEFT key layout loads (``transformer.…lora_A.weight`` / ``lora_B``, optionally
``text_encoder.…`` / ``text_encoder_2.…``) — the format ``StableDiffusion3Pipeline.save_lora_weights``
writes and most SD3 LoRAs on the Hub use. Other layouts are recognised from their keys *before*
loading and refused with a message: diffusers 0.42 does not convert kohya-style SD3 keys
(``lora_unet_…``, ``lora_te1_…``) — it logs a warning and loads nothing, so the image would
silently be the base model's.

This module reads only safetensors headers (never tensors) and knows nothing of torch or
diffusers; ``ModelManager.activate_loras`` does the loading.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

MAX_LORAS = 8  # per request
MAX_WEIGHT = 4.0
MAX_LORA_BYTES = 4 << 30
MAX_HEADER_BYTES = 64 << 20
NAME_RE = re.compile(r"^[\w][\w.\- ]{0,99}$")  # no ':' '<' '>' (infotext tags) nor path separators
TAG_RE = re.compile(r"<lora:([^:<>\n]+):([^:<>\n]+)>")
DIFFUSERS_PREFIXES = ("transformer.", "text_encoder.", "text_encoder_2.")


class LoraError(ValueError):
    """A LoRA that cannot be used. The message says why and what to do."""


@dataclass(frozen=True)
class LoraInfo:
    name: str
    path: Path
    sha256: str
    size: int
    text_encoders: bool  # the file also changes CLIP-L / CLIP-G (prompt embeddings differ)

    @property
    def adapter_name(self) -> str:
        """The PEFT adapter name: the file name plus its content hash, so a replaced file with the
        same name is a new adapter."""
        return re.sub(r"\W", "_", self.name)[:40] + "_" + self.sha256[:12]

    def as_meta(self, weight: float) -> dict:
        return {"name": self.name, "sha256": self.sha256, "weight": float(weight)}


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


def check_format(keys: list[str], filename: str = "the file") -> bool:
    """Raise LoraError unless the keys are the diffusers/PEFT SD3 layout; returns whether the
    LoRA also touches the text encoders."""
    if not keys:
        raise LoraError(f"{filename} holds no tensors; it is not a LoRA.")
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")) for k in keys):
        raise LoraError(
            f"Unsupported LoRA format: {filename} uses kohya/A1111-style keys (lora_unet_…, lora_te…). "
            "diffusers 0.42 does not convert these for SD3 (it would load nothing and the image "
            "would be the base model's). Use the diffusers/PEFT version of the LoRA (keys like "
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight), or convert it first."
        )
    if any(k.startswith(("diffusion_model.", "model.diffusion_model.", "base_model.model.")) for k in keys):
        raise LoraError(
            f"Unsupported LoRA format: {filename} uses ComfyUI/raw-PEFT keys (diffusion_model.… or "
            "base_model.model.…). The studio loads the diffusers/PEFT layout written by "
            "StableDiffusion3Pipeline.save_lora_weights (transformer.….lora_A.weight)."
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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class LoraLibrary:
    """The LoRA folder: list, inspect, import. ``hashes`` (models.HashCache) avoids re-hashing."""

    def __init__(self, folder: Path, hashes=None):
        self.folder = Path(folder)
        self.hashes = hashes

    def _sha(self, path: Path) -> str:
        return self.hashes.file_hash(path) if self.hashes is not None else file_sha256(path)

    def names(self) -> list[str]:
        """Every loadable-looking LoRA file name in the folder (sorted, case-insensitively)."""
        if not self.folder.is_dir():
            return []
        return sorted((p.stem for p in self.folder.glob("*.safetensors")
                       if p.is_file() and NAME_RE.match(p.stem)), key=str.lower)

    def path_for(self, name: str) -> Path:
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
        te = check_format(keys, path.name)
        return LoraInfo(path.stem, path, self._sha(path), path.stat().st_size, te)

    def describe(self) -> list[dict]:
        """{name, sha256, size, text_encoders, error} per file (for /list_loras)."""
        out = []
        for name in self.names():
            try:
                i = self.info(name)
                out.append({"name": i.name, "sha256": i.sha256, "size": i.size,
                            "text_encoders": i.text_encoders, "error": None})
            except (LoraError, OSError) as e:
                out.append({"name": name, "sha256": None, "size": None, "text_encoders": None,
                            "error": str(e)})
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
        check_format(keys, src.name)
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


def format_weight(weight) -> str:
    return f"{float(weight):g}"


def tags(loras) -> str:
    """``<lora:name:weight>`` tags for metadata ``loras`` entries (A1111's prompt convention)."""
    return " ".join(f"<lora:{d['name']}:{format_weight(d['weight'])}>" for d in loras or ()
                    if isinstance(d, dict) and d.get("name"))


def split_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """A prompt with ``<lora:name:weight>`` tags → (the prompt without them, [(name, weight)]).

    Tags with an unreadable weight are left in the prompt."""
    found: list[tuple[str, float]] = []

    def take(m):
        try:
            found.append((m.group(1).strip(), float(m.group(2))))
        except ValueError:
            return m.group(0)
        return ""

    text = TAG_RE.sub(take, prompt or "")
    if found:
        text = re.sub(r"[ \t]+,", ",", re.sub(r"[ \t]{2,}", " ", text))
        text = re.sub(r"^[ \t]*,[ \t]*|[ \t]*,?[ \t]*$", "", text, flags=re.M).strip()
    return text, found


def parse_selection(spec) -> list[tuple[str, object]]:
    """The API's ``loras`` text (``name:0.8, other`` or ``<lora:name:0.8>``; weight 1 when left
    out) or a list of pairs/dicts → [(name, weight)]. Weights that are not numbers are passed on
    as they are, for the engine to refuse."""
    if spec is None or spec == "":
        return []
    if isinstance(spec, (list, tuple)):
        out = []
        for item in spec:
            if isinstance(item, dict):
                out.append((item.get("name"), item.get("weight", 1.0)))
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                out.append((item[0], item[1]))
            else:
                out.append((item, 1.0))
        return out
    text = str(spec)
    _, tagged = split_tags(text)
    if tagged:
        return list(tagged)
    out = []
    for part in re.split(r"[,\n]", text):
        part = part.strip()
        if not part:
            continue
        name, sep, weight = part.rpartition(":")
        if not sep:
            name, weight = part, "1"
        try:
            w: object = float(weight)
        except ValueError:
            w = weight.strip()
        out.append((name.strip(), w))
    return out


def selection_from_fields(fields: dict) -> tuple[str, list[tuple[str, float]]]:
    """"Reuse parameters": (prompt, [(name, weight)]) from studio fields — the JSON metadata's
    ``loras`` when present, else the ``<lora:name:weight>`` tags of an infotext prompt (ours or
    A1111's), which are taken out of the prompt."""
    prompt = str(fields.get("prompt") or "")
    loras = fields.get("loras")
    if isinstance(loras, list) and loras:
        out = []
        for d in loras:
            if isinstance(d, dict) and isinstance(d.get("name"), str):
                try:
                    out.append((os.path.splitext(d["name"])[0] if d["name"].endswith(".safetensors")
                                else d["name"], float(d.get("weight", 1.0))))
                except (TypeError, ValueError):
                    continue
        return prompt, out
    return split_tags(prompt)
