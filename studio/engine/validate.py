"""``validate``: a request checked against the limits table and the loaded model, defaults filled.

Everything a request can get wrong is refused here, once, with a message that names the field,
the allowed range and the fix; what is safely adjusted (a size snapped to 16, SLG left off where
it cannot run) is said in ``notes``. Nothing here is silently rounded: ``steps=1.5`` is refused,
and so is ``width="abc"``.
"""

from __future__ import annotations

import math
import numbers
import secrets
from dataclasses import replace

from studio.catalog import MAX_SIDE, MIN_SIDE, SIZE_MULTIPLE, Variant
from studio.engine.images import normalize_init_image
from studio.engine.limits import (
    HIRES_VAE_TILING_PIXELS,
    IMAGE_MODES,
    LIMITS,
    MAX_CONTROLNETS,
    MAX_IMAGES,
    MAX_LORAS,
    MAX_PROMPT_CHARS,
    MAX_STYLES_PER_REQUEST,
    MODES,
    RANDOM_SEED_MAX,
    snap,
)
from studio.engine.request import GenerationRequest, Resolved
from studio.errors import ValidationError


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return f"{value:,}" if abs(value) >= 10**6 else str(value)


def check_number(name: str, value, lo=None, hi=None, label: str | None = None, integer: bool | None = None):
    """``value`` as a number within [lo, hi] (defaults: the limits table's entry for ``name``).

    Refuses text, lists, booleans, NaN/inf, fractions where a whole number is needed and values
    out of range — each with the field's name and range. Never rounds."""
    lim = LIMITS.get(name)
    lo = lim.lo if lo is None else lo
    hi = lim.hi if hi is None else hi
    label = label or (lim.label if lim else name)
    integer = lim.integer if integer is None else integer
    rng = f"between {_fmt(lo)} and {_fmt(hi)}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        shown = repr(value) if not isinstance(value, (list, dict, tuple)) or len(repr(value)) < 60 else \
            type(value).__name__
        raise ValidationError(f"{label} must be a number {rng}, not {shown}.", name)
    if isinstance(value, numbers.Integral):
        number = int(value)
    else:
        number = float(value)
        if not math.isfinite(number):
            raise ValidationError(f"{label} must be a finite number {rng}.", name)
        if integer:
            if number != int(number):
                raise ValidationError(f"{label} must be a whole number {rng}, not {value:g}.", name)
            number = int(number)
    if not lo <= number <= hi:
        shown = _fmt(number) if isinstance(number, float) or abs(number) < 10**30 else "far out of range"
        raise ValidationError(f"{label} is {shown}; it must be {rng}.", name)
    return int(number) if integer else float(number)


def _check_text(req: GenerationRequest, name: str) -> GenerationRequest:
    text = getattr(req, name)
    if text is None:
        return replace(req, **{name: ""})
    if not isinstance(text, str):
        raise ValidationError(f"The {name.replace('_', ' ')} must be text.", name)
    if len(text) > MAX_PROMPT_CHARS:
        raise ValidationError(
            f"The {name.replace('_', ' ')} is {len(text):,} characters; the limit is "
            f"{MAX_PROMPT_CHARS:,}. The text encoders read at most 77 (CLIP) and 512 (T5) tokens anyway.",
            name,
        )
    return req


def check_loras(loras) -> list[tuple[str, float]]:
    """The request's LoRA selection as [(name, weight)]: names once each, weights in range."""
    from studio.models.lora import NAME_RE

    if loras is None:
        return []
    if not isinstance(loras, (list, tuple)):
        raise ValidationError("LoRAs must be a list of (name, weight) pairs.", "loras")
    if len(loras) > MAX_LORAS:
        raise ValidationError(f"{len(loras)} LoRAs selected; the limit is {MAX_LORAS}.", "loras")
    out: list[tuple[str, float]] = []
    for item in loras:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ValidationError(f"LoRA entry {item!r} is not a (name, weight) pair.", "loras")
        name, weight = item
        if not isinstance(name, str) or not NAME_RE.match(name.strip()):
            raise ValidationError(f"{str(name)[:60]!r} is not a LoRA name (the file name without .safetensors).",
                                  "loras")
        w = check_number("loras", weight, LIMITS["lora_weight"].lo, LIMITS["lora_weight"].hi,
                         f"The weight of LoRA {name.strip()!r}", integer=False)
        if any(n == name.strip() for n, _ in out):
            raise ValidationError(f"LoRA {name.strip()!r} is selected twice; select it once.", "loras")
        out.append((name.strip(), w))
    return out


def _check_mask(req: GenerationRequest, init_image, notes: list[str]):
    """Inpaint: the mask at the image's size (L, white = repaint) and the padding."""
    from studio.engine.inpaint import MaskError, normalize_mask

    if req.mask_image is None:
        raise ValidationError("Inpaint needs a mask: paint over the area to change, or upload a mask "
                              "(white = change, black = keep).", "mask_image")
    padding = check_number("padding", req.padding)
    try:
        mask, mask_notes = normalize_mask(req.mask_image, init_image.size)
    except MaskError as e:
        raise ValidationError(str(e), "mask_image") from None
    notes += mask_notes
    return mask, padding


def _check_strength(req: GenerationRequest, steps: int) -> float:
    strength = check_number("strength", req.strength)
    if strength <= 0:
        raise ValidationError(
            "Strength 0 would return the init image unchanged; use a value above 0 "
            "(0.3–0.5 keeps the composition, 0.7–0.9 repaints most of it).",
            "strength",
        )
    if steps * strength < 1:
        need_strength = math.ceil(100 / steps) / 100
        max_steps = LIMITS["steps"].hi
        need_steps = math.ceil(1 / strength) if strength * max_steps >= 1 else None  # a tiny strength: none do
        raise ValidationError(
            f"img2img runs about steps × strength denoising steps: {steps} × {strength:g} = "
            f"{steps * strength:.2f}, less than one step. Raise the strength to at least "
            f"{need_strength:g}" + (f" or the steps to at least {need_steps}." if need_steps else "."),
            "strength",
        )
    return strength


def _size(name: str, value, limit: int, notes: list[str], multiple: int) -> int:
    label = name.capitalize()
    rng = f"use {MIN_SIDE}–{limit} pixels (a multiple of {multiple})"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValidationError(f"{label} must be a number: {rng}, not {str(value)[:40]!r}.", name)
    if not math.isfinite(float(value)) or abs(float(value)) > 1e9:
        raise ValidationError(f"{label} is out of range: {rng}.", name)
    snapped = snap(value, multiple)
    if snapped < MIN_SIDE or snapped > limit:
        raise ValidationError(f"{label} {float(value):g} is out of range: {rng}.", name)
    if snapped != value:
        why = "SD3 needs" if multiple == SIZE_MULTIPLE else "this model needs"
        notes.append(f"{label} {float(value):g} was snapped to {snapped} ({why} multiples of {multiple}).")
    return snapped


def _check_sampling(req: GenerationRequest, steps: int, notes: list[str]) -> tuple[str, str]:
    """The request's sampler and schedule, checked (Forge's names; ``schedule`` None, "" or
    "Automatic": the sampler's own default), and the prompt options."""
    from studio.engine import samplers, weighting

    sampler = samplers.DEFAULT_SAMPLER if req.sampler in (None, "") else req.sampler
    schedule = req.schedule
    if schedule is None or (isinstance(schedule, str) and schedule.strip().lower() in ("", "automatic")):
        schedule = samplers.default_schedule(sampler) if sampler in samplers.SAMPLERS else samplers.DEFAULT_SCHEDULE
    samplers.check(sampler, schedule)  # ValidationError naming sampler / schedule and the choices
    if not isinstance(req.prompt_weighting, bool):
        raise ValidationError("Prompt weighting is on or off (true or false).", "prompt_weighting")
    if req.emphasis not in weighting.EMPHASIS:
        raise ValidationError(f"Emphasis {str(req.emphasis)[:40]!r} is unknown; use {' or '.join(weighting.EMPHASIS)}.",
                              "emphasis")
    if samplers.SAMPLER_INFO[sampler].calls_per_step > 1:
        notes.append(f"{sampler} evaluates the model twice a step: {steps} steps cost "
                     f"{samplers.model_calls(sampler, steps)} model evaluations.")
    return sampler, schedule


def _check_speed(req: GenerationRequest) -> str:
    """The request's Speed (step caching, ``studio.engine.stepcache``): one of SPEED_MODES; None
    or "" is the default (off). Whether the loaded transformer can be cached is checked in
    ``Engine.prepare``."""
    from studio.engine.stepcache import SPEED_DEFAULT, SPEED_HELP, SPEED_MODES

    speed = SPEED_DEFAULT if req.speed in (None, "") else req.speed
    if speed not in SPEED_MODES:
        shown = repr(speed[:40]) if isinstance(speed, str) else type(speed).__name__
        raise ValidationError(f"Speed {shown} is unknown; use one of {', '.join(SPEED_MODES)} ("
                              + "; ".join(f"{m}: {SPEED_HELP[m]}" for m in SPEED_MODES) + ").", "speed")
    return speed


def _check_styles(req: GenerationRequest, styles) -> tuple[str, str]:
    """The prompt and negative prompt with the request's styles applied (``styles``: a
    StyleLibrary; None checks only the shape of the list, as a quick check before a load)."""
    names = req.styles
    if names in (None, "", [], ()):
        return req.prompt, req.negative_prompt
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValidationError("Styles must be a list of style names (from styles.csv).", "styles")
    if len(names) > MAX_STYLES_PER_REQUEST:
        raise ValidationError(f"{len(names)} styles were chosen; at most {MAX_STYLES_PER_REQUEST} apply at once.",
                              "styles")
    if styles is None:
        return req.prompt, req.negative_prompt
    prompt, negative = styles.apply(req.prompt, req.negative_prompt, list(names))
    if len(prompt) > MAX_PROMPT_CHARS or len(negative) > MAX_PROMPT_CHARS:
        raise ValidationError(f"With its styles the prompt is over {MAX_PROMPT_CHARS:,} characters; choose fewer "
                              "styles or shorten the prompt.", "styles")
    return prompt, negative


def _check_hires(req: GenerationRequest, steps: int, width: int, height: int, limit: int, notes: list[str],
                 multiple: int = SIZE_MULTIPLE):
    """The hires fix's second pass (a HiresPlan), or None when ``hires_scale`` is off (None or 1).

    The scale is refused past the size limits naming the largest factor allowed; the upscaler's
    *name* is checked here, the file it names in ``Engine.prepare``."""
    from studio.catalog import VARIANTS
    from studio.engine.request import HiresPlan
    from studio.engine.upscale import LANCZOS, check_scale
    from studio.models.upscalers import LATENT_UPSCALERS

    if req.hires_scale is None or (not isinstance(req.hires_scale, bool) and req.hires_scale == 1):
        return None
    scale = check_number("hires_scale", req.hires_scale)
    if req.mode not in ("txt2img", "turbo"):
        raise ValidationError("Hires fix runs in txt2img and Turbo; in img2img and inpaint set the size "
                              "instead (or upscale the result from the gallery).", "hires_scale")
    w2, h2 = check_scale(width, height, scale, generation=True, field="hires_scale", max_side=limit,
                         multiple=multiple)
    denoise = check_number("hires_denoise", LIMITS["hires_denoise"].default_for(req.mode)
                           if req.hires_denoise is None else req.hires_denoise)
    if req.hires_steps in (None, 0):  # half the first pass's, and enough for one step at this denoise
        steps2 = max(1, steps // 2, math.ceil(1 / denoise - 1e-9) if denoise * 1e6 > 1 else 1)
        steps2 = min(steps2, int(LIMITS["hires_steps"].hi))
    else:
        steps2 = check_number("hires_steps", req.hires_steps)
    if int(steps2 * denoise) < 1:
        need = math.ceil(1 / denoise) if denoise * LIMITS["hires_steps"].hi >= 1 else None  # else: none do
        raise ValidationError(
            f"The second pass runs hires steps × denoise = {steps2} × {denoise:g} = {steps2 * denoise:.2f} steps, "
            "less than one. " + (f"Use at least {need} hires steps or a higher denoise." if need
                                 else f"Use a denoise of at least {math.ceil(100 / LIMITS['hires_steps'].hi) / 100:g} "
                                      "(0.3–0.5 keeps the first pass's picture)."),
            "hires_steps" if denoise > 0 else "hires_denoise")
    upscaler = LANCZOS if req.hires_upscaler in (None, "") else req.hires_upscaler
    if not isinstance(upscaler, str):
        raise ValidationError("The hires upscaler is a name: Lanczos, latent-bislerp, latent-nearest-exact or "
                              "an upscaler file's name.", "hires_upscaler")
    upscaler = upscaler.strip()
    latent = upscaler in LATENT_UPSCALERS
    if upscaler.lower() == LANCZOS.lower():
        upscaler = LANCZOS
    if latent and denoise < 0.5:
        notes.append(f"{upscaler} enlarges the latents themselves: below about 0.5 hires denoise the result "
                     "looks soft (Lanczos or a model upscaler keeps more detail at low denoise).")
    variant = req.hires_variant or None
    if variant is not None and variant not in VARIANTS:
        raise ValidationError(f"Unknown hires variant {str(variant)[:60]!r}; use one of {', '.join(VARIANTS)} "
                              "(or none: the same model).", "hires_variant")
    tiling = req.hires_vae_tiling
    if tiling is not None and not isinstance(tiling, bool):
        raise ValidationError(f"hires_vae_tiling is {str(tiling)[:40]!r}; use true, false or none (automatic).",
                              "hires_vae_tiling")
    return HiresPlan(scale, w2, h2, steps2, denoise, upscaler, variant, latent,
                     vae_tiling=w2 * h2 > HIRES_VAE_TILING_PIXELS if tiling is None else tiling)


def _control_units(req: GenerationRequest) -> list[dict]:
    """The request's control units as dicts: its own control_* fields (when it has a control
    image or names a ControlNet), then each of ``controls``."""
    from studio.engine.request import CONTROL_KEYS

    units = []
    if req.control_image is not None or req.controlnet not in (None, "") or req.control_type == "inpaint":
        units.append({k: getattr(req, k) for k in CONTROL_KEYS})
    extra = req.controls or []
    if not isinstance(extra, (list, tuple)) or not all(isinstance(u, dict) for u in extra):
        raise ValidationError("controls must be a list of control units (dicts with control_image, control_type, "
                              "controlnet, control_scale, …).", "controls")
    for u in extra:
        unknown = sorted(set(u) - set(CONTROL_KEYS))
        if unknown:
            raise ValidationError(f"Unknown control setting {str(unknown[0])[:40]!r}; a unit takes: "
                                  f"{', '.join(CONTROL_KEYS)}.", "controls")
        units.append({k: u.get(k) for k in CONTROL_KEYS})
    return units


def _check_controls(req: GenerationRequest, variant: Variant, images: bool) -> list:
    """The request's ControlNets as checked ControlUnits (the nets themselves load in
    ``Engine.prepare``): types, catalog pairs, preprocessor settings, scales, start/end and the
    control images (header first, as init images)."""
    from studio.control_catalog import CONTROL_TYPES, CONTROLNETS, PREPROCESSORS, check_pair
    from studio.engine.control import ControlSettings, load_control_image
    from studio.engine.request import ControlUnit

    units = _control_units(req)
    if not units:
        return []
    if len(units) > MAX_CONTROLNETS:
        raise ValidationError(f"{len(units)} ControlNets were given; at most {MAX_CONTROLNETS} run together.",
                              "controls")
    if req.mode == "img2img":
        raise ValidationError("ControlNets run in txt2img, Turbo and inpaint (diffusers has no ControlNet img2img "
                              "for SD3): generate with the control image in txt2img instead.", "controlnet")
    out = []
    for i, u in enumerate(units):
        where = "" if len(units) == 1 else f" (ControlNet {i + 1})"
        source = u["controlnet"] if u["controlnet"] not in (None, "") else None
        if source is not None and not isinstance(source, str):
            raise ValidationError("controlnet is a name: a catalog id, a Hub id, a folder or a .safetensors file.",
                                  "controlnet")
        source = source.strip() if source else None
        entry = check_pair(source, variant.name) if source in CONTROLNETS else None
        kind = u["control_type"] if u["control_type"] not in (None, "") else (entry.control_type if entry else "canny")
        if kind not in CONTROL_TYPES:
            raise ValidationError(f"Unknown control type {str(kind)[:40]!r}{where}; use one of "
                                  f"{', '.join(CONTROL_TYPES)}.", "control_type")
        if entry is not None and entry.control_type != kind:
            raise ValidationError(f"{entry.id} is a {entry.control_type} ControlNet, not {kind}{where}: set the "
                                  f"control type to {entry.control_type}, or pick a {kind} ControlNet.", "control_type")
        if kind == "inpaint" and req.mode != "inpaint":
            raise ValidationError("An inpainting ControlNet repaints a masked image: use inpaint mode, with the "
                                  "image and its mask.", "control_type")
        if req.mode == "inpaint" and kind != "inpaint":
            raise ValidationError("Inpaint with a ControlNet needs an inpainting ControlNet (control type inpaint, "
                                  "e.g. sd3-medium-inpaint on SD3 Medium); other ControlNets run in txt2img.",
                                  "control_type")
        if kind == "inpaint" and len(units) > 1:
            raise ValidationError("The inpainting ControlNet runs alone: remove the other ControlNets.", "controls")
        preprocess = u["preprocess"] if u["preprocess"] not in (None, "") else (
            entry.preprocessor if entry else (kind if kind in PREPROCESSORS else "none"))
        if kind == "inpaint":
            preprocess = "none"

        def number(name, unit=u):
            return LIMITS[name].default if unit[name] is None else check_number(name, unit[name])

        settings = ControlSettings(preprocess, number("canny_low"), number("canny_high"), number("blur_radius"),
                                   None if u["control_invert"] is None else bool(u["control_invert"]),
                                   u["control_resize"] or "crop").checked()
        scale = None if u["control_scale"] is None else check_number("control_scale", u["control_scale"])
        if scale is None and entry is not None:
            scale = entry.scale
        start = (entry.start if entry else LIMITS["control_start"].default) if u["control_start"] is None \
            else check_number("control_start", u["control_start"])
        end = (entry.end if entry else LIMITS["control_end"].default) if u["control_end"] is None \
            else check_number("control_end", u["control_end"])
        if start >= end:
            raise ValidationError(f"Control start ({start:g}) must be before control end ({end:g}){where}.",
                                  "control_start")
        image = None
        if kind != "inpaint" and images:
            if u["control_image"] is None:
                raise ValidationError(f"A ControlNet needs a control image{where}: upload the picture (or the "
                                      "ready map, with preprocessor none).", "control_image")
            image = load_control_image(u["control_image"])
        out.append(ControlUnit(kind, source, entry, settings, scale, start, end, image))
    return out


def validate(req: GenerationRequest, variant: Variant, max_side: int = MAX_SIDE,
             native_size: tuple[int, int] = (1024, 1024), images: bool = True, styles=None,
             multiple: int = SIZE_MULTIPLE) -> Resolved:
    """Check a request against a variant and the loaded model's limits; fill in defaults.

    Raises ValidationError with a message that names the allowed range or the fix. Adjustments
    that are safe (sizes snapped to ``multiple``, the loaded model's ``size_multiple``: 16 for
    every SD3 release; SLG off where it cannot run) are made and reported in
    ``notes``. ``images=False`` checks everything but the image inputs (a quick check before a
    model is loaded: the CLI and the service refuse a bad width before spending seconds loading).
    ``styles``: the StyleLibrary the request's style names are looked up in (None: only their
    number is checked).
    """
    notes: list[str] = []
    if req.mode not in MODES:
        raise ValidationError(f"Unknown mode {str(req.mode)[:40]!r}; use one of {', '.join(MODES)}.", "mode")
    for name in ("prompt", "negative_prompt", "prompt_3", "negative_prompt_3"):
        req = _check_text(req, name)
    if not req.prompt.strip():
        notes.append("The prompt is empty: the image is not conditioned on any text.")

    steps = variant.steps if req.steps is None else check_number("steps", req.steps)
    guidance = variant.guidance if req.guidance is None else check_number("guidance", req.guidance)
    seed = check_number("seed", req.seed)
    if seed == -1:
        seed = secrets.randbelow(RANDOM_SEED_MAX + 1)
    batch_size = check_number("batch_size", req.batch_size)
    batch_count = check_number("batch_count", req.batch_count)
    if batch_size * batch_count > MAX_IMAGES:
        raise ValidationError(
            f"{batch_count} runs × {batch_size} images = {batch_size * batch_count} images; the limit "
            f"is {MAX_IMAGES} per request.",
            "batch_count",
        )
    last_seed = seed + batch_size * batch_count - 1
    if last_seed > LIMITS["seed"].hi:
        raise ValidationError(
            f"Seed {seed:,} + {batch_size * batch_count - 1} more images would pass the largest seed "
            f"({LIMITS['seed'].hi:,}); use a seed of at most {LIMITS['seed'].hi - batch_size * batch_count + 1:,}.",
            "seed",
        )
    msl = check_number("max_sequence_length", req.max_sequence_length)
    if msl > variant.max_sequence_length_warn:
        notes.append(
            f"{variant.label} shows edge artefacts past {variant.max_sequence_length_warn} T5 tokens; "
            f"you asked for {msl}."
        )
    shift = LIMITS["shift"].default if req.shift is None else check_number("shift", req.shift)
    loras = check_loras(req.loras)
    sampler, schedule = _check_sampling(req, steps, notes)
    speed = _check_speed(req)
    prompt, negative = _check_styles(req, styles)

    limit = min(max_side, MAX_SIDE)
    strength = None
    if req.mode in IMAGE_MODES:
        strength = _check_strength(replace(req, strength=LIMITS["strength"].default_for(req.mode)
                                           if req.strength is None else req.strength), steps)
        if req.mode == "inpaint":
            check_number("mask_blur", req.mask_blur)
            check_number("padding", req.padding)
    init_image = mask = padding = None
    if req.mode in IMAGE_MODES and images:
        if req.init_image is None:
            if req.mode == "inpaint":
                raise ValidationError("Inpaint needs an image: upload one, then paint the area to change.",
                                      "init_image")
            raise ValidationError("img2img needs an init image: upload or paste one.", "init_image")
        init_image = normalize_init_image(req.init_image)
        if req.mode == "inpaint":
            mask, padding = _check_mask(req, init_image, notes)

    # Size: default to the model's native size (img2img: the init image's, brought within the
    # model's limits), then snap to the model's multiple and bound.
    width, height = req.width, req.height
    if mask is not None and req.only_masked and (width is None or height is None):
        from studio.engine.inpaint import plan

        box = plan(mask, True, padding, native_size[0] * native_size[1], MIN_SIDE, limit, multiple=multiple)
        width = box.size[0] if width is None else width
        height = box.size[1] if height is None else height
    if init_image is not None and (width is None or height is None):
        w0, h0 = init_image.size
        scale = min(1.0, math.sqrt(variant.max_pixels / (w0 * h0)), limit / max(w0, h0))
        scale = max(scale, MIN_SIDE / min(w0, h0))
        width = w0 * scale if width is None else width
        height = h0 * scale if height is None else height
    width = native_size[0] if width is None else width
    height = native_size[1] if height is None else height
    width, height = _size("width", width, limit, notes, multiple), _size("height", height, limit, notes, multiple)
    pixels = width * height
    if not variant.min_pixels <= pixels <= variant.max_pixels and native_size[0] >= 512:
        notes.append(
            f"{width}×{height} is outside the range {variant.label} was trained for "
            f"(about {variant.min_pixels / 1e6:.2f}–{variant.max_pixels / 1e6:.1f} MP); expect weaker images."
        )

    hires = _check_hires(req, steps, width, height, limit, notes, multiple)
    controls = _check_controls(req, variant, images)

    slg = None
    want_slg = variant.slg.recommended if req.slg is None else bool(req.slg)
    if want_slg:
        if controls:
            notes.append("Skip Layer Guidance is off with a ControlNet (diffusers' ControlNet pipelines have none).")
        elif req.mode != "txt2img":
            if req.slg:
                notes.append("Skip Layer Guidance runs in txt2img only; it was left off.")
        elif guidance <= 1.0:
            if req.slg:
                notes.append("Skip Layer Guidance needs CFG (guidance above 1); it was left off.")
        else:
            a = variant.slg
            slg = {"layers": list(a.layers), "scale": a.scale, "start": a.start, "stop": a.stop}
            if not a.recommended:
                notes.append(a.note)
    if variant.distilled and negative.strip() and guidance <= 1.0:
        notes.append(f"{variant.label} runs without CFG: the negative prompt has no effect.")
    if req.mode == "turbo" and steps > 8:
        notes.append(f"Turbo is distilled for about 4 steps; {steps} steps cost time and rarely help.")

    inpaint_plan = None
    if mask is not None:
        from studio.engine.inpaint import plan

        inpaint_plan = plan(mask, bool(req.only_masked), padding, 0, MIN_SIDE, limit, size=(width, height))
    # From here on (the pipeline loop, the metadata) the request carries the checked numbers:
    # batch_count=2.0 or strength="0.5" passed validation and must not reach range() or the pipeline.
    req = replace(req, batch_size=batch_size, batch_count=batch_count, max_sequence_length=msl, speed=speed,
                  **({"strength": strength} if strength is not None else {}))
    return Resolved(req, variant, width, height, steps, guidance, seed, slg, shift, init_image, notes,
                    mask=mask, inpaint_plan=inpaint_plan, loras=loras, sampler=sampler, schedule=schedule,
                    prompt=prompt, negative_prompt=negative, hires=hires, controls=controls)
