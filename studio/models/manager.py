"""The model manager: where weights come from, how they are loaded, what is shared.

A pipeline is a set of components (diffusers' own view: ``pipe.components``). The manager loads
a diffusers folder component by component, each through its class's ``from_pretrained`` — the
same code path for a real checkpoint and for the offline tiny family — and gives every
component an *identity* derived from its content (hashes of its files). Two variants whose
components have the same identity share one object: switching SD3.5 Large → Large Turbo reloads
only the transformer. Recently used components stay in a RAM cache so switching back is cheap.

Where weights come from is ``sources.py`` (Hub ids, folders, single files; pickles refused),
how they are identified ``identity.py``, how they are placed ``placement.py`` — the preset itself
is chosen by the service, once, for every load path.
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from studio.catalog import VARIANTS, SizeRules, Variant, get_variant, size_rules, variant_for_transformer_config
from studio.config import StudioConfig
from studio.demo.tiny import build_tiny_family, tiny_variant_of
from studio.errors import ModelError
from studio.logs import quiet_libraries
from studio.models.controlnet import ControlNetLibrary
from studio.models.identity import HashCache
from studio.models.lora import LoraLibrary
from studio.models.placement import Placement, default_placement
from studio.models.upscalers import UpscalerLibrary
from studio.models.sources import PICKLE_SUFFIXES, ModelSource, ProgressFn, download, short_error, missing_weights_message, parse_source

log = logging.getLogger(__name__)

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



@dataclass
class LoadedModel:
    """The model the manager holds: the pipeline, what it is, where it came from, how it is
    placed, the identity of each component and which components this load read from disk."""

    pipe: object  # StableDiffusion3Pipeline
    variant: Variant
    source: ModelSource
    placement: Placement
    identities: dict[str, str]
    is_tiny: bool = False
    fresh: tuple[str, ...] = ()  # components read from disk by this load (the rest were shared)

    @property
    def label(self) -> str:
        """What the UI calls the model: the variant's label, marked when it is the tiny demo."""
        return self.variant.label + (" (tiny demo)" if self.is_tiny else "")

    @property
    def native_size(self) -> tuple[int, int]:
        """The (width, height) the transformer was trained at."""
        side = self.pipe.transformer.config.sample_size * self.pipe.vae_scale_factor
        return side, side

    @property
    def size_rules(self) -> SizeRules:
        """The sizes this model accepts (``catalog.size_rules``)."""
        return size_rules(self.pipe.transformer.config, self.pipe.vae_scale_factor)

    @property
    def max_side(self) -> int:
        """The largest side in pixels the transformer's position embedding covers."""
        return self.size_rules.max_side

    @property
    def size_multiple(self) -> int:
        """What every side must be a multiple of (16 for SD3; the VAE's factor × the patch size)."""
        return self.size_rules.multiple

    @property
    def dtype(self):
        """The torch dtype the model was loaded in."""
        return self.placement.dtype


class ModelManager:
    """Loads, shares and swaps SD3 pipelines. Thread-safe: use ``with manager.use(...)``."""

    def __init__(self, config: StudioConfig, placement: Placement | None = None, cache_bytes: int | None = None,
                 progress: ProgressFn | None = None, placement_policy=None):
        self.config = config
        self.placement = placement  # a fixed placement for every load (tests, the bench)
        # variant name -> Placement: how a load without an explicit placement is placed. The
        # service passes its one decision (Studio.placement_for) so lazy loads, swaps and Turbo
        # all honour the chosen preset.
        self.placement_policy = placement_policy
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
        self.loras = LoraLibrary(config.loras_dir, self.hashes)
        self.upscalers = UpscalerLibrary(config.upscalers_dir, hashes=self.hashes)
        self.controlnets = ControlNetLibrary(self.hashes, progress=progress)
        self._controlnet_pipe = None  # (loaded, net shas, inpaint, pipeline): rebuilt after a load
        self._demo_controlnets: dict[str, Path] = {}
        if config.demo:  # the demo's tiny ESRGAN (random weights, 0.9 MB), so upscaling works offline
            from studio.demo.upscaler import TINY_UPSCALER_NAME, build_tiny_upscaler

            if not (config.upscalers_dir / f"{TINY_UPSCALER_NAME}.safetensors").is_file():
                build_tiny_upscaler(config.upscalers_dir / f"{TINY_UPSCALER_NAME}.safetensors", scale=2)

    # -- where a variant comes from --

    def source_for(self, variant: str | None = None) -> ModelSource:
        """The source the studio uses for a variant: demo family, --model, or the Hub repo."""
        variant = variant or self.config.variant
        if self.config.demo:
            name = variant or "sd3.5-medium"
            if self.config.demo_weights == "trained":
                folders = self._demo_family(name)
                if folders is not None:
                    return ModelSource("folder", str(folders[name]))
            folders = build_tiny_family(self.config.tiny_dir, variants=[name])
            return ModelSource("folder", str(folders[name]))
        if self.config.model and (variant is None or variant == self.config.variant):
            return parse_source(self.config.model)
        return ModelSource("hub", get_variant(variant or "sd3.5-medium").repo_id)

    def _demo_family(self, name: str):
        """The trained demo family's folders ({variant: folder}: the trained sd3.5-medium, the other
        variants its VAE and encoders around random transformers), or None — with a log line
        saying why — when the shipped weights are missing (the random family is used then)."""
        from studio.demo import DemoAssetsError, build_demo_family

        try:
            return build_demo_family(self.config.demo_dir, variants=[name])
        except DemoAssetsError as e:
            if not getattr(self, "_demo_missing_said", False):
                log.warning("%s Using the tiny random family instead.", e)
                self._demo_missing_said = True
            return None

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
        quiet_libraries()
        import diffusers  # noqa: F401 — imported here, not at start-up
        import transformers  # noqa: F401

        quiet_libraries()
        src = parse_source(spec) if spec else self.source_for(variant)
        if placement is None:
            placement = self.placement
        if placement is None and self.placement_policy is not None:
            placement = self.placement_policy(variant)
        if placement is None:
            placement = default_placement(self.config.device)
        progress = progress or self.progress
        with self.lock:
            if src.kind == "file":
                from studio.models.singlefile import resolve_single_file

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
            self._controlnet_pipe = None
            self._trim_cache()
            return loaded

    def _load_folder(self, folder, src, variant, placement, progress, file_overrides) -> LoadedModel:
        from diffusers import StableDiffusion3Pipeline

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
        fresh: list[str] = []
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
            fresh.append(name)
            components[name] = obj
            self._components[ident] = obj
        if progress:
            progress("Assembling the pipeline", 0.95)
        try:
            pipe = StableDiffusion3Pipeline(**components)
        except Exception as e:  # wrong component types in a foreign folder
            raise ModelError(f"{src} does not assemble into an SD3 pipeline: {e}") from e
        pipe.set_progress_bar_config(disable=True)
        self._place(pipe, placement, fresh)
        tiny = tiny_variant_of(folder)
        var = _infer_variant(variant, tiny, src, pipe.transformer.config)
        if progress:
            progress("Ready", 1.0)
        return LoadedModel(pipe, var, src, placement, identities, is_tiny=tiny is not None, fresh=tuple(fresh))

    def _load_whole(self, folder, src, variant, placement, progress) -> LoadedModel:
        """Multi-GPU: diffusers spreads the components itself (device_map="balanced"). Nothing
        is shared with other variants in this mode. CUDA only."""
        from diffusers import StableDiffusion3Pipeline

        if progress:
            progress("Loading the pipeline across GPUs", 0.1)
        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(folder, use_safetensors=True, **placement.pipeline_kwargs)
        except Exception as e:
            raise ModelError(f"Could not load {src} across GPUs: {short_error(e)}") from e
        pipe.set_progress_bar_config(disable=True)
        tiny = tiny_variant_of(folder)
        var = _infer_variant(variant, tiny, src, pipe.transformer.config)
        return LoadedModel(pipe, var, src, placement, {}, is_tiny=tiny is not None,
                           fresh=tuple(n for n in SD3_COMPONENTS if getattr(pipe, n, None) is not None))

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
            model = cls.from_pretrained(folder, subfolder=name, **kwargs)
        except ModelError:
            raise
        except Exception as e:
            hint = ""
            if "GPU is needed for quantization" in str(e):
                hint = (" — bitsandbytes quantization of the transformer needs a CUDA GPU (diffusers "
                        "refuses it on CPU). Pick a CPU preset such as cpu-bf16 or cpu-fp32.")
            raise ModelError(f"Could not load {name} from {sub}: {short_error(e)}{hint}") from e
        if placement.device == "cpu" and hasattr(model, "named_modules"):
            problem = cpu_4bit_problem(model)
            if problem:
                raise ModelError(f"{name} cannot run in 4-bit on this CPU: {problem}")
        return model

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
        """Drop the loaded model, its sibling pipelines, the ControlNets and the shared components, and
        free the memory."""
        with self.lock:
            self.current = None
            self._img2img = None
            self._inpaint = None
            self._controlnet_pipe = None
            self.controlnets.clear()
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
        """The img2img pipeline, built from the loaded pipeline's own component objects."""
        from diffusers import StableDiffusion3Img2ImgPipeline

        with self.lock:
            if self._img2img is None or self._img2img[0] is not loaded:
                self._img2img = (loaded, _sibling(StableDiffusion3Img2ImgPipeline, loaded.pipe))
            return self._img2img[1]

    def inpaint(self, loaded: LoadedModel):
        """The inpaint pipeline, built from the loaded pipeline's own component objects.

        SD3's transformers have 16 input channels: diffusers then blends the source latents back
        outside the mask at every step (no dedicated inpainting model needed)."""
        from diffusers import StableDiffusion3InpaintPipeline

        with self.lock:
            if self._inpaint is None or self._inpaint[0] is not loaded:
                self._inpaint = (loaded, _sibling(StableDiffusion3InpaintPipeline, loaded.pipe))
            return self._inpaint[1]

    # -- ControlNet --

    def default_controlnet(self, loaded: LoadedModel, control_type: str) -> str | None:
        """What a request that names no ControlNet uses: the catalog's for the variant and type
        (None when it has none); in demo mode the tiny ControlNet of the loaded base, for any type
        but inpaint (built offline on first use, studio.demo.controlnet)."""
        from studio.control_catalog import default_controlnet

        if self.config.demo and loaded.is_tiny:
            if control_type == "inpaint":
                return None
            name = loaded.variant.name
            with self.lock:
                if name not in self._demo_controlnets:
                    from studio.demo.controlnet import build_tiny_controlnets

                    built = build_tiny_controlnets(self.config.tiny_dir / "controlnets", {name: Path(loaded.source.ref)})
                    self._demo_controlnets[name] = built[name]
                return str(self._demo_controlnets[name])
        entry = default_controlnet(loaded.variant.name, control_type)
        return entry.id if entry else None

    def controlnet(self, loaded: LoadedModel, spec: str, progress: ProgressFn | None = None):
        """A ControlNet (LoadedControlNet) for the loaded model, in its dtype, from the RAM cache
        when the same content was loaded before. Raises ModelError (download, files)."""
        return self.controlnets.get(spec, loaded.dtype, base_config=dict(loaded.pipe.transformer.config),
                                    progress=progress or self.progress,
                                    setup=loaded.placement.preset.controlnet_key if loaded.placement.preset else "")

    def controlnet_pipeline(self, loaded: LoadedModel, nets, inpaint: bool = False):
        """The ControlNet (or ControlNet inpainting) pipeline over the loaded pipeline's own
        components and ``nets``; kept for the next request with the same nets, rebuilt after a
        load."""
        from studio.models.controlnet import pipeline_for

        key = (tuple(n.sha256 for n in nets), bool(inpaint))
        with self.lock:
            cached = self._controlnet_pipe
            if cached is not None and cached[0] is loaded and cached[1] == key:
                return cached[2]
            pipe = pipeline_for(loaded.pipe, list(nets), loaded.dtype, inpaint=inpaint, preset=loaded.placement.preset)
            self._controlnet_pipe = (loaded, key, pipe)
            return pipe

    def controlnets_done(self, nets) -> None:
        """An image with these ControlNets is done: one under model offload goes back to the CPU."""
        from studio.models.controlnet import release_controlnets

        release_controlnets(nets)

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
                    if getattr(info, "format", "diffusers") == "kohya":  # kohya / ComfyUI keys: converted
                        from studio.models.kohya import load_for_pipeline

                        pipe.load_lora_weights(load_for_pipeline(info.path, pipe), adapter_name=info.adapter_name)
                    else:
                        pipe.load_lora_weights(str(info.path), adapter_name=info.adapter_name)
                except Exception as e:  # shape mismatch: a LoRA for another model
                    try:
                        pipe.delete_adapters([info.adapter_name])
                    except Exception:  # noqa: BLE001 — nothing was loaded
                        pass
                    raise ModelError(
                        f"LoRA {info.name!r} does not fit {loaded.label}: {short_error(e)}. LoRAs are made "
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
        """The adapter names of the LoRAs on the loaded model, sorted ([] with no model)."""
        if self.current is None:
            return []
        return sorted(_adapters_of(self.current.pipe))


def _sibling(cls, pipe):
    """Another SD3 pipeline class over the very same component objects: nothing is copied, cast or
    moved. (``from_pipe(dtype=…)`` would re-cast every module: it turns an fp8 layerwise-cast
    transformer back into bf16, a full bf16 peak, and without ``dtype`` it upcasts to fp32.)"""
    import inspect

    names = set(inspect.signature(cls.__init__).parameters) - {"self"}
    sibling = cls(**{k: v for k, v in pipe.components.items() if k in names})
    sibling.set_progress_bar_config(disable=True)
    return sibling


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


# bitsandbytes' CPU 4-bit kernels on CPUs with AVX512-BF16 repack each weight in blocks of 32 output
# rows and read its absmax per 64 inputs (bitsandbytes.functional._convert_weight_packed_for_cpu).
CPU_4BIT_BLOCK_N, CPU_4BIT_BLOCK_K = 32, 64


def cpu_4bit_problem(model) -> str | None:
    """Why a 4-bit (bitsandbytes NF4) model would crash on this CPU, or None.

    On AVX512-BF16 CPUs bitsandbytes runs 4-bit layers through a packed kernel that asserts
    ``out_features % 32 == 0`` (and needs ``in_features % 64 == 0``) in the first forward pass.
    Real T5-XXL layers (4096 / 10240) fit; a model with other shapes is refused here, at load,
    with the fix, instead of crashing at the first generation."""
    bad = []
    for mod_name, module in model.named_modules():
        if type(module).__name__ != "Linear4bit":
            continue
        n, k = module.out_features, module.in_features
        if n % CPU_4BIT_BLOCK_N or k % CPU_4BIT_BLOCK_K:
            bad.append(f"{mod_name} ({k}→{n})")
    if not bad or not _has_avx512bf16():
        return None
    return (f"{len(bad)} of its 4-bit layers ({', '.join(bad[:3])}{'…' if len(bad) > 3 else ''}) have shapes "
            f"bitsandbytes' AVX512-BF16 CPU kernel cannot run (it needs outputs in multiples of "
            f"{CPU_4BIT_BLOCK_N} and inputs in multiples of {CPU_4BIT_BLOCK_K}). Use an 8-bit T5 preset "
            "(t5-8bit) or a preset without 4-bit layers.")


def _has_avx512bf16() -> bool:
    try:
        from bitsandbytes.functional import has_avx512bf16
    except Exception:  # noqa: BLE001 — no bitsandbytes: nothing is 4-bit
        return False
    return bool(has_avx512bf16())


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
    """Collect garbage and give cached CUDA memory back (never fails)."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


