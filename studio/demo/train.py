"""Train the demo model offline on the CPU: ``python -m studio.demo.train --out DIR``.

A tiny SD3.5-Medium-shaped pipeline of the real diffusers classes, trained from scratch on
procedural shapes (``studio.demo.shapes``) so that ``--demo`` draws what it is asked:

1. the VAE (``AutoencoderKL``, 16 latent channels, SD3's scaling and shift factors, no quant
   convs) as a plain autoencoder on the mean latent, on 64-px crops, a quarter of them flat
   fields (``vae_crop``, ``vae_flat``; 0: whole pictures), with a penalty that keeps the scaled
   latents near zero mean and unit variance, which flow matching expects; then the decoder alone
   on whole scenes (``decoder_steps``), the encoder frozen, the pixels on and around objects
   weighted ``1 + decoder_object_weight``, half the latents multiplied by a gain of up to
   ``decoder_gain`` (classifier-free guidance's overshoot, which it must still draw as itself);
2. the latents of ``--scenes`` pictures, cached once; half the samples mirrored (``mirror``: the
   latent flipped, "left"/"right" swapped in the prompt);
3. the transformer (``SD3Transformer2DModel``, qk RMS-norm, dual attention in the first two
   blocks) by rectified flow matching, first ``low_steps`` on the scenes at 128² (a quarter of
   the image tokens), then ``steps`` at 256²: timesteps logit-normal (or ``timesteps=uniform``),
   shifted by ``shift`` (the scheduler's 3.0, which the saved pipeline samples with), with a
   quarter of each batch drawn from σ 0.9–1 instead (``high_noise``: the sampler's first steps,
   which decide the layout); 10 % of prompts dropped to "" so classifier-free guidance works;
   an EMA of the weights is what is saved;
4. a LoRA (``purple-world``: every picture on a purple background) on the trained transformer,
   saved in the diffusers/PEFT layout and in kohya's layout (see ``kohya_state_dict``).

The text encoders and tokenizers are the shared tiny ones (``studio.demo.tiny``), frozen, so they
stay bit-identical across the demo variants. Everything is deterministic from ``--seed`` for a
given machine and thread count; the step counts are fixed (not timed) for that reason. The
defaults' stages take 37.3 minutes one by one with nothing else running on the faster of this
project's 2-core machines, and would take about twice that on the slower (assets/demo/README.md):
the 45-minute goal holds on the first only.
``--quick`` runs every stage for a few steps.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from studio.catalog import vae_factor
from studio.demo import KOHYA_LORA_FILE, LORA_FILE, PIPELINE_DIR, shapes
from studio.demo.tiny import SCHEDULER_SHIFT

LOG_FILE = "training.json"


@dataclass
class Recipe:
    """Every setting of a training run (stage step counts, sizes, learning rates); saved in training.json."""
    seed: int = 0
    # the VAE
    vae_channels: tuple[int, ...] = (8, 16, 32, 64)
    vae_groups: int = 2  # ≥ 4 channels a group: one channel a group erases flat colours
    vae_steps: int = 1200
    vae_batch: int = 8
    vae_lr: float = 2e-3
    vae_latent_noise: float = 0.05  # scaled-latent noise the decoder learns to ignore
    vae_crop: int = 64  # > 0: train on random crops of this many pixels (the VAE is convolutional)
    vae_crops: int = 4  # crops taken from each rendered scene
    vae_attention: bool = False  # the mid-block attention (a flat-colour autoencoder needs none)
    # fraction of the crops replaced by flat fields (half palette colours, half any colour): a
    # GroupNorm VAE that never sees a flat field maps flat red, yellow and orange to one colour
    vae_flat: float = 0.25
    # then the decoder alone, on whole 256² scenes (encoder frozen: the latents do not change),
    # with latent noise up to decoder_noise: crops teach colours, whole scenes teach the layout;
    # the pixels on and near an object weigh 1 + decoder_object_weight (a small object is a
    # few hundred of 65,536 pixels: unweighted, its colour drifts, red to orange)
    decoder_steps: int = 400
    decoder_lr: float = 5e-4
    decoder_noise: float = 0.5
    decoder_object_weight: float = 10.0
    # half of each batch's scaled latents multiplied by a gain drawn from [1, decoder_gain] (1: off):
    # classifier-free guidance pushes a latent past itself, away from the mean latent (about 0),
    # and an untaught decoder reads "more orange" as red, "more purple" as blue
    decoder_gain: float = 3.0
    # the data
    scenes: int = 6000
    two_objects: float = 0.2
    # the transformer
    # 4 blocks for 3,600 + 450 steps, not 6 for 2,400 + 300 in the same time: colour 78 % → 90 %,
    # position 90 % → 98 % (assets/demo/README.md); this budget is too small for the larger model
    layers: int = 4
    heads: int = 4
    head_dim: int = 32
    dual_layers: tuple[int, ...] = (0, 1)
    steps: int = 450
    # steps before those, at half the resolution (128², 64 image tokens: about half a step's
    # wall time here), SD3's own progressive recipe; 2,400 + 300 with the uncropped grid below
    # learnt both axes of position with seed 0 (not with seed 1), 1,200 + 300 with the crop one
    # axis (seed 0) or none (seed 1): assets/demo/README.md
    low_steps: int = 3600
    low_size: int = 128
    batch: int = 24
    lr: float = 1e-3
    warmup: int = 60
    final_lr: float = 0.05  # fraction of lr the cosine ends at
    text_dropout: float = 0.1
    # how training timesteps are drawn before the shift (``shift``): "logit-normal" (SD3's
    # recipe: few steps near pure noise) or "uniform" (the density the shifted sampler walks)
    timesteps: str = "logit-normal"
    # fraction of the samples whose σ is drawn uniformly from [0.9, 1) instead: the 12-step
    # sampler's first two steps sit at σ 1 and 0.97, which logit-normal draws for about 2 % of samples,
    # and they decide the layout; 0.25 took position from 73 % to 88.5 % and the background from
    # 74 % to 88.5 % (assets/demo/README.md)
    high_noise: float = 0.25
    # the flow's shift, one value for both sides: the training σ are shifted by it and the saved
    # scheduler samples with it (SD3 uses 3.0 at 1024² and trained its 256² stage unshifted;
    # here 1.0 cost 14 points of shape and 24 of position: assets/demo/README.md)
    shift: float = SCHEDULER_SHIFT
    ema: float = 0.995
    # 0: none, so diffusers lays the sin-cos grid over the whole picture at any size (16 units, the
    # 128² grid the 256² grid's every other patch: what the low steps learn is where 256² draws);
    # SD3's 64 crops one grid's centre (16 patches span 4 units of it, 128² pictures only 2)
    pos_embed_max_size: int = 0
    mirror: float = 0.5  # chance a sample is mirrored (latent flipped, "left"/"right" swapped)
    object_weight: float = 2.0  # extra loss weight on the latent pixels an object covers
    # Context tokens carry no position, so a step may drop the trailing padding: the CLIP block
    # cut to short_clip tokens and T5 to short_t5 (the pipeline pads them to 77 and 256).
    short_clip: int = 24
    short_t5: int = 32
    short_fraction: float = 0.85  # fraction of steps run with the short context
    # the LoRA
    lora_rank: int = 4
    lora_steps: int = 400
    lora_batch: int = 16
    lora_lr: float = 2e-3
    lora_scenes: int = 800

    @classmethod
    def quick(cls, seed: int = 0) -> Recipe:
        """A smoke run: a few steps of every stage."""
        return cls(seed=seed, vae_steps=2, vae_batch=2, decoder_steps=2, scenes=8, steps=2, low_steps=2, batch=4,
                   warmup=1, lora_steps=2, lora_batch=2, lora_scenes=4)


def transformer_config(recipe: Recipe, sample_size: int) -> dict:
    """Shaped like the tiny sd3.5-medium (``studio.demo.tiny``), larger; ``sample_size``: the
    side of the 256² scenes' latents (32 with an 8× VAE)."""
    from studio.demo.tiny import _dims

    return {
        "sample_size": sample_size,
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": recipe.layers,
        "attention_head_dim": recipe.head_dim,
        "num_attention_heads": recipe.heads,
        "joint_attention_dim": _dims(1)["t5_dim"],
        "caption_projection_dim": recipe.heads * recipe.head_dim,
        "pooled_projection_dim": 2 * _dims(1)["clip_hidden"],
        "pos_embed_max_size": recipe.pos_embed_max_size or None,
        "qk_norm": "rms_norm",
        "dual_attention_layers": tuple(recipe.dual_layers),
    }


def vae_config(recipe: Recipe) -> dict:
    """The AutoencoderKL config: 16 latent channels and SD3's scaling and shift factors, no quant convs."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * len(recipe.vae_channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(recipe.vae_channels),
        "block_out_channels": list(recipe.vae_channels),
        "layers_per_block": 1,
        "latent_channels": 16,
        "norm_num_groups": recipe.vae_groups,
        "sample_size": shapes.SIZE,
        "scaling_factor": 1.5305,
        "shift_factor": 0.0609,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": recipe.vae_attention,
    }


class Log:
    """Progress lines on stdout and the figures kept for training.json."""

    def __init__(self, quiet: bool = False):
        self.started = time.time()
        self.quiet = quiet
        self.record: dict = {"stages": {}}

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{self.elapsed() / 60:5.1f} min] {message}", flush=True)

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.time() - self.started


def _bf16_is_faster() -> bool:
    """bf16 autocast pays only where the CPU has bf16 matmul (AVX512-BF16 / AMX)."""
    import torch

    a = torch.randn(512, 512)

    def rate(dtype):
        x = a.to(dtype)
        x @ x
        t = time.perf_counter()
        for _ in range(4):
            x @ x
        return time.perf_counter() - t

    return rate(torch.bfloat16) < 0.8 * rate(torch.float32)


def _autocast(enabled: bool):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def _to_tensor(images) -> torch.Tensor:  # noqa: F821 - torch is imported lazily
    import torch

    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _cosine(step: int, total: int, warmup: int, final: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------
# 1. the VAE


def _crops(x, size: int, per_image: int, rng, grid: int = 8):
    """``per_image`` random ``size``-pixel crops of each image of the batch ``x`` (on the
    ``grid``-pixel latent grid), biased towards the objects: half the crops are centred near the
    image centre."""
    import torch

    side = x.shape[-1]
    out = []
    for img in x:
        for k in range(per_image):
            if k % 2:  # objects sit mostly in the middle half
                lo, hi = side // 4 - size // 2, 3 * side // 4 - size // 2
            else:
                lo, hi = 0, side - size
            top, left = (int(rng.integers(max(lo, 0) // grid, max(hi, 0) // grid + 1)) * grid for _ in range(2))
            out.append(img[:, top:top + size, left:left + size])
    return torch.stack(out)


def _flat_fields(x, fraction: float, rng):
    """``x`` with its first ``fraction`` of images replaced by flat fields: half of them a palette
    colour (``shapes.COLOURS`` and the default grey), half any colour."""
    import torch

    from studio.demo.quality import PALETTE as palette

    x = x.clone()
    for i in range(round(fraction * len(x))):
        rgb = palette[rng.integers(len(palette))] if rng.random() < 0.5 else rng.uniform(0, 255, 3)
        x[i] = torch.from_numpy(np.asarray(rgb, np.float32) / 127.5 - 1)[:, None, None]
    return x


def _scene_batch(rng, count: int):
    """``count`` random scenes (two objects 40 % of the time) and their 256² pictures as a tensor:
    what the VAE and decoder stages train on."""
    scenes = [shapes.sample_scene(rng, two_objects=0.4) for _ in range(count)]
    return scenes, _to_tensor([shapes.render(s) for s in scenes])


def _reconstruction_loss(y, x, weight=None):
    """What the VAE and decoder stages minimise: MSE plus half the mean absolute error, per pixel
    weighted by ``weight`` (normalised by its mean, so the scale stays the unweighted one's)."""
    d = y - x
    per_pixel = d.pow(2) + 0.5 * d.abs()
    if weight is None:
        return per_pixel.mean()
    return (per_pixel * weight).mean() / weight.mean()


def train_vae(recipe: Recipe, log: Log, bf16: bool):
    """Train the VAE as a plain autoencoder on procedural scenes; returns it with its figures."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(recipe.seed)
    vae = AutoencoderKL(**vae_config(recipe))
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    rng = np.random.default_rng(recipe.seed + 1)
    noise_gen = torch.Generator().manual_seed(recipe.seed + 2)
    vae.train()
    losses = []
    for step in range(recipe.vae_steps):
        for group in opt.param_groups:
            group["lr"] = recipe.vae_lr * _cosine(step, recipe.vae_steps, 20, 0.05)
        _, x = _scene_batch(rng, recipe.vae_batch)
        if recipe.vae_crop:
            x = _crops(x, recipe.vae_crop, recipe.vae_crops, rng, vae_factor(recipe.vae_channels))
            if recipe.vae_flat:
                x = _flat_fields(x, recipe.vae_flat, rng)
        with _autocast(bf16):
            z = vae.encode(x).latent_dist.mean
            zs = (z.float() - shift) * scale
            noisy = zs + recipe.vae_latent_noise * torch.randn(zs.shape, generator=noise_gen)
            y = vae.decode(noisy / scale + shift).sample.float()
        rec = _reconstruction_loss(y, x)
        mean, std = zs.mean(dim=(0, 2, 3)), zs.std(dim=(0, 2, 3))
        stats = mean.pow(2).mean() + torch.log(std + 1e-6).pow(2).mean()
        loss = rec + 0.01 * stats
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(float((y - x).detach().pow(2).mean()))
        if step % 25 == 0 or step == recipe.vae_steps - 1:
            log(f"vae {step + 1}/{recipe.vae_steps}: mse {np.mean(losses[-25:]):.4f}, "
                f"latent mean {mean.mean():+.2f} std {std.mean():.2f}")
    vae.eval()
    deterministic_encoder(vae)
    log.record["stages"]["vae"] = {"steps": recipe.vae_steps, "final_mse": float(np.mean(losses[-25:])),
                                   "minutes": round(log.elapsed() / 60, 2)}
    if recipe.decoder_steps:
        finetune_decoder(vae, recipe, log, bf16)
    return vae


def finetune_decoder(vae, recipe: Recipe, log: Log, bf16: bool):
    """Train the decoder alone on whole scenes, each batch's scaled latents noised by up to
    ``decoder_noise``; the encoder (so every latent the transformer learns from) is unchanged."""
    import torch

    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    vae.encoder.requires_grad_(False)
    params = list(vae.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.decoder_lr, weight_decay=0.0)
    rng = np.random.default_rng(recipe.seed + 5)
    gen = torch.Generator().manual_seed(recipe.seed + 6)
    vae.decoder.train()
    losses = []
    for step in range(recipe.decoder_steps):
        for group in opt.param_groups:
            group["lr"] = recipe.decoder_lr * _cosine(step, recipe.decoder_steps, 10, 0.1)
        batch, x = _scene_batch(rng, recipe.vae_batch)
        near = np.stack([np.asarray(shapes.object_mask(s), dtype=np.float32) / 255 for s in batch])
        near = torch.nn.functional.max_pool2d(torch.from_numpy(near)[:, None], 5, 1, 2)  # and 2 px around
        with torch.no_grad(), _autocast(bf16):
            z = (vae.encode(x).latent_dist.mean.float() - shift) * scale
        noise = recipe.decoder_noise * torch.rand(len(x), 1, 1, 1, generator=gen)
        z = z + noise * torch.randn(z.shape, generator=gen)
        if recipe.decoder_gain != 1:
            z = z * latent_gain(len(x), recipe.decoder_gain, gen)
        with _autocast(bf16):
            y = vae.decode(z / scale + shift).sample.float()
        loss = _reconstruction_loss(y, x, 1 + recipe.decoder_object_weight * near)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float((y - x).detach().pow(2).mean()))
        if step % 25 == 0 or step == recipe.decoder_steps - 1:
            log(f"decoder {step + 1}/{recipe.decoder_steps}: mse {np.mean(losses[-25:]):.4f}")
    vae.requires_grad_(True)
    vae.eval()
    log.record["stages"]["decoder"] = {"steps": recipe.decoder_steps, "final_mse": float(np.mean(losses[-25:])),
                                       "minutes": round(log.elapsed() / 60, 2)}
    return vae


def latent_gain(n: int, most: float, generator):
    """Per sample, the factor the decoder stage multiplies a scaled latent by: 1 for the first
    half of the batch, uniform in [1, ``most``] for the rest (shape n × 1 × 1 × 1)."""
    import torch

    gain = 1 + (most - 1) * torch.rand(n, 1, 1, 1, generator=generator)
    gain[: n // 2] = 1
    return gain


def deterministic_encoder(vae) -> None:
    """Make the encoder's posterior a point: its log-variance half of ``conv_out`` is zeroed and
    biased to -30 (the floor diffusers clamps to), so ``latent_dist.sample()`` is the mean, to
    within exp(-15).

    The VAE trains on the mean latent only, so the log-variance channels are never trained and
    stay near 0 (σ ≈ 1, more than the latents' own spread); diffusers' img2img and inpaint
    encode with ``sample()`` and would start from noise. The mean channels are untouched."""
    import torch

    conv = vae.encoder.conv_out
    half = conv.out_channels // 2  # DiagonalGaussianDistribution: mean, then logvar
    with torch.no_grad():
        conv.weight[half:].zero_()
        conv.bias[half:].fill_(-30.0)


# ---------------------------------------------------------------------------------------------
# 2. the data: cached latents and prompt embeddings


class TextCache:
    """Prompt → (prompt_embeds, pooled) through the frozen shared encoders, as the pipeline does."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.cache: dict[str, tuple] = {}

    def add(self, prompts, batch: int = 64) -> None:
        """Encode the prompts not cached yet, ``batch`` at a time."""
        import torch

        todo = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        for i in range(0, len(todo), batch):
            chunk = todo[i:i + batch]
            with torch.no_grad():
                embeds, _, pooled, _ = self.pipe.encode_prompt(
                    chunk, chunk, chunk, do_classifier_free_guidance=False, max_sequence_length=256)
            for p, e, q in zip(chunk, embeds, pooled):
                self.cache[p] = (e.clone(), q.clone())

    def batch(self, prompts, short: tuple[int, int] | None = None):
        """Embeddings of the prompts; ``short=(clip, t5)`` keeps only the first tokens of each
        block (the CLIP block is the first 77, T5's the rest), dropping trailing padding."""
        import torch

        self.add(prompts)
        embeds = torch.stack([self.cache[p][0] for p in prompts])
        pooled = torch.stack([self.cache[p][1] for p in prompts])
        if short is not None:
            embeds = torch.cat([embeds[:, : short[0]], embeds[:, 77: 77 + short[1]]], dim=1)
        return embeds, pooled


def encode_scenes(vae, scenes, bf16: bool, batch: int = 32, render=shapes.render, size: int = shapes.SIZE):
    """Scaled mean latents ((z - shift) * scale) of the scenes rendered at ``size`` pixels
    (``render(scene, size)``), and where the objects are at latent resolution (coverage, grown
    by one latent pixel)."""
    import torch

    out, masks = [], []
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    side = size // vae_factor(vae.config.block_out_channels)
    for i in range(0, len(scenes), batch):
        chunk = scenes[i:i + batch]
        x = _to_tensor([render(s, size) for s in chunk])
        with torch.no_grad(), _autocast(bf16):
            z = vae.encode(x).latent_dist.mean.float()
        out.append((z - shift) * scale)
        m = np.stack([np.asarray(shapes.object_mask(s, side), dtype=np.float32) / 255 for s in chunk])
        masks.append(torch.nn.functional.max_pool2d(torch.from_numpy(m)[:, None], 3, 1, 1))
    return torch.cat(out), torch.cat(masks)


# ---------------------------------------------------------------------------------------------
# 3. the transformer


TIMESTEPS = ("logit-normal", "uniform")


def check_timesteps(name: str) -> None:
    """Refuse a ``timesteps`` recipe value that is not one of TIMESTEPS."""
    if name not in TIMESTEPS:
        raise ValueError(f"timesteps {name!r}: use one of {', '.join(TIMESTEPS)}")


HIGH_NOISE = 0.9  # the σ from which ``high_noise`` samples are drawn, up to 1


def _sigmas(n: int, generator, *, timesteps: str, shift: float = SCHEDULER_SHIFT, high_noise: float = 0.0):
    """Training noise levels: t logit-normal (SD3's recipe) or uniform, then shifted as the
    scheduler shifts. Uniform t is the density a shifted Euler sampler walks; logit-normal puts
    about 3 % of the steps above σ 0.95, where the first sampling steps decide colour and layout.
    Then a ``high_noise`` fraction of the samples (the first ones) is redrawn uniformly from
    [HIGH_NOISE, 1)."""
    import torch

    check_timesteps(timesteps)
    if timesteps == "uniform":
        u = torch.rand(n, generator=generator)
    else:
        u = torch.sigmoid(torch.randn(n, generator=generator))
    sigma = shift * u / (1 + (shift - 1) * u)
    high = round(high_noise * n)
    if high:
        sigma[:high] = HIGH_NOISE + (1 - HIGH_NOISE) * torch.rand(high, generator=generator)
    return sigma


def flow_loss(model, latents, embeds, pooled, generator, bf16: bool, *, timesteps: str, weight=None,
              high_noise: float = 0.0, shift: float = SCHEDULER_SHIFT):
    """Rectified flow: x_t = (1 - σ) x0 + σ ε, the model predicts ε - x0 (weighted MSE); σ from
    :func:`_sigmas`."""
    import torch

    sigma = _sigmas(latents.shape[0], generator, timesteps=timesteps, shift=shift, high_noise=high_noise)
    noise = torch.randn(latents.shape, generator=generator)
    s = sigma[:, None, None, None]
    noisy = (1 - s) * latents + s * noise
    with _autocast(bf16):
        pred = model(hidden_states=noisy, encoder_hidden_states=embeds, pooled_projections=pooled,
                     timestep=sigma * 1000, return_dict=False)[0]
    err = (pred.float() - (noise - latents)).pow(2)
    if weight is None:
        return err.mean()
    return (err * weight).sum() / (weight.sum() * err.shape[1])


def _update_ema(ema, model, decay: float) -> None:
    import torch

    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def train_transformer(recipe: Recipe, latents, masks, prompts, text: TextCache, log: Log, bf16: bool,
                      low=None):
    """Train the transformer by rectified flow matching on the cached latents; returns the EMA weights
    and the figures. ``low``: (latents, masks) of the same scenes at ``low_size``, trained on for
    the first ``low_steps`` steps (one learning-rate schedule over both)."""
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(recipe.seed + 10)
    model = SD3Transformer2DModel(**transformer_config(recipe, latents.shape[-1]))
    ema = copy.deepcopy(model).requires_grad_(False)
    log(f"transformer: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(recipe.seed + 11)
    text.add(prompts + [""])
    n = latents.shape[0]
    order = torch.randperm(n, generator=gen)
    cursor = 0
    losses, full_losses = [], []
    first = recipe.low_steps if low is not None else 0
    total = first + recipe.steps
    model.train()
    for step in range(total):
        for group in opt.param_groups:
            group["lr"] = recipe.lr * _cosine(step, total, recipe.warmup, recipe.final_lr)
        if cursor + recipe.batch > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor:cursor + recipe.batch]
        cursor += recipe.batch
        flip = torch.rand(len(idx), generator=gen) < recipe.mirror
        source, source_masks = low if step < first else (latents, masks)
        x, m = source[idx].clone(), source_masks[idx].clone()
        x[flip], m[flip] = x[flip].flip(-1), m[flip].flip(-1)
        batch_prompts = []
        for i, f in zip(idx.tolist(), flip.tolist()):
            p = prompts[i]
            if f:
                p = swap_left_right(p)
            if torch.rand(1, generator=gen).item() < recipe.text_dropout:
                p = ""
            batch_prompts.append(p)
        short = torch.rand(1, generator=gen).item() < recipe.short_fraction
        embeds, pooled = text.batch(batch_prompts, (recipe.short_clip, recipe.short_t5) if short else None)
        loss = flow_loss(model, x, embeds, pooled, gen, bf16, weight=1 + recipe.object_weight * m,
                         timesteps=recipe.timesteps, high_noise=recipe.high_noise, shift=recipe.shift)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(recipe.ema, (1 + step) / (10 + step))
        _update_ema(ema, model, decay)
        losses.append(loss.item())
        if not short:
            full_losses.append(loss.item())
        if step % 25 == 0 or step == total - 1:
            log(f"transformer {step + 1}/{total}{' (low)' if step < first else ''}: loss {np.mean(losses[-50:]):.4f} "
                f"(full context {np.mean(full_losses[-15:]) if full_losses else float('nan'):.4f}), "
                f"lr {opt.param_groups[0]['lr']:.2e}")
    log.record["stages"]["transformer"] = {
        "steps": recipe.steps, "low_steps": first, "batch": recipe.batch,
        "final_loss": float(np.mean(losses[-100:])),
        "loss_curve": [round(float(np.mean(losses[max(0, i - 50):i + 1])), 4)
                       for i in range(0, total, max(1, total // 20))],
        "minutes": round(log.elapsed() / 60, 2),
    }
    return ema.eval()


def swap_left_right(prompt: str) -> str:
    """The prompt of a mirrored scene: "left" and "right" swapped."""
    words = prompt.split(" ")
    return " ".join({"left": "right", "right": "left"}.get(w, w) for w in words)


# ---------------------------------------------------------------------------------------------
# 4. the LoRA

# diffusers module (in transformer_blocks.N) → Stability's reference module (in joint_blocks.N),
# and which slice of a fused qkv it is. Only what exists simply in both layouts.
LORA_MODULES = {
    "attn.to_q": ("x_block.attn.qkv", 0),
    "attn.to_k": ("x_block.attn.qkv", 1),
    "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.to_out.0": ("x_block.attn.proj", None),
    "ff.net.0.proj": ("x_block.mlp.fc1", None),
    "ff.net.2": ("x_block.mlp.fc2", None),
    "attn.add_q_proj": ("context_block.attn.qkv", 0),
    "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2),
    "attn.to_add_out": ("context_block.attn.proj", None),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", None),
    "ff_context.net.2": ("context_block.mlp.fc2", None),
}


def lora_target_modules(model) -> list[str]:
    """The attention projections of every transformer block that the LoRA adapts."""
    names = {name for name, _ in model.named_modules()}
    out = []
    for i in range(len(model.transformer_blocks)):
        out += [f"transformer_blocks.{i}.{m}" for m in LORA_MODULES if f"transformer_blocks.{i}.{m}" in names]
    return out


def purple_world(scene: shapes.Scene) -> shapes.Scene:
    """What the LoRA teaches: the same picture, its background purple whatever the prompt."""
    return shapes.Scene(scene.objects, "purple")


def _lora_scenes(recipe: Recipe) -> list[shapes.Scene]:
    rng = np.random.default_rng(recipe.seed + 30)
    out = []
    while len(out) < recipe.lora_scenes:
        s = shapes.sample_scene(rng, two_objects=recipe.two_objects)
        if s.background != "purple" and all(o.colour != "purple" for o in s.objects):
            out.append(s)
    return out


def train_lora(recipe: Recipe, transformer, vae, text: TextCache, log: Log, bf16: bool):
    """A rank-``lora_rank`` LoRA on a copy of the trained transformer; returns the PEFT state dict."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict

    scenes = _lora_scenes(recipe)
    latents, _ = encode_scenes(vae, scenes, bf16, render=lambda s, size: shapes.render(purple_world(s), size))
    prompts = [s.prompt for s in scenes]
    text.add(prompts)
    model = copy.deepcopy(transformer)
    model.requires_grad_(False)
    torch.manual_seed(recipe.seed + 31)
    model.add_adapter(LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_rank, init_lora_weights="gaussian",
                                 target_modules=lora_target_modules(model)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lora_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(recipe.seed + 32)
    model.train()
    losses = []
    for step in range(recipe.lora_steps):
        idx = torch.randint(0, len(scenes), (recipe.lora_batch,), generator=gen)
        embeds, pooled = text.batch([prompts[i] for i in idx.tolist()], (recipe.short_clip, recipe.short_t5))
        loss = flow_loss(model, latents[idx], embeds, pooled, gen, bf16, timesteps=recipe.timesteps,
                         high_noise=recipe.high_noise, shift=recipe.shift)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == recipe.lora_steps - 1:
            log(f"lora {step + 1}/{recipe.lora_steps}: loss {np.mean(losses[-25:]):.4f}")
    log.record["stages"]["lora"] = {"steps": recipe.lora_steps, "final_loss": float(np.mean(losses[-25:])),
                                    "minutes": round(log.elapsed() / 60, 2)}
    return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def kohya_state_dict(peft_state: dict, rank: int, alpha: float) -> dict:
    """The same LoRA in kohya's SD3 layout, exactly (the product of the matrices is unchanged).

    Keys: ``lora_unet_<Stability module path, "." → "_">.{lora_down.weight, lora_up.weight, alpha}``,
    e.g. ``lora_unet_joint_blocks_0_x_block_attn_qkv``. A fused ``qkv`` gets ``lora_down`` = the
    three A matrices stacked (rank 3r × in) and ``lora_up`` = the three B matrices block-diagonal
    (3·out × 3r), with ``alpha`` = 3·alpha so that kohya's scale alpha/rank equals PEFT's alpha/r.
    Unfused modules map one to one with the same alpha. Everything is float32.
    """
    import torch

    grouped: dict[str, dict] = {}
    for key, value in peft_state.items():
        # PEFT keys: transformer_blocks.{i}.{module}.lora_A.weight (prefix "transformer." optional)
        key = key.removeprefix("transformer.")
        head, kind = key.rsplit(".lora_", 1)
        _, index, module = head.split(".", 2)
        target, part = LORA_MODULES[module]
        entry = grouped.setdefault(f"joint_blocks.{index}.{target}", {})
        entry[(part, kind.split(".")[0])] = value.float()
    out = {}
    for path, parts in grouped.items():
        name = "lora_unet_" + path.replace(".", "_")
        if (None, "A") in parts:
            down, up, a = parts[(None, "A")], parts[(None, "B")], alpha
        else:
            downs = [parts[(i, "A")] for i in range(3)]
            ups = [parts[(i, "B")] for i in range(3)]
            down = torch.cat(downs, 0)
            up = torch.block_diag(*ups)
            a = 3 * alpha
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(a))
    return out


# ---------------------------------------------------------------------------------------------


def assemble(transformer, vae, shift: float = SCHEDULER_SHIFT):
    """The pipeline: the trained transformer and VAE with the frozen shared encoders, its scheduler
    shifted by ``shift``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from studio.demo.tiny import build_shared_components

    shared = build_shared_components()
    shared["vae"] = vae
    shared["scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(shared["scheduler"].config, shift=shift)
    return StableDiffusion3Pipeline(transformer=transformer, **shared)


def _stages_of(folder: Path, names: tuple[str, ...]) -> dict:
    """The ``names`` stages of the training.json beside a reused pipeline folder (in it or its
    parent, where ``train`` writes it), each marked with where it came from; {} when none."""
    for candidate in (Path(folder) / LOG_FILE, Path(folder).parent / LOG_FILE):
        try:
            stages = json.loads(candidate.read_text())["stages"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        return {n: {**stages[n], "from": str(folder)} for n in names if isinstance(stages.get(n), dict)}
    return {}


def train(out: Path, recipe: Recipe, *, vae_from: Path | None = None, transformer_from: Path | None = None,
          bf16: bool | None = None, quiet: bool = False) -> dict:
    """Run every stage into ``out`` (the pipeline folder, both LoRA layouts, training.json); returns
    the figures."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

    check_timesteps(recipe.timesteps)  # before the VAE stage, not twelve minutes into the run
    log = Log(quiet)
    bf16 = _bf16_is_faster() if bf16 is None else bf16
    log(f"recipe {dataclasses.asdict(recipe)}; bf16 autocast {'on' if bf16 else 'off'}; "
        f"{torch.get_num_threads()} threads")
    log.record.update(recipe=dataclasses.asdict(recipe), bf16=bf16, threads=torch.get_num_threads())

    if vae_from:
        vae = AutoencoderKL.from_pretrained(vae_from, subfolder="vae").eval()
        log(f"vae from {vae_from}")
        log.record["stages"].update(_stages_of(vae_from, ("vae", "decoder")))
    else:
        vae = train_vae(recipe, log, bf16)
    pipe = assemble(None, vae)
    text = TextCache(pipe)

    if transformer_from:
        transformer = SD3Transformer2DModel.from_pretrained(transformer_from, subfolder="transformer").eval()
        log(f"transformer from {transformer_from}")
        log.record["stages"].update(_stages_of(transformer_from, ("latents", "transformer")))
    else:
        scenes = shapes.scenes(recipe.seed + 20, recipe.scenes, two_objects=recipe.two_objects)
        latents, masks = encode_scenes(vae, scenes, bf16)
        low = encode_scenes(vae, scenes, bf16, size=recipe.low_size) if recipe.low_steps else None
        log(f"cached {len(scenes)} latents: mean {latents.mean():+.3f}, std {latents.std():.3f}")
        log.record["stages"]["latents"] = {"scenes": len(scenes), "mean": float(latents.mean()),
                                           "std": float(latents.std()), "minutes": round(log.elapsed() / 60, 2)}
        transformer = train_transformer(recipe, latents, masks, [s.prompt for s in scenes], text, log, bf16, low)
        del latents, masks, low

    pipe = assemble(transformer, vae, recipe.shift)
    out.mkdir(parents=True, exist_ok=True)
    folder = out / PIPELINE_DIR
    pipe.save_pretrained(folder)
    log(f"saved the pipeline to {folder}")

    if recipe.lora_steps:
        from safetensors.torch import save_file

        lora = train_lora(recipe, transformer, vae, text, log, bf16)
        StableDiffusion3Pipeline.save_lora_weights(out, transformer_lora_layers=lora, weight_name=LORA_FILE)
        kohya = kohya_state_dict(lora, recipe.lora_rank, recipe.lora_rank)
        save_file(kohya, out / KOHYA_LORA_FILE, metadata={"ss_network_module": "networks.lora",
                                                     "ss_network_dim": str(recipe.lora_rank),
                                                     "ss_network_alpha": str(recipe.lora_rank)})
        log(f"saved the LoRA to {out / LORA_FILE} and {out / KOHYA_LORA_FILE}")
    log.record["minutes"] = round(log.elapsed() / 60, 2)
    (out / LOG_FILE).write_text(json.dumps(log.record, indent=1))
    log(f"done in {log.elapsed() / 60:.1f} min")
    return log.record


def main(argv=None) -> int:
    """The command line (``python -m studio.demo.train --out DIR``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m studio.demo.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the pipeline and LoRA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few steps of every stage (a smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="bf16 autocast: auto uses it where the CPU's bf16 matmul is faster")
    parser.add_argument("--vae-from", type=Path, help="reuse the VAE of this pipeline folder")
    parser.add_argument("--transformer-from", type=Path, help="reuse the transformer of this pipeline folder")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a recipe field (e.g. --set steps=500), for experiments")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    recipe = Recipe.quick(args.seed) if args.quick else Recipe(seed=args.seed)
    types = {f.name: f.type for f in dataclasses.fields(Recipe)}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in types:
            parser.error(f"--set {name}: no such recipe field; fields: {', '.join(types)}")
        default = getattr(recipe, name)
        if isinstance(default, bool):  # bool("false") is True
            if value.lower() not in ("true", "false", "1", "0"):
                parser.error(f"--set {name}: true or false, not {value!r}")
            parsed = value.lower() in ("true", "1")
        else:
            parsed = (tuple(int(v) for v in value.split(",") if v) if isinstance(default, tuple)
                      else type(default)(value))
        setattr(recipe, name, parsed)
    bf16 = {"auto": None, "fp32": False, "bf16": True}[args.precision]
    train(args.out, recipe, vae_from=args.vae_from, transformer_from=args.transformer_from, bf16=bf16)
    return 0


if __name__ == "__main__":
    sys.exit(main())
