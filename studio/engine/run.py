"""The run loop: ``Engine.generate(GenerationRequest)`` → images + per-image metadata.

Every caller — the UI tabs, ``launch.py generate`` and the API, all through ``studio.service`` —
goes through here, so input is validated in exactly one place (``validate``) and every image
carries the same metadata.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Callable

from studio.blobs import Blobs
from studio.catalog import TURBO_VARIANT
from studio.config import __version__
from studio.engine.prompts import PromptCache
from studio.engine.request import CancelToken, GeneratedImage, GenerationRequest, GenerationResult, ProgressEvent, Resolved
from studio.engine.validate import validate
from studio.errors import GenerationError, ValidationError
from studio.models.manager import free_memory


class Engine:
    """Validates requests, runs the pipeline under the model lock, saves to the gallery.

    ``blobs`` stores what an image was made from by content (its inpaint mask, its init image),
    so "reuse parameters" can give them back; by default beside the gallery."""

    def __init__(self, models, gallery=None, prompt_cache: PromptCache | None = None, blobs: Blobs | None = None,
                 styles=None):
        self.models = models
        self.gallery = gallery
        self.prompt_cache = prompt_cache if prompt_cache is not None else PromptCache()
        if blobs is None and gallery is not None:
            blobs = Blobs(gallery.data_dir)
        self.blobs = blobs
        if styles is None:  # the project's default styles only (the service passes the data dir's too)
            from studio.engine.styles import StyleLibrary

            styles = StyleLibrary(user_file=None)
        self.styles = styles

    @property
    def masks(self):
        """The inpaint masks by content hash (metadata: ``mask_sha256``)."""
        return self.blobs.masks if self.blobs is not None else None

    def prepare(self, req: GenerationRequest, loaded) -> Resolved:
        """Validate ``req`` against the loaded model and resolve its LoRA names to files."""
        from studio.engine.limits import MAX_CLIP_CHUNKS
        from studio.engine.tokens import count_for
        from studio.models.lora import LoraError

        resolved = validate(req, loaded.variant, loaded.max_side, loaded.native_size, styles=self.styles,
                            multiple=loaded.size_multiple)
        req = resolved.request
        tc = count_for(loaded.pipe, resolved.prompt, req.max_sequence_length, prompt_3=req.prompt_3 or None,
                       enabled=req.prompt_weighting)
        if tc.clip_chunks > MAX_CLIP_CHUNKS:
            raise ValidationError(
                f"The prompt is {tc.clip_chunks} CLIP chunks of 75 tokens; at most {MAX_CLIP_CHUNKS} are read "
                f"({MAX_CLIP_CHUNKS * 75} tokens). Shorten it, or put the long text in the T5 prompt.", "prompt")
        resolved.notes += tc.notes()
        infos = []
        for name, weight in resolved.loras:
            try:
                infos.append((self.models.loras.info(name), weight))
            except LoraError as e:
                raise ValidationError(str(e), "loras") from None
            if weight == 0:
                resolved.notes.append(f"LoRA {name!r} has weight 0: it is off.")
            resolved.notes.extend(getattr(infos[-1][0], "notes", ()))  # e.g. kohya modules not applied
        resolved.loras = infos
        if resolved.slg:
            self._fit_slg_layers(resolved, loaded)
        if resolved.hires is not None:
            self._prepare_hires(resolved, loaded)
        if resolved.controls:
            self._prepare_controls(resolved, loaded)
        self._prepare_speed(resolved, loaded)
        return resolved

    def _prepare_speed(self, r: Resolved, loaded) -> None:
        """Refuse Speed fast/faster, before anything runs, where the loaded transformer cannot be
        step-cached (group offload; SLG layers the cache needs): ``StepCache.problem``'s reason."""
        from studio.engine.stepcache import StepCache, threshold_for

        speed = r.request.speed
        if threshold_for(speed) is None:
            return
        problem = StepCache.problem(loaded.pipe.transformer, r.slg["layers"] if r.slg else None)
        if problem:
            raise ValidationError(f"Speed {speed}: {problem}", "speed")
        if r.total_steps < 4:
            r.notes.append(f"Speed {speed} caches steps that change little: with {r.total_steps} steps there is "
                           "little to skip.")

    @staticmethod
    def _fit_slg_layers(r: Resolved, loaded) -> None:
        """Skip Layer Guidance names blocks of the full-size model (SD3.5 Medium: 7–9 of 24). On a
        shallower transformer (the demo's) the same relative depth is skipped, and said; never
        layers that do not exist, which would make SLG a silent no-op."""
        n = int(getattr(loaded.pipe.transformer.config, "num_layers", 0) or 0)
        layers = list(r.slg["layers"])
        if not n or max(layers) < n:
            return
        full = int(loaded.variant.transformer_config.get("num_layers") or n)
        # inside the blocks the step cache spans (not the first, not the last two)
        fitted = sorted({min(max(1, n - 3), max(1, round(layer * n / full))) for layer in layers})
        r.slg = {**r.slg, "layers": fitted}
        r.notes.append(f"Skip Layer Guidance's layers {layers[0]}–{layers[-1]} are {loaded.variant.label}'s of "
                       f"{full} blocks; this model has {n}, so layer(s) {', '.join(map(str, fitted))} (the same "
                       "depth) are skipped.")

    def _prepare_controls(self, r: Resolved, loaded) -> None:
        """Load each ControlNet (catalog id, Hub id, folder or file; none named: the catalog's for
        the model, in demo mode the tiny one) and check it fits the loaded transformer."""
        from studio.control_catalog import check_fit, controlnets_for, rule_for
        from studio.models.controlnet import controlnet_blocker

        for u in r.controls:
            spec = u.source or self.models.default_controlnet(loaded, u.control_type)
            if spec is None:
                fitting = ", ".join(f"{e.id} ({e.control_type})" for e in controlnets_for(loaded.variant.name))
                raise ValidationError(
                    f"There is no {u.control_type} ControlNet for {loaded.variant.label} in the catalog"
                    + (f"; for this model: {fitting}" if fitting else "") + ". Name one with controlnet "
                    "(a catalog id, a Hub id, a folder or a .safetensors file), or switch the model.", "controlnet")
            net = self.models.controlnet(loaded, spec)  # ModelError: download, files
            if u.entry is None:  # not a catalog id: its structure must fit this base
                check_fit(net.config, loaded.variant.name, dict(loaded.pipe.transformer.config), net.name)
                if net.control_type and net.control_type != u.control_type:
                    raise ValidationError(f"{net.name} is a {net.control_type} ControlNet (its file says so), not "
                                          f"{u.control_type}: set the control type to {net.control_type}.",
                                          "control_type")
            if net.inpaint != u.inpaint:
                raise ValidationError(
                    f"{net.name} is an inpainting ControlNet: use control type inpaint in inpaint mode." if net.inpaint
                    else f"{net.name} is not an inpainting ControlNet (it takes no mask): pick one made for "
                         "inpainting, e.g. sd3-medium-inpaint.", "controlnet")
            u.net = net
            u.rule = rule_for(u.control_type, net.config, net.entry)
            if u.scale is None:
                u.scale = net.entry.scale if net.entry is not None else 1.0
        problem = controlnet_blocker(loaded.pipe, [dict(u.net.config) for u in r.controls])
        if problem:
            raise ValidationError(problem, "controlnet")
        if r.hires is not None:
            r.notes.append("The hires fix's second pass runs without the ControlNet (img2img has none).")

    def _prepare_hires(self, r: Resolved, loaded) -> None:
        """Resolve the hires fix's upscaler file and second variant before anything runs."""
        from studio.engine.upscale import LANCZOS
        from studio.models.upscalers import UpscalerError

        h = r.hires
        if not h.latent and h.upscaler != LANCZOS:
            try:
                h.info = self.models.upscalers.info(h.upscaler)
            except UpscalerError as e:
                raise ValidationError(str(e), "hires_upscaler") from None
            r.notes.extend(h.info.notes)
        if h.variant == loaded.variant.name:
            h.variant = None
        if h.variant is not None:
            ok, message = self.models.availability(h.variant)
            if not ok:
                raise ValidationError(f"The hires variant {h.variant} is not on this machine: {message}",
                                      "hires_variant")
            if r.loras:
                r.notes.append(f"LoRAs apply to the first pass only: they are made for {loaded.variant.label}, "
                               f"not for the second pass's {h.variant}.")
        if r.slg:
            r.notes.append("Skip Layer Guidance runs in the first pass only (the second pass is img2img, "
                           "which has none).")

    def encode(self, pipe, loaded, r: Resolved, cfg: bool, text_loras: tuple = ()):
        """Prompt embeddings for one image, from the cache when the same prompt was seen.

        Encoded through ``studio.engine.weighting`` (A1111's syntax and CLIP chunks; a plain
        prompt gives the pipeline's own tensors bit for bit); the cache keys on the *parsed*
        prompts (``(red:1.0)`` and ``red`` share an entry), the T5 prompts and the options.
        ``text_loras``: the active LoRAs that change the text encoders (sha, weight) — part of the
        key, since they change the embeddings. Transformer-only LoRAs (most SD3 LoRAs) do not."""
        import torch

        from studio.engine import weighting

        req = r.request
        p3 = req.prompt_3 or None
        n3 = (req.negative_prompt_3 or None) if cfg else None
        encoders = tuple(loaded.identities.get(n) for n in (
            "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"))
        key = (weighting.cache_key(r.prompt, r.negative_prompt if cfg else None, p3, n3,
                                   enabled=req.prompt_weighting, emphasis=req.emphasis),
               cfg, req.max_sequence_length, encoders, str(loaded.dtype), tuple(text_loras))
        cached = self.prompt_cache.get(key) if None not in encoders[:2] else None
        if cached is None:
            with torch.no_grad():
                out = weighting.encode(
                    pipe, r.prompt, r.negative_prompt, prompt_3=p3, negative_prompt_3=n3, cfg=cfg,
                    max_sequence_length=req.max_sequence_length, enabled=req.prompt_weighting,
                    emphasis=req.emphasis,
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
        extra_meta: dict | None = None,
    ) -> GenerationResult:
        """Generate the images ``req`` asks for on the model the manager holds for its variant.

        ``on_progress`` hears every denoising step, ``on_image`` every finished image (already
        handed to the gallery, which writes it in the background); ``cancel`` stops between steps
        and keeps the finished images; ``owner`` is whose gallery the images go to. Raises
        ValidationError (bad input, nothing ran), ModelError or GenerationError (out of memory:
        the model stays loaded). ``extra_meta``: fields added to every image's metadata (the
        service's upscale-and-refine records the parent image this way).
        """
        with self.models.use(self._variant_for(req)) as loaded:
            resolved = self.prepare(req, loaded)
            resolved.loras = self.models.activate_loras(loaded, resolved.loras)
            if req.mode == "turbo" and not loaded.variant.distilled:
                resolved.notes.append(
                    f"Turbo mode runs on {loaded.label}, which is not the distilled Turbo model; "
                    "expect weak images at 4 steps."
                )
            return self._run(resolved, loaded, on_progress, cancel, owner, on_image, extra_meta)

    def _run(self, r: Resolved, loaded, on_progress, cancel, owner, on_image, extra_meta=None) -> GenerationResult:
        import torch

        from studio.engine.samplers import scheduler_for
        from studio.engine.stepcache import StepCacheStats

        req = r.request
        if r.controls:  # the ControlNet (inpainting) pipeline over the loaded components
            pipe = self.models.controlnet_pipeline(loaded, [u.net for u in r.controls], inpaint=r.controls[0].inpaint)
        elif req.mode == "inpaint":
            pipe = self.models.inpaint(loaded)
        else:
            pipe = self.models.img2img(loaded) if req.mode == "img2img" else loaded.pipe
        scheduler = pipe.scheduler  # the pipeline's own, put back after the runs
        init_sha = None
        init = None
        mask_sha = soft_mask = mask = None
        if r.init_image is not None:  # stored by content, so reuse gives it back exactly
            init_sha = self._store("init", r.init_image)
        if r.mask is not None:  # inpaint: cut the box to repaint at the working size
            from studio.engine.inpaint import blurred, crop_inputs

            soft_mask = blurred(r.mask, req.mask_blur)
            init, mask = crop_inputs(r.init_image, r.mask, r.inpaint_plan)
            mask_sha = self._store("mask", r.mask)
        elif r.init_image is not None:
            init = r.init_image.resize((r.width, r.height), resample=3) if r.init_image.size != (r.width, r.height) else r.init_image
        text_loras = tuple((i.sha256, w) for i, w in r.loras if i.text_encoders)
        control_kw, control_meta = self._control_inputs(r, init, mask) if r.controls else ({}, None)
        started = time.perf_counter()
        images: list[GeneratedImage] = []
        cancelled = False
        h = r.hires
        pending = []  # hires on another variant: first passes waiting for the one swap
        cache_stats: dict[int, StepCacheStats] = {}  # Speed: the transformer passes of each run, both passes
        skip_layers = r.slg["layers"] if r.slg else None

        def emit(out_images, seeds, run, run_s, first=loaded, second=None):
            for k, (image, s) in enumerate(zip(out_images, seeds)):
                if soft_mask is not None:  # back into the source through the feathered mask
                    from studio.engine.inpaint import paste_back

                    image = paste_back(r.init_image, image, soft_mask, r.inpaint_plan)
                meta = self._metadata(r, first, s, run, k, init_sha, run_s, mask_sha)
                if h is not None:
                    meta.update(self._hires_metadata(r, second or first))
                if control_meta:
                    meta["controlnets"] = control_meta
                if cache_stats.get(run) is not None and cache_stats[run].passes:
                    meta["step_cache"] = cache_stats[run].as_meta()
                if extra_meta:
                    meta.update(extra_meta)
                item = GeneratedImage(image, s, meta)
                if self.gallery is not None:  # written in the background: the next run starts now
                    item.saving = self.gallery.save_async(image, meta, owner=owner)
                images.append(item)
                if on_image:
                    on_image(item)

        try:
            for run in range(req.batch_count):
                if cancel and cancel.cancelled:
                    cancelled = True
                    break
                seeds = [r.seed + run * req.batch_size + k for k in range(req.batch_size)]
                run_started = time.perf_counter()

                def on_step(p, i, t, kwargs, _run=run):
                    if on_progress:  # a hires fix's bar spans both passes
                        total = p.num_timesteps + (h.effective_steps if h is not None else 0)
                        on_progress(ProgressEvent(i + 1, total, _run, req.batch_count,
                                                  kwargs.get("latents"), time.perf_counter() - started))
                    if cancel and cancel.cancelled:
                        p._interrupt = True
                    return {}

                cfg = r.guidance > 1.0
                device = pipe._execution_device
                pe, npe, ppe, nppe = (
                    None if t is None else t.to(device).repeat_interleave(req.batch_size, 0)
                    for t in self.encode(pipe, loaded, r, cfg, text_loras)
                )
                generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
                # the sampler and its schedule, built from the scheduler's config (no reload); the
                # stochastic samplers draw their per-step noise from this run's generators
                pipe.scheduler = scheduler_for(scheduler, r.sampler, r.schedule, r.shift, generator=generators)
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
                    generator=generators,
                    max_sequence_length=req.max_sequence_length,
                    callback_on_step_end=on_step,
                    callback_on_step_end_tensor_inputs=["latents"],
                )
                if r.controls:  # the maps were made once for the request; the inpainting one reads init + mask
                    kwargs.update(control_kw)
                elif req.mode == "img2img":
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
                if h is not None and h.latent:  # the latents themselves are upscaled: no decode here
                    kwargs["output_type"] = "latent"
                out = None
                try:
                    with _step_cache(pipe.transformer, req.speed, skip_layers,
                                     cache_stats.setdefault(run, StepCacheStats())):
                        if r.controls:  # diffusers samples the control latents from the global RNG: pin it
                            from studio.engine.control import control_rng

                            with control_rng(seeds[0], device):
                                out = pipe(**kwargs)
                        else:
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
                first_steps = pipe.num_timesteps
                embeds = (pe, npe, ppe, nppe)
                if h is None:
                    emit(out.images, seeds, run, time.perf_counter() - run_started)
                elif h.variant is None:  # the second pass on the same model, straight away
                    second = self._hires(r, loaded, loaded, out.images, seeds, embeds, run, first_steps,
                                         started, on_progress, cancel, text_loras, cache_stats[run])
                    if second is None:
                        cancelled = True
                        break
                    emit(second, seeds, run, time.perf_counter() - run_started)
                else:  # another variant: every first pass now, one swap, then every second pass
                    first = out.images.cpu() if h.latent else out.images
                    pending.append((run, seeds, first, tuple(None if t is None else t.cpu() for t in embeds),
                                    first_steps, time.perf_counter() - run_started))
            if pending and not cancelled:
                with self.models.use(h.variant) as second_model:  # shares the encoders and the VAE
                    self.models.activate_loras(second_model, [])
                    for run, seeds, first, embeds, first_steps, run_s in pending:
                        if cancel and cancel.cancelled:
                            cancelled = True
                            break
                        t0 = time.perf_counter()
                        second = self._hires(r, loaded, second_model, first, seeds, embeds, run, first_steps,
                                             started, on_progress, cancel, text_loras, cache_stats[run])
                        if second is None:
                            cancelled = True
                            break
                        emit(second, seeds, run, run_s + time.perf_counter() - t0, second=second_model)
                r.notes.append(f"The second pass ran on {second_model.label}, which stays loaded.")
        finally:
            pipe.scheduler = scheduler
            pipe._interrupt = False
            if r.controls:
                self.models.controlnets_done([u.net for u in r.controls])
        passes = StepCacheStats()
        for stats in cache_stats.values():
            _add_stats(passes, stats)
        if passes.passes:
            r.notes.append(f"Speed {req.speed}: {passes.skipped} of {passes.passes} transformer passes cached "
                           f"({passes.skipped_fraction:.0%}).")
        total = time.perf_counter() - started
        return GenerationResult(images, r.seed, r.notes, cancelled, {"total_s": round(total, 3)})

    def _control_inputs(self, r: Resolved, init, mask) -> tuple[dict, list[dict]]:
        """The ControlNet pipeline's control arguments for the request, made once for all its runs
        (each map fitted to the working size, preprocessed, in the model's polarity and encoding),
        and what the metadata records of each ControlNet. The control images are stored by
        content (``controls``), so reuse gives them back."""
        from studio.engine.control import control_kwargs, control_map, depth_estimator, encode_map

        req, units = r.request, r.controls
        scales, starts, ends = [u.scale for u in units], [u.start for u in units], [u.end for u in units]
        if units[0].inpaint:  # Alimama's: the image and its mask at the working size, no map
            kw = control_kwargs([], scales, starts, ends, inpaint=(init, mask))
            shas = [None]
        else:
            estimator = depth_estimator(req.depth_model) if req.depth_model else None
            maps = [control_map(u.image, u.settings, u.rule, r.width, r.height, estimator) for u in units]
            kw = control_kwargs([encode_map(m, u.rule) for m, u in zip(maps, units)], scales, starts, ends)
            shas = [self._store("control", u.image) for u in units]
        meta = [{"name": u.net.name, "sha256": u.net.sha256, "hash": u.net.short_hash, "type": u.control_type,
                 **u.settings.as_meta(), "scale": u.scale, "start": u.start, "end": u.end,
                 "control_image_sha256": sha} for u, sha in zip(units, shas)]
        return kw, meta

    def _hires(self, r: Resolved, loaded, second, first, seeds, embeds, run, first_steps, started, on_progress,
               cancel, text_loras, cache_stats=None):
        """The hires fix's second pass for one run: upscale the first pass's images (or latents),
        then img2img on ``second`` (``loaded`` itself, or the hires variant, which shares the text
        encoders and the VAE) with the first pass's prompt embeddings — no text encoder runs again
        when the encoders are the same objects. Returns the images, or None when cancelled.
        ``cache_stats``: the run's StepCacheStats, which the second pass's step cache adds to."""
        import torch

        from studio.engine.stepcache import StepCacheStats

        from studio.engine.samplers import scheduler_for
        from studio.engine.upscale import upscale, upscale_latents

        h, req = r.hires, r.request
        if h.latent:
            init = upscale_latents(first, h.width, h.height, h.upscaler, factor=loaded.pipe.vae_scale_factor,
                                   multiple=loaded.size_multiple)
        else:
            init = []
            for image in first:
                res = upscale(image, size=(h.width, h.height), upscaler=h.upscaler, library=self.models.upscalers,
                              device=loaded.placement.device, generation=True, max_side=loaded.max_side,
                              field="hires_upscaler", multiple=loaded.size_multiple)
                init.append(res.image)
                r.notes.extend(n for n in res.notes if n not in r.notes)
        pipe2 = self.models.img2img(second)
        device = pipe2._execution_device
        parts = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
        same = second is loaded or all(
            loaded.identities.get(n) is not None and loaded.identities.get(n) == second.identities.get(n)
            for n in parts if getattr(loaded.pipe, n, None) is not None)
        if same:  # the first pass's embeddings: zero extra text-encoder passes
            pe, npe, ppe, nppe = (None if t is None else t.to(device) for t in embeds)
        else:
            note = f"{second.label}'s text encoders differ from {loaded.label}'s: the prompt was encoded again."
            if note not in r.notes:
                r.notes.append(note)
            pe, npe, ppe, nppe = (None if t is None else t.to(device).repeat_interleave(req.batch_size, 0)
                                  for t in self.encode(pipe2, second, r, r.guidance > 1.0, text_loras))

        def on_step2(p, i, t, kwargs):
            if on_progress:
                on_progress(ProgressEvent(first_steps + i + 1, first_steps + p.num_timesteps, run, req.batch_count,
                                          kwargs.get("latents"), time.perf_counter() - started))
            if cancel and cancel.cancelled:
                p._interrupt = True
            return {}

        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        base = pipe2.scheduler
        vae = pipe2.vae
        tiling = _vae_tiling_state(vae)
        out = None
        try:
            pipe2.scheduler = scheduler_for(base, r.sampler, r.schedule, r.shift, generator=generators)
            if h.vae_tiling and not tiling[0]:
                # The memory planner has no hires estimate yet (studio/memory/planner.py): until it
                # decides, decode and encode past HIRES_VAE_TILING_PIXELS in tiles, as its presets do.
                from studio.memory.presets import enable_vae_tiling

                enable_vae_tiling(vae)
                note = f"The VAE decodes the {h.width}×{h.height} second pass in tiles."
                if note not in r.notes:
                    r.notes.append(note)
            kwargs = dict(image=init, strength=h.denoise, num_inference_steps=h.steps, guidance_scale=r.guidance,
                          height=h.height, width=h.width, prompt_embeds=pe, negative_prompt_embeds=npe,
                          pooled_prompt_embeds=ppe, negative_pooled_prompt_embeds=nppe, num_images_per_prompt=1,
                          generator=generators, max_sequence_length=req.max_sequence_length,
                          callback_on_step_end=on_step2, callback_on_step_end_tensor_inputs=["latents"])
            try:
                with _step_cache(pipe2.transformer, req.speed, None,
                                 cache_stats if cache_stats is not None else StepCacheStats()):
                    out = pipe2(**kwargs)
            except torch.OutOfMemoryError:
                pass  # handled below, once the traceback (and its activations) is gone
            if out is None:
                del kwargs, init
                free_memory()
                raise GenerationError(_oom_message(second, r, (h.width, h.height)))
            if getattr(pipe2, "_interrupt", False) or (cancel and cancel.cancelled):
                return None
            return out.images
        finally:
            pipe2.scheduler = base
            pipe2._interrupt = False
            _restore_vae_tiling(vae, tiling)

    def _hires_metadata(self, r: Resolved, second) -> dict:
        """A hires image's second pass, as stored (width/height stay the first pass's, A1111's Size)."""
        h = r.hires
        meta = {"hires_scale": h.scale, "hires_steps": h.steps, "hires_denoise": h.denoise,
                "hires_upscaler": h.upscaler, "hires_size": [h.width, h.height]}
        if h.variant is not None:
            meta["hires_variant"] = h.variant
            meta["hires_model"] = second.label
            name = _model_hashes(self.models, second).get("model_name")
            if name:
                meta["hires_model_name"] = name
        if h.info is not None:
            meta["upscaler"] = h.info.as_meta()
            meta["upscaler_hash"] = h.info.short_hash
        return meta

    def _store(self, kind: str, image) -> str:
        """Store an input image by content (when there is a store) and return its sha256."""
        from studio.blobs import image_sha256

        return self.blobs.store(kind).put(image) if self.blobs is not None else image_sha256(image)

    def _metadata(self, r: Resolved, loaded, seed, run, k, init_sha, run_s, mask_sha=None) -> dict:
        from studio.engine.samplers import SAMPLER_INFO

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
            **_model_hashes(self.models, loaded),
            "source": loaded.source.ref,
            "preset": loaded.placement.name,
            "dtype": str(loaded.dtype).replace("torch.", ""),
            "sampler": r.sampler,
            "schedule": r.schedule,
            "scheduler": SAMPLER_INFO[r.sampler].diffusers,
            "shift": r.shift,
            "slg": r.slg,
            "speed": req.speed,
            "max_sequence_length": req.max_sequence_length,
            "prompt_3": req.prompt_3 or None,
            "negative_prompt_3": req.negative_prompt_3 or None,
            "prompt_weighting": req.prompt_weighting,
            "emphasis": req.emphasis if req.emphasis != "Original" else None,
            "styles": list(req.styles) or None,
            "styled_prompt": r.prompt if req.styles else None,
            "styled_negative_prompt": r.negative_prompt if req.styles else None,
            "strength": req.strength if req.mode in ("img2img", "inpaint") and not r.controls else None,
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


def _model_hashes(models, loaded) -> dict:
    """A1111's ``Model`` name and ``Model hash`` (studio/models/hashes.py), through the manager's
    hash cache."""
    from studio.models.hashes import loaded_model_identity

    hashes = getattr(models, "hashes", None)
    if hashes is None:
        return {}
    name, digest = loaded_model_identity(loaded, hashes)
    return {"model_name": name, "model_hash": digest} if digest else {"model_name": name}


@contextmanager
def _step_cache(transformer, speed, skip_layers, into):
    """``StepCache(transformer, speed, skip_layers)`` around one pipeline call (nothing when speed
    is off); its pass counts are added to ``into`` (a StepCacheStats) when the call ends."""
    from studio.engine.stepcache import StepCache

    with StepCache(transformer, speed, skip_layers) as cache:
        try:
            yield cache
        finally:
            _add_stats(into, cache.stats)


def _add_stats(total, stats) -> None:
    """Add one StepCacheStats' computed and cached passes to another's."""
    for mine, theirs in ((total.computed, stats.computed), (total.cached, stats.cached)):
        for kind, n in theirs.items():
            mine[kind] = mine.get(kind, 0) + n


def _vae_tiling_state(vae) -> tuple:
    return (bool(getattr(vae, "use_tiling", False)), bool(getattr(vae, "use_slicing", False)),
            getattr(vae, "tile_sample_min_size", None), getattr(vae, "tile_latent_min_size", None))


def _restore_vae_tiling(vae, state) -> None:
    """Put the VAE back as the preset left it (the hires pass may have turned tiling on)."""
    tiling, slicing, sample, latent = state
    if tiling == bool(getattr(vae, "use_tiling", False)) and slicing == bool(getattr(vae, "use_slicing", False)):
        return
    vae.use_tiling, vae.use_slicing = tiling, slicing
    if sample is not None:
        vae.tile_sample_min_size = sample
    if latent is not None:
        vae.tile_latent_min_size = latent


def _oom_message(loaded, r: Resolved, size: tuple[int, int] | None = None) -> str:
    width, height = size or (r.width, r.height)
    return (
        f"Out of GPU memory at {width}×{height} with {loaded.label} (preset {loaded.placement.name}). "
        "The model is still loaded. Try a smaller size or batch, or pick a lower preset in "
        "Models & Memory (e.g. 8-bit T5, NF4 or model offload)."
    )
