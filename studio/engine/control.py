"""Control images: the built-in preprocessors, each ControlNet's input transform, and previews.

A control image arrives as a file, bytes or a PIL image and goes through
``studio.engine.images.normalize_init_image(src, "control_image")`` (header checked before any
pixel is decoded; RGBA, palette, 16-bit and EXIF rotation handled) — :func:`load_control_image`.
Then, for each ControlNet of a request:

1. :func:`fit` — the image is brought to the working size (crop to fill, Forge's default "Crop and
   Resize", or stretch), LANCZOS as Stability's reference code resizes its control images;
2. the preprocessor (``preprocess``) makes the map:

   * ``canny`` — OpenCV's Canny on the grey image, ``low``/``high`` hysteresis thresholds
     (defaults 100/200, the values of the diffusers and InstantX examples), white edges on black;
   * ``blur`` — Pillow's Gaussian blur (``radius`` px);
   * ``depth`` — a depth estimator through transformers (``AutoModelForDepthEstimation`` +
     ``AutoImageProcessor``; Depth Anything V2 Small by default, downloaded on first use), its
     relative depth min–max normalised: near is bright;
   * ``none`` — the image is the map already (a pose skeleton, a tile, a depth map made
     elsewhere).

3. the model's polarity (``InputRule.invert``): Stability's SD3.5 Large depth ControlNet reads
   near = dark — its reference sample map (github.com/Stability-AI/sd3.5 ``inputs/depth.png``) has
   the near figure dark and the far sky light, and ComfyUI feeds it ``1 - d`` of the usual maps —
   so the studio's near-is-bright maps are inverted for it. The map after this step is the
   **preview**: the control image as the model sees it (:func:`control_map`; deterministic);
4. the model's encoding (:func:`encode_map`, a tensor the pipeline hands to the VAE as it is):
   ``2x - 1`` for every ControlNet except Stability's canny one, whose model card swaps in an
   image processor without normalisation and ``x * 255 * 0.5 + 0.5`` (the reference code's
   ``vae_encode`` does the same). Passing tensors, not PIL images, lets each ControlNet of a
   multi-ControlNet request have its own encoding (a pipeline-wide image processor could not).

The preprocessor settings' ranges and defaults are :data:`CONTROL_LIMITS` (``Limit`` rows, to be
merged into ``studio.engine.limits.LIMITS``).
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass

from studio.control_catalog import PREPROCESSORS, InputRule
from studio.engine.limits import CONTROL_LIMIT_NAMES, LIMITS, Limit
from studio.errors import ModelError, ValidationError

DEPTH_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"
DEPTH_ALLOW = ["*.json", "*.safetensors"]
RESIZE_MODES = ("crop", "stretch")

# The rows of studio.engine.limits.LIMITS (the one table) for the control settings.
CONTROL_LIMITS: dict[str, Limit] = {name: LIMITS[name] for name in CONTROL_LIMIT_NAMES}


def _default(name: str):
    return CONTROL_LIMITS[name].default


def _check(name: str, value, field: str | None = None) -> float:
    lim = CONTROL_LIMITS[name]
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValidationError(f"{lim.label} must be a number ({lim.range_text()}).", field or name) from None
    if not (math.isfinite(v) and lim.lo <= v <= lim.hi):
        raise ValidationError(f"{lim.label} is {value}; it must be within {lim.range_text()}.", field or name)
    return v


@dataclass(frozen=True)
class ControlSettings:
    """How one control image becomes a map (the request's ``preprocess`` and its settings)."""

    preprocess: str = "none"
    canny_low: int = _default("canny_low")
    canny_high: int = _default("canny_high")
    blur_radius: float = _default("blur_radius")
    invert: bool | None = None  # None: the model's polarity rule; True/False: forced
    resize: str = "crop"

    def checked(self) -> ControlSettings:
        """The settings validated (ValidationError naming the field otherwise), numbers in range."""
        if self.preprocess not in PREPROCESSORS:
            raise ValidationError(f"Unknown preprocessor {self.preprocess!r}: use one of {', '.join(PREPROCESSORS)}.",
                                  "preprocess")
        if self.resize not in RESIZE_MODES:
            raise ValidationError(f"Unknown resize mode {self.resize!r}: use {' or '.join(RESIZE_MODES)}.", "resize")
        low = int(_check("canny_low", self.canny_low))
        high = int(_check("canny_high", self.canny_high))
        if low > high:
            raise ValidationError(f"The canny low threshold ({low}) is above the high one ({high}); swap them.",
                                  "canny_low")
        return ControlSettings(self.preprocess, low, high, _check("blur_radius", self.blur_radius),
                               self.invert, self.resize)

    def as_meta(self) -> dict:
        """The settings that made the map (metadata; Forge's infotext shows the module)."""
        meta = {"preprocess": self.preprocess, "resize": self.resize}
        if self.preprocess == "canny":
            meta.update(canny_low=self.canny_low, canny_high=self.canny_high)
        elif self.preprocess == "blur":
            meta["blur_radius"] = self.blur_radius
        if self.invert is not None:
            meta["invert"] = self.invert
        return meta


def load_control_image(src):
    """A control image from a path, FileData, bytes or PIL image → RGB, header checked first."""
    from studio.engine.images import normalize_init_image

    return normalize_init_image(src, "control_image")


# --- the steps ---------------------------------------------------------------------------------


def fit(image, width: int, height: int, mode: str = "crop"):
    """``image`` at exactly ``width`` × ``height``: scaled to cover and centre-cropped ("crop"),
    or stretched ("stretch"). LANCZOS, as Stability's reference code resizes control images."""
    from PIL import Image, ImageOps

    image = image.convert("RGB")
    if image.size == (width, height):
        return image
    if mode == "stretch":
        return image.resize((width, height), Image.LANCZOS)
    return ImageOps.fit(image, (width, height), Image.LANCZOS, centering=(0.5, 0.5))


def canny(image, low: int = _default("canny_low"), high: int = _default("canny_high")):
    """White edges on black (RGB), from OpenCV's Canny on the grey image. Deterministic."""
    import cv2
    import numpy as np
    from PIL import Image

    grey = np.asarray(image.convert("L"), dtype=np.uint8)
    edges = cv2.Canny(grey, int(low), int(high))
    return Image.fromarray(edges, mode="L").convert("RGB")


def blur(image, radius: float = _default("blur_radius")):
    """A Gaussian-blurred RGB copy of ``image`` (``radius`` in px)."""
    from PIL import ImageFilter

    return image.convert("RGB").filter(ImageFilter.GaussianBlur(radius=float(radius)))


class DepthEstimator:
    """A transformers depth estimator (``AutoModelForDepthEstimation`` + ``AutoImageProcessor``).

    ``source``: a Hub id (downloaded on first use, progress reported) or a local folder holding
    the model's config, weights and ``preprocessor_config.json``."""

    def __init__(self, source: str = DEPTH_MODEL):
        self.source = source
        self._lock = threading.Lock()
        self._model = None
        self._processor = None

    def _folder(self, progress):
        from pathlib import Path

        local = Path(self.source).expanduser()
        if local.is_dir():
            return local
        if local.suffix or self.source.startswith((".", "/", "~")):
            raise ModelError(f"The depth model folder {self.source} does not exist. Give a folder holding a "
                             f"transformers depth model, or the Hub id {DEPTH_MODEL}.")
        from huggingface_hub.errors import LocalEntryNotFoundError

        from studio.models.controlnet import hub_snapshot

        try:
            return hub_snapshot(self.source, DEPTH_ALLOW, progress, what="the depth model")
        except ModelError as e:
            if isinstance(e.__cause__, LocalEntryNotFoundError):
                raise ModelError(missing_depth_model_message(self.source)) from e
            raise

    def load(self, progress=None) -> DepthEstimator:
        """Load the processor and model once (downloading a Hub id first); returns self. ModelError
        when it cannot be loaded."""
        with self._lock:
            if self._model is None:
                from transformers import AutoImageProcessor, AutoModelForDepthEstimation

                folder = self._folder(progress)
                if progress:
                    progress(f"Loading the depth model {self.source}", None)
                try:
                    self._processor = AutoImageProcessor.from_pretrained(folder)
                    self._model = AutoModelForDepthEstimation.from_pretrained(folder, use_safetensors=True).eval()
                except (OSError, ValueError) as e:
                    raise ModelError(f"Could not load the depth model from {folder}: {str(e).splitlines()[0][:200]}"
                                     ) from e
        return self

    def __call__(self, image, progress=None):
        """Relative depth of ``image`` at its own size, min–max normalised to 0..1: near is bright
        (Depth Anything predicts relative inverse depth). A flat prediction gives a black map."""
        import numpy as np
        import torch

        self.load(progress)
        inputs = self._processor(images=image.convert("RGB"), return_tensors="pt")
        with torch.inference_mode():
            out = self._model(**inputs)
        depth = self._processor.post_process_depth_estimation(out, target_sizes=[image.size[::-1]])[0]["predicted_depth"]
        d = depth.float().cpu().numpy()
        lo, hi = float(np.min(d)), float(np.max(d))
        return (d - lo) / (hi - lo) if hi > lo else np.zeros_like(d)


def missing_depth_model_message(source: str = DEPTH_MODEL) -> str:
    """What to do when the depth model is not on this machine and the Hub is out of reach."""
    return (f"The depth preprocessor needs the depth model {source}, which is not on this machine, and the "
            f"Hub cannot be reached. Download it once while online: `hf download {source}` (about 100 MB), "
            "or point the depth model setting at a local folder that holds a transformers depth model — "
            "or make the depth map elsewhere and upload it with preprocessor 'none'.")


_ESTIMATORS: dict[str, DepthEstimator] = {}
_ESTIMATORS_LOCK = threading.Lock()


def depth_estimator(source: str = DEPTH_MODEL) -> DepthEstimator:
    """The shared estimator for ``source`` (loaded on first use, then kept)."""
    with _ESTIMATORS_LOCK:
        if source not in _ESTIMATORS:
            _ESTIMATORS[source] = DepthEstimator(source)
        return _ESTIMATORS[source]


def depth(image, estimator: DepthEstimator | None = None, progress=None):
    """A depth map (RGB, near is bright) of ``image`` at its own size."""
    import numpy as np
    from PIL import Image

    d = (estimator or depth_estimator())(image, progress)
    return Image.fromarray(np.round(d * 255).astype(np.uint8), mode="L").convert("RGB")


def control_map(image, settings: ControlSettings, rule: InputRule, width: int, height: int,
                estimator: DepthEstimator | None = None, progress=None):
    """The control image as the model sees it (the preview): fitted to the working size,
    preprocessed, and in the model's polarity. RGB, ``width`` × ``height``, deterministic."""
    from PIL import ImageOps

    s = settings.checked()
    image = fit(image, width, height, s.resize)
    if s.preprocess == "canny":
        image = canny(image, s.canny_low, s.canny_high)
    elif s.preprocess == "blur":
        image = blur(image, s.blur_radius)
    elif s.preprocess == "depth":
        image = depth(image, estimator, progress)
    invert = rule.invert if s.invert is None else s.invert
    return ImageOps.invert(image.convert("RGB")) if invert else image


preview = control_map


def encode_map(map_image, rule: InputRule):
    """The map as the tensor the ControlNet pipeline encodes with its VAE: (1, 3, H, W) float32,
    ``2x - 1`` or Stability canny's ``x * 255 * 0.5 + 0.5`` (x in 0..1)."""
    import numpy as np
    import torch

    x = torch.from_numpy(np.asarray(map_image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    if rule.encoding == "sd35-canny":
        return x * 255 * 0.5 + 0.5
    return x * 2.0 - 1.0


@contextmanager
def control_rng(seed: int, device=None):
    """Run a ControlNet pipeline call inside this: diffusers samples the control image's VAE
    latents with the *global* RNG (``self.vae.encode(control_image).latent_dist.sample()`` in both
    SD3 ControlNet pipelines, no generator), so without it one seed gives different images from
    run to run. The global RNG state is restored afterwards."""
    import torch

    devices = [device] if device is not None and torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed) % 2**63)
        yield


def control_kwargs(tensors: list, scales: list[float], starts: list[float], ends: list[float], *,
                   inpaint: tuple | None = None) -> dict:
    """The keyword arguments of a StableDiffusion3ControlNet(Inpainting)Pipeline call for one or
    several ControlNets (lists for several; one scale, start and end each). ``inpaint``: (image,
    mask) PIL images for the inpainting ControlNet (white = repaint), which takes them itself."""
    n = len(scales)
    if not (len(starts) == len(ends) == n) or (inpaint is None and len(tensors) != n):
        raise ValueError("one control image, scale, start and end per ControlNet")
    for s, e in zip(starts, ends, strict=True):
        if s >= e:
            raise ValidationError(f"Control start ({s}) must be before control end ({e}).", "control_start")
    if inpaint is not None:
        image, mask = inpaint
        images = [image] * n if n > 1 else image
        return dict(control_image=images, control_mask=mask,
                    controlnet_conditioning_scale=scales if n > 1 else scales[0],
                    control_guidance_start=starts if n > 1 else starts[0],
                    control_guidance_end=ends if n > 1 else ends[0])
    if n == 1:
        return dict(control_image=tensors[0], controlnet_conditioning_scale=float(scales[0]),
                    control_guidance_start=float(starts[0]), control_guidance_end=float(ends[0]))
    return dict(control_image=list(tensors), controlnet_conditioning_scale=[float(s) for s in scales],
                control_guidance_start=[float(s) for s in starts], control_guidance_end=[float(e) for e in ends])
