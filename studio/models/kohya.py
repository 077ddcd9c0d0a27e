"""Kohya / Civitai and ComfyUI SD3 / SD3.5 LoRAs, converted to the diffusers/PEFT layout.

diffusers 0.42 has no converter for these files (its SD3 loader loads zero keys from them), so
the studio converts them itself, into the keys ``StableDiffusion3Pipeline.load_lora_weights``
takes (``transformer.….lora_A.weight`` / ``lora_B.weight``, ``text_encoder.…``,
``text_encoder_2.…``).

The layouts read:

* kohya's sd-scripts (``networks/lora_sd3.py``), what most Civitai SD3 LoRAs are:
  ``lora_unet_<reference module path, "." → "_">`` with ``.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha``, e.g. ``lora_unet_joint_blocks_0_x_block_attn_qkv``;
  ``lora_te1_`` / ``lora_te2_`` / ``lora_te3_`` for CLIP-L, CLIP-G and T5;
* ComfyUI's: the reference module path itself after ``diffusion_model.`` (or
  ``model.diffusion_model.``), with ``lora_down``/``lora_up`` or ``lora_A``/``lora_B``.

The module correspondence is the one of diffusers' own single-file converter
(``convert_sd3_transformer_checkpoint_to_diffusers``): the fused ``attn.qkv`` of a block becomes
``to_q``/``to_k``/``to_v`` (``add_q_proj``/… for the context stream), so its ``lora_down``
becomes the shared ``lora_A`` of the three and its ``lora_up`` is cut in three row blocks; the
``final_layer.adaLN_modulation.1`` (and the context ``adaLN`` of the last block) have their
(shift, scale) halves swapped into diffusers' (scale, shift), so the rows of ``lora_up`` are
swapped the same way. kohya's split-qkv files (a ``lora_down`` of 3·r rows and a block-diagonal
``lora_up``) are split exactly into three rank-r LoRAs.

Scale: kohya's and ComfyUI's ``alpha / rank`` (rank = rows of ``lora_down``; 1 without
``alpha``) is folded into ``lora_B``; diffusers then loads every module with scale 1.

Not converted, and counted as unmatched: T5 parts (``lora_te3_``: diffusers' SD3 LoRA loader
only loads the transformer and the two CLIP encoders), LyCORIS (LoHa/LoKr), DoRA, full-weight
diffs, and names that match no SD3 module. A file in which nothing matches is refused.

:func:`plan_keys` works on key names only (no torch; the LoRA library uses it to inspect a file
from its header); :func:`convert` and :func:`load_for_pipeline` convert the tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_te_")
COMFY_PREFIXES = ("diffusion_model.", "model.diffusion_model.")
# suffix → role. Anything else after a module name is a layout the studio does not convert.
_SUFFIXES = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".alpha": "alpha",
}
_OTHER_KINDS = (
    ("hada_", "LyCORIS LoHa"), ("lokr_", "LyCORIS LoKr"), ("dora_scale", "DoRA"),
    ("lora_mid", "LoCon (Tucker)"), (".diff", "full-weight diff"),
)
TE_COMPONENTS = {"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
T5_NOTE = ("T5 (lora_te3_) parts are not applied: diffusers' SD3 LoRA loader only loads the "
           "transformer, CLIP-L and CLIP-G")


def is_foreign_layout(keys) -> bool:
    """Whether a LoRA's keys are kohya's or ComfyUI's (this module's business)."""
    return any(k.startswith(KOHYA_PREFIXES + COMFY_PREFIXES) for k in keys)


# --- names -----------------------------------------------------------------------------------

_JOINT = re.compile(
    r"joint_blocks[._](\d+)[._](x_block|context_block)[._]"
    r"(?:(attn2?)[._](qkv|proj)|mlp[._](fc1|fc2)|(adaLN_modulation)[._]1)"
)
_SINGLE = {
    # reference module (dots or underscores) → diffusers module
    "x_embedder.proj": "pos_embed.proj",
    "context_embedder": "context_embedder",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
_SINGLE_UNDERSCORED = {k.replace(".", "_"): k for k in _SINGLE}
_CLIP = re.compile(
    r"text_model[._]encoder[._]layers[._](\d+)[._](?:self_attn[._](q|k|v|out)_proj|mlp[._](fc1|fc2))"
)


@dataclass(frozen=True)
class Target:
    """Where one reference module's LoRA goes.

    ``modules``: diffusers module names, without the component prefix (three for a fused qkv,
    whose ``lora_up`` rows are split in order); ``swap``: "always" (final adaLN),
    "last_block" (the context adaLN, swapped only in the model's last block), or "".
    """

    component: str  # "transformer" | "text_encoder" | "text_encoder_2"
    modules: tuple[str, ...]
    swap: str = ""
    block: int | None = None


def transformer_target(ref: str) -> Target | None:
    """The diffusers module(s) for an SD3 reference module path (dots or kohya's underscores)."""
    m = _JOINT.fullmatch(ref)
    if m:
        i, stream, attn, leaf, fc, ada = m.groups()
        i = int(i)
        x = stream == "x_block"
        b = f"transformer_blocks.{i}."
        if attn == "attn2":
            if not x:
                return None
            return Target("transformer", (f"{b}attn2.to_q", f"{b}attn2.to_k", f"{b}attn2.to_v")
                          if leaf == "qkv" else (f"{b}attn2.to_out.0",), block=i)
        if attn:
            if leaf == "qkv":
                names = ("to_q", "to_k", "to_v") if x else ("add_q_proj", "add_k_proj", "add_v_proj")
                return Target("transformer", tuple(f"{b}attn.{n}" for n in names), block=i)
            return Target("transformer", (f"{b}attn.to_out.0" if x else f"{b}attn.to_add_out",), block=i)
        if fc:
            ff = "ff" if x else "ff_context"
            return Target("transformer", (f"{b}{ff}.net.0.proj" if fc == "fc1" else f"{b}{ff}.net.2",), block=i)
        if ada:
            return Target("transformer", (f"{b}norm1.linear" if x else f"{b}norm1_context.linear",),
                          swap="" if x else "last_block", block=i)
    dotted = ref if ref in _SINGLE else _SINGLE_UNDERSCORED.get(ref)
    if dotted:
        return Target("transformer", (_SINGLE[dotted],), swap="always" if dotted.startswith("final_layer.adaLN") else "")
    return None


def clip_target(component: str, ref: str) -> Target | None:
    """The CLIP module for a kohya text-encoder name (``text_model_encoder_layers_0_self_attn_q_proj``)."""
    m = _CLIP.fullmatch(ref)
    if m:
        i, proj, fc = m.groups()
        leaf = f"self_attn.{proj}_proj" if proj else f"mlp.{fc}"
        return Target(component, (f"text_model.encoder.layers.{int(i)}.{leaf}",))
    if ref == "text_projection":
        return Target(component, ("text_projection",))
    return None


def split_key(key: str) -> tuple[str, str] | None:
    """(module name, role) of a LoRA key; None for a suffix this module does not convert."""
    for suffix, role in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def target_for(module: str) -> tuple[Target | None, str]:
    """(target or None, why not) for a module name of a kohya/ComfyUI file."""
    for prefix in COMFY_PREFIXES:
        if module.startswith(prefix):
            t = transformer_target(module[len(prefix):])
            return t, "" if t else "no SD3 module of that name"
    if module.startswith("lora_unet_"):
        t = transformer_target(module[len("lora_unet_"):])
        return t, "" if t else "no SD3 module of that name"
    if module.startswith("lora_te3_"):
        return None, "t5"
    for prefix, component in TE_COMPONENTS.items():
        if module.startswith(prefix):
            t = clip_target(component, module[len(prefix):])
            return t, "" if t else "no CLIP module of that name"
    return None, "not an SD3 LoRA name"


# --- the plan (names only) --------------------------------------------------------------------


@dataclass
class Plan:
    """What a kohya/ComfyUI LoRA file maps to, from its key names alone."""

    targets: dict[str, Target] = field(default_factory=dict)  # module → target
    unmatched: dict[str, str] = field(default_factory=dict)  # module → why
    total: int = 0  # modules in the file

    @property
    def text_encoders(self) -> bool:
        """Whether the file changes CLIP-L or CLIP-G too, not only the transformer."""
        return any(t.component != "transformer" for t in self.targets.values())

    @property
    def t5(self) -> list[str]:
        """The T5 modules of the file (``lora_te3_…``), which the studio does not apply."""
        return [m for m, why in self.unmatched.items() if why == "t5"]

    def reasons(self) -> str:
        """The unmatched modules, counted by reason, with examples."""
        groups: dict[str, list[str]] = {}
        for m, why in self.unmatched.items():
            groups.setdefault(why, []).append(m)
        out = []
        for why, mods in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            label = T5_NOTE if why == "t5" else why
            out.append(f"{len(mods)} {label} (e.g. {', '.join(sorted(mods)[:2])})")
        return "; ".join(out)

    def note(self, filename: str) -> str | None:
        """The sentence the user sees when part of the file is left out (None when all of it loads)."""
        if not self.unmatched:
            return None
        return (f"LoRA {filename}: {len(self.unmatched)} of {self.total} modules were not applied — "
                f"{self.reasons()}.")


def plan_keys(keys) -> Plan:
    """Map every module of a kohya/ComfyUI LoRA (key names only; no tensors are read)."""
    plan = Plan()
    roles: dict[str, set[str]] = {}
    odd: dict[str, str] = {}
    for k in keys:
        split = split_key(k)
        if split is None:
            parts = k.split(".")
            module = ".".join(parts[:-2] if parts[-1] in ("weight", "bias") and len(parts) > 2 else parts[:-1]) or k
            kind = next((label for marker, label in _OTHER_KINDS if marker in k), "unsupported tensor")
            odd.setdefault(module, f"{kind} (not converted)")
            continue
        module, role = split
        roles.setdefault(module, set()).add(role)
    modules = set(roles) | set(odd)
    plan.total = len(modules)
    for module in sorted(modules):
        if module in odd:
            plan.unmatched[module] = odd[module]
            continue
        if not {"down", "up"} <= roles[module]:
            plan.unmatched[module] = "lora_down/lora_up pair incomplete"
            continue
        target, why = target_for(module)
        if target is None:
            plan.unmatched[module] = why
        else:
            plan.targets[module] = target
    return plan


# --- the tensors ------------------------------------------------------------------------------


def _swap_rows(t):
    """SAI's (shift, scale) halves → diffusers' (scale, shift), as ``swap_scale_shift`` does."""
    import torch

    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _block_diagonal_split(down, up):
    """kohya's split-qkv save: ``down`` (3r, in) and a block-diagonal ``up`` (3·out, 3r). Returns
    three (down_i, up_i) pairs when ``up`` is exactly block-diagonal, else None."""
    import torch

    if down.shape[0] % 3 or up.shape[0] % 3 or up.shape[1] != down.shape[0] or up.ndim != 2:
        return None
    r, o = down.shape[0] // 3, up.shape[0] // 3
    pairs = []
    for i in range(3):
        rows = up[i * o:(i + 1) * o]
        off = torch.cat([rows[:, : i * r], rows[:, (i + 1) * r:]], dim=1)
        if off.numel() and torch.count_nonzero(off):
            return None
        pairs.append((down[i * r:(i + 1) * r], rows[:, i * r:(i + 1) * r]))
    return pairs


def convert(state_dict: dict, num_layers: int | None = None, plan: Plan | None = None) -> tuple[dict, Plan]:
    """A kohya/ComfyUI SD3 LoRA state dict → (diffusers/PEFT state dict, plan).

    ``num_layers``: the target transformer's block count (its last block's context adaLN is
    half-swapped, as in diffusers' converter). The scale ``alpha / rank`` is folded into
    ``lora_B``. Raises ValueError when a tensor's shape does not fit its module (a qkv
    ``lora_up`` whose rows do not split in three)."""
    import torch

    plan = plan or plan_keys(list(state_dict))
    out: dict = {}
    by_module: dict[str, dict] = {}
    for k, v in state_dict.items():
        split = split_key(k)
        if split and split[0] in plan.targets:
            by_module.setdefault(split[0], {})[split[1]] = v
    for module, target in plan.targets.items():
        parts = by_module[module]
        down, up = parts["down"], parts["up"]
        alpha = parts.get("alpha")
        rank = down.shape[0]
        scale = float(alpha.float().reshape(-1)[0]) / rank if alpha is not None else 1.0
        dtype = up.dtype if up.is_floating_point() else torch.float32
        up = up.to(torch.float32) * scale
        swap = target.swap == "always" or (
            target.swap == "last_block" and num_layers is not None and target.block == num_layers - 1)
        n = len(target.modules)
        if n == 1:
            pairs = [(down, _swap_rows(up) if swap else up)]
        else:
            if up.shape[0] % n:
                raise ValueError(f"{module}: lora_up has {up.shape[0]} rows, which do not split into {n} (q, k, v)")
            pairs = _block_diagonal_split(down, up) or [(down, c) for c in up.chunk(n, dim=0)]
        prefix = target.component + "."
        for name, (a, b) in zip(target.modules, pairs):
            out[f"{prefix}{name}.lora_A.weight"] = a.contiguous()
            out[f"{prefix}{name}.lora_B.weight"] = b.to(dtype).contiguous()
    return out, plan


def load_for_pipeline(path: Path, pipe) -> dict:
    """Read a kohya/ComfyUI LoRA file and convert it for ``pipe`` (a StableDiffusion3Pipeline);
    the dict goes straight to ``pipe.load_lora_weights``."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    layers = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "num_layers", None)
    converted, _ = convert(sd, num_layers=layers)
    return converted
