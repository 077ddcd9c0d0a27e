"""Generation metadata in and out of PNG files.

Every image the studio writes carries two text chunks:

* ``parameters`` — A1111-style "infotext", the format other UIs (A1111, Forge, SD.Next,
  civitai, image browsers) already read::

      a cat in a hat
      Negative prompt: blurry
      Steps: 28, Sampler: Euler, Scheduler: FlowMatchEulerDiscreteScheduler, CFG scale: 3.5, ...

* ``sd35studio`` — the full metadata dict as JSON. When present it is authoritative: it holds
  every field exactly (types, unknown extra keys), where infotext is lossy text.

Reading goes the other way and also understands foreign files: A1111/Forge/SD.Next
(``parameters``), ComfyUI (``prompt`` / ``workflow`` graphs) and InvokeAI
(``invokeai_metadata``). Whatever could be recovered comes back as studio field names, so the
"PNG info" tab and "reuse parameters" are one code path.

The A1111 key <-> studio field mapping lives in ONE place: :data:`PARAMS`. ``to_infotext``
writes through it and ``infotext_to_fields`` reads through it.

Reading never decodes pixels and never raises on bad input: PNG chunks are walked directly with
size limits (a hostile file cannot make us inflate a huge text chunk or allocate a huge image),
and problems come back as ``PngInfo.error``.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image
from PIL.PngImagePlugin import PngInfo as _PilPngInfo

from studio.catalog import VARIANTS
from studio.files import atomic_write

STUDIO_CHUNK = "sd35studio"  # full metadata JSON
PARAMETERS_CHUNK = "parameters"  # A1111 infotext
APP_NAME = "SD3.5 Studio"

# Limits for reading metadata from untrusted files.
MAX_TEXT_CHUNK_BYTES = 8 * 1024 * 1024  # one text chunk, compressed or not, and once inflated
MAX_TOTAL_TEXT_BYTES = 32 * 1024 * 1024  # all text chunks of one file together
MAX_CHUNKS = 10_000  # chunks walked before giving up (a file of millions of empty chunks)
MAX_PARAM_LINE = 256 * 1024  # longer "last lines" are treated as prompt text, not parameters

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# A1111 infotext: quoting and parsing
# --------------------------------------------------------------------------------------------

_KEY_CHARS = re.compile(r"[\w \-/]+")
_WORD_CHAR = re.compile(r"\w")


def quote(value: str) -> str:
    """Quote a parameter value the A1111 way (``json.dumps``) when it would not survive raw.

    A1111 quotes values containing ``,``, ``:`` or a newline. We also quote values that start
    with a double quote or carry leading/trailing whitespace (a parser would strip or unquote
    them), and values with a carriage return.
    """
    if value and (
        any(c in value for c in ",:\n\r")
        or value[0] == '"'
        or value != value.strip()
    ):
        return json.dumps(value, ensure_ascii=False)
    return value


def unquote(value: str) -> str:
    """A1111's ``unquote``: JSON-decode ``"..."`` values; anything else is returned as is."""
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        decoded = json.loads(value)
    except (ValueError, RecursionError):
        return value
    return decoded if isinstance(decoded, str) else value


def parse_param_line(line: str) -> list[tuple[str, str]]:
    """The ``(key, value)`` pairs of an infotext parameter line, values still quoted.

    Same result as A1111's ``re.findall(r'\\s*(\\w[\\w \\-/]+):\\s*("(?:\\\\.|[^\\\\"])+"|[^,]*)(?:,|$)',
    line)``, but in linear time: that regex backtracks quadratically on a long line without
    colons, which a hostile file could use to hang the reader.
    """
    pairs: list[tuple[str, str]] = []
    n = len(line)
    pos = 0
    while pos < n:
        start = pos
        while start < n and line[start].isspace():
            start += 1
        if start >= n:
            break
        if not _WORD_CHAR.match(line, start):
            pos = start + 1
            continue
        # key = \w[\w \-/]+ : at least two characters, the first a word character, then ':'
        m = _KEY_CHARS.match(line, start)
        if m.end() - start < 2 or m.end() >= n or line[m.end()] != ":":
            # Every start inside this run of key characters fails the same way: skip the run.
            pos = m.end()
            continue
        key = line[start : m.end()]
        v = m.end() + 1
        while v < n and line[v].isspace():
            v += 1
        value, end = None, v
        if v < n and line[v] == '"':  # "(?:\\.|[^\\"])+" followed by , or end
            i = v + 1
            while i < n and line[i] != '"':
                if line[i] == "\\":
                    if i + 1 >= n or line[i + 1] == "\n":
                        break
                    i += 2
                else:
                    i += 1
            if i < n and line[i] == '"' and i > v + 1 and (i + 1 == n or line[i + 1] == ","):
                value, end = line[v : i + 1], i + 1
        if value is None:  # [^,]*
            comma = line.find(",", v)
            end = n if comma < 0 else comma
            value = line[v:end]
        pairs.append((key, value))
        pos = end + 1 if end < n else n  # consume the comma
    return pairs


def parse_infotext(text: str) -> dict[str, str]:
    """Parse A1111 infotext into raw A1111 keys (like A1111's ``parse_generation_parameters``).

    Returns ``{"Prompt": ..., "Negative prompt": ..., "Steps": "28", "Size": "1024x1024", ...}``
    with quoted values unquoted. The last line counts as parameters only when it holds at least
    three ``key: value`` pairs; otherwise it is part of the prompt. Lines are stripped, as A1111
    does.
    """
    text = text.replace("\r\n", "\n").strip()
    *lines, last = text.split("\n") if text else [""]
    pairs: list[tuple[str, str]] = []
    if len(last) <= MAX_PARAM_LINE:
        pairs = parse_param_line(last)
    if len(pairs) < 3:
        lines.append(last)
        pairs = []
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    result = {"Prompt": _join_lines(prompt), "Negative prompt": _join_lines(negative)}
    for key, value in pairs:
        result[key] = unquote(value)
    return result


def _join_lines(lines: list[str]) -> str:
    # A1111 joins with "\n" but never starts with an empty line.
    while lines and lines[0] == "":
        lines.pop(0)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The registry: A1111 key <-> studio field
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One infotext key and the studio field(s) it carries.

    ``write(meta)`` returns the value text, or None to leave the key out. ``read(text)`` returns
    ``{field: value}`` (dotted names such as ``slg.scale`` are nested), and raises ``ValueError``
    on malformed text.
    """

    key: str
    fields: tuple[str, ...]
    write: Callable[[dict], str | None]
    read: Callable[[str], dict[str, Any]]
    aliases: tuple[str, ...] = ()


def _get(meta: dict, dotted: str) -> Any:
    value: Any = meta
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _fmt_float(value: Any) -> str:
    value = float(value)
    return str(int(value)) + ".0" if value.is_integer() and abs(value) < 1e16 else repr(value)


def _to_int(text: str) -> int:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        as_float = float(text)  # "28.0" -> 28; "abc" raises ValueError
        if not as_float.is_integer():
            raise
        return int(as_float)


def _to_float(text: str) -> float:
    return float(text.strip())


def _to_str(text: str) -> str:
    return text  # as A1111: a value is what the parser found (quoted values keep their spaces)


_CONVERT: dict[type, tuple[Callable[[Any], str], Callable[[str], Any]]] = {
    int: (lambda v: str(int(v)), _to_int),
    float: (_fmt_float, _to_float),
    str: (str, _to_str),
}


def _simple(key: str, field_name: str, kind: type, *, aliases=(), when=None) -> Param:
    fmt, parse = _CONVERT[kind]

    def write(meta: dict) -> str | None:
        value = _get(meta, field_name)
        if value is None or value == "" or isinstance(value, (dict, list)):
            return None
        if when is not None and not when(value, meta):
            return None
        return fmt(value)

    return Param(key, (field_name,), write, lambda text: {field_name: parse(text)}, aliases)


def _write_size(meta: dict) -> str | None:
    w, h = meta.get("width"), meta.get("height")
    if w is None or h is None:
        return None
    return f"{int(w)}x{int(h)}"


def _read_size(text: str) -> dict[str, Any]:
    m = re.fullmatch(r"\s*(\d+)\s*[x×]\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"size {text!r} is not WIDTHxHEIGHT")
    return {"width": int(m.group(1)), "height": int(m.group(2))}


def _norm_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def guess_variant(name: str | None) -> str | None:
    """The catalog variant a checkpoint/model name refers to, or None.

    ``"sd3.5_large_turbo.safetensors"`` -> ``"sd3.5-large-turbo"``; matching ignores case and
    punctuation, and the longest catalog id contained in the name wins.
    """
    if not name:
        return None
    if name in VARIANTS:
        return name
    stem = os.path.basename(str(name).replace("\\", "/"))
    stem = re.sub(r"\.(safetensors|ckpt|pt|pth|bin|gguf|sft)$", "", stem, flags=re.I)
    norm = _norm_name(stem)
    best = None
    for vid, variant in VARIANTS.items():
        for candidate in (vid, variant.label, variant.single_file.rsplit(".", 1)[0],
                          variant.repo_id.split("/")[-1]):
            c = _norm_name(candidate)
            if c and c in norm and (best is None or len(c) > best[0]):
                best = (len(c), vid)
    return best[1] if best else None


def _write_model(meta: dict) -> str | None:
    return meta.get("variant") or meta.get("model") or None


def _read_model(text: str) -> dict[str, Any]:
    text = text.strip()
    if text in VARIANTS:
        return {"variant": text}
    guess = guess_variant(text)
    return {"variant": guess, "model": text} if guess else {"model": text}


def _write_layers(meta: dict) -> str | None:
    layers = _get(meta, "slg.layers")
    if not isinstance(meta.get("slg"), dict) or not layers:
        return None
    return json.dumps([int(x) for x in layers])


def _read_layers(text: str) -> dict[str, Any]:
    nums = re.findall(r"-?\d+", text)
    if not nums or re.search(r"[^\d\s,\[\]\-]", text):
        raise ValueError(f"SLG layers {text!r} are not a list of integers")
    return {"slg.layers": [int(n) for n in nums]}


def _write_version(meta: dict) -> str | None:
    v = meta.get("studio_version")
    return f"{APP_NAME} {v}" if v else None


def _read_version(text: str) -> dict[str, Any]:
    m = re.fullmatch(r"\s*SD3\.5 Studio v?(\S+)\s*", text)
    return {"studio_version": m.group(1)} if m else {}  # another app's version stays in extras


def _slg_on(_value: Any, meta: dict) -> bool:
    return isinstance(meta.get("slg"), dict)


def _write_area(meta: dict) -> str | None:
    if meta.get("mode") != "inpaint" or meta.get("only_masked") is None:
        return None
    return "Only masked" if meta.get("only_masked") else "Whole picture"


def _read_area(text: str) -> dict[str, Any]:
    t = text.strip().lower()
    if t not in ("only masked", "whole picture"):
        raise ValueError(f"inpaint area {text!r}")
    return {"only_masked": t == "only masked"}


#: THE mapping between infotext keys and studio fields, in the order keys are written.
PARAMS: tuple[Param, ...] = (
    _simple("Steps", "steps", int),
    _simple("Sampler", "sampler", str),
    _simple("Scheduler", "scheduler", str, aliases=("Schedule type",)),
    _simple("CFG scale", "guidance", float),
    _simple("Seed", "seed", int),
    Param("Size", ("width", "height"), _write_size, _read_size),
    Param("Model", ("variant",), _write_model, _read_model),
    _simple("Denoising strength", "strength", float),
    _simple("Shift", "shift", float),
    Param("SLG layers", ("slg.layers",), _write_layers, _read_layers),
    _simple("SLG scale", "slg.scale", float, when=_slg_on),
    _simple("SLG start", "slg.start", float, when=_slg_on),
    _simple("SLG stop", "slg.stop", float, when=_slg_on),
    _simple("Max sequence length", "max_sequence_length", int),
    _simple("Batch size", "batch_size", int, when=lambda v, _m: int(v) > 1),
    Param("Version", ("studio_version",), _write_version, _read_version),
)

#: Inpaint's keys (A1111's names), written after the common ones for inpaint images only.
INPAINT_PARAMS: tuple[Param, ...] = (
    _simple("Mask blur", "mask_blur", int),
    Param("Inpaint area", ("only_masked",), _write_area, _read_area),
    _simple("Masked area padding", "padding", int, when=lambda _v, m: bool(m.get("only_masked"))),
)

_PARAM_BY_KEY: dict[str, Param] = {}
for _p in (*PARAMS, *INPAINT_PARAMS):
    for _k in (_p.key, *_p.aliases):
        _PARAM_BY_KEY[_k] = _p


def _set_dotted(target: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = value


def to_infotext(meta: dict) -> str:
    """A1111 infotext for a metadata dict (missing fields are left out, never invented)."""
    prompt = str(meta.get("prompt") or "")
    negative = str(meta.get("negative_prompt") or "")
    parts: list[str] = []
    written: set[str] = set()
    for param in (*PARAMS, *INPAINT_PARAMS):
        try:
            value = param.write(meta)
        except (TypeError, ValueError, OverflowError):
            value = None  # a malformed field is left out rather than failing the whole image
        if value is not None and value != "":
            parts.append(f"{param.key}: {quote(value)}")
            written.add(param.key)
    loras = [d for d in meta.get("loras") or () if isinstance(d, dict) and d.get("name")]
    if loras:  # A1111's convention: <lora:name:weight> in the prompt, hashes in "Lora hashes"
        hashes = ", ".join(f"{d['name']}: {str(d.get('sha256') or '')[:12]}" for d in loras if d.get("sha256"))
        if hashes:
            parts.append(f"Lora hashes: {quote(hashes)}")
            written.add("Lora hashes")
    extras = meta.get("extra_params")
    if isinstance(extras, dict):  # keys read from a foreign infotext, written back unchanged
        for key, value in extras.items():
            if (
                key not in written
                and key not in _PARAM_BY_KEY
                and key not in ("Prompt", "Negative prompt")
                and re.fullmatch(r"\w[\w \-/]+", str(key))
                and value not in (None, "")
            ):
                parts.append(f"{key}: {quote(str(value))}")
    if loras:
        from studio.lora import tags

        prompt = f"{prompt} {tags(loras)}" if prompt else tags(loras)
    lines = [prompt] if prompt else []
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(parts))
    return "\n".join(lines)


def infotext_to_fields(params: dict[str, Any]) -> dict[str, Any]:
    """Raw A1111 keys (from :func:`parse_infotext`) -> studio field names.

    Keys the registry does not know, and values it cannot parse, are kept under
    ``fields["extra_params"]`` so nothing is lost. A ``Denoising strength`` implies img2img.
    """
    params = dict(params)
    if "Size" not in params and "Size-1" in params and "Size-2" in params:  # A1111's own dict
        params["Size"] = f"{params.pop('Size-1')}x{params.pop('Size-2')}"
    fields: dict[str, Any] = {
        "prompt": str(params.pop("Prompt", "") or ""),
        "negative_prompt": str(params.pop("Negative prompt", "") or ""),
    }
    extras: dict[str, str] = {}
    for key, value in params.items():
        param = _PARAM_BY_KEY.get(key)
        if param is None:
            extras[key] = value
            continue
        try:
            values = param.read(str(value))
        except (ValueError, TypeError, OverflowError):
            values = {}
        if not values:
            extras[key] = value
        for name, v in values.items():
            _set_dotted(fields, name, v)
    if fields.get("mask_blur") is not None or fields.get("only_masked") is not None:
        fields.setdefault("mode", "inpaint")
    if fields.get("strength") is not None:
        fields.setdefault("mode", "img2img")
    if extras:
        fields["extra_params"] = extras
    return fields


def fields_from_infotext(text: str) -> dict[str, Any]:
    """Pasted or embedded infotext -> studio fields (the "reuse parameters" entry point)."""
    return infotext_to_fields(parse_infotext(text))


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
                    info.error = f"could not read {os.fspath(src)}: {e.strerror or e}"
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
        ("invokeai_metadata", _invokeai_fields, "invokeai"),
        ("sd-metadata", _invokeai_legacy_fields, "invokeai"),
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


# --- InvokeAI ---------------------------------------------------------------------------------


def _invokeai_fields(data: dict) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for src, dst, kind in (
        ("positive_prompt", "prompt", str),
        ("negative_prompt", "negative_prompt", str),
        ("seed", "seed", int),
        ("steps", "steps", int),
        ("cfg_scale", "guidance", float),
        ("width", "width", int),
        ("height", "height", int),
        ("scheduler", "scheduler", str),
        ("strength", "strength", float),
    ):
        if data.get(src) is not None:
            try:
                fields[dst] = kind(data[src])
            except (TypeError, ValueError, OverflowError):
                pass
    model = data.get("model")
    name = None
    if isinstance(model, dict):
        name = model.get("name") or model.get("model_name") or model.get("key")
    elif isinstance(model, str):
        name = model
    if name:
        fields["model"] = str(name)
        if v := guess_variant(str(name)):
            fields["variant"] = v
    mode = str(data.get("generation_mode") or "")
    if "img2img" in mode or fields.get("strength") is not None and "txt2img" not in mode:
        fields["mode"] = "img2img"
    elif mode:
        fields["mode"] = "txt2img"
    return fields


def _invokeai_legacy_fields(data: dict) -> dict[str, Any]:
    image = data.get("image") if isinstance(data.get("image"), dict) else {}
    prompt = image.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        prompt = prompt[0].get("prompt")
    fields = _invokeai_fields({
        "positive_prompt": prompt if isinstance(prompt, str) else None,
        "seed": image.get("seed"), "steps": image.get("steps"), "cfg_scale": image.get("cfg_scale"),
        "width": image.get("width"), "height": image.get("height"),
        "scheduler": image.get("sampler"), "model": data.get("model_weights"),
    })
    return fields


# --- ComfyUI ----------------------------------------------------------------------------------

_SAMPLERS = ("KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced")
# widgets_values order of common nodes, to read a UI workflow when the API prompt is missing
_WIDGETS = {
    "KSampler": ["seed", None, "steps", "cfg", "sampler_name", "scheduler", "denoise"],
    "KSamplerAdvanced": ["add_noise", "noise_seed", None, "steps", "cfg", "sampler_name",
                         "scheduler", "start_at_step", "end_at_step", "return_with_leftover_noise"],
    "CLIPTextEncode": ["text"],
    "CLIPTextEncodeSD3": ["clip_l", "clip_g", "t5xxl", "empty_padding"],
    "EmptyLatentImage": ["width", "height", "batch_size"],
    "EmptySD3LatentImage": ["width", "height", "batch_size"],
    "CheckpointLoaderSimple": ["ckpt_name"],
    "UNETLoader": ["unet_name", "weight_dtype"],
    "ModelSamplingSD3": ["shift"],
    "LoraLoader": ["lora_name", "strength_model", "strength_clip"],
    "RandomNoise": ["noise_seed", None],
    "CFGGuider": ["cfg"],
    "BasicScheduler": ["scheduler", "steps", "denoise"],
    "KSamplerSelect": ["sampler_name"],
}
_MAX_NODES = 5000


def _workflow_to_prompt(workflow: dict) -> dict[str, dict]:
    """A ComfyUI UI workflow -> the API "prompt" shape, for the nodes we know."""
    links = {}
    for link in workflow.get("links") or []:
        if isinstance(link, list) and len(link) >= 5:
            links[link[0]] = [str(link[1]), link[2]]
    graph: dict[str, dict] = {}
    for node in (workflow.get("nodes") or [])[:_MAX_NODES]:
        if not isinstance(node, dict):
            continue
        ctype = str(node.get("type", ""))
        inputs: dict[str, Any] = {}
        widgets = node.get("widgets_values")
        if isinstance(widgets, list):
            for name, value in zip(_WIDGETS.get(ctype, []), widgets):
                if name:
                    inputs[name] = value
        for inp in node.get("inputs") or []:
            if isinstance(inp, dict) and inp.get("link") in links:
                inputs[str(inp.get("name"))] = links[inp["link"]]
        graph[str(node.get("id"))] = {"class_type": ctype, "inputs": inputs}
    return graph


def _is_link(graph: dict, value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)
            and str(value[0]) in graph)


def _resolve(graph: dict, value: Any, depth: int = 0) -> Any:
    """A widget value, following links to primitive nodes (Primitive, Int, String...)."""
    if not _is_link(graph, value):
        return value
    if depth > 20:
        return None
    inputs = graph[str(value[0])].get("inputs") or {}
    for name in ("value", "text", "string", "seed", "noise_seed", "int", "float", "number"):
        if name in inputs:
            return _resolve(graph, inputs[name], depth + 1)
    return None


def _upstream(graph: dict, start: Any, stop: Callable[[dict], bool], skip=("clip", "vae")):
    """Nodes reachable upstream from a link, breadth first, not going past ``stop`` nodes."""
    if not _is_link(graph, start):
        return
    queue, seen = [str(start[0])], set()
    while queue and len(seen) < _MAX_NODES:
        nid = queue.pop(0)
        if nid in seen:
            continue
        seen.add(nid)
        node = graph[nid]
        yield node
        if stop(node):
            continue
        for name, value in (node.get("inputs") or {}).items():
            if name not in skip and _is_link(graph, value):
                queue.append(str(value[0]))


def _find_input(graph: dict, node: dict, names: tuple[str, ...], via: tuple[str, ...]) -> Any:
    """An input of ``node`` or of the nodes linked from its ``via`` inputs (guider, sigmas...)."""
    inputs = node.get("inputs") or {}
    for name in names:
        if name in inputs and not (_is_link(graph, inputs[name]) and _resolve(graph, inputs[name]) is None):
            return _resolve(graph, inputs[name])
    for v in via:
        if _is_link(graph, inputs.get(v)):
            found = _find_input(graph, graph[str(inputs[v][0])], names, ())
            if found is not None:
                return found
    return None


def _cond_text(graph: dict, link: Any) -> str | None:
    def is_encoder(node: dict) -> bool:
        return "CLIPTextEncode" in str(node.get("class_type")) or node.get("class_type") == "ConditioningZeroOut"

    texts: list[str] = []
    zero = False
    for node in _upstream(graph, link, is_encoder):
        ctype = str(node.get("class_type"))
        if ctype == "ConditioningZeroOut":
            zero = True
            continue
        if "CLIPTextEncode" not in ctype:
            continue
        inputs = node.get("inputs") or {}
        for name in ("text", "t5xxl", "clip_g", "clip_l"):
            text = _resolve(graph, inputs.get(name))
            if isinstance(text, str) and text.strip():
                texts.append(text)
                break
    if texts:
        return "\n".join(dict.fromkeys(texts))
    return "" if zero else None


def comfyui_fields(prompt_text: str | None, workflow_text: str | None) -> dict[str, Any]:
    """Recover generation fields from ComfyUI's ``prompt`` (API graph) or ``workflow`` chunk."""
    graph = None
    if prompt_text:
        data = json.loads(prompt_text)
        if isinstance(data, dict) and all(isinstance(n, dict) for n in data.values()):
            graph = {str(k): v for k, v in data.items()}
    if graph is None and workflow_text:
        data = json.loads(workflow_text)
        if not isinstance(data, dict):
            raise ValueError("the workflow is not a JSON object")
        graph = _workflow_to_prompt(data)
    if graph is None:
        raise ValueError("no ComfyUI graph found")
    samplers = [n for n in graph.values() if n.get("class_type") in _SAMPLERS]
    if not samplers:
        return {}

    def starts_from_empty(node: dict) -> bool:
        for n in _upstream(graph, (node.get("inputs") or {}).get("latent_image"), lambda _n: False):
            if str(n.get("class_type", "")).startswith("Empty"):
                return True
        return False

    sampler = next((s for s in samplers if starts_from_empty(s)), samplers[0])
    fields: dict[str, Any] = {}
    via = ("guider", "sigmas", "noise", "sampler")

    def put(name: str, value: Any, kind: type) -> None:
        if value is None or isinstance(value, (list, dict)):
            return
        try:
            fields[name] = kind(value)
        except (TypeError, ValueError, OverflowError):
            pass

    put("seed", _find_input(graph, sampler, ("seed", "noise_seed"), via), int)
    put("steps", _find_input(graph, sampler, ("steps",), via), int)
    put("guidance", _find_input(graph, sampler, ("cfg",), via), float)
    put("sampler", _find_input(graph, sampler, ("sampler_name",), via), str)
    put("scheduler", _find_input(graph, sampler, ("scheduler",), via), str)
    for key, name in (("positive", "prompt"), ("negative", "negative_prompt")):
        link = _find_input_link(graph, sampler, key)
        text = _cond_text(graph, link) if link is not None else None
        if text is not None:
            fields[name] = text
    latent = (sampler.get("inputs") or {}).get("latent_image")
    fields["mode"] = "txt2img"
    for node in _upstream(graph, latent, lambda n: "width" in (n.get("inputs") or {})):
        inputs = node.get("inputs") or {}
        if str(node.get("class_type")) == "VAEEncode":
            fields["mode"] = "img2img"
        if "width" in inputs and "height" in inputs and "width" not in fields:
            put("width", _resolve(graph, inputs["width"]), int)
            put("height", _resolve(graph, inputs["height"]), int)
            put("batch_size", _resolve(graph, inputs.get("batch_size")), int)
    if fields["mode"] == "img2img":
        put("strength", _find_input(graph, sampler, ("denoise",), via), float)
    model_link = _find_input_link(graph, sampler, "model")
    loras = []
    for node in _upstream(graph, model_link, lambda n: "Loader" in str(n.get("class_type")) and "Lora" not in str(n.get("class_type"))):
        inputs = node.get("inputs") or {}
        ctype = str(node.get("class_type"))
        if ctype.startswith("ModelSampling") and "shift" in inputs and "shift" not in fields:
            put("shift", _resolve(graph, inputs["shift"]), float)
        if "Lora" in ctype and isinstance(_resolve(graph, inputs.get("lora_name")), str):
            loras.append({"name": _resolve(graph, inputs["lora_name"]),
                          "weight": _resolve(graph, inputs.get("strength_model", 1.0))})
        for name in ("ckpt_name", "unet_name", "model_name"):
            value = _resolve(graph, inputs.get(name))
            if isinstance(value, str) and "model" not in fields:
                fields["model"] = value
                if v := guess_variant(value):
                    fields["variant"] = v
    if loras:
        fields["loras"] = loras
    return fields


def _find_input_link(graph: dict, sampler: dict, name: str) -> Any:
    inputs = sampler.get("inputs") or {}
    if _is_link(graph, inputs.get(name)):
        return inputs[name]
    guider = inputs.get("guider")
    if _is_link(graph, guider):
        ginputs = graph[str(guider[0])].get("inputs") or {}
        for candidate in (name, "conditioning" if name == "positive" else None):
            if candidate and _is_link(graph, ginputs.get(candidate)):
                return ginputs[candidate]
    return None
