"""The one table of limits and defaults.

The engine validates against it; the UI's sliders, the API's defaults and the CLI's flags and
``--help`` read from it. A limit, a default or a mode list is written here once and nowhere else
(``tests/test_limits.py`` holds every slider's range equal to the engine's).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from studio.catalog import MAX_SIDE, MAX_T5_TOKENS, MIN_SIDE, SIZE_MULTIPLE

MODES = ("txt2img", "img2img", "inpaint", "turbo")
IMAGE_MODES = ("img2img", "inpaint")  # the modes that start from an init image

# Seeds: any 64-bit unsigned value (ComfyUI writes 15-digit seeds); random seeds stay 32-bit.
MAX_SEED = 2**64 - 1
RANDOM_SEED_MAX = 2**32 - 1

MAX_IMAGES = 100  # batch count × batch size, per request
MAX_PROMPT_CHARS = 10_000
MAX_LORAS = 8  # per request
MAX_STYLES_PER_REQUEST = 16  # styles.csv styles applied to one request
MAX_CLIP_CHUNKS = 8  # 75-token CLIP chunks read from a weighted prompt (600 tokens); longer is refused

# Every image input (init image, mask, control image, upscale input) is checked from its header,
# before any pixel is decoded: file size, width × height, and aspect ratio.
MAX_IMAGE_BYTES = 50 << 20
MAX_IMAGE_PIXELS = 40_000_000
MAX_IMAGE_ASPECT = MAX_SIDE // MIN_SIDE  # 8:1, the widest image SD3 can make (2048×256)


@dataclass(frozen=True)
class Limit:
    """One numeric input: its range, its UI step and its default (per mode where it differs).

    ``default`` None means "the variant decides" (steps, guidance) or "the model's native size"
    (width, height); ``ui_min``/``ui_max`` narrow a slider where the full range is unusable as a
    slider (the engine still accepts the whole range from the API and the CLI)."""

    name: str
    label: str
    lo: float
    hi: float
    step: float = 1
    default: object = None
    integer: bool = False
    mode_defaults: Mapping[str, object] = field(default_factory=dict)
    help: str = ""

    def default_for(self, mode: str | None = None):
        """The default for ``mode`` (the general default where the mode has none of its own)."""
        return self.mode_defaults.get(mode, self.default)

    def range_text(self) -> str:
        """The range as text, e.g. ``1–150``."""
        fmt = (lambda v: f"{int(v)}") if self.integer else (lambda v: f"{v:g}")
        return f"{fmt(self.lo)}–{fmt(self.hi)}"


LIMITS: dict[str, Limit] = {
    limit.name: limit
    for limit in (
        Limit("steps", "Steps", 1, 150, 1, None, True, {"turbo": 4},
              help="denoising steps (default: the variant's recommendation)"),
        Limit("guidance", "Guidance (CFG scale)", 0.0, 30.0, 0.1, None,
              help="classifier-free guidance; 1 or less turns CFG off (default: the variant's)"),
        Limit("seed", "Seed", -1, MAX_SEED, 1, -1, True, help="-1 = random; any 64-bit value"),
        Limit("batch_count", "Batch count", 1, MAX_IMAGES, 1, 1, True, help="runs, one after another"),
        Limit("batch_size", "Batch size", 1, 8, 1, 1, True, help="images per run"),
        Limit("strength", "Strength", 0.0, 1.0, 0.01, 0.6, False, {"inpaint": 0.85},
              help="how much of the init image to repaint (0 keeps it, 1 ignores it)"),
        Limit("max_sequence_length", "Max sequence length (T5 tokens)", 1, MAX_T5_TOKENS, 1, 256, True,
              help="T5 tokens read from the prompt"),
        Limit("shift", "Scheduler shift", 0.1, 20.0, 0.1, 3.0, help="flow-matching timestep shift"),
        Limit("mask_blur", "Mask blur (px)", 0, 64, 1, 4, True, help="feathering of the inpaint seam"),
        Limit("padding", "Only masked: padding (px)", 0, 512, 1, 32, True,
              help="context around the mask's box when repainting only the masked area"),
        Limit("width", "Width", MIN_SIDE, MAX_SIDE, SIZE_MULTIPLE, None, True,
              help=f"pixels, snapped to a multiple of {SIZE_MULTIPLE} (default: the model's native size)"),
        Limit("height", "Height", MIN_SIDE, MAX_SIDE, SIZE_MULTIPLE, None, True,
              help=f"pixels, snapped to a multiple of {SIZE_MULTIPLE} (default: the model's native size)"),
        Limit("lora_weight", "LoRA weight", -4.0, 4.0, 0.05, 1.0, help="0 turns a LoRA off"),
        # Hires fix (#17): a first pass, an upscale, a second (img2img) pass at the new size
        Limit("hires_scale", "Hires upscale by", 1.0, 4.0, 0.05, None,
              help="1 or none = off; past the size limits it is refused naming the largest factor allowed"),
        Limit("hires_steps", "Hires steps", 0, 150, 1, None, True, help="0 or none: half the first pass's steps (at least one step at the denoise)"),
        Limit("hires_denoise", "Hires denoising strength", 0.0, 1.0, 0.01, 0.35, False, {"turbo": 0.5},
              help="how much the second pass repaints the upscaled image"),
        # Upscaling an existing image (Studio.upscale)
        Limit("upscale_scale", "Upscale by", 1.05, 8.0, 0.05, 2.0,
              help=f"the result must stay within {MAX_IMAGE_PIXELS // 10**6} MP (a refine pass: {MAX_SIDE} px a side)"),
        Limit("refine_denoise", "Refine strength", 0.0, 1.0, 0.01, 0.3,
              help="the optional img2img pass over the upscaled image"),
        # ControlNet (#15): one row per setting of a control unit (studio.engine.control reads them)
        Limit("control_scale", "Control weight", 0.0, 2.0, 0.05, None,
              help="ControlNet conditioning scale (default: the ControlNet's recommendation)"),
        Limit("control_start", "Control start", 0.0, 1.0, 0.01, 0.0, help="fraction of the steps where control begins"),
        Limit("control_end", "Control end", 0.0, 1.0, 0.01, 1.0, help="fraction of the steps where control ends"),
        Limit("canny_low", "Canny low threshold", 0, 255, 1, 100, True, help="edges weaker than this are dropped"),
        Limit("canny_high", "Canny high threshold", 0, 255, 1, 200, True, help="edges stronger than this are kept"),
        Limit("blur_radius", "Blur radius (px)", 0.0, 64.0, 0.5, 8.0,
              help="Gaussian blur radius at the working size (the studio's choice; Stability's card "
                   "preprocessing could not be read here)"),
    )
}

CONTROL_LIMIT_NAMES = ("control_scale", "control_start", "control_end", "canny_low", "canny_high", "blur_radius")
MAX_CONTROLNETS = 3  # ControlNets in one request (each is a few GB for the real models)

# Hires fix: the VAE decodes in tiles when the second pass's image is larger than this (a hook for
# the memory planner, which has no hires estimate yet: a full decode at 1536² in bf16 takes about
# 6 GB on CUDA, studio.memory.bytes.vae_decode_bytes).
HIRES_VAE_TILING_PIXELS = 1536 * 1536

# What the gallery lists besides the generation modes: Studio.upscale's results.
GALLERY_MODES = (*MODES, "upscale")


def limit(name: str) -> Limit:
    """The :class:`Limit` called ``name``."""
    return LIMITS[name]


def default(name: str, mode: str | None = None):
    """The default of one input for a mode (None: the variant or the model decides)."""
    return LIMITS[name].default_for(mode)


def snap(value: float, multiple: int = SIZE_MULTIPLE) -> int:
    """The one size snapping: to the nearest multiple, never below one multiple; a value exactly
    between two multiples goes to the even one, as Python's ``round`` does (1016 → 1024,
    1000 → 992, 8 → 16). Every caller — the engine, the planner, inpaint's working size, the UI —
    snaps through here, so one size means the same everywhere."""
    return max(multiple, int(round(float(value) / multiple)) * multiple)
