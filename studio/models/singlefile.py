"""Single-file checkpoints: the official ``sd3.5_large.safetensors`` release layout.

What users download from Stability AI is not a diffusers folder but:

    sd3.5_large.safetensors            the MMDiT transformer in the original (SAI) key layout
                                       (``model.diffusion_model.joint_blocks.N...``), usually with
                                       the VAE as ``first_stage_model.*`` (ldm layout)
    text_encoders/clip_l.safetensors   CLIPTextModelWithProjection (transformers layout)
    text_encoders/clip_g.safetensors   CLIPTextModelWithProjection
    text_encoders/t5xxl_fp16.safetensors        T5EncoderModel, fp16
    text_encoders/t5xxl_fp8_e4m3fn.safetensors  the same in float8_e4m3fn

Also read: ComfyUI's repacks (``text_encoders/`` or ``clip/`` folders, ``t5xxl_fp8_e4m3fn_scaled``,
and "scaled fp8" checkpoints such as Comfy-Org's ``sd3.5_large_fp8_scaled.safetensors``: float8
weights, a ``<layer>.scale_weight`` per matrix, a ``scaled_fp8`` marker tensor) and city96's GGUF
transformers (``studio.models.gguf``).

Scaled fp8 is *dequantized on load*: ``w = w_fp8.to(float32) * scale_weight``, then the
placement's dtype — ComfyUI's own arithmetic (``comfy/ops.py``: ``weight * scale_weight``).
diffusers has no scaled-fp8 layer, so keeping fp8 storage would mean replacing every Linear;
an fp8 preset can still store the dequantized weights in fp8 afterwards (layerwise casting).
``scale_input`` is only used by ComfyUI's fp8 matrix multiplication of activations and does
not change the weights; it is ignored. So the loaded transformer is as big as the bf16 release
(``FileInfo.storage`` says so: what is on disk, and what the load makes of it).

Nothing unknown is loaded silently: a tensor that neither diffusers' converters nor the
layouts above consume is an error that names it (:func:`check_layout`).

The weights carry no configs, tokenizers or scheduler: those come from a *base* diffusers folder
(only its JSON files and tokenizers are needed, ~2 MB), found offline in this order:
``config.single_file_config_dir``, the folder named by ``$SD35_STUDIO_CONFIG_DIR``, the Hugging
Face cache snapshot of the variant's repo. Nothing here touches the network; diffusers'
``from_single_file`` is always given ``config=<local folder>`` (without it, it fetches the config
from the gated Hub repo).

API:
- :func:`detect_variant` / :func:`inspect_file`: which variant a file holds, from the header only;
- :func:`file_storage`: what the transformer weighs on disk (bytes by dtype, scaled fp8, GGUF
  quantization types) and what it becomes once loaded — for the memory planner;
- :func:`resolve_single_file`: (base folder, per-component overrides) for ``ModelManager.load``;
- :func:`export_official_layout`: write a diffusers folder in the official single-file layout
  (the exact inverse of diffusers' converters; used by the tests with the tiny family).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from studio.catalog import VARIANTS, get_variant, variant_for_transformer_config
from studio.config import StudioConfig
from studio.errors import ModelError
from studio.models.identity import HashCache
from studio.models.placement import Placement
from studio.models.sources import short_error

log = logging.getLogger(__name__)

SAI_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")
VAE_PREFIX = VAE_PREFIXES[0]
CONFIG_ENV = "SD35_STUDIO_CONFIG_DIR"
# What a base folder must provide (the weights come from the single file and text_encoders/).
CONFIG_PATTERNS = ["*.json", "tokenizer*/*", "scheduler/*"]
TEXT_ENCODER_DIR = "text_encoders"
# The release's folder name, and ComfyUI's (models/text_encoders, formerly models/clip).
TEXT_ENCODER_DIRS = (TEXT_ENCODER_DIR, "clip")
# component -> file names, in order of preference (ComfyUI's recommended T5 is the scaled fp8 one)
TEXT_ENCODER_FILES: dict[str, tuple[str, ...]] = {
    "text_encoder": ("clip_l.safetensors",),
    "text_encoder_2": ("clip_g.safetensors",),
    "text_encoder_3": ("t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors",
                       "t5xxl_fp8_e4m3fn.safetensors"),
}
# ComfyUI's "scaled fp8" layout: <layer>.weight in float8 and <layer>.scale_weight (float32, a
# scalar); <layer>.scale_input is for fp8 activations only; a "scaled_fp8" tensor marks the file.
SCALE_WEIGHT = ".scale_weight"
SCALE_INPUT = ".scale_input"
SCALED_FP8_MARKER = "scaled_fp8"
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
# Some releases (SD3 Medium "incl_clips") carry the encoders inside the file under these prefixes.
EMBEDDED_ENCODER_PREFIXES = {
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.clip_g.transformer.",
    "text_encoder_3": "text_encoders.t5xxl.transformer.",
}
TEXT_ENCODER_LABELS = {
    "text_encoder": "CLIP-L text encoder (clip_l)",
    "text_encoder_2": "CLIP-G text encoder (clip_g)",
    "text_encoder_3": "T5-XXL text encoder (t5xxl)",
}
# Detection keys of the real releases (see REFERENCE.md).
LARGE_KEY = "joint_blocks.37.x_block.mlp.fc1.weight"
POS_EMBED_SD35_MEDIUM = 147456  # 384²
POS_EMBED_SD3_MEDIUM = 36864  # 192²
_MAX_HEADER = 100 << 20


# --- the header ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors header: its dtype, shape and byte range in the file."""
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def _not_safetensors(path: Path, detail: str = "") -> ModelError:
    return ModelError(
        f"{path.name} is not a valid .safetensors file (truncated or corrupt?)"
        + (f": {detail}" if detail else "")
        + ". If it was downloaded, download it again (an interrupted download leaves a short file)."
    )


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """The tensors of a .safetensors file (name -> dtype, shape, byte range), reading only the header.

    Checks that the file is as long as its header says, so a truncated download is caught here
    and not as a crash half-way through loading.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _not_safetensors(path, f"only {size} bytes")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > min(size - 8, _MAX_HEADER):
                raise _not_safetensors(path, "no readable header")
            raw = f.read(n)
    except ModelError:
        raise
    except OSError as e:
        raise ModelError(f"Cannot read {path}: {e.strerror or e}.") from e
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _not_safetensors(path, "the header is not JSON") from e
    if not isinstance(meta, dict):
        raise _not_safetensors(path, "the header is not a table of tensors")
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    data_end = 0
    for name, entry in meta.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(x) for x in entry["data_offsets"])
            info = TensorInfo(str(entry["dtype"]), tuple(int(x) for x in entry["shape"]), base + start, base + end)
        except (KeyError, TypeError, ValueError) as e:
            raise _not_safetensors(path, f"bad entry for {name!r}") from e
        out[name] = info
        data_end = max(data_end, end)
    if base + data_end != size:
        raise _not_safetensors(
            path, f"the header describes {base + data_end:,} bytes but the file has {size:,}"
        )
    return out


# --- what a file holds ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FileInfo:
    """What a single-file checkpoint holds: the variant and transformer shape its keys show, whether
    the VAE and text encoders are inside, and every tensor."""
    path: Path
    variant: str
    prefix: str  # what precedes "joint_blocks." (normally "model.diffusion_model.")
    num_layers: int
    dual_attention_layers: tuple[int, ...]
    qk_norm: bool
    pos_embed_len: int | None  # pos_embed.shape[1] = pos_embed_max_size²
    hidden_size: int | None  # context_embedder output = heads × head dim
    vae_prefix: str | None  # "first_stage_model." when the file carries the VAE
    embedded_encoders: dict[str, str]  # component -> key prefix, for encoders inside the file
    tensors: dict[str, TensorInfo] = field(repr=False)
    kind: str = "safetensors"  # | "gguf"
    scaled_fp8: str | None = None  # the marker's dtype (ComfyUI: its fp8 format) when present

    @property
    def has_vae(self) -> bool:
        """Whether the file carries the VAE."""
        return self.vae_prefix is not None

    def _all_transformer_keys(self) -> list[str]:
        if self.prefix:
            return [k for k in self.tensors if k.startswith(self.prefix)]
        others = VAE_PREFIXES + ("text_encoders.", "cond_stage_model.", "conditioner.")
        return [k for k in self.tensors if not k.startswith(others)]

    def transformer_keys(self) -> list[str]:
        """The transformer's weights (without scaled-fp8 scales and marker)."""
        return [k for k in self._all_transformer_keys() if not _is_scale_key(k)]

    def vae_keys(self) -> list[str]:
        """The VAE's weights (without scaled-fp8 scales); [] when the file has no VAE."""
        return [k for k in self.tensors if self.vae_prefix and k.startswith(self.vae_prefix) and not _is_scale_key(k)]

    def scales(self) -> dict[str, str]:
        """weight key -> its ``scale_weight`` key (scaled fp8), for every scaled matrix."""
        out = {}
        for k in self.tensors:
            if k.endswith(SCALE_WEIGHT):
                out[k[: -len(SCALE_WEIGHT)] + ".weight"] = k
        return out

    @property
    def storage(self) -> dict:
        """What the transformer weighs: see :func:`file_storage`."""
        return _storage(self)


def _describe(keys: list[str]) -> str:
    """A guess at what a foreign file is, for error messages."""
    ks = set(keys)

    def anyk(pred) -> bool:
        return any(pred(k) for k in ks)

    if not ks:
        return "an empty file (no tensors)"
    if anyk(lambda k: "lora_" in k or ".lora." in k or "lora_unet" in k):
        return "a LoRA (load it as a LoRA, not as a model)"
    if anyk(lambda k: "double_blocks." in k):
        return "a FLUX transformer"
    if anyk(lambda k: "input_blocks." in k or "model.diffusion_model.middle_block" in k):
        return "a Stable Diffusion 1.x/2.x/XL UNet checkpoint"
    if anyk(lambda k: k.startswith("transformer_blocks.")) and "context_embedder.weight" in ks:
        return (
            "an SD3 transformer in the diffusers layout (load the diffusers folder that holds it, "
            "with model_index.json, instead)"
        )
    if anyk(lambda k: "text_model." in k):
        return "a CLIP text encoder (it belongs in text_encoders/ as clip_l or clip_g)"
    if anyk(lambda k: k.startswith("encoder.block.") or "SelfAttention" in k):
        return "a T5 text encoder (it belongs in text_encoders/ as t5xxl_fp16)"
    if anyk(lambda k: k.startswith(VAE_PREFIXES) or k.startswith(("encoder.down", "decoder.up"))):
        return "a VAE"
    sample = ", ".join(repr(k) for k in sorted(ks)[:3])
    return f"a file of {len(ks)} tensors such as {sample}"


def _is_scale_key(k: str) -> bool:
    return k.endswith((SCALE_WEIGHT, SCALE_INPUT)) or k == SCALED_FP8_MARKER or k.endswith("." + SCALED_FP8_MARKER)


def inspect_file(path: str | os.PathLike) -> FileInfo:
    """Read a single-file checkpoint's header and work out what it holds. No weights are read.

    ``.gguf`` files (city96's quantized transformers) are read by ``studio.models.gguf``."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        from studio.models.gguf import gguf_header

        tensors = {k: TensorInfo(*v) for k, v in gguf_header(path).items()}
    else:
        tensors = read_header(path)
    return _file_info(path, tensors)


def _file_info(path: Path, tensors: dict[str, TensorInfo]) -> FileInfo:
    blocks = [k for k in tensors if "joint_blocks." in k]
    if not blocks:
        raise ModelError(
            f"{path.name} is not an SD3/SD3.5 transformer checkpoint: it looks like "
            f"{_describe(list(tensors))}. Expected the MMDiT of the official single-file release "
            f"(tensors named {SAI_PREFIX}joint_blocks.*), e.g. sd3.5_large.safetensors or "
            "sd3.5_medium.safetensors, or a diffusers folder."
        )
    prefix = blocks[0][: blocks[0].index("joint_blocks.")]
    layer_ids = set()
    dual = set()
    for k in blocks:
        m = re.match(r"joint_blocks\.(\d+)\.", k[len(prefix):])
        if not m:
            continue
        layer_ids.add(int(m.group(1)))
        if ".attn2." in k:
            dual.add(int(m.group(1)))
    qk = any(".ln_q." in k for k in blocks)
    pos = tensors.get(prefix + "pos_embed")
    pos_len = pos.shape[1] if pos and len(pos.shape) >= 2 else None
    ctx = tensors.get(prefix + "context_embedder.weight")
    hidden = ctx.shape[0] if ctx else None
    vae_prefix = None
    for vp in VAE_PREFIXES:
        if any(k.startswith(vp + "decoder.") or k.startswith(vp + "encoder.") for k in tensors):
            vae_prefix = vp
            break
    embedded = {
        c: p for c, p in EMBEDDED_ENCODER_PREFIXES.items() if any(k.startswith(p) for k in tensors)
    }
    marker = tensors.get(prefix + SCALED_FP8_MARKER) or tensors.get(SCALED_FP8_MARKER)
    if dual:
        variant = "sd3.5-medium"
    elif qk or (prefix + LARGE_KEY) in tensors:
        variant = "sd3.5-large-turbo" if "turbo" in path.name.lower() else "sd3.5-large"
    elif pos_len == POS_EMBED_SD35_MEDIUM:
        variant = "sd3.5-medium"
    else:  # no qk-norm, no dual attention (pos_embed 36864 in the real SD3 Medium)
        variant = "sd3-medium"
    return FileInfo(
        path=path,
        variant=variant,
        prefix=prefix,
        num_layers=max(layer_ids) + 1 if layer_ids else 0,
        dual_attention_layers=tuple(sorted(dual)),
        qk_norm=qk,
        pos_embed_len=pos_len,
        hidden_size=hidden,
        vae_prefix=vae_prefix,
        embedded_encoders=embedded,
        tensors=tensors,
        kind="gguf" if path.suffix.lower() == ".gguf" else "safetensors",
        scaled_fp8=marker.dtype if marker else None,
    )


def _storage(info: FileInfo) -> dict:
    if info.kind == "gguf":
        from studio.models.gguf import gguf_tensor_bytes

        out = gguf_tensor_bytes(info.path)
        return {**out, "kind": "gguf", "scaled_fp8": False, "scaled_matrices": 0,
                "loads_as": "quantized_bytes + unquantized_params × the compute dtype's size (quantized "
                            "matrices stay quantized; F32/F16 tensors and non-matrix quantized ones are "
                            "cast to the compute dtype)"}
    keys = info._all_transformer_keys()
    by_dtype: dict[str, int] = {}
    params = 0
    for k in keys:
        t = info.tensors[k]
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + (t.end - t.start)
        if not _is_scale_key(k):
            n = 1
            for d in t.shape:
                n *= d
            params += n
    scaled = sum(1 for w in info.scales() if w in info.tensors and w.startswith(info.prefix))
    return {
        "kind": "safetensors",
        "file_bytes": info.path.stat().st_size,
        "transformer_bytes": sum(by_dtype.values()),  # on disk, scales included
        "by_dtype": by_dtype,
        "params": params,
        "scaled_fp8": info.scaled_fp8 is not None or scaled > 0,
        "scaled_matrices": scaled,
        "loads_as": "params × the placement dtype's size (fp8 and scaled fp8 are dequantized on load)",
    }


def file_storage(path: str | os.PathLike) -> dict:
    """What a single file's transformer weighs, from its header only — for the memory planner.

    safetensors: ``{"kind": "safetensors", "file_bytes", "transformer_bytes" (on disk, scales
    included), "by_dtype": {"F8_E4M3": bytes, "F32": bytes, ...}, "params", "scaled_fp8": bool,
    "scaled_matrices": n, "loads_as": text}`` — fp8 and scaled fp8 are dequantized on load, so the
    loaded transformer takes ``params × dtype size`` bytes (what the bf16 release takes).

    gguf: :func:`studio.models.gguf.gguf_tensor_bytes` (``total_bytes``, per-type counts and
    bytes, ``quantized_bytes``, ``unquantized_params``) plus the keys above; loaded, the
    transformer takes ``quantized_bytes + unquantized_params × dtype size``.
    """
    return inspect_file(path).storage


def detect_variant(path: str | os.PathLike) -> str:
    """The catalog variant of a single-file checkpoint, from its header (keys and shapes) only.

    Dual attention (``attn2``) ⇒ sd3.5-medium; qk-norm (``ln_q``) or a 38th block ⇒ sd3.5-large
    (sd3.5-large-turbo when the file name says "turbo": the two share an architecture); otherwise
    pos_embed length 147456 ⇒ sd3.5-medium, anything else ⇒ sd3-medium.
    """
    return inspect_file(path).variant


# --- the base folder (configs, tokenizers, scheduler) ---------------------------------------------


def _single_file_repo(variant: str) -> str:
    """The Hub repo that hosts the single-file release (SD3 Medium's is not the -diffusers one)."""
    return get_variant(variant).repo_id.removesuffix("-diffusers")


def _download_hint(variant: str, need_vae: bool) -> str:
    repo = get_variant(variant).repo_id
    patterns = " ".join(f'"{p}"' for p in CONFIG_PATTERNS + (["vae/*"] if need_vae else []))
    return f"hf download {repo} --include {patterns}"


def base_folder_problems(folder: Path, need_vae: bool = False) -> list[str]:
    """What a base folder lacks to serve a single file (empty list: it is usable)."""
    if not folder.is_dir():
        return [f"{folder} (no such folder)"]
    need = [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "transformer/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "text_encoder_2/config.json",
        "text_encoder_3/config.json",
    ]
    missing = [n for n in need if not (folder / n).is_file()]
    for tok in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        d = folder / tok
        if not d.is_dir() or not any(p.is_file() for p in d.iterdir()):
            missing.append(f"{tok}/")
    if need_vae and not any((folder / "vae").glob("*.safetensors")):
        missing.append("vae/*.safetensors (this file has no VAE)")
    return missing


def _hub_snapshot(repo: str) -> Path | None:
    """The cached snapshot of a repo's configs, or None. Never downloads."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, allow_patterns=CONFIG_PATTERNS + ["vae/*"], local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), offline mode, broken cache
        return None


def find_base_folder(info: FileInfo, config: StudioConfig | None = None) -> Path:
    """The diffusers folder that provides configs, tokenizers, scheduler (and the VAE if needed)."""
    need_vae = not info.has_vae
    explicit = [
        ("single_file_config_dir", getattr(config, "single_file_config_dir", None) if config else None),
        (f"${CONFIG_ENV}", os.environ.get(CONFIG_ENV)),
    ]
    for origin, value in explicit:
        if not value:
            continue
        folder = Path(value).expanduser()
        problems = base_folder_problems(folder, need_vae)
        if problems:
            raise ModelError(
                f"The config folder {folder} (from {origin}) cannot serve {info.path.name}: it lacks "
                f"{', '.join(problems)}. It must be a diffusers folder of the same variant "
                f"({get_variant(info.variant).label}); get one with: {_download_hint(info.variant, need_vae)}"
            )
        return folder
    # The Hugging Face cache: the variant's own repo first, then repos of the same architecture
    # (Large and Large Turbo share one).
    arch = get_variant(info.variant).transformer_config
    repos = [get_variant(info.variant).repo_id] + [
        v.repo_id for v in VARIANTS.values() if v.transformer_config == arch and v.name != info.variant
    ]
    incomplete = []
    for repo in repos:
        snap = _hub_snapshot(repo)
        if snap is None:
            continue
        problems = base_folder_problems(snap, need_vae)
        if not problems:
            return snap
        incomplete.append(f"the cached {repo} lacks {', '.join(problems)}")
    variant = get_variant(info.variant)
    found = ("; ".join(incomplete) + ". ") if incomplete else ""
    raise ModelError(
        f"{info.path.name} ({variant.label}) holds only weights; the studio also needs the configs, "
        f"tokenizers and scheduler of the diffusers release (about 2 MB), and none were found on "
        f"this machine. {found}Get them once — accept the licence at "
        f"https://huggingface.co/{variant.repo_id} and log in (`hf auth login`), then run:\n"
        f"  {_download_hint(info.variant, need_vae)}\n"
        f"Or point the studio at a diffusers folder of the same variant: set {CONFIG_ENV}=/path/to/folder "
        "(or single_file_config_dir in the settings)."
    )


def check_compatible(info: FileInfo, base: Path) -> None:
    """Refuse a base folder whose transformer config does not describe the file's transformer."""
    try:
        cfg = json.loads((base / "transformer" / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"Could not read {base / 'transformer' / 'config.json'}: {e}") from e
    diffs = []
    if cfg.get("num_layers") != info.num_layers:
        diffs.append(f"{cfg.get('num_layers')} blocks in the config, {info.num_layers} in the file")
    if tuple(cfg.get("dual_attention_layers") or ()) != info.dual_attention_layers:
        diffs.append(
            f"dual attention layers {list(cfg.get('dual_attention_layers') or [])} in the config, "
            f"{list(info.dual_attention_layers)} in the file"
        )
    if bool(cfg.get("qk_norm")) != info.qk_norm:
        diffs.append(f"qk-norm {'on' if cfg.get('qk_norm') else 'off'} in the config, "
                     f"{'on' if info.qk_norm else 'off'} in the file")
    hidden = (cfg.get("num_attention_heads") or 0) * (cfg.get("attention_head_dim") or 0)
    if info.hidden_size is not None and hidden != info.hidden_size:
        diffs.append(f"width {hidden} in the config, {info.hidden_size} in the file")
    pos = cfg.get("pos_embed_max_size")
    if info.pos_embed_len is not None and pos is not None and pos * pos != info.pos_embed_len:
        diffs.append(f"pos_embed {pos}² in the config, {info.pos_embed_len} positions in the file")
    if diffs:
        guess = variant_for_transformer_config(cfg)
        what = guess.label if guess else "another model"
        raise ModelError(
            f"The config folder {base} is for {what}, but {info.path.name} is "
            f"{get_variant(info.variant).label} ({'; '.join(diffs)}). Use the configs of "
            f"{get_variant(info.variant).repo_id} instead."
        )


# --- nothing silently ---------------------------------------------------------------------------

# Tensors known to carry nothing the pipeline uses: CLIP's logit scale in ComfyUI's "incl_clips" saves.
_IGNORED = re.compile(r"^text_encoders\.(clip_l|clip_g|t5xxl)\.logit_scale$")


def _meta(info: FileInfo, keys) -> dict:
    import torch

    return {k: torch.empty(info.tensors[k].shape, device="meta") for k in keys}


def _transformer_leftovers(info: FileInfo) -> list[str]:
    """Transformer tensors diffusers' converter does not consume (a dry run on shapes only)."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    keys = info.transformer_keys()
    sd = {SAI_PREFIX + k[len(info.prefix):]: v for k, v in _meta(info, keys).items()}
    try:
        convert_sd3_transformer_checkpoint_to_diffusers(sd)
    except KeyError:
        return []  # a missing tensor: loading says which (and refuses the file)
    return [info.prefix + k.removeprefix(SAI_PREFIX) for k in sd]


def _vae_leftovers(info: FileInfo, base: Path) -> list[str]:
    """VAE tensors that diffusers' ldm converter drops or renames into nothing the VAE has."""
    import torch
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = json.loads((base / "vae" / "config.json").read_text())
    sd = {VAE_PREFIX + k[len(info.vae_prefix):]: v for k, v in _meta(info, info.vae_keys()).items()}
    names = {id(v): k for k, v in sd.items()}
    out = convert_ldm_vae_checkpoint(dict(sd), cfg)
    with torch.device("meta"):
        expected = set(AutoencoderKL.from_config(cfg).state_dict())
    used = set()
    for k, v in out.items():
        src = v if id(v) in names else getattr(v, "_base", None)
        if k in expected and src is not None and id(src) in names:
            used.add(names[id(src)])
    return [info.vae_prefix + k.removeprefix(VAE_PREFIX) for k in sd if k not in used]


def _scale_problems(info: FileInfo) -> list[str]:
    """Scaled-fp8 tensors that do not belong to a weight of a shape they can scale."""
    import torch

    bad = []
    for k, t in info.tensors.items():
        if not k.endswith((SCALE_WEIGHT, SCALE_INPUT)):
            continue
        w = info.tensors.get(k.rsplit(".", 1)[0] + ".weight")
        try:
            ok = w is not None and torch.broadcast_shapes(tuple(w.shape), tuple(t.shape)) == tuple(w.shape)
        except RuntimeError:
            ok = False
        if not ok or not t.dtype.startswith("F"):
            bad.append(k)
    return bad


def check_layout(info: FileInfo, base: Path) -> None:
    """Refuse a file holding tensors the studio would not load: they mean a layout it does not
    understand (loading the rest would give a wrong model without a word). The error names a
    few and counts them."""
    known = tuple(p for p in (info.prefix, info.vae_prefix, *info.embedded_encoders.values()) if p)
    unknown = []
    if info.prefix:
        unknown += [k for k in info.tensors if not k.startswith(known) and not _IGNORED.match(k)
                    and not (k == SCALED_FP8_MARKER or k.endswith("." + SCALED_FP8_MARKER))]
    else:
        unknown += [k for k in info.tensors if k.startswith(("cond_stage_model.", "conditioner.", "text_encoders."))
                    and not (info.embedded_encoders and k.startswith(known)) and not _IGNORED.match(k)]
    unknown += _scale_problems(info)
    unknown += _transformer_leftovers(info)
    if info.has_vae:
        unknown += _vae_leftovers(info, base)
    unknown = sorted(set(unknown))
    if unknown:
        shown = ", ".join(unknown[:5])
        raise ModelError(
            f"{info.path.name} holds {len(unknown)} tensor{'s' if len(unknown) != 1 else ''} the studio does not "
            f"understand ({shown}{', …' if len(unknown) > 5 else ''}). It knows the official SD3/SD3.5 "
            "layout, ComfyUI's scaled fp8 (<layer>.scale_weight, scaled_fp8) and city96's GGUF; loading the "
            "rest would give a wrong model without a word. Is it a checkpoint of another model, or a newer "
            "format (then please report it)?"
        )


# --- text encoders beside the file ----------------------------------------------------------------


def text_encoder_dirs(path: Path) -> list[Path]:
    """Where the text encoders of a single file are looked for, in order: text_encoders/ and
    clip/ beside it, its own folder, then text_encoders/ and clip/ beside its folder (ComfyUI:
    models/checkpoints/x.safetensors with models/text_encoders/ or models/clip/)."""
    here = path.parent
    dirs = [*(here / d for d in TEXT_ENCODER_DIRS), here, *(here.parent / d for d in TEXT_ENCODER_DIRS)]
    out: list[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def find_text_encoders(path: Path) -> dict[str, Path | None]:
    """{component: file or None}; the first preferred name found in the first folder that has it."""
    dirs = text_encoder_dirs(path)
    found: dict[str, Path | None] = {}
    for component, names in TEXT_ENCODER_FILES.items():
        found[component] = next(
            (d / n for n in names for d in dirs if (d / n).is_file()),
            None,
        )
    return found


def _missing_text_encoders_message(path: Path, variant: str, missing: list[str]) -> str:
    dirs = text_encoder_dirs(path)
    wanted = " / ".join(n for c in missing for n in TEXT_ENCODER_FILES[c])
    looked = "\n".join(f"  {d}/" for d in dirs)
    repo = _single_file_repo(variant)
    return (
        f"The text encoders of {path.name} were not found ({wanted}): the single-file release "
        f"keeps them in a separate text_encoders/ folder (ComfyUI: text_encoders/ or clip/). "
        f"Looked for those files in:\n{looked}\n"
        f"Download text_encoders/clip_l.safetensors, clip_g.safetensors and t5xxl_fp16.safetensors "
        f"(or t5xxl_fp8_e4m3fn.safetensors, half the size) from https://huggingface.co/{repo} into "
        f"{path.parent / TEXT_ENCODER_DIR}/, e.g.:\n"
        f'  hf download {repo} --include "text_encoders/*" --local-dir {path.parent}'
    )


# --- components ------------------------------------------------------------------------------------


@dataclass
class FileComponent:
    """A pipeline component built from a single file (what ``ModelManager`` calls an override)."""

    component: str
    file: Path | None
    identity: str  # content id: equal identities ⇒ interchangeable modules
    loader: Callable[[Placement], object] = field(repr=False)

    def load(self, placement: Placement):
        """Build the component for ``placement``."""
        return self.loader(placement)


def _dtype_of(placement: Placement):
    import torch

    return placement.dtype or torch.float32


def _quant_kwargs(placement: Placement, component: str) -> dict:
    qc = (placement.component_kwargs.get(component) or {}).get("quantization_config")
    return {"quantization_config": qc} if qc is not None else {}


def _read_tensors(path: Path, keys, dtype=None, scales: dict[str, str] | None = None) -> dict:
    """Tensors by name from a safetensors file; floating ones cast to ``dtype`` one at a time.

    ``scales`` (weight key -> scale key, ComfyUI's scaled fp8): those weights are dequantized,
    ``w.float() * scale`` (ComfyUI's ``weight * scale_weight``), before the cast."""
    import torch
    from safetensors import safe_open

    out = {}
    scales = scales or {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in keys:
                t = f.get_tensor(k)
                if k in scales:  # float32 unless a dtype is asked for
                    t = t.to(torch.float32) * f.get_tensor(scales[k]).to(torch.float32)
                if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                    t = t.to(dtype)
                out[k] = t
    except Exception as e:
        raise ModelError(f"Could not read {path.name}: {short_error(e)}") from e
    return out


def _check_materialized(model, what: str, path: Path, base: Path) -> None:
    empty = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise ModelError(
            f"{path.name} has no weights for parts of the {what} ({shown}): the file is incomplete or "
            f"does not match the config in {base}."
        )


class _DropEmptyFp32Warning(logging.Filter):
    """diffusers warns "modules ... should be kept in float32: []" on every from_single_file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


_QUIET = _DropEmptyFp32Warning()


def _quiet_diffusers() -> None:
    lg = logging.getLogger("diffusers.models.modeling_utils")
    if _QUIET not in lg.filters:
        lg.addFilter(_QUIET)


def _load_transformer(info: FileInfo, base: Path, placement: Placement):
    from diffusers import SD3Transformer2DModel

    _quiet_diffusers()
    dtype = _dtype_of(placement)
    if info.kind == "gguf":  # already quantized: the placement's own quantization does not apply
        from studio.models.gguf import load_transformer

        if _quant_kwargs(placement, "transformer"):
            log.warning("%s is a GGUF file: its own quantization is used, not preset %s's", info.path.name,
                        placement.name)
        header = {k: (t.dtype, t.shape, t.start, t.end) for k, t in info.tensors.items()}
        model = load_transformer(info.path, base, dtype, header)
        _check_materialized(model, "transformer", info.path, base)
        return model
    raw = _read_tensors(info.path, info.transformer_keys(), dtype, info.scales())
    # diffusers' converter expects the "model.diffusion_model." prefix (or none); normalise.
    sd = {SAI_PREFIX + k[len(info.prefix):]: v for k, v in raw.items()}
    del raw
    try:
        model = SD3Transformer2DModel.from_single_file(
            sd,
            config=str(base),
            subfolder="transformer",
            torch_dtype=dtype,
            local_files_only=True,
            **_quant_kwargs(placement, "transformer"),
        )
    except KeyError as e:
        raise ModelError(
            f"{info.path.name} lacks the tensor {e.args[0]!r}: the file is incomplete or not in "
            "the official SD3 layout."
        ) from e
    except Exception as e:
        raise ModelError(
            f"Could not build the transformer from {info.path.name} with the config in "
            f"{base / 'transformer'}: {short_error(e)}"
        ) from e
    _check_materialized(model, "transformer", info.path, base)
    return model


def _load_vae(info: FileInfo, base: Path, placement: Placement):
    from diffusers import AutoencoderKL

    _quiet_diffusers()
    dtype = _dtype_of(placement)
    sd = _read_tensors(info.path, info.vae_keys(), dtype, info.scales())
    if info.vae_prefix != VAE_PREFIX:
        sd = {VAE_PREFIX + k[len(info.vae_prefix):]: v for k, v in sd.items()}
    try:
        model = AutoencoderKL.from_single_file(
            sd, config=str(base), subfolder="vae", torch_dtype=dtype, local_files_only=True
        )
    except Exception as e:
        raise ModelError(
            f"Could not build the VAE from {info.path.name} with the config in {base / 'vae'}: {short_error(e)}"
        ) from e
    _check_materialized(model, "VAE", info.path, base)
    return model


def _text_encoder_class(base: Path, component: str):
    import importlib

    try:
        index = json.loads((base / "model_index.json").read_text())
        library, cls_name = index[component]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{base / 'model_index.json'} does not name a class for {component}.") from e
    if library != "transformers":
        raise ModelError(f"{component} in {base} comes from {library!r}; expected transformers.")
    return getattr(importlib.import_module("transformers"), cls_name)


def _prepare_text_encoder_state(sd: dict, dtype) -> dict:
    """Normalise a text encoder file's tensors: scaled fp8, fp8 upcast, dropped buffers, ties."""
    import torch

    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids") and k != "scaled_fp8"}
    # "scaled" fp8 files store weight/scale pairs
    for k in [k for k in sd if k.endswith(".scale_weight")]:
        scale = sd.pop(k)
        w = k[: -len("scale_weight")] + "weight"
        if w in sd:
            sd[w] = sd[w].to(torch.float32) * scale.to(torch.float32)
    for k in [k for k in sd if k.endswith(".scale_input")]:
        sd.pop(k)
    for k, v in sd.items():
        if v.is_floating_point() and v.element_size() == 1:  # float8: not usable as is
            sd[k] = v.to(dtype)
    # T5: the token embedding is stored as shared.weight, encoder.embed_tokens.weight, or both
    if "shared.weight" in sd and "encoder.embed_tokens.weight" not in sd:
        sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    elif "encoder.embed_tokens.weight" in sd and "shared.weight" not in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    return sd


def _load_text_encoder(component: str, file: Path, base: Path, placement: Placement, prefix: str = ""):
    """A transformers text encoder from ``file`` (its tensors under ``prefix``), config from ``base``."""
    import torch

    cls = _text_encoder_class(base, component)
    try:
        cfg = cls.config_class.from_pretrained(base / component)
    except Exception as e:
        raise ModelError(f"Could not read the {component} config in {base / component}: {short_error(e)}") from e
    dtype = _dtype_of(placement)
    header = {k[len(prefix):]: v for k, v in read_header(file).items() if k.startswith(prefix)}
    # check the keys and shapes against the config before loading anything
    with torch.device("meta"):
        skeleton = cls(cfg)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    del skeleton
    keys = {k for k in header if not k.endswith(("position_ids", ".scale_weight", ".scale_input")) and k != "scaled_fp8"}
    tied = {"shared.weight", "encoder.embed_tokens.weight"}
    missing = sorted(k for k in expected if k not in keys and not (k in tied and keys & tied))
    unexpected = sorted(keys - set(expected))
    wrong = sorted(
        f"{k} {list(header[k].shape)} (expected {list(expected[k])})"
        for k in keys & set(expected)
        if tuple(header[k].shape) != expected[k]
    )
    label = TEXT_ENCODER_LABELS.get(component, component)
    if missing or unexpected:
        what = _describe(list(header))
        raise ModelError(
            f"{file.name} does not fit the {label} slot: it looks like {what}. "
            f"{len(missing)} expected tensors are missing (e.g. {', '.join(missing[:3]) or '-'}), "
            f"{len(unexpected)} are unknown (e.g. {', '.join(unexpected[:3]) or '-'}). Check that the "
            f"files in {file.parent} are the ones of the release ({', '.join(TEXT_ENCODER_FILES[component])})"
            + (f" (tensors under {prefix!r} in the file)." if prefix else ".")
        )
    if wrong:
        raise ModelError(
            f"{file.name} does not fit the {label} slot: tensor shapes differ from the config in "
            f"{base / component} — {'; '.join(wrong[:3])}. Is it another encoder (clip_l and clip_g "
            "swapped?) or a text encoder of another model?"
        )
    raw = _read_tensors(file, [prefix + k for k in sorted(header)])
    sd = _prepare_text_encoder_state({k[len(prefix):]: v for k, v in raw.items()}, dtype)
    del raw
    try:
        model, info = cls.from_pretrained(
            None,
            config=cfg,
            state_dict=sd,
            dtype=dtype,
            output_loading_info=True,
            **_quant_kwargs(placement, component),
        )
    except Exception as e:
        raise ModelError(f"Could not load the {label} from {file.name}: {short_error(e)}") from e
    bad = [k for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)]
    if bad:
        raise ModelError(
            f"{file.name} does not fit the {label} slot ("
            + "; ".join(f"{k.replace('_', ' ')}: {', '.join(sorted(map(str, info[k]))[:3])}" for k in bad)
            + ")."
        )
    return model.eval()


def _missing_t5(path: Path, variant: str):
    def load(placement: Placement):
        raise ModelError(
            _missing_text_encoders_message(path, variant, ["text_encoder_3"])
            + "\nOr choose a memory preset without T5 (prompts then rely on the CLIP encoders only)."
        )

    return load


# --- identities -------------------------------------------------------------------------------------

_RANGE_HASHES: dict[tuple[str, str], str] = {}


def _ranges_hash(path: Path, file_hash: str, tensors: dict[str, TensorInfo], keys: list[str], tag: str) -> str:
    """sha256 of some tensors' names, dtypes, shapes and bytes (memoised per file content).

    Used for the VAE inside a single file: the releases share bit-identical VAEs, so switching
    Large ⇄ Large Turbo keeps the loaded VAE.
    """
    memo = (file_hash, tag)
    if memo in _RANGE_HASHES:
        return _RANGE_HASHES[memo]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for k in sorted(keys):
            t = tensors[k]
            h.update(f"{k[k.find('.') + 1:]}|{t.dtype}|{t.shape}|".encode())
            f.seek(t.start)
            left = t.end - t.start
            while left > 0:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    break
                h.update(chunk)
                left -= len(chunk)
    digest = h.hexdigest()
    _RANGE_HASHES[memo] = digest
    return digest


def _identity(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def _config_hash(base: Path, component: str) -> str:
    h = hashlib.sha256()
    for f in sorted((base / component).glob("*.json")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


# --- the entry point ----------------------------------------------------------------------------------


def resolve_single_file(
    path: Path,
    config: StudioConfig | None = None,
    hashes: HashCache | None = None,
    progress: Callable[[str, float | None], None] | None = None,
) -> tuple[Path, dict[str, FileComponent]]:
    """(base diffusers folder, overrides) for a single-file checkpoint, for ``ModelManager.load``.

    The overrides cover ``transformer``, ``vae`` (when the file carries it), ``text_encoder``,
    ``text_encoder_2`` and ``text_encoder_3`` (from ``text_encoders/`` beside the file or in its
    parent folder, or from inside the file for "incl_clips" releases); everything else (tokenizers, scheduler, the VAE of
    a file without one) comes from the base folder. Each override's ``identity`` is derived from
    file contents (sha256 through ``hashes``, the manager's HashCache; a private one on the same
    JSON file when None) plus the config it is built with.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"No such file: {path}. Check the path to the .safetensors file.")
    info = inspect_file(path)
    base = find_base_folder(info, config)
    check_compatible(info, base)
    check_layout(info, base)
    if hashes is None:
        hashes = HashCache(config.data_dir / "cache" / "hashes.json" if config is not None else None)
    encoders = find_text_encoders(path)
    for c in info.embedded_encoders:  # encoders inside the file win over files beside it
        encoders[c] = path
    missing = [c for c in ("text_encoder", "text_encoder_2") if encoders[c] is None]
    if missing:
        raise ModelError(_missing_text_encoders_message(path, info.variant, missing))
    # validate the encoder files now, so a broken one fails before anything is loaded
    for c, f in encoders.items():
        if f is not None and f != path:
            read_header(f)

    if progress:  # hashing a 16 GB file the first time takes a while (cached afterwards)
        progress(f"Identifying {path.name}", None)
    file_hash = hashes.file_hash(path)
    overrides: dict[str, FileComponent] = {
        "transformer": FileComponent(
            "transformer",
            path,
            _identity("single-file", file_hash, _config_hash(base, "transformer")),
            lambda placement: _load_transformer(info, base, placement),
        )
    }
    if info.has_vae:
        vae_hash = _ranges_hash(path, file_hash, info.tensors, info.vae_keys(), "vae")
        overrides["vae"] = FileComponent(
            "vae",
            path,
            _identity("single-file-vae", vae_hash, _config_hash(base, "vae")),
            lambda placement: _load_vae(info, base, placement),
        )
    for component, file in encoders.items():
        if file is None:  # T5 absent: fine unless T5 is actually loaded (no-T5 presets skip it)
            overrides[component] = FileComponent(
                component, None, _identity("missing", component), _missing_t5(path, info.variant)
            )
            continue
        prefix = info.embedded_encoders.get(component, "") if file == path else ""
        if prefix:
            keys = [k for k in info.tensors if k.startswith(prefix)]
            content = _ranges_hash(path, file_hash, info.tensors, keys, component)
        else:
            content = hashes.file_hash(file)
        overrides[component] = FileComponent(
            component,
            file,
            _identity(component, content, _config_hash(base, component)),
            (lambda c, f, p: (lambda placement: _load_text_encoder(c, f, base, placement, p)))(component, file, prefix),
        )
    log.info(
        "single file %s: %s, configs from %s, text encoders %s",
        path.name,
        info.variant,
        base,
        {c: (str(f) if f else None) for c, f in encoders.items()},
    )
    return base, overrides
