"""Upscalers (#17): the tiny ESRGAN identified by spandrel, tiled upscaling with feathered seams,
tile halving on out-of-memory, what files are refused, Lanczos, latent upscales, size limits.

Offline and CPU-only; the tiny ESRGAN (0.9 MB, random near-identity weights) runs an 80×64 image
in well under a second."""

from __future__ import annotations

import hashlib
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from studio.catalog import MAX_SIDE
from studio.demo.upscaler import build_tiny_upscaler, tiny_upscaler_state_dict
from studio.engine import upscale as U
from studio.engine.limits import MAX_IMAGE_PIXELS
from studio.errors import GenerationError, ValidationError
from studio.models.upscalers import UpscalerError, UpscalerLibrary, spandrel_module


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's convolutions are too small to share: on a busy 2-core machine a second
    torch thread only adds synchronisation (10× slower measured). Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def spandrel():
    try:
        return spandrel_module()
    except UpscalerError as e:  # spandrel is a requirement; say so rather than fail obscurely
        pytest.skip(str(e))


@pytest.fixture
def folder(tmp_path):
    return tmp_path / "upscalers"


@pytest.fixture
def library(folder, spandrel):
    build_tiny_upscaler(folder, scale=2)
    build_tiny_upscaler(folder, scale=4)
    return UpscalerLibrary(folder)


def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    """A photograph's ingredients: smooth gradients, a fine periodic texture, hard-edged shapes,
    a thin diagonal line and sensor-like noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([40 + 170 * xx / w, 60 + 140 * yy / h, 120 + 50 * np.sin(xx / 5.0) * np.cos(yy / 3.0)], -1)
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse((w * 0.1, h * 0.15, w * 0.5, h * 0.7), fill=(220, 40, 40))
    d.rectangle((w * 0.55, h * 0.3, w * 0.9, h * 0.85), fill=(30, 90, 220))
    d.line((0, h - 1, w - 1, 0), fill=(250, 250, 250), width=2)
    arr = np.asarray(img).astype(np.float32) + rng.normal(0, 10, (h, w, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.float64)


def nearest2x(t):
    return torch.nn.functional.interpolate(t, scale_factor=2, mode="nearest")


class FakeDescriptor:
    """Stands in for spandrel's descriptor where only the tiling logic is under test."""

    device = torch.device("cpu")
    moves: list

    def __init__(self):
        self.moves = []

    def to(self, where):
        self.moves.append(where)
        return self

    def __call__(self, tile):
        return nearest2x(tile)


def fake_upscaler(name="fake-2x"):
    from pathlib import Path

    from studio.models.upscalers import LoadedUpscaler, UpscalerInfo

    info = UpscalerInfo(name, Path(f"{name}.safetensors"), "0" * 64, 1, "ESRGAN", 2, 3, 3)
    return LoadedUpscaler(info, FakeDescriptor())


# --- the tiny ESRGAN and the library -----------------------------------------------------------


def test_tiny_esrgan_is_identified_by_spandrel_as_esrgan(tmp_path, spandrel):
    from safetensors.torch import load_file

    for scale in (2, 4):
        path = build_tiny_upscaler(tmp_path, scale=scale)
        assert path.name == f"tiny-esrgan-{scale}x.safetensors" and path.stat().st_size < 2 << 20
        desc = spandrel.ModelLoader().load_from_state_dict(load_file(str(path)))
        assert isinstance(desc, spandrel.ImageModelDescriptor)
        assert (desc.architecture.id, desc.scale, desc.purpose) == ("ESRGAN", scale, "SR")
        assert (desc.input_channels, desc.output_channels) == (3, 3) and set(desc.tags) >= {"8nf", "1nb"}
    again = build_tiny_upscaler(tmp_path / "again.safetensors", scale=4)
    assert again.read_bytes() == (tmp_path / "tiny-esrgan-4x.safetensors").read_bytes()  # deterministic


def test_library_names_info_and_hash(library, folder):
    assert library.names() == ["tiny-esrgan-2x", "tiny-esrgan-4x"]
    info = library.info("tiny-esrgan-2x")
    digest = hashlib.sha256((folder / "tiny-esrgan-2x.safetensors").read_bytes()).hexdigest()
    assert (info.architecture, info.scale, info.sha256) == ("ESRGAN", 2, digest)
    assert info.short_hash == digest[:10]  # A1111's shorthash length for model files
    assert info.as_meta() == {"name": "tiny-esrgan-2x", "sha256": digest, "hash": digest[:10],
                              "architecture": "ESRGAN", "scale": 2}
    assert library.info("tiny-esrgan-4x").scale == 4
    assert [d["error"] for d in library.describe()] == [None, None]


def test_names_are_names_never_paths(library, folder):
    (folder / "Lanczos.safetensors").write_bytes((folder / "tiny-esrgan-2x.safetensors").read_bytes())
    (folder / "bad:name.safetensors").write_bytes(b"x")
    (folder / "notes.txt").write_text("not a model")
    assert library.names() == ["tiny-esrgan-2x", "tiny-esrgan-4x"]  # built-in names and unsafe names skipped
    for bad in ("../tiny-esrgan-2x", "/etc/passwd", "a/b", "x:y", "", None, "latent-bislerp"):
        with pytest.raises(UpscalerError):
            library.path_for(bad)
    with pytest.raises(UpscalerError, match="No upscaler named 'missing'.*tiny-esrgan-2x"):
        library.path_for("missing")


def test_safetensors_wins_over_a_pth_of_the_same_name(library, folder):
    torch.save(tiny_upscaler_state_dict(4), folder / "tiny-esrgan-2x.pth")
    assert library.names().count("tiny-esrgan-2x") == 1
    assert library.path_for("tiny-esrgan-2x").suffix == ".safetensors"
    assert library.info("tiny-esrgan-2x").scale == 2


def test_loaded_upscalers_are_cached_by_content(library):
    a = library.load("tiny-esrgan-2x")
    assert library.load("tiny-esrgan-2x").descriptor is a.descriptor
    small = UpscalerLibrary(library.folder, cache_size=1)
    first = small.load("tiny-esrgan-2x")
    small.load("tiny-esrgan-4x")
    assert small.cached() == [small.info("tiny-esrgan-4x").sha256]  # the oldest went
    assert small.load("tiny-esrgan-2x").descriptor is not first.descriptor
    build_tiny_upscaler(library.folder / "tiny-esrgan-2x.safetensors", scale=2, seed=5)  # replaced in place
    replaced = library.load("tiny-esrgan-2x")
    assert replaced.descriptor is not a.descriptor and replaced.info.sha256 != a.info.sha256


# --- refused files -----------------------------------------------------------------------------


class Payload:
    """A custom class: unpickling it needs arbitrary code, so weights_only loading fails."""


def test_a_pickled_pth_is_refused_saying_why_and_what_to_do(tmp_path, library, folder):
    src = tmp_path / "evil.pth"
    torch.save({**tiny_upscaler_state_dict(2), "extra": Payload()}, src)
    with pytest.raises(UpscalerError) as e:
        library.import_file(src)
    msg = str(e.value)
    assert "evil.pth" in msg and "pickle" in msg and "run any code" in msg and ".safetensors" in msg
    assert "Payload" in msg  # names what needed pickle
    assert not (folder / "evil.pth").exists()  # refused before anything was copied
    (folder / "evil.pth").write_bytes(src.read_bytes())  # dropped into the folder by hand: refused on use too
    with pytest.raises(UpscalerError, match="pickle"):
        library.load("evil")
    assert next(d for d in library.describe() if d["name"] == "evil")["error"]


def test_a_weights_only_pth_is_accepted(tmp_path, library, folder):
    plain = tmp_path / "plain.pth"
    torch.save(tiny_upscaler_state_dict(2, seed=3), plain)
    info = library.import_file(plain)
    assert (info.name, info.architecture, info.scale) == ("plain", "ESRGAN", 2)
    assert (folder / "plain.pth").is_file() and any("safetensors" in n for n in info.notes)
    wrapped = tmp_path / "RealESRGAN_like.pth"  # Real-ESRGAN releases wrap the weights in params_ema
    torch.save({"params_ema": tiny_upscaler_state_dict(4, seed=4)}, wrapped)
    assert library.import_file(wrapped).scale == 4
    out = U.upscale(picture(24, 16), 2, upscaler="plain", library=library)
    assert out.size == (48, 32)


def test_an_unidentifiable_safetensors_is_refused_with_spandrels_message(tmp_path, library):
    from safetensors.torch import save_file

    src = tmp_path / "mystery.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(4, 4), "encoder.layer.0.bias": torch.zeros(4)}, str(src))
    with pytest.raises(UpscalerError, match=r"spandrel could not identify mystery.safetensors: UnsupportedModelError"):
        library.import_file(src)
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(UpscalerError, match="not a readable safetensors file"):
        library.import_file(tmp_path / "broken.safetensors")


def test_a_model_that_does_not_enlarge_is_refused(tmp_path, library):
    from safetensors.torch import save_file

    sd = tiny_upscaler_state_dict(2)  # drop the upconv: model.0, model.1, HR conv 2, last conv 4 → 1×
    one = {k: v for k, v in sd.items() if k.startswith(("model.0.", "model.1."))}
    one.update({"model.2.weight": sd["model.5.weight"], "model.2.bias": sd["model.5.bias"],
                "model.4.weight": sd["model.7.weight"], "model.4.bias": sd["model.7.bias"]})
    save_file(one, str(tmp_path / "denoise1x.safetensors"))
    with pytest.raises(UpscalerError, match=r"ESRGAN restoration \(1×\) model.*not an upscaler"):
        library.import_file(tmp_path / "denoise1x.safetensors")


def test_import_never_overwrites_a_different_model(tmp_path, library):
    other = build_tiny_upscaler(tmp_path / "x" / "tiny-esrgan-2x.safetensors", scale=2, seed=9)
    with pytest.raises(UpscalerError, match="different upscaler named 'tiny-esrgan-2x'"):
        library.import_file(other)
    same = build_tiny_upscaler(tmp_path / "y" / "tiny-esrgan-2x.safetensors", scale=2)
    assert library.import_file(same).name == "tiny-esrgan-2x"  # same content: nothing to do


def test_spandrel_import_leaves_no_stand_in_torchvision(spandrel):
    assert all(not (k == "torchvision" or k.startswith("torchvision.")) or getattr(m, "__file__", None)
               for k, m in list(sys.modules.items()))


# --- running a model upscaler ------------------------------------------------------------------


def test_2x_model_doubles_the_size(library):
    img = picture(40, 24)
    out = U.upscale(img, 2, upscaler="tiny-esrgan-2x", library=library)
    assert out.size == (80, 48) and out.image.mode == "RGB" and out.passes == 1
    assert out.info.name == "tiny-esrgan-2x" and out.as_meta()["upscaler_model"]["hash"] == out.info.short_hash
    # near-identity weights: close to a nearest-neighbour enlargement, plus the random texture
    diff = np.abs(pixels(out.image) - pixels(img.resize((80, 48), Image.Resampling.NEAREST)))
    assert 0.5 < diff.mean() < 40
    loaded = library.load("tiny-esrgan-2x")
    assert loaded.descriptor.device.type == "cpu" and loaded.descriptor.dtype == torch.float32


def test_a_4x_model_asked_for_2x_and_a_2x_model_asked_for_3x(library):
    img = picture(20, 16)
    four = U.upscale(img, 2, upscaler="tiny-esrgan-4x", library=library)
    assert four.size == (40, 32) and four.passes == 1  # 4× then Lanczos down to 2×
    three = U.upscale(img, 3, upscaler="tiny-esrgan-2x", library=library)
    assert three.size == (60, 48) and three.passes == 2  # 2× twice, then Lanczos to 3×
    to_size = U.upscale(img, size=(50, 40), upscaler="tiny-esrgan-2x", library=library)
    assert to_size.size == (50, 40) and to_size.passes == 2  # 80×64, then down to the target


def test_model_passes_stop_at_three_and_lanczos_makes_the_rest():
    out = U.upscale(picture(20, 16), 9, upscaler=fake_upscaler())
    assert out.size == (180, 144) and out.passes == U.MAX_MODEL_PASSES == 3  # 8×, then Lanczos to 9×
    assert any("3 pass(es) and Lanczos made 180×144" in n for n in out.notes)


def test_tiled_matches_untiled_within_tolerance(library):
    """Tolerance: on a 64×48 picture, 40 px tiles with 12 px overlap (four tiles, seams across the
    shapes and the texture) differ from one untiled pass by under 0.1 grey level on average and
    at most 4 levels (of 255) anywhere (measured: 0.025 and 2). Butt-joined tiles (no overlap)
    differ several times as much (measured: 0.25 and 16) — the seams the blending removes."""
    loaded = library.load("tiny-esrgan-2x")
    img = picture(64, 48)
    whole = pixels(U.upscale(img, 2, upscaler=loaded, tile=None).image)
    blended = U.upscale(img, 2, upscaler=loaded, tile=40, overlap=12)
    assert blended.tile == 40
    err = np.abs(pixels(blended.image) - whole)
    assert err.mean() < 0.1 and err.max() <= 4, (err.mean(), err.max())
    butt = np.abs(pixels(U.upscale(img, 2, upscaler=loaded, tile=40, overlap=0).image) - whole)
    assert butt.mean() > 4 * err.mean() and butt.max() > err.max()


def test_blending_keeps_flat_images_flat_and_local_models_exact():
    calls = []

    def fn(t):
        calls.append(tuple(t.shape[-2:]))
        return nearest2x(t)

    flat = torch.full((1, 3, 70, 90), 0.37)
    out = U.tiled(fn, flat, 2, tile=32, overlap=8)
    assert out.shape == (1, 3, 140, 180) and len(calls) == 12  # 4 × 3 tiles
    assert torch.allclose(out, torch.full_like(out, 0.37), atol=1e-6)
    x = torch.rand(1, 3, 70, 90, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(U.tiled(nearest2x, x, 2, tile=32, overlap=8), nearest2x(x), atol=1e-6)


def test_out_of_memory_halves_the_tile_and_says_so(monkeypatch):
    """The model call raises torch.OutOfMemoryError for any tile side above 256 px."""
    sizes = []

    def fake_call(descriptor, tile):
        sizes.append(max(tile.shape[-2:]))
        if max(tile.shape[-2:]) > 256:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return nearest2x(tile)

    monkeypatch.setattr(U, "_call_model", fake_call)
    up = fake_upscaler()
    out = U.upscale(picture(300, 200), 2, upscaler=up, tile=512)
    assert out.size == (600, 400) and out.tile == 256
    assert sizes[0] == 300 and max(sizes[1:]) == 256  # the whole image first, then 256 px tiles
    assert "tile 512 → 256 after running out of memory" in out.notes
    assert up.descriptor.moves[-2:] == [torch.device("cpu"), torch.float32]  # back where the cache keeps it


def test_out_of_memory_at_the_floor_is_an_error_that_teaches(monkeypatch):
    tried = []

    def always_oom(descriptor, tile):
        tried.append(max(tile.shape[-2:]))
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(U, "_call_model", always_oom)
    with pytest.raises(GenerationError, match="even with 128 px tiles.*Lanczos"):
        U.upscale(picture(300, 200), 2, upscaler=fake_upscaler(), tile=512)
    assert sorted(set(tried), reverse=True) == [300, 256, 128]  # 512 (the whole image), 256, 128, then stop


def test_other_model_failures_are_not_mistaken_for_out_of_memory(monkeypatch):
    def broken(descriptor, tile):
        raise RuntimeError("Given groups=1, weight of size [8, 3, 3, 3], expected input to have 3 channels")

    monkeypatch.setattr(U, "_call_model", broken)
    with pytest.raises(GenerationError, match="upscaler fake-2x failed.*groups=1"):
        U.upscale(picture(32, 32), 2, upscaler=fake_upscaler())


# --- Lanczos, inputs ---------------------------------------------------------------------------


def test_lanczos():
    img = picture(50, 30)
    out = U.upscale(img, 2)
    assert out.upscaler == "Lanczos" and out.size == (100, 60) and out.info is None and out.passes == 0
    assert np.array_equal(pixels(out.image), pixels(img.resize((100, 60), Image.Resampling.LANCZOS)))
    flat = U.upscale(Image.new("RGB", (31, 17), (10, 200, 90)), 3, upscaler="lanczos")
    assert flat.size == (93, 51) and set(map(tuple, np.asarray(flat.image).reshape(-1, 3))) == {(10, 200, 90)}
    rgba = U.upscale(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), 2)  # through images.py: transparent → white
    assert rgba.image.mode == "RGB" and rgba.image.getpixel((3, 3)) == (255, 255, 255)


def test_bad_upscale_requests_name_the_field():
    img = picture(16, 16)
    for kwargs, pattern in (
        ({"scale": 1.0}, "more than 1"),
        ({"scale": "big"}, "must be a number"),
        ({"scale": 2, "upscaler": "latent-bislerp"}, "upscales latents"),
        ({"scale": 2, "upscaler": "4x-UltraSharp"}, "No upscaler named"),
        ({"size": (8, 8)}, "must be larger"),
        ({}, "factor or a target size"),
    ):
        with pytest.raises(ValidationError, match=pattern) as e:
            U.upscale(img, field="hires_scale", **kwargs)
        assert e.value.field == "hires_scale"


# --- size limits -------------------------------------------------------------------------------


def test_largest_scale_and_the_refusal_that_names_it():
    assert U.largest_scale(1024, 1024, generation=True) == 2.0  # MAX_SIDE 2048 a side
    assert U.largest_scale(1216, 832, generation=True) == 1.68  # 2043 → 2048 after snapping, 1398 → 1392
    assert U.check_scale(1216, 832, 1.68, generation=True) == (2048, 1392)
    assert U.largest_scale(1024, 1024, generation=True, max_side=1536) == 1.5  # the loaded model's lower limit
    top = U.largest_scale(1024, 1024)  # an upscale only: MAX_IMAGE_PIXELS
    assert top == math.floor(math.sqrt(MAX_IMAGE_PIXELS / 1024**2) * 100) / 100 == 6.17
    w, h = U.check_scale(1024, 1024, top)
    assert w * h <= MAX_IMAGE_PIXELS < round(1024 * (top + 0.01)) ** 2
    with pytest.raises(ValidationError, match=r"2\.5× upscale of 1024×1024 would be 2560×2560.*2048 px a side"
                                              r".*largest factor allowed for 1024×1024 is 2×") as e:
        U.check_scale(1024, 1024, 2.5, generation=True, field="hires_scale")
    assert e.value.field == "hires_scale"
    with pytest.raises(ValidationError, match=r"40 MP; the largest factor allowed for 1024×1024 is 6\.17×"):
        U.upscale(Image.new("RGB", (1024, 1024)), 8)
    with pytest.raises(ValidationError, match="cannot be upscaled at all"):
        U.check_scale(MAX_SIDE, MAX_SIDE, 1.01, generation=True)
    assert U.target_size(1000, 600, 1.5, multiple=16) == (1504, 896)


# --- latents -----------------------------------------------------------------------------------


def test_latent_upscalers_shapes_and_properties():
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 16, 8, 12, generator=g)  # a 96×64 first pass
    for method in ("latent-bislerp", "latent-nearest-exact"):
        out = U.upscale_latents(lat, 192, 128, method)
        assert out.shape == (2, 16, 16, 24) and out.dtype == lat.dtype
    nearest = U.upscale_latents(lat, 192, 128, "latent-nearest-exact")
    assert torch.equal(nearest, lat.repeat_interleave(2, 2).repeat_interleave(2, 3))
    const = torch.ones(1, 16, 8, 8) * torch.linspace(-2, 2, 16).reshape(1, 16, 1, 1)
    assert torch.allclose(U.bislerp(const, 13, 21), const[:, :, :1, :1].expand(1, 16, 13, 21), atol=1e-6)
    # slerp keeps the latent vectors' lengths where bilinear blending of random directions shrinks them
    big = torch.randn(1, 16, 16, 16, generator=g)
    norm = big.norm(dim=1).mean()
    slerped = U.bislerp(big, 40, 40).norm(dim=1).mean()
    bilinear = torch.nn.functional.interpolate(big, size=(40, 40), mode="bilinear").norm(dim=1).mean()
    assert abs(slerped - norm) < 0.02 * norm and bilinear < 0.9 * norm
    assert U.bislerp(big.half(), 32, 32).dtype == torch.float16
    with pytest.raises(ValidationError, match="multiple of 16"):
        U.upscale_latents(lat, 100, 128)
    with pytest.raises(ValidationError, match="not a latent upscaler") as e:
        U.upscale_latents(lat, 192, 128, "Lanczos")
    assert e.value.field == "hires_upscaler"
