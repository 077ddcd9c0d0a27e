"""Running an upscale: model upscalers in tiles with feathered seams, Lanczos, and latent upscales.

Three kinds of upscaler, by name (``studio.models.upscalers`` lists the files):

``Lanczos``
    Pillow's Lanczos resampling of the image. No model, no GPU.
*a model file* (``4x-UltraSharp``, ``RealESRGAN_x4plus``, …)
    spandrel's model, run in **tiles**: the image is cut into ``tile``-pixel squares that overlap
    by ``overlap`` pixels, each tile is upscaled on its own, and the tiles are blended back with
    weights that fall linearly to (almost) zero across each overlap (never at the image's own
    border). The weights of every output pixel are normalised to sum to one, so a flat image
    stays exactly flat and a seam is a gradual cross-fade over ``overlap × scale`` pixels rather
    than a cut. On out-of-memory the tile is halved and the image started again, down to
    ``min_tile`` (ComfyUI's policy: 512 → 256 → 128), and the result's notes say so
    (``tile 512 → 256 after running out of memory``). A model's own factor (2×, 4×) is applied
    as many times as the target needs (at most :data:`MAX_MODEL_PASSES`), then Lanczos makes the
    exact target size — A1111's way for a 4× model asked for 2×.
``latent-bislerp`` / ``latent-nearest-exact``
    for hires fix only: the first pass's latents (SD3: (B, 16, h, w), scaled as the pipeline's
    ``output_type="latent"`` returns them) are enlarged directly, with no VAE decode/encode in
    between. ``bislerp`` is ComfyUI's (``comfy/utils.py``): bilinear sampling positions, but
    each pair of latent vectors is joined by spherical interpolation of their direction and
    linear interpolation of their length, which keeps the latents' norm statistics where plain
    bilinear shrinks them. ``nearest-exact`` is ``torch.nn.functional.interpolate``'s.

Size limits: :func:`largest_scale` tells the largest factor whose result stays within the
studio's limits — ``MAX_IMAGE_PIXELS`` for an image that is only upscaled (so the gallery can
open it again), and the generation limit (catalog ``MAX_SIDE`` per side, or the loaded
model's lower ``max_side``) when a diffusion pass runs at the new size (hires fix, refine);
:func:`check_scale` refuses a factor past it naming the largest allowed.

Images come in as PIL images and go through ``studio.engine.images`` (header-checked; any mode
→ RGB); this module opens no file itself. torch and spandrel are imported inside the functions
that need them, so importing this module costs nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from studio.catalog import MAX_SIDE, SIZE_MULTIPLE, VAE_FACTOR
from studio.engine.images import normalize_init_image
from studio.engine.limits import MAX_IMAGE_PIXELS, snap
from studio.errors import GenerationError, StudioError, ValidationError
from studio.models.upscalers import BUILTIN_UPSCALERS, LATENT_UPSCALERS, LoadedUpscaler, UpscalerError

DEFAULT_TILE = 512  # input pixels a tile (ComfyUI's default; A1111's ESRGAN tile is 192)
DEFAULT_OVERLAP = 32  # input pixels shared by neighbouring tiles
MIN_TILE = 128  # halving on out-of-memory stops here
MAX_MODEL_PASSES = 3  # a 2× model asked for 8× runs three times (A1111's limit too)
LANCZOS = BUILTIN_UPSCALERS[0]
LATENT_BISLERP, LATENT_NEAREST_EXACT = LATENT_UPSCALERS

Progress = Callable[[int, int], None]  # (tiles done, tiles in all); raise from it to stop


@dataclass
class UpscaleResult:
    """An upscaled image and how it was made."""

    image: object  # PIL.Image, RGB
    upscaler: str  # the name asked for: "Lanczos" or a model's name
    source_size: tuple[int, int]
    tile: int | None = None  # the tile size the model finally ran at (None: no model, or untiled)
    passes: int = 0  # model passes
    notes: list[str] = field(default_factory=list)
    info: object = None  # UpscalerInfo of a model upscaler
    seconds: float = 0.0

    @property
    def size(self) -> tuple[int, int]:
        """The upscaled image's (width, height)."""
        return self.image.size

    @property
    def scale(self) -> float:
        """The factor it was upscaled by (its width over the source's, 4 decimals)."""
        return round(self.image.size[0] / self.source_size[0], 4)

    def as_meta(self) -> dict:
        """The metadata fields of the upscale (see the integration plan: ``upscaler``, its hash)."""
        meta = {"upscaler": self.upscaler, "upscale": self.scale, "upscale_from": list(self.source_size)}
        if self.info is not None:
            meta["upscaler_model"] = self.info.as_meta()
        if self.tile is not None:
            meta["upscale_tile"] = self.tile
        return meta


# --- sizes and limits ------------------------------------------------------------------------


def target_size(width: int, height: int, scale: float, multiple: int = 1) -> tuple[int, int]:
    """The size ``scale`` × (width, height) rounds to; a ``multiple`` above 1 (the model's: 16 for
    SD3) snaps it for a diffusion pass (``limits.snap``, the one snapping)."""
    w, h = width * float(scale), height * float(scale)
    if multiple > 1:
        return snap(w, multiple), snap(h, multiple)
    return max(1, round(w)), max(1, round(h))


def _fits(size: tuple[int, int], generation: bool, max_side: int, max_pixels: int) -> bool:
    w, h = size
    if generation and max(w, h) > max_side:
        return False
    return w * h <= max_pixels


def largest_scale(width: int, height: int, *, generation: bool = False, max_side: int | None = None,
                  max_pixels: int = MAX_IMAGE_PIXELS, multiple: int = SIZE_MULTIPLE) -> float:
    """The largest factor (to 0.01, rounded down) whose result stays within the size limits.

    ``generation``: a diffusion pass runs at the result (hires fix, refine), so each side must
    also be at most ``max_side`` (default: catalog ``MAX_SIDE``; pass the loaded model's
    ``max_side`` where it is lower) after snapping to ``multiple`` (the model's: 16 for SD3).
    Otherwise only the pixel count counts
    (``MAX_IMAGE_PIXELS``: what ``open_image`` accepts back). 0.0 when even 1× does not fit."""
    max_side = min(max_side or MAX_SIDE, MAX_SIDE) if generation else (max_side or 0)
    bound = math.sqrt(max_pixels / (width * height))
    if generation:
        bound = min(bound, max_side / max(width, height))
    scale = math.floor(bound * 100 + 1e-9) / 100
    multiple = multiple if generation else 1
    while scale > 0 and not _fits(target_size(width, height, scale, multiple), generation, max_side, max_pixels):
        scale = round(scale - 0.01, 2)
    return max(scale, 0.0)


def check_scale(width: int, height: int, scale: float, *, generation: bool = False, field: str = "scale",
                max_side: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS,
                multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """The target size of a ``scale`` upscale, or ValidationError (naming ``field``) when the factor
    is not above 1 or the result would pass the size limits — the message names the largest
    factor allowed for this image."""
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise ValidationError(f"The upscale factor must be a number, not {scale!r}.", field) from None
    if not math.isfinite(scale) or scale <= 1.0:
        raise ValidationError(f"The upscale factor must be more than 1 (got {scale:g}).", field)
    size = target_size(width, height, scale, multiple if generation else 1)
    return check_size(width, height, size, generation=generation, field=field, max_side=max_side,
                      max_pixels=max_pixels, what=f"A {scale:g}× upscale", multiple=multiple)


def check_size(width: int, height: int, size: tuple[int, int], *, generation: bool = False, field: str = "scale",
               max_side: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS, what: str = "An upscale",
               multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """``size`` when a width × height image may be upscaled to it, else ValidationError naming the
    largest factor allowed (see :func:`check_scale`)."""
    side = min(max_side or MAX_SIDE, MAX_SIDE)
    tw, th = (int(v) for v in size)
    if tw < width or th < height or (tw, th) == (width, height):
        raise ValidationError(f"The target size {tw}×{th} must be larger than the image ({width}×{height}).", field)
    if _fits((tw, th), generation, side, max_pixels):
        return tw, th
    top = largest_scale(width, height, generation=generation, max_side=side, max_pixels=max_pixels,
                        multiple=multiple)
    limit = (f"{side} px a side for a diffusion pass" if generation and max(tw, th) > side
             else f"{max_pixels / 1e6:.0f} MP")
    allowed = (f"the largest factor allowed for {width}×{height} is {top:g}×" if top > 1 else
               f"{width}×{height} cannot be upscaled at all within that limit")
    raise ValidationError(f"{what} of {width}×{height} would be {tw}×{th}, past the size limit of {limit}; "
                          f"{allowed}.", field)


# --- Lanczos ----------------------------------------------------------------------------------


def lanczos(image, size: tuple[int, int]):
    """Pillow's Lanczos resize of an RGB image to ``size`` (width, height)."""
    from PIL import Image

    return image if image.size == tuple(size) else image.resize(tuple(size), resample=Image.Resampling.LANCZOS)


# --- model upscalers, tiled -------------------------------------------------------------------


def _call_model(descriptor, tile):
    """One model call on one tile (the single place the model runs: tests patch it)."""
    return descriptor(tile)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:300]


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one axis: ``tile`` apart less ``overlap``, the last flush with the end."""
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    return starts + [length - tile]


def _ramp(n: int, ramp: int, rise: bool, fall: bool):
    """1-D blend weights of one tile's output: 1 inside, a linear ramp (k + 0.5) / ramp over the
    first / last ``ramp`` pixels where a neighbouring tile overlaps (``rise`` / ``fall``)."""
    import torch

    w = torch.ones(n)
    ramp = min(ramp, n)
    if ramp > 0:
        r = (torch.arange(ramp, dtype=torch.float32) + 0.5) / ramp
        if rise:
            w[:ramp] = torch.minimum(w[:ramp], r)
        if fall:
            w[n - ramp:] = torch.minimum(w[n - ramp:], r.flip(0))
    return w


def tiled(fn: Callable, x, scale: int, tile: int | None = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP,
          progress: Progress | None = None):
    """Run ``fn`` — (1, C, h, w) → (1, C, h·scale, w·scale) — over ``x`` (1, C, H, W) in overlapping
    tiles and blend them (see the module docstring). ``tile`` None: the whole image in one call.

    The tiles go to ``fn`` as views of ``x`` (its device and dtype); the result is float32 on
    the CPU."""
    import torch

    _, c, h, w = x.shape
    tile = max(h, w) if tile is None else int(tile)
    overlap = max(0, min(int(overlap), tile // 4))
    ys, xs = _starts(h, tile, overlap), _starts(w, tile, overlap)
    total = len(ys) * len(xs)
    if total == 1:
        out = fn(x).float().cpu()
        if progress:
            progress(1, 1)
        return out
    acc = torch.zeros(1, c, h * scale, w * scale)
    weight = torch.zeros(1, 1, h * scale, w * scale)
    done = 0
    for y in ys:
        th = min(tile, h - y)
        wy = _ramp(th * scale, overlap * scale, y > 0, y + th < h)
        for x0 in xs:
            tw = min(tile, w - x0)
            out = fn(x[:, :, y:y + th, x0:x0 + tw]).float().cpu()
            if out.shape[-2:] != (th * scale, tw * scale):
                raise GenerationError(f"The upscaler returned a {tuple(out.shape[-2:])} tile for a {th}×{tw} input; "
                                      f"expected {scale}× that. The model file may be damaged.")
            wx = _ramp(tw * scale, overlap * scale, x0 > 0, x0 + tw < w)
            wt = (wy[:, None] * wx[None, :])[None, None]
            ys_, xs_ = slice(y * scale, (y + th) * scale), slice(x0 * scale, (x0 + tw) * scale)
            acc[:, :, ys_, xs_] += out * wt
            weight[:, :, ys_, xs_] += wt
            done += 1
            if progress:
                progress(done, total)
    return acc / weight


def pick_dtype(info, device):
    """The dtype a model upscaler runs in: float16 on a GPU where spandrel says the architecture
    supports it, else bfloat16 where supported, else float32 (always on the CPU)."""
    import torch

    kind = getattr(device, "type", str(device)).split(":")[0]
    if kind == "cpu":
        return torch.float32
    if info.supports_half:
        return torch.float16
    if info.supports_bfloat16 and kind == "cuda":
        return torch.bfloat16
    return torch.float32


def _to_tensor(image):
    import numpy as np
    import torch

    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float().div_(255.0)


def _to_image(t):
    import torch
    from PIL import Image

    arr = t[0].clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(arr, "RGB")


def _free(device) -> None:
    import gc

    import torch

    gc.collect()
    kind = getattr(device, "type", str(device)).split(":")[0]
    if kind == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif kind == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def model_pass(loaded: LoadedUpscaler, image, *, device="cpu", dtype=None, tile: int | None = DEFAULT_TILE,
               overlap: int = DEFAULT_OVERLAP, min_tile: int = MIN_TILE, notes: list[str] | None = None,
               progress: Progress | None = None):
    """One pass of a model upscaler over a PIL RGB image → (PIL image ``scale``× larger, final tile).

    On out-of-memory the tile is halved and the pass started again, down to ``min_tile``; the
    change goes into ``notes``. The model is moved to ``device`` for the pass and back to the
    CPU (float32) after it, since the library's cache holds CPU copies."""
    import torch

    info, desc = loaded.info, loaded.descriptor
    notes = notes if notes is not None else []
    dtype = dtype or pick_dtype(info, device)
    if info.tiling == "INTERNAL":
        tile = None  # spandrel: the model tiles (or needs the whole image) itself
    w, h = image.size
    first = tile = None if tile is None else int(tile)
    x = _to_tensor(image)
    try:
        desc.to(torch.device(device) if isinstance(device, str) else device)
        desc.to(dtype)
        while True:
            failed = False
            try:
                def fn(t):
                    return _call_model(desc, t.to(device=desc.device, dtype=dtype))

                out = tiled(fn, x, info.scale, tile, overlap, progress)
            except RuntimeError as e:  # torch.OutOfMemoryError is one
                if isinstance(e, StudioError):
                    raise
                if not _is_oom(e):
                    raise GenerationError(f"The upscaler {info.name} failed ({type(e).__name__}: "
                                          f"{_first_line(e)}).") from None
                failed = True  # handled below, outside the except block, so the tile's memory is freed
            if not failed:
                break
            _free(device)
            smaller = None if tile is None else tile // 2
            if smaller is None or smaller < min_tile:
                raise GenerationError(
                    f"Out of memory upscaling {w}×{h} with {info.name}"
                    + (f" even with {tile} px tiles" if tile is not None else " (it cannot be tiled)")
                    + ". Close other GPU work, choose a smaller factor, or use Lanczos.")
            tile = smaller
        if dtype != torch.float32 and not torch.isfinite(out).all():
            notes.append(f"{info.name} overflowed in {str(dtype).replace('torch.', '')}; ran it again in float32.")
            desc.to(torch.float32)
            dtype = torch.float32
            out = tiled(lambda t: _call_model(desc, t.to(device=desc.device, dtype=dtype)), x, info.scale, tile,
                        overlap, progress)
    finally:
        desc.to(torch.device("cpu"))
        desc.to(torch.float32)
    if tile != first:
        notes.append(f"tile {first} → {tile} after running out of memory")
    return _to_image(out), tile


def upscale(image, scale: float | None = None, *, size: tuple[int, int] | None = None,
            upscaler: str | LoadedUpscaler = LANCZOS, library=None, device="cpu", dtype=None,
            tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP, min_tile: int = MIN_TILE,
            generation: bool = False, max_side: int | None = None, field: str = "scale",
            progress: Progress | None = None, multiple: int = SIZE_MULTIPLE) -> UpscaleResult:
    """Upscale ``image`` by ``scale`` (or to ``size`` = (width, height)) with ``upscaler``.

    ``upscaler``: ``"Lanczos"``, a model's name in ``library`` (an ``UpscalerLibrary``), or an
    already-loaded upscaler. ``generation``: a diffusion pass follows at the new size, so the
    generation side limit applies and ``size`` is snapped to ``multiple`` (the model's: 16 for
    SD3; see :func:`check_scale`).
    Raises ValidationError (``field``: bad factor or size, unknown upscaler, a latent upscaler,
    which works on latents — :func:`upscale_latents`) or GenerationError (out of memory at the
    smallest tile)."""
    started = time.perf_counter()
    image = normalize_init_image(image, "image")  # header-checked; any mode → RGB
    w, h = image.size
    if size is None:
        if scale is None:
            raise ValidationError("Give an upscale factor or a target size.", field)
        size = check_scale(w, h, scale, generation=generation, field=field, max_side=max_side, multiple=multiple)
    else:
        try:
            tw, th = (int(v) for v in size)
        except (TypeError, ValueError):
            raise ValidationError(f"The target size must be (width, height), not {size!r}.", field) from None
        if generation:
            tw, th = snap(tw, multiple), snap(th, multiple)
        size = check_size(w, h, (tw, th), generation=generation, field=field, max_side=max_side,
                          what=f"Upscaling to {tw}×{th}", multiple=multiple)
    name = upscaler.info.name if isinstance(upscaler, LoadedUpscaler) else str(upscaler or LANCZOS).strip()
    if name.lower() in (n.lower() for n in LATENT_UPSCALERS):
        raise ValidationError(f"{name} upscales latents (hires fix's first pass), not images: choose Lanczos "
                              "or a model upscaler.", field)
    result = UpscaleResult(image, name, (w, h))
    if name.lower() == LANCZOS.lower() and not isinstance(upscaler, LoadedUpscaler):
        result.upscaler = LANCZOS
        result.image = lanczos(image, size)
        result.seconds = round(time.perf_counter() - started, 3)
        return result
    if isinstance(upscaler, LoadedUpscaler):
        loaded = upscaler
    else:
        if library is None:
            raise ValidationError(f"No upscaler named {name!r} (built in: {', '.join(BUILTIN_UPSCALERS)}).", field)
        try:
            loaded = library.load(name)
        except UpscalerError as e:
            raise ValidationError(str(e), field) from None
    result.info = loaded.info
    result.notes.extend(loaded.info.notes)
    current = image
    while result.passes < MAX_MODEL_PASSES and (current.size[0] < size[0] or current.size[1] < size[1]):
        cw, ch = current.size
        if cw * ch * loaded.info.scale ** 2 > MAX_IMAGE_PIXELS:
            result.notes.append(f"Another {loaded.info.scale}× pass of {name} would pass "
                                f"{MAX_IMAGE_PIXELS / 1e6:.0f} MP; Lanczos made the rest.")
            break
        current, result.tile = model_pass(loaded, current, device=device, dtype=dtype, tile=tile, overlap=overlap,
                                          min_tile=min_tile, notes=result.notes, progress=progress)
        tile = result.tile or tile
        result.passes += 1
    if current.size != tuple(size):
        if current.size[0] < size[0] or current.size[1] < size[1]:
            result.notes.append(f"{name} is a {loaded.info.scale}× model; {result.passes} pass(es) and Lanczos made "
                                f"{size[0]}×{size[1]}.")
        current = lanczos(current, size)
    result.image = current
    result.seconds = round(time.perf_counter() - started, 3)
    return result


# --- latents (hires fix) ----------------------------------------------------------------------


def _slerp(a, b, r):
    """Rows of ``a`` and ``b`` (N, C) joined at ratios ``r`` (N, 1): the direction by spherical
    interpolation, the length linearly. Nearly parallel rows give ``a`` itself (as ComfyUI
    does), opposite rows the linear mix; zero rows count as having no direction."""
    import torch

    na = a.norm(dim=-1, keepdim=True)
    nb = b.norm(dim=-1, keepdim=True)
    ua = torch.where(na > 0, a / na.clamp_min(1e-12), torch.zeros_like(a))
    ub = torch.where(nb > 0, b / nb.clamp_min(1e-12), torch.zeros_like(b))
    dot = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    safe = so.abs() > 1e-6
    so_safe = torch.where(safe, so, torch.ones_like(so))
    direction = (torch.sin((1 - r) * omega) / so_safe) * ua + (torch.sin(r * omega) / so_safe) * ub
    out = direction * (na * (1 - r) + nb * r)
    same = dot > 1 - 1e-5
    opposite = dot < -1 + 1e-5
    out = torch.where(same, a, out)
    out = torch.where(opposite, a * (1 - r) + b * r, out)
    return out


def _positions(old: int, new: int, device):
    """For each of ``new`` output positions: the two neighbouring source indices and the ratio
    between them — the sampling grid of bilinear interpolation with ``align_corners=False``
    (source = (i + ½)·old/new − ½, clamped to the edges)."""
    import torch

    src = (torch.arange(new, dtype=torch.float64, device=device) + 0.5) * (old / new) - 0.5
    src = src.clamp(0, old - 1)
    i0 = src.floor().long()
    i1 = (i0 + 1).clamp(max=old - 1)
    return i0, i1, (src - i0).float()


def _bislerp_axis(x, new: int, dim: int):
    """Resize ``x`` (B, C, H, W) along ``dim`` (2 or 3) by slerping the C-vectors of neighbours."""
    old = x.shape[dim]
    i0, i1, r = _positions(old, new, x.device)
    a = x.index_select(dim, i0)
    b = x.index_select(dim, i1)
    shape = [1, 1, 1, 1]
    shape[dim] = new
    ratio = r.reshape(shape).expand(x.shape[0], 1, *(new if d == dim else x.shape[d] for d in (2, 3)))
    c = x.shape[1]
    a_rows = a.movedim(1, -1).reshape(-1, c)
    b_rows = b.movedim(1, -1).reshape(-1, c)
    r_rows = ratio.movedim(1, -1).reshape(-1, 1)
    out = _slerp(a_rows, b_rows, r_rows)
    out_shape = list(a.movedim(1, -1).shape)
    return out.reshape(out_shape).movedim(-1, 1)


def bislerp(latents, height: int, width: int):
    """ComfyUI's bislerp: resize (B, C, h, w) latents to (B, C, height, width), width first then
    height, each step a slerp between the two nearest latent vectors (see :func:`_slerp`).
    Computed in float32, returned in the input's dtype."""
    dtype = latents.dtype
    x = latents.float()
    x = _bislerp_axis(x, int(width), 3)
    x = _bislerp_axis(x, int(height), 2)
    return x.to(dtype)


def latent_size(width: int, height: int, factor: int = VAE_FACTOR) -> tuple[int, int]:
    """(h, w) of the latents of a width × height image (``factor``: the VAE's, 8 for SD3)."""
    return height // factor, width // factor


def upscale_latents(latents, width: int, height: int, method: str = LATENT_BISLERP, *,
                    factor: int = VAE_FACTOR, multiple: int = SIZE_MULTIPLE):
    """Enlarge SD3 latents (B, 16, h, w) to those of a ``width`` × ``height`` image (pixels, a
    multiple of ``multiple``) with ``latent-bislerp`` or ``latent-nearest-exact``; ``factor``
    and ``multiple``: the loaded model's (8 and 16 for SD3)."""
    import torch.nn.functional as F

    if latents.ndim != 4:
        raise ValueError(f"latents must be (B, C, h, w), not {tuple(latents.shape)}")
    if width % multiple or height % multiple:
        raise ValidationError(f"The hires size {width}×{height} must be a multiple of {multiple}.", "hires_scale")
    h, w = latent_size(width, height, factor)
    if method == LATENT_BISLERP:
        return bislerp(latents, h, w)
    if method == LATENT_NEAREST_EXACT:
        return F.interpolate(latents, size=(h, w), mode="nearest-exact")
    raise ValidationError(f"{method!r} is not a latent upscaler: use {' or '.join(LATENT_UPSCALERS)}.", "hires_upscaler")
