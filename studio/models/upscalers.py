"""Upscaler models: where they live, which files load, how they are named, hashed and cached.

Upscalers are image-to-image super-resolution models (ESRGAN, Real-ESRGAN and its Compact
variant, SwinIR, Swin2SR, HAT, DAT, SPAN, OmniSR, … — every *super-resolution* architecture in
spandrel's core registry; ``spandrel_extra_arches`` is never used) in ``<data-dir>/upscalers/``
(``StudioConfig.upscalers_dir``). Uploads are copied into that folder. An upscaler's *name* is its
file name without the suffix, as for LoRAs; a request only ever carries a name, never a path.

Which files load:

- ``.safetensors`` — preferred; tensors only, nothing to run.
- ``.pth`` / ``.pt`` / ``.ckpt`` — only when ``torch.load(path, weights_only=True,
  map_location="cpu")`` reads it: plain tensors in (nested) dicts. A file that needs Python's
  pickle for anything else (a custom class, a whole pickled module, a TorchScript archive) is
  refused, with why (unpickling can run code) and what to do (convert it to safetensors).
- spandrel (0.4: ``ModelLoader().load_from_state_dict(sd)``) must identify the architecture; a
  file it cannot identify is refused with spandrel's own error. A model spandrel identifies that
  is not an RGB super-resolution model (face restoration, inpainting, a 1× denoiser) is refused
  too, naming what it is.

Identity is the sha256 of the file (through :class:`~studio.models.identity.HashCache`, so a
file is read once); :attr:`UpscalerInfo.short_hash` is its first 10 hex digits — A1111's
``shorthash`` convention for model files. A1111 itself records only the upscaler's *name*
(``Hires upscaler: 4x-UltraSharp``, ``Postprocess upscale by``); it has no upscaler hash.

Loaded upscalers are kept in a small RAM cache (on the CPU, by content hash): the engine moves one
to the GPU for a run (``studio.engine.upscale``) and back.

``Lanczos`` and the latent upscalers (``latent-bislerp``, ``latent-nearest-exact``) are built in
(:data:`BUILTIN_UPSCALERS`, :data:`LATENT_UPSCALERS`); no file may take one of their names.

spandrel imports torchvision at import time for two architectures the studio never loads (LaMa
inpainting and RestoreFormer face restoration). Where torchvision is not installed,
:func:`spandrel_module` lets spandrel import with a placeholder for those two imports, removed
again straight after, so the super-resolution architectures work without torchvision.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import shutil
import sys
import threading
import types
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from studio.errors import ModelError
from studio.models.hashes import MODEL_HASH_LEN
from studio.models.identity import HashCache, file_sha256
from studio.models.lora import NAME_RE

log = logging.getLogger(__name__)

SAFE_SUFFIX = ".safetensors"
WEIGHTS_ONLY_SUFFIXES = (".pth", ".pt", ".ckpt")
SUFFIXES = (SAFE_SUFFIX, *WEIGHTS_ONLY_SUFFIXES)  # in order of preference when one name has two files
MAX_UPSCALER_BYTES = 2 << 30  # the largest upscalers (HAT-L, DAT-2) are a few hundred MB
CACHE_SIZE = 2  # loaded upscalers kept in RAM
UPSCALER_HASH_LEN = MODEL_HASH_LEN  # A1111's shorthash length for model files

BUILTIN_UPSCALERS = ("Lanczos",)  # Pillow, on the image
LATENT_UPSCALERS = ("latent-bislerp", "latent-nearest-exact")  # on SD3 latents, for hires fix only
RESERVED_NAMES = frozenset(n.lower() for n in (*BUILTIN_UPSCALERS, *LATENT_UPSCALERS, "none"))
SPANDREL_REQUIREMENT = "spandrel>=0.4.2,<0.5"


class UpscalerError(ModelError, ValueError):
    """An upscaler that cannot be used. The message says why and what to do."""


@dataclass(frozen=True)
class UpscalerInfo:
    """What a file is, as spandrel identified it (no weights held)."""

    name: str
    path: Path
    sha256: str
    size: int
    architecture: str  # spandrel's architecture id: "ESRGAN", "SwinIR", "HAT", ...
    scale: int  # the model's own factor: 2, 4, 8 ...
    input_channels: int
    output_channels: int
    tags: tuple[str, ...] = ()  # spandrel's tags, e.g. ("64nf", "23nb")
    supports_half: bool = False
    supports_bfloat16: bool = False
    tiling: str = "SUPPORTED"  # spandrel's ModelTiling: SUPPORTED | DISCOURAGED | INTERNAL
    size_multiple: int = 1  # the input must be a multiple of this (spandrel pads to it)
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def short_hash(self) -> str:
        """The first 10 hex digits of the file's sha256 (A1111's model ``shorthash``)."""
        return self.sha256[:UPSCALER_HASH_LEN]

    def as_meta(self) -> dict:
        """What an image's metadata records about the upscaler it was made with."""
        return {"name": self.name, "sha256": self.sha256, "hash": self.short_hash,
                "architecture": self.architecture, "scale": self.scale}


@dataclass
class LoadedUpscaler:
    """An upscaler ready to run: ``descriptor`` is spandrel's ``ImageModelDescriptor`` (on the CPU,
    float32, eval mode; call it with a (1, 3, H, W) tensor in [0, 1] on its device and dtype)."""

    info: UpscalerInfo
    descriptor: object


# --- spandrel --------------------------------------------------------------------------------

_SPANDREL_LOCK = threading.Lock()
_TORCHVISION_STUBS = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


def _torchvision_placeholder() -> dict[str, types.ModuleType]:
    """Stand-ins for the three torchvision names spandrel's LaMa and RestoreFormer import
    (``InterpolationMode``, ``rotate``, ``normalize``); calling one says what to install."""

    def needs_torchvision(*_a, **_k):
        raise UpscalerError("This spandrel architecture needs torchvision: install the torchvision build "
                            "that matches your torch.")

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        NEAREST_EXACT = "nearest-exact"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"

    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode = InterpolationMode
    functional.rotate = needs_torchvision
    functional.normalize = needs_torchvision
    transforms.functional = functional
    tv.transforms = transforms
    return dict(zip(_TORCHVISION_STUBS, (tv, transforms, functional)))


def spandrel_module():
    """``import spandrel``, or UpscalerError saying how to install it.

    Where torchvision is missing (or broken: built for another torch), spandrel is imported with
    the placeholder of :func:`_torchvision_placeholder` in ``sys.modules`` and the placeholder is
    removed right after, so nothing else ever sees a fake torchvision."""
    with _SPANDREL_LOCK:
        if "spandrel" in sys.modules:
            return sys.modules["spandrel"]
        try:
            import spandrel

            return spandrel
        except ModuleNotFoundError as e:
            missing = (e.name or "").split(".")[0]
            if missing == "spandrel":
                raise UpscalerError(
                    f"Model upscalers need the spandrel package, which is not installed: "
                    f"pip install '{SPANDREL_REQUIREMENT}'. Lanczos and the latent upscalers work without it.") from None
            if missing != "torchvision":
                raise UpscalerError(f"spandrel is installed but its dependency {missing or e} is missing: "
                                    f"pip install {missing or SPANDREL_REQUIREMENT}.") from None
            reason = "torchvision is not installed"
        except Exception as e:  # noqa: BLE001 — a torchvision built for another torch fails at import
            if "torchvision" not in repr(e) and not _raised_in_torchvision(e):
                raise UpscalerError(f"spandrel could not be imported ({type(e).__name__}: {e}).") from None
            reason = f"torchvision failed to import ({type(e).__name__})"
        # transformers and diffusers ask once whether torchvision exists and remember the answer:
        # let them ask now, before the placeholder exists (both are loaded by then in the studio).
        for name, check in (("transformers.utils.import_utils", "is_torchvision_available"),
                            ("diffusers.utils.import_utils", "is_torchvision_available")):
            if name in sys.modules and hasattr(sys.modules[name], check):
                try:
                    getattr(sys.modules[name], check)()
                except Exception:  # noqa: BLE001, S110 — only a cache warm-up
                    pass
        stubs = _torchvision_placeholder()
        saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "torchvision" or k.startswith("torchvision.")}
        sys.modules.update(stubs)
        try:
            import spandrel
        except Exception as e:  # noqa: BLE001
            raise UpscalerError(f"spandrel could not be imported ({type(e).__name__}: {e}).") from None
        finally:
            for k, mod in stubs.items():
                if sys.modules.get(k) is mod:
                    del sys.modules[k]
            sys.modules.update(saved)
        log.info("spandrel imported without torchvision (%s); its super-resolution architectures do not "
                 "use it", reason)
        return spandrel


def _raised_in_torchvision(e: BaseException) -> bool:
    tb = e.__traceback__
    while tb is not None:
        if "torchvision" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def core_architectures() -> list[str]:
    """The ids of spandrel's core architectures (the registry the studio loads from)."""
    return [a.architecture.id for a in spandrel_module().MAIN_REGISTRY.architectures("detection")]


# --- reading a file --------------------------------------------------------------------------


def _convert_hint(name: str) -> str:
    return (f"Convert it to .safetensors where you trust the file — e.g. in Python: "
            f"sd = torch.load('{name}', weights_only=False); "
            f"safetensors.torch.save_file({{k: v.contiguous() for k, v in sd.items()}}, "
            f"'{Path(name).stem}.safetensors') (for a file holding a state dict), or open it in "
            "chaiNNer and save it as safetensors — or download the model's .safetensors release.")


def read_state_dict(path: Path, display: str | None = None) -> dict:
    """The tensors of an upscaler file, refusing anything that needs pickle.

    ``display``: how messages name the file (an upload's own name; never a server path)."""
    import torch

    name = display or path.name
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UpscalerError(f"{name}: upscalers are .safetensors files (or weights-only .pth/.pt/.ckpt); "
                            f"{suffix or 'no suffix'} is not one of them.")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise UpscalerError(f"{name} could not be read ({e.strerror}).") from None
    if size > MAX_UPSCALER_BYTES:
        raise UpscalerError(f"{name} is {size / 2**30:.1f} GB; upscalers are at most "
                            f"{MAX_UPSCALER_BYTES >> 30} GB, so this is not one.")
    if suffix == SAFE_SUFFIX:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise UpscalerError(f"{name} is not a readable safetensors file ({_first_line(e)}).") from None
    else:
        import pickle

        try:
            sd = torch.load(str(path), weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f" (it holds a {found.group(1)} object)" if found else ""
            raise UpscalerError(
                f"{name} cannot be loaded as plain weights{what}: it needs Python's pickle, and "
                "unpickling a file can run any code it contains, so the studio refuses it. "
                + _convert_hint(name)) from None
        except (RuntimeError, OSError, EOFError, ValueError, AttributeError, KeyError) as e:
            raise UpscalerError(
                f"{name} is not a weights-only PyTorch file torch.load(weights_only=True) can read "
                f"({_first_line(e)}). TorchScript (.pt) archives and damaged files are refused. "
                + _convert_hint(name)) from None
    if not isinstance(sd, dict) or not sd:
        raise UpscalerError(f"{name} holds no tensors ({type(sd).__name__}); it is not an upscaler model.")
    return sd


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:300]


def identify(sd: dict, display: str):
    """spandrel's descriptor for a state dict, or UpscalerError with spandrel's message.

    Only spandrel's core super-resolution architectures with RGB in and out are accepted."""
    spandrel = spandrel_module()
    try:
        desc = spandrel.ModelLoader(device="cpu").load_from_state_dict(sd)
    except spandrel.UnsupportedModelError as e:
        detail = str(e).strip() or "its architecture is not one spandrel recognises"
        raise UpscalerError(
            f"spandrel could not identify {display}: UnsupportedModelError ({detail}). The studio loads "
            "spandrel's core super-resolution architectures (ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, "
            "SPAN, …); check that the file is an image upscaler and not, say, a LoRA or a checkpoint.") from None
    except Exception as e:  # noqa: BLE001 — an architecture matched its keys but its shapes did not fit
        raise UpscalerError(f"spandrel recognised {display} but could not load it "
                            f"({type(e).__name__}: {_first_line(e)}); the file may be damaged or a variant "
                            "spandrel does not support.") from None
    arch = desc.architecture
    arch_id = str(arch.id)
    if not type(arch).__module__.startswith("spandrel.architectures."):
        raise UpscalerError(f"{display} is a {arch_id} model from outside spandrel's core architectures; "
                            "the studio loads only those.")
    if not isinstance(desc, spandrel.ImageModelDescriptor):
        raise UpscalerError(f"{display} is a {arch_id} {desc.purpose} model (it needs a mask), not an upscaler.")
    if desc.purpose != "SR" or desc.scale < 2:
        kind = {"FaceSR": "face restoration", "Restoration": "restoration (1×)"}.get(desc.purpose, desc.purpose)
        raise UpscalerError(f"{display} is a {arch_id} {kind} model (scale {desc.scale}×), not an upscaler: the "
                            "studio uses super-resolution models that enlarge by 2× or more.")
    if desc.input_channels != 3 or desc.output_channels != 3:
        raise UpscalerError(f"{display} is a {arch_id} model for {desc.input_channels}-channel images; the "
                            "studio upscales RGB images (3 channels).")
    return desc.eval()


# --- the folder -------------------------------------------------------------------------------


class UpscalerLibrary:
    """The upscalers folder: list, inspect, load (cached), import.

    ``hashes`` (models.HashCache) avoids re-hashing; ``cache_size`` loaded upscalers stay in RAM."""

    def __init__(self, folder: Path, hashes: HashCache | None = None, cache_size: int = CACHE_SIZE):
        self.folder = Path(folder)
        self.hashes = hashes if hashes is not None else HashCache(None)
        self.cache_size = max(0, int(cache_size))
        self._lock = threading.Lock()
        self._infos: dict[str, UpscalerInfo] = {}  # (sha256, name) → info
        self._loaded: OrderedDict[str, object] = OrderedDict()  # sha256 → descriptor (CPU)

    # names

    def _files(self) -> dict[str, Path]:
        """name → file, the preferred suffix winning where one name has several files."""
        if not self.folder.is_dir():
            return {}
        found: dict[str, Path] = {}
        for suffix in SUFFIXES:
            for p in self.folder.glob(f"*{suffix}"):
                if (p.is_file() and p.suffix.lower() == suffix and NAME_RE.match(p.stem)
                        and p.stem.lower() not in RESERVED_NAMES and p.stem not in found):
                    found[p.stem] = p
        return found

    def names(self) -> list[str]:
        """Every upscaler file's name in the folder (sorted, case-insensitively); not checked."""
        return sorted(self._files(), key=str.lower)

    @staticmethod
    def check_name(name) -> str:
        """``name`` stripped, when it is a well-formed upscaler file name that no built-in upscaler
        takes (UpscalerError otherwise)."""
        if not isinstance(name, str) or not NAME_RE.match(name.strip()):
            raise UpscalerError(f"{name!r} is not an upscaler name: use the file name without its suffix "
                                "(letters, digits, spaces, '_', '-', '.').")
        name = name.strip()
        if name.lower() in RESERVED_NAMES:
            raise UpscalerError(f"{name!r} is a built-in upscaler's name; a file cannot take it. Rename the file.")
        return name

    def path_for(self, name: str) -> Path:
        """The file of the upscaler called ``name`` (UpscalerError when the name is malformed or not
        in the folder)."""
        name = self.check_name(name)
        path = self._files().get(name)
        if path is None:
            have = ", ".join(self.names()[:10]) or "none"
            raise UpscalerError(
                f"No upscaler named {name!r}: put {name}.safetensors in the upscalers folder of the data dir, "
                f"or upload it (available: {have}; built in: {', '.join(BUILTIN_UPSCALERS)}).")
        return path

    # inspecting and loading

    def _identify(self, path: Path, name: str, sha: str):
        desc = identify(read_state_dict(path), path.name)
        info = UpscalerInfo(
            name=name, path=path, sha256=sha, size=path.stat().st_size,
            architecture=str(desc.architecture.id), scale=int(desc.scale),
            input_channels=int(desc.input_channels), output_channels=int(desc.output_channels),
            tags=tuple(str(t) for t in desc.tags), supports_half=bool(desc.supports_half),
            supports_bfloat16=bool(desc.supports_bfloat16), tiling=desc.tiling.name,
            size_multiple=int(getattr(desc.size_requirements, "multiple_of", 1) or 1),
            notes=(() if path.suffix.lower() == SAFE_SUFFIX else
                   ((f"{path.name} is a weights-only {path.suffix} file; a .safetensors copy loads the same "
                     "without torch.load."),)),
        )
        return info, desc

    def _hashed(self, name: str) -> tuple[Path, str]:
        path = self.path_for(name)
        try:
            return path, self.hashes.file_hash(path)
        except OSError as e:
            raise UpscalerError(f"{path.name} could not be read ({e.strerror}).") from None

    def info(self, name: str) -> UpscalerInfo:
        """Inspect an upscaler: identified once per content (the weights are not kept unless
        :meth:`load` keeps them); raises UpscalerError."""
        path, sha = self._hashed(name)
        with self._lock:
            info = self._infos.get(f"{sha}:{path.name}")
        if info is None:
            info, _ = self._identify(path, path.stem, sha)
            with self._lock:
                self._infos[f"{sha}:{path.name}"] = info
        return info

    def load(self, name: str) -> LoadedUpscaler:
        """The upscaler ``name`` ready to run, from the RAM cache when the same content was loaded
        before (a replaced file with the same name is new content: loaded again)."""
        path, sha = self._hashed(name)
        key = f"{sha}:{path.name}"
        with self._lock:
            info = self._infos.get(key)
            desc = self._loaded.get(sha)
            if desc is not None:
                self._loaded.move_to_end(sha)
        if info is not None and desc is not None:
            return LoadedUpscaler(info, desc)
        info, desc = self._identify(path, path.stem, sha)
        with self._lock:
            self._infos[key] = info
            if self.cache_size:
                self._loaded[sha] = desc
                self._loaded.move_to_end(sha)
                while len(self._loaded) > self.cache_size:
                    self._loaded.popitem(last=False)
        return LoadedUpscaler(info, desc)

    def cached(self) -> list[str]:
        """The content hashes of the upscalers held in RAM, oldest first."""
        with self._lock:
            return list(self._loaded)

    def clear_cache(self) -> None:
        """Drop the upscalers held in RAM (what was identified stays known)."""
        with self._lock:
            self._loaded.clear()

    def describe(self) -> list[dict]:
        """{name, sha256, hash, size, architecture, scale, error} per file (for a listing)."""
        out = []
        for name in self.names():
            try:
                i = self.info(name)
                out.append({"name": i.name, "sha256": i.sha256, "hash": i.short_hash, "size": i.size,
                            "architecture": i.architecture, "scale": i.scale, "error": None})
            except (UpscalerError, OSError) as e:
                out.append({"name": name, "sha256": None, "hash": None, "size": None, "architecture": None,
                            "scale": None, "error": str(e)})
        return out

    # uploads

    def import_file(self, src: str | os.PathLike, name: str | None = None, display: str | None = None) -> UpscalerInfo:
        """Copy an uploaded upscaler into the folder, after checking it loads and is an upscaler.

        ``name``: the name to give it (default: the upload's file name without its suffix);
        ``display``: the upload's own file name, for messages. A file with the same name and
        different content is refused, not overwritten; the same content is a no-op."""
        src = Path(src)
        display = display or src.name
        suffix = src.suffix.lower()
        name = self.check_name(name if name is not None else Path(display).stem)
        if suffix not in SUFFIXES:
            raise UpscalerError(f"{display}: upscalers are .safetensors files (or weights-only .pth/.pt/.ckpt).")
        identify(read_state_dict(src, display), display)  # refuses pickles and unknown files before copying
        existing = self._files().get(name)
        if existing is not None:
            if file_sha256(existing) != file_sha256(src):
                raise UpscalerError(f"A different upscaler named {name!r} is already in the upscalers folder; "
                                    "rename the file.")
            return self.info(name)
        self.folder.mkdir(parents=True, exist_ok=True)
        dest = self.folder / f"{name}{suffix}"
        tmp = self.folder / f".{name}.upload.tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        return self.info(name)
