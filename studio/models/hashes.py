"""The hashes other tools link images by: A1111's model hash and LoRA ("addnet") hash.

What the infotext carries, so that A1111, Forge and Civitai find the model and LoRAs an image
was made with:

``Model: <name>``
    a single file's stem (``sd3.5_large_fp8_scaled``), a diffusers folder's name, the last part
    of a Hub repo id that is not in the catalog (a fine-tune), and the catalog variant id
    (``sd3.5-large``) for the catalog's own Hub repos — as the studio always wrote them.

``Model hash: <10 hex digits>``
    *single file* (``.safetensors`` or ``.gguf``): the first 10 hex digits of the sha256 of the
    whole file — A1111's ``shorthash``, Civitai's "AutoV2".

    *diffusers folder or Hub repo*: the first 10 hex digits of the sha256 of the text that
    ``sha256sum`` prints for the transformer's weight files, in file-name order::

        cd <folder>/transformer && LC_ALL=C sha256sum *.safetensors | sha256sum | cut -c1-10

    i.e. one line ``<sha256 of the file>  <file name>\\n`` per ``*.safetensors`` file of the
    ``transformer/`` subfolder, sorted by name. Only the transformer's weights count (the
    part that tells fine-tunes apart); a resharded copy of the same weights hashes differently.

``Lora hashes: "name: <12 hex digits>, ..."``
    A1111's "addnet" hash (``modules/hashes.py: addnet_hash_safetensors``, from kohya's
    sd-scripts; Civitai's "AutoV3"): the sha256 of the file's bytes after the 8-byte header
    length and the JSON header — the tensor data only, so editing a LoRA's metadata keeps it —
    first 12 hex digits.

Every hash goes through the model manager's :class:`~studio.models.identity.HashCache`, so each
file is read once (Hub blobs, named by their sha256, cost nothing).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from studio.catalog import VARIANTS

MODEL_HASH_LEN = 10  # A1111's shorthash of a checkpoint
LORA_HASH_LEN = 12  # A1111's shorthash of a LoRA ("Lora hashes")


def model_name(source, variant: str | None = None) -> str:
    """The ``Model:`` name of a source (``ModelSource``: kind "hub" | "folder" | "file", ref)."""
    kind, ref = source.kind, str(source.ref)
    if kind == "file":
        return Path(ref).stem
    if kind == "folder":
        return Path(ref).name
    if variant in VARIANTS and VARIANTS[variant].repo_id == ref:
        return variant
    for vid, v in VARIANTS.items():
        if v.repo_id == ref:
            return vid
    return ref.rstrip("/").split("/")[-1]


def transformer_folder_hash(transformer_dir: Path, hashes) -> str | None:
    """sha256 (full hex) of ``sha256sum``'s output for ``transformer_dir/*.safetensors`` (see the
    module docstring); None when the folder holds no safetensors files."""
    files = sorted((p for p in Path(transformer_dir).glob("*.safetensors") if p.is_file()), key=lambda p: p.name)
    if not files:
        return None
    text = "".join(f"{hashes.file_hash(p)}  {p.name}\n" for p in files)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _hub_folder(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "model_index.json")
    except Exception:  # noqa: BLE001 — a broken cache only costs the hash
        return None
    return Path(found).parent if isinstance(found, str) else None


def model_hash(source, hashes, folder: Path | None = None) -> str | None:
    """A1111's ``Model hash`` (10 hex digits) of a source, or None when its files are not found.

    ``folder``: the diffusers folder the model was loaded from, when the caller knows it (a Hub
    repo's snapshot); otherwise a folder source's own path, or the Hub cache's snapshot."""
    kind, ref = source.kind, str(source.ref)
    if kind == "file":
        path = Path(ref)
        return hashes.file_hash(path)[:MODEL_HASH_LEN] if path.is_file() else None
    if folder is None:
        folder = Path(ref) if kind == "folder" else _hub_folder(ref)
    if folder is None:
        return None
    digest = transformer_folder_hash(Path(folder) / "transformer", hashes)
    return digest[:MODEL_HASH_LEN] if digest else None


def loaded_model_identity(loaded, hashes) -> tuple[str, str | None]:
    """(``Model:`` name, ``Model hash``) of a ``LoadedModel``."""
    src = loaded.source
    name = model_name(src, getattr(loaded.variant, "name", None))
    folder = None
    if src.kind == "hub":
        folder = _hub_folder(str(src.ref))
        if folder is None:  # the transformer remembers the folder it was read from
            where = getattr(getattr(getattr(loaded.pipe, "transformer", None), "config", None), "_name_or_path", None)
            folder = Path(str(where)) if where and Path(str(where)).is_dir() else None
    try:
        return name, model_hash(src, hashes, folder)
    except OSError:  # a file moved since it was loaded: the image still gets its name
        return name, None


def lora_hash(path: Path, hashes) -> str:
    """A1111's ``Lora hashes`` value for a LoRA file (addnet hash, first 12 hex digits)."""
    return hashes.addnet_hash(Path(path))[:LORA_HASH_LEN]
