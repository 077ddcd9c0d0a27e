"""Effects, not shapes: the trained demo model (assets/demo) through the studio's own path
(``Studio.generate``), at 256², 12 steps — the prompt's colour moves the picture its way, CFG
moves adherence the right way, a negative prompt takes its colour out, img2img moves away from
its init image as the strength grows, the named position moves the object its way on both axes,
inpaint keeps every pixel outside the mask and paints the named colour inside, the LoRA's effect
grows with its weight (0 is no LoRA, pixel for pixel), and Skip Layer Guidance changes the
image. Each figure is over several seeds, so one lucky image proves nothing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from studio.demo import trained_folder, trained_lora
from tests import semantics

SEEDS = (11, 12, 13, 14)
FAST = dict(width=256, height=256, steps=12, guidance=4.0)


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    import shutil

    from studio.config import StudioConfig
    from studio.service import Studio

    trained_folder()  # shipped with the repository: missing weights are a failure, not a skip
    config = StudioConfig(data_dir=tmp_path_factory.mktemp("semantics") / "data", demo=True,
                          demo_weights="trained", variant="sd3.5-medium")
    config.loras_dir.mkdir(parents=True)
    shutil.copy(trained_lora("diffusers"), config.loras_dir / "purple-world.safetensors")
    shutil.copy(trained_lora("kohya"), config.loras_dir / "purple-world-kohya.safetensors")
    s = Studio(config)
    s.start()
    return s


def run(studio, prompt, seed, mode="txt2img", **kw):
    from studio.engine import build_request

    res = studio.generate(build_request({"prompt": prompt, "seed": seed, "slg": False, **FAST, **kw}, mode))
    return res.images[0].image


def mean(xs) -> float:
    return float(np.mean(list(xs)))


def test_the_demo_is_the_trained_model(studio):
    studio.load_model()
    pipe = studio.current.pipe
    assert pipe.transformer.config.qk_norm == "rms_norm" and list(pipe.transformer.config.dual_attention_layers)
    assert pipe.vae.config.latent_channels == 16
    assert "shapes" in str(studio.current.source.ref) or "demo" in str(studio.current.source.ref)


def blue_minus_red(image, box=None) -> float:
    """Mean of (blue − red) over the picture (or a box): how blue rather than red or yellow it is.
    The demo draws ragged blobs whose colours are often off the palette (see assets/demo/README.md),
    so the effects are measured as movements of the colour, not as palette labels."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    if box is not None:
        x0, y0, x1, y1 = box
        a = a[y0:y1, x0:x1]
    return float((a[..., 2] - a[..., 0]).mean())


def test_the_named_colour_moves_the_picture_its_way(studio):
    for s in SEEDS:
        blue = blue_minus_red(run(studio, "a large blue circle in the center", s))
        red = blue_minus_red(run(studio, "a large red circle in the center", s))
        assert blue > red + 30, (s, blue, red)


def colour_centroid(image, colour) -> tuple[float, float]:
    """Where ``colour`` is in the picture: the centroid, as fractions of the picture, of how much
    nearer each pixel is to ``colour`` than to the grey background."""
    from studio.demo import shapes

    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    toward = np.linalg.norm(a - shapes.GREY, axis=-1) - np.linalg.norm(a - shapes.COLOURS[colour], axis=-1)
    w = np.clip(toward, 0, None)
    ys, xs = np.mgrid[: a.shape[0], : a.shape[1]]
    return float((w * xs).sum() / w.sum() / a.shape[1]), float((w * ys).sum() / w.sum() / a.shape[0])


def test_the_named_position_moves_the_object_its_way(studio):
    at = {p: [colour_centroid(run(studio, f"a large blue circle at the {p}", s), "blue") for s in SEEDS]
          for p in ("left", "right", "top", "bottom")}
    x = {p: mean(c[0] for c in at[p]) for p in at}
    y = {p: mean(c[1] for c in at[p]) for p in at}
    assert x["left"] < x["right"] - 0.15, x  # both axes: the weights before these learnt only one
    assert y["top"] < y["bottom"] - 0.15, y


BACKGROUNDS = (("blue", "yellow"), ("yellow", "blue"), ("black", "white"), ("white", "red"),
               ("green", "purple"), ("red", "green"), ("orange", "black"), ("purple", "orange"))


def test_the_named_background_fills_the_picture(studio):
    """Every palette colour as the background, under an object of another colour: the picture's
    most common palette colour is the named background in at least 24 of the 32 images (the
    weights before ``high_noise`` drew 16, assets/demo/README.md)."""
    missed = []
    for background, colour in BACKGROUNDS:
        for s in SEEDS:
            prompt = f"a small {colour} circle in the center on a {background} background"
            f = semantics.fractions(run(studio, prompt, s))
            f.pop("none")
            if max(f, key=f.get) != background:
                missed.append((background, s, max(f, key=f.get)))
    assert len(missed) <= 8, missed


def test_cfg_moves_adherence_the_right_way(studio):
    def gap(guidance):
        return mean(blue_minus_red(run(studio, "a large blue circle in the center", s, guidance=guidance))
                    - blue_minus_red(run(studio, "a large red circle in the center", s, guidance=guidance))
                    for s in SEEDS)

    # the CFG 1 against 5: guidance widens the blue-red gap. The 4-block weights already
    # follow the colour at CFG 1 (gap 55.8 at CFG 1, 71.2 at CFG 4), the 6-block ones far less
    low, high = gap(1.0), gap(5.0)
    assert high > low + 10, (low, high)


def test_a_negative_prompt_takes_its_colour_out(studio):
    prompt = "a large circle in the center"  # the colour is left to the model: blue is allowed
    plain = mean(blue_minus_red(run(studio, prompt, s)) for s in SEEDS)
    negative = mean(blue_minus_red(run(studio, prompt, s, negative_prompt="blue")) for s in SEEDS)
    assert negative < plain - 5, (plain, negative)


def test_img2img_moves_away_from_its_init_image_as_strength_grows(studio, tmp_path):
    # A picture as a user uploads it: a clean scene (the demo VAE's round trip of one is within
    # about 10/255; of the demo's own soft, textured pictures it can be 40/255 off, see assets/demo)
    from studio.demo import shapes

    init = shapes.render(shapes.Scene((shapes.Shape("yellow", "star", "large", "center", 0.5, 0.5, 0.3),), None))
    path = tmp_path / "init.png"
    init.save(path)
    d = [mean(semantics.distance(run(studio, "a small red square at the left", s, "img2img", init_image=str(path),
                                     strength=st), init) for s in SEEDS[:2])
         for st in (0.3, 0.6, 0.95)]
    assert d[0] < d[1] < d[2], d


def test_inpaint_keeps_every_pixel_outside_the_mask_and_paints_the_named_colour_inside(studio, tmp_path):
    source = run(studio, "a small yellow circle at the left on a white background", 31)
    src, mask = tmp_path / "src.png", tmp_path / "mask.png"
    source.save(src)
    m = Image.new("L", (256, 256), 0)
    m.paste(255, (128, 64, 256, 192))
    m.save(mask)
    box = (144, 80, 240, 176)
    inside = {}
    for colour in ("blue", "red"):
        inside[colour] = []
        for s in SEEDS[:2]:
            out = run(studio, f"a large {colour} square at the right", s, "inpaint", init_image=str(src),
                      mask_image=str(mask), strength=1.0, mask_blur=0)
            a, b = np.asarray(out.convert("RGB")), np.asarray(source.convert("RGB"))
            assert np.array_equal(a[:, :112], b[:, :112]), "pixels away from the mask changed"
            inside[colour].append(blue_minus_red(out, box))
    assert mean(inside["blue"]) > mean(inside["red"]) + 20, inside


@pytest.mark.parametrize("name", ["purple-world", "purple-world-kohya"])
def test_the_lora_effect_grows_with_its_weight_and_zero_is_no_lora(studio, name):
    prompt = "a small green circle at the top"
    none = [run(studio, prompt, s) for s in SEEDS[:2]]
    zero = [run(studio, prompt, s, loras=[(name, 0.0)]) for s in SEEDS[:2]]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(none, zero))
    # how far towards purple the picture has moved: the half-weight LoRA's background is a purple
    # grey that the palette labeller still reads as grey, so a purple fraction would not see it move
    purple = [mean(semantics.toward(run(studio, prompt, s, loras=[(name, w)]), "purple") for s in SEEDS[:2])
              for w in (0.0, 0.5, 1.0)]
    assert purple[0] + 5 < purple[1] and purple[1] + 5 < purple[2], purple
    assert semantics.fraction(run(studio, prompt, SEEDS[0], loras=[(name, 1.0)]), "purple") > 0.5


def test_skip_layer_guidance_runs_and_changes_the_image(studio):
    a = run(studio, "a large orange triangle in the center", 41)
    b = run(studio, "a large orange triangle in the center", 41, slg=True)
    assert semantics.distance(a, b) > 0.002


def test_the_vae_encodes_to_its_mean(studio):
    """img2img and inpaint encode with ``latent_dist.sample()``: the demo VAE's posterior is a point
    (its untrained log-variance was σ ≈ 1, which started img2img from noise)."""
    import torch

    from studio.demo import shapes
    from studio.demo.train import _to_tensor  # pictures as the VAE trained on them (NCHW, −1…1)

    studio.load_model()
    vae = studio.current.pipe.vae
    scene = shapes.Scene((shapes.Shape("red", "circle", "large", "center", 0.5, 0.5, 0.3),), None)
    with torch.no_grad():
        dist = vae.encode(_to_tensor([shapes.render(scene)]).to(vae.dtype)).latent_dist
    assert float(dist.std.max()) < 1e-4 and float(dist.mean.std()) > 0.1
