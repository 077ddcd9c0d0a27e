"""Samplers and schedules for SD3's flow-matching models, named as Forge and A1111 write them.

A *sampler* is the solver that walks from noise to image (Euler, DPM++ 2M, ...); a *schedule* is
the list of noise levels (sigmas) it walks through. Forge and ComfyUI split them the same way:
Forge writes ``Sampler: DPM++ 2M, Schedule type: Karras`` in its infotext, ComfyUI's KSampler
takes ``sampler_name="dpmpp_2m", scheduler="karras"``. Our names are Forge's labels.

Every scheduler is built from the pipeline's scheduler config (``num_train_timesteps``), never by
reloading the model, and every schedule means the same sigmas for every sampler: the sigmas are
computed here, once, the way ComfyUI's ``ModelSamplingDiscreteFlow`` defines them for SD3
(``σ(t) = shift·t / (1 + (shift−1)·t)`` over 1000 training timesteps), and the scheduler walks
them. The shift is applied here, for every schedule, so it stays one control.

=================  =========================================================================
sampler            what runs
=================  =========================================================================
Euler              diffusers' ``FlowMatchEulerDiscreteScheduler`` (what SD3 ships with)
Euler a            Euler ancestral for flow models, as ComfyUI's and Forge's
                   ``sample_euler_ancestral_RF`` (η = 1): step below the next sigma, add fresh
                   noise back up to it
Heun               ``FlowMatchHeunDiscreteScheduler``: 2nd order, two model calls a step
                   (``2·steps − 1`` in all)
DPM++ 2M           ``DPMSolverMultistepScheduler`` (``dpmsolver++``, order 2) on flow sigmas
DPM++ 2M SDE       the same with ``sde-dpmsolver++`` (fresh noise every step)
DPM++ 2M SDE Heun  ``sde-dpmsolver++`` with ``solver_type="heun"``
UniPC              ``UniPCMultistepScheduler`` (bh2) on flow sigmas
DEIS               ``DEISMultistepScheduler`` on flow sigmas; its last step lands on x₀ (see
                   ``_X0AtZero``)
LCM                ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``: each step
                   predicts x₀ and re-noises it to the next sigma with fresh noise — what
                   ComfyUI's ``lcm`` does on a flow model (alias: "Euler stochastic")
=================  =========================================================================

==============  ===========================================================================
schedule        sigmas (n steps, then 0)
==============  ===========================================================================
Normal          diffusers' own spacing: timesteps evenly from σ_max to σ_min, shifted —
                exactly today's default (and ComfyUI's ``normal``); Euler + Normal is the
                scheduler SD3 ships with, untouched
Simple          ComfyUI's/Forge's ``simple``: every (1000/n)-th training sigma from the top,
                i.e. t = 1, 1 − 1/n, …, 1/n
SGM Uniform     ``sgm_uniform``: n + 1 evenly spaced timesteps from σ_max to σ_min, last dropped
Karras          Karras et al. (ρ = 7) between σ_min and σ_max
Exponential     evenly spaced in log σ between σ_max and σ_min
Beta            Beta(0.6, 0.6) quantiles of the training timesteps (arXiv 2407.12173), as
                ComfyUI's ``beta`` (needs scipy)
KL Optimal      tan-spaced between σ_max and σ_min (A1111 PR 15608, ComfyUI ``kl_optimal``)
==============  ===========================================================================

σ_max = σ(1) = 1 and σ_min = σ(1/1000) for the shift in use (0.00299 at shift 3).

The seams with diffusers, each small and said where it is done:

- the SD3 pipelines call ``scheduler.set_timesteps(steps)`` themselves; our schedulers carry
  their schedule and walk it there. Nothing is passed as ``sigmas=`` to the pipeline: on that
  path diffusers counts Heun's doubled timesteps as steps, and img2img's ``strength`` would cut
  the wrong number of them (``get_timesteps``).
- img2img and inpaint noise the init latents with ``scheduler.scale_noise``, which only the
  flow-match schedulers have; the multistep solvers get the same flow forward process here.
- the pipelines never pass a ``generator`` to ``scheduler.step``: the stochastic samplers take
  the run's generators from ``scheduler_for(..., generator=)``, so a seed reproduces its image.
- the multistep solvers' first sigma is held just below 1 (1 − 1e-6), as diffusers' UniPC does
  for flow sigmas, so ``log(α) = log(1 − σ)`` stays finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from studio.errors import ValidationError

DEFAULT_SAMPLER = "Euler"
DEFAULT_SCHEDULE = "Normal"  # today's spacing: the scheduler SD3 ships with


@dataclass(frozen=True)
class SamplerInfo:
    """One sampler: our (Forge's) name, the ComfyUI name of the same algorithm, whether it draws
    noise, model calls per step, and the diffusers scheduler it runs on."""
    name: str  # ours: Forge's label
    comfy: str  # the ComfyUI sampler_name that runs the same algorithm
    stochastic: bool  # draws fresh noise every step (the seed still reproduces it)
    calls_per_step: int  # model evaluations per step (Heun: 2, less one at the end)
    about: str
    diffusers: str  # the diffusers scheduler class it runs on (metadata's "scheduler")


@dataclass(frozen=True)
class ScheduleInfo:
    """One sigma schedule: our name, the ComfyUI scheduler name, and what it does."""
    name: str
    comfy: str
    about: str


_SAMPLERS = (
    SamplerInfo("Euler", "euler", False, 1, "first-order flow-matching Euler: SD3's own sampler",
                "FlowMatchEulerDiscreteScheduler"),
    SamplerInfo("Euler a", "euler_ancestral", True, 1,
                "Euler ancestral for flow models (η = 1): adds fresh noise each step; images keep changing with steps",
                "FlowMatchEulerDiscreteScheduler"),
    SamplerInfo("Heun", "heun", False, 2, "second order: two model calls a step, sharper at few steps",
                "FlowMatchHeunDiscreteScheduler"),
    SamplerInfo("DPM++ 2M", "dpmpp_2m", False, 1, "second-order multistep DPM-Solver++",
                "DPMSolverMultistepScheduler"),
    SamplerInfo("DPM++ 2M SDE", "dpmpp_2m_sde", True, 1, "DPM-Solver++ 2M, stochastic (midpoint)",
                "DPMSolverMultistepScheduler"),
    SamplerInfo("DPM++ 2M SDE Heun", "dpmpp_2m_sde_heun", True, 1, "DPM-Solver++ 2M, stochastic (Heun)",
                "DPMSolverMultistepScheduler"),
    SamplerInfo("UniPC", "uni_pc_bh2", False, 1, "UniPC predictor-corrector (bh2)", "UniPCMultistepScheduler"),
    SamplerInfo("DEIS", "deis", False, 1, "DEIS multistep (order 2)", "DEISMultistepScheduler"),
    SamplerInfo("LCM", "lcm", True, 1,
                "predict the image, re-noise it to the next level (diffusers' stochastic Euler); suits Turbo",
                "FlowMatchEulerDiscreteScheduler"),
)
_SCHEDULES = (
    ScheduleInfo("Normal", "normal", "evenly spaced timesteps, shifted: SD3's default"),
    ScheduleInfo("Simple", "simple", "every n-th training sigma from the top (ComfyUI's default)"),
    ScheduleInfo("SGM Uniform", "sgm_uniform", "evenly spaced timesteps, the last one dropped"),
    ScheduleInfo("Karras", "karras", "more steps at low noise (ρ = 7)"),
    ScheduleInfo("Exponential", "exponential", "evenly spaced in log σ"),
    ScheduleInfo("Beta", "beta", "Beta(0.6, 0.6): more steps at both ends"),
    ScheduleInfo("KL Optimal", "kl_optimal", "tan-spaced (KL-optimal)"),
)

SAMPLERS: tuple[str, ...] = tuple(s.name for s in _SAMPLERS)
SCHEDULES: tuple[str, ...] = tuple(s.name for s in _SCHEDULES)
SAMPLER_INFO: dict[str, SamplerInfo] = {s.name: s for s in _SAMPLERS}
SCHEDULE_INFO: dict[str, ScheduleInfo] = {s.name: s for s in _SCHEDULES}

# The schedule a sampler gets when the request names none (as Forge's "Automatic"): Forge's
# own choice where it makes one (Karras for DPM++ 2M, Exponential for the SDE variants), Simple
# for UniPC and DEIS (what diffusers itself walks for them on flow sigmas: t = 1 … 1/n), Normal
# (today's) for the rest. DPM++ 2M and UniPC over Normal take a large last step (σ 0.1 → 0.009 at
# 30 steps) that their second-order extrapolation handles badly.
_DEFAULT_SCHEDULES = {"DPM++ 2M": "Karras", "DPM++ 2M SDE": "Exponential", "DPM++ 2M SDE Heun": "Exponential",
                      "UniPC": "Simple", "DEIS": "Simple"}


def default_schedule(sampler: str) -> str:
    """The schedule ``sampler`` runs with when none is chosen (Euler: Normal, today's)."""
    return _DEFAULT_SCHEDULES.get(sampler, DEFAULT_SCHEDULE)


# Pairs diffusers cannot run for SD3, each with its reason. Every other pair of the two lists
# runs, in txt2img, img2img and inpaint (tests/test_samplers.py runs every one).
REFUSED: dict[tuple[str, str], str] = {}

BETA_ALPHA = BETA_BETA = 0.6  # ComfyUI's and Forge's defaults
KARRAS_RHO = 7.0
_FIRST_SIGMA_CAP = 1.0 - 1e-6  # multistep solvers: keep log(1 - σ) finite (diffusers' UniPC does the same)


# ---------------------------------------------------------------------------------------------
# Names: ours ⇄ A1111/Forge infotext ⇄ ComfyUI


def _key(name: str) -> str:
    return " ".join(str(name).strip().lower().replace("_", " ").split())


# Exact counterparts: A1111/Forge labels and aliases, ComfyUI names, a few spellings.
_SAMPLER_ALIASES = {
    "Euler": ("k_euler", "euler", "ddim"),
    "Euler a": ("k_euler_a", "k_euler_ancestral", "euler_ancestral", "euler ancestral", "euler_a"),
    "Heun": ("k_heun", "heun"),
    "DPM++ 2M": ("k_dpmpp_2m", "dpmpp_2m", "dpm++2m", "dpmpp 2m"),
    "DPM++ 2M SDE": ("k_dpmpp_2m_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu"),
    "DPM++ 2M SDE Heun": ("k_dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu"),
    "UniPC": ("unipc", "uni_pc_bh2", "uni_pc", "uni pc"),
    "DEIS": ("deis",),
    "LCM": ("k_lcm", "lcm", "euler stochastic", "euler_stochastic"),
}
# What a name maps onto but is not quite: said in the note.
_SAMPLER_NOTES = {
    "ddim": "DDIM on a flow-matching model is the Euler step; mapped to Euler.",
    "uni_pc": "ComfyUI's uni_pc is UniPC's bh1 variant; mapped to UniPC (bh2), which differs slightly.",
    "dpmpp_2m_sde_gpu": "ComfyUI draws this sampler's noise from a Brownian tree on the GPU; "
                        "the sampler is the same, the noise (and so the image) differs.",
    "dpmpp_2m_sde_heun_gpu": "ComfyUI draws this sampler's noise from a Brownian tree on the GPU; "
                             "the sampler is the same, the noise (and so the image) differs.",
}
# Known names with no counterpart here, and the nearest one we have (None: nothing near).
_SAMPLER_NEAREST = {
    "dpm++ sde": "DPM++ 2M SDE", "dpmpp sde": "DPM++ 2M SDE", "dpmpp sde gpu": "DPM++ 2M SDE",
    "dpm++ 2s a": "Euler a", "dpmpp 2s ancestral": "Euler a", "dpmpp 2s ancestral cfg pp": "Euler a",
    "dpm++ 3m sde": "DPM++ 2M SDE", "dpmpp 3m sde": "DPM++ 2M SDE", "dpmpp 3m sde gpu": "DPM++ 2M SDE",
    "dpm2": "Heun", "dpm 2": "Heun", "dpm2 a": "Euler a", "dpm 2 ancestral": "Euler a",
    "lms": "DPM++ 2M", "dpm fast": "DPM++ 2M", "dpm adaptive": "DPM++ 2M", "restart": "Heun",
    "heunpp2": "Heun", "ipndm": "DPM++ 2M", "ipndm v": "DPM++ 2M", "plms": "DPM++ 2M",
    "ddim cfg++": "Euler", "euler cfg pp": "Euler", "euler ancestral cfg pp": "Euler a",
    "dpmpp 2m cfg pp": "DPM++ 2M", "ddpm": "LCM", "res multistep": "DPM++ 2M",
    "res multistep cfg pp": "DPM++ 2M", "res multistep ancestral": "Euler a",
    "res multistep ancestral cfg pp": "Euler a", "gradient estimation": "Euler",
    "gradient estimation cfg pp": "Euler", "er sde": "DPM++ 2M SDE", "seeds 2": "DPM++ 2M SDE",
    "seeds 3": "DPM++ 2M SDE", "sa solver": "UniPC", "sa solver pece": "UniPC", "exp heun 2 x0": "Heun",
    "exp heun 2 x0 sde": "DPM++ 2M SDE Heun", "cfgpp ud10 ab": "Euler",
}

_SCHEDULE_ALIASES = {
    "Normal": ("normal",),
    "Simple": ("simple",),
    "SGM Uniform": ("sgm_uniform", "sgmuniform", "sgm uniform"),
    "Karras": ("karras",),
    "Exponential": ("exponential",),
    "Beta": ("beta",),
    "KL Optimal": ("kl_optimal", "kl optimal"),
}
_SCHEDULE_NOTES = {
    "uniform": "Uniform (A1111's default for Euler) spaces timesteps from 1 to 1/1000, Normal from 1 to "
               "σ_min (0.003 at shift 3): nearly the same; mapped to Normal.",
}
_SCHEDULE_APPROX = {"uniform": "Normal"}
_SCHEDULE_NEAREST = {
    "polyexponential": "Exponential", "align your steps": "Karras", "align your steps gits": "Karras",
    "align your steps 11": "Karras", "align your steps 32": "Karras", "ddim": "SGM Uniform",
    "ddim uniform": "SGM Uniform", "turbo": "SGM Uniform", "linear quadratic": "Normal",
    "karras exponential": "Karras", "bong tangent": "Beta",
}

# Forge's "Automatic" schedule: the sampler's own default (its samplers table, "scheduler"
# option); samplers without one take the model's uniform spacing, nearest here to Normal.
_AUTOMATIC = {"DPM++ 2M": "Karras", "DPM++ 2M SDE": "Exponential", "DPM++ 2M SDE Heun": "Exponential"}


def _index(aliases: dict[str, tuple[str, ...]]) -> dict[str, str]:
    out = {}
    for ours, names in aliases.items():
        out[_key(ours)] = ours
        for n in names:
            out[_key(n)] = ours
    return out


_SAMPLER_INDEX = _index(_SAMPLER_ALIASES)
_SCHEDULE_INDEX = _index(_SCHEDULE_ALIASES) | {_key(k): v for k, v in _SCHEDULE_APPROX.items()}


def sampler_from_name(name: str | None) -> tuple[str | None, str]:
    """Our sampler for a name written by A1111/Forge (``DPM++ 2M``, ``k_euler_a``), ComfyUI
    (``dpmpp_2m``) or us; case and ``_``/space do not matter. Returns ``(ours, note)``: the note is
    empty for an exact match, says what differs for a near one, and for an unknown name ``ours``
    is None and the note says so (with the nearest sampler we have, where there is one)."""
    if name is None or not str(name).strip():
        return DEFAULT_SAMPLER, ""
    key = _key(name)
    ours = _SAMPLER_INDEX.get(key)
    if ours is not None:
        return ours, _SAMPLER_NOTES.get(key.replace(" ", "_"), "")
    nearest = _SAMPLER_NEAREST.get(key)
    hint = f" The nearest here is {nearest}." if nearest else ""
    return None, (f"Sampler {str(name)[:60]!r} is not available for SD3 here.{hint} "
                  f"Available: {', '.join(SAMPLERS)}.")


def schedule_from_name(name: str | None) -> tuple[str | None, str]:
    """Our schedule for a Forge label (``Karras``, ``SGM Uniform``), a ComfyUI scheduler name
    (``sgm_uniform``) or ours; as :func:`sampler_from_name`. ``Automatic`` (and no name) is
    :data:`DEFAULT_SCHEDULE` here; use :func:`from_infotext` where the sampler decides it."""
    if name is None or not str(name).strip() or _key(name) == "automatic":
        return DEFAULT_SCHEDULE, ""
    key = _key(name)
    ours = _SCHEDULE_INDEX.get(key)
    if ours is not None:
        return ours, _SCHEDULE_NOTES.get(key, "")
    nearest = _SCHEDULE_NEAREST.get(key)
    hint = f" The nearest here is {nearest}." if nearest else ""
    return None, (f"Schedule {str(name)[:60]!r} is not available for SD3 here.{hint} "
                  f"Available: {', '.join(SCHEDULES)}.")


def from_infotext(sampler: str | None, schedule: str | None = None) -> tuple[str | None, str | None, list[str]]:
    """``Sampler`` and ``Schedule type`` of an A1111/Forge infotext → ``(sampler, schedule, notes)``.

    As A1111's ``get_sampler_and_scheduler``: an old-style combined name (``DPM++ 2M Karras``)
    carries its schedule as a suffix, and that suffix wins; ``Automatic`` or no schedule means the
    sampler's own default (Karras for DPM++ 2M, Exponential for the SDE ones, the uniform spacing
    — here Normal — for the rest). Either may come back None, with its note."""
    notes: list[str] = []
    name = str(sampler).strip() if sampler is not None else ""
    suffix_schedule = None
    labels = sorted({*SCHEDULES, *(a for names in _SCHEDULE_ALIASES.values() for a in names),
                     "Uniform", "Automatic"}, key=len, reverse=True)
    for label in labels:
        if name.lower().endswith(" " + label.lower()) and name[: -len(label) - 1].strip():
            suffix_schedule, name = label, name[: -len(label) - 1].strip()
            break
    ours, note = sampler_from_name(name or None)
    if note:
        notes.append(note)
    wanted = suffix_schedule or schedule
    if wanted is None or not str(wanted).strip() or _key(wanted) == "automatic":
        sched = _AUTOMATIC.get(ours or "", DEFAULT_SCHEDULE)
        snote = ""
    else:
        sched, snote = schedule_from_name(wanted)
    if snote:
        notes.append(snote)
    return ours, sched, notes


def from_comfy(sampler_name: str | None, scheduler: str | None) -> tuple[str | None, str | None, list[str]]:
    """ComfyUI KSampler's ``sampler_name`` and ``scheduler`` → ``(sampler, schedule, notes)``."""
    ours, note = sampler_from_name(sampler_name)
    sched, snote = schedule_from_name(scheduler)
    return ours, sched, [n for n in (note, snote) if n]


def to_infotext(sampler: str, schedule: str) -> dict[str, str]:
    """The A1111/Forge infotext entries for a pair: ``{"Sampler": ..., "Schedule type": ...}``."""
    check(sampler, schedule)
    return {"Sampler": sampler, "Schedule type": schedule}


def to_comfy(sampler: str, schedule: str) -> tuple[str, str]:
    """ComfyUI's ``(sampler_name, scheduler)`` for a pair."""
    check(sampler, schedule)
    return SAMPLER_INFO[sampler].comfy, SCHEDULE_INFO[schedule].comfy


# ---------------------------------------------------------------------------------------------
# Checking


def _scipy_ok() -> bool:
    try:
        import scipy.stats  # noqa: F401
    except ImportError:
        return False
    return True


def check(sampler, schedule) -> None:
    """Refuse a sampler or schedule that does not exist here, or a pair that cannot run, with a
    :class:`ValidationError` naming the field (``sampler`` / ``schedule``), the reason and the
    choices. Never swaps one for another."""
    if not isinstance(sampler, str) or sampler not in SAMPLER_INFO:
        near, _ = sampler_from_name(sampler) if isinstance(sampler, str) else (None, "")
        if near is not None:
            raise ValidationError(f"Sampler {sampler!r} is written {near!r} here.", "sampler")
        raise ValidationError(f"Unknown sampler {str(sampler)[:60]!r}. Choose one of: {', '.join(SAMPLERS)}.",
                              "sampler")
    if not isinstance(schedule, str) or schedule not in SCHEDULE_INFO:
        near, _ = schedule_from_name(schedule) if isinstance(schedule, str) and schedule.strip() else (None, "")
        if near is not None:
            raise ValidationError(f"Schedule {schedule!r} is written {near!r} here.", "schedule")
        raise ValidationError(f"Unknown schedule {str(schedule)[:60]!r}. Choose one of: {', '.join(SCHEDULES)}.",
                              "schedule")
    reason = REFUSED.get((sampler, schedule))
    if reason:
        raise ValidationError(f"{sampler} cannot run with the {schedule} schedule: {reason}", "schedule")
    if schedule == "Beta" and not _scipy_ok():
        raise ValidationError("The Beta schedule needs scipy, which is not installed: `pip install scipy`, "
                              "or pick another schedule.", "schedule")


def model_calls(sampler: str, steps: int) -> int:
    """How many transformer evaluations ``steps`` cost with ``sampler`` (per image, CFG aside)."""
    return steps if SAMPLER_INFO[sampler].calls_per_step == 1 else 2 * steps - 1


# ---------------------------------------------------------------------------------------------
# Schedules: n sigmas, descending, without the final 0


def _shifted(t, shift: float):
    return shift * t / (1.0 + (shift - 1.0) * t)


@lru_cache(maxsize=256)
def _sigmas_cached(schedule: str, steps: int, shift: float, n_train: int) -> tuple[float, ...]:
    import numpy as np

    sigma_max = 1.0  # σ(1)
    sigma_min = _shifted(1.0 / n_train, shift)  # σ(1/N): the lowest training sigma
    if schedule == "Normal":
        return _normal(steps, shift, n_train)
    if schedule == "Simple":  # ComfyUI simple_scheduler: sigmas[-(1 + int(x * N / n))]
        ss = n_train / steps
        idx = [n_train - 1 - int(x * ss) for x in range(steps)]
        out = _shifted((np.asarray(idx, dtype=np.float64) + 1) / n_train, shift)
    elif schedule == "SGM Uniform":  # normal_scheduler(sgm=True): linspace(t_max, t_min, n + 1)[:-1]
        ts = np.linspace(sigma_max * n_train, sigma_min * n_train, steps + 1)[:-1]
        out = _shifted(ts / n_train, shift)
    elif schedule == "Karras":
        ramp = np.linspace(0, 1, steps)
        lo, hi = sigma_min ** (1 / KARRAS_RHO), sigma_max ** (1 / KARRAS_RHO)
        out = (hi + ramp * (lo - hi)) ** KARRAS_RHO
    elif schedule == "Exponential":
        out = np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), steps))
    elif schedule == "Beta":  # ComfyUI beta_scheduler, on the training timesteps 0..N-1
        import scipy.stats

        ts = 1 - np.linspace(0, 1, steps, endpoint=False)
        idx = np.rint(scipy.stats.beta.ppf(ts, BETA_ALPHA, BETA_BETA) * (n_train - 1))
        out = _shifted((idx + 1) / n_train, shift)
    elif schedule == "KL Optimal":
        adj = np.arange(steps, dtype=np.float64) / max(steps - 1, 1)
        out = np.tan(adj * math.atan(sigma_min) + (1 - adj) * math.atan(sigma_max))
    else:
        raise KeyError(schedule)
    return tuple(float(s) for s in out)


def _normal(steps: int, shift: float, n_train: int) -> tuple[float, ...]:
    """Today's sigmas, from the scheduler SD3 ships with (so Normal is today's to the bit)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=n_train, shift=shift)
    s.set_timesteps(steps)
    return tuple(float(v) for v in s.sigmas[:-1])


def sigmas_for(schedule: str, steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> list[float]:
    """The ``steps`` sigmas a schedule walks (descending, the final 0 not included).

    ComfyUI's ``beta`` keeps only distinct training timesteps, so a Beta schedule at many steps
    can have fewer sigmas than steps; every other schedule has exactly ``steps``."""
    check(DEFAULT_SAMPLER, schedule)
    if not isinstance(steps, int) or steps < 1:
        raise ValidationError(f"Steps must be a whole number of at least 1, not {steps!r}.", "steps")
    out = list(_sigmas_cached(schedule, steps, float(shift), int(num_train_timesteps)))
    if schedule == "Beta":  # distinct, as ComfyUI keeps them
        out = [s for i, s in enumerate(out) if i == 0 or s != out[i - 1]]
    return out


# ---------------------------------------------------------------------------------------------
# Schedulers


def scheduler_for(base_scheduler, sampler: str, schedule: str, shift: float, generator=None):
    """A scheduler that runs ``sampler`` over ``schedule`` at ``shift``, for an SD3 pipeline.

    Built from ``base_scheduler``'s config (the loaded pipeline's ``FlowMatchEulerDiscreteScheduler``):
    nothing is loaded. Assign it to ``pipe.scheduler`` for the run and put the base one back after;
    call the pipeline as before (the schedule travels inside the scheduler — pass no ``sigmas=``).
    ``generator``: the run's generator(s), the same ones passed to the pipeline, from which the
    stochastic samplers draw their per-step noise (the others ignore it). Euler + Normal is the
    base scheduler's own class and config with the shift: today's scheduler exactly.
    """
    check(sampler, schedule)
    config = dict(base_scheduler.config)
    n_train = int(config.get("num_train_timesteps", 1000))
    shift = float(shift)
    if sampler == "Euler" and schedule == "Normal":
        return type(base_scheduler).from_config(base_scheduler.config, shift=shift)

    def fn(steps: int):
        return sigmas_for(schedule, int(steps), shift, n_train)

    sched = _build(sampler, n_train)
    sched.studio_sigmas = fn
    sched.studio_sampler, sched.studio_schedule, sched.studio_shift = sampler, schedule, shift
    if SAMPLER_INFO[sampler].stochastic:
        sched.noise_generator = generator
    return sched


def _classes():
    """The scheduler classes (diffusers imported only when a scheduler is built)."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _define_classes()
    return _CLASSES


_CLASSES = None


def _build(sampler: str, n_train: int):
    c = _classes()
    flow = {"num_train_timesteps": n_train, "use_flow_sigmas": True, "prediction_type": "flow_prediction",
            "flow_shift": 1.0}
    if sampler == "Euler":
        return c["euler"](num_train_timesteps=n_train, shift=1.0)
    if sampler == "LCM":
        return c["euler"](num_train_timesteps=n_train, shift=1.0, stochastic_sampling=True)
    if sampler == "Euler a":
        return c["euler_a"](num_train_timesteps=n_train, shift=1.0)
    if sampler == "Heun":
        return c["heun"](num_train_timesteps=n_train, shift=1.0)
    if sampler == "DPM++ 2M":
        return c["dpm"](**flow, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")
    if sampler == "DPM++ 2M SDE":
        return c["dpm"](**flow, algorithm_type="sde-dpmsolver++", solver_order=2, final_sigmas_type="zero")
    if sampler == "DPM++ 2M SDE Heun":
        return c["dpm"](**flow, algorithm_type="sde-dpmsolver++", solver_order=2, solver_type="heun",
                        final_sigmas_type="zero")
    if sampler == "UniPC":
        return c["unipc"](**flow, solver_order=2, solver_type="bh2", final_sigmas_type="zero")
    if sampler == "DEIS":
        return c["deis"](**flow, solver_order=2)
    raise KeyError(sampler)


def _define_classes() -> dict:
    import numpy as np
    import torch
    from diffusers import (
        DEISMultistepScheduler,
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        FlowMatchHeunDiscreteScheduler,
        UniPCMultistepScheduler,
    )
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
        FlowMatchEulerDiscreteSchedulerOutput,
    )
    from diffusers.utils.torch_utils import randn_tensor

    class _Seeded:
        """``step`` draws its noise from the run's generators (the pipelines pass none)."""

        noise_generator = None

        def step(self, *args, **kwargs):
            if kwargs.get("generator") is None and self.noise_generator is not None:
                kwargs["generator"] = self.noise_generator
            return super().step(*args, **kwargs)

    class StudioEuler(_Seeded, FlowMatchEulerDiscreteScheduler):
        """Flow-match Euler walking ``studio_sigmas(steps)`` (already shifted: config shift 1)."""

        studio_sigmas = None

        def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
            if sigmas is None and timesteps is None and self.studio_sigmas is not None:
                sigmas, num_inference_steps = self.studio_sigmas(num_inference_steps), None
            super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)

    class StudioEulerAncestral(StudioEuler):
        """Euler ancestral for flow models: ComfyUI's/Forge's ``sample_euler_ancestral_RF``, η = 1."""

        eta = 1.0
        s_noise = 1.0

        def step(self, model_output, timestep, sample, *args, generator=None, return_dict=True, **kwargs):
            if self.step_index is None:
                self._init_step_index(timestep)
            generator = generator if generator is not None else self.noise_generator
            x = sample.to(torch.float32)
            sigma = float(self.sigmas[self.step_index])
            sigma_next = float(self.sigmas[self.step_index + 1])
            denoised = x - sigma * model_output.to(torch.float32)
            if sigma_next == 0:
                x = denoised
            else:
                downstep_ratio = 1 + (sigma_next / sigma - 1) * self.eta
                sigma_down = sigma_next * downstep_ratio
                alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
                renoise = max(sigma_next**2 - sigma_down**2 * alpha_next**2 / alpha_down**2, 0.0) ** 0.5
                ratio = sigma_down / sigma
                x = ratio * x + (1 - ratio) * denoised
                noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = (alpha_next / alpha_down) * x + noise * self.s_noise * renoise
            self._step_index += 1
            x = x.to(model_output.dtype)
            return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=x) if return_dict else (x,)

    class StudioHeun(FlowMatchHeunDiscreteScheduler):
        """Flow-match Heun walking ``studio_sigmas(steps)``, laid out as diffusers' Heun lays out
        its own: every sigma after the first twice, one evaluation for each."""

        studio_sigmas = None

        def set_timesteps(self, num_inference_steps, device=None):
            if self.studio_sigmas is None:
                return super().set_timesteps(num_inference_steps, device=device)
            sig = torch.tensor(self.studio_sigmas(num_inference_steps), dtype=torch.float32, device=device)
            self.num_inference_steps = len(sig)
            timesteps = sig * self.config.num_train_timesteps
            self.timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)]).to(device=device)
            sig = torch.cat([sig, torch.zeros(1, device=sig.device)])
            self.sigmas = torch.cat([sig[:1], sig[1:-1].repeat_interleave(2), sig[-1:]]).to("cpu")
            self.prev_derivative = None
            self.dt = None
            self._step_index = None
            self._begin_index = None

    class _FlowMultistep:
        """A diffusers multistep solver (use_flow_sigmas) walking ``studio_sigmas(steps)``, with
        the flow forward process ``scale_noise`` that SD3's img2img and inpaint pipelines call."""

        studio_sigmas = None

        def set_timesteps(self, num_inference_steps=None, device=None, mu=None, timesteps=None, **_):
            super().set_timesteps(num_inference_steps, device=device)  # resets the solver's state
            sig = np.asarray(self.studio_sigmas(num_inference_steps), dtype=np.float64)
            sig[0] = min(sig[0], _FIRST_SIGMA_CAP)
            self.sigmas = torch.from_numpy(np.append(sig, 0.0).astype(np.float32))
            self.timesteps = torch.from_numpy((sig * self.config.num_train_timesteps).astype(np.float32)).to(device)
            self.num_inference_steps = len(sig)
            self.model_outputs = [None] * self.config.solver_order
            self.lower_order_nums = 0
            self._step_index = None
            self._begin_index = None

        def scale_noise(self, sample, timestep, noise=None):
            """Flow matching's forward process, indexed as FlowMatchEulerDiscreteScheduler does."""
            if self.begin_index is None:
                schedule = self.timesteps.to(sample.device)
                indices = [self.index_for_timestep(t, schedule) for t in timestep.to(sample.device)]
            elif self.step_index is not None:
                indices = [self.step_index] * timestep.shape[0]  # inpaint: after a step
            else:
                indices = [self.begin_index] * timestep.shape[0]  # img2img: before the first step
            sigma = self.sigmas.to(device=sample.device, dtype=sample.dtype)[indices].flatten()
            while sigma.ndim < sample.ndim:
                sigma = sigma.unsqueeze(-1)
            return sigma * noise + (1.0 - sigma) * sample

    class _X0AtZero:
        """The step onto σ = 0 returns the model's x₀ (k-diffusion's and ComfyUI's rule). DEIS's
        own formula multiplies σ = 0 by an infinite factor there, which is why diffusers never
        lets DEIS reach 0; with this its images finish denoised like every other sampler's."""

        def step(self, model_output, timestep, sample, *args, return_dict=True, **kwargs):
            if self.step_index is None:
                self._init_step_index(timestep)
            if float(self.sigmas[self.step_index + 1]) != 0:
                return super().step(model_output, timestep, sample, *args, return_dict=return_dict, **kwargs)
            x0 = (sample.to(torch.float32) - self.sigmas[self.step_index] * model_output.to(torch.float32))
            x0 = x0.to(model_output.dtype)
            self._step_index += 1
            from diffusers.schedulers.scheduling_utils import SchedulerOutput

            return SchedulerOutput(prev_sample=x0) if return_dict else (x0,)

    class StudioDPMSolver(_Seeded, _FlowMultistep, DPMSolverMultistepScheduler):
        pass

    class StudioUniPC(_FlowMultistep, UniPCMultistepScheduler):
        pass

    class StudioDEIS(_X0AtZero, _FlowMultistep, DEISMultistepScheduler):
        pass

    return {"euler": StudioEuler, "euler_a": StudioEulerAncestral, "heun": StudioHeun,
            "dpm": StudioDPMSolver, "unipc": StudioUniPC, "deis": StudioDEIS}
