"""The metadata schema: every field an image's metadata may carry, with its type, declared once.

The engine writes these fields, the infotext registry reads and writes their types from here,
and :func:`clean` is what every value read from outside (a PNG's chunks, an API call, a foreign
app's graph) goes through before anyone uses it: unknown keys are dropped, values of the wrong
type are dropped, text is bounded, and hashes must look like hashes. A value read from a PNG is
data — never a path, an id or a permission (``_source_image``, ``owner``, ``path`` are not fields).

``REQUEST_FIELDS`` are the ones "reuse parameters" hands to ``build_request``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_TEXT = 20_000  # characters of one text field read from outside
MAX_LIST = 64  # items of one list field read from outside


@dataclass(frozen=True)
class Field:
    """One metadata field: its name, the kind of value it holds, what it means, and whether
    "reuse parameters" sets it on a request."""
    name: str
    kind: str  # "str" | "int" | "float" | "bool" | "sha256" | "hex" | "slg" | "loras" | "box" | "text_map" | "hash_map" | "dict" | "str_list" | "upscaler" | "controlnets" | "controls"
    doc: str
    request: bool = False  # a GenerationRequest field ("reuse parameters" sets it)


FIELDS: dict[str, Field] = {f.name: f for f in (
    Field("mode", "str", "txt2img | img2img | inpaint | turbo", True),
    Field("prompt", "str", "the prompt (LoRA tags are in 'loras')", True),
    Field("negative_prompt", "str", "the negative prompt ('' when none)", True),
    Field("steps", "int", "denoising steps", True),
    Field("guidance", "float", "CFG scale", True),
    Field("seed", "int", "the seed of this image (0 … 2^64−1)", True),
    Field("width", "int", "pixels", True),
    Field("height", "int", "pixels", True),
    Field("strength", "float", "img2img / inpaint denoising strength", True),
    Field("shift", "float", "scheduler shift", True),
    Field("max_sequence_length", "int", "T5 tokens", True),
    Field("batch_size", "int", "images per run", True),
    Field("batch_count", "int", "runs", False),
    Field("slg", "slg", "Skip Layer Guidance {layers, scale, start, stop}, or null when off", True),
    Field("speed", "str", "step caching: off (every step computed, exact) | fast | faster", True),
    Field("step_cache", "dict", "step caching of this image's run: {passes, cached} transformer passes"),
    Field("loras", "loras", "[{name, sha256, hash (A1111 addnet, 12 hex), weight}]", True),
    Field("mask_blur", "int", "inpaint seam feathering (px)", True),
    Field("only_masked", "bool", "inpaint only the mask's box", True),
    Field("padding", "int", "inpaint only-masked context (px)", True),
    Field("variant", "str", "catalog variant id", True),
    Field("model", "str", "the model's name (checkpoint file stem, folder name or variant label)"),
    Field("model_name", "str", "A1111's 'Model:' — the checkpoint file stem, folder name or catalog variant id"),
    Field("model_hash", "hex", "A1111's 'Model hash': sha256 of the file, first 10 hex (folders: studio/models/hashes.py)"),
    Field("lora_hashes", "hash_map", "A1111's 'Lora hashes' as read back: {name: addnet hash, 12 hex}"),
    Field("source", "str", "where the weights came from (Hub id or path) — shown, never opened"),
    Field("preset", "str", "memory preset"),
    Field("dtype", "str", "compute dtype"),
    Field("sampler", "str", "sampler, as Forge names it (Euler, DPM++ 2M, …)", True),
    Field("schedule", "str", "schedule type, as Forge names it (Normal, Karras, …)", True),
    Field("scheduler", "str", "the diffusers scheduler class the sampler ran on"),
    Field("prompt_3", "str", "what T5 read instead of the prompt", True),
    Field("negative_prompt_3", "str", "what T5 read instead of the negative prompt", True),
    Field("prompt_weighting", "bool", "A1111 (word:1.2) syntax and 75-token CLIP chunks (false: literal text)", True),
    Field("emphasis", "str", "A1111 emphasis: Original | No norm", True),
    Field("styles", "str_list", "styles.csv styles applied, in order", True),
    Field("styled_prompt", "str", "the prompt the encoders read (the styles applied)"),
    Field("styled_negative_prompt", "str", "the negative prompt the encoders read (the styles applied)"),
    Field("hires_scale", "float", "hires fix: the first pass's image upscaled by this factor", True),
    Field("hires_steps", "int", "hires fix: the second pass's steps (it runs steps × denoise)", True),
    Field("hires_denoise", "float", "hires fix: the second pass's denoising strength", True),
    Field("hires_upscaler", "str", "hires fix: Lanczos, latent-bislerp, latent-nearest-exact or an upscaler's name", True),
    Field("hires_variant", "str", "hires fix: the variant of the second pass (none: the same model)", True),
    Field("hires_size", "box", "hires fix: the final size (width, height); width/height are the first pass's"),
    Field("hires_model", "str", "hires fix: the second pass's model label"),
    Field("hires_model_name", "str", "A1111's 'Hires checkpoint': the second pass's model name"),
    Field("upscaler", "upscaler", "the upscaler model used {name, sha256, hash (10 hex), architecture, scale}"),
    Field("upscaler_hash", "hex", "the upscaler file's sha256, first 10 hex (studio-only: A1111 has none)"),
    Field("upscale_scale", "float", "upscaled from the parent image by this factor"),
    Field("upscale_upscaler", "str", "what upscaled it from the parent image (A1111's 'Postprocess upscaler')"),
    Field("source_size", "box", "the size of the image it was upscaled from"),
    Field("parent_image_id", "str", "the gallery id of the image it was upscaled from (shown, never opened)"),
    Field("controlnets", "controlnets", "[{name, sha256, hash, type, preprocess, resize, canny_low, canny_high, "
                                        "blur_radius, invert, scale, start, end, control_image_sha256}]"),
    Field("controls", "controls", "the control units reuse sets (no images: those come by the gallery id; "
                                  "controlnet only as a catalog id)", True),
    Field("studio_version", "str", "the studio version that wrote the image"),
    Field("created_at", "str", "ISO time"),
    Field("batch_index", "int", "run index in the batch"),
    Field("image_index", "int", "image index in the run"),
    Field("init_image_sha256", "sha256", "the init image, stored by content"),
    Field("mask_sha256", "sha256", "the inpaint mask, stored by content"),
    Field("inpaint_box", "box", "the box repainted (x0, y0, x1, y1)"),
    Field("work_size", "box", "the size the box was repainted at"),
    Field("timings", "dict", "seconds per phase"),
    Field("extra_params", "text_map", "infotext keys the studio does not know, kept as text"),
)}

REQUEST_FIELDS = tuple(name for name, f in FIELDS.items() if f.request)


def _int(v) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v if abs(v) < 2**70 else None
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    return None


def _float(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _str(v) -> str | None:
    return v[:MAX_TEXT] if isinstance(v, str) else None


def _slg(v):
    if v is None:
        return None
    if not isinstance(v, dict):
        return None
    layers = v.get("layers")
    out = {"layers": [i for i in (_int(x) for x in layers[:MAX_LIST]) if i is not None]
           if isinstance(layers, list) else []}
    for k in ("scale", "start", "stop"):
        f = _float(v.get(k))
        if f is not None:
            out[k] = f
    return out


def _loras(v):
    if not isinstance(v, list):
        return None
    out = []
    for d in v[:MAX_LIST]:
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            continue
        item = {"name": d["name"][:200], "weight": _float(d.get("weight")) if _float(d.get("weight")) is not None
                else 1.0}
        for key in ("sha256", "hash"):
            if isinstance(d.get(key), str) and re.fullmatch(r"[0-9a-fA-F]{8,64}", d[key]):
                item[key] = d[key].lower()
        out.append(item)
    return out


def _box(v):
    if not isinstance(v, list) or len(v) not in (2, 4):
        return None
    nums = [_int(x) for x in v]
    return nums if all(n is not None for n in nums) else None


def _text_map(v):
    if not isinstance(v, dict):
        return None
    return {str(k)[:100]: str(x)[:MAX_TEXT] for k, x in list(v.items())[:MAX_LIST]
            if isinstance(x, (str, int, float)) and not isinstance(x, bool)}


HEX_RE = re.compile(r"^[0-9a-fA-F]{8,64}$")  # a hash prefix other tools write (A1111: 10 or 12 digits)


def _hex(v):
    return v.lower() if isinstance(v, str) and HEX_RE.match(v) else None


def _hash_map(v):
    if not isinstance(v, dict):
        return None
    return {str(k)[:200]: h for k, x in list(v.items())[:MAX_LIST] if (h := _hex(x)) is not None}


def _upscaler(v):
    if not isinstance(v, dict) or not isinstance(v.get("name"), str):
        return None
    out: dict[str, Any] = {"name": v["name"][:200]}
    if isinstance(v.get("sha256"), str) and SHA256_RE.match(v["sha256"]):
        out["sha256"] = v["sha256"]
    if _hex(v.get("hash")):
        out["hash"] = _hex(v["hash"])
    if isinstance(v.get("architecture"), str):
        out["architecture"] = v["architecture"][:60]
    if _int(v.get("scale")) is not None:
        out["scale"] = _int(v["scale"])
    return out


_CONTROL_NUMBERS = {"scale": _float, "start": _float, "end": _float, "canny_low": _int, "canny_high": _int,
                    "blur_radius": _float}
_CONTROL_TEXT = ("name", "type", "preprocess", "resize")


def _controlnets(v):
    """The ControlNets an image was made with, as the engine records them."""
    if not isinstance(v, list):
        return None
    out = []
    for d in v[:MAX_LIST]:
        if not isinstance(d, dict):
            continue
        item: dict[str, Any] = {k: d[k][:200] for k in _CONTROL_TEXT if isinstance(d.get(k), str)}
        for k, conv in _CONTROL_NUMBERS.items():
            if conv(d.get(k)) is not None:
                item[k] = conv(d[k])
        if isinstance(d.get("invert"), bool):
            item["invert"] = d["invert"]
        for k in ("sha256", "control_image_sha256"):
            if isinstance(d.get(k), str) and SHA256_RE.match(d[k]):
                item[k] = d[k]
        if _hex(d.get("hash")):
            item["hash"] = _hex(d["hash"])
        out.append(item)
    return out


def _controls(v):
    """Control units for a request, from outside: settings only. No image (a request's control
    image is an upload, or a stored one found by the gallery id), and a ControlNet only by its
    catalog id — never a path or a Hub id read from a file."""
    from studio.control_catalog import CONTROLNETS

    if not isinstance(v, list):
        return None
    out = []
    for d in v[:MAX_LIST]:
        if not isinstance(d, dict):
            continue
        item: dict[str, Any] = {}
        for k in ("control_type", "preprocess", "control_resize"):
            if isinstance(d.get(k), str):
                item[k] = d[k][:40]
        if isinstance(d.get("controlnet"), str) and d["controlnet"] in CONTROLNETS:
            item["controlnet"] = d["controlnet"]
        for k, conv in (("control_scale", _float), ("control_start", _float), ("control_end", _float),
                        ("canny_low", _int), ("canny_high", _int), ("blur_radius", _float)):
            if conv(d.get(k)) is not None:
                item[k] = conv(d[k])
        if isinstance(d.get("control_invert"), bool):
            item["control_invert"] = d["control_invert"]
        out.append(item)
    return out


def _str_list(v):
    if not isinstance(v, list):
        return None
    return [x[:200] for x in v[:MAX_LIST] if isinstance(x, str)]


def _dict(v):
    if not isinstance(v, dict):
        return None
    return {str(k)[:100]: f for k, x in list(v.items())[:MAX_LIST] if (f := _float(x)) is not None}


_CLEAN = {
    "str": _str, "int": _int, "float": _float,
    "bool": lambda v: v if isinstance(v, bool) else None,
    "sha256": lambda v: v if isinstance(v, str) and SHA256_RE.match(v) else None,
    "hex": _hex, "hash_map": _hash_map,
    "slg": _slg, "loras": _loras, "box": _box, "text_map": _text_map, "dict": _dict, "str_list": _str_list,
    "upscaler": _upscaler, "controlnets": _controlnets, "controls": _controls,
}


def clean(fields: Any) -> dict:
    """Only the declared fields, each of its declared type (others dropped). Never raises."""
    if not isinstance(fields, dict):
        return {}
    out: dict[str, Any] = {}
    for name, value in fields.items():
        spec = FIELDS.get(name) if isinstance(name, str) else None
        if spec is None:
            continue
        if value is None:
            if spec.kind == "slg":
                out[name] = None  # SLG explicitly off
            continue
        cleaned = _CLEAN[spec.kind](value)
        if cleaned is not None:
            out[name] = cleaned
    return out


def request_fields(fields: dict) -> dict:
    """The cleaned fields "reuse parameters" hands to ``build_request``."""
    cleaned = clean(fields)
    return {k: v for k, v in cleaned.items() if FIELDS[k].request}


def kind_of(name: str) -> str:
    """The kind of value the field ``name`` holds ("str", "int", "sha256", …)."""
    return FIELDS[name].kind
