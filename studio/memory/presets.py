"""The memory presets: ways of loading SD3, each one choice per axis —

    device       cuda | mps | cpu, with the load / compute dtype
    transformer  plain (the dtype) | fp8 (layerwise casting: fp8 storage, bf16 compute) |
                 ao-int8 (torchao int8 weight-only) | ao-fp8 (torchao fp8 weights and activations:
                 fp8 compute, compute capability ≥ 8.9) | nf4 (bitsandbytes) | gguf (a GGUF file)
    t5           plain | int8 | nf4 (bitsandbytes) | cpu (kept on the CPU in the dtype) | none
    placement    resident | model (enable_model_cpu_offload) | group (block-level group offload
                 with CUDA-stream prefetch) | sequential (enable_sequential_cpu_offload) |
                 balanced (device_map="balanced" over several GPUs)
    vae          full | tiled (``VAE_TILE`` px tiles, one image at a time)

A preset knows its load kwargs, its post-load step, the hardware it needs, and its cost: a speed
factor (× the time of ``full`` on the same GPU) and a quality loss in points, added into one number
(``cost``, lower is better) by which the planner ranks every combination. The per-axis numbers
are in ``SPEED`` and ``QUALITY_LOSS`` below — the one place they are written.

The 18 named presets are shortcuts for common combinations; their names work everywhere
(``--preset``, the UI, the metadata). Any other combination has a composed name that reads its
choices, e.g. ``nf4+t5-cpu+group-offload``; :func:`get_preset` turns either kind of name back into
the Preset, and a combination that equals a named preset is that preset (``bf16`` is ``full``).
"""

from __future__ import annotations

import importlib.util
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from studio.hardware import Hardware
from studio.memory.bytes import _DTYPE_NAMES, CUDA_CONTEXT_BYTES, SAFETY_MARGIN_BYTES, VAE_TILE, Storage
from studio.memory.names import PRESET_NAMES

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

TRANSFORMER_CHOICES = ("plain", "fp8", "ao-int8", "ao-fp8", "nf4", "gguf")
T5_CHOICES = ("plain", "int8", "nf4", "cpu", "none")
PLACEMENTS = ("resident", "model", "group", "sequential", "balanced")
VAE_CHOICES = ("full", "tiled")
FP8_COMPUTE_CAPABILITY = (8, 9)  # Ada / Hopper and newer: fp8 tensor cores

# --- the cost of each choice (the one place these numbers live) --------------------------------

# × the time of `full` on the same GPU. Estimates from the libraries' documented behaviour, not
# measurements yet: `python -m studio.bench_gpu` prints the measured ratios per preset.
SPEED = {
    "transformer": {"plain": 1.0, "fp8": 1.1, "ao-int8": 1.2, "ao-fp8": 0.85, "nf4": 1.3, "gguf": 1.35},
    "t5": {"plain": 1.0, "int8": 1.02, "nf4": 1.01, "cpu": 1.25, "none": 0.95},
    "placement": {"resident": 1.0, "balanced": 1.05, "model": 1.15, "group": 1.6, "sequential": 15.0},
    "vae": {"full": 1.0, "tiled": 1.03},
}
# The device itself, vs a mid-range CUDA GPU (CPU: by dtype — bf16 is slow without AVX512-BF16/AMX).
DEVICE_SPEED = {"cuda": 1.0, "mps": 4.0, "cpu-fp32": 40.0, "cpu-bf16": 60.0, "cpu-fp16": 80.0}
# Image quality given up, in points (0 = exact). A judgement from the quantization methods'
# published comparisons; the order matters more than the values.
QUALITY_LOSS = {
    "transformer": {"plain": 0.0, "fp8": 3.0, "ao-int8": 1.5, "ao-fp8": 2.0, "nf4": 8.0, "gguf": 4.0},
    "t5": {"plain": 0.0, "int8": 1.0, "nf4": 3.0, "cpu": 0.0, "none": 14.0},
    "placement": dict.fromkeys(PLACEMENTS, 0.0),
    "vae": {"full": 0.0, "tiled": 0.5},
}
SPEED_WEIGHT = 8.0  # quality points one doubling of the time is worth

_T5_INT8_COST = "8-bit T5 (LLM.int8): prompt embeddings change slightly, rarely visible"
_T5_NF4_COST = "4-bit T5: prompt adherence a little weaker on long, detailed prompts"
QUALITY_TEXT = {
    ("transformer", "fp8"): "fp8 transformer weights: a slight loss of fine detail (norms and embeddings stay bf16)",
    ("transformer", "ao-int8"): "int8 weight-only transformer (per-row scales): very close to bf16",
    ("transformer", "ao-fp8"): "fp8 compute (per-row scales): very close to bf16, rare colour shifts",
    ("transformer", "nf4"): "NF4 transformer: slightly softer fine detail and texture, occasional small artefacts",
    ("transformer", "gguf"): "GGUF transformer: as the file's quantization (Q8_0 ≈ bf16, Q4 ≈ NF4)",
    ("t5", "int8"): _T5_INT8_COST,
    ("t5", "nf4"): _T5_NF4_COST,
    ("t5", "none"): "no T5: prompt adherence drops, especially text rendering and long prompts",
    ("vae", "tiled"): "tiled VAE decode (blended 512 px tiles): rare faint seams in large flat areas",
}


def apply_fp8_storage(transformer, compute_dtype) -> None:
    """fp8 (e4m3) weight storage with ``compute_dtype`` compute, once per module: a transformer
    reused from the model manager's cache already carries the casting hooks."""
    if getattr(transformer, "_studio_fp8_storage", False):
        return
    transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
    transformer._studio_fp8_storage = True


def enable_vae_tiling(vae) -> None:
    """Tiled (``VAE_TILE`` px, diffusers' blended 25 % overlap) and sliced decode. The SD3 VAE's
    own tile size is 1024 px (its ``sample_size``), which would never tile a 1024² image."""
    vae.enable_tiling()
    vae.enable_slicing()
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.tile_sample_min_size = VAE_TILE
    vae.tile_latent_min_size = VAE_TILE // scale


def _move(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return type(obj)(_move(o, device) for o in obj) if not hasattr(obj, "_fields") else \
            type(obj)(*(_move(o, device) for o in obj))
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):  # transformers' ModelOutput is an OrderedDict
        for k in list(obj.keys()):
            obj[k] = _move(obj[k], device)
        return obj
    return obj


def keep_on_cpu(module) -> None:
    """Run ``module`` on the CPU while the pipeline runs elsewhere: its inputs come to the CPU and
    its outputs go back to the caller's device. Plain torch hooks, so the offload hooks that
    diffusers/accelerate add and remove on the other components never touch them. Idempotent."""
    module.to("cpu")
    if getattr(module, "_studio_on_cpu", False):
        return

    def pre(mod, args, kwargs):
        tensors = [t for t in (*args, *kwargs.values()) if torch.is_tensor(t)]
        mod._studio_caller_device = tensors[0].device if tensors else torch.device("cpu")
        return _move(args, "cpu"), _move(kwargs, "cpu")

    def post(mod, args, kwargs, output):
        return _move(output, mod._studio_caller_device)

    module.register_forward_pre_hook(pre, with_kwargs=True)
    module.register_forward_hook(post, with_kwargs=True)
    module._studio_on_cpu = True


@contextmanager
def _hidden(pipe, name: str):
    """``pipe`` without component ``name`` for the duration (so that a pipeline-wide offload call
    neither moves nor hooks it)."""
    module = getattr(pipe, name, None)
    if module is None:
        yield None
        return
    pipe.register_modules(**{name: None})
    try:
        yield module
    finally:
        pipe.register_modules(**{name: module})


def _available(package: str) -> bool:
    """Whether ``package`` is installed, without importing it (torchao prints warnings on import)."""
    return importlib.util.find_spec(package) is not None


@dataclass(frozen=True)
class Preset:
    """One way to load and place the SD3 pipeline: a choice per axis (see the module docstring).

    ``name`` is the preset's name: a named shortcut or the composed name of its choices.
    ``quality_rank`` orders the named presets for display (higher first); the planner ranks
    every combination by ``cost`` instead.
    """

    name: str
    label: str
    description: str
    device: str = "cuda"  # "cuda" | "mps" | "cpu"
    dtype: torch.dtype = BF16
    transformer: str = "plain"
    t5: str = "plain"
    placement: str = "resident"
    vae: str = "full"
    quality_rank: int = 0
    named: bool = False

    def __post_init__(self):
        for axis, value, choices in (("transformer", self.transformer, TRANSFORMER_CHOICES),
                                     ("t5", self.t5, T5_CHOICES), ("placement", self.placement, PLACEMENTS),
                                     ("vae", self.vae, VAE_CHOICES), ("device", self.device, ("cuda", "mps", "cpu"))):
            if value not in choices:
                raise ValueError(f"Unknown {axis} choice {value!r}: one of {', '.join(choices)}.")

    # -- what it needs and what it costs
    @property
    def needs_cuda(self) -> bool:
        """Whether it runs only on a CUDA GPU."""
        return self.device == "cuda"

    @property
    def needs_gpu_count(self) -> int:
        """How many CUDA GPUs it needs (2 for multi-GPU, 0 off CUDA)."""
        return 2 if self.placement == "balanced" else 1 if self.device == "cuda" else 0

    @property
    def axes(self) -> dict[str, str]:
        """Its choice per axis: transformer, t5, placement, vae."""
        return {"transformer": self.transformer, "t5": self.t5, "placement": self.placement, "vae": self.vae}

    @property
    def speed_factor(self) -> float:
        """× the time of ``full`` on the same GPU (CPU/MPS: vs a mid-range GPU)."""
        device = self.device if self.device != "cpu" else f"cpu-{_DTYPE_NAMES[self.dtype]}"
        f = DEVICE_SPEED[device]
        for axis, choice in self.axes.items():
            f *= SPEED[axis][choice]
        return round(f, 3)

    @property
    def quality_loss(self) -> float:
        """Quality points given up, summed over the axes (0: none)."""
        return sum(QUALITY_LOSS[axis][choice] for axis, choice in self.axes.items())

    @property
    def cost(self) -> float:
        """The planner's objective (lower is better): quality points lost + ``SPEED_WEIGHT`` per
        doubling of the time. Additive over the axes, so one axis can be explained apart."""
        return round(self.quality_loss + SPEED_WEIGHT * math.log2(self.speed_factor), 4)

    @property
    def quality_cost(self) -> str:
        """What it gives up in quality, in words ("none" when nothing), with the slowdown of offload."""
        parts = [QUALITY_TEXT[(axis, c)] for axis, c in self.axes.items() if (axis, c) in QUALITY_TEXT]
        text = "; ".join(parts) or "none"
        if self.placement == "sequential":
            text += " (but 10–30× slower)"
        elif self.placement == "group" and not parts:
            text += " (slower: transfers every transformer block each step)"
        return text

    # -- what each component is stored as
    def storage(self, component: str) -> Storage | None:
        """How ``component`` is stored under this preset (None: not loaded)."""
        if component == "transformer":
            return Storage(self.transformer, self.dtype)
        if component == "text_encoder_3":
            if self.t5 == "none":
                return None
            return Storage(self.t5 if self.t5 in ("int8", "nf4") else "plain", self.dtype)
        return Storage("plain", self.dtype)

    # -- ControlNets: stored and placed with the transformer (the one place this is decided)
    def controlnet_storage(self) -> Storage:
        """How a ControlNet is stored beside this preset's transformer: as the transformer when that
        is plain or fp8 layerwise; fp8 layerwise when the transformer is quantized (NF4, GGUF,
        torchao). Those formats quantize at load time, through loaders a ControlNet file does not
        go through (Stability's single files are converted by the studio); layerwise casting
        applies to a loaded module on every device, at half the bf16 bytes."""
        return Storage("plain" if self.transformer == "plain" else "fp8", self.dtype)

    @property
    def controlnet_placement(self) -> str:
        """Where a ControlNet lives while the transformer runs: "resident" (on the device),
        "model" (moved to the device at its first step, back to the CPU when the image is done,
        as diffusers' model offload does with the components it calls per step), "group" (block
        by block, as the transformer) or "sequential" (layer by layer). Off CUDA: resident."""
        return self.placement if self.device == "cuda" else "resident"

    @property
    def controlnet_key(self) -> str:
        """What a ControlNet loaded under this preset carries (the ControlNet cache's key): a net
        cast or hooked for one preset is not reused under another."""
        return f"{self.controlnet_storage().key}/{self.controlnet_placement}"

    def apply_controlnet(self, net, device) -> None:
        """Store and place one ControlNet (an SD3ControlNetModel on the CPU, in the preset's
        dtype) as :meth:`controlnet_storage` and :attr:`controlnet_placement` say. Idempotent:
        a net already set up for this preset is left alone."""
        if getattr(net, "_studio_controlnet_key", None) == self.controlnet_key:
            return
        if self.controlnet_storage().kind == "fp8":
            apply_fp8_storage(net, self.dtype)
        place = self.controlnet_placement
        if place == "model":
            from accelerate import cpu_offload_with_hook

            net.to("cpu")
            _, net._studio_offload_hook = cpu_offload_with_hook(net, torch.device(device))
        elif place == "group":
            net.enable_group_offload(onload_device=torch.device(device), offload_device=torch.device("cpu"),
                                     offload_type="block_level", num_blocks_per_group=1,
                                     use_stream=str(device).startswith("cuda"))
        elif place == "sequential":
            from accelerate import cpu_offload

            cpu_offload(net, execution_device=torch.device(device))
        else:
            net.to(device)
        net._studio_controlnet_key = self.controlnet_key

    def runs_on(self, component: str) -> str:
        """Where ``component`` computes: "cpu" for a T5 kept on the CPU, else the device."""
        return "cpu" if component == "text_encoder_3" and self.t5 == "cpu" else self.device

    # -- what the model manager needs
    def load_kwargs(self, device: str = "cuda", hardware: Hardware | None = None) -> dict:
        """Keyword arguments for ``StableDiffusion3Pipeline.from_pretrained``.

        Imports diffusers / transformers (and torchao) quantization configs but loads nothing.
        ``hardware`` (optional) adds ``max_memory`` for the multi-GPU preset, keeping room for
        activations. A GGUF transformer comes from its file (the model manager's file override),
        not from these kwargs.
        """
        if self.needs_cuda and not str(device).startswith("cuda"):
            raise ValueError(f"Preset {self.name!r} runs on CUDA, not on {device!r}.")
        kwargs: dict = {"dtype": self.dtype}
        mapping: dict = {}
        if self.transformer == "nf4":
            from diffusers import BitsAndBytesConfig as DiffusersBnb

            mapping["transformer"] = DiffusersBnb(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=self.dtype
            )
        elif self.transformer in ("ao-int8", "ao-fp8"):
            from diffusers import TorchAoConfig
            from torchao.quantization import (
                Float8DynamicActivationFloat8WeightConfig,
                Int8WeightOnlyConfig,
                PerRow,
            )

            config = (Int8WeightOnlyConfig() if self.transformer == "ao-int8"
                      else Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
            mapping["transformer"] = TorchAoConfig(config)
        if self.t5 in ("int8", "nf4"):
            from transformers import BitsAndBytesConfig as TransformersBnb

            if self.t5 == "int8":
                mapping["text_encoder_3"] = TransformersBnb(load_in_8bit=True)
            else:
                mapping["text_encoder_3"] = TransformersBnb(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=self.dtype
                )
        if mapping:
            from diffusers import PipelineQuantizationConfig

            kwargs["quantization_config"] = PipelineQuantizationConfig(quant_mapping=mapping)
        if self.t5 == "none":
            kwargs["text_encoder_3"] = None
            kwargs["tokenizer_3"] = None
        if self.placement == "balanced":
            kwargs["device_map"] = "balanced"
            if hardware is not None and hardware.gpus:
                reserve = CUDA_CONTEXT_BYTES + SAFETY_MARGIN_BYTES
                kwargs["max_memory"] = {
                    g.index: max(g.total_bytes - reserve, 0) for g in hardware.gpus
                }
        return kwargs

    def apply(self, pipe, device: str = "cuda"):
        """Post-load steps: casting, offload hooks or a plain ``.to(device)``, a T5 kept on the
        CPU, VAE tiling. Returns ``pipe``.

        Offload hooks are installed on a pipeline still on the CPU (never ``.to(cuda)`` first);
        fp8 layerwise casting is applied on the CPU so the GPU never holds the bf16 transformer;
        a T5 kept on the CPU is hidden from the pipeline-wide calls, so it never visits the GPU.
        """
        if self.transformer == "fp8":
            apply_fp8_storage(pipe.transformer, self.dtype)
        on_cpu = self.t5 == "cpu" and getattr(pipe, "text_encoder_3", None) is not None
        with _hidden(pipe, "text_encoder_3") if on_cpu else nullcontext():
            if self.placement == "model":
                pipe.enable_model_cpu_offload(device=device)
            elif self.placement == "group":
                pipe.enable_group_offload(
                    onload_device=torch.device(device),
                    offload_device=torch.device("cpu"),
                    offload_type="block_level",
                    num_blocks_per_group=1,
                    use_stream=str(device).startswith("cuda"),
                    exclude_modules=["vae"],  # 0.17 GB: kept on the device
                )
            elif self.placement == "sequential":
                pipe.enable_sequential_cpu_offload(device=device)
            elif self.placement == "balanced":
                pass  # from_pretrained(device_map="balanced") already placed every component
            else:
                pipe.to(device)
        if on_cpu:
            keep_on_cpu(pipe.text_encoder_3)
        if self.vae == "tiled" and getattr(pipe, "vae", None) is not None:
            enable_vae_tiling(pipe.vae)
        return pipe

    def combination_problem(self) -> str | None:
        """Why these choices do not go together (None when they do). Hardware is not checked."""
        t, t5, place = self.transformer, self.t5, self.placement
        if self.device != "cuda":
            if place != "resident":
                return f"offloading moves weights to a CUDA GPU; on {self.device} everything is resident."
            if t not in ("plain", "fp8") or (self.device == "mps" and t != "plain"):
                return f"a {t} transformer runs on CUDA only here."
            if self.device == "mps" and t5 not in ("plain", "none"):
                return "bitsandbytes T5 and a separate CPU T5 are not offered on MPS."
            if self.device == "cpu" and t5 == "cpu":
                return "on the CPU every component is on the CPU already."
            return None
        if place == "balanced" and (t, t5, self.vae) != ("plain", "plain", "full"):
            return "the multi-GPU preset spreads whole bf16 components; it combines with nothing else."
        if place == "sequential" and t != "plain":
            return ("sequential offload moves plain layers one at a time; quantized or fp8-cast "
                    "layers do not survive accelerate's per-layer hooks.")
        if place == "sequential" and t5 in ("int8", "nf4"):
            return "sequential offload cannot move bitsandbytes 8-bit / 4-bit T5 layers piecewise."
        if place == "model" and t5 == "cpu":
            return ("model offload re-installs its hooks on every component after each image, which "
                    "would move a CPU-kept T5 to the GPU: use 8-bit/4-bit T5 or no T5 with it.")
        if place == "group" and t in ("ao-int8", "ao-fp8"):
            return ("group offload with CUDA streams leaves torchao weights on the CPU (diffusers "
                    "issue #13281).")
        return None

    def check(self, hardware: Hardware) -> str | None:
        """Why this preset cannot run on ``hardware`` (None when it can). Memory is not checked."""
        problem = self.combination_problem()
        if problem:
            return problem
        if self.device == "cuda":
            if not hardware.gpus:
                if self.transformer == "nf4":
                    return (
                        "NF4 quantization of the SD3 transformer needs a CUDA GPU: diffusers 0.42 "
                        "refuses bitsandbytes on CPU."
                    )
                if self.t5 in ("int8", "nf4"):
                    return (
                        "the 8-bit / 4-bit T5 presets keep T5 on a CUDA GPU; "
                        "this machine has none."
                    )
                if self.transformer == "fp8":
                    return "fp8 layerwise casting is a CUDA preset here; this machine has no CUDA GPU."
                return "needs a CUDA GPU; this machine has none."
            if hardware.device != "cuda":
                return f"the studio is set to run on {hardware.device} (--device), not on CUDA."
            if len(hardware.gpus) < self.needs_gpu_count:
                return (
                    f"needs at least {self.needs_gpu_count} CUDA GPUs "
                    f"(found {len(hardware.gpus)})."
                )
            if self.transformer == "ao-fp8":
                low = [g for g in hardware.gpus[:1] if (g.compute_capability or (0, 0)) < FP8_COMPUTE_CAPABILITY]
                if low:
                    cc = low[0].compute_capability
                    have = f"{cc[0]}.{cc[1]}" if cc else "unknown (simulated; give --compute-capability)"
                    return (f"fp8 compute needs compute capability ≥ {FP8_COMPUTE_CAPABILITY[0]}."
                            f"{FP8_COMPUTE_CAPABILITY[1]} (Ada, Hopper or newer); this GPU's is {have}.")
        elif self.device == "mps":
            if not hardware.mps:
                return "the mps preset needs an Apple-silicon GPU (MPS); this machine has none."
            if hardware.device != "mps":
                return f"the studio is set to run on {hardware.device}, not on MPS."
        if self.transformer in ("ao-int8", "ao-fp8") and not _available("torchao"):
            return "torchao is not installed (`pip install torchao`)."
        if self.transformer == "gguf" and not _available("gguf"):
            return "reading GGUF files needs the gguf package (`pip install gguf`)."
        return None

    def to_dict(self) -> dict:
        """The preset, its choices and its costs as a plain dict."""
        return {
            "name": self.name,
            "label": self.label,
            "description": self.description,
            "quality_rank": self.quality_rank,
            "speed_factor": self.speed_factor,
            "quality_cost": self.quality_cost,
            "quality_loss": self.quality_loss,
            "cost": self.cost,
            "named": self.named,
            "needs_cuda": self.needs_cuda,
            "needs_gpu_count": self.needs_gpu_count,
            "device": self.device,
            "dtype": _DTYPE_NAMES[self.dtype],
            "transformer": self.transformer,
            "t5": self.t5,
            "placement": self.placement,
            "vae": self.vae,
        }


# --- the named presets (shortcuts) ------------------------------------------------------------


def _named(name, label, description, rank, **axes) -> Preset:
    return Preset(name, label, description, quality_rank=rank, named=True, **axes)


_NAMED = (
    _named("full", "Full bf16 on the GPU",
           "Every component in bf16, resident on one CUDA GPU. Fastest and exact.", 100),
    _named("multi-gpu-balanced", "Full bf16 over several GPUs",
           'device_map="balanced": whole components spread over the GPUs (largest first), '
           "nothing offloaded. Exact; activations hop between GPUs.", 96, placement="balanced"),
    _named("model-offload", "bf16, model CPU offload",
           "enable_model_cpu_offload: each component moves to the GPU only while it runs. "
           "Exact; costs a PCIe transfer of every component per image.", 92, placement="model"),
    _named("t5-8bit", "bf16, 8-bit T5",
           "T5-XXL quantized to 8 bits with bitsandbytes (its `wo` projections stay bf16), "
           "everything else bf16, all resident.", 88, t5="int8"),
    _named("t5-8bit-offload", "bf16, 8-bit T5, model offload",
           "8-bit T5 and bf16 everything else with model CPU offload: keeps the transformer "
           "exact where T5 in bf16 is what does not fit (Medium on 8 GB).", 86, t5="int8", placement="model"),
    _named("group-offload", "bf16, group offload (block level)",
           "enable_group_offload(block_level, one block per group, CUDA stream prefetch): the "
           "transformer streams from pinned RAM block by block; text encoders move whole; "
           "VAE resident. Exact; needs RAM for every weight.", 84, placement="group"),
    _named("fp8-model-offload", "fp8 transformer, model offload",
           "Transformer weights stored in fp8 e4m3 (enable_layerwise_casting, bf16 compute); "
           "T5 and CLIPs bf16; model CPU offload.", 80, transformer="fp8", placement="model"),
    _named("fp8-layerwise", "fp8 transformer + 8-bit T5, resident",
           "Transformer stored in fp8 e4m3 (enable_layerwise_casting, bf16 compute) and T5 in "
           "8-bit, all resident: fp8 alone saves less than T5 costs in bf16, so the two go "
           "together here (layerwise casting is never applied to T5).", 76, transformer="fp8", t5="int8"),
    _named("nf4-t5-8bit", "NF4 transformer + 8-bit T5",
           "Transformer in 4-bit NF4 (diffusers bitsandbytes), T5 8-bit, rest bf16, all "
           "resident.", 72, transformer="nf4", t5="int8"),
    _named("nf4-t5-8bit-offload", "NF4 + 8-bit T5, model offload",
           "NF4 transformer and 8-bit T5 with model CPU offload: for 6–8 GB cards.", 68,
           transformer="nf4", t5="int8", placement="model"),
    _named("nf4-t5-4bit", "NF4 transformer + 4-bit T5",
           "Transformer and T5 in 4-bit NF4, CLIPs and VAE bf16, all resident.", 64,
           transformer="nf4", t5="nf4"),
    _named("nf4-t5-4bit-offload", "NF4 + 4-bit T5, model offload",
           "NF4 transformer and 4-bit T5 with model CPU offload: the smallest footprint that "
           "keeps T5 (for 6 GB cards).", 60, transformer="nf4", t5="nf4", placement="model"),
    _named("no-t5", "bf16 without T5",
           "text_encoder_3=None: the T5 encoder is not loaded (zeros in its place); CLIP-L and "
           "CLIP-G alone condition the image. Everything else bf16, resident.", 56, t5="none"),
    _named("nf4-no-t5-offload", "NF4 without T5, model offload",
           "NF4 transformer, no T5, model CPU offload: the last resort before sequential "
           "offload on 4–6 GB cards.", 52, transformer="nf4", t5="none", placement="model"),
    _named("sequential-offload", "bf16, sequential CPU offload",
           "enable_sequential_cpu_offload: every layer moves to the GPU just before it runs. "
           "Exact and fits almost any GPU, but an order of magnitude slower.", 40, placement="sequential"),
    _named("mps", "bf16 on Apple silicon",
           "Every component in bf16 on the MPS device (unified memory; needs macOS 14+ for "
           "bf16 — use fp16 on older systems).", 30, device="mps"),
    _named("cpu-fp32", "fp32 on the CPU",
           "Every component in fp32 on the CPU: exact, and faster than bf16 on CPUs without "
           "native bf16 (AVX512-BF16 / AMX), but twice the RAM.", 20, device="cpu", dtype=FP32),
    _named("cpu-bf16", "bf16 on the CPU",
           "Every component in bf16 on the CPU: half the RAM of fp32; slow unless the CPU has "
           "native bf16.", 15, device="cpu"),
)


class _PresetTable(dict):
    """The named presets, in quality-rank order. Iterating gives the 18 shortcuts; a composed name
    is also ``in`` the table and ``table[name]`` builds its Preset (so code that validates a
    preset name against this table accepts every name ``get_preset`` accepts)."""

    def __contains__(self, name) -> bool:
        if dict.__contains__(self, name):
            return True
        try:
            parse_preset_name(name)
        except (KeyError, ValueError, TypeError):
            return False
        return True

    def __missing__(self, name):
        return parse_preset_name(name)


PRESETS: dict[str, Preset] = _PresetTable((p.name, p) for p in _NAMED)

if tuple(dict.keys(PRESETS)) != PRESET_NAMES:  # the torch-free name list must not drift
    raise RuntimeError(f"studio.memory.names.PRESET_NAMES is out of date: {tuple(dict.keys(PRESETS))}")

_BY_AXES = {(p.device, p.dtype, p.transformer, p.t5, p.placement, p.vae): p for p in _NAMED}

# --- composed presets: names and descriptions of any combination --------------------------------

_T_TOKEN = {"fp8": "fp8", "ao-int8": "int8", "ao-fp8": "fp8-compute", "nf4": "nf4", "gguf": "gguf"}
_T5_TOKEN = {"int8": "t5-8bit", "nf4": "t5-4bit", "cpu": "t5-cpu", "none": "no-t5"}
_PLACE_TOKEN = {"model": "model-offload", "group": "group-offload", "sequential": "sequential-offload",
                "balanced": "balanced"}
_VAE_TOKEN = {"tiled": "vae-tiling"}
_DTYPE_TOKEN = {"bf16": BF16, "fp16": FP16, "fp32": FP32}


def compose(device: str = "cuda", dtype: torch.dtype = BF16, transformer: str = "plain", t5: str = "plain",
            placement: str = "resident", vae: str = "full") -> Preset:
    """The Preset of one combination: the named preset when it is one, else a composed one."""
    named = _BY_AXES.get((device, dtype, transformer, t5, placement, vae))
    if named is not None:
        return named
    tokens = [device] if device != "cuda" else []
    tokens.append(_DTYPE_NAMES[dtype] if transformer == "plain" else _T_TOKEN[transformer])
    if transformer != "plain" and dtype != BF16:
        tokens.append(_DTYPE_NAMES[dtype])
    tokens += [_T5_TOKEN[t5]] if t5 in _T5_TOKEN else []
    tokens += [_PLACE_TOKEN[placement]] if placement in _PLACE_TOKEN else []
    tokens += [_VAE_TOKEN[vae]] if vae in _VAE_TOKEN else []
    name = "+".join(tokens)
    label, description = _describe(device, dtype, transformer, t5, placement, vae)
    return Preset(name, label, description, device=device, dtype=dtype, transformer=transformer, t5=t5,
                  placement=placement, vae=vae)


def _describe(device, dtype, transformer, t5, placement, vae) -> tuple[str, str]:
    d = _DTYPE_NAMES[dtype]
    where = {"cuda": "the GPU", "mps": "Apple silicon (MPS)", "cpu": "the CPU"}[device]
    label = [{"plain": f"{d} transformer", "fp8": "fp8 transformer", "ao-int8": "int8 transformer (torchao)",
              "ao-fp8": "fp8-compute transformer (torchao)", "nf4": "NF4 transformer",
              "gguf": "GGUF transformer"}[transformer]]
    label += [{"int8": "8-bit T5", "nf4": "4-bit T5", "cpu": "T5 on the CPU", "none": "no T5"}[t5]] if t5 != "plain" else []
    label += [{"resident": f"on {where}", "model": "model offload", "group": "group offload",
               "sequential": "sequential offload", "balanced": "over several GPUs"}[placement]]
    label += ["tiled VAE"] if vae == "tiled" else []
    text = [{
        "plain": f"Transformer in {d}.",
        "fp8": f"Transformer weights stored in fp8 e4m3 (enable_layerwise_casting, {d} compute).",
        "ao-int8": f"Transformer Linear weights in int8 with per-row scales (torchao Int8WeightOnlyConfig), {d} compute.",
        "ao-fp8": ("Transformer weights and activations in fp8 with per-row scales (torchao "
                   "Float8DynamicActivationFloat8WeightConfig): fp8 matmuls, compute capability ≥ 8.9."),
        "nf4": f"Transformer in 4-bit NF4 (bitsandbytes), {d} compute.",
        "gguf": f"Transformer from the GGUF file, dequantized layer by layer ({d} compute).",
    }[transformer]]
    text.append({
        "plain": f"T5-XXL in {d}.",
        "int8": "T5-XXL in 8 bits (bitsandbytes; its `wo` projections stay bf16).",
        "nf4": "T5-XXL in 4-bit NF4 (bitsandbytes).",
        "cpu": (f"T5-XXL stays on the CPU in {d}: it never takes GPU memory; a new prompt takes seconds "
                "to encode there, a repeated one comes from the prompt cache."),
        "none": "No T5 (text_encoder_3=None: zeros in its place); CLIP-L and CLIP-G alone condition the image.",
    }[t5])
    text.append({
        "resident": f"Everything else resident on {where}.",
        "model": "Model CPU offload: each component moves to the GPU only while it runs.",
        "group": ("Group offload (block level, one block per group, CUDA stream prefetch): the transformer "
                  "streams from pinned RAM block by block; text encoders move whole; the VAE stays on the GPU."),
        "sequential": "Sequential CPU offload: every layer moves to the GPU just before it runs.",
        "balanced": "Whole components spread over the GPUs.",
    }[placement])
    if vae == "tiled":
        text.append(f"The VAE decodes in {VAE_TILE} px tiles, one image at a time.")
    return ", ".join(label), " ".join(text)


def parse_preset_name(name: str) -> Preset:
    """The Preset of a composed name such as ``nf4+t5-cpu+group-offload`` (any token order);
    a named preset's name gives that preset. Raises KeyError naming what is wrong."""
    if not isinstance(name, str):
        raise TypeError("a preset name is a string")
    if dict.__contains__(PRESETS, name):
        return dict.__getitem__(PRESETS, name)
    axes: dict = {}

    def put(axis, value, token):
        if axis in axes:
            raise KeyError(f"Preset name {name[:80]!r} sets the {axis} twice (at {token!r}).")
        axes[axis] = value

    reverse = [("transformer", {v: k for k, v in _T_TOKEN.items()}), ("t5", {v: k for k, v in _T5_TOKEN.items()}),
               ("placement", {v: k for k, v in _PLACE_TOKEN.items()}), ("vae", {v: k for k, v in _VAE_TOKEN.items()})]
    for token in name.strip().split("+"):
        if token in ("cpu", "mps", "cuda"):
            put("device", token, token)
        elif token in _DTYPE_TOKEN:
            put("dtype", _DTYPE_TOKEN[token], token)
        else:
            for axis, table in reverse:
                if token in table:
                    put(axis, table[token], token)
                    break
            else:
                raise KeyError(
                    f"Unknown preset {name[:80]!r}. Known presets: {', '.join(PRESET_NAMES)}; or a "
                    "composed name of these parts joined by '+': bf16|fp16|fp32|fp8|int8|fp8-compute|nf4|gguf, "
                    "t5-8bit|t5-4bit|t5-cpu|no-t5, model-offload|group-offload|sequential-offload, "
                    "vae-tiling, cpu|mps (see `launch.py plan`)."
                )
    if "dtype" not in axes and "transformer" not in axes:
        raise KeyError(f"Preset name {name[:80]!r} names no transformer (bf16, fp8, nf4, …).")
    preset = compose(**axes)
    problem = preset.combination_problem()
    if problem:
        raise ValueError(f"Preset {name[:80]!r} does not work: {problem}")
    return preset


def get_preset(name: str) -> Preset:
    """A named preset or a composed name (see ``parse_preset_name``)."""
    try:
        return parse_preset_name(name)
    except (KeyError, TypeError, ValueError) as e:
        raise KeyError(e.args[0] if e.args else f"Unknown preset {name!r}.") from None


def presets_by_rank() -> list[Preset]:
    """The named presets, best first (the UI's dropdown order)."""
    return sorted(dict.values(PRESETS), key=lambda p: p.quality_rank, reverse=True)
