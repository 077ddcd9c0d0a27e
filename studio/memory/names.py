"""The memory presets' names, importable without torch (for ``--help`` and the UI's first paint).

``studio.memory.presets`` defines the presets themselves and checks at import that its table
holds exactly these names, in this order (quality rank order is the presets' own)."""

PRESET_NAMES = (
    "full", "multi-gpu-balanced", "model-offload", "t5-8bit", "t5-8bit-offload", "group-offload",
    "fp8-model-offload", "fp8-layerwise", "nf4-t5-8bit", "nf4-t5-8bit-offload", "nf4-t5-4bit",
    "nf4-t5-4bit-offload", "no-t5", "nf4-no-t5-offload", "sequential-offload", "mps", "cpu-fp32", "cpu-bf16",
)
