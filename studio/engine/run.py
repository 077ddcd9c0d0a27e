"""The run loop: ``Engine.generate(GenerationRequest)`` → images + per-image metadata.

Every caller — the UI tabs, ``launch.py generate`` and the API, all through ``studio.service`` —
goes through here, so input is validated in exactly one place (``validate``) and every image
carries the same metadata.
"""

from __future__ import annotations

import time
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
        from studio.models.lora import LoraError

        from studio.engine.limits import MAX_CLIP_CHUNKS
        from studio.engine.tokens import count_for

        resolved = validate(req, loaded.variant, loaded.max_side, loaded.native_size, styles=self.styles)
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
        return resolved

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
    ) -> GenerationResult:
        """Generate the images ``req`` asks for on the model the manager holds for its variant.

        ``on_progress`` hears every denoising step, ``on_image`` every finished image (already
        handed to the gallery, which writes it in the background); ``cancel`` stops between steps
        and keeps the finished images; ``owner`` is whose gallery the images go to. Raises
        ValidationError (bad input, nothing ran), ModelError or GenerationError (out of memory:
        the model stays loaded).
        """
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

        from studio.engine.samplers import scheduler_for

        req = r.request
        if req.mode == "inpaint":
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
                        from studio.engine.inpaint import paste_back

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
            "max_sequence_length": req.max_sequence_length,
            "prompt_3": req.prompt_3 or None,
            "negative_prompt_3": req.negative_prompt_3 or None,
            "prompt_weighting": req.prompt_weighting,
            "emphasis": req.emphasis if req.emphasis != "Original" else None,
            "styles": list(req.styles) or None,
            "styled_prompt": r.prompt if req.styles else None,
            "styled_negative_prompt": r.negative_prompt if req.styles else None,
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


def _model_hashes(models, loaded) -> dict:
    """A1111's ``Model`` name and ``Model hash`` (studio/models/hashes.py), through the manager's
    hash cache."""
    from studio.models.hashes import loaded_model_identity

    hashes = getattr(models, "hashes", None)
    if hashes is None:
        return {}
    name, digest = loaded_model_identity(loaded, hashes)
    return {"model_name": name, "model_hash": digest} if digest else {"model_name": name}


def _oom_message(loaded, r: Resolved) -> str:
    return (
        f"Out of GPU memory at {r.width}×{r.height} with {loaded.label} (preset {loaded.placement.name}). "
        "The model is still loaded. Try a smaller size or batch, or pick a lower preset in "
        "Models & Memory (e.g. 8-bit T5, NF4 or model offload)."
    )
