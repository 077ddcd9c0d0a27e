"""Sizes follow the loaded model (``catalog.size_rules``): the multiple is the VAE's factor × the
transformer's patch size, the largest side what its position embedding covers.

Every SD3 release is 8 × 2 = 16, so the rest of the suite cannot tell a hard-coded 16 from the
rule. Here a tiny SD3.5-Medium pipeline with a 16× VAE (five blocks, as the trained demo has)
needs multiples of 32: a size snapped to 16 would reach diffusers' own check and fail there."""

from __future__ import annotations

import json
import shutil

import pytest

from studio.catalog import MAX_SIDE, SIZE_MULTIPLE, VARIANTS, SizeRules, size_rules, vae_factor
from studio.engine import build_request
from studio.errors import ValidationError


def test_every_catalog_variant_is_16_and_the_rule_follows_vae_and_patch():
    for v in VARIANTS.values():
        assert size_rules(v.transformer_config) == SizeRules(SIZE_MULTIPLE, MAX_SIDE), v.name
    assert vae_factor([128, 256, 512, 512]) == 8 and vae_factor([8, 16, 32, 64, 64]) == 16
    assert size_rules({"patch_size": 2, "pos_embed_max_size": 64}, 16) == SizeRules(32, 2048)
    assert size_rules({"patch_size": 2, "pos_embed_max_size": 32}, 16) == SizeRules(32, 1024)
    assert size_rules({"patch_size": 4, "pos_embed_max_size": 20}, 8) == SizeRules(32, 640)
    assert size_rules({}, 8) == SizeRules(16, MAX_SIDE), "no position-embedding limit: the engine's"


@pytest.fixture(scope="module")
def coarse(tmp_path_factory, tiny_family):
    """A Studio holding the tiny sd3.5-medium with a random five-block (16×) VAE and a transformer
    whose native size stays 256 px (sample_size 16 latent pixels)."""
    import torch
    from diffusers import AutoencoderKL

    from studio.config import StudioConfig
    from studio.service import Studio

    root = tmp_path_factory.mktemp("coarse")
    folder = root / "sd35m-16x"
    shutil.copytree(tiny_family["sd3.5-medium"], folder)
    shutil.rmtree(folder / "vae")
    old = json.loads((tiny_family["sd3.5-medium"] / "vae" / "config.json").read_text())
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, down_block_types=["DownEncoderBlock2D"] * 5,
                  up_block_types=["UpDecoderBlock2D"] * 5, block_out_channels=[8, 8, 16, 16, 16],
                  layers_per_block=1, norm_num_groups=4, scaling_factor=old["scaling_factor"],
                  shift_factor=old["shift_factor"], use_quant_conv=False,
                  use_post_quant_conv=False).save_pretrained(folder / "vae")
    cfg_path = folder / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "sample_size": 16}))
    studio = Studio(StudioConfig(data_dir=root / "data"))
    studio.load_model(str(folder))
    return studio


FAST = dict(steps=1, seed=3, slg="off")


def test_a_16x_vae_model_snaps_to_32_says_so_and_generates(coarse):
    loaded = coarse.current
    assert loaded.size_rules == SizeRules(32, MAX_SIDE) and loaded.native_size == (256, 256)
    assert coarse.size_rules_for() == SizeRules(32, MAX_SIDE) and coarse.max_side_for() == MAX_SIDE
    res = coarse.generate(build_request(dict(prompt="a red circle", width=300, height=256, **FAST)))
    assert res.images[0].image.size == (288, 256), "300 → 288, the nearest multiple of 32 (16 would give 304)"
    assert any("Width 300 was snapped to 288 (this model needs multiples of 32)" in n for n in res.notes), res.notes
    with pytest.raises(ValidationError, match=r"2080 is out of range: use 256–2048 pixels \(a multiple of 32\)"):
        coarse.check_request(build_request(dict(prompt="x", width=2080, height=256, **FAST)))


def test_the_latent_hires_fix_and_an_inpaint_work_size_follow_the_vae(coarse):
    from PIL import Image

    res = coarse.generate(build_request(dict(prompt="a red circle", width=256, height=256, hires_scale=1.5,
                                             hires_upscaler="latent-bislerp", hires_steps=3, **FAST)))
    assert res.images[0].image.size == (384, 384), "16× latents upscaled to 384 px, not to an 8× VAE's 768"
    init = Image.new("RGB", (300, 300), (128, 128, 128))
    mask = Image.new("L", (300, 300), 0)
    mask.paste(255, (100, 100, 200, 200))
    resolved = coarse.engine.prepare(build_request(dict(prompt="a blue square", init_image=init, mask_image=mask,
                                                        strength=1.0, **FAST), "inpaint"), coarse.current)
    assert (resolved.width, resolved.height) == (288, 288)
    assert all(side % 32 == 0 for side in resolved.inpaint_plan.size)


def test_presets_snap_to_the_models_multiple():
    from studio.ui.controls import preset_sizes

    small = preset_sizes(1000, 32)
    assert all(w % 32 == 0 and h % 32 == 0 and max(w, h) <= 1000 for w, h in small.values()), small
    assert small["3:2"] == (992, 672), "832 × 1000/1216 = 684 → 672 (32 × 21), where 16 would give 688"
