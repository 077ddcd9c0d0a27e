"""How components are loaded and placed (device, dtype, quantization, offload hooks).

A :class:`Placement` is what the model manager needs; :func:`placement_from_preset` makes one
from a memory preset (``studio.memory``). Which preset to use is decided once, by the service
(``Studio.placement``), for every load.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable

@dataclass
class Placement:
    """How components are loaded and placed. The memory presets produce these."""

    name: str = "auto"
    device: str = "cpu"
    dtype: object = None  # torch dtype
    component_kwargs: dict = field(default_factory=dict)  # extra from_pretrained kwargs per component
    skip: tuple[str, ...] = ()  # components left out (e.g. text_encoder_3 for no-T5)
    apply: Callable | None = None  # post-load step (offload hooks, layerwise casting)
    pipeline_kwargs: dict | None = None  # load the whole pipeline at once (multi-GPU device_map)
    resident: bool = True  # every component stays on ``device`` (no offload hooks)
    reason: str = ""  # why this placement, when it is not the planner's choice (shown in the status)
    preset: object = None  # the memory Preset that made it (it also stores and places ControlNets)

    def key(self, component: str) -> str:
        """What, beyond the files, makes a loaded component what it is (dtype, quantization)."""
        extra = json.dumps(self.component_kwargs.get(component, {}), sort_keys=True,
                           default=lambda o: o.to_dict() if hasattr(o, "to_dict") else repr(o))
        digest = hashlib.sha256(extra.encode()).hexdigest()[:12]
        return f"{self.name}:{self.device}:{str(self.dtype).replace('torch.', '')}:{digest}"


def default_placement(device: str | None = None) -> Placement:
    """The placement when no preset decides: ``device`` (default: CUDA, else MPS, else the CPU)
    at its usual dtype (bf16, fp16, fp32), resident."""
    import torch

    if device is None:
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    dtype = {"cuda": torch.bfloat16, "mps": torch.float16}.get(device, torch.float32)
    return Placement(name="full" if device != "cpu" else "cpu-fp32", device=device, dtype=dtype)


def placement_from_preset(preset, device: str, hardware=None, validate_on_cpu: bool = False) -> Placement:
    """Turn a memory preset (studio.memory) into per-component loading and a post-load step.

    ``validate_on_cpu``: run a CUDA preset's loading on the CPU as far as the libraries allow —
    8-bit / NF4 T5 (transformers + bitsandbytes) and fp8 layerwise casting run; an NF4
    transformer stops at diffusers' refusal, reported as a ModelError. Used by the tests to hold
    the planner's byte estimates against what loading really allocates.
    """
    from studio.memory import apply_fp8_storage

    if validate_on_cpu:
        kwargs = preset.load_kwargs("cuda")
        kwargs.pop("device_map", None)
        device = "cpu"

        def apply(pipe):
            if preset.transformer == "fp8":
                apply_fp8_storage(pipe.transformer, preset.dtype)
            return pipe
    else:
        kwargs = preset.load_kwargs(device, hardware)

        def apply(pipe):
            return preset.apply(pipe, device)

    quant = kwargs.get("quantization_config")
    mapping = dict(getattr(quant, "quant_mapping", None) or {})
    no_t5 = "text_encoder_3" in kwargs and kwargs["text_encoder_3"] is None
    return Placement(
        name=preset.name,
        device=device,
        dtype=kwargs["dtype"],
        component_kwargs={name: {"quantization_config": cfg} for name, cfg in mapping.items()},
        skip=("text_encoder_3", "tokenizer_3") if no_t5 else (),
        apply=apply,
        pipeline_kwargs=kwargs if "device_map" in kwargs else None,
        resident=validate_on_cpu or (preset.placement == "resident" and preset.t5 != "cpu"),  # a CPU-kept T5 stays
        preset=preset,
    )


