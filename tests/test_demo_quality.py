"""The demo's quality check measures what it claims: on the procedural pictures themselves (the
ground truth the model learns from) the colour, shape and position readings are right, and on
pictures that are wrong in one respect only that respect fails. No model runs here."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from studio.demo import quality, shapes


def _read(scene):
    obj = scene.objects[0]
    return quality.read_image(shapes.render(scene), obj.colour, scene.background_rgb)


def test_the_readings_are_right_on_the_ground_truth():
    scenes = quality.held_out_scenes(60, seed=123)
    assert all(shapes.is_held_out(s.objects[0].colour, s.objects[0].shape, s.objects[0].position) for s in scenes)
    hits = {"colour": 0, "shape": 0, "position": 0, "background": 0}
    for scene in scenes:
        obj, r = scene.objects[0], _read(scene)
        hits["colour"] += r.dominant == obj.colour
        hits["shape"] += r.shape == obj.shape
        hits["position"] += r.position == obj.position
        hits["background"] += r.background == (scene.background or "grey")
    n = len(scenes)
    assert hits["colour"] == n and hits["position"] == n and hits["background"] == n, hits
    assert hits["shape"] >= 0.9 * n, hits  # small stars and triangles at 256 px are the hard cases


def test_a_wrong_colour_or_place_is_read_as_wrong():
    scene = quality.held_out_scenes(1, seed=7)[0]
    obj = scene.objects[0]
    other = next(c for c in shapes.COLOURS if c not in (obj.colour, scene.background or "grey"))
    recoloured = replace(scene, objects=(replace(obj, colour=other),))
    r = quality.read_image(shapes.render(recoloured), obj.colour, scene.background_rgb)
    assert r.dominant == other  # the named colour is not there: the colour measure fails
    moved = replace(scene, objects=(replace(obj, cx=1.0 - obj.cx, cy=1.0 - obj.cy),))
    if obj.position != "center":
        assert _read(moved).position != obj.position


def test_colour_fractions_label_the_palette_and_leave_soft_edges_unlabelled():
    image = np.zeros((16, 16, 3), np.uint8)
    image[:, :8] = shapes.COLOURS["red"]
    image[:, 8:] = (200, 100, 160)  # far from every palette colour
    from PIL import Image

    f = quality.colour_fractions(Image.fromarray(image))
    assert abs(f["red"] - 0.5) < 1e-6 and abs(f["none"] - 0.5) < 1e-6


class _FakeVAE:
    """encode/decode as diffusers' AutoencoderKL answers them; ``decode`` applies ``change``."""

    def __init__(self, change=lambda x: x):
        import torch

        self.dtype = torch.float32
        self.change = change

    def encode(self, x):
        from types import SimpleNamespace

        return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))

    def decode(self, z):
        from types import SimpleNamespace

        return SimpleNamespace(sample=self.change(z))


def test_the_vae_round_trip_is_the_ceiling_it_leaves_the_transformer():
    """A lossless VAE leaves every measure at 100 %; one that shifts red towards orange (what the
    shipped VAE's first decoder did to small objects) fails the colour of the red ones."""
    import torch

    scenes = quality.held_out_scenes(24, seed=7)
    perfect = quality.round_trip(_FakeVAE(), scenes, batch=8)
    assert perfect == {"n": 24, "colour": 1.0, "shape": perfect["shape"], "position": 1.0, "background": 1.0}
    assert perfect["shape"] >= 0.9

    def orange(x):  # red (220, 40, 40)-ish pixels get orange's green channel
        red = (x[:, 0] > 0.5) & (x[:, 1] < -0.3) & (x[:, 2] < -0.3)
        y = x.clone()
        y[:, 1][red] = 0.0
        return y

    scenes = [s for s in scenes if s.background != "red"]  # only the objects' red changes
    drift = quality.round_trip(_FakeVAE(orange), scenes, batch=8)
    reds = sum(s.objects[0].colour == "red" for s in scenes)
    assert reds and abs(drift["colour"] - (1 - reds / len(scenes))) < 1e-9, (drift, reds)
    table = quality.table({**perfect, "n": 24}, drift)
    assert "VAE round trip" in table and f"{drift['colour']:.1%}" in table


def test_speckles_of_the_named_colour_are_not_an_object():
    """The colour measure reads the largest connected blob, not the pixel count: a noisy picture
    with more red speckles (isolated 3×3 dots) than one solid blue square reads blue."""
    from PIL import Image

    image = np.full((256, 256, 3), shapes.GREY, np.uint8)
    image[100:130, 100:130] = shapes.COLOURS["blue"]  # 900 pixels in one piece
    for y in range(0, 256, 8):
        for x in range(0, 96, 8):
            image[y:y + 3, x:x + 3] = shapes.COLOURS["red"]  # 32 × 12 dots of 9 pixels: 3,456
    picture = Image.fromarray(image)
    assert quality.colour_fractions(picture)["red"] > quality.colour_fractions(picture)["blue"]
    assert quality.read_image(picture, "red", shapes.GREY).dominant == "blue"
    assert quality.read_image(picture, "blue", shapes.GREY).dominant == "blue"


class _LayoutPipe:
    """A pipeline whose transformer knows the clean latent at once: a small square at the named
    position's anchor (nothing for the empty negative prompt), so the first-step layout is known."""

    vae_scale_factor = 8

    def __init__(self):
        import torch

        self.transformer = self
        self.config = type("Config", (), {"in_channels": 16})
        self.dtype = torch.float32

    def encode_prompt(self, prompt, prompt_2, prompt_3, negative_prompt, do_classifier_free_guidance):
        import torch

        def code(p):
            return torch.tensor([shapes.ANCHORS[p.split(" ")[-1]] if p else (-1.0, -1.0)])

        return code(prompt)[None], code(negative_prompt)[None], code(prompt), code(negative_prompt)

    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, return_dict):
        import torch

        side = hidden_states.shape[-1]
        x0 = torch.zeros_like(hidden_states)
        for i, (ax, ay) in enumerate(pooled_projections.tolist()):
            if ax >= 0:
                col, row = int(ax * side), int(ay * side)
                x0[i, :, row - 1:row + 1, col - 1:col + 1] = 1.0
        return (hidden_states - x0,)  # v = noise − x0 at σ 1


def test_the_first_step_layout_finds_where_the_transformer_puts_the_object():
    found = quality.first_step_layout(_LayoutPipe(), [quality.LAYOUT_PROMPT.format(p) for p in shapes.ANCHORS])
    for (x, y), (ax, ay) in zip(found, shapes.ANCHORS.values()):
        assert abs(x - ax) < 0.02 and abs(y - ay) < 0.02, (x, y, ax, ay)
    table = quality.layout_table(_LayoutPipe())
    assert "left" in table and "0.25  0.50" in table


def test_position_hits_are_counted_by_the_named_position():
    rows = [{"prompt": "a red circle at the left", "position": True},
            {"prompt": "a blue star at the left", "position": False},
            {"prompt": "a large green square at the top", "position": True},
            {"prompt": "a white circle", "position": False}]
    assert quality.by_position(rows) == {"left": (1, 2), "top": (1, 1)}


def test_each_steps_prediction_is_decoded_and_the_last_is_the_picture_itself():
    """``predictions`` reads the sampler's x0 back from its Euler steps: its last image is the
    pipeline's own picture for that seed, pixel for pixel, and the predictions walk towards it
    (the first, at σ 1, is the blurred mean of what the prompt allows)."""
    import torch

    pipe = quality.load_pipeline()
    prompt = "a large blue square at the left"
    images, sigmas = quality.predictions(pipe, prompt, seed=3, steps=6)
    assert len(images) == len(sigmas) == 6
    assert sigmas[0] == 1.0 and all(a > b for a, b in zip(sigmas, sigmas[1:]))
    final = pipe(prompt, num_inference_steps=6, guidance_scale=quality.GUIDANCE, height=shapes.SIZE,
                 width=shapes.SIZE, generator=torch.Generator().manual_seed(3)).images[0]
    pixels = [np.asarray(im, dtype=np.int16) for im in images]
    assert np.array_equal(pixels[-1], np.asarray(final, dtype=np.int16))
    distance = [float(np.abs(p - pixels[-1]).mean()) for p in pixels]
    assert distance[0] > distance[2] > distance[-1] == 0, distance


def test_predictions_refuse_a_sampler_whose_steps_are_not_euler_steps():
    """A stochastic step adds fresh noise, so x − σ·v read back from it is noise, not a prediction."""
    import pytest
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

    pipe = quality.load_pipeline()
    config = pipe.scheduler.config
    for scheduler in (FlowMatchEulerDiscreteScheduler.from_config(config, stochastic_sampling=True),
                      FlowMatchHeunDiscreteScheduler.from_config(config)):
        pipe.scheduler = scheduler
        with pytest.raises(ValueError, match="deterministic Euler"):
            quality.predictions(pipe, "a red circle", steps=2)


def test_the_trajectory_sheet_has_a_row_a_prompt_and_a_column_a_step():
    pipe = quality.load_pipeline()
    sheet = quality.trajectory(pipe, prompts=("a red circle", "a green star at the top"), steps=3)
    cell, label_h, pad = shapes.SIZE // 3, 28, 3
    assert sheet.size == (pad + 3 * (cell + pad), 2 * label_h + 2 * (cell + label_h + pad))
    # every cell holds a picture (not the white sheet), the first row a red object's
    first_row = np.asarray(sheet)[2 * label_h + label_h:2 * label_h + label_h + cell]
    assert (first_row.reshape(-1, 3) != 255).any(1).mean() > 0.9


def test_colour_misses_count_each_named_and_read_pair():
    rows = [{"named": "red", "colour": False, "read": {"dominant": "blue"}},
            {"named": "red", "colour": False, "read": {"dominant": "blue"}},
            {"named": "purple", "colour": False, "read": {"dominant": None}},
            {"named": "green", "colour": True, "read": {"dominant": "green"}}]
    assert quality.colour_misses(rows) == [("red", "blue", 2), ("purple", "none", 1)]


def test_the_command_line_writes_the_trajectory_and_names_the_colour_misses(tmp_path, capsys):
    path = tmp_path / "steps.png"
    status = quality.main(["--count", "4", "--trajectory", str(path)])
    out = capsys.readouterr().out
    assert status in (0, 1) and "held-out images" in out
    assert path.exists() and f"trajectory written to {path}" in out
    from PIL import Image

    assert Image.open(path).size[0] == 3 + quality.STEPS * (shapes.SIZE // 3 + 3)
    if "colour misses" in out:
        assert " → " in out.split("colour misses")[1]
