"""``--compile``: ``torch.compile`` of the SD3 transformer, block by block.

SD3 defines no ``_repeated_blocks``, so diffusers' ``compile_repeated_blocks()`` raises; the
studio compiles each ``transformer.transformer_blocks[i]`` in place (``nn.Module.compile``). The
blocks of a variant share their shapes, so dynamo compiles the first and reuses the graph for the
others (the dual-attention blocks of SD3.5 Medium and the context_pre_only last block get their
own); the rest of the transformer (embeddings, norm_out) stays eager.

Compiling is lazy: ``compile_transformer`` only wraps the blocks, and the first generation pays
for the compilation (tens of seconds with inductor on a GPU, minutes on a CPU). ``FirstRunReport``
tells a progress callback when the first transformer pass starts compiling and how long it took,
so the wait is explained rather than looking like a hang.

Refused (``compile_problem``), with the reason:

* sequential offload — accelerate moves every layer's weights in and out around each call inside
  the compiled region: graph breaks on every layer, and nothing left to gain;
* group offload — its onload/offload hooks wrap every block and are excluded from compilation
  (``torch.compiler.disable``): the blocks would compile between two graph breaks, unverified on a
  GPU, so refused until ``python -m studio.bench_gpu --compile`` measures it;
* the multi-GPU preset — blocks stay whole on one GPU there, but the transformer's activations
  hop between devices; untested.

Compiled blocks work with the step cache (``studio.engine.stepcache``): its hooks sit around the
blocks and its decision is excluded from compilation; tests/test_compile.py runs both together.
"""

from __future__ import annotations

import time
from typing import Callable

COMPILE_BACKEND = "inductor"
COMPILE_SUFFIX = "+compile"  # added to a placement's name: a compiled transformer is never shared


def compile_problem(placement: str | object) -> str | None:
    """Why the transformer cannot be compiled under this preset / placement (None when it can).

    ``placement``: a memory Preset (anything with a ``placement`` attribute) or a placement kind
    ("resident", "model", "group", "sequential", "balanced")."""
    kind = getattr(placement, "placement", placement)
    if kind == "sequential":
        return ("--compile does not combine with sequential offload: accelerate moves every layer's weights "
                "around each call, which breaks the compiled graph at every layer. Pick a preset without "
                "sequential offload, or run without --compile.")
    if kind == "group":
        return ("--compile is not combined with group offload: its per-block onload/offload hooks are kept "
                "out of compilation, so every block would sit between graph breaks (unverified on a GPU). "
                "Pick a preset with model offload or none, or run without --compile.")
    if kind == "balanced":
        return "--compile is not combined with the multi-GPU preset (untested across devices)."
    return None


def is_compiled(transformer) -> bool:
    """Whether every transformer block is wrapped by ``torch.compile`` (False when it has none)."""
    blocks = getattr(transformer, "transformer_blocks", ())
    return bool(blocks) and all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)


def compile_transformer(transformer, backend: str = COMPILE_BACKEND, mode: str | None = None,
                        progress: Callable[[str], None] | None = None, **options) -> int:
    """``torch.compile`` every ``transformer.transformer_blocks[i]`` in place. Idempotent: returns
    how many blocks were newly wrapped (0 when all already were). With ``progress``, the first
    transformer pass reports its compilation (``FirstRunReport``)."""
    n = 0
    for block in transformer.transformer_blocks:
        if getattr(block, "_compiled_call_impl", None) is None:
            block.compile(backend=backend, mode=mode, **options)
            n += 1
    if n and progress is not None:
        FirstRunReport(transformer, progress, backend)
    return n


class FirstRunReport:
    """Says through ``progress`` when the first pass of a freshly compiled transformer starts (it
    compiles) and how long it took; removes itself after that pass."""

    def __init__(self, transformer, progress: Callable[[str], None], backend: str = COMPILE_BACKEND):
        self.progress = progress
        self.backend = backend
        self.seconds: float | None = None
        self._t0 = 0.0
        self._handles = [transformer.register_forward_pre_hook(self._pre),
                         transformer.register_forward_hook(self._post)]

    def _pre(self, module, args):
        self._t0 = time.perf_counter()
        self.progress(f"Compiling the transformer blocks ({self.backend}): the first step takes a while, "
                      "later steps and images run compiled")

    def _post(self, module, args, output):
        self.seconds = time.perf_counter() - self._t0
        for handle in self._handles:
            handle.remove()
        self.progress(f"Compiled in {self.seconds:.1f} s")


def with_compile(placement, backend: str = COMPILE_BACKEND, mode: str | None = None,
                 progress: Callable[[str], None] | None = None):
    """A model-manager Placement (``studio.models.placement.Placement``) whose post-load step also
    compiles the transformer's blocks. Its name gets ``+compile`` so the model manager never hands
    a compiled transformer to an uncompiled placement (the name is part of a component's identity).
    Raises ValueError with the reason for a placement ``compile_problem`` refuses."""
    import dataclasses

    kind = ("resident" if placement.resident else "balanced" if placement.pipeline_kwargs is not None
            else _kind_from_name(placement.name))
    problem = compile_problem(kind)
    if problem:
        raise ValueError(problem)
    base = placement.apply
    device = placement.device

    def apply(pipe):
        pipe = base(pipe) if base else pipe.to(device)
        compile_transformer(pipe.transformer, backend, mode, progress)
        return pipe

    return dataclasses.replace(placement, name=f"{placement.name}{COMPILE_SUFFIX}", apply=apply)


def _kind_from_name(name: str) -> str:
    """The placement kind of a non-resident preset name (named or composed)."""
    from studio.memory import get_preset

    try:
        return get_preset(name.removesuffix(COMPILE_SUFFIX)).placement
    except KeyError:
        return "model"
