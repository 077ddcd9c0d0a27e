"""The planner: per-component bytes and per-phase peaks for a variant under a preset, and the
search for the best combination of choices that fits this machine — explained per component
(which better choice on each axis was rejected, and why).

The search space is every valid combination of the axes in ``studio.memory.presets`` for the
studio's device (on CUDA: five transformer storages × five T5 choices × four placements × VAE
tiling, plus the multi-GPU preset), ranked by ``Preset.cost`` (quality points lost + a weight per
doubling of the time). The cheapest combination whose peak fits the accelerator and whose RAM
fits the *available* RAM wins; a combination equal to a named preset is reported by that name.
Every budget only ever admits more combinations as it grows, so more VRAM or more RAM never gives
a worse plan.

See ``studio.memory.bytes`` for how every number is counted. Nothing here imports diffusers,
transformers or bitsandbytes for the catalog's variants (the counts come from a table).
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass, field

import torch

from studio import catalog
from studio.hardware import GB, Hardware

from studio.memory.bytes import (
    BASE_RAM_BYTES,
    CLIP_TOKENS,
    COMPONENT_LABELS,
    COMPONENTS,
    CUDA_CONTEXT_BYTES,
    MPS_MARGIN_BYTES,
    PHASES,
    SAFETY_MARGIN_BYTES,
    TEXT_ENCODERS,
    Storage,
    component_numbers,
    component_params,
    controlnet_numbers,
    controlnet_residual_bytes,
    text_encoder_activation_bytes,
    transformer_activation_bytes,
    vae_decode_bytes,
)
from studio.memory.presets import (
    BF16,
    FP32,
    PRESETS,
    QUALITY_LOSS,
    SPEED,
    SPEED_WEIGHT,
    T5_CHOICES,
    Preset,
    compose,
    get_preset,
)

AXES = ("transformer", "t5", "placement", "vae")
AXIS_LABELS = {"transformer": "Transformer", "t5": "T5", "placement": "Offload", "vae": "VAE"}
CHOICE_LABELS = {
    "transformer": {"plain": "bf16", "fp8": "fp8 layerwise", "ao-int8": "int8 weight-only (torchao)",
                    "ao-fp8": "fp8 compute (torchao)", "nf4": "NF4", "gguf": "GGUF"},
    "t5": {"plain": "bf16", "int8": "8-bit", "nf4": "4-bit", "cpu": "on the CPU", "none": "dropped"},
    "placement": {"resident": "none (resident)", "model": "model offload", "group": "group offload",
                  "sequential": "sequential offload", "balanced": "multi-GPU"},
    "vae": {"full": "whole-image decode", "tiled": "tiled decode"},
}

# --- estimates --------------------------------------------------------------------------------


@dataclass
class ComponentRow:
    """One pipeline component of an estimate: where it sits, what it is stored as, its bytes and
    parameters."""
    component: str  # pipeline attribute: text_encoder, ..., vae
    label: str
    device: str
    dtype: str
    quantization: str
    bytes: int
    params: int

    def to_dict(self) -> dict:
        """The row as a plain dict (``launch.py plan --json``)."""
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
    """Memory needed by one variant under one preset at one size: per component, per phase, the peak
    and the RAM, with the slowdown and quality cost."""
    variant: str
    preset: str
    width: int
    height: int
    components: list[ComponentRow]
    peak_bytes: int  # most on one accelerator (CPU presets: RAM) in any phase, with overhead
    peak_phase: str
    phase_bytes: dict[str, int]  # phase -> bytes on the (busiest) accelerator
    ram_bytes: int  # system RAM needed at its peak
    speed_factor: float
    quality_notes: str
    activations: dict[str, int] = field(default_factory=dict)
    gpu_bytes: list[int] = field(default_factory=list)  # per GPU (multi-GPU preset)
    notes: list[str] = field(default_factory=list)
    feasible: bool = True  # False: the placement itself fails (e.g. a component fits no GPU)
    ram_parts: dict[str, int] = field(default_factory=dict)  # what ram_bytes is made of
    overhead_bytes: int = 0  # CUDA context + safety margin (MPS margin) in every phase's peak

    @property
    def weights_bytes(self) -> int:
        """The bytes of every component's weights together."""
        return sum(r.bytes for r in self.components)

    def to_dict(self) -> dict:
        """The byte figures and notes as a plain dict."""
        return {
            "peak_bytes": self.peak_bytes,
            "peak_phase": self.peak_phase,
            "phase_bytes": dict(self.phase_bytes),
            "activations": dict(self.activations),
            "overhead_bytes": self.overhead_bytes,
            "weights_bytes": self.weights_bytes,
            "ram_bytes": self.ram_bytes,
            "ram_parts": dict(self.ram_parts),
            "gpu_bytes": list(self.gpu_bytes),
            "notes": list(self.notes),
        }


def _numbers(component: str, variant: str, storage: Storage, override: int | None) -> dict[str, int]:
    """The component's counts; ``override``: the real bytes of the weights in the user's file
    (a GGUF or scaled-fp8 header), which scale the offload footprints alike."""
    n = dict(component_numbers(component, variant, storage))
    if override:
        scale = override / max(n["bytes"], 1)
        for key in ("group", "leaf", "buffers"):
            n[key] = int(n[key] * scale)
        n["bytes"] = int(override)
    return n


def _device_label(preset: Preset, component: str, gpu: int | None = None) -> str:
    dev = preset.device
    if preset.runs_on(component) == "cpu" and dev != "cpu":
        return "cpu (kept there)"
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


@dataclass
class _Nets:
    """The ControlNets of an estimate: their rows and what they add per placement."""
    rows: list[ComponentRow] = field(default_factory=list)
    weights: int = 0  # every ControlNet's stored bytes
    on_device: int = 0  # what stays on the device under group offload (position-embedding copies)
    group: int = 0  # the largest net's group-offload footprint
    buffers: int = 0  # sequential offload: buffers left on the device
    leaf: int = 0  # sequential offload: the largest leaf layer
    activations: int = 0  # the largest net's forward (with its dequantized layer)
    residuals: int = 0  # every net's block outputs, alive through the transformer's forward
    load_transient: int = 0  # RAM while the largest net loads in the dtype (before any fp8 cast)
    notes: list[str] = field(default_factory=list)
    feasible: bool = True


def _controlnet_parts(p: Preset, variant: str, names, width: int, height: int, batch: int, el: int,
                      t5_seq: int, on_mps: bool) -> _Nets:
    """Counts for the ControlNets ``names`` (catalog ids) beside ``variant`` under preset ``p``:
    each from its real config on the meta device, stored as ``p.controlnet_storage()``."""
    from studio.control_catalog import controlnet_config, get_controlnet

    out = _Nets()
    if not names:
        return out
    storage = p.controlnet_storage()
    place = p.controlnet_placement
    plain = Storage("plain", p.dtype)
    transformer = catalog.get_variant(variant).transformer_config
    for name in names:
        entry = get_controlnet(name)
        config = controlnet_config(name)
        n = controlnet_numbers(name, storage)
        text = CLIP_TOKENS + t5_seq if n["text"] else 0
        device = {"resident": p.device, "model": f"cpu ⇄ {p.device} (model offload)",
                  "group": f"cpu ⇄ {p.device} (per block)", "sequential": f"cpu ⇄ {p.device} (per layer)",
                  "balanced": "—"}[place]
        out.rows.append(ComponentRow("controlnet", "ControlNet", device, storage.label,
                                     f"{storage.quantization}; {entry.label}", n["bytes"], n["params"]))
        out.weights += n["bytes"]
        out.group = max(out.group, n["group"])
        out.buffers += n["buffers"]
        out.leaf = max(out.leaf, n["leaf"])
        out.activations = max(out.activations, n["dequant"] + transformer_activation_bytes(
            config, width, height, batch, el, text_tokens=text, attention_matrix=on_mps))
        out.residuals += controlnet_residual_bytes(name, width, height, batch, el)
        out.load_transient = max(out.load_transient, controlnet_numbers(name, plain)["bytes"])
        if not config.get("use_pos_embed", True):
            # the pipeline gives the net a copy of the transformer's position embedding (shared
            # with it only when no hook moves the transformer)
            hidden = transformer["num_attention_heads"] * transformer["attention_head_dim"]
            patch = transformer["patch_size"] ** 2 * transformer["in_channels"]
            copy = (transformer["pos_embed_max_size"] ** 2 + patch + 1) * hidden * el
            if place in ("model", "group"):
                out.weights += copy
                out.on_device += copy if place == "group" else 0
            if place == "sequential":
                out.feasible = False
                out.notes.append(f"{entry.label} reuses the transformer's position embedding, which "
                                 "sequential offload keeps off the device: pick model or group offload.")
    if place == "balanced":
        out.feasible = False
        out.notes.append("A ControlNet cannot join a pipeline spread over several GPUs (device_map).")
    labels = ", ".join(get_controlnet(n).label for n in names)
    out.notes.append(f"ControlNet{'s' if len(names) > 1 else ''} {labels}: {gb(out.weights)} stored as "
                     f"{storage.label} ({'with' if storage.kind == p.transformer else 'beside'} the "
                     f"{CHOICE_LABELS['transformer'][p.transformer]} transformer), "
                     f"{gb(out.residuals)} of residuals alive in every denoise step.")
    return out


def estimate(
    variant: str,
    preset: str | Preset,
    width: int = 1024,
    height: int = 1024,
    hardware: Hardware | None = None,
    component_bytes: dict[str, int] | None = None,
    controlnets: tuple[str, ...] | list[str] = (),
) -> Estimate:
    """Memory needed by ``variant`` loaded with ``preset`` at ``width`` × ``height``.

    ``hardware`` only matters for the multi-GPU preset (how many GPUs, how large); without it
    two GPUs large enough for every component are assumed. ``component_bytes``: the real bytes
    of components read from the user's files ({"transformer": n} for a GGUF file), used in place
    of the counted ones. ``controlnets``: catalog ControlNet ids used with it, stored and placed
    with the transformer (``Preset.controlnet_storage`` / ``controlnet_placement``).
    """
    v = catalog.get_variant(variant)
    p = preset if isinstance(preset, Preset) else get_preset(preset)
    params = component_params(variant)
    el = torch.finfo(p.dtype).bits // 8
    batch = 2 if v.uses_cfg else 1
    dev = p.device
    on_mps = dev == "mps"
    t5_seq = v.max_sequence_length
    overrides = component_bytes or {}

    rows: list[ComponentRow] = []
    numbers: dict[str, dict[str, int]] = {}
    for comp in COMPONENTS:
        st = p.storage(comp)
        if st is None:
            rows.append(ComponentRow(comp, COMPONENT_LABELS[comp], "not loaded", "—", "—", 0, 0))
            continue
        numbers[comp] = _numbers(comp, variant, st, overrides.get(comp))
        rows.append(
            ComponentRow(
                comp, COMPONENT_LABELS[comp], _device_label(p, comp), st.label,
                st.quantization, numbers[comp]["bytes"], params[comp],
            )
        )

    nets = _controlnet_parts(p, variant, controlnets, width, height, batch, el, t5_seq, on_mps)
    rows += nets.rows

    # activations per component while it runs (a T5 kept on the CPU: there, in RAM)
    act = {
        "text_encoder": text_encoder_activation_bytes(catalog.CLIP_L_CONFIG, CLIP_TOKENS, batch, el),
        "text_encoder_2": text_encoder_activation_bytes(catalog.CLIP_G_CONFIG, CLIP_TOKENS, batch, el),
        "text_encoder_3": text_encoder_activation_bytes(catalog.T5_XXL_CONFIG, t5_seq, batch, el),
        "transformer": transformer_activation_bytes(
            v.transformer_config, width, height, batch, el,
            text_tokens=CLIP_TOKENS + t5_seq, attention_matrix=on_mps,
        ),
        "vae": vae_decode_bytes(catalog.VAE_CONFIG, width, height, el, attention_matrix=on_mps,
                                device=dev, tiled=p.vae == "tiled"),
    }
    for comp in numbers:  # quantized / fp8 layers are dequantized one at a time
        act[comp] += numbers[comp]["dequant"]
    act = {c: a for c, a in act.items() if c in numbers}
    if nets.rows and "transformer" in act:
        # each step runs the ControlNets first, then the transformer with their residuals alive
        act["transformer"] = max(act["transformer"], nets.activations) + nets.residuals
    phase_of = {
        c: "text encode" if c in TEXT_ENCODERS else "denoise" if c == "transformer" else "decode"
        for c in numbers
    }

    weights = {c: numbers[c]["bytes"] for c in numbers}
    total_w = sum(weights.values())
    cpu_kept = {c for c in numbers if p.runs_on(c) == "cpu" and dev != "cpu"}
    gpu_side = [c for c in numbers if c not in cpu_kept]
    bnb = {c for c in numbers if p.storage(c).kind in ("int8", "nf4")}  # quantized straight onto the GPU
    # fp8 layerwise casting happens after loading: the bf16 weights pass through RAM first
    fp8_transient = 0
    if "transformer" in numbers and p.transformer == "fp8":
        plain = _numbers("transformer", variant, Storage("plain", p.dtype), None)["bytes"]
        fp8_transient = max(plain - weights["transformer"], 0)
    cpu_act = max((act[c] for c in cpu_kept), default=0)
    base = BASE_RAM_BYTES[dev]
    overhead = {"cuda": CUDA_CONTEXT_BYTES + SAFETY_MARGIN_BYTES, "mps": MPS_MARGIN_BYTES}.get(dev, 0)
    notes: list[str] = list(nets.notes)
    gpu_bytes: list[int] = []
    feasible = nets.feasible
    ram_parts: dict[str, int] = {"base": base}
    cn_w, cn_on = nets.weights, nets.on_device  # all ControlNets' weights; what stays on the device

    def phase_peaks(resident_of) -> dict[str, int]:
        """resident_of(c) -> bytes on the accelerator while component c runs (with activations)."""
        out = dict.fromkeys(PHASES, 0)
        for c in gpu_side:
            out[phase_of[c]] = max(out[phase_of[c]], resident_of(c))
        return out

    if cn_w:
        ram_parts["controlnets"] = cn_w  # in RAM whenever they are not on the device

    if dev == "cpu":
        phases = phase_peaks(lambda c: total_w + cn_w + act[c])
        peak = max(max(phases.values()), total_w + cn_w + max(fp8_transient, nets.load_transient)) + base
        ram_parts.update(weights=total_w, activations=max(act.values(), default=0))
        ram = peak
    elif dev == "mps":
        phases = phase_peaks(lambda c: total_w + cn_w + act[c] + overhead)
        peak = max(phases.values())
        ram_parts.update(weights=total_w, activations=max(act.values(), default=0))
        ram = total_w + cn_w + max(act.values(), default=0) + base
    elif p.placement == "resident":
        on_gpu = sum(weights[c] for c in gpu_side) + cn_w
        phases = phase_peaks(lambda c: on_gpu + act[c] + overhead)
        peak = max(phases.values())
        # every component is read into RAM before the pipeline moves to the GPU (bitsandbytes
        # layers excepted: they are quantized onto the GPU as they load); a CPU T5 stays. A
        # ControlNet is read into RAM later, one at a time, then moved.
        loading = sum(weights[c] for c in numbers if c not in bnb) + fp8_transient
        kept = sum(weights[c] for c in cpu_kept) + cpu_act + nets.load_transient
        ram_parts.pop("controlnets", None)
        if loading >= kept:
            ram_parts["loading"] = loading
        else:
            ram_parts["weights"] = kept
        ram = base + max(loading, kept)
    elif p.placement == "model":
        # a ControlNet comes to the device at its first step and stays through the decode
        with_nets = {"denoise", "decode"} if cn_w else set()
        phases = phase_peaks(lambda c: weights[c] + act[c] + overhead + (cn_w if phase_of[c] in with_nets else 0))
        peak = max(phases.values())
        ram_parts.update(weights=total_w, load_transient=max(fp8_transient, nets.load_transient))
        ram = base + total_w + cn_w + max(fp8_transient, nets.load_transient)
    elif p.placement == "group":
        vae = weights.get("vae", 0) + cn_on

        def group_resident(c):
            own = vae + act[c] if c == "vae" else numbers[c]["group"] + act[c] + vae
            if c == "transformer":  # the ControlNets stream block by block as well, one net at a time
                own = max(own, nets.group + vae + act[c])
            return own + overhead

        phases = phase_peaks(group_resident)
        peak = max(phases.values())
        # with CUDA streams diffusers pins a copy of every offloaded tensor while the original is
        # still alive (ModuleGroup._init_cpu_param_dict): twice the offloaded weights in RAM
        pinned = sum(weights[c] for c in gpu_side if c != "vae") + cn_w
        ram_parts.update(weights=total_w, pinned_copies=pinned, cpu_activations=cpu_act)
        ram = base + total_w + cn_w + max(pinned, fp8_transient) + cpu_act
    elif p.placement == "sequential":
        buffers_all = sum(numbers[c]["buffers"] for c in gpu_side) + nets.buffers
        phases = phase_peaks(lambda c: buffers_all + max(numbers[c]["leaf"], nets.leaf if c == "transformer" else 0)
                             + act[c] + overhead)
        peak = max(phases.values())
        ram_parts.update(weights=total_w, cpu_activations=cpu_act)
        ram = base + total_w + cn_w + cpu_act
    elif p.placement == "balanced":
        if hardware and len(hardware.gpus) >= 2:
            budgets = [max(g.total_bytes - overhead, 0) for g in hardware.gpus]
        else:  # two GPUs, each large enough for everything
            budgets = [total_w + max(act.values())] * 2
        assign = _balanced_assignment(weights, budgets)
        phases = dict.fromkeys(PHASES, 0)
        for i in range(len(budgets)):
            mine = [c for c, g in assign.items() if g == i]
            w = sum(weights[c] for c in mine)
            gpu_bytes.append(w + max((act[c] for c in mine), default=0) + overhead)
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
            if r.component in assign and r.component != "controlnet":
                r.device = _device_label(p, r.component, assign[r.component])
        peak = max(gpu_bytes)
        ram_parts.update(loading=max(weights.values()))
        ram = base + max(weights.values())
    else:  # pragma: no cover - every placement is handled above
        raise ValueError(p.placement)

    peak_phase = max(phases, key=lambda k: phases[k])
    if p.vae == "tiled" and width * height <= 512 * 512:
        notes.append("VAE tiling changes nothing at this size (one tile).")
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
        ram_parts={k: int(v) for k, v in ram_parts.items() if v},
        overhead_bytes=int(overhead),
    )


# --- budgets and fitting ----------------------------------------------------------------------


def gb(n: int | float) -> str:
    """``n`` bytes as text in GB (2**30 bytes), one decimal: ``"7.5 GB"``."""
    return f"{n / GB:.1f} GB"


def ram_budget_bytes(hw: Hardware) -> int:
    """The RAM a plan may use: what the system reports available (``--ram`` simulates it)."""
    return max(int(hw.ram_available_bytes or hw.ram_total_bytes), 0)


def budget_bytes(preset: Preset, hw: Hardware) -> int:
    """Memory the preset's peak is checked against: VRAM (the smallest GPU), the Metal budget,
    or for CPU presets the available RAM."""
    if preset.device == "cuda":
        return hw.vram_bytes
    if preset.device == "mps":
        return hw.mps_budget_bytes
    return ram_budget_bytes(hw)


def fits(est: Estimate, preset: Preset, hw: Hardware) -> str | None:
    """Why ``est`` does not fit on ``hw`` (None when it does)."""
    if not est.feasible:
        return " ".join(est.notes)
    budget = budget_bytes(preset, hw)
    where = {"cuda": "VRAM", "mps": "Metal budget", "cpu": "available RAM"}[preset.device]
    if preset.placement == "balanced":
        for i, (need, g) in enumerate(zip(est.gpu_bytes, hw.gpus)):
            if need > g.total_bytes:
                return f"needs {gb(need)} on cuda:{i} > {gb(g.total_bytes)}"
    elif est.peak_bytes > budget:
        return f"needs {gb(est.peak_bytes)} > {gb(budget)} {where} (peak: {est.peak_phase})"
    if preset.device != "cpu" and est.ram_bytes > ram_budget_bytes(hw):
        return f"needs {gb(est.ram_bytes)} RAM > {gb(ram_budget_bytes(hw))} available"
    return None


def _shortfall(est: Estimate, preset: Preset, hw: Hardware) -> int:
    if not est.feasible:
        return sys.maxsize
    if preset.placement == "balanced":
        over = max((need - g.total_bytes for need, g in zip(est.gpu_bytes, hw.gpus)), default=0)
    else:
        over = est.peak_bytes - budget_bytes(preset, hw)
    ram_over = est.ram_bytes - ram_budget_bytes(hw) if preset.device != "cpu" else 0
    return max(over, 0) + max(ram_over, 0)


# --- the search -------------------------------------------------------------------------------


def candidate_presets(hardware: Hardware, transformer_format: str | None = None) -> list[Preset]:
    """Every valid combination for the studio's device, cheapest first (named presets among them).

    ``transformer_format="gguf"``: the transformer comes from a GGUF file, so its storage is
    fixed to "gguf"; the other axes are searched as usual.
    """
    device = hardware.device
    out: dict[str, Preset] = {}
    if device == "cuda":
        storages = ("gguf",) if transformer_format == "gguf" else ("plain", "fp8", "ao-int8", "ao-fp8", "nf4")
        for t, t5, place, vae in itertools.product(storages, T5_CHOICES, ("resident", "model", "group", "sequential"),
                                                   ("full", "tiled")):
            p = compose("cuda", BF16, t, t5, place, vae)
            if p.combination_problem() is None:
                out[p.name] = p
        if transformer_format != "gguf":
            out["multi-gpu-balanced"] = PRESETS["multi-gpu-balanced"]
    elif device == "mps":
        for t5, vae in itertools.product(("plain", "none"), ("full", "tiled")):
            p = compose("mps", BF16, "plain", t5, "resident", vae)
            out[p.name] = p
    else:
        for dtype, t, t5, vae in itertools.product((FP32, BF16), ("plain", "fp8"), ("plain", "int8", "nf4", "none"),
                                                   ("full", "tiled")):
            p = compose("cpu", dtype, t, t5, "resident", vae)
            if p.combination_problem() is None:
                out[p.name] = p
    return sorted(out.values(), key=lambda p: (p.cost, p.name))


@dataclass
class Rejection:
    """A preset the planner did not choose, and why (``axis``/``choice``: a one-axis alternative to
    the chosen plan)."""
    preset: str
    reason: str
    axis: str | None = None  # set for a one-axis alternative to the chosen plan
    choice: str | None = None

    def to_dict(self) -> dict:
        """The rejection as a plain dict (axis and choice only when set)."""
        d = {"preset": self.preset, "reason": self.reason}
        if self.axis:
            d.update(axis=self.axis, choice=self.choice)
        return d


@dataclass
class Plan:
    """The planner's answer for one variant on one machine: the preset chosen (or explained), its
    estimate, the budgets, and what was rejected and why."""
    variant: str
    preset: str  # the chosen preset's name (when nothing fits: the one that comes closest)
    fits: bool
    estimate: Estimate
    hardware: Hardware
    budget_bytes: int  # accelerator memory the plan was checked against (CPU: RAM)
    ram_budget_bytes: int
    rejected: list[Rejection]
    explanation: str = ""
    choice: Preset | None = None  # the chosen Preset itself (named or composed)
    searched: int = 0  # how many combinations were tried
    explained: bool = False  # True: one preset explained (plan --preset), not a choice
    component_bytes: dict[str, int] = field(default_factory=dict)
    reason: str | None = None  # why the plan does not fit / cannot run (None when it fits)
    controlnets: list[str] = field(default_factory=list)  # catalog ControlNet ids planned beside it

    @property
    def peak_bytes(self) -> int:
        """The chosen preset's estimated peak."""
        return self.estimate.peak_bytes

    @property
    def preset_obj(self) -> Preset:
        """The chosen :class:`Preset` (named or composed)."""
        return self.choice or get_preset(self.preset)

    def to_dict(self) -> dict:
        """The whole plan as a plain dict (``launch.py plan --json``)."""
        p = self.preset_obj
        return {
            "variant": self.variant,
            "preset": self.preset,
            "label": p.label,
            "named": p.named,
            "fits": self.fits,
            "explained": self.explained,
            "axes": {"device": p.device, "dtype": str(p.dtype).replace("torch.", ""), **p.axes},
            "peak_bytes": self.estimate.peak_bytes,
            "peak_phase": self.estimate.peak_phase,
            "phase_bytes": dict(self.estimate.phase_bytes),
            "activations": dict(self.estimate.activations),
            "overhead_bytes": self.estimate.overhead_bytes,
            "components": [r.to_dict() for r in self.estimate.components],
            "explanation": self.explanation,
            "hardware": self.hardware.to_dict(),
            "budget_bytes": self.budget_bytes,
            "ram_bytes": self.estimate.ram_bytes,
            "ram_parts": dict(self.estimate.ram_parts),
            "ram_budget_bytes": self.ram_budget_bytes,
            "speed_factor": self.estimate.speed_factor,
            "quality_cost": self.estimate.quality_notes,
            "cost": p.cost,
            "width": self.estimate.width,
            "height": self.estimate.height,
            "searched": self.searched,
            "component_bytes": dict(self.component_bytes),
            "controlnets": list(self.controlnets),
            "rejected": [r.to_dict() for r in self.rejected],
        }


def _verdict(p: Preset, hw: Hardware, variant: str, width: int, height: int,
             component_bytes: dict | None, controlnets=()) -> tuple[Estimate | None, str | None]:
    reason = p.check(hw)
    if reason:
        return None, reason
    est = estimate(variant, p, width, height, hardware=hw, component_bytes=component_bytes, controlnets=controlnets)
    return est, fits(est, p, hw)


def _axis_rejections(chosen: Preset, hw: Hardware, variant: str, width: int, height: int,
                     component_bytes: dict | None, transformer_format: str | None,
                     controlnets=()) -> list[Rejection]:
    """For each axis, every choice that alone would be better than the chosen one, and why it was
    not taken (the cost is additive over the axes, so a better choice that fitted would have won)."""
    out = []
    for axis in AXES:
        mine = getattr(chosen, axis)
        choices = {"transformer": ("plain", "fp8", "ao-int8", "ao-fp8", "nf4"), "t5": T5_CHOICES,
                   "placement": ("resident", "model", "group", "sequential"), "vae": ("full", "tiled")}[axis]
        if axis == "transformer" and transformer_format == "gguf":
            continue
        if chosen.placement == "balanced" or (chosen.device != "cuda" and axis == "placement"):
            continue
        for choice in choices:
            if choice == mine or _axis_cost(axis, choice) >= _axis_cost(axis, mine):
                continue
            alt = compose(chosen.device, chosen.dtype, **{**chosen.axes, axis: choice})
            reason = alt.combination_problem()
            if reason is None:
                _, reason = _verdict(alt, hw, variant, width, height, component_bytes, controlnets)
            if reason is None:  # fits and is cheaper: cannot happen with the additive cost
                reason = "fits, but ranks lower overall"
            out.append(Rejection(alt.name, reason, axis, choice))
    return out


def _axis_cost(axis: str, choice: str) -> float:
    return QUALITY_LOSS[axis][choice] + SPEED_WEIGHT * math.log2(SPEED[axis][choice])


def choose(hardware: Hardware, variant: str, width: int = 1024, height: int = 1024, *,
           component_bytes: dict[str, int] | None = None, transformer_format: str | None = None,
           controlnets: tuple[str, ...] | list[str] = ()) -> Plan:
    """The best combination that can run on ``hardware`` and fits its memory.

    Every candidate (``candidate_presets``) that passes ``check()`` is estimated; the cheapest
    (``Preset.cost``) that fits VRAM (CPU presets: RAM) and the available RAM wins. When none
    fits, the plan names the candidate that misses by the least and says ``fits=False``.
    ``component_bytes`` / ``transformer_format`` / ``controlnets``: see ``estimate`` /
    ``candidate_presets``.
    """
    catalog.get_variant(variant)
    controlnets = tuple(controlnets)
    cands = candidate_presets(hardware, transformer_format)
    verdicts: dict[str, tuple[Preset, Estimate | None, str | None]] = {}
    for p in cands:
        est, why = _verdict(p, hardware, variant, width, height, component_bytes, controlnets)
        verdicts[p.name] = (p, est, why)
    fitting = [(p, est) for p, est, why in verdicts.values() if why is None]
    reason = None
    if fitting:
        p, est = min(fitting, key=lambda pe: (pe[0].cost, pe[1].peak_bytes, pe[0].name))
        ok = True
    else:
        estimated = [(p, est) for p, est, why in verdicts.values() if est is not None]
        if estimated:
            p, est = min(estimated, key=lambda pe: (_shortfall(pe[1], pe[0], hardware), pe[0].cost))
        else:
            p = cands[0] if cands else PRESETS["cpu-bf16"]
            est = estimate(variant, p, width, height, hardware=hardware, component_bytes=component_bytes,
                           controlnets=controlnets)
        reason = verdicts[p.name][2] if p.name in verdicts else p.check(hardware)
        ok = False
    rejected: list[Rejection] = []
    for named in dict.values(PRESETS):  # the named shortcuts that rank above the choice (all, when none fits)
        if named.name == p.name or (ok and named.cost >= p.cost):
            continue
        if named.name in verdicts:
            why = verdicts[named.name][2]
        else:
            _, why = _verdict(named, hardware, variant, width, height, component_bytes, controlnets)
            if named.device != hardware.device and why is None:
                why = f"the studio runs on {hardware.device} here (--device {named.device} plans for {named.device})."
        rejected.append(Rejection(named.name, why or "fits, but ranks lower overall"))
    rejected += _axis_rejections(p, hardware, variant, width, height, component_bytes, transformer_format,
                                 controlnets)
    plan = Plan(
        variant=variant,
        preset=p.name,
        fits=ok,
        estimate=est,
        hardware=hardware,
        budget_bytes=budget_bytes(p, hardware),
        ram_budget_bytes=ram_budget_bytes(hardware),
        rejected=rejected,
        choice=p,
        searched=len(cands),
        component_bytes=dict(component_bytes or {}),
        reason=reason,
        controlnets=list(controlnets),
    )
    plan.explanation = explain(plan)
    return plan


def plan_for(hardware: Hardware, variant: str, preset: str | Preset, width: int = 1024, height: int = 1024, *,
             component_bytes: dict[str, int] | None = None, controlnets: tuple[str, ...] | list[str] = ()) -> Plan:
    """One preset explained for ``hardware`` (``launch.py plan --preset NAME``): does it run,
    does it fit, and what it needs — without choosing. Raises KeyError for an unknown name."""
    catalog.get_variant(variant)
    p = preset if isinstance(preset, Preset) else get_preset(preset)
    reason = p.check(hardware)
    est = estimate(variant, p, width, height, hardware=hardware, component_bytes=component_bytes,
                   controlnets=controlnets)
    if reason is None:
        reason = fits(est, p, hardware)
    plan = Plan(
        variant=variant, preset=p.name, fits=reason is None, estimate=est, hardware=hardware,
        budget_bytes=budget_bytes(p, hardware), ram_budget_bytes=ram_budget_bytes(hardware),
        rejected=[Rejection(p.name, reason)] if reason else [], choice=p, searched=1, explained=True,
        component_bytes=dict(component_bytes or {}), reason=reason, controlnets=list(controlnets),
    )
    plan.explanation = explain(plan)
    return plan


@dataclass
class HiresFit:
    """Whether a hires fix's second pass fits the loaded preset (:func:`hires_fit`)."""

    fits: bool  # it fits: as it is, or with the VAE decoding in tiles (``tiled``)
    tiled: bool = False  # the decode fits only in VAE tiles: the second pass tiles it
    largest: tuple[int, int] | None = None  # it does not fit: the largest size of the same aspect that does
    reason: str | None = None  # why the size does not fit as it is (the planner's words)


def hires_fit(hardware: Hardware, variant: str, preset: str | Preset, width: int, height: int,
              first: tuple[int, int] | None = None, controlnets: tuple[str, ...] | list[str] = ()) -> HiresFit:
    """The hires fix's memory check: the second pass (img2img at ``width`` × ``height``, its denoise
    and decode — the larger of the two passes) planned for ``preset`` on ``hardware``.

    Fits as it is: ``fits``. Fits only with the VAE decoding in tiles (``vae.enable_tiling``):
    ``fits`` and ``tiled``. Fits not even so: ``largest`` is the biggest size of the same aspect
    (multiples of 16, not below ``first``, the first pass's size) that fits with tiles, or None
    when not even ``first`` does. ``controlnets``: catalog ids that run in both passes."""
    from studio.memory.presets import compose

    p = preset if isinstance(preset, Preset) else get_preset(preset)

    def fitting(q: Preset, w: int, h: int) -> Plan:
        return plan_for(hardware, variant, q, w, h, controlnets=controlnets)

    plan = fitting(p, width, height)
    if plan.fits:
        return HiresFit(True)
    tiled = p if p.vae == "tiled" else compose(p.device, p.dtype, p.transformer, p.t5, p.placement, "tiled")
    if tiled is not p and fitting(tiled, width, height).fits:
        return HiresFit(True, True, reason=plan.reason)

    def size(k: float) -> tuple[int, int]:
        return max(16, round(width * k / 16) * 16), max(16, round(height * k / 16) * 16)

    lo, hi = (first[0] / width if first else 16 / width), 1.0
    if not fitting(tiled, *size(lo)).fits:
        return HiresFit(False, reason=plan.reason)
    for _ in range(12):  # bisect the scale; sizes are multiples of 16, so 12 halvings are plenty
        mid = (lo + hi) / 2
        if fitting(tiled, *size(mid)).fits:
            lo = mid
        else:
            hi = mid
    return HiresFit(False, largest=size(lo), reason=plan.reason)


# --- the explanation --------------------------------------------------------------------------


def explain(plan: Plan) -> str:
    """Per component device/dtype/bytes, RAM, slowdown, quality given up, and — per axis — why
    each better choice was rejected."""
    p = plan.preset_obj
    est = plan.estimate
    v = catalog.get_variant(plan.variant)
    where = {"cuda": "GPU", "mps": "MPS", "cpu": "RAM"}[p.device]
    what = v.label + (f" with {len(plan.controlnets)} ControlNet{'s' if len(plan.controlnets) > 1 else ''}"
                      if plan.controlnets else "")
    shown = f"'{p.name}' ({p.label})"
    lines = []
    if plan.explained:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(
            f"Preset {shown} for {what} at {est.width}×{est.height} on this machine: {verdict}"
            + (f" — {plan.reason.rstrip('.')}" if plan.reason else "") + ". "
            f"Peak {gb(est.peak_bytes)} of {gb(plan.budget_bytes)} {where} (during {est.peak_phase}); "
            f"RAM needed {gb(est.ram_bytes)} of {gb(plan.ram_budget_bytes)} available."
        )
    elif plan.fits:
        lines.append(
            f"{what} at {est.width}×{est.height} fits with preset {shown}: "
            f"peak {gb(est.peak_bytes)} of {gb(plan.budget_bytes)} {where} "
            f"(during {est.peak_phase}); RAM needed {gb(est.ram_bytes)} of "
            f"{gb(plan.ram_budget_bytes)} available."
        )
    else:
        lines.append(
            f"No preset fits {what} at {est.width}×{est.height} on this machine "
            f"({plan.searched} combinations tried). The closest is {shown}"
            + (f" — {plan.reason.rstrip('.')}" if plan.reason else "") + ". It needs "
            f"{gb(est.peak_bytes)} {where} (have {gb(plan.budget_bytes)}) and {gb(est.ram_bytes)} RAM "
            f"(have {gb(plan.ram_budget_bytes)} available). Try a smaller size, another variant, "
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
        + (f"; overhead {gb(est.overhead_bytes)} (CUDA context + margin)" if p.device == "cuda" else "")
    )
    if est.ram_parts:
        lines.append("  RAM: " + " + ".join(f"{k.replace('_', ' ')} {gb(n)}" for k, n in est.ram_parts.items())
                     + f" → {gb(est.ram_bytes)}")
    if p.speed_factor == 1.0:
        lines.append("Speed: the fastest way to run it (baseline).")
    elif p.device == "cuda":
        lines.append(f"Speed: about {p.speed_factor:.3g}× the time of 'full' on the same GPU.")
    else:
        lines.append(f"Speed: roughly {p.speed_factor:.3g}× the time of 'full' on a mid-range GPU.")
    lines.append(f"Quality given up: {p.quality_cost}.")
    for note in est.notes:
        lines.append(f"Note: {note}")
    per_axis = [r for r in plan.rejected if r.axis]
    if per_axis:
        lines.append("Better choices per component, and why not:")
        for axis in AXES:
            mine = [r for r in per_axis if r.axis == axis]
            if mine:
                lines.append(f"  {AXIS_LABELS[axis]} ({CHOICE_LABELS[axis][getattr(p, axis)]} chosen):")
                for r in mine:
                    lines.append(f"    {CHOICE_LABELS[axis][r.choice]} — {r.reason}")
    named = [r for r in plan.rejected if not r.axis]
    if named and not plan.explained:
        lines.append("Better presets rejected:" if plan.fits else "Presets tried:")
        for r in _collapse(named):
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
