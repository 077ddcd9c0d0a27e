"""Content identity: the sha256 of a component's files, cached by (path, size, mtime).

Two variants whose components hash the same share one loaded object; files in the Hugging Face
cache are symlinks to blobs named by their sha256, which is used directly (identifying a 9 GB T5
costs nothing). The same cache also keeps A1111's "addnet" hash of LoRA files
(:meth:`HashCache.addnet_hash`), so every hash the metadata names is computed once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def file_sha256(path) -> str:
    """sha256 of a file's bytes, read in 1 MB chunks (uncached; see HashCache for the cached one)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class HashCache:
    """sha256 of files, cached by (path, size, mtime) in a JSON file under the data dir.

    Files in the Hugging Face cache are symlinks to blobs named by their sha256, which is used
    directly: identifying a 9 GB T5 costs nothing.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._data: dict[str, list] = {}
        if path and path.is_file():
            try:
                self._data = json.loads(path.read_text())
            except (OSError, ValueError):
                self._data = {}

    def file_hash(self, file: Path) -> str:
        """The sha256 of a file: a Hugging Face blob's own name when it is one, else hashed once and
        cached by (path, size, mtime)."""
        real = file.resolve()
        if file.is_symlink() and _HEX64.match(real.name):
            return real.name
        return self._cached(real, str(real), self._digest)

    def addnet_hash(self, file: Path) -> str:
        """A1111's / kohya's "addnet" hash of a .safetensors file: sha256 of the bytes after the
        8-byte header length and the JSON header (the tensor data only), full hex. A1111 writes
        its first 12 digits in ``Lora hashes``; Civitai calls it AutoV3. Cached like
        :meth:`file_hash`, under the key ``addnet:<path>``."""
        real = Path(file).resolve()
        return self._cached(real, "addnet:" + str(real), addnet_digest)

    def _cached(self, real: Path, key: str, compute) -> str:
        st = real.stat()
        with self._lock:
            hit = self._data.get(key)
            if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
                return hit[2]
        digest = compute(real)
        with self._lock:
            self._data[key] = [st.st_size, st.st_mtime_ns, digest]
            if self.path:
                try:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = self.path.with_suffix(".tmp")
                    tmp.write_text(json.dumps(self._data))
                    os.replace(tmp, self.path)
                except OSError:
                    pass  # a read-only data dir only costs re-hashing next time
        return digest

    @staticmethod
    def _digest(path: Path) -> str:
        return file_sha256(path)

    def folder_identity(self, folder: Path, extra: str = "") -> str:
        """A folder's identity: a hash of each file's relative path and sha256 (hidden files skipped,
        ``extra`` mixed in), 32 hex digits."""
        h = hashlib.sha256(extra.encode())
        for f in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            h.update(f.relative_to(folder).as_posix().encode())
            h.update(self.file_hash(f).encode())
        return h.hexdigest()[:32]


def addnet_digest(path: Path) -> str:
    """sha256 of a safetensors file's tensor data (everything after ``8 + header length`` bytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
