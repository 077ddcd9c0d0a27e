"""The Studio: every Gradio-free call the UI, the API and the CLI make — generate, load, unload,
the gallery, LoRAs, the stored inputs of an image. Built once per process.

Decisions that must not drift live here, once:

* **the placement** — an explicit preset, ``--preset``, or "auto" (the planner) — is decided by
  :meth:`Studio.placement_for` for *every* load: the "Load model" button, the first Generate's
  lazy load, a variant swap, Turbo, the CLI and the API (the model manager calls it back);
* **what a shared deployment allows** (:meth:`Studio.check_shared`): catalog models only, no
  uploads of LoRAs, no unload; a gallery per login or browser session (:meth:`owner_for`);
* **what a request may open**: only uploads, or a gallery image's stored inputs by id after the
  owner check (:meth:`image_inputs`). A value read from a PNG is never a path or an id.

Nothing heavy is imported until used, so the web page is served before any model (or torch) is
loaded.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from functools import cached_property

from studio.catalog import (DEFAULT_VARIANT, SIZE_MULTIPLE, TURBO_VARIANT, VAE_FACTOR, VARIANTS, SizeRules, get_variant,
                            size_rules, vae_factor)
from studio.config import StudioConfig
from studio.errors import GalleryError, ModelError, ValidationError

log = logging.getLogger(__name__)

PAGE_SIZE = 24
MAX_PAGE = 10**9
MAX_PAGE_SIZE = 200


class Studio:
    """Owns the model manager, the engine, the gallery and the stored inputs (blobs)."""

    def __init__(self, config: StudioConfig, shared: bool = False):
        self.config = config
        # True behind a share link, with --shared, or on a Space. Then: a gallery per login /
        # browser session (owner_for), models from the catalog only, no unload, no LoRA uploads,
        # and the UI hides what only the machine's owner should change (token, source, unload).
        self.shared = shared
        self._preset = config.preset or "auto"  # the preset every load uses until one is chosen
        self._preset_lock = threading.Lock()
        config.ensure_dirs()

    # -- the long-lived parts (built on first use) --

    @cached_property
    def models(self):
        """The model manager; every load asks :meth:`placement_for` where the model goes."""
        from studio.models import ModelManager

        return ModelManager(self.config, placement_policy=self._policy)

    @cached_property
    def gallery(self):
        """The gallery of the data dir."""
        from studio.gallery import Gallery

        return Gallery(self.config.data_dir)

    @cached_property
    def blobs(self):
        """The stored inputs of the data dir: masks, init images and control images."""
        from studio.blobs import Blobs

        return Blobs(self.config.data_dir)

    @cached_property
    def styles(self):
        """The prompt styles: the project's defaults and ``<data-dir>/styles.csv`` over them."""
        from studio.engine.styles import StyleLibrary

        return StyleLibrary.for_data_dir(self.config.data_dir)

    @cached_property
    def engine(self):
        """The generation engine, over the model manager, the gallery, the blobs and the styles."""
        from studio.engine import Engine

        return Engine(self.models, self.gallery, blobs=self.blobs, styles=self.styles)

    def is_built(self, part: str) -> bool:
        """Whether ``models`` / ``gallery`` / ``engine`` exists yet (without building it)."""
        return part in self.__dict__

    @property
    def current(self):
        """The loaded model, or None (never loads one)."""
        return self.models.current if self.is_built("models") else None

    def start(self):
        """Bring the gallery's index and files into agreement before serving (crash recovery).

        Returns the reconcile report; problems are logged, never raised."""
        try:
            report = self.gallery.reconcile()
        except GalleryError as e:
            log.warning("gallery check at start failed: %s", e)
            return None
        if report.changed:
            log.warning("gallery: %s", report.summary())
        return report

    # -- models --

    def availability(self, variant: str | None = None) -> tuple[bool, str]:
        """Whether the weights for a variant are here; if not, how to get them (no network)."""
        if self.config.demo:
            return True, "Demo mode: the offline tiny SD3 models."
        return self.models.availability(variant)

    @property
    def preset(self) -> str:
        """The preset name loads use now ("auto" or a preset name)."""
        return self._preset

    @staticmethod
    def file_bytes(source: str | None) -> tuple[dict[str, int] | None, str | None]:
        """What the planner must know of a user's file: (component_bytes, transformer_format).

        A local ``.gguf`` transformer loads at its quantized size (``quantized_bytes`` plus the
        unquantized parameters in bf16), read from its header — never guessed; any other source
        (a Hub id, a folder, a .safetensors file, fp8 or scaled fp8, which load dequantized at the
        release's size) is what the catalog counts: (None, None)."""
        if not source or not str(source).lower().endswith(".gguf") or not os.path.isfile(source):
            return None, None
        from studio.models.singlefile import file_storage

        try:
            st = file_storage(source)
        except Exception as e:  # noqa: BLE001 - the load says what is wrong with the file
            log.warning("could not read %s's header for the planner: %s", os.path.basename(source), e)
            return None, None
        loaded = int(st.get("quantized_bytes", 0)) + 2 * int(st.get("unquantized_params", 0))
        return ({"transformer": loaded} if loaded else None), "gguf"

    def placement_for(self, preset: str | None = None, variant: str | None = None, hardware=None,
                      source: str | None = None):
        """The Placement for a memory preset name — THE decision, for every load path.

        ``preset`` None means the studio's current choice (``--preset``, or the last preset
        loaded with); "auto" asks the planner. Raises ModelError naming the valid presets for an
        unknown name, and the reason for a preset that cannot run on this machine. With
        ``config.compile`` (``--compile``) the placement also compiles the transformer's blocks
        (``studio.engine.compile.with_compile``; its name ends in ``+compile``), or is refused with
        the reason for a preset that does not combine with compiling. ``source``: a GGUF file's
        real bytes and fixed storage go into the planner's choice (:meth:`file_bytes`).
        """
        from studio.memory import PRESETS, choose, get_preset
        from studio.models import default_placement, placement_from_preset

        preset = (preset or self._preset or "auto").strip()
        hardware = hardware or self.hardware()
        if preset == "auto":
            if self.config.demo:  # the tiny demo runs anywhere at the device's default precision
                placement = default_placement(hardware.device)
                placement.reason = ("demo: the tiny models run at the device's default precision; "
                                    "the planner's choice is for the real weights")
                return self._compiled(placement, "demo")
            component_bytes, transformer_format = self.file_bytes(source)
            plan = choose(hardware, variant or self.config.variant or DEFAULT_VARIANT,
                          component_bytes=component_bytes, transformer_format=transformer_format)
            if not plan.fits:
                log.warning("no preset fits: %s", plan.explanation.splitlines()[0])
            preset = plan.preset
        if preset not in PRESETS:
            raise ModelError(f"Unknown memory preset {preset[:60]!r}. Valid presets: auto, "
                             + ", ".join(PRESETS) + " (see `launch.py plan`).")
        chosen = get_preset(preset)
        problem = chosen.check(hardware)
        if problem:
            raise ModelError(f"Preset {chosen.name!r} cannot run here: {problem}")
        return self._compiled(placement_from_preset(chosen, hardware.device, hardware), chosen.name)

    def _compiled(self, placement, preset: str):
        """``placement_for``'s last step: the placement as it is, or with ``--compile`` wrapped by
        ``with_compile`` (its first run reported through the model manager's progress); a preset
        ``compile_problem`` refuses raises ModelError with the reason."""
        if not self.config.compile:
            return placement
        from studio.engine import compile as compiling

        def progress(message: str) -> None:
            log.info("%s", message)
            report = self.models.progress if self.is_built("models") else None
            if report is not None:
                report(message, None)

        try:
            return compiling.with_compile(placement, backend=compiling.COMPILE_BACKEND, progress=progress)
        except ValueError as e:
            raise ModelError(f"Preset {preset!r}: {e}") from None

    def _policy(self, variant: str | None):
        """What the model manager asks for a load that names no placement (lazy loads, swaps)."""
        return self.placement_for(None, variant)

    def check_shared(self, source: str | None = None, variant: str | None = None) -> None:
        """Refuse what a shared deployment does not allow (model sources other than the catalog)."""
        if not self.shared:
            return
        if source:
            raise ModelError(
                "This studio is shared: models come from the catalog only, so a source (a Hub id "
                "or a path) is not accepted. Choose a variant instead: " + ", ".join(VARIANTS) + ".")
        if variant and variant not in VARIANTS:
            raise ModelError(f"Unknown variant {str(variant)[:60]!r}; choose one of: {', '.join(VARIANTS)}.")

    def load_model(self, source: str | None = None, variant: str | None = None,
                   preset: str | None = None, progress=None):
        """Load (or hot-swap to) a model with a memory preset (None: the current choice; "auto":
        the planner's). The preset becomes the studio's choice for later loads (swaps, Turbo).

        Raises ModelError with a message for the user; the previous model stays loaded on failure.
        """
        self.check_shared(source, variant)
        if variant is not None and variant not in VARIANTS:
            raise ModelError(f"Unknown variant {str(variant)[:60]!r}; choose one of: {', '.join(VARIANTS)}.")
        placement = self.placement_for(preset, variant, source=source)
        loaded = self.models.load(source or None, variant=variant, placement=placement, progress=progress)
        if preset:
            with self._preset_lock:
                self._preset = preset
        return loaded

    def unload_model(self) -> None:
        """Free the model's memory. Not on shared deployments: the model is everyone's."""
        if self.shared:
            raise ModelError("This studio is shared: the model stays loaded for everyone using it.")
        if self.is_built("models"):
            self.models.unload()

    # -- generating --

    def check_request(self, req) -> None:
        """Refuse a bad request before any model is loaded (a bad width costs no load).

        Checks everything but the image inputs against the catalog variant the request will run
        on; the engine checks again, fully, against the loaded model. On a shared deployment
        ControlNets come from the catalog only (:meth:`check_controlnet_sources`)."""
        from studio.engine import validate

        self.check_controlnet_sources(req)
        name = req.variant or (TURBO_VARIANT if req.mode == "turbo" else None)
        current = self.current
        if name is None:
            name = current.variant.name if current is not None else (self.config.variant or DEFAULT_VARIANT)
        if name not in VARIANTS:
            raise ValidationError(f"Unknown variant {str(name)[:60]!r}; choose one of: {', '.join(VARIANTS)}.",
                                  "variant")
        if current is not None and current.variant.name == name:
            resolved = validate(req, current.variant, current.max_side, current.native_size, images=False,
                                multiple=current.size_multiple)
        else:
            rules = self.size_rules_for(name)
            resolved = validate(req, get_variant(name), rules.max_side, images=False, multiple=rules.multiple,
                                native_size=(256, 256) if self.config.demo else (1024, 1024))
        nets = self._planned_controlnets(resolved, name)
        if nets:
            self._check_controlnet_memory(resolved, name, nets)
        if resolved.hires is not None:
            self._check_hires_memory(req, resolved, name, nets)

    def hardware(self):
        """The machine the planner plans for (``--device`` honoured)."""
        from studio.hardware import detect_hardware

        try:
            return detect_hardware(device=self.config.device)
        except ValueError as e:
            raise ModelError(str(e)) from e

    def _run_preset(self, name: str):
        """The memory preset variant ``name`` runs with: the loaded one's, else the one its load
        will get (:meth:`placement_for`); None for a placement no preset made (nothing to plan)."""
        from studio.engine.compile import COMPILE_SUFFIX
        from studio.memory import get_preset

        current = self.current
        placement = current.placement if current is not None and current.variant.name == name else \
            self.placement_for(None, name)
        try:
            return get_preset(placement.name.removesuffix(COMPILE_SUFFIX))
        except KeyError:  # not a planner preset (e.g. the default placement)
            return None

    def _planned_controlnets(self, resolved, name: str) -> list[str]:
        """The catalog ids of a request's ControlNets, as the planner counts them (a named catalog
        id, or the catalog's default for the control type). A folder, file or Hub id is not in
        the catalog: its bytes are unknown before it loads, so it is not planned. The demo's tiny
        ControlNets are not what the planner counts: none."""
        from studio.control_catalog import default_controlnet

        if self.config.demo:
            return []
        out = []
        for u in resolved.controls or ():
            entry = u.entry or (default_controlnet(name, u.control_type) if u.source is None else None)
            if entry is not None:
                out.append(entry.id)
        return out

    def _check_controlnet_memory(self, resolved, name: str, nets: list[str]) -> None:
        """ControlNets beside the preset the model runs with (#15): the planner plans the preset
        with them, at the request's size; a request they do not fit is refused before anything
        loads, naming the preset the planner picks for the model with them."""
        from studio.memory import choose, plan_for

        preset = self._run_preset(name)
        if preset is None:
            return
        hardware = self.hardware()
        plan = plan_for(hardware, name, preset, resolved.width, resolved.height, controlnets=nets)
        if plan.fits:
            return
        better = choose(hardware, name, resolved.width, resolved.height, controlnets=nets)
        fix = (f"load the model with preset {better.preset!r}, which fits it with "
               f"{'them' if len(nets) > 1 else 'it'} (Models & Memory, or --preset {better.preset})" if better.fits
               else "no preset fits the model with them on this machine: use a smaller size or fewer ControlNets")
        raise ValidationError(
            f"ControlNet {', '.join(nets)} does not fit beside {get_variant(name).label} with preset {preset.name!r} "
            f"at {resolved.width}×{resolved.height} ({plan.reason}); {fix}. "
            f"`launch.py plan --variant {name} --controlnet {nets[0]}` explains it.", "controlnet")

    def _check_hires_memory(self, req, resolved, name: str, nets: list[str] | None = None) -> None:
        """A hires fix on the preset the model runs with (#17): the planner plans the second pass
        (the larger one) at its size, with the request's ControlNets; when its decode fits only
        in tiles the request says so (``hires_vae_tiling``), and when it does not fit even so it
        is refused with the largest size that does. The demo's tiny models are not what the
        planner counts: not checked."""
        from studio.memory import hires_fit

        if self.config.demo or req.hires_vae_tiling is not None:
            return
        preset = self._run_preset(name)
        if preset is None:
            return
        h = resolved.hires
        fit = hires_fit(self.hardware(), name, preset, h.width, h.height, first=(resolved.width, resolved.height),
                        controlnets=nets or ())
        if fit.fits:
            if fit.tiled:
                req.hires_vae_tiling = True  # the engine decodes the second pass in tiles
            return
        if fit.largest is None:  # the preset does not fit the first pass either: the load's plan says so
            return
        hint = (f"the largest that fits is {fit.largest[0]}×{fit.largest[1]} (hires upscale by "
                f"{fit.largest[0] / resolved.width:.2f})")
        raise ValidationError(
            f"The hires fix's second pass at {h.width}×{h.height} does not fit preset {preset.name!r} here, "
            f"even with the VAE decoding in tiles ({fit.reason}); {hint}. Lower the hires upscale, or pick a "
            "preset that offloads more (see Models & Memory).", "hires_scale")

    @staticmethod
    def check_image(path, field: str = "init_image") -> tuple[int, int]:
        """Check an uploaded image the moment it arrives (header first, then decode): its
        (width, height), or the engine's ValidationError naming the upload and the fix."""
        from studio.engine.images import open_image

        return open_image(path, field).size

    def size_rules_for(self, variant: str | None = None) -> SizeRules:
        """The sizes the model for ``variant`` accepts (None: the loaded one;
        ``catalog.size_rules``): the loaded model's when it is that variant, else from its configs
        on disk (the demo family's, whose VAE may not be SD3's 8×) or the catalog's."""
        import json

        current = self.current
        name = variant or (current.variant.name if current is not None else None) or self.config.variant \
            or DEFAULT_VARIANT
        if current is not None and current.variant.name == name:
            return current.size_rules
        cfg = VARIANTS[name].transformer_config if name in VARIANTS else {}
        factor = VAE_FACTOR
        if self.config.demo:
            try:
                folder = self.config.demo_dir if self.config.demo_weights == "trained" else self.config.tiny_dir
                if not (folder / name / "transformer" / "config.json").is_file():
                    folder = self.config.tiny_dir
                cfg = json.loads((folder / name / "transformer" / "config.json").read_text())
                blocks = json.loads((folder / name / "vae" / "config.json").read_text())["block_out_channels"]
                factor = vae_factor(blocks)
            except (OSError, ValueError, KeyError, TypeError):
                pass
        return size_rules(cfg, factor)

    def max_side_for(self, variant: str | None = None) -> int:
        """The largest width or height the model for ``variant`` accepts (:meth:`size_rules_for`)."""
        return self.size_rules_for(variant).max_side

    # Set on ZeroGPU (studio/app/spaces.py): ``gpu_runner(prepared, on_progress, cancel)`` runs
    # :meth:`infer` in a GPU worker process and returns its plain result.
    gpu_runner = None

    def generate(self, req, on_progress=None, cancel=None, owner: str | None = None, on_image=None):
        """Check ``req``, then generate.

        Without a ``gpu_runner`` (locally, the CLI, a dedicated GPU Space): ``Engine.generate`` in
        this process, each image handed to the gallery's background writer as it finishes. With
        one (ZeroGPU): :meth:`prepare` here, :meth:`infer` in the GPU worker, :meth:`save` here."""
        self.check_request(req)
        if self.gpu_runner is None:
            return self.engine.generate(req, on_progress=on_progress, cancel=cancel, owner=owner, on_image=on_image)
        plain = self.gpu_runner(self.prepare(req), on_progress=on_progress, cancel=cancel)
        return self.save(plain, owner=owner, on_image=on_image)

    def prepare(self, req) -> dict:
        """The main process's half before a GPU worker runs ``req``: load (or switch to) the model
        of its variant — under the manager's lock, placed by :meth:`placement_for`, shared
        components reused — and what else it names (LoRA adapters, ControlNets, a hires model
        upscaler), so the worker only computes.

        Returns plain values: the request, the :meth:`model_state` the worker must hold, what it
        must have loaded besides (``needs``), and ``work`` — what the run computes (the GPU-time
        estimate's input)."""
        variant = req.variant or (TURBO_VARIANT if req.mode == "turbo" else None)
        with self.models.use(variant) as loaded:
            resolved = self.engine.prepare(req, loaded)  # the full check, image inputs and ControlNets included
            active = self.models.activate_loras(loaded, resolved.loras)  # adapters read from disk here
            hires = getattr(resolved, "hires", None)
            upscaler = getattr(hires, "info", None)
            if upscaler is not None:
                self.models.upscalers.load(hires.upscaler)  # into the RAM cache a worker inherits
            nets = [u.net for u in getattr(resolved, "controls", ()) if getattr(u, "net", None) is not None]
            needs = {"loras": sorted(info.adapter_name for info, _ in active),
                     "controlnets": sorted(n.name for n in nets),
                     "upscalers": [upscaler.sha256] if upscaler is not None else []}
            return {"request": req, "state": self.model_state(), "needs": needs,
                    "work": _work(resolved, loaded, nets)}

    def model_state(self) -> tuple:
        """What a process holds of the model: (variant, preset, every component's identity). A
        worker forked before a switch holds another."""
        current = self.current
        if current is None:
            return ()
        return (current.variant.name, current.placement.name, tuple(sorted(current.identities.items())))

    def holds(self, needs: dict) -> bool:
        """Whether this process has loaded what a prepared request ``needs`` besides the model (a
        worker forked before the main process loaded a LoRA, a ControlNet or an upscaler has not)."""
        models = self.models
        for kind, held in (("loras", models.active_loras), ("controlnets", lambda: models.controlnets.cached()),
                           ("upscalers", lambda: models.upscalers.cached())):
            wanted = set((needs or {}).get(kind) or ())
            if wanted and not wanted <= set(held()):
                return False
        return True

    def infer(self, prepared: dict, on_progress=None, cancel=None) -> dict:
        """The GPU worker's half: run a prepared request on the model this process holds and
        return plain values only — ``{"images": [{"image": PIL, "seed", "metadata"}], "seed",
        "notes", "cancelled", "timings"}``; a studio error as ``{"error": {"kind", "message",
        "field"}}`` (ZeroGPU would pass on only its class name); ``{"stale": True}`` when this
        process holds another :meth:`model_state` than the main process prepared, or lacks what
        it ``needs`` (nothing ran).
        Nothing is saved here (no gallery future, no lock, no CUDA tensor in the result)."""
        import copy

        from studio.errors import StudioError

        if self.model_state() != tuple(prepared["state"]) or not self.holds(prepared.get("needs") or {}):
            return {"stale": True}
        engine = copy.copy(self.engine)
        engine.gallery = None  # the main process saves (save)
        try:
            result = engine.generate(prepared["request"], on_progress=on_progress, cancel=cancel)
        except StudioError as e:
            return {"error": {"kind": type(e).__name__, "message": str(e), "field": getattr(e, "field", None)}}
        return {"images": [{"image": i.image, "seed": i.seed, "metadata": i.metadata} for i in result.images],
                "seed": result.seed, "notes": list(result.notes), "cancelled": bool(result.cancelled),
                "timings": dict(result.timings)}

    def save(self, plain: dict, owner: str | None = None, on_image=None):
        """The main process's half after :meth:`infer`: raise its error here, or give each image to
        the gallery's background writer (``on_image`` hears each) and return the
        ``GenerationResult``, as ``Engine.generate`` does."""
        from studio.engine.request import GeneratedImage, GenerationResult
        from studio.errors import GenerationError

        error = plain.get("error")
        if error:
            kinds = {"ValidationError": ValidationError, "ModelError": ModelError, "GalleryError": GalleryError}
            cls = kinds.get(error.get("kind"), GenerationError)
            message = str(error.get("message") or "The generation failed in the GPU worker.")
            raise cls(message, error.get("field")) if cls is ValidationError else cls(message)
        images = []
        for item in plain.get("images") or ():
            image = GeneratedImage(item["image"], item["seed"], item["metadata"])
            image.saving = self.gallery.save_async(image.image, image.metadata, owner=owner)
            images.append(image)
            if on_image:
                on_image(image)
        return GenerationResult(images, plain.get("seed", -1), list(plain.get("notes") or ()),
                                bool(plain.get("cancelled")), dict(plain.get("timings") or {}))

    # -- who sees what --

    def owner_for(self, request) -> str | None:
        """Whose gallery a web request sees: None (everything) on a private local run. On shared
        deployments: the login (``u:<name>``) when the studio runs with --auth, else the browser
        session (``s:<session hash>``); the prefixes keep a client-chosen session hash from ever
        naming a login. A request without either gets a fresh owner that matches nothing."""
        if not self.shared:
            return None
        username = getattr(request, "username", None)
        if username:
            return f"u:{username}"
        session = getattr(request, "session_hash", None)
        if session:
            return f"s:{session}"
        return f"none:{secrets.token_hex(8)}"

    # -- the gallery --

    def list_images(self, owner=None, query=None, variant=None, mode=None, starred_only=False, page=0,
                    page_size=PAGE_SIZE):
        """One page of the owner's images, newest first (see ``Gallery.list``)."""
        from studio.engine import check_number
        from studio.engine.limits import GALLERY_MODES

        page = check_number("page", 0 if page in (None, "") else page, 0, MAX_PAGE, "Page", integer=True)
        page_size = check_number("page_size", PAGE_SIZE if page_size in (None, "") else page_size, 1,
                                 MAX_PAGE_SIZE, "Page size", integer=True)
        if mode and mode not in GALLERY_MODES:
            raise ValidationError(f"Unknown mode {str(mode)[:40]!r}; use one of {', '.join(GALLERY_MODES)}.",
                                  "mode")
        if variant and variant not in VARIANTS:
            raise ValidationError(f"Unknown variant {str(variant)[:60]!r}; use one of {', '.join(VARIANTS)}.",
                                  "variant")
        return self.gallery.list(page=page, page_size=page_size, query=query or None, variant=variant or None,
                                 mode=mode or None, starred=True if starred_only else None, owner=owner)

    def get_image(self, image_id, owner=None):
        """The owner's gallery image ``image_id``; GalleryError when there is none."""
        item = self.gallery.get(str(image_id or ""), owner=owner)
        if item is None:
            raise GalleryError(f"No image with id {str(image_id)[:40]!r} in the gallery.")
        return item

    def star_image(self, image_id, starred: bool = True, owner=None) -> bool:
        """Star or unstar the owner's image ``image_id``; returns the new state (GalleryError when there
        is no such image)."""
        if not self.gallery.star(str(image_id or ""), bool(starred), owner=owner):
            raise GalleryError(f"No image with id {str(image_id)[:40]!r} in the gallery.")
        return bool(starred)

    def delete_image(self, image_id, owner=None) -> None:
        """Delete an image, and the stored inputs (mask, init image) no other image uses."""
        item = self.get_image(image_id, owner)
        refs = self.blobs.references(item.metadata or {})  # every control image too
        if not self.gallery.delete(item.id, owner=owner):
            raise GalleryError(f"No image with id {str(image_id)[:40]!r} in the gallery.")
        for kind, sha in refs:
            if not self.gallery.references(sha):
                self.blobs.store(kind).delete(sha)

    def image_inputs(self, image_id, owner=None) -> dict:
        """The stored inputs of the owner's image, by its id: ``{"init_image": path, "mask_image":
        path}`` for those it has. The only way a request opens a stored input."""
        item = self.get_image(image_id, owner)
        out = {}
        refs = self.blobs.referenced(item.metadata or {})
        for kind, key in (("init", "init_image"), ("mask", "mask_image"), ("control", "control_image")):
            path = self.blobs.store(kind).path(refs.get(kind))
            if path is not None:
                out[key] = str(path)
        units = (item.metadata or {}).get("controlnets")
        if isinstance(units, list) and units:  # one per ControlNet, in order (None: not stored)
            paths = [self.blobs.controls.path(u.get("control_image_sha256")) if isinstance(u, dict) else None
                     for u in units]
            out["control_images"] = [str(p) if p is not None else None for p in paths]
        return out

    def reuse_image(self, image_id, owner=None) -> tuple[dict, list[str]]:
        """"Reuse parameters" of one of the owner's gallery images, ready for ``build_request``:
        :meth:`reuse_fields` of its metadata with its stored inputs attached — the init image, the
        mask and each ControlNet's control image — found by the id after the owner check, never by
        anything the metadata says."""
        item = self.get_image(image_id, owner)
        fields, notes = self.reuse_fields(item.metadata or {}, "studio")
        inputs = self.image_inputs(item.id, owner)
        for key in ("init_image", "mask_image"):
            if key in inputs and fields.get("mode") in ("img2img", "inpaint"):
                fields[key] = inputs[key]
        images = inputs.get("control_images") or []
        for unit, path in zip(fields.get("controls") or [], images):
            if path is not None:
                unit["control_image"] = path
        if fields.get("controls") and any(p is None for p in images):
            notes.append("A control image of this image is not stored: add it again.")
        return fields, notes

    def mask_path(self, image_id, owner=None):
        """The inpaint mask file of the owner's image (GalleryError when it has none)."""
        path = self.image_inputs(image_id, owner).get("mask_image")
        if path is None:
            raise GalleryError(f"Image {str(image_id)[:40]} has no inpaint mask.")
        return path

    @staticmethod
    def read_png_info(path):
        """Metadata of an uploaded PNG (never raises; problems are in ``error``). The fields are
        cleaned by the schema: unknown keys dropped, every value of its declared type."""
        from studio.metadata import read_png_info

        if not path:
            raise ValidationError("Drop a PNG file to read its metadata.", "file")
        return read_png_info(path)

    def reuse_fields(self, fields: dict, source: str = "studio") -> tuple[dict, list[str]]:
        """The request fields "reuse parameters" sets for an image's metadata (``fields``, as read
        by :meth:`read_png_info`; ``source`` its ``source``), and notes on what did not map.

        Peer names become ours here (metadata may not import the engine): A1111/Forge's
        ``Sampler: DPM++ 2M Karras`` or ``Sampler: DPM++ 2M, Schedule type: Karras``, ComfyUI's
        ``dpmpp_2m`` + ``karras``; an unknown name is left out and reported. As A1111's "Apply if
        any", a styled prompt without style names gets its styles back from styles.csv."""
        from studio.engine import samplers
        from studio.metadata.schema import clean, request_fields

        f = clean(fields or {})
        notes: list[str] = []
        if "sampler" in f or "schedule" in f:
            if source == "comfyui":
                sampler, schedule, found = samplers.from_comfy(f.get("sampler"), f.get("schedule"))
            else:
                sampler, schedule, found = samplers.from_infotext(f.get("sampler"), f.get("schedule"))
            notes += found
            for key, value in (("sampler", sampler), ("schedule", schedule)):
                if value is None:
                    f.pop(key, None)
                else:
                    f[key] = value
        if f.get("emphasis") == "None":  # Forge/A1111: the syntax is literal text
            f["prompt_weighting"], f["emphasis"] = False, "Original"
            notes.append("Emphasis 'None' reads the weighting syntax as text: prompt weighting was turned off "
                         "(which also reads only the first 75 CLIP tokens).")
        elif "emphasis" in f and f["emphasis"] not in ("Original", "No norm"):
            notes.append(f"Emphasis {f.pop('emphasis')[:40]!r} is not available here; Original is used.")
        if not f.get("styles") and self.styles.styles:
            names, prompt, negative = self.styles.extract(f.get("prompt", ""), f.get("negative_prompt", ""))
            if names:
                f.update(styles=names, prompt=prompt, negative_prompt=negative)
        if f.get("controlnets") and "controls" not in f:
            f["controls"], found = self._controls_from_metadata(f["controlnets"])
            notes += found
        if f.get("hires_upscaler"):
            f["hires_upscaler"], note = self._known_upscaler(f["hires_upscaler"])
            if note:
                notes.append(note)
            if f["hires_upscaler"] is None:
                f.pop("hires_upscaler")
        return request_fields(f), notes

    @staticmethod
    def _controls_from_metadata(units: list) -> tuple[list[dict], list[str]]:
        """An image's ``controlnets`` (ours, or read from Forge's infotext / a ComfyUI graph) as the
        request's ``controls``: every setting; the ControlNet by its catalog id only (another name
        — a file, a folder, the demo's — is left to the model's default, and said so)."""
        from studio.control_catalog import CONTROLNETS

        controls, notes = [], []
        for u in units:
            unit = {"control_type": u.get("type"), "preprocess": u.get("preprocess"),
                    "control_resize": u.get("resize"), "canny_low": u.get("canny_low"),
                    "canny_high": u.get("canny_high"), "blur_radius": u.get("blur_radius"),
                    "control_invert": u.get("invert"), "control_scale": u.get("scale"),
                    "control_start": u.get("start"), "control_end": u.get("end")}
            name = u.get("name")
            if name in CONTROLNETS:
                unit["controlnet"] = name
            elif name:
                notes.append(f"ControlNet {str(name)[:60]!r} is not in the catalog; the model's default "
                             f"{u.get('type') or 'canny'} ControlNet is used (name its file to use it).")
            controls.append({k: v for k, v in unit.items() if v is not None})
        return controls, notes

    def _known_upscaler(self, name: str) -> tuple[str | None, str]:
        """An upscaler name read from a PNG, as one here: ours, A1111's latent modes mapped onto
        the nearest latent upscaler, or None (Lanczos is used) with a note."""
        from studio.models.upscalers import BUILTIN_UPSCALERS, LATENT_UPSCALERS

        if name in (*BUILTIN_UPSCALERS, *LATENT_UPSCALERS) or name in self.upscaler_names():
            return name, ""
        if name.lower().startswith("latent"):
            ours = "latent-nearest-exact" if "nearest" in name.lower() else "latent-bislerp"
            return ours, f"Hires upscaler {name[:60]!r} is not available here; {ours} is the nearest."
        return None, (f"Hires upscaler {name[:60]!r} is not in the upscalers folder; Lanczos is used (put "
                      f"{name[:60]}.safetensors in {self.config.upscalers_dir} to use it).")

    def count_tokens(self, prompt, max_sequence_length=256, prompt_3=None, prompt_weighting=True) -> str:
        """The live token counter under a prompt box (``CLIP 80/150 (2 chunks) · T5 93/256``):
        the loaded model's tokenizers only, no lock, no text encoder run. "" while no model is
        loaded."""
        from studio.engine import check_number
        from studio.engine.tokens import count_for

        current = self.current
        if current is None or not isinstance(prompt, str):
            return ""
        msl = check_number("max_sequence_length", 256 if max_sequence_length in (None, "") else max_sequence_length)
        return count_for(current.pipe, prompt, msl, prompt_3=prompt_3 or None,
                         enabled=bool(prompt_weighting)).text()

    def style_names(self) -> list[str]:
        """The styles a request can name (styles.csv re-read: the user may have edited it)."""
        self.styles.reload()
        return self.styles.names()

    def describe_styles(self) -> list[dict]:
        """[{name, prompt, negative_prompt}] of every style, after re-reading styles.csv."""
        self.styles.reload()
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
                for s in self.styles.styles.values()]

    # -- upscaling --

    def _upscalers(self):
        """The upscalers folder: the model manager's library once it exists; before that a
        listing-only one, so building the page loads nothing (no torch)."""
        if self.is_built("models"):
            return self.models.upscalers
        from studio.models.upscalers import UpscalerLibrary

        return UpscalerLibrary(self.config.upscalers_dir)

    def upscaler_names(self) -> list[str]:
        """What an upscale can name: Lanczos, then the upscaler files in the folder."""
        from studio.models.upscalers import BUILTIN_UPSCALERS

        names = self._upscalers().names()
        if self.config.demo and not self.is_built("models"):
            from studio.demo.upscaler import TINY_UPSCALER_NAME

            names = sorted({*names, TINY_UPSCALER_NAME}, key=str.lower)  # built with the model manager
        return [*BUILTIN_UPSCALERS, *names]

    def hires_upscaler_choices(self) -> list[str]:
        """What a hires fix can name: :meth:`upscaler_names` and the latent upscalers."""
        from studio.models.upscalers import LATENT_UPSCALERS

        names = self.upscaler_names()
        return [names[0], *LATENT_UPSCALERS, *names[1:]]

    def describe_upscalers(self) -> dict:
        """{upscalers: [{name, sha256, hash, size, architecture, scale, error}], builtin, latent}."""
        from studio.models.upscalers import BUILTIN_UPSCALERS, LATENT_UPSCALERS

        return {"upscalers": self.models.upscalers.describe(), "builtin": list(BUILTIN_UPSCALERS),
                "latent": list(LATENT_UPSCALERS)}

    def import_upscaler(self, path, name: str | None = None, display: str | None = None):
        """Copy an uploaded upscaler into the upscalers folder (identified by spandrel first;
        pickles refused). Not on shared deployments: there the owner puts the files in the folder."""
        if self.shared:
            raise ModelError("Uploading upscalers is off on shared deployments: the owner puts upscaler files in "
                             "the upscalers folder of the data dir.")
        return self.models.upscalers.import_file(path, name=name, display=display)

    def upscale(self, image=None, image_id=None, upscaler: str | None = None, scale=None, refine_prompt=None,
                refine_denoise=None, owner: str | None = None, seed=None, progress=None, cancel=None,
                refine_steps=None):
        """Upscale a gallery image (by id, after the owner check) or an upload, save the result as
        a new gallery entry that names its parent (``parent_image_id``), and return it as a
        GenerationResult of one image.

        ``upscaler``: Lanczos (default) or an upscaler file's name; ``scale``: the factor (limits
        ``upscale_scale``; past the size limits it is refused naming the largest factor allowed).
        A refine pass — img2img over the upscaled image at ``refine_denoise`` (limits
        ``refine_denoise``) with ``refine_prompt`` (default: the parent's prompt) — runs when either
        is given (``refine_steps``: None, the variant's); its result is an img2img image on the
        loaded model. ``progress(done, total)`` hears the upscaler's tiles."""
        import time
        from concurrent.futures import Future
        from datetime import datetime, timezone

        from studio.config import __version__
        from studio.engine import build_request, check_number
        from studio.engine.images import normalize_init_image
        from studio.engine.limits import LIMITS
        from studio.engine.request import GeneratedImage, GenerationResult
        from studio.engine.upscale import LANCZOS
        from studio.engine.upscale import upscale as run_upscale

        if (image is None) == (image_id in (None, "")):
            raise ValidationError("Give one image to upscale: an upload, or a gallery image's id.", "image")
        parent: dict = {}
        if image_id not in (None, ""):
            item = self.get_image(image_id, owner)  # the owner check: another's id is "no image"
            source = normalize_init_image(str(item.path), "image")
            parent = dict(item.metadata or {})
            image_id = item.id
        else:
            source = normalize_init_image(image, "image")  # header first, then decoded
            image_id = None
        scale = check_number("upscale_scale", LIMITS["upscale_scale"].default if scale in (None, "") else scale)
        name = LANCZOS if upscaler in (None, "") else str(upscaler).strip()
        refine = refine_denoise not in (None, "") or bool(str(refine_prompt or "").strip())
        current = self.current
        started = time.perf_counter()
        with self.models.lock:  # one GPU job at a time: never beside a generation
            device = current.placement.device if current is not None else self._device()
            result = run_upscale(source, scale, upscaler=name, library=self.models.upscalers, device=device,
                                 generation=refine, max_side=current.max_side if refine and current else None,
                                 field="scale", progress=progress,
                                 multiple=current.size_multiple if refine and current else SIZE_MULTIPLE)
        up = result.image
        info = result.info
        record = {"parent_image_id": image_id, "upscale_scale": scale, "upscale_upscaler": result.upscaler,
                  "source_size": list(source.size)}
        if info is not None:
            record.update(upscaler=info.as_meta(), upscaler_hash=info.short_hash)
        if refine:
            strength = LIMITS["refine_denoise"].default if refine_denoise in (None, "") else refine_denoise
            prompt = str(refine_prompt).strip() if str(refine_prompt or "").strip() else parent.get("prompt", "")
            req = build_request({"prompt": prompt, "negative_prompt": parent.get("negative_prompt", ""),
                                 "init_image": up, "width": up.size[0], "height": up.size[1], "strength": strength,
                                 "seed": -1 if seed in (None, "") else seed, "steps": refine_steps}, "img2img")
            self.check_request(req)
            res = self.engine.generate(req, owner=owner, cancel=cancel, extra_meta=record)
            res.notes[:0] = result.notes
            return res
        meta = {
            "studio_version": __version__, "mode": "upscale",
            "prompt": parent.get("prompt", "") if isinstance(parent.get("prompt"), str) else "",
            "negative_prompt": parent.get("negative_prompt", "") if isinstance(parent.get("negative_prompt"), str) else "",
            **{k: parent[k] for k in ("variant", "model", "model_name", "seed") if parent.get(k) is not None},
            "width": up.size[0], "height": up.size[1], **record,
            "timings": {"upscale_s": round(time.perf_counter() - started, 3)},
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        saved = self.gallery.save(up, meta, owner=owner)
        done: Future = Future()
        done.set_result(saved)
        out = GeneratedImage(up, parent.get("seed") if isinstance(parent.get("seed"), int) else -1, meta, done)
        return GenerationResult([out], out.seed, list(result.notes), False,
                                {"total_s": round(time.perf_counter() - started, 3)})

    # -- ControlNet --

    def controlnets_for(self, variant: str | None = None, control_type: str | None = None) -> list[dict]:
        """The catalog ControlNets that fit a variant (None: the loaded one, else the configured one):
        [{id, label, control_type, preprocessor, scale, start, end, steps, guidance, notes}]. In demo
        mode: the tiny ControlNet, for every type but inpaint."""
        from studio.control_catalog import CONTROL_TYPES, controlnets_for

        current = self.current
        name = variant or (current.variant.name if current is not None else None) or self.config.variant \
            or DEFAULT_VARIANT
        if self.config.demo:
            return [{"id": "", "label": f"Tiny demo ControlNet ({name})", "control_type": t, "preprocessor":
                     t if t in ("canny", "depth", "blur") else "none", "scale": 1.0, "start": 0.0, "end": 1.0,
                     "steps": None, "guidance": None, "notes": "random weights, for trying the studio offline"}
                    for t in CONTROL_TYPES if t != "inpaint" and (control_type in (None, t))]
        return [{"id": e.id, "label": e.label, "control_type": e.control_type, "preprocessor": e.preprocessor,
                 "scale": e.scale, "start": e.start, "end": e.end, "steps": e.steps, "guidance": e.guidance,
                 "notes": e.notes} for e in controlnets_for(name, control_type)]

    def check_controlnet_sources(self, req) -> None:
        """On a shared deployment a request names ControlNets by catalog id only (no path, no Hub
        id); none named is the catalog's default."""
        from studio.control_catalog import CONTROLNETS

        if not self.shared:
            return
        for source in [req.controlnet, *[u.get("controlnet") for u in req.controls or [] if isinstance(u, dict)]]:
            if source not in (None, "") and source not in CONTROLNETS:
                raise ValidationError("This studio is shared: ControlNets come from the catalog only ("
                                      + ", ".join(CONTROLNETS) + "), not a path or a Hub id.", "controlnet")

    def control_preview(self, control_image, control_type=None, controlnet=None, preprocess=None, canny_low=None,
                        canny_high=None, blur_radius=None, control_invert=None, control_resize=None, width=None,
                        height=None, variant=None, depth_model=None, progress=None):
        """The control map a ControlNet will read (a PIL image): the control image fitted to the
        size (default: the model's native size), preprocessed, in the model's polarity — what the
        engine computes, without loading the ControlNet (its input rule comes from the catalog, or
        from the design of the model's ControlNets). Checks the settings as a request would."""
        from studio.control_catalog import SD35_LARGE_CONTROLNET, rule_for
        from studio.engine.control import control_map, depth_estimator
        from studio.engine.validate import _check_controls

        current = self.current
        name = variant or (current.variant.name if current is not None else None) or self.config.variant \
            or DEFAULT_VARIANT
        if name not in VARIANTS:
            raise ValidationError(f"Unknown variant {str(name)[:60]!r}; choose one of: {', '.join(VARIANTS)}.",
                                  "variant")
        from studio.engine import build_request

        native = current.native_size if current is not None and current.variant.name == name else \
            ((256, 256) if self.config.demo else (1024, 1024))
        req = build_request(dict(prompt="", control_image=control_image, control_type=control_type,
                                 controlnet=controlnet, preprocess=preprocess, canny_low=canny_low,
                                 canny_high=canny_high, blur_radius=blur_radius, control_invert=control_invert,
                                 control_resize=control_resize))
        self.check_controlnet_sources(req)
        if control_image is None:
            raise ValidationError("Upload a control image to preview its map.", "control_image")
        unit = _check_controls(req, get_variant(name), True)[0]
        if unit.inpaint:
            raise ValidationError("The inpainting ControlNet reads the image and its mask; there is no map to "
                                  "preview.", "control_type")
        design = SD35_LARGE_CONTROLNET if name in ("sd3.5-large", "sd3.5-large-turbo") else {}
        rule = rule_for(unit.control_type, design, unit.entry)
        from studio.engine import check_number, snap

        multiple = self.size_rules_for(name).multiple
        w = snap(native[0] if width in (None, "") else check_number("width", width), multiple)
        h = snap(native[1] if height in (None, "") else check_number("height", height), multiple)
        estimator = depth_estimator(depth_model) if depth_model else None
        return control_map(unit.image, unit.settings, rule, w, h, estimator, progress)

    def _device(self) -> str:
        from studio.hardware import detect_hardware

        try:
            return detect_hardware(device=self.config.device).device
        except ValueError as e:
            raise ModelError(str(e)) from e

    # -- LoRAs --

    def lora_names(self) -> list[str]:
        """The LoRA names in the loras folder."""
        return self.models.loras.names()

    def describe_loras(self) -> dict:
        """Every LoRA file described, and the adapters on the loaded model (for /list_loras)."""
        return {"loras": self.models.loras.describe(),
                "active": self.models.active_loras() if self.is_built("models") else []}

    def import_lora(self, path, name: str | None = None):
        """Copy an uploaded LoRA file into the loras folder (format checked). Not on shared
        deployments: there the owner puts LoRA files in the folder."""
        if self.shared:
            raise ModelError("Uploading LoRAs is off on shared deployments: the owner puts LoRA files in the "
                             "loras folder of the data dir.")
        return self.models.loras.import_file(path, name=name)

    def unload_loras(self) -> int:
        """Remove every LoRA adapter from memory. Not on shared deployments: LoRAs are chosen per
        request there, and the memory is everyone's."""
        if self.shared:
            raise ModelError("This studio is shared: LoRAs are chosen per generation (the LoRA slots), "
                             "so there is nothing to unload for everyone.")
        return self.models.unload_loras() if self.is_built("models") else 0

    def check_lora(self, name: str):
        """Load a LoRA into the current model (if one is loaded) so a mismatch shows now, then
        turn it off again: LoRAs are chosen per request, so nobody's selection changes."""
        info = self.models.loras.info(name)
        manager = self.models
        loaded = False
        if manager.current is not None:
            with manager.lock:
                manager.activate_loras(manager.current, [(info, 1.0)])
                manager.activate_loras(manager.current, [])
            loaded = True
        return info, loaded


def _work(r, loaded, nets=()) -> dict:
    """What a resolved request computes, in plain numbers (the GPU-time estimate's input,
    ``studio.app.spaces.estimate``): ``passes`` lists the denoising passes of one run — the base
    pass, and the hires fix's second pass when asked for (its own steps at its own size);
    ``control_params`` the ControlNets' parameters (they run beside the first pass)."""
    from studio.engine import samplers

    req = r.request
    cfg = r.guidance > 1.0
    sampler = getattr(r, "sampler", None) or "Euler"

    def calls(steps: int) -> int:
        try:  # Heun-like samplers evaluate the model twice a step
            return int(samplers.model_calls(sampler, steps))
        except (AttributeError, KeyError):
            return int(steps)

    plan = getattr(r, "inpaint_plan", None)
    width, height = plan.size if plan is not None else (r.width, r.height)
    passes = [{"name": "base", "calls": calls(r.effective_steps), "width": int(width), "height": int(height)}]
    hires = getattr(r, "hires", None)
    if hires is not None:
        passes.append({"name": "hires", "calls": calls(hires.effective_steps), "width": int(hires.width),
                       "height": int(hires.height)})
    slg = r.slg if (r.slg and cfg and req.mode == "txt2img") else None
    return {
        "variant": loaded.variant.name, "tiny": bool(loaded.is_tiny), "mode": req.mode,
        "batch_size": int(req.batch_size), "batch_count": int(req.batch_count), "cfg": cfg,
        "slg_fraction": max(0.0, float(slg["stop"]) - float(slg["start"])) if slg else 0.0,
        "text_tokens": 77 + int(req.max_sequence_length), "passes": passes,
        "hires_variant": getattr(hires, "variant", None),
        "control_params": int(sum(sum(p.numel() for p in n.model.parameters()) for n in nets)),
        "placement": {"name": loaded.placement.name, "device": loaded.placement.device,
                      "resident": bool(loaded.placement.resident)},
    }
