"""Samplers and schedules: names both ways, the sigmas, the solvers' math, and every pair on the
tiny SD3 in txt2img, img2img and inpaint."""

from __future__ import annotations

import itertools

import pytest

from studio.engine import samplers as S
from studio.errors import ValidationError

# The peers' own lists, copied from their sources:
#   ComfyUI comfy/samplers.py (Comfy-Org/ComfyUI 311c014): KSAMPLER_NAMES + ["ddim", "uni_pc",
#   "uni_pc_bh2"] and SCHEDULER_NAMES (the keys of SCHEDULER_HANDLERS);
#   Forge modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py, sd_samplers_lcm.py and
#   sd_schedulers.py (lllyasviel/stable-diffusion-webui-forge dfdcbab).
COMFY_SAMPLERS = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0",
    "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm",
    "lcm", "ipndm", "ipndm_v", "deis", "cfgpp_ud10_ab", "res_multistep", "res_multistep_cfg_pp",
    "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
    "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece",
    "ddim", "uni_pc", "uni_pc_bh2",
]
COMFY_SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                    "linear_quadratic", "kl_optimal"]
FORGE_SAMPLERS = [
    "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE", "Euler a",
    "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart", "HeunPP2", "IPNDM",
    "IPNDM_V", "DEIS", "DDIM", "DDIM CFG++", "PLMS", "UniPC", "LCM", "DDPM",
]
FORGE_SCHEDULES = ["Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
                   "Align Your Steps", "Simple", "Normal", "DDIM", "Beta", "Turbo", "Align Your Steps GITS",
                   "Align Your Steps 11", "Align Your Steps 32"]
PAIRS = [(a, b) for a in S.SAMPLERS for b in S.SCHEDULES]


# --- names ------------------------------------------------------------------------------------

def test_our_names_are_forge_labels_and_comfy_names_are_comfys():
    assert set(S.SAMPLERS) <= set(FORGE_SAMPLERS)
    assert set(S.SCHEDULES) <= set(FORGE_SCHEDULES)
    assert {i.comfy for i in S.SAMPLER_INFO.values()} <= set(COMFY_SAMPLERS)
    assert {i.comfy for i in S.SCHEDULE_INFO.values()} <= set(COMFY_SCHEDULERS)
    for name in (*S.SAMPLERS, *S.SCHEDULES):
        assert (S.SAMPLER_INFO.get(name) or S.SCHEDULE_INFO[name]).about


@pytest.mark.parametrize("sampler,schedule", PAIRS)
def test_every_pair_round_trips_through_infotext_and_comfy(sampler, schedule):
    text = S.to_infotext(sampler, schedule)
    assert text == {"Sampler": sampler, "Schedule type": schedule}
    assert S.from_infotext(text["Sampler"], text["Schedule type"]) == (sampler, schedule, [])
    assert S.from_comfy(*S.to_comfy(sampler, schedule)) == (sampler, schedule, [])


def test_infotext_as_a1111_writes_it_old_and_new():
    # A1111's get_sampler_and_scheduler: a schedule suffix on the sampler wins; Automatic or no
    # schedule is the sampler's own default.
    assert S.from_infotext("DPM++ 2M Karras") == ("DPM++ 2M", "Karras", [])
    assert S.from_infotext("DPM++ 2M SDE Exponential", "Automatic") == ("DPM++ 2M SDE", "Exponential", [])
    assert S.from_infotext("DPM++ 2M SDE Heun") == ("DPM++ 2M SDE Heun", "Exponential", [])
    assert S.from_infotext("DPM++ 2M", "Automatic") == ("DPM++ 2M", "Karras", [])
    assert S.from_infotext("DPM++ 2M", "SGM Uniform") == ("DPM++ 2M", "SGM Uniform", [])
    assert S.from_infotext("Euler a") == ("Euler a", "Normal", [])
    assert S.from_infotext("Euler", None) == ("Euler", "Normal", [])
    assert S.from_infotext(None, None) == ("Euler", "Normal", [])
    assert S.from_infotext("Euler", "SGMUniform") == ("Euler", "SGM Uniform", [])  # Forge's alias
    sampler, schedule, notes = S.from_infotext("Euler", "Uniform")
    assert (sampler, schedule) == ("Euler", "Normal") and "Uniform" in notes[0]
    # A1111 sampler aliases
    assert S.from_infotext("k_dpmpp_2m", "karras")[:2] == ("DPM++ 2M", "Karras")
    assert S.from_infotext("k_euler_a")[:2] == ("Euler a", "Normal")


def test_comfy_names_map_onto_ours():
    assert S.from_comfy("dpmpp_2m", "karras") == ("DPM++ 2M", "Karras", [])
    assert S.from_comfy("euler", "simple") == ("Euler", "Simple", [])
    assert S.from_comfy("euler_ancestral", "sgm_uniform") == ("Euler a", "SGM Uniform", [])
    assert S.from_comfy("heun", "beta") == ("Heun", "Beta", [])
    assert S.from_comfy("dpmpp_2m_sde", "exponential") == ("DPM++ 2M SDE", "Exponential", [])
    assert S.from_comfy("deis", "normal") == ("DEIS", "Normal", [])
    assert S.from_comfy("lcm", "kl_optimal") == ("LCM", "KL Optimal", [])
    assert S.from_comfy("uni_pc_bh2", "normal") == ("UniPC", "Normal", [])
    sampler, _, notes = S.from_comfy("uni_pc", "normal")  # bh1 there, bh2 here: said
    assert sampler == "UniPC" and "bh1" in notes[0]
    sampler, _, notes = S.from_comfy("dpmpp_2m_sde_gpu", "karras")
    assert sampler == "DPM++ 2M SDE" and "noise" in notes[0]
    sampler, _, notes = S.from_comfy("ddim", "simple")
    assert sampler == "Euler" and "DDIM" in notes[0]


@pytest.mark.parametrize("name", COMFY_SAMPLERS + FORGE_SAMPLERS)
def test_every_peer_sampler_name_maps_or_is_reported(name):
    ours, note = S.sampler_from_name(name)
    if ours is None:
        assert repr(name) in note and "not available" in note and "Available:" in note
        assert "nearest here is" in note  # every peer sampler has a nearest one named
    else:
        assert ours in S.SAMPLERS


@pytest.mark.parametrize("name", COMFY_SCHEDULERS + FORGE_SCHEDULES)
def test_every_peer_schedule_name_maps_or_is_reported(name):
    ours, note = S.schedule_from_name(name)
    if ours is None:
        assert repr(name) in note and "not available" in note
    else:
        assert ours in S.SCHEDULES


def test_unknown_names_are_reported_never_guessed():
    assert S.sampler_from_name("Foo Sampler") == (None, S.sampler_from_name("Foo Sampler")[1])
    assert "'Foo Sampler'" in S.sampler_from_name("Foo Sampler")[1]
    sampler, schedule, notes = S.from_infotext("Foo", "Bar")
    assert sampler is None and schedule is None and len(notes) == 2
    sampler, schedule, notes = S.from_comfy("dpmpp_3m_sde", "ddim_uniform")
    assert sampler is None and schedule is None
    assert "DPM++ 2M SDE" in notes[0] and "SGM Uniform" in notes[1]  # the nearest, named
    assert len(S.sampler_from_name("x" * 10_000)[1]) < 400  # a hostile name stays short


# --- check ------------------------------------------------------------------------------------

def test_check_refuses_unknown_names_with_the_field_and_the_choices():
    with pytest.raises(ValidationError) as e:
        S.check("Foo", "Normal")
    assert e.value.field == "sampler" and "DPM++ 2M" in str(e.value)
    with pytest.raises(ValidationError) as e:
        S.check("Euler", "Uniformly")
    assert e.value.field == "schedule" and "Karras" in str(e.value)
    for bad in (None, 3, ["Euler"]):
        with pytest.raises(ValidationError) as e:
            S.check(bad, "Normal")
        assert e.value.field == "sampler"
        with pytest.raises(ValidationError) as e:
            S.check("Euler", bad)
        assert e.value.field == "schedule"


def test_check_says_how_we_write_a_peer_name_instead_of_swapping_it():
    with pytest.raises(ValidationError) as e:
        S.check("dpmpp_2m", "Karras")
    assert e.value.field == "sampler" and "'DPM++ 2M'" in str(e.value)
    with pytest.raises(ValidationError) as e:
        S.check("Euler", "sgm_uniform")
    assert e.value.field == "schedule" and "'SGM Uniform'" in str(e.value)


def test_every_pair_passes_check_and_a_refused_pair_is_refused_with_its_reason(monkeypatch):
    for sampler, schedule in PAIRS:
        S.check(sampler, schedule)
    assert S.REFUSED == {}  # every pair runs (the grid below runs each one)
    monkeypatch.setitem(S.REFUSED, ("Heun", "Beta"), "a reason a user can act on.")
    with pytest.raises(ValidationError) as e:
        S.check("Heun", "Beta")
    assert e.value.field == "schedule" and "a reason a user can act on." in str(e.value)


def test_beta_without_scipy_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(S, "_scipy_ok", lambda: False)
    with pytest.raises(ValidationError) as e:
        S.check("Euler", "Beta")
    assert e.value.field == "schedule" and "pip install scipy" in str(e.value)


def test_defaults():
    assert S.default_schedule("Euler") == "Normal"
    assert S.default_schedule("DPM++ 2M") == "Karras"  # Forge's Automatic
    assert S.default_schedule("DPM++ 2M SDE") == "Exponential"
    for sampler in S.SAMPLERS:
        S.check(sampler, S.default_schedule(sampler))
    assert S.model_calls("Heun", 10) == 19 and S.model_calls("DPM++ 2M", 10) == 10


# --- sigmas -----------------------------------------------------------------------------------

def _comfy_reference(schedule, steps, shift):
    """ComfyUI's schedulers over ModelSamplingDiscreteFlow (comfy/model_sampling.py: 1000
    sigmas σ(t) = shift·t/(1 + (shift−1)·t) at t = 1/1000 … 1, float32), written out literally."""
    import math

    import numpy as np
    import scipy.stats
    import torch

    ts = torch.arange(1, 1001, dtype=torch.float32) / 1000
    table = shift * ts / (1 + (shift - 1) * ts)
    smin, smax = float(table[0]), float(table[-1])
    if schedule == "Simple":
        ss = len(table) / steps
        return [float(table[-(1 + int(x * ss))]) for x in range(steps)]
    if schedule == "SGM Uniform":
        t = torch.linspace(smax * 1000, smin * 1000, steps + 1)[:-1] / 1000
        return (shift * t / (1 + (shift - 1) * t)).tolist()
    if schedule == "Karras":  # k_diffusion get_sigmas_karras, rho 7
        ramp = torch.linspace(0, 1, steps)
        lo, hi = smin ** (1 / 7), smax ** (1 / 7)
        return ((hi + ramp * (lo - hi)) ** 7).tolist()
    if schedule == "Exponential":
        return torch.linspace(math.log(smax), math.log(smin), steps).exp().tolist()
    if schedule == "Beta":
        t = 1 - np.linspace(0, 1, steps, endpoint=False)
        t = np.rint(scipy.stats.beta.ppf(t, 0.6, 0.6) * 999)
        return [float(table[int(i)]) for i in t]
    if schedule == "KL Optimal":
        adj = torch.arange(steps, dtype=torch.float) / (steps - 1)
        return (adj * math.atan(smin) + (1 - adj) * math.atan(smax)).tan().tolist()
    raise KeyError(schedule)


@pytest.mark.parametrize("schedule", [s for s in S.SCHEDULES if s != "Normal"])
@pytest.mark.parametrize("steps,shift", [(4, 3.0), (28, 3.0), (40, 1.0)])
def test_schedules_are_comfyuis(schedule, steps, shift):
    ours = S.sigmas_for(schedule, steps, shift)
    ref = _comfy_reference(schedule, steps, shift)
    assert len(ours) == steps
    assert ours == pytest.approx(ref, rel=2e-5, abs=1e-6)


@pytest.mark.parametrize("steps,shift", [(1, 3.0), (4, 3.0), (28, 3.0), (50, 2.0)])
def test_normal_is_todays_schedule_to_the_bit(steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    s.set_timesteps(steps)
    assert S.sigmas_for("Normal", steps, shift) == s.sigmas[:-1].tolist()


@pytest.mark.parametrize("schedule", S.SCHEDULES)
def test_schedules_descend_from_one_and_shift_moves_them(schedule):
    for steps in (1, 2, 7, 150):
        sig = S.sigmas_for(schedule, steps, 3.0)
        assert sig[0] == pytest.approx(1.0)
        assert all(0 < b < a <= 1.0 + 1e-9 for a, b in itertools.pairwise(sig))
        assert len(sig) == steps or (schedule == "Beta" and steps > 138)  # ComfyUI's beta keeps distinct steps
    assert S.sigmas_for(schedule, 8, 1.0) != S.sigmas_for(schedule, 8, 3.0)


def test_sigmas_for_refuses_bad_steps():
    for bad in (0, -1, 2.5, "4"):
        with pytest.raises(ValidationError) as e:
            S.sigmas_for("Karras", bad)
        assert e.value.field == "steps"


# --- the solvers, on a problem with a known answer ----------------------------------------------

MU, SD = 0.5, 0.3


def _oracle(x, sigma):
    """The exact flow-matching velocity when the data is N(MU, SD²): v = (x − E[x₀|x]) / σ."""
    a = 1 - sigma
    x0 = MU + a * SD**2 / (a * a * SD**2 + sigma**2) * (x - a * MU)
    return (x - x0) / sigma


def _solve(sampler, schedule, steps, seed=1):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    g = torch.Generator().manual_seed(seed)
    s = S.scheduler_for(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
                        sampler, schedule, 3.0, generator=g)
    s.set_timesteps(steps)
    eps = torch.randn(1, 1, 64, 64, generator=g)
    x = eps.clone()
    for t in s.timesteps:
        x = s.step(_oracle(x, float(t) / 1000), t, x, return_dict=False)[0]
    return eps, x


@pytest.mark.parametrize("sampler,schedule", PAIRS)
def test_every_pair_solves_a_known_flow(sampler, schedule):
    """With the exact velocity of Gaussian data, the deterministic samplers must land on the
    probability-flow ODE's answer (MU + SD·ε), closer with more steps; the stochastic ones must
    land on the data's mean with a sane spread."""
    import torch

    if S.SAMPLER_INFO[sampler].stochastic:
        _, x = _solve(sampler, schedule, 60)
        assert torch.isfinite(x).all()
        assert abs(x.mean().item() - MU) < 0.03
        assert 0.15 < x.std().item() < 0.5
    else:
        eps, few = _solve(sampler, schedule, 12)
        _, many = _solve(sampler, schedule, 60)
        err_few = (few - (MU + SD * eps)).abs().mean().item()
        err_many = (many - (MU + SD * eps)).abs().mean().item()
        assert err_many < 0.03 and err_many < err_few < 0.1


def test_euler_a_converges_to_the_data_distribution():
    """Ancestral sampling is exact in the limit (the RF formula keeps every marginal right)."""
    _, x = _solve("Euler a", "Simple", 300)
    assert abs(x.std().item() - SD) < 0.02 and abs(x.mean().item() - MU) < 0.01


def test_the_base_scheduler_is_left_alone():
    from diffusers import FlowMatchEulerDiscreteScheduler

    base = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    before = dict(base.config)
    for sampler, schedule in PAIRS:
        built = S.scheduler_for(base, sampler, schedule, 2.0)
        assert built is not base
    assert dict(base.config) == before
    for sampler in S.SAMPLERS:  # metadata's "scheduler" names the diffusers class it runs on
        import diffusers

        built = S.scheduler_for(base, sampler, "Karras", 3.0)
        assert isinstance(built, getattr(diffusers, S.SAMPLER_INFO[sampler].diffusers))
    same = S.scheduler_for(base, "Euler", "Normal", 2.0)
    assert type(same) is FlowMatchEulerDiscreteScheduler and same.config.shift == 2.0


# --- on the tiny SD3 ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_thread():
    """The tiny model runs ~10× faster on one thread than on two contended ones."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipes(tiny_family, one_thread):
    import torch
    from diffusers import (
        StableDiffusion3Img2ImgPipeline,
        StableDiffusion3InpaintPipeline,
        StableDiffusion3Pipeline,
    )

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_family["sd3.5-medium"])
    out = {"txt2img": pipe,
           "img2img": StableDiffusion3Img2ImgPipeline.from_pipe(pipe, dtype=torch.float32),
           "inpaint": StableDiffusion3InpaintPipeline.from_pipe(pipe, dtype=torch.float32)}
    for p in out.values():
        p.set_progress_bar_config(disable=True)
    with torch.no_grad():
        embeds = pipe.encode_prompt("a red fox", None, None, negative_prompt="", do_classifier_free_guidance=True)
    return out, embeds


def _generate(pipes, sampler, schedule, seeds=(1,), mode="txt2img", steps=4, size=256, **extra):
    import torch

    out, (pe, npe, ppe, nppe) = pipes
    pipe = out[mode]
    base = pipe.scheduler
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    calls = []
    pipe.scheduler = S.scheduler_for(base, sampler, schedule, 3.0, generator=gens)
    try:
        n = len(seeds)
        return pipe(prompt_embeds=pe.repeat(n, 1, 1), negative_prompt_embeds=npe.repeat(n, 1, 1),
                    pooled_prompt_embeds=ppe.repeat(n, 1), negative_pooled_prompt_embeds=nppe.repeat(n, 1),
                    num_inference_steps=steps, height=size, width=size, generator=gens, guidance_scale=4.0,
                    output_type=extra.pop("output_type", "latent"),
                    callback_on_step_end=lambda p, i, t, kw: calls.append(float(t)) or {}, **extra).images, calls
    finally:
        pipe.scheduler = base


@pytest.fixture(scope="module")
def reference(pipes):
    return _generate(pipes, "Euler", "Normal")[0]


def test_euler_normal_is_todays_image(pipes, reference):
    import torch

    out, (pe, npe, ppe, nppe) = pipes
    today = out["txt2img"](prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=ppe,
                           negative_pooled_prompt_embeds=nppe, num_inference_steps=4, height=256, width=256,
                           generator=[torch.Generator().manual_seed(1)], guidance_scale=4.0,
                           output_type="latent").images
    assert torch.equal(today, reference)


@pytest.mark.parametrize("sampler,schedule", PAIRS)
def test_every_pair_runs_on_sd3_and_changes_the_image(pipes, reference, sampler, schedule):
    import torch

    latents, calls = _generate(pipes, sampler, schedule)
    assert torch.isfinite(latents).all()
    assert len(calls) == S.model_calls(sampler, 4)
    if (sampler, schedule) != ("Euler", "Normal"):
        assert (latents - reference).abs().mean() > 1e-3


def test_a_schedule_changes_the_pixels(pipes):
    import numpy as np

    a = np.asarray(_generate(pipes, "Euler", "Normal", output_type="pil")[0][0])
    b = np.asarray(_generate(pipes, "Euler", "Karras", output_type="pil")[0][0])
    assert a.shape == b.shape == (256, 256, 3) and (a != b).any()


@pytest.mark.parametrize("sampler", ["Euler", *(s for s in S.SAMPLERS if S.SAMPLER_INFO[s].stochastic)])
def test_identical_seeds_reproduce_and_other_seeds_differ(pipes, sampler):
    import torch

    schedule = S.default_schedule(sampler)
    a = _generate(pipes, sampler, schedule, seeds=(7,))[0]
    b = _generate(pipes, sampler, schedule, seeds=(7,))[0]
    c = _generate(pipes, sampler, schedule, seeds=(8,))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("sampler", [s for s in S.SAMPLERS if S.SAMPLER_INFO[s].stochastic])
def test_stochastic_samplers_draw_each_images_noise_from_its_own_seed(pipes, sampler):
    """A seed gives the same image alone or in a batch: the per-step noise comes from that image's
    generator, not from torch's global one (which the pipelines would use)."""
    import torch

    alone = _generate(pipes, sampler, "Simple", seeds=(9,))[0]
    torch.manual_seed(12345)  # the global generator must not matter
    batch = _generate(pipes, sampler, "Simple", seeds=(5, 9))[0]
    assert torch.allclose(batch[1:], alone, atol=1e-5)


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
@pytest.mark.parametrize("sampler", S.SAMPLERS)
def test_every_sampler_runs_img2img_and_inpaint_with_strength(pipes, sampler, mode):
    import numpy as np
    import torch
    from PIL import Image

    init = Image.fromarray((np.random.default_rng(0).random((128, 128, 3)) * 255).astype("uint8"))
    extra = {"image": init, "strength": 0.5}
    if mode == "inpaint":
        mask = Image.new("L", (128, 128), 0)
        mask.paste(255, (32, 32, 96, 96))
        extra["mask_image"] = mask
    schedule = S.default_schedule(sampler) if mode == "img2img" else "Beta"
    latents, calls = _generate(pipes, sampler, schedule, mode=mode, steps=6, size=128, **extra)
    assert torch.isfinite(latents).all()
    # strength 0.5 of 6 steps: the last 3 (Heun: 2·3 − 1 evaluations), from the schedule's 4th sigma
    assert len(calls) == S.model_calls(sampler, 3)
    assert calls[0] == pytest.approx(S.sigmas_for(schedule, 6, 3.0)[3] * 1000, rel=1e-4, abs=1e-3)
