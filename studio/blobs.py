"""Images stored by content: inpaint masks, init images and control images.

A generated image's metadata names what it was made from by sha256 (``mask_sha256``,
``init_image_sha256``, ``control_image_sha256`` and each ``controlnets[i].control_image_sha256``),
and the file lives at
``<data-dir>/<kind>/<sha256>.png``: the same mask used for a batch is stored once, and "reuse
parameters" finds an image's inputs from its id (id → owner check → metadata → sha → file).

A sha read from metadata is data: it is looked up only after the owner check, and only as 64 hex
digits in this store's folder (never as a path). A blob is deleted when the last gallery image
that names it is deleted (:meth:`BlobStore.delete`, called by the service).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from studio.files import atomic_write

SHA_RE = re.compile(r"^[0-9a-f]{64}$")
KINDS = {"mask": "masks", "init": "inits", "control": "controls"}  # kind → folder under the data dir
META_KEYS = {"mask": "mask_sha256", "init": "init_image_sha256", "control": "control_image_sha256"}


def image_sha256(image) -> str:
    """The content hash of a PIL image: of its mode, size and pixel bytes (not of a PNG file)."""
    h = hashlib.sha256(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


class BlobStore:
    """PNG images by content hash under one folder (written atomically, once)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def path(self, sha) -> Path | None:
        """The file of ``sha`` when it is a well-formed hash and stored, else None."""
        if not isinstance(sha, str) or not SHA_RE.match(sha):
            return None
        p = self.folder / f"{sha}.png"
        return p if p.is_file() else None

    def put(self, image) -> str:
        """Store ``image`` (once) and return its sha256."""
        sha = image_sha256(image)
        if self.path(sha) is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(self.folder / f"{sha}.png", lambda f: image.save(f, format="PNG"))
        return sha

    def get(self, sha):
        """The stored image (a loaded PIL copy), or None."""
        from PIL import Image

        p = self.path(sha)
        if p is None:
            return None
        with Image.open(p) as im:
            im.load()
            return im.copy()

    def delete(self, sha) -> bool:
        """Remove the file of ``sha``; whether one was removed."""
        p = self.path(sha)
        if p is None:
            return False
        try:
            p.unlink()
            return True
        except OSError:
            return False


class Blobs:
    """The three stores of one data dir: ``masks``, ``inits`` and ``controls``."""

    def __init__(self, data_dir: str | os.PathLike):
        root = Path(data_dir)
        self.masks = BlobStore(root / KINDS["mask"])
        self.inits = BlobStore(root / KINDS["init"])
        self.controls = BlobStore(root / KINDS["control"])

    def store(self, kind: str) -> BlobStore:
        """The store of ``kind`` ("mask", "init" or "control")."""
        return {"mask": self.masks, "init": self.inits, "control": self.controls}[kind]

    def folders(self) -> list[Path]:
        """The three stores' folders."""
        return [self.masks.folder, self.inits.folder, self.controls.folder]

    def referenced(self, meta: dict) -> dict[str, str]:
        """{kind: sha} of the blobs an image's metadata names (well-formed hashes only; of several
        control images, the first — :meth:`references` lists them all)."""
        out = {}
        for kind, sha in self.references(meta):
            out.setdefault(kind, sha)
        return out

    def references(self, meta: dict) -> list[tuple[str, str]]:
        """Every (kind, sha) an image's metadata names, in order: the mask, the init image, and
        one control image per ControlNet (``controlnets[i].control_image_sha256``)."""
        meta = meta if isinstance(meta, dict) else {}
        out: list[tuple[str, str]] = []
        for kind, key in META_KEYS.items():
            sha = meta.get(key)
            if isinstance(sha, str) and SHA_RE.match(sha):
                out.append((kind, sha))
        units = meta.get("controlnets")
        for unit in units if isinstance(units, list) else ():
            sha = unit.get("control_image_sha256") if isinstance(unit, dict) else None
            if isinstance(sha, str) and SHA_RE.match(sha) and ("control", sha) not in out:
                out.append(("control", sha))
        return out
