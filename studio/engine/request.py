"""What a generation is asked for and what it gives back.

``GenerationRequest`` is the one input of ``Engine.generate``; :func:`build_request` is the one
way to make it from a dict of fields — UI values, API parameters, CLI flags, or the metadata of a
gallery image ("reuse parameters") — so defaults are filled in exactly one place (from
``studio.engine.limits``) and values are passed on as they came, for the engine to check.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from studio.engine.limits import IMAGE_MODES, LIMITS, default
from studio.engine.stepcache import SPEED_DEFAULT
from studio.errors import ValidationError
from studio.metadata.loras import parse_selection


@dataclass
class GenerationRequest:
    """One generation: every field a tab, the API or the CLI can set. None = the default."""

    prompt: str
    negative_prompt: str = ""
    mode: str = "txt2img"  # see limits.MODES
    width: int | None = None  # None: the model's native size (img2img: the init image's)
    height: int | None = None
    steps: int | None = None  # None: the variant's recommended value
    guidance: float | None = None
    seed: int = -1  # -1: random; the seed used is reported
    batch_count: int = 1  # how many times to run
    batch_size: int = 1  # images per run
    strength: float | None = None  # img2img and inpaint; None: the mode's default
    init_image: object | None = None  # a path (preferred: checked before decoding), bytes or PIL image
    mask_image: object | None = None  # inpaint: white (or painted alpha) = repaint
    mask_blur: int = 4  # inpaint: feathering (px) of the paste-back
    only_masked: bool = False  # inpaint: repaint only the mask's box (+ padding) at full resolution
    padding: int = 32  # inpaint, only_masked: context (px) around the mask's box
    loras: list = field(default_factory=list)  # [(name, weight)]: the LoRAs in <data-dir>/loras
    slg: bool | None = None  # Skip Layer Guidance; None: the variant's advice
    max_sequence_length: int = 256  # T5 tokens
    shift: float | None = None  # scheduler shift; None: LIMITS["shift"].default (3.0, every SD3/3.5 release's)
    variant: str | None = None  # None: the loaded model (turbo mode: Large Turbo)
    # Sampling and prompt control (#16): names as Forge writes them (studio.engine.samplers)
    sampler: str | None = None  # None: "Euler", SD3's own
    schedule: str | None = None  # None / "Automatic": the sampler's default (Euler: "Normal", today's)
    prompt_3: str = ""  # what T5 reads instead of the prompt ("": the prompt)
    negative_prompt_3: str = ""  # what T5 reads instead of the negative prompt
    styles: list = field(default_factory=list)  # styles.csv names, applied in order (studio.engine.styles)
    prompt_weighting: bool = True  # A1111 (word:1.2) syntax and 75-token CLIP chunks; False: literal text
    emphasis: str = "Original"  # A1111's emphasis mode: "Original" | "No norm"
    # Hires fix (#17): txt2img and Turbo; hires_scale None or 1 = off
    hires_scale: float | None = None  # upscale factor of the first pass's image
    hires_steps: int | None = None  # second-pass steps; None or 0: half the first pass's
    hires_denoise: float | None = None  # None: the mode's default (limits)
    hires_upscaler: str | None = None  # "Lanczos" (None), "latent-bislerp", "latent-nearest-exact" or a model's name
    hires_variant: str | None = None  # another variant for the second pass (Large → Medium); None: the same model
    # decode the second pass in VAE tiles; None: past HIRES_VAE_TILING_PIXELS (the service sets True
    # when the planner says the loaded preset decodes the hires size only in tiles)
    hires_vae_tiling: bool | None = None
    # ControlNet (#15): one control unit in these fields, more in ``controls`` (studio.engine.control)
    control_image: object | None = None  # a path (checked before decoding), bytes or PIL image
    control_type: str | None = None  # control_catalog.CONTROL_TYPES; None: the ControlNet's, else canny
    controlnet: str | None = None  # catalog id, Hub id, folder or .safetensors; None: the catalog's for the model
    control_scale: float | None = None  # None: the ControlNet's recommendation
    control_start: float | None = None
    control_end: float | None = None
    preprocess: str | None = None  # control_catalog.PREPROCESSORS; None: the ControlNet's; "none": a ready map
    canny_low: int | None = None
    canny_high: int | None = None
    blur_radius: float | None = None
    control_invert: bool | None = None  # None: the model's polarity rule
    control_resize: str | None = None  # "crop" (default) | "stretch"
    controls: list = field(default_factory=list)  # more units: dicts with the keys of CONTROL_KEYS
    depth_model: str | None = None  # the depth preprocessor's model (None: Depth Anything V2 Small)
    # Speed (#19): step caching, studio.engine.stepcache.SPEED_MODES; "off" computes every step (exact)
    speed: str = SPEED_DEFAULT


REQUEST_FIELDS = tuple(f.name for f in dataclasses.fields(GenerationRequest))
# The keys of one control unit (the request's own control_* fields, or one dict of ``controls``).
CONTROL_KEYS = ("control_image", "control_type", "controlnet", "control_scale", "control_start", "control_end",
                "preprocess", "canny_low", "canny_high", "blur_radius", "control_invert", "control_resize")
_SLG = {"auto": None, "on": True, "off": False, "true": True, "false": False}



def build_request(fields: Mapping, mode: str | None = None) -> GenerationRequest:
    """The request for a dict of fields (unknown keys are ignored; missing or None ones default).

    Defaults come from the limits table for the mode (strength 0.6 for img2img, 0.85 for
    inpaint, …). Numbers are passed on as they came — ``steps=1.5`` or ``width="abc"`` reach
    :func:`studio.engine.validate`, which refuses them naming the field — so no value is ever
    rounded or coerced here. ``slg`` takes auto/on/off or a bool; ``loras`` takes the text form
    (``name:0.8, other`` or ``<lora:name:0.8>``) or [(name, weight)] pairs.
    """
    mode = mode or fields.get("mode") or "txt2img"
    values: dict = {"mode": mode}
    for name in REQUEST_FIELDS:
        if name == "mode" or name not in fields:
            continue
        value = fields[name]
        if value is None or (isinstance(value, str) and value == "" and name not in ("prompt", "negative_prompt")):
            continue
        values[name] = value
    for name in ("prompt", "negative_prompt"):
        values[name] = "" if values.get(name) is None else values[name]
    for name, lim in LIMITS.items():
        if name in REQUEST_FIELDS and name not in values and lim.default_for(mode) is not None:
            values[name] = lim.default_for(mode)
    if "slg" in values and isinstance(values["slg"], str):
        key = values["slg"].strip().lower()
        if key not in _SLG:
            raise ValidationError(f"Skip Layer Guidance is {values['slg']!r}; use auto, on or off.", "slg")
        values["slg"] = _SLG[key]
    if "loras" in values:
        try:
            values["loras"] = parse_selection(values["loras"])
        except ValueError as e:
            raise ValidationError(str(e), "loras") from None
    if "only_masked" in values:
        values["only_masked"] = bool(values["only_masked"])
    if isinstance(values.get("controls"), dict):
        values["controls"] = [values["controls"]]
    if isinstance(values.get("styles"), str):  # one name (style names may hold commas)
        values["styles"] = [values["styles"]]
    elif isinstance(values.get("styles"), tuple):
        values["styles"] = list(values["styles"])
    return GenerationRequest(**values)


def strength_default(mode: str) -> float:
    """The default img2img / inpaint strength of ``mode``."""
    return default("strength", mode)


@dataclass
class Resolved:
    """A validated request with every default filled in."""

    request: GenerationRequest
    variant: object  # catalog.Variant
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
    sampler: str = "Euler"  # checked names (studio.engine.samplers)
    schedule: str = "Normal"
    prompt: str = ""  # what the encoders read: the prompt with its styles applied
    negative_prompt: str = ""
    hires: HiresPlan | None = None  # the hires fix's second pass, when asked for
    controls: list = field(default_factory=list)  # [ControlUnit]

    @property
    def effective_steps(self) -> int:
        """The denoising steps the pass really runs: about steps × strength for img2img and inpaint
        (as diffusers runs them), all of them otherwise and with a ControlNet."""
        if self.request.mode not in IMAGE_MODES or self.controls:  # the inpainting ControlNet starts from noise
            return self.steps
        return self.steps - int(max(self.steps - self.steps * self.request.strength, 0))

    @property
    def total_steps(self) -> int:
        """Denoising steps of the whole request's run: both passes of a hires fix."""
        return self.effective_steps + (self.hires.effective_steps if self.hires else 0)


@dataclass
class ControlUnit:
    """One ControlNet of a request, checked (the net itself is loaded by ``Engine.prepare``)."""

    control_type: str
    source: str | None  # what names the ControlNet (None: the default for the model, chosen in prepare)
    entry: object | None  # its control_catalog entry, when it is one
    settings: object  # engine.control.ControlSettings
    scale: float | None  # None: the ControlNet's recommendation (filled in prepare)
    start: float
    end: float
    image: object | None  # the control image (RGB); None for an inpainting ControlNet (it reads the init image)
    net: object = None  # models.controlnet.LoadedControlNet (after prepare)
    rule: object = None  # control_catalog.InputRule (after prepare)

    @property
    def inpaint(self) -> bool:
        """Whether this is an inpainting ControlNet (it reads the init image and mask, no control image)."""
        return self.control_type == "inpaint"


@dataclass
class HiresPlan:
    """The second pass of a hires-fix request, resolved."""

    scale: float
    width: int  # the second pass's size (a multiple of 16)
    height: int
    steps: int  # num_inference_steps of the img2img pass (it runs int(steps × denoise) of them)
    denoise: float
    upscaler: str  # "Lanczos", a latent upscaler or a model's name
    variant: str | None = None  # another variant for the second pass
    latent: bool = False  # the first pass's latents are upscaled (no VAE decode/encode between)
    vae_tiling: bool = False  # decode the second pass in tiles (engine.limits.HIRES_VAE_TILING_PIXELS)
    info: object = None  # UpscalerInfo of a model upscaler (after Engine.prepare)

    @property
    def effective_steps(self) -> int:
        """The steps the img2img pass runs (diffusers' ``get_timesteps``, as Resolved's)."""
        return self.steps - int(max(self.steps - self.steps * self.denoise, 0))


@dataclass
class GeneratedImage:
    """One finished image, its seed and its metadata; ``saving`` is the gallery's background save."""

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
        """The gallery id, when saved to the gallery."""
        saved = self.saved
        return saved.id if saved is not None else None


@dataclass
class GenerationResult:
    """What ``Engine.generate`` returns: the images (possibly fewer when cancelled) and notes."""

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
        if m.get("mode") == "upscale":  # Studio.upscale: no generation ran
            source = m.get("source_size") or ["?", "?"]
            lines = [(f"Upscaled {source[0]}×{source[1]} by {m.get('upscale_scale')} with {m.get('upscale_upscaler')}: "
                      f"{m['width']}×{m['height']}, {self.timings.get('total_s', 0):.1f}s")]
        else:
            lines = [
                f"{len(self.images)} image(s), {m['width']}×{m['height']}, {m['steps']} steps, "
                f"CFG {m['guidance']}, seed {self.seed}, {m['model']}, {self.timings.get('total_s', 0):.1f}s"
            ]
            if m.get("hires_size"):
                lines[0] += f"; hires fix to {m['hires_size'][0]}×{m['hires_size'][1]}"
        if self.cancelled:
            lines.append("Cancelled: the finished images were kept.")
        lines += self.notes
        return "\n".join(lines)


@dataclass
class ProgressEvent:
    """One denoising step done (the engine calls ``on_progress`` with it)."""

    step: int  # steps done in this run (1-based)
    steps: int  # steps in this run
    run: int  # 0-based run index (batch_count)
    runs: int
    latents: object | None = None  # torch tensor (for previews)
    elapsed_s: float = 0.0

    @property
    def fraction(self) -> float:
        """How much of the whole request is done, 0..1 (runs and steps together)."""
        return (self.run + self.step / max(self.steps, 1)) / max(self.runs, 1)

    @property
    def eta_s(self) -> float | None:
        """Seconds left, extrapolated from the time so far (None before any progress)."""
        f = self.fraction
        return self.elapsed_s * (1 - f) / f if f > 0 else None


class CancelToken:
    """Set from any thread; the engine stops between denoising steps and keeps finished images."""

    def __init__(self):
        self._event = threading.Event()

    def cancel(self) -> None:
        """Ask the engine to stop after the current step."""
        self._event.set()

    def reset(self) -> None:
        """Clear a cancel, so the token serves the next job."""
        self._event.clear()

    @property
    def cancelled(self) -> bool:
        """Whether a cancel was asked for."""
        return self._event.is_set()
