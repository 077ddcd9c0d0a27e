"""Generation metadata in and out of PNG files.

Every image the studio writes carries two text chunks:

* ``parameters`` — A1111-style infotext (``studio.metadata.infotext``), the format other UIs
  (A1111, Forge, SD.Next, civitai, image browsers) already read;
* ``sd35studio`` — the full metadata dict as JSON. When present it is authoritative: it holds
  every field exactly, where infotext is lossy text.

Reading goes the other way and also understands foreign files: A1111/Forge/SD.Next
(``parameters``), ComfyUI (``prompt`` / ``workflow`` graphs) and InvokeAI
(``invokeai_metadata``), see ``studio.metadata.foreign``. Whatever could be recovered comes back
as studio field names. They are data, as found: whoever *uses* them ("reuse parameters", an API
call) takes them through ``studio.metadata.schema.request_fields``, which keeps only declared
fields of their declared types — no path, id or permission can ride in on one.

Reading never decodes pixels and never raises on bad input: PNG chunks are walked directly with
size limits (a hostile file cannot make us inflate a huge text chunk or allocate a huge image),
and problems come back as ``PngInfo.error``.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image
from PIL.PngImagePlugin import PngInfo as _PilPngInfo

from studio.files import atomic_write
from studio.metadata.foreign import comfyui_fields, invokeai_fields, invokeai_legacy_fields
from studio.metadata.infotext import fields_from_infotext, to_infotext

STUDIO_CHUNK = "sd35studio"  # full metadata JSON
PARAMETERS_CHUNK = "parameters"  # A1111 infotext

# Reading limits: foreign files can be hostile.
MAX_TEXT_CHUNK_BYTES = 8 * 1024 * 1024  # one text chunk, compressed or not, and once inflated
MAX_TOTAL_TEXT_BYTES = 32 * 1024 * 1024  # all text chunks of one file together
MAX_CHUNKS = 10_000  # chunks walked before giving up (a file of millions of empty chunks)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_png(image: Image.Image, meta: dict, path: str | os.PathLike) -> Path:
    """Write ``image`` as a PNG at ``path`` with infotext + full JSON metadata, atomically.

    The file is written to a hidden temp file in the same folder, fsynced, then renamed over
    ``path``: readers see the old file or the complete new one, never half a PNG. A crash can
    leave a ``.<name>.<random>.tmp`` file behind; ``Gallery.reconcile`` removes those.
    """
    path = Path(path)
    info = _PilPngInfo()
    info.add_text(PARAMETERS_CHUNK, to_infotext(meta))  # iTXt automatically when not latin-1
    info.add_text(STUDIO_CHUNK, json.dumps(meta, ensure_ascii=False, default=str), zip=True)
    atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info), fsync=True)
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not supported on every platform / file system
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass
class PngInfo:
    """What :func:`read_png_info` recovered from an image.

    ``fields`` uses studio field names (whatever could be recovered), ``raw`` holds the text
    chunks as found, ``source`` says which app wrote them, ``infotext`` is A1111 text for
    display/copy (the file's own ``parameters``, or generated from ``fields``), and ``error``
    explains what could not be read (partial results may still be in ``fields``).
    """

    fields: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, str] = field(default_factory=dict)
    source: str = "none"  # "studio" | "a1111" | "comfyui" | "invokeai" | "none"
    infotext: str = ""
    error: str | None = None
    width: int | None = None
    height: int | None = None

    @property
    def ok(self) -> bool:
        """Whether everything could be read (no ``error``)."""
        return self.error is None


class _MetadataError(Exception):
    pass


def _human(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _inflate(data: bytes, limit: int, key: str) -> bytes:
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as e:
        raise _MetadataError(f"text chunk {key!r} is not valid compressed data ({e})") from None
    if len(out) > limit or d.unconsumed_tail:
        raise _MetadataError(
            f"text chunk {key!r} inflates past the {_human(limit)} limit (decompression bomb?)"
        )
    return out


def _decode_text_chunk(ctype: bytes, data: bytes, limit: int) -> tuple[str, str]:
    key_end = data.find(b"\0")
    if key_end < 1 or key_end > 79:
        raise _MetadataError(f"a {ctype.decode()} chunk has no valid keyword")
    key = data[:key_end].decode("latin-1")
    rest = data[key_end + 1 :]
    if ctype == b"tEXt":
        return key, rest.decode("latin-1")
    if ctype == b"zTXt":
        if not rest or rest[0] != 0:
            raise _MetadataError(f"text chunk {key!r} uses an unknown compression method")
        return key, _inflate(rest[1:], limit, key).decode("latin-1")
    # iTXt: flag, method, language\0, translated keyword\0, text (UTF-8)
    if len(rest) < 2:
        raise _MetadataError(f"text chunk {key!r} is truncated")
    compressed, method = rest[0], rest[1]
    lang_end = rest.find(b"\0", 2)
    tkey_end = rest.find(b"\0", lang_end + 1) if lang_end >= 0 else -1
    if tkey_end < 0:
        raise _MetadataError(f"text chunk {key!r} is truncated")
    payload = rest[tkey_end + 1 :]
    if compressed:
        if method != 0:
            raise _MetadataError(f"text chunk {key!r} uses an unknown compression method")
        payload = _inflate(payload, limit, key)
    try:
        return key, payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _MetadataError(f"text chunk {key!r} is not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _walk_png(f: BinaryIO, limit: int, total_limit: int) -> tuple[dict[str, str], tuple[int, int] | None, list[str]]:
    """Text chunks and size of a PNG, reading nothing but chunk headers and text chunks."""
    if f.read(8) != _PNG_SIGNATURE:
        raise _MetadataError("this is not a PNG file")
    texts: dict[str, str] = {}
    problems: list[str] = []
    size = None
    total = 0
    for _ in range(MAX_CHUNKS):
        header = f.read(8)
        if len(header) < 8:
            problems.append("the file is truncated (it ends before the PNG end marker)")
            return texts, size, problems
        length, ctype = struct.unpack(">I4s", header)
        if ctype == b"IEND":
            return texts, size, problems
        if ctype == b"IHDR" and length == 13:
            data = f.read(13 + 4)
            if len(data) < 17:
                problems.append("the file is truncated (in its header)")
                return texts, size, problems
            size = struct.unpack(">II", data[:8])
            continue
        if ctype in (b"tEXt", b"zTXt", b"iTXt"):
            if length > limit:
                problems.append(f"a {ctype.decode()} chunk of {_human(length)} is over the "
                                f"{_human(limit)} limit; it was skipped")
                f.seek(length + 4, io.SEEK_CUR)
                continue
            total += length
            if total > total_limit:
                problems.append(f"text chunks exceed {_human(total_limit)} in all; the rest were skipped")
                f.seek(length + 4, io.SEEK_CUR)
                continue
            data = f.read(length)
            crc = f.read(4)
            if len(data) < length or len(crc) < 4:
                problems.append("the file is truncated (in a text chunk)")
                return texts, size, problems
            if zlib.crc32(ctype + data) != struct.unpack(">I", crc)[0]:
                problems.append(f"a {ctype.decode()} chunk is damaged (bad checksum); it was skipped")
                continue
            try:
                key, text = _decode_text_chunk(ctype, data, limit)
            except _MetadataError as e:
                problems.append(str(e))
                continue
            texts.setdefault(key, text)
            continue
        f.seek(length + 4, io.SEEK_CUR)  # pixels and other chunks are never read
    problems.append(f"more than {MAX_CHUNKS} chunks; the rest were not read")
    return texts, size, problems


def _texts_from_pil(image: Image.Image, limit: int) -> tuple[dict[str, str], list[str]]:
    texts: dict[str, str] = {}
    problems: list[str] = []
    for key, value in (getattr(image, "info", None) or {}).items():
        if isinstance(value, bytes):
            continue
        if isinstance(value, str):
            if len(value) > limit:
                problems.append(f"text chunk {key!r} is over the {_human(limit)} limit; it was skipped")
                continue
            texts[str(key)] = value
    return texts, problems


def read_png_info(
    src: str | os.PathLike | bytes | bytearray | Image.Image,
    *,
    max_text_bytes: int = MAX_TEXT_CHUNK_BYTES,
    max_total_bytes: int = MAX_TOTAL_TEXT_BYTES,
) -> PngInfo:
    """Recover generation metadata from a PNG (path, bytes or PIL image). Never raises.

    The studio's JSON chunk wins; then A1111-style ``parameters``; then InvokeAI; then ComfyUI.
    Pixels are never decoded.
    """
    info = PngInfo()
    problems: list[str] = []
    try:
        if isinstance(src, Image.Image):
            info.width, info.height = src.size
            texts, problems = _texts_from_pil(src, max_text_bytes)
        else:
            if isinstance(src, (bytes, bytearray, memoryview)):
                f: BinaryIO = io.BytesIO(bytes(src))
            else:
                try:
                    f = open(src, "rb")
                except OSError as e:
                    info.error = f"could not read {os.path.basename(os.fspath(src))}: {e.strerror or type(e).__name__}"
                    return info
            with f:
                texts, size, problems = _walk_png(f, max_text_bytes, max_total_bytes)
            if size:
                info.width, info.height = size
        info.raw = texts
        _interpret(info, texts, problems)
    except _MetadataError as e:
        problems.append(str(e))
    except Exception as e:  # noqa: BLE001 — a reader of untrusted files must not raise
        problems.append(f"unexpected {type(e).__name__}: {e}")
    if problems:
        info.error = "could not read all metadata: " + "; ".join(dict.fromkeys(problems))
    return info


def _interpret(info: PngInfo, texts: dict[str, str], problems: list[str]) -> None:
    if STUDIO_CHUNK in texts:
        info.source = "studio"
        try:
            meta = json.loads(texts[STUDIO_CHUNK])
            if not isinstance(meta, dict):
                raise ValueError("it is not a JSON object")
            info.fields = meta
            info.infotext = texts.get(PARAMETERS_CHUNK) or to_infotext(meta)
            return
        except (ValueError, RecursionError) as e:
            problems.append(f"the {STUDIO_CHUNK} chunk is not valid JSON ({e}); "
                            "falling back to the infotext")
    if PARAMETERS_CHUNK in texts:
        info.source = info.source if info.source == "studio" else "a1111"
        info.infotext = texts[PARAMETERS_CHUNK]
        info.fields = fields_from_infotext(info.infotext)
        return
    for key, reader, source in (
        ("invokeai_metadata", invokeai_fields, "invokeai"),
        ("sd-metadata", invokeai_legacy_fields, "invokeai"),
        ("prompt", None, "comfyui"),
        ("workflow", None, "comfyui"),
    ):
        if key not in texts:
            continue
        try:
            if source == "comfyui":
                fields = comfyui_fields(texts.get("prompt"), texts.get("workflow"))
            else:
                data = json.loads(texts[key])
                if not isinstance(data, dict):
                    raise ValueError("it is not a JSON object")
                fields = reader(data)
        except (ValueError, RecursionError, TypeError, KeyError, AttributeError) as e:
            problems.append(f"the {key!r} chunk could not be understood ({type(e).__name__}: {e})")
            continue
        info.source = source
        info.fields = fields
        info.infotext = to_infotext(fields) if fields else ""
        return


