"""A1111 infotext, both ways: the ``parameters`` text other UIs read and write::

    a cat in a hat
    Negative prompt: blurry
    Steps: 28, Sampler: Euler, Schedule type: Simple, CFG scale: 3.5, Seed: 1, Size: 1024x1024, ...

The A1111 key <-> studio field mapping lives in ONE place, :data:`PARAMS` (with the inpaint
keys in :data:`INPAINT_PARAMS` and A1111's ``Model hash`` / ``Lora hashes`` in
:data:`HASH_PARAMS`): ``to_infotext`` writes through it and ``infotext_to_fields`` reads through
it; field types come from
``studio.metadata.schema``. Quoting follows A1111 (values with ``,``, ``:`` or newlines are
JSON-quoted) and parsing reads the last line as parameters when it has ≥ 3 ``key: value`` pairs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from studio.catalog import VARIANTS
from studio.metadata.loras import tags
from studio.metadata.schema import kind_of

APP_NAME = "SD3.5 Studio"
MAX_PARAM_LINE = 256 * 1024  # longer "last lines" are treated as prompt text, not parameters

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


def _simple(key: str, field_name: str, *, aliases=(), when=None) -> Param:
    """A key carrying one field; how it is written and read follows the field's schema type."""
    # dotted names are the numbers inside a dict field (slg.scale, …)
    kind = float if "." in field_name else {"int": int, "float": float, "str": str}[kind_of(field_name)]
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
    return meta.get("model_name") or meta.get("variant") or meta.get("model") or None


def _read_model(text: str) -> dict[str, Any]:
    text = text.strip()
    if text in VARIANTS:
        return {"variant": text, "model_name": text}
    guess = guess_variant(text)
    named = {"model": text, "model_name": text}
    return {"variant": guess, **named} if guess else named


_HEX = re.compile(r"[0-9a-fA-F]{8,64}")


def _read_model_hash(text: str) -> dict[str, Any]:
    text = text.strip()
    if not _HEX.fullmatch(text):
        raise ValueError(f"model hash {text!r} is not hex")
    return {"model_hash": text.lower()}


def _lora_label(name: str) -> str:
    return str(name).translate({ord(":"): None, ord(","): None}).strip()  # A1111 drops these two


def _write_lora_hashes(meta: dict) -> str | None:
    """A1111's ``Lora hashes``: ``name: addnet hash`` for the LoRAs used (the ``hash`` of each
    ``loras`` entry), or the ``lora_hashes`` read from a foreign infotext."""
    pairs = [(d["name"], d["hash"]) for d in meta.get("loras") or ()
             if isinstance(d, dict) and d.get("name") and isinstance(d.get("hash"), str) and d["hash"]]
    if not pairs and isinstance(meta.get("lora_hashes"), dict):
        pairs = [(k, v) for k, v in meta["lora_hashes"].items() if isinstance(v, str) and v]
    return ", ".join(f"{_lora_label(n)}: {h}" for n, h in pairs) or None


def _read_lora_hashes(text: str) -> dict[str, Any]:
    """As A1111's Lora extension reads it: split on ",", then on the first ":"."""
    out: dict[str, str] = {}
    for item in text.split(","):
        name, sep, value = item.strip().partition(":")
        if sep and name.strip() and _HEX.fullmatch(value.strip()):
            out[name.strip()] = value.strip().lower()
    if not out:
        raise ValueError(f"no 'name: hash' pairs in {text!r}")
    return {"lora_hashes": out}


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


def _write_weighting(meta: dict) -> str | None:
    return "off" if meta.get("prompt_weighting") is False else None  # on is the default: not written


def _read_weighting(text: str) -> dict[str, Any]:
    t = text.strip().lower()
    if t not in ("on", "off", "true", "false"):
        raise ValueError(f"prompt weighting {text!r} is not on/off")
    return {"prompt_weighting": t in ("on", "true")}


#: THE mapping between infotext keys and studio fields, in the order keys are written.
PARAMS: tuple[Param, ...] = (
    _simple("Steps", "steps"),
    _simple("Sampler", "sampler"),
    _simple("Schedule type", "schedule"),  # Forge's key (A1111 1.9+): Sampler: DPM++ 2M, Schedule type: Karras
    _simple("Scheduler", "scheduler"),
    _simple("CFG scale", "guidance"),
    _simple("Seed", "seed"),
    Param("Size", ("width", "height"), _write_size, _read_size),
    Param("Model", ("variant",), _write_model, _read_model),
    Param("Denoising strength", ("strength",), lambda m: _write_denoise(m), lambda t: {"strength": _to_float(t)}),
    _simple("Shift", "shift"),
    Param("SLG layers", ("slg.layers",), _write_layers, _read_layers),
    _simple("SLG scale", "slg.scale", when=_slg_on),
    _simple("SLG start", "slg.start", when=_slg_on),
    _simple("SLG stop", "slg.stop", when=_slg_on),
    _simple("Max sequence length", "max_sequence_length"),
    _simple("T5 prompt", "prompt_3"),
    _simple("T5 negative prompt", "negative_prompt_3"),
    _simple("Emphasis", "emphasis", when=lambda v, _m: v != "Original"),  # A1111's own key
    Param("Prompt weighting", ("prompt_weighting",), _write_weighting, _read_weighting),
    _simple("Speed", "speed", when=lambda v, _m: v != "off"),  # step caching; off (the default) is not written
    _simple("Batch size", "batch_size", when=lambda v, _m: int(v) > 1),
    Param("Version", ("studio_version",), _write_version, _read_version),
)

#: Inpaint's keys (A1111's names), written after the common ones for inpaint images only.
INPAINT_PARAMS: tuple[Param, ...] = (
    _simple("Mask blur", "mask_blur"),
    Param("Inpaint area", ("only_masked",), _write_area, _read_area),
    _simple("Masked area padding", "padding", when=lambda _v, m: bool(m.get("only_masked"))),
)

# Hires fix, as A1111 writes it: "Denoising strength: 0.35, Hires upscale: 2, Hires steps: 15,
# Hires upscaler: 4x-UltraSharp" (+ "Hires checkpoint" for another model in the second pass).
_LATENT_NAMES = {"latent-nearest-exact": "Latent (nearest-exact)", "latent-bislerp": "Latent (bislerp)"}


def _hires_on(_value: Any, meta: dict) -> bool:
    return meta.get("hires_scale") is not None


def _write_denoise(meta: dict) -> str | None:
    """A1111's ``Denoising strength``: img2img's strength, or a hires fix's second-pass denoise."""
    value = meta.get("strength")
    if value is None and meta.get("hires_scale") is not None:
        value = meta.get("hires_denoise")
    return None if value is None else _fmt_float(value)


def _write_hires_upscaler(meta: dict) -> str | None:
    if meta.get("hires_scale") is None or not meta.get("hires_upscaler"):
        return None
    name = str(meta["hires_upscaler"])
    return _LATENT_NAMES.get(name, name)


def _read_hires_upscaler(text: str) -> dict[str, Any]:
    text = text.strip()
    ours = {v: k for k, v in _LATENT_NAMES.items()}
    return {"hires_upscaler": ours.get(text, text)}


def _write_hires_checkpoint(meta: dict) -> str | None:
    if meta.get("hires_scale") is None:
        return None
    return meta.get("hires_model_name") or meta.get("hires_variant") or None


def _read_hires_checkpoint(text: str) -> dict[str, Any]:
    variant = guess_variant(text.strip().split(" [")[0])  # A1111: "sd3.5_medium.safetensors [hash]"
    if variant is None:
        raise ValueError(f"no variant in {text!r}")
    return {"hires_variant": variant, "hires_model_name": text.strip()}


#: Hires fix's keys, written after the common ones when the image had a second pass.
HIRES_PARAMS: tuple[Param, ...] = (
    Param("Hires upscale", ("hires_scale",),  # "2", as A1111 writes it (not "2.0")
          lambda m: None if m.get("hires_scale") is None else f"{float(m['hires_scale']):g}",
          lambda t: {"hires_scale": _to_float(t)}),
    _simple("Hires steps", "hires_steps", when=_hires_on),
    Param("Hires upscaler", ("hires_upscaler",), _write_hires_upscaler, _read_hires_upscaler),
    Param("Hires checkpoint", ("hires_variant",), _write_hires_checkpoint, _read_hires_checkpoint),
    Param("Hires upscaler hash", ("upscaler_hash",),  # studio-only: A1111 records no upscaler hash
          lambda m: (m.get("upscaler_hash") or None) if m.get("hires_scale") is not None else None,
          lambda t: {"upscaler_hash": _read_model_hash(t)["model_hash"]}),
)

#: An image upscaled from another (Studio.upscale): A1111's Extras keys.
UPSCALE_PARAMS: tuple[Param, ...] = (
    _simple("Postprocess upscale by", "upscale_scale"),
    _simple("Postprocess upscaler", "upscale_upscaler"),
)

#: The hashes other tools link by (A1111, Forge, Civitai), written last: see studio/models/hashes.py.
HASH_PARAMS: tuple[Param, ...] = (
    Param("Model hash", ("model_hash",), lambda m: m.get("model_hash") or None, _read_model_hash),
    Param("Lora hashes", ("lora_hashes",), _write_lora_hashes, _read_lora_hashes),
)

# ControlNet, as Forge writes each unit: ControlNet 0: "Module: canny, Model: name [hash], Weight: 0.7,
# Resize Mode: Crop and Resize, Threshold A: 100, Threshold B: 200, Guidance Start: 0.0, Guidance End: 1.0"
_CONTROL_KEY = re.compile(r"ControlNet \d+")
_MODULES = {"canny": "canny", "depth": "depth_anything_v2", "blur": "blur_gaussian", "none": "None"}
_RESIZE = {"crop": "Crop and Resize", "stretch": "Just Resize"}


def _num_text(value: Any) -> str:
    return f"{float(value):g}"


def _write_controlnets(meta: dict) -> list[tuple[str, str]]:
    units = meta.get("controlnets")
    out = []
    for i, u in enumerate(units if isinstance(units, list) else ()):
        if not isinstance(u, dict) or not u.get("name"):
            continue
        model = str(u["name"]).replace(",", " ").replace(":", " ")
        if u.get("hash"):
            model += f" [{u['hash']}]"
        parts = [f"Module: {_MODULES.get(u.get('preprocess'), 'None')}", f"Model: {model}"]
        if u.get("scale") is not None:
            parts.append(f"Weight: {_num_text(u['scale'])}")
        parts.append(f"Resize Mode: {_RESIZE.get(u.get('resize'), 'Crop and Resize')}")
        if u.get("preprocess") == "canny":
            parts += [f"Threshold A: {int(u.get('canny_low', 100))}", f"Threshold B: {int(u.get('canny_high', 200))}"]
        elif u.get("preprocess") == "blur" and u.get("blur_radius") is not None:
            parts.append(f"Threshold A: {_num_text(u['blur_radius'])}")
        for key, name in (("start", "Guidance Start"), ("end", "Guidance End")):
            if u.get(key) is not None:
                parts.append(f"{name}: {_num_text(u[key])}")
        out.append((f"ControlNet {i}", ", ".join(parts)))
    return out


def _read_controlnet(text: str) -> dict[str, Any]:
    """One Forge/A1111 ControlNet unit → the studio's ``controlnets`` item (type from the module,
    or from the catalog entry the model name matches)."""
    from studio.control_catalog import CONTROLNETS

    raw = {k.strip().lower(): unquote(v.strip()) for k, v in parse_param_line(text)}
    if "model" not in raw and "module" not in raw:
        raise ValueError(f"not a ControlNet unit: {text[:60]!r}")
    item: dict[str, Any] = {}
    model = raw.get("model", "")
    m = re.fullmatch(r"(.*?)\s*\[([0-9a-fA-F]{8,64})\]\s*", model)
    name, digest = (m.group(1), m.group(2).lower()) if m else (model.strip(), None)
    norm = _norm_name(re.sub(r"\.safetensors$", "", name, flags=re.I))
    entry = next((e for e in CONTROLNETS.values() if norm and norm in (
        _norm_name(e.id), _norm_name(e.repo_id.split("/")[-1]), _norm_name((e.single_file or "").rsplit(".", 1)[0]))),
        None)
    if name and name.lower() != "none":
        item["name"] = entry.id if entry else name
    if digest:
        item["hash"] = digest
    module = raw.get("module", "None").lower()
    preprocess = "canny" if module.startswith("canny") else "depth" if module.startswith("depth") else \
        "blur" if module.startswith("blur") else "none"
    item["preprocess"] = preprocess
    kind = entry.control_type if entry else (preprocess if preprocess != "none" else None)
    if kind:
        item["type"] = kind
    for key, field in (("weight", "scale"), ("guidance start", "start"), ("guidance end", "end")):
        if key in raw:
            item[field] = _to_float(raw[key])
    item["resize"] = "stretch" if raw.get("resize mode", "").lower() == "just resize" else "crop"
    if preprocess == "canny":
        for key, field in (("threshold a", "canny_low"), ("threshold b", "canny_high")):
            if key in raw:
                item[field] = int(_to_float(raw[key]))
    elif preprocess == "blur" and "threshold a" in raw:
        item["blur_radius"] = _to_float(raw["threshold a"])
    return item


_PARAM_BY_KEY: dict[str, Param] = {}
for _p in (*PARAMS, *INPAINT_PARAMS, *HIRES_PARAMS, *UPSCALE_PARAMS, *HASH_PARAMS):
    for _k in (_p.key, *_p.aliases):
        _PARAM_BY_KEY[_k] = _p


def _set_dotted(target: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = value


def to_infotext(meta: dict) -> str:
    """A1111 infotext for a metadata dict (missing fields are left out, never invented).

    The prompts written are the ones the encoders read — with the styles applied, as A1111
    writes them (``styled_prompt``); it writes no style names, and neither do we."""
    prompt = str(meta.get("styled_prompt") or meta.get("prompt") or "")
    negative = str(meta.get("styled_negative_prompt") or meta.get("negative_prompt") or "")
    parts: list[str] = []
    written: set[str] = set()
    for param in (*PARAMS, *INPAINT_PARAMS, *HIRES_PARAMS, *UPSCALE_PARAMS, *HASH_PARAMS):
        try:
            value = param.write(meta)
        except (TypeError, ValueError, OverflowError):
            value = None  # a malformed field is left out rather than failing the whole image
        if value is not None and value != "":
            parts.append(f"{param.key}: {quote(value)}")
            written.add(param.key)
    try:
        for key, value in _write_controlnets(meta):
            parts.append(f"{key}: {quote(value)}")
            written.add(key)
    except (TypeError, ValueError, OverflowError):
        pass  # a malformed unit is left out rather than failing the whole image
    loras = [d for d in meta.get("loras") or () if isinstance(d, dict) and d.get("name")]
    extras = meta.get("extra_params")
    if isinstance(extras, dict):  # keys read from a foreign infotext, written back unchanged
        for key, value in extras.items():
            if (
                key not in written
                and key not in _PARAM_BY_KEY
                and not _CONTROL_KEY.fullmatch(str(key))
                and key not in ("Prompt", "Negative prompt")
                and re.fullmatch(r"\w[\w \-/]+", str(key))
                and value not in (None, "")
            ):
                parts.append(f"{key}: {quote(str(value))}")
    if loras:
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
    units: list[tuple[int, dict]] = []
    for key, value in params.items():
        if _CONTROL_KEY.fullmatch(key):
            try:
                units.append((int(key.split()[1]), _read_controlnet(str(value))))
                continue
            except (ValueError, TypeError, OverflowError):
                pass  # kept as text below
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
    if units:
        fields["controlnets"] = [u for _, u in sorted(units, key=lambda x: x[0])]
    if fields.get("hires_scale") is not None:  # a hires fix: its Denoising strength is the second pass's
        if fields.get("strength") is not None:
            fields["hires_denoise"] = fields.pop("strength")
        fields.setdefault("mode", "txt2img")
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


