"""File-system helpers shared by the PNG writer, the gallery and the mask store."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, fsync: bool = False) -> Path:
    """Write ``path`` through a hidden temporary sibling (``.<name>.<random>.tmp``), then rename
    it into place: readers see the old file or the complete new one, never half of it.

    The temporary file is removed on any failure; a crash can still leave one behind, which
    ``Gallery.reconcile`` cleans up. ``fsync`` flushes the data to disk before the rename.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    try:
        with open(tmp, "xb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    return path
