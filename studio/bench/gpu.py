"""The GPU benchmark: ``python -m studio.bench_gpu [--variants ...] [--presets ...] [--steps N]
[--compile] [--json] [--workdir DIR] [--budget-s S] [--tiny]``.

With full-size SD3.5 Medium and Large architectures and **random weights** (speed and memory do
not depend on weight values), for a subset of plans chosen to fit about 8 minutes on one H100 /
H200 (``--presets`` names others, named or composed):

* the planner's choice for this GPU (★), then its choices for the same machine with the GPU
  simulated at ``PLAN_VRAM_GB`` (24, 8 and 4 GB) — so the measured peak of the very plans a
  24 / 8 / 4 GB card would get is held against that card's size (``budget_bytes``, ``fits_budget``);
* the step cache (Speed fast / faster, ``studio.engine.stepcache``) on the first plan at the
  variant's recommended steps.

Per plan:

- ``s_per_it`` / ``s_per_image``  studio ``Engine.generate`` at 1024² with ``--steps`` (default
                        10: s/it is what matters), the variant's guidance and Skip Layer Guidance
                        (median of ``--repeat`` after a warm-up).
- ``bare_s_per_it``     the same recipe written with bare diffusers (``bare_pipeline``:
                        ``StableDiffusion3Pipeline.from_pretrained`` with the quantization configs
                        and the offload / casting / tiling calls written out) in the same run;
                        ``overhead_ratio`` = studio ÷ bare (goal ≤ 1.03). A plan with no bare
                        equivalent (T5 kept on the CPU is the studio's own hook) has none.
- ``peak_bytes``        ``torch.cuda.max_memory_allocated`` over load + generations (studio path),
                        ``peak_reserved_bytes`` (``max_memory_reserved``), ``context_bytes`` (the
                        CUDA context and what else held the GPU before loading: device used −
                        reserved), ``measured_bytes`` = reserved + context (what the process
                        really held on the GPU).
- ``estimate_bytes``    the planner's peak for that plan (what ``launch.py plan`` prints, which
                        includes a ``SAFETY_MARGIN_BYTES`` of headroom);
                        ``estimate_ratio`` = (estimate − margin) ÷ measured (goal: within 10 %);
                        ``estimate_alloc_ratio`` = (estimate − margin − modelled CUDA context) ÷
                        ``peak_bytes`` (tensors only).
- ``stepcache_<mode>_*`` ``_skipped`` (fraction of transformer passes cached), ``_time_ratio``
                        (cached ÷ uncached wall time), ``_mad_255`` (mean absolute pixel
                        difference to the uncached image, 0–255 steps), at ``stepcache_steps``.
- ``compile_*``         with ``--compile`` (``studio.engine.compile.with_compile``: every
                        ``transformer_blocks[i]`` compiled; ``compile_repeated_blocks()`` raises for
                        SD3): a fresh load, ``compile_first_s`` (the first call, compilation
                        included) apart from ``compile_s_per_image`` (steady state),
                        ``compile_speedup``, ``compile_peak_bytes``.

Each prompt differs per image (``"…, take N"``), so both paths run the text encoders every
time (the studio's prompt cache would otherwise skip them). The studio and bare paths run one
after the other (both resident at once would not fit the big presets), each warmed up first.
``--budget-s`` (default 360) stops starting new plans once that much time has passed since the
start; the rest are reported as skipped, so one command ends within about 8 minutes.

Full-size random weights need no download: ``build_random_family`` instantiates every component
from the real configs in ``studio.catalog`` (on the GPU when there is one: seconds, not minutes),
saves it in bf16 safetensors to a diffusers folder under ``--workdir`` and reuses it next time
(a stamp records what was built). Text encoders and VAE are written once and symlinked file by
file into each variant's folder (Medium + Large ≈ 32 GB on disk). Tokenizers come from the
tiny family: they produce small ids, which every real-size embedding accepts. The folders load
through the studio's real ``ModelManager`` path, quantized presets included.

``--tiny`` runs the same code on the CPU with the tiny family (``studio.demo.tiny``, Large), the CPU
presets (cpu-fp32, cpu-bf16 — bf16 only where the CPU has native bf16 or when named in
``--presets``: elsewhere its convolutions take half a minute per image), 256², 2 steps (the step
cache at 8), one image per path, so that nothing here rots where there is no GPU. There,
peak memory is the process RSS delta (sampled during load and generation) and the estimate comes
from ``folder_estimate`` (``memory.weight_bytes`` of the folder's own configs + the planner's
activation formulas). Tiny numbers are smoke values: a 2 MB model is lost in allocator noise.

Time on an H100 / H200 (rough): building Medium + Large 2–4 min once (reused from ``--workdir``);
then per plan a load and (1 + repeat) images on each path — under a minute for most plans at 10
steps. ``--build-only`` builds the folders and stops. Plans with ``speed_factor`` ≥ 10
(sequential offload) run only when named in ``--presets``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

DEFAULT_VARIANTS = ("sd3.5-medium", "sd3.5-large")
TINY_PRESETS = ("cpu-fp32", "cpu-bf16")
TINY_VARIANTS = ("sd3.5-large",)  # bf16 convolutions crawl on CPUs without AVX512-BF16: one variant
PROMPT = "a red fox in the snow, photograph"
SEED = 1
SLOW_SPEED_FACTOR = 10.0  # presets at least this slow run only when named
PLAN_VRAM_GB = (24, 8, 4)  # the cards whose plans the bench also measures (simulated budgets)
GPU_STEPS = 10  # timing steps on a GPU (s/it is per step); the step cache uses the variant's own
BUDGET_S = 360.0  # no new plan starts after this many seconds (one command in about 8 minutes)
STEPCACHE_MODES = ("fast", "faster")
GOALS = {"overhead_ratio": ("<=", 1.03), "estimate_ratio": ("within", 0.10)}

COMPONENT_CLASSES = {
    "transformer": ("diffusers", "SD3Transformer2DModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
    "text_encoder_3": ("transformers", "T5EncoderModel"),
}
SHARED_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")
RANDOM_FORMAT = 1
_STAMP = "studio_random.json"


def _cls(component: str):
    import importlib

    library, name = COMPONENT_CLASSES[component]
    return getattr(importlib.import_module(library), name)


# --- full-size random weights -------------------------------------------------------------------


def component_configs(variant: str, max_layers: int | None = None,
                      overrides: dict[str, dict] | None = None) -> dict[str, dict]:
    """The real configs of a catalog variant's five model components, optionally scaled down.

    ``max_layers`` caps every layer count (transformer ``num_layers``, CLIP
    ``num_hidden_layers``, T5 ``num_layers``; dual attention layers past the cap are dropped);
    ``overrides`` ({component: {key: value}}) replaces config keys — the tests use both to build a
    small model through the very same builder. Raises ValueError when the result is inconsistent.
    """
    from studio import catalog

    v = catalog.get_variant(variant)
    configs = {
        "transformer": dict(v.transformer_config),
        "vae": dict(catalog.VAE_CONFIG),
        "text_encoder": dict(catalog.CLIP_L_CONFIG),
        "text_encoder_2": dict(catalog.CLIP_G_CONFIG),
        "text_encoder_3": dict(catalog.T5_XXL_CONFIG),
    }
    if max_layers is not None:
        if max_layers < 1:
            raise ValueError("max_layers must be at least 1.")
        for cfg in configs.values():
            for key in ("num_layers", "num_hidden_layers"):
                if key in cfg:
                    cfg[key] = min(cfg[key], max_layers)
        t = configs["transformer"]
        t["dual_attention_layers"] = [i for i in t.get("dual_attention_layers") or [] if i < t["num_layers"]]
    for component, extra in (overrides or {}).items():
        if component not in configs:
            raise ValueError(f"Unknown component {component!r} in overrides: one of {', '.join(configs)}.")
        configs[component].update(extra)
    check_configs(configs)
    return configs


def check_configs(configs: dict[str, dict]) -> None:
    """The cross-component constraints of an SD3 pipeline; ValueError names the key to fix."""
    t = configs["transformer"]
    t5 = configs["text_encoder_3"]["d_model"]
    if t["joint_attention_dim"] != t5:
        raise ValueError(f"transformer joint_attention_dim {t['joint_attention_dim']} must equal the "
                         f"T5 d_model {t5}.")
    clip = configs["text_encoder"]["projection_dim"] + configs["text_encoder_2"]["projection_dim"]
    if t["pooled_projection_dim"] != clip:
        raise ValueError(f"transformer pooled_projection_dim {t['pooled_projection_dim']} must equal the "
                         f"sum of the two CLIP projection_dims ({clip}).")
    hidden = configs["text_encoder"]["hidden_size"] + configs["text_encoder_2"]["hidden_size"]
    if hidden > t5:
        raise ValueError(f"the two CLIP hidden sizes ({hidden}) must fit in the T5 d_model ({t5}): the "
                         "pipeline pads their concatenation to it.")
    inner = t["num_attention_heads"] * t["attention_head_dim"]
    if t["caption_projection_dim"] != inner:
        raise ValueError(f"transformer caption_projection_dim {t['caption_projection_dim']} must equal "
                         f"num_attention_heads × attention_head_dim ({inner}).")
    if configs["vae"]["latent_channels"] != t["in_channels"]:
        raise ValueError("vae latent_channels must equal transformer in_channels.")


@contextlib.contextmanager
def _default_dtype(dtype):
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_component(component: str, config: dict, device=None, dtype=None):
    """One pipeline component with random weights, built directly on ``device`` in ``dtype``.

    The module's own initialisation runs (values do not matter for speed or memory; buffers such
    as the positional embedding are computed, not left empty).
    """
    import torch

    dtype = dtype or torch.bfloat16
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cls = _cls(component)
    with torch.device(device), _default_dtype(dtype), torch.no_grad():
        if COMPONENT_CLASSES[component][0] == "transformers":
            cfg = {k: v for k, v in config.items() if k != "architectures"}
            model = cls(cls.config_class(**cfg))
        else:
            model = cls.from_config(dict(config))
    return model.to(dtype).eval()


def _config_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _save_component(component: str, config: dict, target: Path, device, dtype) -> None:
    """Build, save (safetensors) and free one component; written to a temp dir, then renamed."""
    import torch

    model = build_component(component, config, device, dtype)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _link_files(src: Path, dst: Path) -> None:
    """``dst`` becomes a real folder whose files are symlinks into ``src`` (the model manager
    hashes a symlinked file once, under its target)."""
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.is_file():
            (dst / f.name).symlink_to(f.resolve())


def _tokenizers_and_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from studio import catalog
    from studio.demo.tiny import build_shared_components

    tiny = build_shared_components()  # ~1 MB of tiny models; only the tokenizers are kept
    return {
        "tokenizer": tiny["tokenizer"],
        "tokenizer_2": tiny["tokenizer_2"],
        "tokenizer_3": tiny["tokenizer_3"],
        "scheduler": FlowMatchEulerDiscreteScheduler(**catalog.SCHEDULER_CONFIG),
    }


def _model_index(extras: dict) -> dict:
    import diffusers

    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": diffusers.__version__,
             "feature_extractor": [None, None], "image_encoder": [None, None]}
    for name, (library, cls) in COMPONENT_CLASSES.items():
        index[name] = [library, cls]
    for name, obj in extras.items():
        index[name] = [type(obj).__module__.split(".")[0], type(obj).__name__]
    return dict(sorted(index.items()))


def build_random_variant(root: str | os.PathLike, variant: str, max_layers: int | None = None,
                         overrides: dict[str, dict] | None = None, device=None, dtype=None,
                         force: bool = False, progress=print) -> Path:
    """A diffusers folder for ``variant`` with random weights at its real (or scaled-down) size.

    Returns the folder; an existing one with a matching stamp is reused. Shared components
    (text encoders, VAE) are built once per configuration under ``root/shared-<hash>`` and
    linked in. Needs disk for the bf16 weights: Large ≈ 27.5 GB, Medium ≈ 16 GB (11.3 GB of it
    shared).
    """
    import torch

    dtype = dtype or torch.bfloat16
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    configs = component_configs(variant, max_layers, overrides)
    dtype_name = str(dtype).removeprefix("torch.")
    stamp = {"format": RANDOM_FORMAT, "variant": variant, "dtype": dtype_name,
             "configs": _config_hash(configs)}
    scaled = max_layers is not None or bool(overrides)
    folder = root / (f"{variant}-{stamp['configs']}" if scaled else variant)
    try:
        if not force and json.loads((folder / _STAMP).read_text()) == stamp:
            return folder
    except (OSError, ValueError):
        pass
    shared_key = _config_hash({c: configs[c] for c in SHARED_COMPONENTS} | {"dtype": dtype_name,
                                                                             "format": RANDOM_FORMAT})
    shared = root / f"shared-{shared_key}"
    shared.mkdir(exist_ok=True)
    for component in SHARED_COMPONENTS:
        target = shared / component
        if force or not (target / "config.json").is_file():
            if progress:
                progress(f"building {component} ({variant}, random weights)")
            _save_component(component, configs[component], target, device, dtype)

    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=root))
    if progress:
        progress(f"building transformer ({variant}, random weights)")
    _save_component("transformer", configs["transformer"], tmp / "transformer", device, dtype)
    for component in SHARED_COMPONENTS:
        _link_files(shared / component, tmp / component)
    extras = _tokenizers_and_scheduler()
    for name, obj in extras.items():
        obj.save_pretrained(tmp / name)
    (tmp / "model_index.json").write_text(json.dumps(_model_index(extras), indent=2))
    (tmp / _STAMP).write_text(json.dumps(stamp))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def build_random_family(root, variants=DEFAULT_VARIANTS, data_dir: Path | None = None, **kwargs) -> dict[str, Path]:
    """``build_random_variant`` for each variant; with ``data_dir`` the model manager's hash
    cache there is filled, so that no timed load pays for hashing 28 GB."""
    out = {v: build_random_variant(root, v, **kwargs) for v in variants}
    if data_dir is not None:
        from studio.models import HashCache

        hashes = HashCache(Path(data_dir) / "cache" / "hashes.json")
        for folder in out.values():
            for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
                hashes.folder_identity(sub)
    return out


# --- the planner on a folder's own configs ------------------------------------------------------


def folder_estimate(folder: str | os.PathLike, preset, width: int, height: int,
                    guidance: float, max_sequence_length: int = 256) -> dict:
    """The planner's arithmetic on the configs saved in ``folder`` (any size, tiny included):
    ``memory.weight_bytes`` of each component under the preset's storage + the activation
    formulas. Resident / CPU placement only: {"peak_bytes", "weights_bytes", "activations"}.
    On CUDA ``CUDA_CONTEXT_BYTES + SAFETY_MARGIN_BYTES`` are added, as the planner does."""
    import torch

    from studio import memory

    if preset.placement != "resident":
        raise ValueError(f"folder_estimate covers resident presets; {preset.name!r} is {preset.placement}.")
    folder = Path(folder)
    el = torch.finfo(preset.dtype).bits // 8
    batch = 2 if guidance > 1.0 else 1
    weights, act = {}, {}
    for component in COMPONENT_CLASSES:
        storage = preset.storage(component)
        path = folder / component / "config.json"
        if storage is None or not path.is_file():
            continue
        config = json.loads(path.read_text())
        model = memory.build_meta_model(_cls(component), config)
        weights[component] = memory.weight_bytes(model, storage)
        extra = memory.largest_dequant_bytes(model, storage)
        if component == "transformer":
            act[component] = memory.transformer_activation_bytes(
                config, width, height, batch, el, text_tokens=memory.CLIP_TOKENS + max_sequence_length,
                attention_matrix=preset.device == "mps")
        elif component == "vae":
            act[component] = memory.vae_decode_bytes(config, width, height, el,
                                                     attention_matrix=preset.device == "mps",
                                                     device=preset.device, tiled=preset.vae == "tiled")
        else:
            seq = max_sequence_length if component == "text_encoder_3" else memory.CLIP_TOKENS
            act[component] = memory.text_encoder_activation_bytes(config, seq, batch, el)
        act[component] += extra
    total = sum(weights.values()) + max(act.values(), default=0)
    if preset.device == "cuda":
        total += memory.CUDA_CONTEXT_BYTES + memory.SAFETY_MARGIN_BYTES
    return {"peak_bytes": int(total), "weights_bytes": int(sum(weights.values())), "activations": act}


# --- which presets to run -----------------------------------------------------------------------


@dataclasses.dataclass
class Candidate:
    """One plan to measure: its preset, the planner's estimate, why it is skipped here (if it is),
    and which machine it was planned for."""
    preset: object  # memory.Preset (named or composed)
    estimate: object | None  # memory.Estimate (None in tiny mode)
    skipped: str | None = None  # why it does not run here
    recommended: bool = False  # the planner's choice for this machine
    budget_bytes: int | None = None  # the simulated card the planner chose it for
    planned_for: str | None = None  # e.g. "8 GB"


def presets_to_run(variant: str, hardware, width: int, height: int,
                   names: list[str] | None = None, plan_vram=PLAN_VRAM_GB) -> list[Candidate]:
    """The plans to measure, each with the reason it is skipped, if it is.

    Without ``names``: the planner's choice for ``hardware`` (recommended), then its choices for
    the same machine with the GPU simulated at each of ``plan_vram`` GB (deduplicated; each
    remembers the budget it was planned for). With ``names`` (named or composed presets): those,
    each checked (``check``) and fitted (``estimate`` + ``fits``) against this machine. A plan
    slower than ``SLOW_SPEED_FACTOR`` × full runs only when named. Raises ValueError for an
    unknown name.
    """
    from studio import memory

    plan = memory.choose(hardware, variant, width, height)
    out: list[Candidate] = []
    if names:
        for name in names:
            try:
                p = memory.get_preset(name)
            except KeyError as e:
                raise ValueError(f"Unknown preset {name!r}: {e.args[0]}") from None
            c = Candidate(p, None, recommended=plan.fits and p.name == plan.preset)
            c.skipped = p.check(hardware)
            if c.skipped is None:
                c.estimate = memory.estimate(variant, p, width, height, hardware=hardware)
                c.skipped = memory.fits(c.estimate, p, hardware)
            out.append(c)
        return out
    seen = set()
    machines = [(hardware, None)]
    if hardware.device == "cuda" and hardware.gpus:
        for gb_ in plan_vram:
            size = int(gb_ * 2**30)
            if size >= hardware.vram_bytes:
                continue
            gpus = [dataclasses.replace(g, total_bytes=size, free_bytes=size) for g in hardware.gpus[:1]]
            machines.append((dataclasses.replace(hardware, gpus=gpus), f"{gb_:g} GB"))
    for hw, label in machines:
        chosen = memory.choose(hw, variant, width, height) if label else plan
        p = chosen.preset_obj
        if p.name in seen:
            continue
        seen.add(p.name)
        c = Candidate(p, chosen.estimate, recommended=label is None and chosen.fits,
                      budget_bytes=hw.vram_bytes if label else None, planned_for=label)
        if not chosen.fits:
            c.skipped = f"the planner finds nothing that fits{' ' + label if label else ''}: {chosen.reason}"
        elif p.speed_factor >= SLOW_SPEED_FACTOR:
            c.skipped = f"about {p.speed_factor:g}× slower than full; name it in --presets to run it"
        out.append(c)
    return out


# --- the compile flag: studio.engine.compile ----------------------------------------------------


def compile_blocks(pipe, backend: str = "inductor", mode: str | None = None) -> int:
    """``studio.engine.compile.compile_transformer`` on ``pipe.transformer``."""
    from studio.engine.compile import compile_transformer

    return compile_transformer(pipe.transformer, backend, mode)


def with_compile(placement, backend: str = "inductor", mode: str | None = None, progress=None):
    """``studio.engine.compile.with_compile`` (the placement's name gets ``+compile``)."""
    from studio.engine.compile import with_compile as compiled

    return compiled(placement, backend, mode, progress)


# --- the bare-diffusers recipe ------------------------------------------------------------------


def bare_recipe_problem(preset) -> str | None:
    """Why a plan has no bare-diffusers equivalent to time against (None when it has one)."""
    if preset.t5 == "cpu":
        return "T5 kept on the CPU is the studio's own hook: no bare-diffusers recipe"
    if preset.transformer == "gguf":
        return "a GGUF transformer needs a GGUF file: not built here"
    return None


def bare_pipeline(folder, preset, device: str):
    """The preset's recipe written with bare diffusers, independent of the studio's own code."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    problem = bare_recipe_problem(preset)
    if problem:
        raise ValueError(problem)

    kwargs: dict = {"dtype": preset.dtype}
    mapping = {}
    if preset.transformer == "nf4":
        from diffusers import BitsAndBytesConfig

        mapping["transformer"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                    bnb_4bit_compute_dtype=preset.dtype)
    elif preset.transformer in ("ao-int8", "ao-fp8"):
        from diffusers import TorchAoConfig
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig, PerRow

        mapping["transformer"] = TorchAoConfig(
            Int8WeightOnlyConfig() if preset.transformer == "ao-int8"
            else Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    if preset.t5 == "int8":
        from transformers import BitsAndBytesConfig

        mapping["text_encoder_3"] = BitsAndBytesConfig(load_in_8bit=True)
    elif preset.t5 == "nf4":
        from transformers import BitsAndBytesConfig

        mapping["text_encoder_3"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=preset.dtype)
    if mapping:
        from diffusers import PipelineQuantizationConfig

        kwargs["quantization_config"] = PipelineQuantizationConfig(quant_mapping=mapping)
    if preset.t5 == "none":
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
    if preset.placement == "balanced":
        kwargs["device_map"] = "balanced"
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, use_safetensors=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    if preset.transformer == "fp8":
        pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
                                                  compute_dtype=preset.dtype)
    if preset.placement == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif preset.placement == "group":
        pipe.enable_group_offload(onload_device=torch.device(device), offload_device=torch.device("cpu"),
                                  offload_type="block_level", num_blocks_per_group=1,
                                  use_stream=device.startswith("cuda"), exclude_modules=["vae"])
    elif preset.placement == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    elif preset.placement == "resident":
        pipe.to(device)
    if preset.vae == "tiled":
        pipe.vae.enable_tiling()
        pipe.vae.enable_slicing()
        pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = 512, 64
    return pipe


# --- measuring ----------------------------------------------------------------------------------


def _rss() -> int:
    """Resident bytes now; where /proc is missing, the lifetime peak (its growth still bounds a
    block's peak from below)."""
    from studio.hardware import process_rss

    rss = process_rss()
    if rss is not None:
        return rss
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (else bf16 convolutions use a slow path)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return "AVX512" in torch.backends.cpu.get_cpu_capability()


def _trim_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).
    Without it, memory that earlier work freed stays resident and is reused, so the RSS peak of
    the next block misses allocations (a whole tiny bf16 load measured 0 bytes in CI). The
    process's own symbols hold libc's: no library search (``find_library`` runs ldconfig).
    ``CDLL(None)`` (those symbols) exists on POSIX only; on Windows it raises."""
    if os.name != "posix":
        return
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def free_all() -> None:
    """Collect garbage, give cached CUDA memory back and trim the C heap, so the next plan starts
    clean and its peak counts what it allocates."""
    import torch

    gc.collect()
    _trim_heap()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def warm_cuda() -> None:
    """Load the lazily loaded CUDA libraries (cuBLAS, cuDNN, attention kernels) once, so their
    footprint is in the context before it is measured, not in the first preset's numbers."""
    import torch

    x = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.bfloat16)
    (x @ x).sum().item()
    torch.nn.functional.scaled_dot_product_attention(x, x, x).sum().item()
    torch.nn.functional.conv2d(x, torch.randn(4, 4, 3, 3, device="cuda", dtype=torch.bfloat16)).sum().item()
    del x
    free_all()


def cuda_context_bytes() -> int:
    """What the GPU holds beyond PyTorch's reserved pool: the CUDA context, libraries, and any
    other process (device used − reserved)."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return int(total - free - torch.cuda.memory_reserved())


class PeakMeter:
    """Peak memory over a block. CUDA: the caching allocator's peak counters (reset on entry);
    CPU: the process RSS sampled every few ms, minus the RSS on entry."""

    def __init__(self, device: str, interval: float = 0.003):
        self.device = device
        self.interval = interval
        self.result: dict = {}

    def __enter__(self):
        import torch

        free_all()
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = _rss()
            self._peak = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss())

    def __exit__(self, *exc):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.result = {"peak_bytes": int(torch.cuda.max_memory_allocated() - self._base),
                           "peak_reserved_bytes": int(torch.cuda.max_memory_reserved())}
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss())
            self.result = {"peak_bytes": int(self._peak - self._base), "peak_reserved_bytes": None}
        return False


def measure(load, generate, device: str, repeat: int, warmup: int = 1, after=None) -> dict:
    """Load once, generate ``warmup`` untimed + ``repeat`` timed images (image ``i`` gets prompt
    ``i``): {load_s, first_s (the first image, warm-up or not), s_per_image (median of the timed
    ones), peak_bytes, peak_reserved_bytes}. ``after(state)`` runs last on the loaded state and
    its dict joins the result."""
    import torch

    def timed(fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    if repeat < 1:
        raise ValueError("repeat must be at least 1.")
    with PeakMeter(device) as meter:
        load_s, state = timed(load)
        times = [timed(generate, state, i)[0] for i in range(warmup + repeat)]
        extra = after(state) if after else {}
        del state
    free_all()
    return {"load_s": load_s, "first_s": times[0], "s_per_image": statistics.median(times[warmup:]),
            **meter.result, **extra}


def stepcache_ratios(engine, request, device: str, steps: int, skip_layers=None, modes=STEPCACHE_MODES) -> dict:
    """Each Speed mode against the same image uncached (same prompt, seed and steps) through
    ``Engine.generate``: {stepcache_steps, stepcache_<mode>_skipped / _time_ratio / _mad_255}, or
    {"stepcache_error": reason} where the step cache does not run (group offload)."""
    import numpy as np
    import torch

    from studio.engine.stepcache import StepCache
    from studio.errors import ValidationError

    transformer = engine.models.current.pipe.transformer

    def image(speed):
        with StepCache(transformer, speed, skip_layers) as cache:
            t0 = time.perf_counter()
            result = engine.generate(request(steps))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        return np.asarray(result.images[0].image, dtype=np.float64), seconds, cache.stats

    out: dict = {"stepcache_steps": steps}
    try:
        exact, t_off, _ = image("off")
        for mode in modes:
            img, seconds, stats = image(mode)
            out[f"stepcache_{mode}_skipped"] = stats.skipped_fraction
            out[f"stepcache_{mode}_time_ratio"] = seconds / t_off
            out[f"stepcache_{mode}_mad_255"] = float(np.abs(img - exact).mean())
    except ValidationError as e:
        out = {"stepcache_error": str(e)}
    return out


def prompt_for(i: int) -> str:
    """The prompt of image ``i``: :data:`PROMPT` with a take number, so no two images share a
    prompt-cache entry."""
    return f"{PROMPT}, take {i}"


def run_one(folder, variant: str, preset, hardware, width: int, height: int, steps: int | None,
            repeat: int, warmup: int, data_dir: Path, compile: bool = False,
            compile_backend: str = "inductor", compile_mode: str | None = None,
            estimate_bytes: int | None = None, stepcache_steps: int | None = None,
            budget_bytes: int | None = None) -> dict:
    """One (variant, preset): the studio path, the bare-diffusers path, with ``stepcache_steps``
    the step cache's ratios at that many steps, and with ``compile`` the studio path with compiled
    blocks. Returns the result row (see the module docstring)."""
    import torch

    from studio import catalog, memory
    from studio.config import StudioConfig
    from studio.engine import Engine, GenerationRequest, PromptCache, validate
    from studio.models import ModelManager, placement_from_preset

    device = hardware.device
    v = catalog.get_variant(variant)

    def request(i, n=steps):
        return GenerationRequest(prompt_for(i), steps=n, seed=SEED, width=width, height=height)

    r = validate(request(0), v, native_size=(width, height))  # the recipe, as the studio resolves it
    call = dict(negative_prompt="", num_inference_steps=r.steps, guidance_scale=r.guidance,
                height=r.height, width=r.width, max_sequence_length=r.request.max_sequence_length)
    if r.slg:
        call.update(skip_guidance_layers=r.slg["layers"], skip_layer_guidance_scale=r.slg["scale"],
                    skip_layer_guidance_start=r.slg["start"], skip_layer_guidance_stop=r.slg["stop"])

    def studio(placement):
        def load():
            manager = ModelManager(StudioConfig(data_dir=data_dir), placement=placement, cache_bytes=0)
            manager.load(str(folder), variant=variant)
            return Engine(manager, gallery=None, prompt_cache=PromptCache(max_entries=0))

        def generate(engine, i):
            engine.generate(request(i))

        return load, generate

    def bare_load():
        return bare_pipeline(folder, preset, device)

    def bare_generate(pipe, i):
        pipe(prompt_for(i), generator=[torch.Generator("cpu").manual_seed(SEED)], **call)

    placement = placement_from_preset(preset, device, hardware)
    row: dict = {"variant": variant, "preset": preset.name, "device": device, "width": r.width,
                 "height": r.height, "steps": r.steps, "guidance": r.guidance, "slg": bool(r.slg)}
    if device.startswith("cuda"):
        free_all()
        row["context_bytes"] = cuda_context_bytes()
    after = None
    if stepcache_steps:
        slg_layers = r.slg["layers"] if r.slg else None

        def after(engine):
            return stepcache_ratios(engine, lambda n: request(10_000, n), device, stepcache_steps, slg_layers)

    s = measure(*studio(placement), device, repeat, warmup, after=after)
    row.update({k: s[k] for k in ("s_per_image", "first_s", "load_s", "peak_bytes", "peak_reserved_bytes")})
    row.update({k: v for k, v in s.items() if k.startswith("stepcache_")})
    row["s_per_it"] = s["s_per_image"] / r.steps
    if bare_recipe_problem(preset) is None:
        b = measure(bare_load, bare_generate, device, repeat, warmup)
        row.update({"bare_s_per_image": b["s_per_image"], "bare_load_s": b["load_s"],
                    "bare_peak_bytes": b["peak_bytes"], "bare_peak_reserved_bytes": b["peak_reserved_bytes"]})
        row["bare_s_per_it"] = b["s_per_image"] / r.steps
        row["overhead_ratio"] = s["s_per_image"] / b["s_per_image"]
    else:
        row["bare"] = bare_recipe_problem(preset)
    if device.startswith("cuda"):
        row["measured_bytes"] = s["peak_reserved_bytes"] + row["context_bytes"]
        margin = memory.SAFETY_MARGIN_BYTES
        tensors_estimate = estimate_bytes - margin - memory.CUDA_CONTEXT_BYTES
        row["estimate_alloc_ratio"] = tensors_estimate / max(s["peak_bytes"], 1)
    else:
        row["measured_bytes"] = s["peak_bytes"]
        margin = 0
    row["estimate_bytes"] = estimate_bytes
    row["estimate_ratio"] = (estimate_bytes - margin) / max(row["measured_bytes"], 1)
    if budget_bytes:
        row["budget_bytes"] = budget_bytes
        row["fits_budget"] = row["measured_bytes"] <= budget_bytes
    if compile:
        try:
            compiled = studio(with_compile(placement, compile_backend, compile_mode))
            c = measure(*compiled, device, repeat, max(warmup, 1))  # the first call compiles
            row.update({"compile_first_s": c["first_s"], "compile_s_per_image": c["s_per_image"],
                        "compile_speedup": s["s_per_image"] / c["s_per_image"],
                        "compile_peak_bytes": c["peak_bytes"], "compile_backend": compile_backend})
        except Exception as e:  # a compile failure is a result, not the end of the run
            first_line = (str(e).strip().splitlines() or [""])[0]
            row["compile_error"] = f"{type(e).__name__}: {first_line[:300]}"
        finally:
            torch._dynamo.reset()
            free_all()
    return row


# --- the run ------------------------------------------------------------------------------------


def default_workdir() -> Path:
    """Where the random-weight folders go by default: ``bench_gpu`` under the user cache dir."""
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("sd35-studio", appauthor=False)) / "bench_gpu"


def run(variants=None, presets=None, steps: int | None = None, size: int | None = None,
        repeat: int | None = None, warmup: int | None = None, compile: bool = False,
        compile_backend: str = "inductor", compile_mode: str | None = None, tiny: bool = False,
        workdir: Path | None = None, build_only: bool = False, rebuild: bool = False,
        log=None, budget_s: float | None = BUDGET_S, stepcache: bool = True,
        stepcache_steps: int | None = None) -> dict:
    """The benchmark; returns {"variant/preset": row}. A preset that does not run here gives a
    row {"variant", "preset", "skipped": reason}. Without CUDA and without ``tiny`` raises
    RuntimeError (the message says to pass --tiny). ``budget_s``: no plan starts after that many
    seconds (None: no limit); ``stepcache``: measure the step cache on each variant's first plan
    at ``stepcache_steps`` (default: the variant's recommended steps; --tiny: 8)."""
    import torch

    started = time.perf_counter()
    from studio import catalog, memory
    from studio.logs import quiet_libraries
    from studio.hardware import detect_hardware

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_libraries()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    try:
        from diffusers.utils import logging as dlog

        dlog.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    if tiny:
        hardware = detect_hardware(device="cpu")
        variants = list(variants or TINY_VARIANTS)
        named = bool(presets)
        presets = list(presets or TINY_PRESETS)
        size, steps, repeat = size or 256, steps or 2, repeat or 1
        warmup = 0 if warmup is None else warmup
        stepcache_steps = stepcache_steps or 8
    else:
        variants = list(variants or DEFAULT_VARIANTS)
        warmup = 1 if warmup is None else warmup
        if not torch.cuda.is_available():
            raise RuntimeError("No CUDA GPU here: the GPU benchmark needs one. Run with --tiny for the "
                               "CPU smoke run of the same code.")
        hardware = detect_hardware()
        size, repeat, steps = size or 1024, repeat or 2, steps or GPU_STEPS
    tmp = None
    if workdir is None:
        if tiny:
            tmp = tempfile.TemporaryDirectory(prefix="studio-bench-gpu-")
            workdir = Path(tmp.name)
        else:
            workdir = default_workdir()
    workdir = Path(workdir)
    data_dir = workdir / "data"
    try:
        if tiny:
            from studio.demo.tiny import build_tiny_family

            folders = build_tiny_family(workdir / "tiny", variants=variants, force=rebuild)
        else:
            log(f"building / reusing random-weight folders under {workdir}")
            folders = build_random_family(workdir / "models", variants, data_dir=data_dir,
                                          force=rebuild, progress=log)
        if not tiny:
            warm_cuda()
        if build_only:
            return {v: {"variant": v, "folder": str(f)} for v, f in folders.items()}
        results: dict = {}
        for variant in variants:
            if tiny:
                plan = memory.choose(hardware, variant, size, size)  # runs; tiny marks its own choice
                candidates = []
                for name in presets:
                    p = memory.get_preset(name)
                    c = Candidate(p, None, skipped=p.check(hardware), recommended=plan.preset == name)
                    if c.skipped is None and p.placement != "resident":
                        c.skipped = "--tiny runs resident CPU presets only"
                    if c.skipped is None and not named and p.dtype == torch.bfloat16 and not cpu_has_fast_bf16():
                        c.skipped = ("no native bf16 on this CPU (no AVX512-BF16 / AMX): its convolutions take "
                                     "~30 s per 256² image; name it in --presets to run it")
                    candidates.append(c)
            else:
                candidates = presets_to_run(variant, hardware, size, size, presets)
            cache_steps = (stepcache_steps or catalog.get_variant(variant).steps) if stepcache else None
            for c in candidates:
                key = f"{variant}/{c.preset.name}"
                if c.skipped is None and budget_s is not None and time.perf_counter() - started > budget_s:
                    c.skipped = (f"time budget: {budget_s:g} s had passed before it could start "
                                 "(--budget-s, or name fewer --presets / --variants)")
                if c.skipped:
                    results[key] = {"variant": variant, "preset": c.preset.name, "skipped": c.skipped}
                    log(f"{key}: skipped — {c.skipped}")
                    continue
                if tiny:
                    est = folder_estimate(folders[variant], c.preset, size, size,
                                          catalog.get_variant(variant).guidance)["peak_bytes"]
                else:
                    est = c.estimate.peak_bytes
                log(f"{key}: running")
                try:
                    row = run_one(folders[variant], variant, c.preset, hardware, size, size, steps,
                                  repeat, warmup, data_dir, compile, compile_backend, compile_mode, est,
                                  stepcache_steps=cache_steps, budget_bytes=c.budget_bytes)
                    cache_steps = None  # the step cache is measured on the variant's first plan
                except Exception as e:  # one failing preset does not lose the others' numbers
                    if not tiny and isinstance(e, torch.OutOfMemoryError):
                        free_all()
                    row = {"variant": variant, "preset": c.preset.name,
                           "error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
                    if tiny:
                        raise
                row["recommended"] = c.recommended
                if c.planned_for:
                    row["planned_for"] = c.planned_for
                results[key] = row
        return results
    finally:
        if tmp:
            tmp.cleanup()


# --- output -------------------------------------------------------------------------------------


def _verdict(key: str, value) -> str:
    if key not in GOALS or value is None:
        return ""
    op, goal = GOALS[key]
    ok = value <= goal if op == "<=" else abs(value - 1) <= goal
    return "ok" if ok else "MISSED"


def _gb(n) -> str:
    if n is None:
        return "—"
    return f"{n / 2**30:.2f} GB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MB"


def _cache_cell(r: dict, mode: str) -> str:
    if f"stepcache_{mode}_skipped" not in r:
        return "—"
    return (f"{100 * r[f'stepcache_{mode}_skipped']:.0f} % · ×{r[f'stepcache_{mode}_time_ratio']:.2f} · "
            f"{r[f'stepcache_{mode}_mad_255']:.1f}")


def format_table(results: dict) -> str:
    """A Markdown table (paste it into the README's GPU table), one row per (variant, plan);
    GB = 2^30 bytes. ★ = the planner's choice for this GPU; "for" = the simulated card the planner
    chose the plan for. "measured" is reserved + CUDA context (CPU: the RSS delta); "ratio" is
    (planner − margin) ÷ measured; step cache: passes cached · time ratio · mean |Δ| in 0–255 steps."""
    lines = ["| variant / plan | for | s/it | bare s/it | overhead | measured | planner | ratio | fits card "
             "| step cache fast | step cache faster | compile 1st / steady |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|---|---|"]
    for key, r in results.items():
        name = ("★ " if r.get("recommended") else "") + key
        if "skipped" in r or "error" in r:
            what = f"skipped: {r['skipped']}" if "skipped" in r else f"ERROR: {r['error']}"
            lines.append(f"| {name} | {r.get('planned_for', '')} | {what.replace('|', '/')} |" + " |" * 9)
            continue
        comp = "—"
        if "compile_s_per_image" in r:
            comp = f"{r['compile_first_s']:.1f} s / {r['compile_s_per_image']:.2f} s (×{r['compile_speedup']:.2f})"
        elif "compile_error" in r:
            comp = "failed: " + r["compile_error"][:60].replace("|", "/")
        bare = f"{r['bare_s_per_it']:.3f}" if "bare_s_per_it" in r else "—"
        overhead = (f"{r['overhead_ratio']:.3f} {_verdict('overhead_ratio', r['overhead_ratio'])}"
                    if "overhead_ratio" in r else "—")
        fits = "—" if "fits_budget" not in r else ("yes" if r["fits_budget"] else "**NO**")
        cache = [_cache_cell(r, m) for m in STEPCACHE_MODES]
        if "stepcache_error" in r:
            cache = ["n/a: " + r["stepcache_error"][:50], "—"]
        lines.append(
            f"| {name} | {r.get('planned_for', '')} | {r['s_per_it']:.3f} | {bare} | {overhead} "
            f"| {_gb(r['measured_bytes'])} | {_gb(r['estimate_bytes'])} "
            f"| {r['estimate_ratio']:.3f} {_verdict('estimate_ratio', r['estimate_ratio'])} | {fits} "
            f"| {cache[0]} | {cache[1]} | {comp} |"
        )
    lines.append("")
    lines.append("goals: overhead ≤ 1.03; ratio = (planner − margin) ÷ (reserved + CUDA context) within 10 % "
                 "(CPU: RSS delta); fits card: the plan chosen for that card held at most its memory; "
                 "step cache fast: ≥ 35 % cached at ≤ 4/255")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m studio.bench_gpu``: run the plans and print the table (or JSON, or the built
    folders); exit status 2 on an error."""
    p = argparse.ArgumentParser(prog="python -m studio.bench_gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke run: tiny family (Large), cpu-fp32 + cpu-bf16, 256², 2 steps, 1 image per path")
    p.add_argument("--variants", nargs="+", default=None, metavar="VARIANT",
                   help=f"default: {' '.join(DEFAULT_VARIANTS)}")
    p.add_argument("--presets", nargs="+", default=None, metavar="PRESET",
                   help="only these presets, named or composed (default: the planner's choice here and for "
                        f"{', '.join(f'{g} GB' for g in PLAN_VRAM_GB)} cards)")
    p.add_argument("--steps", type=int, default=None, help=f"timing steps (default {GPU_STEPS}; --tiny 2)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S,
                   help=f"start no plan after this many seconds (default {BUDGET_S:g}; 0: no limit)")
    p.add_argument("--no-stepcache", action="store_true", help="do not measure the step cache")
    p.add_argument("--stepcache-steps", type=int, default=None,
                   help="steps of the step-cache runs (default: the variant's recommended; --tiny 8)")
    p.add_argument("--size", type=int, default=None, help="square image side (default 1024; --tiny 256)")
    p.add_argument("--repeat", type=int, default=None, help="timed images per path (default 2; --tiny 1)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed images per path before the timed ones (default 1; --tiny 0)")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile of the transformer blocks")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (e.g. max-autotune-no-cudagraphs)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the random-weight folders go (~32 GB; default: the user cache dir)")
    p.add_argument("--build-only", action="store_true", help="build the random-weight folders and stop")
    p.add_argument("--rebuild", action="store_true", help="rebuild the folders even if they exist")
    p.add_argument("--json", action="store_true", help="print a JSON object keyed 'variant/preset'")
    args = p.parse_args(argv)
    from studio import catalog

    for v in args.variants or ():
        if v not in catalog.VARIANTS:
            p.error(f"unknown variant {v!r}: one of {', '.join(catalog.VARIANTS)}")
    try:
        results = run(args.variants, args.presets, args.steps, args.size, args.repeat, args.warmup,
                      args.compile, args.compile_backend, args.compile_mode, args.tiny, args.workdir,
                      args.build_only, args.rebuild, budget_s=args.budget_s or None,
                      stepcache=not args.no_stepcache, stepcache_steps=args.stepcache_steps)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({k: {kk: round(vv, 4) if isinstance(vv, float) else vv for kk, vv in r.items()}
                          for k, r in results.items()}, indent=2))
    elif args.build_only:
        for v, r in results.items():
            print(f"{v}: {r['folder']}")
    else:
        print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
