"""One way to generate: ``Engine.generate(GenerationRequest)`` → images + per-image metadata.

Every caller — the UI tabs, ``launch.py generate`` and the API — goes through here, so input is
validated in exactly one place (``validate``) and every image carries the same metadata.
"""

from __future__ import annotations

import hashlib
import io
import math
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Callable

from .catalog import MAX_SIDE, MAX_T5_TOKENS, MIN_SIDE, SIZE_MULTIPLE, TURBO_VARIANT, Variant
from .config import __version__
from .models import free_memory

MODES = ("txt2img", "img2img", "turbo", "inpaint")
MAX_SEED = 2**32 - 1
MAX_STEPS = 150
MAX_GUIDANCE = 30.0
MAX_BATCH_SIZE = 8
MAX_BATCH_COUNT = 100
MAX_IMAGES = 100
MAX_PROMPT_CHARS = 10_000
MAX_INIT_PIXELS = 40_000_000  # an init image above this is refused before it is decoded
MAX_INIT_BYTES = 50 << 20
CLIP_TOKENS = 77


class ValidationError(ValueError):
    """A request that cannot run. ``field`` names the offending input; the message says why."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class GenerationError(RuntimeError):
    """A generation that failed while running (out of memory, ...). The message says what to do."""


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    mode: str = "txt2img"  # txt2img | img2img | turbo | inpaint
    width: int | None = None  # None: the model's native size (img2img: the init image's)
    height: int | None = None
    steps: int | None = None  # None: the variant's recommended value
    guidance: float | None = None
    seed: int = -1  # -1: random; the seed used is reported
    batch_count: int = 1  # how many times to run
    batch_size: int = 1  # images per run
    strength: float = 0.6  # img2img and inpaint
    init_image: object | None = None  # PIL image or path, img2img and inpaint
    mask_image: object | None = None  # inpaint: white (or painted alpha) = repaint
    mask_blur: int = 4  # inpaint: feathering (px) of the paste-back
    only_masked: bool = False  # inpaint: repaint only the mask's box (+ padding) at full resolution
    padding: int = 32  # inpaint, only_masked: context (px) around the mask's box
    loras: list = field(default_factory=list)  # [(name, weight)]: the LoRAs in <data-dir>/loras
    slg: bool | None = None  # Skip Layer Guidance; None: the variant's advice
    max_sequence_length: int = 256  # T5 tokens
    shift: float | None = None  # scheduler shift; None: the model's (3.0)
    variant: str | None = None  # None: the loaded model (turbo mode: Large Turbo)


@dataclass
class Resolved:
    """A validated request with every default filled in."""

    request: GenerationRequest
    variant: Variant
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    slg: dict | None
    shift: float
    init_image: object | None
    notes: list[str] = field(default_factory=list)
    mask: object | None = None  # inpaint: L mask at the init image's size
    inpaint_plan: object | None = None  # inpaint.Plan: the box repainted and the working size
    loras: list = field(default_factory=list)  # [(name, weight)] validated; [(LoraInfo, weight)] after prepare

    @property
    def effective_steps(self) -> int:
        if self.request.mode not in ("img2img", "inpaint"):
            return self.steps
        return self.steps - int(max(self.steps - self.steps * self.request.strength, 0))


@dataclass
class GeneratedImage:
    image: object  # PIL.Image
    seed: int
    metadata: dict
    saving: object | None = None  # Future of the GalleryImage while the gallery writes it

    @property
    def saved(self):
        """The gallery record (waits for the background save; raises GalleryError if it failed)."""
        return self.saving.result() if self.saving is not None else None

    @property
    def path(self) -> str | None:
        """The saved PNG, when saved to the gallery."""
        saved = self.saved
        return str(saved.path) if saved is not None else None

    @property
    def id(self) -> str | None:
        saved = self.saved
        return saved.id if saved is not None else None


@dataclass
class GenerationResult:
    images: list[GeneratedImage]
    seed: int  # the first seed used
    notes: list[str]
    cancelled: bool = False
    timings: dict = field(default_factory=dict)

    def wait_saved(self) -> list:
        """Wait until every image is in the gallery; returns their records.

        Every pending save is waited for before the first failure (GalleryError) is raised, so
        nothing is still being written when the caller reports the error.
        """
        from concurrent.futures import wait

        pending = [i.saving for i in self.images if i.saving is not None]
        wait(pending)
        return [i.saved for i in self.images if i.saving is not None]

    @property
    def info(self) -> str:
        """A short human summary: seed, size, notes."""
        if not self.images:
            return "Cancelled before any image finished." if self.cancelled else "No images."
        m = self.images[0].metadata
        lines = [
            f"{len(self.images)} image(s), {m['width']}×{m['height']}, {m['steps']} steps, "
            f"CFG {m['guidance']}, seed {self.seed}, {m['model']}, {self.timings.get('total_s', 0):.1f}s"
        ]
        if self.cancelled:
            lines.append("Cancelled: the finished images were kept.")
        lines += self.notes
        return "\n".join(lines)


@dataclass
class ProgressEvent:
    step: int  # steps done in this run (1-based)
    steps: int  # steps in this run
    run: int  # 0-based run index (batch_count)
    runs: int
    latents: object | None = None  # torch tensor (for previews)
    elapsed_s: float = 0.0

    @property
    def fraction(self) -> float:
        return (self.run + self.step / max(self.steps, 1)) / max(self.runs, 1)

    @property
    def eta_s(self) -> float | None:
        f = self.fraction
        return self.elapsed_s * (1 - f) / f if f > 0 else None


class CancelToken:
    """Set from any thread; the engine stops between denoising steps and keeps finished images."""

    def __init__(self):
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    def reset(self) -> None:
        self._event.clear()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


# --- validation -------------------------------------------------------------------------------


def _snap(value: int) -> int:
    return max(SIZE_MULTIPLE, int(round(value / SIZE_MULTIPLE)) * SIZE_MULTIPLE)


def _check_number(name: str, value, lo, hi, label: str, integer: bool = False):
    if isinstance(value, bool) or value is None:
        raise ValidationError(f"{label} must be a number.", name)
    try:
        number = float(value)
    except OverflowError:  # an integer past float range (10**400)
        raise ValidationError(f"{label} is far out of range: it must be between {lo} and {hi}.", name) from None
    except (TypeError, ValueError):
        raise ValidationError(f"{label} must be a number, not {value!r}.", name) from None
    if not math.isfinite(number):
        raise ValidationError(f"{label} must be a finite number between {lo} and {hi}.", name)
    if integer and number != int(number):
        raise ValidationError(f"{label} must be a whole number between {lo} and {hi}.", name)
    if not lo <= number <= hi:
        raise ValidationError(f"{label} is {value}; it must be between {lo} and {hi}.", name)
    return int(number) if integer else number


def validate(req: GenerationRequest, variant: Variant, max_side: int = MAX_SIDE,
             native_size: tuple[int, int] = (1024, 1024)) -> Resolved:
    """Check a request against a variant and the loaded model's limits; fill in defaults.

    Raises ValidationError with a message that names the allowed range or the fix.
    Adjustments that are safe (sizes snapped to 16, SLG off where it cannot run) are made and
    reported in ``notes``.
    """
    notes: list[str] = []
    if req.mode not in MODES:
        raise ValidationError(f"Unknown mode {req.mode!r}; use one of {', '.join(MODES)}.", "mode")
    for name in ("prompt", "negative_prompt"):
        text = getattr(req, name)
        if text is None:
            text = ""
            req = replace(req, **{name: ""})
        if not isinstance(text, str):
            raise ValidationError(f"The {name.replace('_', ' ')} must be text.", name)
        if len(text) > MAX_PROMPT_CHARS:
            raise ValidationError(
                f"The {name.replace('_', ' ')} is {len(text):,} characters; the limit is "
                f"{MAX_PROMPT_CHARS:,}. The text encoders read at most 77 (CLIP) and 512 (T5) tokens anyway.",
                name,
            )
    if not req.prompt.strip():
        notes.append("The prompt is empty: the image is not conditioned on any text.")

    steps = variant.steps if req.steps is None else _check_number("steps", req.steps, 1, MAX_STEPS, "Steps", True)
    guidance = variant.guidance if req.guidance is None else _check_number(
        "guidance", req.guidance, 0.0, MAX_GUIDANCE, "Guidance (CFG scale)"
    )
    seed = _check_number("seed", req.seed, -1, MAX_SEED, "Seed", True)
    if seed == -1:
        seed = secrets.randbelow(MAX_SEED + 1)
    batch_size = _check_number("batch_size", req.batch_size, 1, MAX_BATCH_SIZE, "Batch size", True)
    batch_count = _check_number("batch_count", req.batch_count, 1, MAX_BATCH_COUNT, "Batch count", True)
    if batch_size * batch_count > MAX_IMAGES:
        raise ValidationError(
            f"{batch_count} runs × {batch_size} images = {batch_size * batch_count} images; the limit "
            f"is {MAX_IMAGES} per request.",
            "batch_count",
        )
    msl = _check_number("max_sequence_length", req.max_sequence_length, 1, MAX_T5_TOKENS,
                        "Max sequence length (T5 tokens)", True)
    if msl > variant.max_sequence_length_warn:
        notes.append(
            f"{variant.label} shows edge artefacts past {variant.max_sequence_length_warn} T5 tokens; "
            f"you asked for {msl}."
        )
    shift = 3.0 if req.shift is None else _check_number("shift", req.shift, 0.1, 20.0, "Shift")

    loras = _check_loras(req.loras)
    init_image = None
    mask = padding = None
    if req.mode in ("img2img", "inpaint"):
        if req.init_image is None:
            if req.mode == "inpaint":
                raise ValidationError("Inpaint needs an image: upload one, then paint the area to change.",
                                      "init_image")
            raise ValidationError("img2img needs an init image: upload or paste one.", "init_image")
        init_image = normalize_init_image(req.init_image)
        strength = _check_number("strength", req.strength, 0.0, 1.0, "Strength")
        if strength <= 0:
            raise ValidationError(
                "Strength 0 would return the init image unchanged; use a value above 0 "
                "(0.3–0.5 keeps the composition, 0.7–0.9 repaints most of it).",
                "strength",
            )
        if steps * strength < 1:
            need_strength = math.ceil(100 / steps) / 100
            raise ValidationError(
                f"img2img runs about steps × strength denoising steps: {steps} × {strength:g} = "
                f"{steps * strength:.2f}, less than one step. Raise the strength to at least "
                f"{need_strength:g} or the steps to at least {math.ceil(1 / strength)}.",
                "strength",
            )
    if req.mode == "inpaint":
        mask, padding = _check_mask(req, init_image, notes)

    # Size: default to the model's native size (img2img: the init image's, brought within the
    # model's limits), then snap to 16 and bound.
    limit = min(max_side, MAX_SIDE)
    width, height = req.width, req.height
    if mask is not None and req.only_masked and (width is None or height is None):
        from .inpaint import plan

        box = plan(mask, True, padding, native_size[0] * native_size[1], MIN_SIDE, limit)
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
    sizes = {}
    for name, value in (("width", width), ("height", height)):
        try:
            value = _check_number(name, value, 1, 10**6, name.capitalize())
        except ValidationError:
            raise ValidationError(
                f"{name.capitalize()} {value} is out of range: use {MIN_SIDE}–{limit} pixels "
                f"(a multiple of {SIZE_MULTIPLE}).",
                name,
            ) from None
        snapped = _snap(value)
        if snapped < MIN_SIDE or snapped > limit:
            raise ValidationError(
                f"{name.capitalize()} {value:g} is out of range: use {MIN_SIDE}–{limit} pixels "
                f"(a multiple of {SIZE_MULTIPLE}).",
                name,
            )
        if snapped != value:
            notes.append(f"{name.capitalize()} {value:g} was snapped to {snapped} (SD3 needs multiples of {SIZE_MULTIPLE}).")
        sizes[name] = snapped
    width, height = sizes["width"], sizes["height"]
    pixels = width * height
    if not variant.min_pixels <= pixels <= variant.max_pixels and native_size[0] >= 512:
        notes.append(
            f"{width}×{height} is outside the range {variant.label} was trained for "
            f"(about {variant.min_pixels / 1e6:.2f}–{variant.max_pixels / 1e6:.1f} MP); expect weaker images."
        )

    slg = None
    want_slg = variant.slg.recommended if req.slg is None else bool(req.slg)
    if want_slg:
        if req.mode != "txt2img":
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
    if variant.distilled and req.negative_prompt.strip() and guidance <= 1.0:
        notes.append(f"{variant.label} runs without CFG: the negative prompt has no effect.")
    if req.mode == "turbo" and steps > 8:
        notes.append(f"Turbo is distilled for about 4 steps; {steps} steps cost time and rarely help.")

    inpaint_plan = None
    if mask is not None:
        from .inpaint import plan

        inpaint_plan = plan(mask, bool(req.only_masked), padding, 0, MIN_SIDE, limit, size=(width, height))
    # From here on (the pipeline loop, the metadata) the request carries the checked numbers:
    # batch_count=2.0 or strength="0.5" passed validation and must not reach range() or the pipeline.
    req = replace(req, batch_size=batch_size, batch_count=batch_count, max_sequence_length=msl,
                  **({"strength": strength} if init_image is not None else {}))
    return Resolved(req, variant, width, height, steps, guidance, seed, slg, shift, init_image, notes,
                    mask=mask, inpaint_plan=inpaint_plan, loras=loras)


def _check_loras(loras) -> list[tuple[str, float]]:
    """The request's LoRA selection as [(name, weight)]: names once each, weights in range."""
    from .lora import MAX_LORAS, MAX_WEIGHT, NAME_RE

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
            raise ValidationError(f"{name!r} is not a LoRA name (the file name without .safetensors).", "loras")
        w = _check_number("loras", weight, -MAX_WEIGHT, MAX_WEIGHT, f"The weight of LoRA {name.strip()!r}")
        if any(n == name.strip() for n, _ in out):
            raise ValidationError(f"LoRA {name.strip()!r} is selected twice; select it once.", "loras")
        out.append((name.strip(), w))
    return out


def _check_mask(req: GenerationRequest, init_image, notes: list[str]):
    """Inpaint: the mask at the image's size (L, white = repaint) and the padding."""
    from .inpaint import MAX_MASK_BLUR, MAX_PADDING, MaskError, normalize_mask

    if req.mask_image is None:
        raise ValidationError("Inpaint needs a mask: paint over the area to change, or upload a mask "
                              "(white = change, black = keep).", "mask_image")
    try:
        mask, mask_notes = normalize_mask(req.mask_image, init_image.size)
    except MaskError as e:
        raise ValidationError(str(e), "mask_image") from None
    except ValidationError as e:
        raise ValidationError(str(e).replace("The image", "The mask"), "mask_image") from None
    except (OSError, ValueError) as e:
        raise ValidationError(f"The mask could not be read ({e}). Use a PNG.", "mask_image") from None
    notes += mask_notes
    _check_number("mask_blur", req.mask_blur, 0, MAX_MASK_BLUR, "Mask blur", True)
    padding = _check_number("padding", req.padding, 0, MAX_PADDING, "Masked area padding", True)
    return mask, padding


def normalize_init_image(image):
    """Any PIL image (RGBA, P, L, CMYK, 16-bit, EXIF-rotated, animated) → an RGB image."""
    from PIL import Image, ImageOps

    if not isinstance(image, Image.Image):
        image = open_image(image)
    if getattr(image, "is_animated", False):
        image.seek(0)
    w, h = image.size
    if w < 1 or h < 1:
        raise ValidationError("The init image is empty (0 pixels).", "init_image")
    if w * h > MAX_INIT_PIXELS:
        raise ValidationError(
            f"The init image is {w}×{h} = {w * h / 1e6:.0f} MP; the limit is {MAX_INIT_PIXELS / 1e6:.0f} MP. "
            "Downscale it first.",
            "init_image",
        )
    try:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            image = image.point(lambda v: v / 256).convert("L")
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        return image.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValidationError(f"The init image could not be decoded: {e}. Try re-saving it as PNG or JPEG.",
                              "init_image") from e


def open_image(src):
    """Open an image from a path or bytes, refusing decompression bombs before decoding."""
    from PIL import Image

    try:
        if isinstance(src, (bytes, bytearray)):
            if len(src) > MAX_INIT_BYTES:
                raise ValidationError(f"The image file is over {MAX_INIT_BYTES >> 20} MB.", "init_image")
            fp = io.BytesIO(src)
        else:
            import os

            if not isinstance(src, (str, os.PathLike)):  # an int would be taken for a file descriptor
                raise ValidationError(f"The init image must be an image file, not {type(src).__name__}.",
                                      "init_image")
            if os.path.getsize(src) > MAX_INIT_BYTES:
                raise ValidationError(f"The image file is over {MAX_INIT_BYTES >> 20} MB.", "init_image")
            fp = src
        image = Image.open(fp)
        w, h = image.size
        if w * h > MAX_INIT_PIXELS:
            raise ValidationError(
                f"The image is {w}×{h} = {w * h / 1e6:.0f} MP; the limit is {MAX_INIT_PIXELS / 1e6:.0f} MP "
                "(very large images are refused before decoding). Downscale it first.",
                "init_image",
            )
        image.load()
        return image
    except ValidationError:
        raise
    except Image.DecompressionBombError as e:
        raise ValidationError(f"The image is too large to decode safely: {e}", "init_image") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ValidationError(f"The image could not be read ({e}). Is it a PNG, JPEG or WebP file?",
                              "init_image") from e


def token_notes(pipe, prompt: str, max_sequence_length: int) -> list[str]:
    """Say when the text encoders will not see the whole prompt."""
    notes = []
    if not prompt:
        return notes
    tok = getattr(pipe, "tokenizer", None)
    if tok is not None:
        n = len(tok(prompt, truncation=False, add_special_tokens=True).input_ids)
        if n > CLIP_TOKENS:
            notes.append(
                f"The prompt is {n} CLIP tokens; the CLIP encoders read only the first {CLIP_TOKENS} "
                f"(T5 reads up to {max_sequence_length})."
            )
    t5 = getattr(pipe, "tokenizer_3", None)
    if t5 is not None and getattr(pipe, "text_encoder_3", None) is not None:
        n = len(t5(prompt, truncation=False, add_special_tokens=True).input_ids)
        if n > max_sequence_length:
            more = (f"; raise max sequence length (up to {MAX_T5_TOKENS})"
                    if max_sequence_length < MAX_T5_TOKENS else "")
            notes.append(f"The prompt is {n} T5 tokens; T5 reads only the first {max_sequence_length}{more}.")
    return notes


# --- previews ---------------------------------------------------------------------------------

# ComfyUI's SD3 latent → RGB factors (16 × 3) and bias: a cheap preview with no download.
SD3_LATENT_RGB = [
    [-0.0645, 0.0177, 0.1052], [0.0028, 0.0312, 0.0650], [0.1848, 0.0762, 0.0360],
    [0.0944, 0.0360, 0.0889], [0.0897, 0.0506, -0.0364], [-0.0020, 0.1203, 0.0284],
    [0.0855, 0.0118, 0.0283], [-0.0539, 0.0658, 0.1047], [-0.0057, 0.0116, 0.0700],
    [-0.0412, 0.0281, -0.0039], [0.1106, 0.1171, 0.1220], [-0.0248, 0.0682, -0.0481],
    [0.0815, 0.0846, 0.1207], [-0.0120, -0.0055, -0.0867], [-0.0749, -0.0634, -0.0456],
    [-0.1418, -0.1457, -0.1259],
]
SD3_LATENT_RGB_BIAS = [0.2394, 0.2135, 0.1925]


def latents_to_preview(latents, max_side: int = 256):
    """A cheap RGB preview of SD3 latents (first image of the batch) as a PIL image."""
    import torch
    from PIL import Image

    lat = latents[0].detach().float().cpu()  # (16, h, w)
    factors = torch.tensor(SD3_LATENT_RGB)
    rgb = torch.einsum("chw,cr->rhw", lat, factors) + torch.tensor(SD3_LATENT_RGB_BIAS)[:, None, None]
    rgb = ((rgb.clamp(-1, 1) + 1) * 127.5).byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(rgb)
    scale = max_side / max(image.size)
    return image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))), Image.NEAREST)


# --- prompt-embedding cache -------------------------------------------------------------------


class PromptCache:
    """A bounded LRU of prompt embeddings keyed by (prompt, negative, text encoders, length, CFG).

    A hit skips all three text encoders — under offload presets that also saves moving T5 to the
    GPU for every image. Entries live on the CPU (a few MB each for the real models).
    """

    def __init__(self, max_entries: int = 16):
        from collections import OrderedDict

        self.max_entries = max_entries
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key):
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key]
            self.misses += 1
            return None

    def put(self, key, value) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


# --- the engine -------------------------------------------------------------------------------


class Engine:
    """Validates requests, runs the pipeline under the model lock, saves to the gallery."""

    def __init__(self, models, gallery=None, prompt_cache: PromptCache | None = None, masks=None):
        self.models = models
        self.gallery = gallery
        self.prompt_cache = prompt_cache if prompt_cache is not None else PromptCache()
        if masks is None and gallery is not None:
            from .inpaint import MaskStore

            masks = MaskStore(gallery.data_dir / "masks")
        self.masks = masks  # inpaint masks by content hash (metadata: mask_sha256)

    def prepare(self, req: GenerationRequest, loaded) -> Resolved:
        from .lora import LoraError

        resolved = validate(req, loaded.variant, loaded.max_side, loaded.native_size)
        req = resolved.request
        resolved.notes += token_notes(loaded.pipe, req.prompt, req.max_sequence_length)
        infos = []
        for name, weight in resolved.loras:
            try:
                infos.append((self.models.loras.info(name), weight))
            except LoraError as e:
                raise ValidationError(str(e), "loras") from None
            if weight == 0:
                resolved.notes.append(f"LoRA {name!r} has weight 0: it is off.")
        resolved.loras = infos
        return resolved

    def encode(self, pipe, loaded, prompt: str, negative: str, cfg: bool, max_sequence_length: int,
               text_loras: tuple = ()):
        """Prompt embeddings for one image, from the cache when the same prompt was seen.

        ``text_loras``: the active LoRAs that change the text encoders (sha, weight) — part of the
        key, since they change the embeddings. Transformer-only LoRAs (most SD3 LoRAs) do not."""
        import torch

        encoders = tuple(loaded.identities.get(n) for n in (
            "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"))
        key = (prompt, negative if cfg else None, cfg, max_sequence_length, encoders, str(loaded.dtype),
               tuple(text_loras))
        cached = self.prompt_cache.get(key) if None not in encoders[:2] else None
        if cached is None:
            with torch.no_grad():
                out = pipe.encode_prompt(
                    prompt=prompt, prompt_2=None, prompt_3=None,
                    negative_prompt=negative if cfg else None,
                    do_classifier_free_guidance=cfg, num_images_per_prompt=1,
                    max_sequence_length=max_sequence_length,
                )
            cached = tuple(t.detach().to("cpu") if t is not None else None for t in out)
            if None not in encoders[:2]:
                self.prompt_cache.put(key, cached)
        return cached

    def _variant_for(self, req: GenerationRequest) -> str | None:
        if req.mode == "turbo":
            return req.variant or TURBO_VARIANT
        return req.variant

    def generate(
        self,
        req: GenerationRequest,
        on_progress: Callable[[ProgressEvent], None] | None = None,
        cancel: CancelToken | None = None,
        owner: str | None = None,
        on_image: Callable[[GeneratedImage], None] | None = None,
    ) -> GenerationResult:
        with self.models.use(self._variant_for(req)) as loaded:
            resolved = self.prepare(req, loaded)
            resolved.loras = self.models.activate_loras(loaded, resolved.loras)
            if req.mode == "turbo" and not loaded.variant.distilled:
                resolved.notes.append(
                    f"Turbo mode runs on {loaded.label}, which is not the distilled Turbo model; "
                    "expect weak images at 4 steps."
                )
            return self._run(resolved, loaded, on_progress, cancel, owner, on_image)

    def _run(self, r: Resolved, loaded, on_progress, cancel, owner, on_image) -> GenerationResult:
        import torch

        req = r.request
        if req.mode == "inpaint":
            pipe = self.models.inpaint(loaded)
        else:
            pipe = self.models.img2img(loaded) if req.mode == "img2img" else loaded.pipe
        scheduler = pipe.scheduler
        if r.shift != scheduler.config.get("shift", 3.0):
            pipe.scheduler = type(scheduler).from_config(scheduler.config, shift=r.shift)
        init_sha = None
        init = None
        mask_sha = soft_mask = mask = None
        if r.mask is not None:  # inpaint: cut the box to repaint at the working size
            from .inpaint import blurred, crop_inputs

            init_sha = hashlib.sha256(r.init_image.tobytes()).hexdigest()
            soft_mask = blurred(r.mask, req.mask_blur)
            init, mask = crop_inputs(r.init_image, r.mask, r.inpaint_plan)
            mask_sha = self.masks.put(r.mask) if self.masks is not None else None
            if mask_sha is None:
                from .inpaint import mask_sha256

                mask_sha = mask_sha256(r.mask)
        elif r.init_image is not None:
            init = r.init_image.resize((r.width, r.height), resample=3) if r.init_image.size != (r.width, r.height) else r.init_image
            init_sha = hashlib.sha256(init.tobytes()).hexdigest()
        text_loras = tuple((i.sha256, w) for i, w in r.loras if i.text_encoders)
        started = time.perf_counter()
        images: list[GeneratedImage] = []
        cancelled = False
        try:
            for run in range(req.batch_count):
                if cancel and cancel.cancelled:
                    cancelled = True
                    break
                seeds = [r.seed + run * req.batch_size + k for k in range(req.batch_size)]
                run_started = time.perf_counter()

                def on_step(p, i, t, kwargs, _run=run):
                    if on_progress:
                        on_progress(ProgressEvent(i + 1, p.num_timesteps, _run, req.batch_count,
                                                  kwargs.get("latents"), time.perf_counter() - started))
                    if cancel and cancel.cancelled:
                        p._interrupt = True
                    return {}

                cfg = r.guidance > 1.0
                device = pipe._execution_device
                pe, npe, ppe, nppe = (
                    None if t is None else t.to(device).repeat_interleave(req.batch_size, 0)
                    for t in self.encode(pipe, loaded, req.prompt, req.negative_prompt, cfg,
                                         req.max_sequence_length, text_loras)
                )
                kwargs = dict(
                    prompt_embeds=pe,
                    negative_prompt_embeds=npe,
                    pooled_prompt_embeds=ppe,
                    negative_pooled_prompt_embeds=nppe,
                    num_inference_steps=r.steps,
                    guidance_scale=r.guidance,
                    height=r.height,
                    width=r.width,
                    num_images_per_prompt=1,
                    generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                    max_sequence_length=req.max_sequence_length,
                    callback_on_step_end=on_step,
                    callback_on_step_end_tensor_inputs=["latents"],
                )
                if req.mode == "img2img":
                    kwargs.update(image=init, strength=req.strength)
                elif req.mode == "inpaint":
                    kwargs.update(image=init, mask_image=mask, strength=req.strength)
                elif r.slg:
                    kwargs.update(
                        skip_guidance_layers=r.slg["layers"],
                        skip_layer_guidance_scale=r.slg["scale"],
                        skip_layer_guidance_start=r.slg["start"],
                        skip_layer_guidance_stop=r.slg["stop"],
                    )
                out = None
                try:
                    out = pipe(**kwargs)
                except torch.OutOfMemoryError:
                    pass  # handled below: inside this block the traceback still holds the activations
                if out is None:  # out of memory; the exception and its frames are gone now
                    del kwargs
                    free_memory()
                    raise GenerationError(_oom_message(loaded, r))
                if getattr(pipe, "_interrupt", False) or (cancel and cancel.cancelled):
                    cancelled = True  # the interrupted run is half-denoised: not kept
                    break
                run_s = time.perf_counter() - run_started
                for k, (image, s) in enumerate(zip(out.images, seeds)):
                    if soft_mask is not None:  # back into the source through the feathered mask
                        from .inpaint import paste_back

                        image = paste_back(r.init_image, image, soft_mask, r.inpaint_plan)
                    meta = self._metadata(r, loaded, s, run, k, init_sha, run_s, mask_sha)
                    item = GeneratedImage(image, s, meta)
                    if self.gallery is not None:  # written in the background: the next run starts now
                        item.saving = self.gallery.save_async(image, meta, owner=owner)
                    images.append(item)
                    if on_image:
                        on_image(item)
        finally:
            pipe.scheduler = scheduler
            pipe._interrupt = False
        total = time.perf_counter() - started
        return GenerationResult(images, r.seed, r.notes, cancelled, {"total_s": round(total, 3)})

    def _metadata(self, r: Resolved, loaded, seed, run, k, init_sha, run_s, mask_sha=None) -> dict:
        req = r.request
        inpaint = req.mode == "inpaint"
        width, height = r.init_image.size if inpaint else (r.width, r.height)
        meta = {
            "studio_version": __version__,
            "mode": req.mode,
            "prompt": req.prompt,
            "negative_prompt": req.negative_prompt,
            "steps": r.steps,
            "guidance": r.guidance,
            "seed": seed,
            "width": width,
            "height": height,
            "variant": loaded.variant.name,
            "model": loaded.label,
            "source": loaded.source.ref,
            "preset": loaded.placement.name,
            "dtype": str(loaded.dtype).replace("torch.", ""),
            "sampler": "Euler",
            "scheduler": type(loaded.pipe.scheduler).__name__,
            "shift": r.shift,
            "slg": r.slg,
            "max_sequence_length": req.max_sequence_length,
            "strength": req.strength if req.mode in ("img2img", "inpaint") else None,
            "init_image_sha256": init_sha,
            "batch_size": req.batch_size,
            "batch_count": req.batch_count,
            "batch_index": run,
            "image_index": k,
            "timings": {"run_s": round(run_s, 3)},
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if r.loras:
            meta["loras"] = [info.as_meta(w) for info, w in r.loras]
        if inpaint:
            meta.update({
                "mask_sha256": mask_sha,
                "mask_blur": req.mask_blur,
                "only_masked": bool(req.only_masked),
                "padding": int(req.padding) if req.only_masked else None,
                "inpaint_box": list(r.inpaint_plan.box),
                "work_size": list(r.inpaint_plan.size),
            })
        return meta


def _oom_message(loaded, r: Resolved) -> str:
    return (
        f"Out of GPU memory at {r.width}×{r.height} with {loaded.label} (preset {loaded.placement.name}). "
        "The model is still loaded. Try a smaller size or batch, or pick a lower preset in "
        "Models & Memory (e.g. 8-bit T5, NF4 or model offload)."
    )
