"""The demo model's training script, as a smoke run (--quick: every stage for two steps)."""

import hashlib
import json

import pytest


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    import torch

    from studio.demo.train import Recipe, train

    out = tmp_path_factory.mktemp("demo-train")
    threads = torch.get_num_threads()
    try:
        record = train(out, Recipe.quick(seed=3), bf16=False, quiet=True)
    finally:
        torch.set_num_threads(threads)
    return out, record


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_quick_run_writes_a_complete_pipeline_and_both_loras(quick_run):
    from diffusers import StableDiffusion3Pipeline

    from studio.demo import KOHYA_LORA_FILE, LORA_FILE, trained_folder

    out, record = quick_run
    folder = trained_folder(out)  # verified complete
    assert json.loads((out / "training.json").read_text())["stages"].keys() >= {"vae", "decoder", "transformer", "lora"}
    assert record["recipe"]["seed"] == 3
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.qk_norm == "rms_norm" and list(pipe.transformer.config.dual_attention_layers)
    assert pipe.vae.config.latent_channels == 16 and not pipe.vae.config.use_quant_conv
    pipe.load_lora_weights(str(out / LORA_FILE), adapter_name="purple")
    image = pipe("a red circle", num_inference_steps=1, guidance_scale=1.0, height=64, width=64).images[0]
    assert image.size == (64, 64)
    assert (out / KOHYA_LORA_FILE).is_file()


def test_frozen_encoders_stay_bit_identical_to_the_tiny_family(quick_run, tiny_family):
    """So the demo variants share the encoder objects (and files) with the tiny family."""
    out, _ = quick_run
    for component in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_3"):
        trained = {p.name: _sha(p) for p in (out / "sd3.5-medium-shapes" / component).iterdir()}
        tiny = {p.name: _sha(p) for p in (tiny_family["sd3.5-medium"] / component).iterdir()}
        assert trained == tiny, component


def test_kohya_export_is_exactly_the_peft_lora(quick_run):
    """kohya's layout: fused qkv = the three A stacked (down) and the three B block-diagonal (up),
    alpha tripled; its ΔW = up @ down · alpha / rank equals PEFT's stacked B @ A · alpha / r."""
    import torch
    from safetensors.torch import load_file

    from studio.demo import KOHYA_LORA_FILE, LORA_FILE
    from studio.demo.train import LORA_MODULES

    out, record = quick_run
    peft = load_file(out / LORA_FILE)
    kohya = load_file(out / KOHYA_LORA_FILE)
    r = record["recipe"]["lora_rank"]
    assert all(k.startswith("transformer.transformer_blocks.") for k in peft)
    assert all(k.startswith("lora_unet_joint_blocks_") for k in kohya)
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight" in kohya
    assert "lora_unet_joint_blocks_0_context_block_mlp_fc2.alpha" in kohya

    def peft_delta(block, module):
        a = peft[f"transformer.transformer_blocks.{block}.{module}.lora_A.weight"]
        b = peft[f"transformer.transformer_blocks.{block}.{module}.lora_B.weight"]
        return b @ a  # lora_alpha == r: PEFT's scale is 1

    checked = 0
    names = {k.rsplit(".", 2)[0] for k in kohya if k.endswith(".alpha")}
    for name in names:
        down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
        delta = up @ down * float(kohya[f"{name}.alpha"]) / down.shape[0]
        block = int(name.split("_")[4])
        path = name.split("_", 5)[5]  # e.g. x_block_attn_qkv
        modules = sorted((m for m, (target, _) in LORA_MODULES.items() if target.replace(".", "_") == path),
                         key=lambda m: LORA_MODULES[m][1] or 0)
        expected = torch.cat([peft_delta(block, m) for m in modules], 0)
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-7)
        checked += 1
    assert checked == len(names) > 0
    assert len(kohya) == 3 * len(names)
    assert sum(1 for k in peft if k.endswith("lora_A.weight")) == sum(
        3 if n.endswith("qkv") else 1 for n in names)


def test_the_vae_can_train_on_crops_of_the_scenes():
    """``vae_crop``: the convolutional VAE learns from random crops (on the latent grid — 16
    pixels for the five-block VAE —, half of them near the middle where objects sit) and still
    encodes whole 256² pictures."""
    import dataclasses

    import numpy as np
    import torch

    from studio.catalog import vae_factor
    from studio.demo import shapes
    from studio.demo.train import Log, Recipe, _crops, _flat_fields, _to_tensor, train_vae

    x = _to_tensor([shapes.render(shapes.sample_scene(np.random.default_rng(i))) for i in range(2)])
    crops = _crops(x, 64, 3, np.random.default_rng(0), grid=16)
    assert crops.shape == (6, 3, 64, 64)
    for c in crops[:3]:  # each crop is a window of its picture at a multiple of 16
        hits = [(t, left) for t in range(0, 193, 16) for left in range(0, 193, 16)
                if torch.equal(x[0, :, t:t + 64, left:left + 64], c)]
        assert hits
    flat = _flat_fields(crops, 0.5, np.random.default_rng(0))
    assert all(bool((f == f[:, :1, :1]).all()) for f in flat[:3]) and torch.equal(flat[3:], crops[3:])
    recipe = dataclasses.replace(Recipe.quick(seed=1), vae_crop=32, vae_crops=2, vae_attention=False, vae_flat=0.5)
    vae = train_vae(recipe, Log(quiet=True), bf16=False)
    assert vae.config.mid_block_add_attention is False
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
    side = shapes.SIZE // vae_factor(recipe.vae_channels)
    assert z.shape == (2, 16, side, side) and torch.isfinite(z).all()


def test_set_reads_booleans_and_tuples(monkeypatch, tmp_path):
    """``--set`` parses a recipe field by its type: ``vae_attention=false`` is False (bool("false")
    would be True), a tuple from commas; a bad boolean is refused."""
    import torch

    from studio.demo import train as training

    seen = {}
    monkeypatch.setattr(training, "train", lambda out, recipe, **kw: seen.setdefault("recipe", recipe))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # main sets the training's threads
    training.main(["--out", str(tmp_path), "--quick", "--set", "vae_attention=false", "--set", "vae_channels=4,8",
                   "--set", "vae_flat=0.25"])
    r = seen["recipe"]
    assert r.vae_attention is False and r.vae_channels == (4, 8) and r.vae_flat == 0.25
    with pytest.raises(SystemExit):
        training.main(["--out", str(tmp_path), "--quick", "--set", "vae_attention=maybe"])


def test_training_timesteps_uniform_weights_the_noisiest_steps_as_the_sampler_walks_them():
    """``timesteps``: uniform t (then the scheduler's shift of 3) trains σ > 0.95 about 13.6 % of
    the time (the share of a shifted Euler sampler's path), logit-normal about 3 %; an unknown
    name is refused, not silently replaced."""
    import torch

    from studio.demo.train import _sigmas

    def share_above(name):
        s = _sigmas(200_000, torch.Generator().manual_seed(0), timesteps=name)
        assert 0 <= float(s.min()) and float(s.max()) <= 1
        return float((s > 0.95).float().mean())

    assert abs(share_above("uniform") - (1 - 0.95 / 1.1)) < 0.005  # σ > 0.95 ⇔ t > 0.95 / (3 − 2·0.95)
    assert 0.025 < share_above("logit-normal") < 0.04
    with pytest.raises(ValueError, match="uniform"):
        _sigmas(4, torch.Generator(), timesteps="cosine")


def test_high_noise_trains_the_samplers_first_steps_that_logit_normal_almost_never_draws():
    """``high_noise``: that fraction of the samples is drawn uniformly from σ [0.9, 1), where the
    12-step sampler's first two steps (σ 1 and 0.97) sit; the rest keep the logit-normal draw."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from studio.demo.train import HIGH_NOISE, _sigmas

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(12)
    first_two = scheduler.sigmas[:2]
    assert float(first_two.min()) > 0.96  # what the recipe comment says it trains

    def share_above(s, level=0.96):
        return float((s > level).float().mean())

    plain = _sigmas(100_000, torch.Generator().manual_seed(0), timesteps="logit-normal")
    mixed = _sigmas(100_000, torch.Generator().manual_seed(0), timesteps="logit-normal", high_noise=0.2)
    assert share_above(plain) < 0.02
    high = mixed[:20_000]
    assert float(high.min()) >= HIGH_NOISE and float(high.max()) < 1
    assert abs(share_above(high) - 0.4) < 0.02  # uniform on [0.9, 1): 40 % above 0.96
    assert 0.085 < share_above(mixed) < 0.105  # 0.2 × 40 % + 0.8 × the plain share: about 9.5 %
    assert torch.equal(_sigmas(64, torch.Generator().manual_seed(3), timesteps="uniform", high_noise=0.0),
                       _sigmas(64, torch.Generator().manual_seed(3), timesteps="uniform"))


def test_train_refuses_unknown_timesteps_before_any_stage(tmp_path, monkeypatch):
    """A mistyped ``--set timesteps=…`` fails at once, not after the VAE stage has run."""
    import dataclasses

    from studio.demo import train as training

    def no_stage(*args, **kwargs):
        raise AssertionError("a stage ran before the recipe was checked")

    monkeypatch.setattr(training, "train_vae", no_stage)
    with pytest.raises(ValueError, match="logit-normal"):
        training.train(tmp_path / "out", dataclasses.replace(training.Recipe.quick(), timesteps="cosine"),
                       bf16=False, quiet=True)
    assert not (tmp_path / "out").exists()


def test_the_decoder_stage_trains_the_decoder_alone():
    """``decoder_steps``: the decoder learns on whole scenes while the encoder, so every latent the
    transformer trains on, stays bit for bit what the VAE stage made."""
    import dataclasses

    import torch
    from diffusers import AutoencoderKL

    from studio.demo.train import Log, Recipe, finetune_decoder, vae_config

    torch.manual_seed(0)
    recipe = dataclasses.replace(Recipe.quick(seed=2), decoder_steps=2)
    vae = AutoencoderKL(**vae_config(recipe)).eval()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    log = Log(quiet=True)
    finetune_decoder(vae, recipe, log, bf16=False)
    after = vae.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert not vae.training and log.record["stages"]["decoder"]["steps"] == 2


def test_latent_gain_leaves_half_the_batch_alone_and_spreads_the_rest_up_to_the_most():
    import torch

    from studio.demo.train import latent_gain

    gain = latent_gain(1000, 3.0, torch.Generator().manual_seed(0)).flatten()
    assert torch.equal(gain[:500], torch.ones(500))
    assert float(gain[500:].min()) >= 1 and float(gain[500:].max()) <= 3
    assert abs(float(gain[500:].mean()) - 2.0) < 0.1  # uniform on [1, 3]
    assert torch.equal(latent_gain(6, 1.0, torch.Generator()), torch.ones(6, 1, 1, 1))


def test_the_decoder_stage_decodes_latents_multiplied_by_the_recipes_gain(monkeypatch):
    """``decoder_gain``: what the decoder stage hands the decoder is the encoder's latent times
    :func:`latent_gain` (classifier-free guidance's overshoot); 1 hands it the latent itself."""
    import dataclasses

    import torch
    from diffusers import AutoencoderKL

    from studio.demo import train as tr

    seen = {}
    for gain in (1.0, 3.0):
        torch.manual_seed(0)
        recipe = dataclasses.replace(tr.Recipe.quick(seed=2), decoder_steps=1, decoder_noise=0.0, decoder_gain=gain)
        vae = AutoencoderKL(**tr.vae_config(recipe)).eval()
        decoded = []
        real_decode = vae.decode
        monkeypatch.setattr(vae, "decode", lambda z, *a, **k: decoded.append(z.detach().clone()) or real_decode(z, *a, **k))
        tr.finetune_decoder(vae, recipe, tr.Log(quiet=True), bf16=False)
        seen[gain] = decoded[0]
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    plain, gained = ((seen[g] - shift) * scale for g in (1.0, 3.0))
    half = len(plain) // 2
    assert torch.allclose(gained[:half], plain[:half], atol=1e-5)  # the same scenes, the same encoder
    ratio = (gained[half:].flatten(1).norm(dim=1) / plain[half:].flatten(1).norm(dim=1))
    assert bool(((ratio >= 1 - 1e-4) & (ratio <= 3 + 1e-4)).all()) and float(ratio.max()) > 1.05


def test_the_reconstruction_loss_weighs_object_pixels():
    """``decoder_object_weight``: the same error costs more on an object than on the background
    (a small object's colour otherwise drifts), and a uniform weight changes nothing."""
    import torch

    from studio.demo.train import _reconstruction_loss

    x = torch.zeros(1, 3, 8, 8)
    near = torch.zeros(1, 1, 8, 8)
    near[..., :2, :2] = 1  # the object: 4 of 64 pixels
    on_object, on_background = x.clone(), x.clone()
    on_object[..., :2, :2] = 0.5
    on_background[..., 6:, 6:] = 0.5
    w = 1 + 10 * near
    assert _reconstruction_loss(on_object, x, w) > 5 * _reconstruction_loss(on_background, x, w)
    assert _reconstruction_loss(on_object, x) == _reconstruction_loss(on_background, x)
    assert torch.isclose(_reconstruction_loss(on_object, x, torch.full_like(near, 3.0)),
                         _reconstruction_loss(on_object, x))


def test_the_low_resolution_steps_train_on_128_pixel_latents_first(quick_run):
    """``low_steps``: the same scenes encoded at ``low_size`` (16×16 latents for 128 px), trained
    on before the full-size steps, under one learning-rate schedule; the saved transformer keeps
    the native 256 px."""
    import torch
    from diffusers import AutoencoderKL

    from studio.demo import shapes, trained_folder
    from studio.demo.train import encode_scenes

    out, record = quick_run
    stage = record["stages"]["transformer"]
    assert (stage["low_steps"], stage["steps"]) == (2, 2) and len(stage["loss_curve"]) == 4
    folder = trained_folder(out)
    assert json.loads((folder / "transformer" / "config.json").read_text())["sample_size"] == 32
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    scenes = shapes.scenes(1, 2)
    low, masks = encode_scenes(vae, scenes, False, size=128)
    full, _ = encode_scenes(vae, scenes, False)
    assert low.shape == (2, 16, 16, 16) and masks.shape == (2, 1, 16, 16) and full.shape[-1] == 32
    assert torch.isfinite(low).all()


def test_reused_stages_keep_their_figures_in_training_json(quick_run, tmp_path):
    """``--vae-from`` / ``--transformer-from``: the new training.json carries the reused stages'
    figures from the training.json beside that folder, each saying where it came from."""
    import torch

    from studio.demo import trained_folder
    from studio.demo.train import Recipe, train

    out, first = quick_run
    folder = trained_folder(out)
    threads = torch.get_num_threads()
    try:
        record = train(tmp_path / "again", Recipe.quick(seed=3), vae_from=folder, transformer_from=folder,
                       bf16=False, quiet=True)
    finally:
        torch.set_num_threads(threads)
    for stage in ("vae", "decoder", "transformer"):
        assert record["stages"][stage] == {**first["stages"][stage], "from": str(folder)}, stage
    assert "from" not in record["stages"]["lora"], "the LoRA was trained by this run"


def test_pos_embed_max_size_0_lays_the_grid_over_the_whole_picture():
    """``pos_embed_max_size=0`` (the default): no ``pos_embed_max_size``, so diffusers lays its
    sin-cos grid over the whole picture at any size (the native 16 patches span 16 units) instead
    of cropping the centre of one fixed grid: the 128² steps then teach the places the 256²
    pictures are drawn at (the 8×8 grid is the 16×16 grid's every other patch), which SD3's crop
    (``pos_embed_max_size=64``) does not."""
    import torch
    from diffusers import SD3Transformer2DModel

    from studio.demo.train import Recipe, transformer_config

    def grids(recipe):
        config = transformer_config(recipe, 32)
        embed = SD3Transformer2DModel(**{**config, "num_layers": 1, "dual_attention_layers": (0,)}).pos_embed
        width = embed.proj.out_channels
        grid = {}
        with torch.no_grad():
            for side in (16, 32):  # latent sides: 128² and 256² pictures
                x = torch.zeros(1, 16, side, side)
                position = embed(x) - embed.proj(x).flatten(2).transpose(1, 2)  # what the embedding adds
                grid[side] = position.reshape(side // 2, side // 2, width)
        return config, grid

    assert Recipe().pos_embed_max_size == 0
    config, grid = grids(Recipe())
    assert config["pos_embed_max_size"] is None
    assert torch.allclose(grid[16], grid[32][::2, ::2], atol=1e-5)
    # neighbouring patches differ in the fastest sin-cos pair by a radian, not a quarter of one
    assert (grid[32][0, 1, 0] - grid[32][0, 0, 0]).abs() > 0.5
    config, grid = grids(Recipe(pos_embed_max_size=64))
    assert config["pos_embed_max_size"] == 64
    assert not torch.allclose(grid[16], grid[32][::2, ::2], atol=1e-3)


class FrozenText:
    """A stand-in for ``studio.demo.train.TextCache``: the frozen encoders' shapes, without the encoders."""

    def add(self, prompts):
        pass

    def batch(self, prompts, short=None):
        import torch

        return torch.zeros(len(prompts), 8, 64), torch.zeros(len(prompts), 64)


def test_mirror_sets_how_often_a_sample_is_mirrored(monkeypatch):
    """``mirror``: the chance a training sample is flipped left↔right with its prompt's "left" and
    "right" swapped; ``--set mirror=0`` trains on the pictures as drawn."""
    import torch

    from studio.demo import train as tr

    swapped = []
    real_swap = tr.swap_left_right
    monkeypatch.setattr(tr, "swap_left_right", lambda p: swapped.append(p) or real_swap(p))
    latents, masks = torch.randn(8, 16, 16, 16), torch.zeros(8, 1, 16, 16)
    prompts = [f"a red circle at the left {i}" for i in range(8)]
    for mirror, expected in ((0.0, 0), (1.0, 8)):
        swapped.clear()
        recipe = tr.Recipe(steps=2, low_steps=0, batch=4, warmup=1, layers=1, dual_layers=(), mirror=mirror)
        tr.train_transformer(recipe, latents, masks, prompts, FrozenText(), tr.Log(quiet=True), False)
        assert len(swapped) == expected, (mirror, swapped)


def sigmas_drawn(monkeypatch, samples: int, steps: int, **recipe):
    """Every σ a one-block transformer is trained on by ``train_transformer`` with these recipe fields."""
    import torch

    from studio.demo import train as tr

    drawn = []
    real = tr._sigmas
    latents, masks = torch.randn(samples, 16, 16, 16), torch.zeros(samples, 1, 16, 16)
    prompts = [f"a red circle {i}" for i in range(samples)]
    recipe = tr.Recipe(steps=steps, low_steps=0, batch=samples, warmup=1, layers=1, dual_layers=(), **recipe)
    with monkeypatch.context() as patch:
        patch.setattr(tr, "_sigmas", lambda *a, **k: drawn.append(real(*a, **k)) or drawn[-1])
        tr.train_transformer(recipe, latents, masks, prompts, FrozenText(), tr.Log(quiet=True), False)
    assert len(drawn) == steps
    return torch.cat(drawn)


def test_the_transformer_stage_draws_its_sigmas_with_the_recipes_high_noise(monkeypatch):
    """``--set high_noise=1`` reaches the noise levels the transformer trains on: every σ its
    model is given is then in [0.9, 1); with 0 the logit-normal draw goes below."""
    from studio.demo import train as tr

    lowest = {high: float(sigmas_drawn(monkeypatch, 8, 6, high_noise=high).min()) for high in (0.0, 1.0)}
    assert lowest[1.0] >= tr.HIGH_NOISE > lowest[0.0]


def test_the_recipes_shift_shifts_the_training_sigmas_and_the_saved_scheduler(monkeypatch):
    """``shift``: one value for both sides of the flow: the σ the transformer trains on are
    shifted by it (logit-normal's median 0.5 becomes 3·0.5/(1 + 2·0.5) = 0.75 at 3.0, stays 0.5
    at 1.0) and the pipeline it saves samples with it."""
    from studio.demo import train as tr

    medians = {shift: float(sigmas_drawn(monkeypatch, 64, 4, high_noise=0.0, shift=shift).median())
               for shift in (1.0, 3.0)}
    assert abs(medians[1.0] - 0.5) < 0.06 and abs(medians[3.0] - 0.75) < 0.06, medians
    assert tr.assemble(None, None, 1.0).scheduler.config.shift == 1.0
    assert tr.assemble(None, None).scheduler.config.shift == tr.Recipe().shift
