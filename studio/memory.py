"""Memory presets and the planner: which way of loading SD3 fits this machine, and at what cost.

Nothing here loads weights. Every number comes from the real component configs in
``studio.catalog``, instantiated on the *meta* device (shapes without storage), and from the rules
the libraries themselves apply when they quantize or cast — read from the installed sources:

* **bf16 / fp16 / fp32** — every floating parameter and buffer at that width. transformers keeps a
  model's ``_keep_in_fp32_modules`` in fp32 *only when the dtype is fp16* (T5's ``wo``
  projections, transformers 5.23 ``_get_dtype_plan``); ``_keep_in_fp32_modules_strict`` also for
  bf16.
* **fp8 layerwise casting** (diffusers ``enable_layerwise_casting``) — leaf Linear / Conv /
  Embedding modules are *stored* in float8_e4m3fn (1 B per weight *and* bias) and upcast to bf16
  one layer at a time; modules matching ``DEFAULT_SKIP_MODULES_PATTERN`` plus the model's
  ``_skip_layerwise_casting_patterns`` (SD3: ``pos_embed``, ``norm``) and
  ``_keep_in_fp32_modules`` stay bf16. We walk the module tree exactly as diffusers does.
* **bitsandbytes int8** (LLM.int8) — each converted ``nn.Linear`` weight is 1 B/param plus one
  fp32 scale per output row (``SCB``); the bias and every non-Linear stay in the load dtype.
* **bitsandbytes NF4** — 0.5 B/param packed, plus per block of 64 an fp32 absmax (or, with
  double quantization, a uint8 absmax + an fp32 absmax per 256 blocks + an fp32 offset and a
  256-entry fp32 code), plus each layer's own 16-entry fp32 NF4 code.
* Which Linears bitsandbytes converts: in transformers, ``type(m) is nn.Linear`` except
  ``get_modules_to_not_convert`` (tied / output embeddings, the last module, and
  ``_keep_in_fp32_modules`` — so **T5's 24 ``wo`` projections (1.0 B params) are never
  quantized** and stay bf16: an 8-bit T5-XXL is ~5.9 GB, not 4.8); in diffusers every
  ``nn.Linear`` except ``llm_int8_skip_modules``.

The tests check these rules against real quantized / cast tiny models (allocated bytes within
2 %), using the same functions (``weight_bytes``) that estimate the real models.

Activations (documented estimates, not measurements on a GPU):

* Transformer forward: ``batch × tokens × hidden × bytes × 14`` (18 with dual attention), where
  tokens = (H/16)·(W/16) image patches + 77 CLIP + 256 T5 tokens, batch = 2 with CFG, hidden =
  heads × 64. The factor counts what one joint block keeps alive at once: both residual streams,
  the modulated norm output, q/k/v, the attention output and the 4× MLP hidden (two copies
  around the GELU). CUDA bf16 attention runs flash / memory-efficient SDPA (no N² matrix); on MPS
  the score matrix (heads × N² × 2 copies) is added.
* VAE decode: ``5 × C × H × W × bytes`` where C = ``block_out_channels[1]`` (256) — the widest
  feature map at full resolution (the last upsampler's output). A profile of the real decoder on
  CPU (random weights, 512², fp32) peaks at 3.0 × that tensor; +2 covers cuDNN workspaces and
  allocator slack on CUDA. At 1024² bf16 that is 2.5 GB — tiling (``vae.enable_tiling()``)
  removes it.
* Overhead on a CUDA GPU: 0.4 GB CUDA context + 0.5 GB safety margin per GPU.

"Peak" is the most that sits on one accelerator in any phase (text encode, denoise, decode):
resident presets keep every component there; model offload only the active component;
group offload streams the transformer block by block (diffusers' block-level grouping finds no
top-level ModuleList in the transformers text encoders, so each of those moves whole);
sequential offload keeps one leaf layer plus all buffers (accelerate leaves buffers on the GPU).
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import nn

from . import catalog
from .hardware import GB, Hardware, detect_hardware

# --- components -------------------------------------------------------------------------------

COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae")
COMPONENT_LABELS = {
    "text_encoder": "CLIP-L",
    "text_encoder_2": "CLIP-G",
    "text_encoder_3": "T5-XXL",
    "transformer": "Transformer",
    "vae": "VAE",
}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
PHASES = ("text encode", "denoise", "decode")

CLIP_TOKENS = 77
CUDA_CONTEXT_BYTES = int(0.4 * GB)
SAFETY_MARGIN_BYTES = int(0.5 * GB)
MPS_MARGIN_BYTES = int(0.5 * GB)
BASE_RAM_BYTES = int(2.0 * GB)  # Python + torch + CUDA libraries, before any weight
OS_RAM_RESERVE_BYTES = int(1.5 * GB)  # left to the OS and the browser when planning RAM
TRANSFORMER_ACT_FACTOR = 14
DUAL_ATTENTION_EXTRA = 4
VAE_DECODE_FACTOR = 5.0  # measured 3.0 live on CPU + 2.0 for cuDNN workspace / allocator slack
NF4_BLOCKSIZE = 64
NF4_NESTED_BLOCKSIZE = 256


def _component_source(component: str, variant_name: str) -> tuple[type, dict]:
    """The class and the real config of one pipeline component of a catalog variant."""
    if component == "transformer":
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel, catalog.get_variant(variant_name).transformer_config
    if component == "vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL, catalog.VAE_CONFIG
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    if component == "text_encoder":
        return CLIPTextModelWithProjection, catalog.CLIP_L_CONFIG
    if component == "text_encoder_2":
        return CLIPTextModelWithProjection, catalog.CLIP_G_CONFIG
    if component == "text_encoder_3":
        return T5EncoderModel, catalog.T5_XXL_CONFIG
    raise KeyError(f"Unknown component {component!r}: one of {', '.join(COMPONENTS)}.")


def _is_transformers_class(cls: type) -> bool:
    return any(c.__module__.startswith("transformers.") for c in cls.__mro__)


def build_meta_model(cls: type, config: dict) -> nn.Module:
    """Instantiate a diffusers or transformers model class from a config dict on the meta device.

    Shapes and module structure are real, no memory is allocated. Uncached: use
    ``meta_model`` for catalog components.
    """
    with torch.device("meta"):
        if _is_transformers_class(cls):
            cfg = {k: v for k, v in config.items() if k != "architectures"}
            return cls(cls.config_class(**cfg)).eval()
        return cls.from_config(dict(config)).eval()


@lru_cache(maxsize=16)
def _meta_model_cached(module: str, qualname: str, config_json: str) -> nn.Module:
    cls = getattr(sys.modules[module], qualname)
    return build_meta_model(cls, json.loads(config_json))


def meta_model(component: str, variant_name: str) -> nn.Module:
    """A catalog component on the meta device (cached; shared components are built once)."""
    cls, config = _component_source(component, variant_name)
    return _meta_model_cached(cls.__module__, cls.__qualname__, json.dumps(config, sort_keys=True))


@lru_cache(maxsize=None)
def component_params(variant_name: str) -> dict[str, int]:
    """Parameter count of each pipeline component of a variant (tied weights counted once)."""
    return {c: count_params(meta_model(c, variant_name)) for c in COMPONENTS}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- storage: how a component's weights are held -----------------------------------------------

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class Storage:
    """How one component's weights are stored.

    ``kind``: "plain" (everything in ``dtype``), "fp8" (diffusers layerwise casting: float8_e4m3fn
    storage, ``dtype`` compute), "int8" (bitsandbytes LLM.int8) or "nf4" (bitsandbytes 4-bit
    NF4, ``dtype`` compute). ``dtype`` is the load dtype of everything not quantized.
    """

    kind: str = "plain"
    dtype: torch.dtype = torch.bfloat16
    double_quant: bool = False

    def __post_init__(self):
        if self.kind not in ("plain", "fp8", "int8", "nf4"):
            raise ValueError(f"Unknown storage kind {self.kind!r}.")

    @property
    def dtype_name(self) -> str:
        return _DTYPE_NAMES.get(self.dtype, str(self.dtype).removeprefix("torch."))

    @property
    def label(self) -> str:
        """The dtype column: what the weights are stored as."""
        return {"plain": self.dtype_name, "fp8": "fp8 e4m3", "int8": "int8", "nf4": "nf4"}[
            self.kind
        ]

    @property
    def quantization(self) -> str:
        d = self.dtype_name
        return {
            "plain": "none",
            "fp8": f"layerwise casting (fp8 storage, {d} compute)",
            "int8": f"bitsandbytes LLM.int8 (non-Linear {d})",
            "nf4": f"bitsandbytes NF4{' + double quant' if self.double_quant else ''} "
            f"({d} compute)",
        }[self.kind]


def _pattern_hits(name: str, pattern: str) -> bool:
    """``pattern`` names a module path component of ``name`` (how keep-in-fp32 keys match)."""
    return re.search(rf"(?:^|\.){pattern}(?:\.|$)", name) is not None


def _fp32_patterns(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Modules the library keeps in fp32 at this load dtype (transformers' dtype plan rule)."""
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    strict = list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    out = []
    if dtype == torch.float16:
        out += keep
    if dtype in (torch.float16, torch.bfloat16):
        out += strict
    return out


def _layerwise_cast_modules(model: nn.Module) -> set[str]:
    """Names of the leaf modules diffusers' ``enable_layerwise_casting`` stores in fp8.

    Mirrors ``ModelMixin.enable_layerwise_casting`` + ``_apply_layerwise_casting`` (diffusers
    0.42): default skip patterns + ``_keep_in_fp32_modules`` + ``_skip_layerwise_casting_patterns``,
    matched with ``re.search`` against the dotted module path; recursion stops at skipped modules
    and at supported layers (Linear, Conv*, Embedding).
    """
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    patterns = tuple(DEFAULT_SKIP_MODULES_PATTERN)
    patterns += tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    patterns += tuple(getattr(model, "_skip_layerwise_casting_patterns", None) or ())
    patterns = tuple(set(patterns))
    cast: set[str] = set()

    def walk(module: nn.Module, prefix: str) -> None:
        if any(re.search(p, prefix) for p in patterns):
            return
        if isinstance(module, _GO_LC_SUPPORTED_PYTORCH_LAYERS):
            cast.add(prefix)
            return
        for name, child in module.named_children():
            walk(child, f"{prefix}.{name}" if prefix else name)

    walk(model, "")
    return cast


def _bnb_converted_linears(model: nn.Module, skip_modules: list[str] | None = None) -> set[str]:
    """Names of the ``nn.Linear`` modules bitsandbytes replaces, by the loading library's rules."""
    if _is_transformers_class(type(model)):
        from transformers.quantizers.base import HfQuantizer
        from transformers.quantizers.quantizers_utils import should_convert_module

        not_convert = HfQuantizer.get_modules_to_not_convert(
            model, skip_modules, getattr(model, "_keep_in_fp32_modules", None)
        )
        return {
            n
            for n, m in model.named_modules()
            if type(m) is nn.Linear and should_convert_module(n, not_convert)
        }
    # diffusers (quantizers/bitsandbytes/utils.py `_replace_with_bnb_linear`)
    skip = list(skip_modules or []) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return {
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and n not in skip
        and not any((k + "." in n) or (k == n) for k in skip)
    }


def _quantized_weight_bytes(weight: torch.Tensor, storage: Storage) -> int:
    n = weight.numel()
    if storage.kind == "int8":
        return n + weight.shape[0] * 4  # int8 weight + fp32 row scales (SCB)
    blocks = math.ceil(n / NF4_BLOCKSIZE)
    packed = math.ceil(n / 2)
    code = 16 * 4  # each Linear4bit holds its own 16-entry fp32 NF4 code
    if storage.double_quant:
        nested = math.ceil(blocks / NF4_NESTED_BLOCKSIZE) * 4 + 4 + 256 * 4  # absmax, offset, code
        return packed + blocks + nested + code
    return packed + blocks * 4 + code


def module_bytes(model: nn.Module, storage: Storage) -> dict[str, int]:
    """Bytes held directly by each module (its own parameters and buffers) under ``storage``.

    Keys are dotted module names ("" is the root). Tied tensors are counted once, at their
    first module. Works on meta models (nothing is allocated) and on real ones alike.
    """
    fp32 = _fp32_patterns(model, storage.dtype)
    fp8 = _layerwise_cast_modules(model) if storage.kind == "fp8" else set()
    quant = _bnb_converted_linears(model) if storage.kind in ("int8", "nf4") else set()
    seen: set[int] = set()
    out: dict[str, int] = {}
    for name, module in model.named_modules():
        total = 0
        tensors = list(module.named_parameters(recurse=False)) + list(
            module.named_buffers(recurse=False)
        )
        for tname, t in tensors:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            if not t.is_floating_point():
                total += t.numel() * t.element_size()
            elif name in quant and tname == "weight":
                total += _quantized_weight_bytes(t, storage)
            elif name in fp8:
                total += t.numel() * torch.finfo(torch.float8_e4m3fn).bits // 8
            elif fp32 and any(_pattern_hits(name, p) for p in fp32):
                total += t.numel() * 4
            else:
                total += t.numel() * torch.finfo(storage.dtype).bits // 8
        out[name] = total
    return out


def allocated_bytes(model: nn.Module) -> int:
    """Bytes actually held: parameters, buffers, and bitsandbytes' side tensors (row scales,
    absmax, codes, nested statistics), each storage counted once."""
    seen: set[int] = set()
    total = 0

    def add(t):
        nonlocal total
        if torch.is_tensor(t) and t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    def add_state(state):
        for v in vars(state).values():
            if torch.is_tensor(v):
                add(v)
            elif hasattr(v, "absmax"):  # nested QuantState
                add_state(v)

    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
        for attr in ("SCB", "CB"):
            add(getattr(t, attr, None))
        if getattr(t, "quant_state", None) is not None:
            add_state(t.quant_state)
    return total



def weight_bytes(model: nn.Module, storage: Storage) -> int:
    """Total bytes of a model's weights and buffers under ``storage``."""
    return sum(module_bytes(model, storage).values())


def _subtree(sizes: dict[str, int], prefix: str) -> int:
    return sum(v for k, v in sizes.items() if k == prefix or k.startswith(prefix + "."))


def group_offload_footprint(model: nn.Module, storage: Storage, use_stream: bool = True) -> int:
    """Bytes on the GPU while a block-level group-offloaded model runs.

    Mirrors diffusers' ``_apply_group_offloading_block_level`` (one block per group): top-level
    ModuleList/Sequential children become one group per block; everything else (plus the root's
    own tensors) is one "unmatched" group that stays on while the model runs. With a CUDA stream
    the next block is prefetched, so two blocks are resident. ``_group_offload_block_modules``
    (the VAE's encoder/decoder) are recursed into the same way.
    """
    sizes = module_bytes(model, storage)
    return _group_footprint(model, sizes, "", use_stream)


def _group_footprint(module: nn.Module, sizes: dict[str, int], prefix: str, stream: bool) -> int:
    recurse = set(getattr(module, "_group_offload_block_modules", None) or [])
    unmatched = sizes.get(prefix, 0)
    blocks: list[int] = []
    nested = 0
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if name in recurse:
            nested = max(nested, _group_footprint(child, sizes, path, stream))
        elif isinstance(child, (nn.ModuleList, nn.Sequential)):
            blocks += [_subtree(sizes, f"{path}.{i}") for i in range(len(child))]
        else:
            unmatched += _subtree(sizes, path)
    top = sorted(blocks, reverse=True)[: 2 if stream else 1]
    return unmatched + max(sum(top), nested)


def sequential_offload_footprint(model: nn.Module, storage: Storage) -> tuple[int, int]:
    """(buffers, largest leaf) on the GPU under accelerate's sequential offload.

    accelerate's ``cpu_offload`` (``offload_buffers=False``) leaves every buffer on the execution
    device and brings one leaf module's parameters at a time.
    """
    sizes = module_bytes(model, storage)
    buffers = sum(
        b.numel() * (torch.finfo(storage.dtype).bits // 8 if b.is_floating_point() else b.element_size())
        for b in model.buffers()
    )
    leaf = max((sizes[n] for n, m in model.named_modules() if not list(m.children())), default=0)
    return buffers, leaf


def largest_dequant_bytes(model: nn.Module, storage: Storage) -> int:
    """The transient bf16 copy of the largest quantized / fp8 layer during its forward."""
    if storage.kind == "plain":
        return 0
    el = torch.finfo(storage.dtype).bits // 8
    return max((m.weight.numel() * el for m in model.modules() if isinstance(m, nn.Linear)), default=0)


# --- activations ------------------------------------------------------------------------------


def transformer_activation_bytes(
    config: dict,
    width: int,
    height: int,
    batch: int = 2,
    dtype_bytes: int = 2,
    text_tokens: int = CLIP_TOKENS + 256,
    attention_matrix: bool = False,
) -> int:
    """Peak activations of one SD3 transformer forward (see the module docstring)."""
    patch = config.get("patch_size", 2)
    tokens = (height // (8 * patch)) * (width // (8 * patch)) + text_tokens
    heads = config["num_attention_heads"]
    hidden = heads * config.get("attention_head_dim", 64)
    factor = TRANSFORMER_ACT_FACTOR + (DUAL_ATTENTION_EXTRA if config.get("dual_attention_layers") else 0)
    act = batch * tokens * hidden * dtype_bytes * factor
    if attention_matrix:
        act += 2 * batch * heads * tokens * tokens * dtype_bytes
    return int(act)


def vae_decode_bytes(
    config: dict, width: int, height: int, dtype_bytes: int = 2, attention_matrix: bool = False
) -> int:
    """Peak activations of an un-tiled AutoencoderKL decode of one image at width × height."""
    channels = list(config["block_out_channels"])
    widest_full_res = channels[1] if len(channels) > 1 else channels[0]
    act = VAE_DECODE_FACTOR * widest_full_res * width * height * dtype_bytes
    if attention_matrix:  # the mid-block self-attention over the latent pixels
        scale = 2 ** (len(channels) - 1)
        n = (width // scale) * (height // scale)
        act += 2 * n * n * dtype_bytes
    return int(act)


def text_encoder_activation_bytes(
    config: dict, seq: int, batch: int = 2, dtype_bytes: int = 2, attention_matrix: bool = True
) -> int:
    """Peak activations of a CLIP / T5 encoder forward: the MLP hidden plus attention scores."""
    hidden = config.get("d_model", config.get("hidden_size"))
    ffn = config.get("d_ff", config.get("intermediate_size"))
    heads = config.get("num_heads", config.get("num_attention_heads"))
    act = batch * seq * (3 * ffn + 6 * hidden) * dtype_bytes
    if attention_matrix:
        act += 2 * batch * heads * seq * seq * 4  # T5 adds a position bias in fp32
    return int(act)


# --- presets ----------------------------------------------------------------------------------

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def apply_fp8_storage(transformer, compute_dtype) -> None:
    """fp8 (e4m3) weight storage with ``compute_dtype`` compute, once per module: a transformer
    reused from the model manager's cache already carries the casting hooks."""
    if getattr(transformer, "_studio_fp8_storage", False):
        return
    transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
    transformer._studio_fp8_storage = True


@dataclass(frozen=True)
class Preset:
    """A named way to load and place the SD3 pipeline.

    ``transformer``: "plain" | "fp8" | "nf4"; ``t5``: "plain" | "int8" | "nf4" | "none";
    ``placement``: "resident" (every component on the device), "model" (enable_model_cpu_offload),
    "group" (enable_group_offload, block level), "sequential" (enable_sequential_cpu_offload) or
    "balanced" (device_map="balanced" over several GPUs). ``quality_rank`` is the planner's total
    order (higher = better): image fidelity first, then speed at equal fidelity; presets that are
    an order of magnitude slower rank below every quantized option.
    """

    name: str
    label: str
    description: str
    quality_rank: int
    speed_factor: float  # × the time of `full` on the same GPU (CPU/MPS: vs a mid-range GPU)
    quality_cost: str
    needs_cuda: bool
    needs_gpu_count: int
    device: str  # "cuda" | "mps" | "cpu"
    dtype: torch.dtype = BF16
    transformer: str = "plain"
    t5: str = "plain"
    placement: str = "resident"

    # -- what each component is stored as
    def storage(self, component: str) -> Storage | None:
        """How ``component`` is stored under this preset (None: not loaded)."""
        if component == "transformer":
            return Storage(self.transformer, self.dtype)
        if component == "text_encoder_3":
            return None if self.t5 == "none" else Storage(self.t5, self.dtype)
        return Storage("plain", self.dtype)

    # -- what the model manager needs
    def load_kwargs(self, device: str = "cuda", hardware: Hardware | None = None) -> dict:
        """Keyword arguments for ``StableDiffusion3Pipeline.from_pretrained``.

        Imports diffusers / transformers quantization configs but loads nothing. ``hardware``
        (optional) adds ``max_memory`` for the multi-GPU preset, keeping room for activations.
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
        """Post-load steps: casting, offload hooks or a plain ``.to(device)``. Returns ``pipe``.

        Offload hooks are installed on a pipeline still on the CPU (never ``.to(cuda)`` first);
        fp8 layerwise casting is applied on the CPU so the GPU never holds the bf16 transformer.
        """
        if self.transformer == "fp8":
            apply_fp8_storage(pipe.transformer, self.dtype)
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
        return pipe

    def check(self, hardware: Hardware) -> str | None:
        """Why this preset cannot run on ``hardware`` (None when it can). Memory is not checked."""
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
        elif self.device == "mps":
            if not hardware.mps:
                return "the mps preset needs an Apple-silicon GPU (MPS); this machine has none."
            if hardware.device != "mps":
                return f"the studio is set to run on {hardware.device}, not on MPS."
        return None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "label": self.label,
            "description": self.description,
            "quality_rank": self.quality_rank,
            "speed_factor": self.speed_factor,
            "quality_cost": self.quality_cost,
            "needs_cuda": self.needs_cuda,
            "needs_gpu_count": self.needs_gpu_count,
            "device": self.device,
            "dtype": _DTYPE_NAMES[self.dtype],
            "transformer": self.transformer,
            "t5": self.t5,
            "placement": self.placement,
        }


_NF4_COST = (
    "NF4 transformer: slightly softer fine detail and texture, occasional small artefacts; "
)
_T5_INT8_COST = "8-bit T5 (LLM.int8): prompt embeddings change slightly, rarely visible"
_T5_NF4_COST = "4-bit T5: prompt adherence a little weaker on long, detailed prompts"

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "full", "Full bf16 on the GPU",
            "Every component in bf16, resident on one CUDA GPU. Fastest and exact.",
            100, 1.0, "none", True, 1, "cuda",
        ),
        Preset(
            "multi-gpu-balanced", "Full bf16 over several GPUs",
            'device_map="balanced": whole components spread over the GPUs (largest first), '
            "nothing offloaded. Exact; activations hop between GPUs.",
            96, 1.05, "none", True, 2, "cuda", placement="balanced",
        ),
        Preset(
            "model-offload", "bf16, model CPU offload",
            "enable_model_cpu_offload: each component moves to the GPU only while it runs. "
            "Exact; costs a PCIe transfer of every component per image.",
            92, 1.15, "none", True, 1, "cuda", placement="model",
        ),
        Preset(
            "t5-8bit", "bf16, 8-bit T5",
            "T5-XXL quantized to 8 bits with bitsandbytes (its `wo` projections stay bf16), "
            "everything else bf16, all resident.",
            88, 1.0, _T5_INT8_COST, True, 1, "cuda", t5="int8",
        ),
        Preset(
            "t5-8bit-offload", "bf16, 8-bit T5, model offload",
            "8-bit T5 and bf16 everything else with model CPU offload: keeps the transformer "
            "exact where T5 in bf16 is what does not fit (Medium on 8 GB).",
            86, 1.2, _T5_INT8_COST, True, 1, "cuda", t5="int8", placement="model",
        ),
        Preset(
            "group-offload", "bf16, group offload (block level)",
            "enable_group_offload(block_level, one block per group, CUDA stream prefetch): the "
            "transformer streams from pinned RAM block by block; text encoders move whole; "
            "VAE resident. Exact; needs RAM for every weight.",
            84, 1.6, "none (slower: transfers every transformer block each step)", True, 1, "cuda",
            placement="group",
        ),
        Preset(
            "fp8-model-offload", "fp8 transformer, model offload",
            "Transformer weights stored in fp8 e4m3 (enable_layerwise_casting, bf16 compute); "
            "T5 and CLIPs bf16; model CPU offload.",
            80, 1.25,
            "fp8 transformer weights: a slight loss of fine detail (norms and embeddings stay bf16)",
            True, 1, "cuda", transformer="fp8", placement="model",
        ),
        Preset(
            "fp8-layerwise", "fp8 transformer + 8-bit T5, resident",
            "Transformer stored in fp8 e4m3 (enable_layerwise_casting, bf16 compute) and T5 in "
            "8-bit, all resident: fp8 alone saves less than T5 costs in bf16, so the two go "
            "together here (layerwise casting is never applied to T5).",
            76, 1.1,
            "fp8 transformer weights: a slight loss of fine detail; " + _T5_INT8_COST,
            True, 1, "cuda", transformer="fp8", t5="int8",
        ),
        Preset(
            "nf4-t5-8bit", "NF4 transformer + 8-bit T5",
            "Transformer in 4-bit NF4 (diffusers bitsandbytes), T5 8-bit, rest bf16, all "
            "resident.",
            72, 1.3, _NF4_COST + _T5_INT8_COST, True, 1, "cuda", transformer="nf4", t5="int8",
        ),
        Preset(
            "nf4-t5-8bit-offload", "NF4 + 8-bit T5, model offload",
            "NF4 transformer and 8-bit T5 with model CPU offload: for 6–8 GB cards.",
            68, 1.4, _NF4_COST + _T5_INT8_COST, True, 1, "cuda", transformer="nf4", t5="int8",
            placement="model",
        ),
        Preset(
            "nf4-t5-4bit", "NF4 transformer + 4-bit T5",
            "Transformer and T5 in 4-bit NF4, CLIPs and VAE bf16, all resident.",
            64, 1.3, _NF4_COST + _T5_NF4_COST, True, 1, "cuda", transformer="nf4", t5="nf4",
        ),
        Preset(
            "nf4-t5-4bit-offload", "NF4 + 4-bit T5, model offload",
            "NF4 transformer and 4-bit T5 with model CPU offload: the smallest footprint that "
            "keeps T5 (for 6 GB cards).",
            60, 1.4, _NF4_COST + _T5_NF4_COST, True, 1, "cuda", transformer="nf4", t5="nf4",
            placement="model",
        ),
        Preset(
            "no-t5", "bf16 without T5",
            "text_encoder_3=None: the T5 encoder is not loaded (zeros in its place); CLIP-L and "
            "CLIP-G alone condition the image. Everything else bf16, resident.",
            56, 0.95,
            "no T5: prompt adherence drops, especially text rendering and long prompts",
            True, 1, "cuda", t5="none",
        ),
        Preset(
            "nf4-no-t5-offload", "NF4 without T5, model offload",
            "NF4 transformer, no T5, model CPU offload: the last resort before sequential "
            "offload on 4–6 GB cards.",
            52, 1.35,
            _NF4_COST + "no T5: prompt adherence drops, especially text rendering",
            True, 1, "cuda", transformer="nf4", t5="none", placement="model",
        ),
        Preset(
            "sequential-offload", "bf16, sequential CPU offload",
            "enable_sequential_cpu_offload: every layer moves to the GPU just before it runs. "
            "Exact and fits almost any GPU, but an order of magnitude slower.",
            40, 15.0, "none (but 10–30× slower)", True, 1, "cuda", placement="sequential",
        ),
        Preset(
            "mps", "bf16 on Apple silicon",
            "Every component in bf16 on the MPS device (unified memory; needs macOS 14+ for "
            "bf16 — use fp16 on older systems).",
            30, 4.0, "none", False, 0, "mps",
        ),
        Preset(
            "cpu-fp32", "fp32 on the CPU",
            "Every component in fp32 on the CPU: exact, and faster than bf16 on CPUs without "
            "native bf16 (AVX512-BF16 / AMX), but twice the RAM.",
            20, 40.0, "none", False, 0, "cpu", dtype=FP32,
        ),
        Preset(
            "cpu-bf16", "bf16 on the CPU",
            "Every component in bf16 on the CPU: half the RAM of fp32; slow unless the CPU has "
            "native bf16.",
            15, 60.0, "none", False, 0, "cpu",
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"Unknown preset {name!r}. Known presets: {', '.join(PRESETS)}.") from None


def presets_by_rank() -> list[Preset]:
    return sorted(PRESETS.values(), key=lambda p: p.quality_rank, reverse=True)


# --- estimates --------------------------------------------------------------------------------


@dataclass
class ComponentRow:
    component: str  # pipeline attribute: text_encoder, ..., vae
    label: str
    device: str
    dtype: str
    quantization: str
    bytes: int
    params: int

    def to_dict(self) -> dict:
        return {
            "name": self.component,
            "label": self.label,
            "device": self.device,
            "dtype": self.dtype,
            "quantization": self.quantization,
            "bytes": self.bytes,
            "params": self.params,
        }


@dataclass
class Estimate:
    variant: str
    preset: str
    width: int
    height: int
    components: list[ComponentRow]
    peak_bytes: int  # most on one accelerator (CPU presets: RAM) in any phase, with overhead
    peak_phase: str
    phase_bytes: dict[str, int]  # phase -> bytes on the (busiest) accelerator
    ram_bytes: int  # system RAM needed
    speed_factor: float
    quality_notes: str
    activations: dict[str, int] = field(default_factory=dict)
    gpu_bytes: list[int] = field(default_factory=list)  # per GPU (multi-GPU preset)
    notes: list[str] = field(default_factory=list)
    feasible: bool = True  # False: the placement itself fails (e.g. a component fits no GPU)

    @property
    def weights_bytes(self) -> int:
        return sum(r.bytes for r in self.components)


@lru_cache(maxsize=None)
def _component_numbers(component: str, variant_name: str, storage: Storage) -> dict[str, int]:
    model = meta_model(component, variant_name)
    buffers, leaf = sequential_offload_footprint(model, storage)
    return {
        "bytes": weight_bytes(model, storage),
        "group": group_offload_footprint(model, storage, use_stream=True),
        "buffers": buffers,
        "leaf": leaf,
        "dequant": largest_dequant_bytes(model, storage),
    }


def _device_label(preset: Preset, component: str, gpu: int | None = None) -> str:
    dev = preset.device
    if preset.placement == "model":
        return f"cpu ⇄ {dev} (model offload)"
    if preset.placement == "group":
        if component == "vae":
            return dev
        if component == "transformer":
            return f"cpu ⇄ {dev} (per block)"
        return f"cpu ⇄ {dev} (whole model)"
    if preset.placement == "sequential":
        return f"cpu ⇄ {dev} (per layer)"
    if preset.placement == "balanced":
        return "cpu" if gpu is None else f"cuda:{gpu}"
    return dev


def _balanced_assignment(sizes: dict[str, int], gpu_budgets: list[int]) -> dict[str, int | None]:
    """diffusers' ``_assign_components_to_devices`` ("balanced"): largest component first,
    cycling GPUs 0,1,…,n-1,n-1,…,0; a component that does not fit goes to the CPU (None)."""
    order = sorted(range(len(gpu_budgets)), key=lambda i: gpu_budgets[i], reverse=True)
    cycle = order + order[::-1]
    left = list(gpu_budgets)
    out: dict[str, int | None] = {}
    idx = 0
    for comp, size in sorted(sizes.items(), key=lambda kv: kv[1], reverse=True):
        gpu = cycle[idx % len(cycle)]
        if size > left[gpu]:
            out[comp] = None
        else:
            out[comp] = gpu
            left[gpu] -= size
            idx += 1
    return out


def estimate(
    variant: str,
    preset: str | Preset,
    width: int = 1024,
    height: int = 1024,
    hardware: Hardware | None = None,
) -> Estimate:
    """Memory needed by ``variant`` loaded with ``preset`` at ``width`` × ``height``.

    ``hardware`` only matters for the multi-GPU preset (how many GPUs, how large); without it
    two GPUs large enough for every component are assumed.
    """
    v = catalog.get_variant(variant)
    p = preset if isinstance(preset, Preset) else get_preset(preset)
    params = component_params(variant)
    el = torch.finfo(p.dtype).bits // 8
    batch = 2 if v.uses_cfg else 1
    on_mps = p.device == "mps"
    t5_seq = v.max_sequence_length

    rows: list[ComponentRow] = []
    numbers: dict[str, dict[str, int]] = {}
    for comp in COMPONENTS:
        st = p.storage(comp)
        if st is None:
            rows.append(ComponentRow(comp, COMPONENT_LABELS[comp], "not loaded", "—", "—", 0, 0))
            continue
        numbers[comp] = _component_numbers(comp, variant, st)
        rows.append(
            ComponentRow(
                comp, COMPONENT_LABELS[comp], _device_label(p, comp), st.label,
                st.quantization, numbers[comp]["bytes"], params[comp],
            )
        )

    # activations per component while it runs
    act = {
        "text_encoder": text_encoder_activation_bytes(catalog.CLIP_L_CONFIG, CLIP_TOKENS, batch, el),
        "text_encoder_2": text_encoder_activation_bytes(catalog.CLIP_G_CONFIG, CLIP_TOKENS, batch, el),
        "text_encoder_3": text_encoder_activation_bytes(catalog.T5_XXL_CONFIG, t5_seq, batch, el),
        "transformer": transformer_activation_bytes(
            v.transformer_config, width, height, batch, el,
            text_tokens=CLIP_TOKENS + t5_seq, attention_matrix=on_mps,
        ),
        "vae": vae_decode_bytes(catalog.VAE_CONFIG, width, height, el, attention_matrix=on_mps),
    }
    for comp in numbers:  # quantized / fp8 layers are dequantized one at a time
        act[comp] += numbers[comp]["dequant"]
    act = {c: a for c, a in act.items() if c in numbers}
    phase_of = {
        c: "text encode" if c in TEXT_ENCODERS else "denoise" if c == "transformer" else "decode"
        for c in numbers
    }

    weights = {c: numbers[c]["bytes"] for c in numbers}
    total_w = sum(weights.values())
    quantized = {c for c in numbers if p.storage(c).kind in ("int8", "nf4")}
    cpu_held = sum(w for c, w in weights.items() if c not in quantized)
    overhead = CUDA_CONTEXT_BYTES + SAFETY_MARGIN_BYTES
    notes: list[str] = []
    gpu_bytes: list[int] = []
    feasible = True

    def phase_peaks(resident_of) -> dict[str, int]:
        """resident_of(c) -> bytes resident while component c runs (incl. its activations)."""
        out = dict.fromkeys(PHASES, 0)
        for c in numbers:
            out[phase_of[c]] = max(out[phase_of[c]], resident_of(c))
        return out

    if p.device == "cpu":
        phases = phase_peaks(lambda c: total_w + act[c])
        peak = max(phases.values()) + BASE_RAM_BYTES
        ram = peak
    elif p.device == "mps":
        phases = phase_peaks(lambda c: total_w + act[c] + MPS_MARGIN_BYTES)
        peak = max(phases.values())
        ram = total_w + max(act.values()) + BASE_RAM_BYTES
    elif p.placement == "resident":
        phases = phase_peaks(lambda c: total_w + act[c] + overhead)
        peak = max(phases.values())
        ram = BASE_RAM_BYTES + cpu_held  # non-quantized components pass through RAM on load
    elif p.placement == "model":
        phases = phase_peaks(lambda c: weights[c] + act[c] + overhead)
        peak = max(phases.values())
        ram = BASE_RAM_BYTES + total_w
    elif p.placement == "group":
        vae = weights.get("vae", 0)

        def group_resident(c):
            own = vae + act[c] if c == "vae" else numbers[c]["group"] + act[c] + vae
            return own + overhead

        phases = phase_peaks(group_resident)
        peak = max(phases.values())
        ram = BASE_RAM_BYTES + total_w  # pinned CPU copies of every offloaded weight
    elif p.placement == "sequential":
        buffers_all = sum(numbers[c]["buffers"] for c in numbers)
        phases = phase_peaks(lambda c: buffers_all + numbers[c]["leaf"] + act[c] + overhead)
        peak = max(phases.values())
        ram = BASE_RAM_BYTES + total_w
    elif p.placement == "balanced":
        if hardware and len(hardware.gpus) >= 2:
            budgets = [max(g.total_bytes - overhead, 0) for g in hardware.gpus]
        else:  # two GPUs, each large enough for everything
            budgets = [total_w + max(act.values())] * 2
        assign = _balanced_assignment(weights, budgets)
        gpu_bytes = []
        phases = dict.fromkeys(PHASES, 0)
        for i in range(len(budgets)):
            mine = [c for c, g in assign.items() if g == i]
            w = sum(weights[c] for c in mine)
            peak_i = w + max((act[c] for c in mine), default=0) + overhead
            gpu_bytes.append(peak_i)
            for c in mine:
                phases[phase_of[c]] = max(phases[phase_of[c]], w + act[c] + overhead)
        on_cpu = [c for c, g in assign.items() if g is None]
        if on_cpu:
            feasible = False
            notes.append(
                "device_map='balanced' would leave "
                + ", ".join(COMPONENT_LABELS[c] for c in on_cpu)
                + " on the CPU: too large for any single GPU."
            )
        for r in rows:
            if r.component in assign:
                r.device = _device_label(p, r.component, assign[r.component])
        peak = max(gpu_bytes)
        ram = BASE_RAM_BYTES + max(weights.values())
    else:  # pragma: no cover - every placement is handled above
        raise ValueError(p.placement)

    peak_phase = max(phases, key=lambda k: phases[k])
    return Estimate(
        variant=variant,
        preset=p.name,
        width=width,
        height=height,
        components=rows,
        peak_bytes=int(peak),
        peak_phase=peak_phase,
        phase_bytes={k: int(v) for k, v in phases.items()},
        ram_bytes=int(ram),
        speed_factor=p.speed_factor,
        quality_notes=p.quality_cost,
        activations={k: int(a) for k, a in act.items()},
        gpu_bytes=[int(b) for b in gpu_bytes],
        notes=notes,
        feasible=feasible,
    )


# --- the planner ------------------------------------------------------------------------------


def gb(n: int | float) -> str:
    return f"{n / GB:.1f} GB"


@dataclass
class Rejection:
    preset: str
    reason: str


@dataclass
class Plan:
    variant: str
    preset: str  # the chosen preset (when nothing fits: the one that comes closest)
    fits: bool
    estimate: Estimate
    hardware: Hardware
    budget_bytes: int  # accelerator memory the plan was checked against (CPU: RAM)
    ram_budget_bytes: int
    rejected: list[Rejection]
    explanation: str = ""

    @property
    def peak_bytes(self) -> int:
        return self.estimate.peak_bytes

    def to_dict(self) -> dict:
        return {
            "variant": self.variant,
            "preset": self.preset,
            "fits": self.fits,
            "peak_bytes": self.estimate.peak_bytes,
            "components": [r.to_dict() for r in self.estimate.components],
            "explanation": self.explanation,
            "hardware": self.hardware.to_dict(),
            "budget_bytes": self.budget_bytes,
            "ram_bytes": self.estimate.ram_bytes,
            "ram_budget_bytes": self.ram_budget_bytes,
            "speed_factor": self.estimate.speed_factor,
            "quality_cost": self.estimate.quality_notes,
            "width": self.estimate.width,
            "height": self.estimate.height,
            "rejected": [{"preset": r.preset, "reason": r.reason} for r in self.rejected],
        }


def _budget(preset: Preset, hw: Hardware) -> int:
    if preset.device == "cuda":
        return hw.vram_bytes
    if preset.device == "mps":
        return hw.mps_budget_bytes
    return max(hw.ram_total_bytes - OS_RAM_RESERVE_BYTES, 0)


def _ram_budget(hw: Hardware) -> int:
    return max(hw.ram_total_bytes - OS_RAM_RESERVE_BYTES, 0)


def fits(est: Estimate, preset: Preset, hw: Hardware) -> str | None:
    """Why ``est`` does not fit on ``hw`` (None when it does)."""
    if not est.feasible:
        return " ".join(est.notes)
    budget = _budget(preset, hw)
    where = {"cuda": "VRAM", "mps": "Metal budget", "cpu": "usable RAM"}[preset.device]
    if preset.placement == "balanced":
        for i, (need, g) in enumerate(zip(est.gpu_bytes, hw.gpus)):
            if need > g.total_bytes:
                return f"needs {gb(need)} on cuda:{i} > {gb(g.total_bytes)}"
    elif est.peak_bytes > budget:
        return f"needs {gb(est.peak_bytes)} > {gb(budget)} {where} (peak: {est.peak_phase})"
    if preset.device != "cpu" and est.ram_bytes > _ram_budget(hw):
        return f"needs {gb(est.ram_bytes)} RAM > {gb(_ram_budget(hw))} usable"
    return None


def choose(hardware: Hardware, variant: str, width: int = 1024, height: int = 1024) -> Plan:
    """The highest-ranked preset that can run on ``hardware`` and fits its memory.

    Presets are tried in ``quality_rank`` order (a total order); the first that passes
    ``check()`` and fits VRAM (CPU presets: RAM) and RAM wins. When none fits, the plan names
    the preset that needs the least accelerator memory and says ``fits=False``.
    """
    catalog.get_variant(variant)
    rejected: list[Rejection] = []
    closest: tuple[int, Preset, Estimate] | None = None
    chosen: tuple[Preset, Estimate] | None = None
    for p in presets_by_rank():
        reason = p.check(hardware)
        if reason:
            rejected.append(Rejection(p.name, reason))
            continue
        est = estimate(variant, p, width, height, hardware=hardware)
        why = fits(est, p, hardware)
        if why is None:
            chosen = (p, est)
            break
        rejected.append(Rejection(p.name, why))
        over = est.peak_bytes - _budget(p, hardware) if est.feasible else sys.maxsize
        if closest is None or over < closest[0]:
            closest = (over, p, est)
    if chosen is not None:
        p, est = chosen
        ok = True
    elif closest is not None:
        _, p, est = closest
        ok = False
    else:  # no preset can run at all (cannot happen: CPU presets always pass check)
        p = PRESETS["cpu-bf16"]
        est = estimate(variant, p, width, height, hardware=hardware)
        ok = False
    plan = Plan(
        variant=variant,
        preset=p.name,
        fits=ok,
        estimate=est,
        hardware=hardware,
        budget_bytes=_budget(p, hardware),
        ram_budget_bytes=_ram_budget(hardware),
        rejected=[r for r in rejected if PRESETS[r.preset].quality_rank > p.quality_rank]
        if ok
        else rejected,
    )
    plan.explanation = explain(plan)
    return plan


def explain(plan: Plan) -> str:
    """Per component device/dtype/bytes, slowdown, quality given up, and why better presets lost."""
    p = get_preset(plan.preset)
    est = plan.estimate
    v = catalog.get_variant(plan.variant)
    where = {"cuda": "GPU", "mps": "MPS", "cpu": "RAM"}[p.device]
    lines = []
    if plan.fits:
        lines.append(
            f"{v.label} at {est.width}×{est.height} fits with preset '{p.name}' ({p.label}): "
            f"peak {gb(est.peak_bytes)} of {gb(plan.budget_bytes)} {where} "
            f"(during {est.peak_phase}); RAM needed {gb(est.ram_bytes)} of "
            f"{gb(plan.ram_budget_bytes)} usable."
        )
    else:
        lines.append(
            f"No preset fits {v.label} at {est.width}×{est.height} on this machine. "
            f"The closest is '{p.name}' ({p.label}): it needs {gb(est.peak_bytes)} {where} "
            f"(have {gb(plan.budget_bytes)}) and {gb(est.ram_bytes)} RAM "
            f"(have {gb(plan.ram_budget_bytes)} usable). Try a smaller size, another variant, "
            "or a machine with more memory."
        )
    lines.append(p.description)
    for r in est.components:
        if r.bytes == 0:
            lines.append(f"  {r.label:<12} not loaded")
        else:
            lines.append(
                f"  {r.label:<12} {r.device:<28} {r.dtype:<9} {gb(r.bytes):>8}  {r.quantization}"
            )
    lines.append(
        "  activations: "
        + ", ".join(f"{COMPONENT_LABELS[c]} {gb(a)}" for c, a in est.activations.items())
        + f"; overhead {gb(CUDA_CONTEXT_BYTES + SAFETY_MARGIN_BYTES)} (CUDA context + margin)"
        * (p.device == "cuda")
    )
    if p.speed_factor == 1.0:
        lines.append("Speed: the fastest way to run it (baseline).")
    elif p.device == "cuda":
        lines.append(f"Speed: about {p.speed_factor:g}× the time of 'full' on the same GPU.")
    else:
        lines.append(f"Speed: roughly {p.speed_factor:g}× the time of 'full' on a mid-range GPU.")
    lines.append(f"Quality given up: {p.quality_cost}.")
    for note in est.notes:
        lines.append(f"Note: {note}")
    if plan.rejected:
        lines.append("Better presets rejected:" if plan.fits else "Presets tried:")
        for r in _collapse(plan.rejected):
            lines.append(f"  {r.preset} — {r.reason}")
    return "\n".join(lines)


def _collapse(rejected: list[Rejection]) -> list[Rejection]:
    """Merge presets rejected for the very same reason (e.g. "needs a CUDA GPU")."""
    out: list[Rejection] = []
    for r in rejected:
        for i, o in enumerate(out):
            if o.reason == r.reason:
                out[i] = Rejection(f"{o.preset}, {r.preset}", o.reason)
                break
        else:
            out.append(r)
    return out


# --- CLI --------------------------------------------------------------------------------------


def format_plan(plan: Plan) -> str:
    """The human report: hardware, the chosen plan, and a table of every preset."""
    v = catalog.get_variant(plan.variant)
    out = ["Hardware:"]
    out += ["  " + line for line in plan.hardware.describe().splitlines()]
    out.append("")
    status = "fits" if plan.fits else "DOES NOT FIT"
    out.append(f"Plan for {v.label} ({plan.variant}) at {plan.estimate.width}×{plan.estimate.height}: "
               f"{plan.preset} — {status}")
    out.append(plan.explanation)
    out.append("")
    out.append("All presets (peak on the accelerator, RAM needed):")
    out.append(f"  {'preset':<22} {'rank':>4} {'peak':>9} {'RAM':>9} {'speed':>6}  status")
    for p in presets_by_rank():
        reason = p.check(plan.hardware)
        if reason:
            status = "n/a: " + reason
            est = estimate(plan.variant, p, plan.estimate.width, plan.estimate.height)
        else:
            est = estimate(plan.variant, p, plan.estimate.width, plan.estimate.height, plan.hardware)
            why = fits(est, p, plan.hardware)
            status = "fits" if why is None else why
        mark = "→" if p.name == plan.preset else " "
        out.append(
            f"{mark} {p.name:<22} {p.quality_rank:>4} {gb(est.peak_bytes):>9} "
            f"{gb(est.ram_bytes):>9} {p.speed_factor:>5g}×  {status}"
        )
    return "\n".join(out)


def run_plan_command(args) -> int:
    """``launch.py plan``: print the plan; exit 0 when a preset fits, 1 when none does, 2 on
    bad arguments."""
    try:
        hw = detect_hardware(vram_gb=args.vram, ram_gb=args.ram, gpus=args.gpus, device=args.device)
        variant = catalog.get_variant(getattr(args, "variant", None) or catalog.DEFAULT_VARIANT)
    except (ValueError, KeyError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    width = getattr(args, "width", None) or variant.default_size[0]
    height = getattr(args, "height", None) or variant.default_size[1]
    if width <= 0 or height <= 0:
        print("error: --width and --height must be positive.", file=sys.stderr)
        return 2
    snapped = (width // catalog.SIZE_MULTIPLE * catalog.SIZE_MULTIPLE,
               height // catalog.SIZE_MULTIPLE * catalog.SIZE_MULTIPLE)
    if snapped != (width, height):
        print(f"note: {width}×{height} snapped to {snapped[0]}×{snapped[1]} (multiples of 16).",
              file=sys.stderr)
        width, height = snapped
    plan = choose(hw, variant.name, width, height)
    if getattr(args, "json", False):
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(format_plan(plan))
    return 0 if plan.fits else 1
