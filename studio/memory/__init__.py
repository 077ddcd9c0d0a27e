"""Memory: presets and the planner. Nothing here loads weights; every number is counted from the
real component configs on the meta device.

    bytes.py     what each component holds under each storage (bf16, fp8, int8, NF4, torchao,
                 GGUF), activations; counts.py is its table for the catalog's components
    presets.py   a preset = one choice per axis (transformer storage, T5, offload, VAE tiling):
                 load kwargs, post-load steps, what hardware it needs, what it costs; the 18
                 named presets are shortcuts, any other combination has a composed name
    planner.py   per-phase peaks for a variant under a preset, and the search for the best
                 combination that fits (``choose``), or one preset explained (``plan_for``)
    names.py     the named presets' names, without torch
"""

import importlib

# Lazy re-exports (PEP 562): ``studio.memory.names`` stays importable without torch.
_EXPORTS = {
    "studio.memory.bytes": (
        "BASE_RAM_BYTES", "CLIP_TOKENS", "COMPONENTS", "CUDA_CONTEXT_BYTES", "DUAL_ATTENTION_EXTRA",
        "SAFETY_MARGIN_BYTES", "TRANSFORMER_ACT_FACTOR", "VAE_DECODE_FACTOR", "VAE_DECODE_SLACK", "VAE_TILE",
        "Storage", "allocated_bytes", "build_meta_model", "component_numbers", "component_params", "count_params",
        "group_offload_footprint", "largest_dequant_bytes", "meta_model", "module_bytes",
        "text_encoder_activation_bytes", "transformer_activation_bytes", "vae_decode_bytes", "weight_bytes",
    ),
    "studio.memory.planner": ("Estimate", "HiresFit", "Plan", "budget_bytes", "candidate_presets", "choose",
                              "estimate", "explain", "fits", "hires_fit", "plan_for", "ram_budget_bytes"),
    "studio.memory.presets": ("PRESETS", "Preset", "apply_fp8_storage", "compose", "enable_vae_tiling", "get_preset",
                              "keep_on_cpu", "parse_preset_name", "presets_by_rank"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'studio.memory' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
