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

Activations (estimates; the factors below were measured where a CPU could measure them):

* Transformer forward: ``batch × tokens × hidden × bytes × 18`` (22 with dual attention), where
  tokens = (H/16)·(W/16) image patches + 77 CLIP + 256 T5 tokens, batch = 2 with CFG, hidden =
  heads × 64. The factor counts what one joint block keeps alive at once: both residual streams,
  the modulated norm output, q/k/v, the attention output and the 4× MLP hidden (two copies
  around the GELU). A full-size SD3.5 Medium (dual attention) measured 22 on CPU in bf16 (peak RSS
  over weights, 512² and 1024²); the earlier 14 + 4 was short by 4, so both factors carry it.
  CUDA bf16 attention runs flash / memory-efficient SDPA (no N² matrix); on MPS the score matrix
  (heads × N² × 2 copies) is added.
* VAE decode: ``(4 + slack) × C × H × W × bytes`` where C = ``block_out_channels[1]`` (256) —
  the widest feature map at full resolution (the last upsampler's output). The full-size decoder
  measured 4.0× that tensor live on CPU in bf16; the slack is per device: 0 on CPU, 1.0 on CUDA
  and MPS (cuDNN workspaces, allocator rounding — the CUDA total stays at the 5.0 used so far
  until ``python -m studio.bench_gpu`` measures it). At 1024² bf16 on CUDA that is 2.5 GB.
  Tiling (``VAE_TILE`` px tiles, diffusers' 25 % overlap) decodes one tile at a time: the peak
  is a tile's activations plus the decoded tiles and the output.
* Overhead on a CUDA GPU: 0.4 GB CUDA context + 0.5 GB safety margin per GPU.
* The process itself (Python, torch, the libraries) before any weight: ``BASE_RAM_BYTES`` per
  device — 0.81 GiB on CPU (0.41 measured after the imports + 0.4 retained after the first
  generation), 2 GiB with CUDA or MPS (their runtime libraries; kept until a GPU measures it).

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
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from studio import catalog
from studio.hardware import GB

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
# Python + torch + the libraries before any weight, per device (see the module docstring).
BASE_RAM_BYTES = {"cpu": int(0.81 * GB), "cuda": int(2.0 * GB), "mps": int(2.0 * GB)}
TRANSFORMER_ACT_FACTOR = 18
DUAL_ATTENTION_EXTRA = 4
VAE_DECODE_FACTOR = 4.0  # live decoder peak ÷ the widest full-resolution tensor (CPU, bf16)
VAE_DECODE_SLACK = {"cpu": 0.0, "cuda": 1.0, "mps": 1.0}  # workspaces / allocator slack
VAE_TILE = 512  # tile side in pixels when tiling (the studio sets it: diffusers' default is 1024)
VAE_TILE_OVERLAP = 0.25  # diffusers' tile_overlap_factor
NF4_BLOCKSIZE = 64
NF4_NESTED_BLOCKSIZE = 256


def _component_source(component: str, variant_name: str, classes: bool = True) -> tuple[type | None, dict]:
    """The class and the real config of one pipeline component of a catalog variant
    (``classes=False``: the config only, importing no model library)."""
    if not classes:
        configs = {"transformer": catalog.get_variant(variant_name).transformer_config,
                   "vae": catalog.VAE_CONFIG, "text_encoder": catalog.CLIP_L_CONFIG,
                   "text_encoder_2": catalog.CLIP_G_CONFIG, "text_encoder_3": catalog.T5_XXL_CONFIG}
        if component not in configs:
            raise KeyError(f"Unknown component {component!r}: one of {', '.join(COMPONENTS)}.")
        return None, configs[component]
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
    return {c: component_numbers(c, variant_name, Storage())["params"] for c in COMPONENTS}


def count_params(model: nn.Module) -> int:
    """The number of parameters of ``model`` (every tensor ``parameters()`` yields)."""
    return sum(p.numel() for p in model.parameters())


# --- storage: how a component's weights are held -----------------------------------------------

QUANTIZED_KINDS = ("int8", "nf4", "ao-int8", "ao-fp8", "gguf")  # per-Linear weight formats
STORAGE_KINDS = ("plain", "fp8", "int8", "nf4", "ao-int8", "ao-fp8", "gguf")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class Storage:
    """How one component's weights are stored.

    ``kind``: "plain" (everything in ``dtype``), "fp8" (diffusers layerwise casting: float8_e4m3fn
    storage, ``dtype`` compute), "int8" (bitsandbytes LLM.int8), "nf4" (bitsandbytes 4-bit
    NF4, ``dtype`` compute), "ao-int8" / "ao-fp8" (torchao int8 weight-only / fp8 weights and
    activations) or "gguf" (a GGUF file, dequantized per layer). ``dtype`` is the load (and
    compute) dtype of everything not quantized.
    """

    kind: str = "plain"
    dtype: torch.dtype = torch.bfloat16
    double_quant: bool = False

    def __post_init__(self):
        if self.kind not in STORAGE_KINDS:
            raise ValueError(f"Unknown storage kind {self.kind!r}: one of {', '.join(STORAGE_KINDS)}.")

    @property
    def dtype_name(self) -> str:
        """The load dtype's short name ("bf16", "fp16", "fp32"; torch's own name for another)."""
        return _DTYPE_NAMES.get(self.dtype, str(self.dtype).removeprefix("torch."))

    @property
    def label(self) -> str:
        """The dtype column: what the weights are stored as."""
        return {"plain": self.dtype_name, "fp8": "fp8 e4m3", "int8": "int8", "nf4": "nf4",
                "ao-int8": "int8", "ao-fp8": "fp8 e4m3", "gguf": "gguf"}[self.kind]

    @property
    def key(self) -> str:
        """A stable text key (the counts table's)."""
        return f"{self.kind}:{self.dtype_name}" + (":dq" if self.double_quant else "")

    @property
    def quantization(self) -> str:
        """The quantization column: how the weights are stored and what they compute in."""
        d = self.dtype_name
        return {
            "plain": "none",
            "fp8": f"layerwise casting (fp8 storage, {d} compute)",
            "int8": f"bitsandbytes LLM.int8 (non-Linear {d})",
            "nf4": f"bitsandbytes NF4{' + double quant' if self.double_quant else ''} "
            f"({d} compute)",
            "ao-int8": f"torchao int8 weight-only (per-row scales, {d} compute)",
            "ao-fp8": "torchao fp8 weights + dynamic fp8 activations (per-row scales, fp8 compute)",
            "gguf": f"GGUF file, dequantized layer by layer ({d} compute)",
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
    if storage.kind in ("int8", "ao-int8", "ao-fp8"):
        return n + weight.shape[0] * 4  # 1-byte weight + fp32 row scales (bnb SCB / torchao scale)
    if storage.kind == "gguf":
        return math.ceil(n / 32) * 34  # Q8_0: 32 int8 + one fp16 scale per block
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
    quant = _bnb_converted_linears(model) if storage.kind in QUANTIZED_KINDS else set()
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
    config: dict,
    width: int,
    height: int,
    dtype_bytes: int = 2,
    attention_matrix: bool = False,
    device: str = "cuda",
    tiled: bool = False,
) -> int:
    """Peak activations of an AutoencoderKL decode of one image at width × height on ``device``.

    ``tiled``: diffusers' tiled decode with ``VAE_TILE`` px tiles (what the studio sets when it
    tiles): one tile's activations, plus every decoded tile (kept until they are blended) and the
    blended output."""
    channels = list(config["block_out_channels"])
    widest_full_res = channels[1] if len(channels) > 1 else channels[0]
    factor = VAE_DECODE_FACTOR + VAE_DECODE_SLACK.get(device, 1.0)
    scale = 2 ** (len(channels) - 1)
    out_channels = config.get("out_channels", 3)
    if tiled and (width > VAE_TILE or height > VAE_TILE):
        tile = VAE_TILE
        step = int(tile // scale * (1 - VAE_TILE_OVERLAP)) * scale  # latent stride, in pixels
        tiles = math.ceil(height / step) * math.ceil(width / step)
        act = factor * widest_full_res * tile * tile * dtype_bytes
        act += (tiles * tile * tile + width * height) * out_channels * dtype_bytes
        n = (tile // scale) ** 2
    else:
        act = factor * widest_full_res * width * height * dtype_bytes
        n = (width // scale) * (height // scale)
    if attention_matrix:  # the mid-block self-attention over the latent pixels
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




# --- the counts table: every catalog component under every storage, counted once ---------------
#
# Counting needs the model classes on the meta device, and importing any diffusers model imports
# peft, which imports bitsandbytes (and bitsandbytes prints warnings on some CPUs). The planner
# therefore reads the numbers of the catalog's components from ``studio.memory.counts``, a table
# written by ``python -m studio.memory.bytes`` and checked against the live count by the tests;
# any other config (a foreign folder, the bench's scaled-down models) is counted live.

COUNT_STORAGES = tuple(
    Storage(kind, dtype)
    for kind, dtype in (
        ("plain", torch.bfloat16), ("plain", torch.float16), ("plain", torch.float32),
        ("fp8", torch.bfloat16), ("fp8", torch.float32), ("int8", torch.bfloat16),
        ("nf4", torch.bfloat16), ("ao-int8", torch.bfloat16), ("ao-fp8", torch.bfloat16),
        ("gguf", torch.bfloat16),
    )
)


def config_key(component: str, config: dict) -> str:
    """The counts table's key of a component config."""
    import hashlib

    blob = json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True)
    return f"{component}:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def live_numbers(model: nn.Module, storage: Storage) -> dict[str, int]:
    """What the planner needs of one model under one storage, counted on the model itself."""
    buffers, leaf = sequential_offload_footprint(model, storage)
    return {
        "bytes": weight_bytes(model, storage),
        "group": group_offload_footprint(model, storage, use_stream=True),
        "buffers": buffers,
        "leaf": leaf,
        "dequant": largest_dequant_bytes(model, storage),
    }


def _catalog_configs() -> dict[str, tuple[str, str]]:
    """{counts key: (component, a variant that has it)} for every catalog component config."""
    out = {}
    for name in catalog.VARIANTS:
        for component in COMPONENTS:
            _, config = _component_source(component, name, classes=False)
            out.setdefault(config_key(component, config), (component, name))
    return out


@lru_cache(maxsize=None)
def component_numbers(component: str, variant_name: str, storage: Storage) -> dict[str, int]:
    """{bytes, group, buffers, leaf, dequant, params} of a catalog component under ``storage``:
    from the counts table when it has the entry, else counted live on the meta device."""
    _, config = _component_source(component, variant_name, classes=False)
    from studio.memory.counts import COUNTS

    entry = COUNTS.get(config_key(component, config), {})
    if storage.key in entry and "params" in entry:
        return {**entry[storage.key], "params": entry["params"]}
    model = meta_model(component, variant_name)
    return {**live_numbers(model, storage), "params": count_params(model)}


# --- ControlNets -------------------------------------------------------------------------------


def controlnet_meta_model(name: str) -> nn.Module:
    """A catalog ControlNet (``studio.control_catalog``) on the meta device, from its real config
    (cached; the three SD3.5 Large ControlNets share one config, so one model)."""
    from diffusers import SD3ControlNetModel

    from studio.control_catalog import controlnet_config

    config = controlnet_config(name)
    return _meta_model_cached(SD3ControlNetModel.__module__, SD3ControlNetModel.__qualname__,
                              json.dumps(config, sort_keys=True))


@lru_cache(maxsize=None)
def controlnet_numbers(name: str, storage: Storage) -> dict[str, int]:
    """{bytes, group, buffers, leaf, dequant, params, layers, inner_dim, text} of a catalog
    ControlNet under ``storage``: the byte counts from the counts table when it has the entry
    (else counted live on the meta device), and what its activations depend on."""
    from studio.control_catalog import controlnet_config
    from studio.memory.counts import COUNTS

    config = controlnet_config(name)
    shape = {"layers": int(config["num_layers"]),
             "inner_dim": int(config["num_attention_heads"]) * int(config["attention_head_dim"]),
             "text": int(config.get("joint_attention_dim") is not None)}
    entry = COUNTS.get(config_key("controlnet", config), {})
    if storage.key in entry and "params" in entry:
        return {**entry[storage.key], "params": entry["params"], **shape}
    model = controlnet_meta_model(name)
    return {**live_numbers(model, storage), "params": count_params(model), **shape}


def controlnet_residual_bytes(name: str, width: int, height: int, batch: int, dtype_bytes: int) -> int:
    """What a ControlNet hands the transformer at every step, alive through the transformer's
    forward: one hidden state per ControlNet block over the image tokens."""
    from studio.control_catalog import controlnet_config

    config = controlnet_config(name)
    n = controlnet_numbers(name, Storage())
    patch = config.get("patch_size", 2)
    tokens = (height // (8 * patch)) * (width // (8 * patch))
    return int(n["layers"] * batch * tokens * n["inner_dim"] * dtype_bytes)


def _catalog_controlnets() -> dict[str, str]:
    """{counts key: a ControlNet id that has it} for every catalog ControlNet config."""
    from studio.control_catalog import CONTROLNETS, controlnet_config

    out: dict[str, str] = {}
    for name in CONTROLNETS:
        out.setdefault(config_key("controlnet", controlnet_config(name)), name)
    return out


def write_counts(path=None) -> str:
    """Count every catalog component and ControlNet under every ``COUNT_STORAGES`` entry and
    write the table."""
    from pathlib import Path

    table = {}
    models = [(key, meta_model(component, variant)) for key, (component, variant) in _catalog_configs().items()]
    models += [(key, controlnet_meta_model(name)) for key, name in _catalog_controlnets().items()]
    for key, model in sorted(models, key=lambda km: km[0]):
        entry = {"params": count_params(model)}
        for storage in COUNT_STORAGES:
            entry[storage.key] = live_numbers(model, storage)
        table[key] = entry
    import diffusers
    import transformers

    text = (
        '"""Generated by ``python -m studio.memory.bytes`` (diffusers ' + diffusers.__version__
        + ", transformers " + transformers.__version__ + "):\nwhat each catalog component and ControlNet holds "
        "under each storage, counted on the meta device.\nDo not edit; tests/test_memory.py checks "
        'it against the live count."""\n\n'
        "COUNTS = " + json.dumps(table, indent=1, sort_keys=True) + "\n"
    )
    target = Path(path) if path else Path(__file__).with_name("counts.py")
    target.write_text(text)
    return str(target)


if __name__ == "__main__":
    print(write_counts())
