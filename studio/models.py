"""The model manager: where weights come from, how they are loaded, what is shared.

A pipeline is a set of components (diffusers' own view: ``pipe.components``). The manager loads
a diffusers folder component by component, each through its class's ``from_pretrained`` — the
same code path for a real checkpoint and for the offline tiny family — and gives every
component an *identity* derived from its content (hashes of its files). Two variants whose
components have the same identity share one object: switching SD3.5 Large → Large Turbo reloads
only the transformer. Recently used components stay in a RAM cache so switching back is cheap.

Sources:
- a Hub repo id (``stabilityai/stable-diffusion-3.5-medium``): downloaded with huggingface_hub
  into its cache (only the diffusers layout; no pickles), then loaded as a folder;
- a local diffusers folder (``model_index.json`` + subfolders);
- a single ``.safetensors`` transformer file of the official release (see ``singlefile.py``).
Pickled checkpoints (.ckpt/.bin/.pt/.pth) are refused: loading them can run arbitrary code.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .catalog import VARIANTS, Variant, get_variant, variant_for_transformer_config
from .config import StudioConfig

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# What a diffusers SD3 repo holds that we need; everything else (single-file releases,
# pickles, sample images) is not downloaded.
HUB_ALLOW = [
    "model_index.json",
    "scheduler/*",
    "tokenizer/*",
    "tokenizer_2/*",
    "tokenizer_3/*",
    "text_encoder/*",
    "text_encoder_2/*",
    "text_encoder_3/*",
    "transformer/*",
    "vae/*",
]
HUB_IGNORE = ["*.bin", "*.ckpt", "*.pt", "*.pth", "*.msgpack", "*.onnx*", "*.h5"]
SD3_COMPONENTS = (
    "transformer",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
    "scheduler",
)

ProgressFn = Callable[[str, float | None], None]  # (message, fraction 0..1 or None)


class ModelError(Exception):
    """A model could not be found or loaded. The message says what to do."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hub" | "folder" | "file"
    ref: str  # repo id, or an absolute path

    def __str__(self) -> str:
        return self.ref


def parse_source(spec: str) -> ModelSource:
    """Decide what kind of source ``spec`` names, refusing what cannot be loaded safely."""
    spec = (spec or "").strip()
    if not spec:
        raise ModelError("No model given. Pass a Hub id, a diffusers folder or a .safetensors file.")
    if spec in VARIANTS:
        return ModelSource("hub", VARIANTS[spec].repo_id)
    path = Path(spec).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelError(
            f"{path.name} is a pickled checkpoint ({path.suffix}); the studio does not load those "
            "because unpickling can run arbitrary code. Use a .safetensors file or a diffusers "
            "folder instead."
        )
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(
                f"{path} is a folder but not a diffusers pipeline (no model_index.json). Point "
                "--model at the folder that holds model_index.json, or at a .safetensors file."
            )
        return ModelSource("folder", str(path.resolve()))
    if path.suffix.lower() == ".safetensors":
        if not path.is_file():
            raise ModelError(f"No such file: {path}. Check the path to the .safetensors file.")
        return ModelSource("file", str(path.resolve()))
    if path.is_file():
        raise ModelError(
            f"{path.name}: unsupported model file. The studio loads .safetensors files and "
            "diffusers folders."
        )
    if not spec.startswith((".", "/", "~")) and HUB_ID.match(spec):
        return ModelSource("hub", spec)
    raise ModelError(
        f"No such folder or file: {spec}. Give a diffusers folder (with model_index.json), a "
        ".safetensors file, a Hub id such as stabilityai/stable-diffusion-3.5-medium, or a "
        f"variant name ({', '.join(VARIANTS)})."
    )


# --- content identity -------------------------------------------------------------------------

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class HashCache:
    """sha256 of files, cached by (path, size, mtime) in a JSON file under the data dir.

    Files in the Hugging Face cache are symlinks to blobs named by their sha256, which is used
    directly: identifying a 9 GB T5 costs nothing.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._data: dict[str, list] = {}
        if path and path.is_file():
            try:
                self._data = json.loads(path.read_text())
            except (OSError, ValueError):
                self._data = {}
        self.hashed_bytes = 0  # bytes actually read to hash (for tests and the bench)

    def file_hash(self, file: Path) -> str:
        real = file.resolve()
        if file.is_symlink() and _HEX64.match(real.name):
            return real.name
        st = real.stat()
        key = str(real)
        with self._lock:
            hit = self._data.get(key)
            if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
                return hit[2]
        h = hashlib.sha256()
        with open(real, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        self.hashed_bytes += st.st_size
        digest = h.hexdigest()
        with self._lock:
            self._data[key] = [st.st_size, st.st_mtime_ns, digest]
            if self.path:
                try:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = self.path.with_suffix(".tmp")
                    tmp.write_text(json.dumps(self._data))
                    os.replace(tmp, self.path)
                except OSError:
                    pass  # a read-only data dir only costs re-hashing next time
        return digest

    def folder_identity(self, folder: Path, extra: str = "") -> str:
        h = hashlib.sha256(extra.encode())
        for f in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            h.update(f.relative_to(folder).as_posix().encode())
            h.update(self.file_hash(f).encode())
        return h.hexdigest()[:32]


# --- loaded state -----------------------------------------------------------------------------


@dataclass
class Placement:
    """How components are loaded and placed. The memory presets produce these."""

    name: str = "auto"
    device: str = "cpu"
    dtype: object = None  # torch dtype
    component_kwargs: dict = field(default_factory=dict)  # extra from_pretrained kwargs per component
    skip: tuple[str, ...] = ()  # components left out (e.g. text_encoder_3 for no-T5)
    apply: Callable | None = None  # post-load step (offload hooks, layerwise casting)
    pipeline_kwargs: dict | None = None  # load the whole pipeline at once (multi-GPU device_map)
    resident: bool = True  # every component stays on ``device`` (no offload hooks)

    def key(self, component: str) -> str:
        """What, beyond the files, makes a loaded component what it is (dtype, quantization)."""
        extra = json.dumps(self.component_kwargs.get(component, {}), sort_keys=True,
                           default=lambda o: o.to_dict() if hasattr(o, "to_dict") else repr(o))
        digest = hashlib.sha256(extra.encode()).hexdigest()[:12]
        return f"{self.name}:{self.device}:{str(self.dtype).replace('torch.', '')}:{digest}"


def default_placement(device: str | None = None) -> Placement:
    import torch

    if device is None:
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    dtype = {"cuda": torch.bfloat16, "mps": torch.float16}.get(device, torch.float32)
    return Placement(name="full" if device != "cpu" else "cpu-fp32", device=device, dtype=dtype)


@dataclass
class LoadedModel:
    pipe: object  # StableDiffusion3Pipeline
    variant: Variant
    source: ModelSource
    placement: Placement
    identities: dict[str, str]
    is_tiny: bool = False

    @property
    def label(self) -> str:
        return self.variant.label + (" (tiny demo)" if self.is_tiny else "")

    @property
    def native_size(self) -> tuple[int, int]:
        side = self.pipe.transformer.config.sample_size * self.pipe.vae_scale_factor
        return side, side

    @property
    def max_side(self) -> int:
        cfg = self.pipe.transformer.config
        return cfg.pos_embed_max_size * cfg.patch_size * self.pipe.vae_scale_factor

    @property
    def dtype(self):
        return self.placement.dtype


class ModelManager:
    """Loads, shares and swaps SD3 pipelines. Thread-safe: use ``with manager.use(...)``."""

    def __init__(self, config: StudioConfig, placement: Placement | None = None, cache_bytes: int | None = None,
                 progress: ProgressFn | None = None):
        self.config = config
        self.placement = placement
        self.progress = progress  # default load/download progress reporter (the CLI prints it)
        self.lock = threading.RLock()
        self.current: LoadedModel | None = None
        self.hashes = HashCache(config.data_dir / "cache" / "hashes.json")
        # identity -> component object; the live pipeline's components are always in here
        self._components: OrderedDict[str, object] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._sizes: dict[str, int] = {}  # identity -> bytes, measured once
        self._img2img = None
        self._inpaint = None
        self.loads: list[tuple[str, str]] = []  # (component, identity) actually read from disk
        from .lora import LoraLibrary

        self.loras = LoraLibrary(config.loras_dir, self.hashes)

    # -- where a variant comes from --

    def source_for(self, variant: str | None = None) -> ModelSource:
        """The source the studio uses for a variant: demo family, --model, or the Hub repo."""
        variant = variant or self.config.variant
        if self.config.demo:
            from .tiny import build_tiny_family

            name = variant or "sd3.5-medium"
            folders = build_tiny_family(self.config.tiny_dir, variants=[name])
            return ModelSource("folder", str(folders[name]))
        if self.config.model and (variant is None or variant == self.config.variant):
            return parse_source(self.config.model)
        return ModelSource("hub", get_variant(variant or "sd3.5-medium").repo_id)

    def availability(self, variant: str | None = None) -> tuple[bool, str]:
        """Whether weights for a variant are on this machine, and if not, how to get them.

        Never touches the network.
        """
        try:
            src = self.source_for(variant)
        except ModelError as e:
            return False, str(e)
        if src.kind != "hub":
            return True, f"{src.ref}"
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(src.ref, "model_index.json")
        if isinstance(cached, str):
            return True, f"{src.ref} (in the Hugging Face cache)"
        return False, missing_weights_message(src.ref)

    # -- loading --

    def _resolve_folder(self, src: ModelSource, progress: ProgressFn | None) -> Path:
        if src.kind == "folder":
            return Path(src.ref)
        if src.kind == "hub":
            return download(src.ref, progress)
        raise ModelError("Single-file checkpoints are loaded through load_single_file().")

    def load(
        self,
        spec: str | None = None,
        variant: str | None = None,
        placement: Placement | None = None,
        progress: ProgressFn | None = None,
    ) -> LoadedModel:
        """Load a model (or switch to it), reusing every component whose content is unchanged.

        On failure the previous model stays loaded and usable.
        """
        import diffusers  # noqa: F401 — imported here, not at start-up
        import transformers  # noqa: F401

        from .cli import quiet_libraries

        quiet_libraries()
        src = parse_source(spec) if spec else self.source_for(variant)
        placement = placement or self.placement or default_placement(self.config.device)
        progress = progress or self.progress
        with self.lock:
            if src.kind == "file":
                from .singlefile import resolve_single_file

                folder, file_overrides = resolve_single_file(
                    Path(src.ref), self.config, hashes=self.hashes, progress=progress
                )
            else:
                folder, file_overrides = self._resolve_folder(src, progress), {}
            try:
                loaded = self._load_folder(folder, src, variant, placement, progress, file_overrides)
            except BaseException:
                self._trim_cache()  # drop what the failed load left behind; the current model stays
                free_memory()
                raise
            self.current = loaded
            self._img2img = None
            self._inpaint = None
            self._trim_cache()
            return loaded

    def _load_folder(self, folder, src, variant, placement, progress, file_overrides) -> LoadedModel:
        from diffusers import StableDiffusion3Pipeline

        from .tiny import tiny_variant_of

        try:
            index = json.loads((folder / "model_index.json").read_text())
        except (OSError, ValueError) as e:
            raise ModelError(f"Could not read {folder / 'model_index.json'}: {e}") from e
        if index.get("_class_name") not in (
            "StableDiffusion3Pipeline",
            "StableDiffusion3Img2ImgPipeline",
            "StableDiffusion3InpaintPipeline",
        ):
            raise ModelError(
                f"{src} is a {index.get('_class_name')}, not a Stable Diffusion 3 pipeline. "
                "The studio runs SD3 Medium, SD3.5 Medium, SD3.5 Large and Large Turbo."
            )
        if placement.pipeline_kwargs is not None:
            return self._load_whole(folder, src, variant, placement, progress)
        components: dict[str, object] = {}
        identities: dict[str, str] = {}
        loads_before = len(self.loads)
        names = [n for n in SD3_COMPONENTS if n in index]
        for i, name in enumerate(names):
            lib_cls = index.get(name)
            if name in placement.skip or not lib_cls or lib_cls[0] is None:
                components[name] = None
                continue
            override = file_overrides.get(name)
            sub = folder / name
            ident_src = override.identity if override else self.hashes.folder_identity(sub)
            ident = f"{name}:{ident_src}:{placement.key(name)}"
            identities[name] = ident
            if ident in self._components:
                self._components.move_to_end(ident)
                components[name] = self._components[ident]
                continue
            if progress:
                progress(f"Loading {name}", i / len(names))
            obj = override.load(placement) if override else self._load_component(folder, name, lib_cls, placement)
            self.loads.append((name, ident))
            components[name] = obj
            self._components[ident] = obj
        if progress:
            progress("Assembling the pipeline", 0.95)
        try:
            pipe = StableDiffusion3Pipeline(**components)
        except Exception as e:  # wrong component types in a foreign folder
            raise ModelError(f"{src} does not assemble into an SD3 pipeline: {e}") from e
        pipe.set_progress_bar_config(disable=True)
        self._place(pipe, placement, [n for n, _ in self.loads[loads_before:]])
        tiny = tiny_variant_of(folder)
        var = _infer_variant(variant, tiny, src, pipe.transformer.config)
        if progress:
            progress("Ready", 1.0)
        return LoadedModel(pipe, var, src, placement, identities, is_tiny=tiny is not None)

    def _load_whole(self, folder, src, variant, placement, progress) -> LoadedModel:
        """Multi-GPU: diffusers spreads the components itself (device_map="balanced"). Nothing
        is shared with other variants in this mode. CUDA only."""
        from diffusers import StableDiffusion3Pipeline

        from .tiny import tiny_variant_of

        if progress:
            progress("Loading the pipeline across GPUs", 0.1)
        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(folder, use_safetensors=True, **placement.pipeline_kwargs)
        except Exception as e:
            raise ModelError(f"Could not load {src} across GPUs: {_short(e)}") from e
        pipe.set_progress_bar_config(disable=True)
        tiny = tiny_variant_of(folder)
        var = _infer_variant(variant, tiny, src, pipe.transformer.config)
        return LoadedModel(pipe, var, src, placement, {}, is_tiny=tiny is not None)

    def _load_component(self, folder: Path, name: str, lib_cls, placement: Placement):
        library, cls_name = lib_cls
        if library not in ("diffusers", "transformers"):
            raise ModelError(f"Component {name} comes from {library!r}; only diffusers/transformers load.")
        cls = getattr(importlib.import_module(library), cls_name)
        sub = folder / name
        kwargs = dict(placement.component_kwargs.get(name, {}))
        is_model = hasattr(cls, "parameters") or name.startswith(("transformer", "vae", "text_encoder"))
        try:
            if is_model:
                if any(p.suffix in PICKLE_SUFFIXES for p in sub.glob("*")) and not any(
                    p.suffix == ".safetensors" for p in sub.glob("*")
                ):
                    raise ModelError(
                        f"{sub} holds only pickled weights; the studio loads .safetensors only."
                    )
                kwargs.setdefault("use_safetensors", True)
                kwargs.setdefault("dtype" if library == "transformers" else "torch_dtype", placement.dtype)
            return cls.from_pretrained(folder, subfolder=name, **kwargs)
        except ModelError:
            raise
        except Exception as e:
            hint = ""
            if "GPU is needed for quantization" in str(e):
                hint = (" — bitsandbytes quantization of the transformer needs a CUDA GPU (diffusers "
                        "refuses it on CPU). Pick a CPU preset such as cpu-bf16 or cpu-fp32.")
            raise ModelError(f"Could not load {name} from {sub}: {_short(e)}{hint}") from e

    def _place(self, pipe, placement: Placement, fresh: list[str]) -> None:
        """Put the pipeline where the placement says. A resident placement moves only the
        components just read from disk: reused ones are already in place (a swap back to a cached
        variant then costs next to nothing). Offload hooks are pipeline-wide and always re-applied."""
        if placement.resident:
            for name in fresh:
                module = getattr(pipe, name, None)
                if hasattr(module, "to") and hasattr(module, "parameters"):
                    module.to(placement.device)
            if placement.apply:
                placement.apply(pipe)
        elif placement.apply:
            placement.apply(pipe)
        else:
            pipe.to(placement.device)

    def _trim_cache(self) -> None:
        """Keep the live components plus recently used ones, within the RAM budget."""
        live = set(self.current.identities.values()) if self.current else set()
        budget = self._cache_bytes if self._cache_bytes is not None else _default_cache_budget()
        total = 0
        for ident in reversed(list(self._components)):  # newest first
            if ident in live:
                continue
            if ident not in self._sizes:
                self._sizes[ident] = _module_bytes(self._components[ident])
            total += self._sizes[ident]
            if total > budget:
                del self._components[ident]
                self._sizes.pop(ident, None)

    def unload(self) -> None:
        with self.lock:
            self.current = None
            self._img2img = None
            self._inpaint = None
            self._components.clear()
            self._sizes.clear()
            free_memory()

    # -- use --

    @contextmanager
    def use(self, variant: str | None = None):
        """Hold the model for a generation: no swap can interleave."""
        with self.lock:
            if self.current is None or (variant and self.current.variant.name != variant):
                self.load(variant=variant)
            yield self.current

    def img2img(self, loaded: LoadedModel):
        """The img2img pipeline sharing every component (explicit dtype: no fp32 upcast)."""
        from diffusers import StableDiffusion3Img2ImgPipeline

        with self.lock:
            if self._img2img is None or self._img2img[0] is not loaded:
                pipe = StableDiffusion3Img2ImgPipeline.from_pipe(loaded.pipe, dtype=loaded.dtype)
                pipe.set_progress_bar_config(disable=True)
                self._img2img = (loaded, pipe)
            return self._img2img[1]

    def inpaint(self, loaded: LoadedModel):
        """The inpaint pipeline sharing every component (explicit dtype: no fp32 upcast).

        SD3's transformers have 16 input channels: diffusers then blends the source latents back
        outside the mask at every step (no dedicated inpainting model needed)."""
        from diffusers import StableDiffusion3InpaintPipeline

        with self.lock:
            if self._inpaint is None or self._inpaint[0] is not loaded:
                pipe = StableDiffusion3InpaintPipeline.from_pipe(loaded.pipe, dtype=loaded.dtype)
                pipe.set_progress_bar_config(disable=True)
                self._inpaint = (loaded, pipe)
            return self._inpaint[1]

    # -- LoRA --

    def activate_loras(self, loaded: LoadedModel, selection) -> list:
        """Make exactly ``selection`` ([(LoraInfo, weight)]) active on the loaded model.

        Adapters stay loaded in the transformer (and text encoders) they were loaded into, so a
        LoRA used again costs nothing; weight-0 entries are left out; an empty selection disables
        every adapter, so the base model runs exactly. Returns the active [(LoraInfo, weight)].
        Raises ModelError with what to do.
        """
        pipe = loaded.pipe
        active = [(info, float(w)) for info, w in selection if float(w) != 0.0]
        with self.lock:
            loaded_names = _adapters_of(pipe)
            if not active:
                if loaded_names:
                    pipe.disable_lora()
                return []
            problem = lora_blocker(loaded)
            if problem:
                raise ModelError(problem)
            for info, _ in active:
                if info.adapter_name in loaded_names:
                    continue
                try:
                    pipe.load_lora_weights(str(info.path), adapter_name=info.adapter_name)
                except Exception as e:  # shape mismatch: a LoRA for another model
                    try:
                        pipe.delete_adapters([info.adapter_name])
                    except Exception:  # noqa: BLE001 — nothing was loaded
                        pass
                    raise ModelError(
                        f"LoRA {info.name!r} does not fit {loaded.label}: {_short(e)}. LoRAs are made "
                        "for one model (SD3 Medium, SD3.5 Medium or SD3.5 Large); pick a matching one."
                    ) from e
                if info.adapter_name not in _adapters_of(pipe):
                    raise ModelError(f"LoRA {info.name!r} changed nothing in {loaded.label}: its keys "
                                     "match no layer of this model.")
            pipe.enable_lora()
            pipe.set_adapters([i.adapter_name for i, _ in active], [w for _, w in active])
            return active

    def unload_loras(self) -> int:
        """Remove every LoRA from the loaded model (the base weights are untouched). Returns how
        many adapters were removed."""
        with self.lock:
            if self.current is None:
                return 0
            n = len(_adapters_of(self.current.pipe))
            if n:
                self.current.pipe.unload_lora_weights()
            return n

    def active_loras(self) -> list[str]:
        if self.current is None:
            return []
        return sorted(_adapters_of(self.current.pipe))


def _adapters_of(pipe) -> set[str]:
    names: set[str] = set()
    for comp in ("transformer", "text_encoder", "text_encoder_2"):
        cfg = getattr(getattr(pipe, comp, None), "peft_config", None)
        if cfg:
            names |= set(cfg)
    return names


def lora_blocker(loaded: LoadedModel) -> str | None:
    """Why this model cannot take a LoRA (None when it can)."""
    from diffusers.utils import USE_PEFT_BACKEND

    if not USE_PEFT_BACKEND:
        return ("LoRAs need the peft package: `pip install peft` (see requirements.txt), then restart "
                "the studio.")
    transformer = loaded.pipe.transformer
    quantized = getattr(getattr(transformer, "config", None), "quantization_config", None) is not None or any(
        type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in transformer.modules())
    if quantized or "nf4" in str(loaded.placement.name).lower():
        return (f"The transformer is quantized (preset {loaded.placement.name}: bitsandbytes NF4/8-bit); "
                "the studio does not apply LoRAs to a quantized transformer. Pick a preset that keeps "
                "the transformer in bf16/fp16 (Models & Memory), or generate without LoRAs.")
    fp8 = {"float8_e4m3fn", "float8_e5m2"}
    if "fp8" in str(loaded.placement.name).lower() or any(
            str(p.dtype).replace("torch.", "") in fp8 for p in transformer.parameters()):
        # peft would load the LoRA weights in fp8 storage and fail in the first step
        return (f"The transformer is stored in fp8 (preset {loaded.placement.name}); LoRAs cannot run on "
                "fp8 layerwise-cast weights. Pick a preset that keeps the transformer in bf16/fp16 "
                "(Models & Memory), or generate without LoRAs.")
    return None


def _infer_variant(requested: str | None, tiny: str | None, src: ModelSource, tconfig) -> Variant:
    if requested:
        return get_variant(requested)
    if tiny:
        return get_variant(tiny)
    for v in VARIANTS.values():
        if src.kind == "hub" and v.repo_id == src.ref:
            return v
    guess = variant_for_transformer_config(dict(tconfig))
    if guess and guess.name == "sd3.5-large" and "turbo" in src.ref.lower():
        return get_variant("sd3.5-large-turbo")
    return guess or get_variant("sd3.5-medium")


def _module_bytes(obj) -> int:
    try:
        return sum(t.numel() * t.element_size() for t in obj.state_dict().values())
    except Exception:
        return 0


def _default_cache_budget() -> int:
    """Half of the available RAM, at most."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 8 << 30


def free_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


# --- the Hub ----------------------------------------------------------------------------------


def missing_weights_message(repo_id: str) -> str:
    return (
        f"The weights of {repo_id} are not on this machine. To get them: accept the licence at "
        f"https://huggingface.co/{repo_id} (the repo is gated), log in with `hf auth login` or "
        "set HF_TOKEN, then load the model again with network access. Or point --model at a local "
        "diffusers folder or .safetensors file — or try the offline demo with --demo."
    )


def download(repo_id: str, progress: ProgressFn | None = None) -> Path:
    """Download the diffusers layout of a Hub repo (or find it in the cache); errors teach."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    if progress:
        progress(f"Fetching {repo_id}", 0.0)
    tqdm_class = None
    if progress:
        from tqdm.auto import tqdm as _tqdm

        class _Reporter(_tqdm):  # huggingface_hub's download bars, forwarded to the caller
            def update(self, n=1):
                out = super().update(n)
                self._studio_done = getattr(self, "_studio_done", 0) + (n or 0)  # counted even when disabled
                if self.total:
                    done = self._studio_done
                    progress(f"Downloading {repo_id}: {done / 2**30:.2f} of {self.total / 2**30:.2f} GB",
                             min(done / self.total, 1.0) * 0.5)
                return out

        tqdm_class = _Reporter
    try:
        path = snapshot_download(repo_id, allow_patterns=HUB_ALLOW, ignore_patterns=HUB_IGNORE,
                                 tqdm_class=tqdm_class)
    except GatedRepoError as e:
        raise ModelError(
            f"{repo_id} is gated: accept its licence at https://huggingface.co/{repo_id} while "
            "logged in, then log in here (`hf auth login`, HF_TOKEN, or the token field in "
            "Models & Memory) and try again."
        ) from e
    except RepositoryNotFoundError as e:
        raise ModelError(
            f"No repo {repo_id} on the Hugging Face Hub (or it is private and you are not logged "
            "in). Check the id, e.g. stabilityai/stable-diffusion-3.5-medium."
        ) from e
    except LocalEntryNotFoundError as e:
        raise ModelError(missing_weights_message(repo_id) + " (The Hub could not be reached.)") from e
    except HfHubHTTPError as e:
        raise ModelError(f"Downloading {repo_id} failed: {_short(e)}. Try again later.") from e
    except OSError as e:
        raise ModelError(f"Downloading {repo_id} failed: {_short(e)}.") from e
    if progress:
        progress(f"{repo_id} is on disk", 0.5)
    return Path(path)


def placement_from_preset(preset, device: str, hardware=None, validate_on_cpu: bool = False) -> Placement:
    """Turn a memory preset (studio.memory) into per-component loading and a post-load step.

    ``validate_on_cpu``: run a CUDA preset's loading on the CPU as far as the libraries allow —
    8-bit / NF4 T5 (transformers + bitsandbytes) and fp8 layerwise casting run; an NF4
    transformer stops at diffusers' refusal, reported as a ModelError. Used by the tests to hold
    the planner's byte estimates against what loading really allocates.
    """
    from .memory import apply_fp8_storage

    if validate_on_cpu:
        kwargs = preset.load_kwargs("cuda")
        kwargs.pop("device_map", None)
        device = "cpu"

        def apply(pipe):
            if preset.transformer == "fp8":
                apply_fp8_storage(pipe.transformer, preset.dtype)
            return pipe
    else:
        kwargs = preset.load_kwargs(device, hardware)

        def apply(pipe):
            return preset.apply(pipe, device)

    quant = kwargs.get("quantization_config")
    mapping = dict(getattr(quant, "quant_mapping", None) or {})
    no_t5 = "text_encoder_3" in kwargs and kwargs["text_encoder_3"] is None
    return Placement(
        name=preset.name,
        device=device,
        dtype=kwargs["dtype"],
        component_kwargs={name: {"quantization_config": cfg} for name, cfg in mapping.items()},
        skip=("text_encoder_3", "tokenizer_3") if no_t5 else (),
        apply=apply,
        pipeline_kwargs=kwargs if "device_map" in kwargs else None,
        resident=validate_on_cpu or preset.placement == "resident",
    )


def placement_for(config: StudioConfig, preset: str | None = "auto", variant: str | None = None,
                  hardware=None) -> Placement:
    """The Placement for a memory preset name; "auto" asks the planner (the demo family is tiny:
    it runs with the device's default). Raises ModelError when the preset cannot run here."""
    from .hardware import detect_hardware
    from .memory import choose, get_preset

    preset = preset or config.preset or "auto"
    try:
        hardware = hardware or detect_hardware(device=config.device)
    except ValueError as e:
        raise ModelError(str(e)) from e
    if preset == "auto":
        if config.demo:
            return default_placement(hardware.device)
        plan = choose(hardware, variant or config.variant or "sd3.5-medium")
        if not plan.fits:
            log.warning("no preset fits: %s", plan.explanation.splitlines()[0])
        preset = plan.preset
    try:
        chosen = get_preset(preset)
    except (KeyError, ValueError) as e:
        raise ModelError(str(e.args[0] if e.args else e)) from e
    problem = chosen.check(hardware)
    if problem:
        raise ModelError(f"Preset {chosen.name!r} cannot run here: {problem}")
    return placement_from_preset(chosen, hardware.device, hardware)
