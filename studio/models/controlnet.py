"""ControlNets: where they come from, how they load, and the pipeline they join.

A ControlNet source is a catalog id (``studio.control_catalog``), a Hub id (only the diffusers
layout — ``config.json`` and safetensors at the repo root — is downloaded), a diffusers folder,
or a single ``.safetensors`` file. Single files come in two key layouts:

* **Stability's** (``sd3.5_large_controlnet_{canny,depth,blur}.safetensors``), read here with
  our own conversion (:func:`stability_to_diffusers`) — diffusers 0.42 has no ``from_single_file``
  for SD3 ControlNets. The layout, from Stability's reference code (github.com/Stability-AI/sd3.5,
  ``dit_embedder.ControlNetEmbedder`` + ``sd3_infer.CONTROLNET_MAP``) and cross-checked against
  diffusers' ``scripts/convert_sd3_controlnet_to_diffusers.py`` and ComfyUI's
  ``load_controlnet_sd35``::

      time_text_embed.{timestep,text}_embedder.linear_{1,2}.*   same names in both layouts
      pos_embed_input.proj.*, controlnet_blocks.N.*             same
      transformer_blocks.N.attn.qkv.*          → attn.to_q / to_k / to_v (split in three, rows)
      transformer_blocks.N.attn.proj.*         → attn.to_out.0.*
      transformer_blocks.N.mlp.fc1.* / fc2.*   → ff.net.0.proj.* / ff.net.2.*
      transformer_blocks.N.adaLN_modulation.1.*→ norm1.linear.*  (same chunk order: shift, scale,
                                                 gate for attention, then for the MLP)
      pos_embed.*                              ignored: the 8B ControlNets add the *base
                                                 transformer's* patch + position embedding
                                                 (reference ``BaseModel.apply_model``)
      control_type                             ignored as a weight; read as the map type
                                                 (blur 0, canny 1, depth 2)

  The config is read from the tensor shapes (the files carry none); the head count, which
  shapes cannot show, comes from the base transformer — as Stability's reference does — or 64.
* **diffusers'** keys in one file (repacks of the InstantX ControlNets): the config is read from
  the shapes the same way.

Loaded ControlNets are identified by content hash (``HashCache``) and kept in a small RAM cache
(:class:`ControlNetLibrary`). :func:`pipeline_for` builds the ControlNet pipeline around a base
pipeline's components (shared objects, nothing cast but the ControlNet); the 8B ControlNets then
share the transformer's position embedding module. :func:`controlnet_blocker` says why a loaded
base cannot take a ControlNet.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from studio.control_catalog import CONTROLNETS, ControlNetEntry
from studio.errors import ModelError, ValidationError
from studio.models.identity import HashCache
from studio.models.sources import HUB_ID, HUB_IGNORE, PICKLE_SUFFIXES, ProgressFn, short_error

log = logging.getLogger(__name__)

# What a diffusers ControlNet repo holds that we need (the Stability repos also carry sample
# images and a licence; some InstantX repos older variants in subfolders such as v1/).
CONTROLNET_ALLOW = ["config.json", "*.safetensors", "*.safetensors.index.json"]
CONTROL_TYPE_CODES = {0: "blur", 1: "canny", 2: "depth"}  # Stability's control_type tensor
DEFAULT_HEAD_DIM = 64  # every released SD3 model; shapes cannot show it
MAX_CACHED = 2  # ControlNets kept in RAM beside the ones in use


@dataclass(frozen=True)
class ControlNetSource:
    """Where a ControlNet comes from: a Hub repo, a folder or a file (and its catalog entry, if any)."""
    kind: str  # "hub" | "folder" | "file"
    ref: str  # repo id or absolute path
    entry: ControlNetEntry | None = None  # the catalog entry, when the source is a catalog id

    @property
    def name(self) -> str:
        """The name metadata and messages use: the catalog id, the Hub id, or the folder / file name."""
        if self.entry:
            return self.entry.id
        if self.kind == "hub":
            return self.ref
        return Path(self.ref).name if self.kind == "folder" else Path(self.ref).stem  # a folder keeps its dots


def parse_controlnet_source(spec: str) -> ControlNetSource:
    """What a ControlNet string names: a catalog id, a folder, a .safetensors file or a Hub id.
    Pickled checkpoints are refused (unpickling runs code)."""
    spec = (spec or "").strip()
    if not spec:
        raise ModelError("No ControlNet given. Pass a catalog id (e.g. sd3.5-large-canny), a Hub id, a "
                         "diffusers folder or a .safetensors file.")
    if spec in CONTROLNETS:
        entry = CONTROLNETS[spec]
        return ControlNetSource("hub", entry.repo_id, entry)
    path = Path(spec).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelError(f"{path.name} is a pickled checkpoint ({path.suffix}); the studio does not load those "
                         "because unpickling can run arbitrary code. Use a .safetensors file or a diffusers folder.")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a folder without config.json, so not a diffusers ControlNet. Point at "
                             "the folder that holds config.json and the .safetensors weights, or at one "
                             ".safetensors file.")
        return ControlNetSource("folder", str(path.resolve()), _entry_for_repo(path.name))
    if path.suffix.lower() == ".safetensors":
        if not path.is_file():
            raise ModelError(f"No such file: {path}. Check the path to the ControlNet .safetensors file.")
        return ControlNetSource("file", str(path.resolve()), _entry_for_file(path.name))
    if not spec.startswith((".", "/", "~")) and HUB_ID.match(spec):
        return ControlNetSource("hub", spec, _entry_for_repo(spec))
    raise ModelError(f"No such ControlNet folder or file: {spec}. Give a catalog id ({', '.join(CONTROLNETS)}), a "
                     "Hub id, a diffusers folder or a .safetensors file.")


def _entry_for_repo(repo_or_name: str) -> ControlNetEntry | None:
    tail = repo_or_name.rsplit("/", 1)[-1].lower()
    return next((e for e in CONTROLNETS.values() if e.repo_id.lower() == repo_or_name.lower()
                 or e.repo_id.rsplit("/", 1)[-1].lower() == tail), None)


def _entry_for_file(filename: str) -> ControlNetEntry | None:
    return next((e for e in CONTROLNETS.values() if e.single_file and e.single_file.lower() == filename.lower()), None)


# --- the Hub ------------------------------------------------------------------------------------


def hub_snapshot(repo_id: str, allow_patterns: list[str], progress: ProgressFn | None = None,
                 what: str = "the ControlNet") -> Path:
    """Download (or find in the cache) the files of a Hub repo that match ``allow_patterns``,
    reporting progress; errors say what to do. A sibling of ``studio.models.sources.download``
    (which fetches a whole pipeline's layout)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    tqdm_class = None
    if progress:
        from tqdm.auto import tqdm as _tqdm

        progress(f"Fetching {repo_id}", 0.0)

        class _Reporter(_tqdm):  # huggingface_hub's byte bars, forwarded to the caller
            def update(self, n=1):
                out = super().update(n)
                self._studio_done = getattr(self, "_studio_done", 0) + (n or 0)
                if self.total:
                    progress(f"Downloading {repo_id}: {self._studio_done / 2**30:.2f} of {self.total / 2**30:.2f} GB",
                             min(self._studio_done / self.total, 1.0))
                return out

        tqdm_class = _Reporter
    try:
        path = snapshot_download(repo_id, allow_patterns=allow_patterns, ignore_patterns=HUB_IGNORE,
                                 tqdm_class=tqdm_class)
    except GatedRepoError as e:
        raise ModelError(f"{repo_id} is gated: accept its licence at https://huggingface.co/{repo_id} while "
                         "logged in, then log in here (`hf auth login` or HF_TOKEN) and try again.") from e
    except RepositoryNotFoundError as e:
        raise ModelError(f"No repo {repo_id} on the Hugging Face Hub (or it is private and you are not logged "
                         "in). Check the id.") from e
    except LocalEntryNotFoundError as e:
        raise ModelError(f"{what.capitalize()} ({repo_id}) is not on this machine and the Hub cannot be reached. "
                         f"Download it while online (`hf download {repo_id}`), or give a local folder or "
                         ".safetensors file instead.") from e
    except HfHubHTTPError as e:
        raise ModelError(f"Downloading {repo_id} failed: {short_error(e)}. Try again later.") from e
    except OSError as e:
        raise ModelError(f"Downloading {repo_id} failed: {short_error(e)}.") from e
    if progress:
        progress(f"{repo_id} is on disk", 1.0)
    return Path(path)


# --- single files: layout, config, conversion ------------------------------------------------------

_SAI_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|adaLN_modulation\.1)\.(weight|bias)")
_SAI_PARTS = {"attn.proj": "attn.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
              "adaLN_modulation.1": "norm1.linear"}
_SHARED = re.compile(r"(controlnet_blocks\.\d+|pos_embed_input\.proj|"
                     r"time_text_embed\.(timestep_embedder|text_embedder)\.linear_[12])\.(weight|bias)")


def file_layout(keys) -> str:
    """"stability" or "diffusers": the key layout of a ControlNet file (raises for anything else).

    Stability's files have ``transformer_blocks.0.adaLN_modulation.1.bias`` (the key ComfyUI
    detects them by); diffusers' ``transformer_blocks.0.norm1.linear.bias``."""
    keys = set(keys)
    if "controlnet_blocks.0.weight" not in keys or "pos_embed_input.proj.weight" not in keys:
        raise ModelError("This .safetensors file is not an SD3 ControlNet (it has no controlnet_blocks / "
                         "pos_embed_input tensors). For a full model use --model; for a LoRA, the LoRA folder.")
    if "transformer_blocks.0.adaLN_modulation.1.bias" in keys:
        return "stability"
    if "transformer_blocks.0.norm1.linear.bias" in keys:
        return "diffusers"
    raise ModelError("This ControlNet file's keys match neither Stability's layout nor diffusers'.")


def stability_to_diffusers(sd: dict) -> tuple[dict, dict]:
    """Stability's ControlNet state dict → (diffusers ``SD3ControlNetModel`` state dict, extras).

    ``extras``: ``control_type`` (0 blur, 1 canny, 2 depth, or None) and ``ignored`` (the keys not
    carried over: the unused patch embedder and any unknown tensor, logged)."""
    out: dict = {}
    ignored: list[str] = []
    control_type = None
    for key, value in sd.items():
        m = _SAI_BLOCK.fullmatch(key)
        if m:
            i, part, p = m.groups()
            base = f"transformer_blocks.{i}."
            if part == "attn.qkv":
                if value.shape[0] % 3:
                    raise ModelError(f"{key} has {value.shape[0]} rows, not three equal parts (q, k, v).")
                q, k, v = value.chunk(3, dim=0)
                out[base + f"attn.to_q.{p}"], out[base + f"attn.to_k.{p}"], out[base + f"attn.to_v.{p}"] = q, k, v
            else:
                out[base + f"{_SAI_PARTS[part]}.{p}"] = value
        elif _SHARED.fullmatch(key):
            out[key] = value
        elif key == "control_type":
            control_type = round(float(value.reshape(-1)[0].item()))
            ignored.append(key)
        else:
            ignored.append(key)
    unknown = [k for k in ignored if k != "control_type" and not k.startswith("pos_embed.")]
    if unknown:
        log.warning("ControlNet file: %d tensors not used (%s%s)", len(unknown), ", ".join(unknown[:5]),
                    ", …" if len(unknown) > 5 else "")
    return out, {"control_type": control_type, "ignored": ignored}


def _shape(header: dict, key: str) -> tuple[int, ...]:
    info = header.get(key)
    return tuple(getattr(info, "shape", info) or ()) if info is not None else ()


def config_from_header(header: dict, layout: str, base_config: dict | None = None) -> dict:
    """An ``SD3ControlNetModel`` config from a single file's tensor shapes (``header``: name →
    anything with ``.shape``, or the shape itself). ``base_config``, the base transformer's
    config, gives what shapes cannot: the head size (and the sample size)."""
    base = dict(base_config or {})
    blocks = {int(k.split(".")[1]) for k in header if k.startswith("transformer_blocks.")}
    if not blocks:
        raise ModelError("This ControlNet file has no transformer blocks.")
    first = "transformer_blocks.0.attn.qkv.weight" if layout == "stability" else "transformer_blocks.0.attn.to_q.weight"
    width = _shape(header, first)[1]
    head_dim = base.get("attention_head_dim", DEFAULT_HEAD_DIM)
    if width % head_dim:
        raise ModelError(f"This ControlNet file is {width} wide, not a multiple of {head_dim}-wide attention "
                         "heads, and a file does not say its head count: load it beside the base model it "
                         "was made for.")
    patch_in = _shape(header, "pos_embed_input.proj.weight")  # (width, channels, p, p)
    pooled = _shape(header, "time_text_embed.text_embedder.linear_1.weight")[1]
    config = {
        "sample_size": base.get("sample_size", 128),
        "patch_size": patch_in[2],
        "in_channels": base.get("in_channels", 16),
        "num_layers": max(blocks) + 1,
        "attention_head_dim": head_dim,
        "num_attention_heads": width // head_dim,
        "pooled_projection_dim": pooled,
        "out_channels": base.get("out_channels", 16),
        "dual_attention_layers": [],
        "qk_norm": None,
    }
    if layout == "stability":  # Stability's 8B design (diffusers' conversion script's config)
        config.update(joint_attention_dim=None, caption_projection_dim=2048, pos_embed_max_size=None,
                      pos_embed_type=None, use_pos_embed=False, force_zeros_for_pooled_projection=False)
    else:
        joint = "context_embedder.weight" in header
        use_pos = "pos_embed.proj.weight" in header
        if use_pos:
            config["in_channels"] = _shape(header, "pos_embed.proj.weight")[1]
        table = _shape(header, "pos_embed.pos_embed")
        config.update(
            joint_attention_dim=_shape(header, "context_embedder.weight")[1] if joint else None,
            caption_projection_dim=_shape(header, "context_embedder.weight")[0] if joint else 2048,
            pos_embed_max_size=math.isqrt(table[1]) if len(table) == 3 else None,
            pos_embed_type="sincos" if use_pos else None,
            use_pos_embed=use_pos,
            # not visible in the weights: InstantX/Alimama (joint blocks) trained with zero pooled
            # projections, Stability's 8B ones with the real pooled embedding
            force_zeros_for_pooled_projection=joint,
            qk_norm="rms_norm" if "transformer_blocks.0.attn.norm_q.weight" in header else None,
            dual_attention_layers=sorted(int(k.split(".")[1]) for k in header
                                         if re.fullmatch(r"transformer_blocks\.\d+\.attn2\.to_q\.weight", k)),
        )
    config["extra_conditioning_channels"] = max(0, patch_in[1] - config["in_channels"])
    return config


def _read_header(path: Path) -> dict:
    from studio.models.singlefile import read_header

    return read_header(path)


def _build(config: dict, state_dict: dict, dtype, name: str):
    """An SD3ControlNetModel built on the meta device and given ``state_dict``'s tensors
    (no random init of a 2B-parameter model just to overwrite it)."""
    import torch
    from diffusers import SD3ControlNetModel

    with torch.device("meta"):
        model = SD3ControlNetModel.from_config(config)
    state_dict = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state_dict.items()}
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelError(f"{name}: the weights do not match an SD3 ControlNet of the shape they describe "
                         f"({short_error(e)}).") from e
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        raise ModelError(f"{name}: some ControlNet weights are missing from the file.")
    return model.eval()


def _load_cast(path: Path, dtype) -> dict:
    """The file's tensors, each cast to ``dtype`` as it is read: RAM peaks at the model in
    ``dtype`` plus one tensor as stored (Stability's 8B ControlNets are fp32 files: read whole,
    then cast, they would take 8.6 + 4.3 GB on the way to a 4.3 GB bf16 model)."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 — safe_open has no iterator
            t = f.get_tensor(key)
            out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def load_controlnet_file(path: str | Path, dtype=None, base_config: dict | None = None):
    """(model, info) from one .safetensors file in Stability's or diffusers' layout. ``info``:
    layout, config, control_type (Stability files), ignored keys."""
    path = Path(path)
    header = _read_header(path)
    layout = file_layout(header)
    config = config_from_header(header, layout, base_config)
    try:
        sd = _load_cast(path, dtype)
    except Exception as e:  # safetensors raises several types for a bad file
        raise ModelError(f"Could not read {path.name}: {short_error(e)}. Download it again.") from e
    extras = {"control_type": None, "ignored": []}
    if layout == "stability":
        sd, extras = stability_to_diffusers(sd)
    model = _build(config, sd, dtype, path.name)
    return model, {"layout": layout, "config": config, **extras}


def load_controlnet_folder(folder: str | Path, dtype=None):
    """(model, info) from a diffusers ControlNet folder (config.json + safetensors)."""
    import json

    from diffusers import SD3ControlNetModel

    folder = Path(folder)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        if any(p.suffix in PICKLE_SUFFIXES for p in folder.glob("*")):
            raise ModelError(f"{folder} holds only pickled weights; the studio loads .safetensors only.")
        raise ModelError(f"{folder} has no .safetensors weights next to its config.json.")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"Could not read {folder / 'config.json'}: {e}") from e
    kwargs = {}
    # Some revisions of Alimama's config.json lack extra_conditioning_channels (diffusers' own
    # example passes it by hand): read it from the patch embedder's input channels.
    try:
        shape = _shape(_read_header(weights[0]), "pos_embed_input.proj.weight")
        if shape:
            extra = max(0, shape[1] - config.get("in_channels", 16))
            if extra != config.get("extra_conditioning_channels", 0):
                kwargs["extra_conditioning_channels"] = extra
    except ModelError:
        pass
    try:
        model = SD3ControlNetModel.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True, **kwargs)
    except Exception as e:  # shape mismatch, truncated file, …
        raise ModelError(f"Could not load the ControlNet in {folder}: {short_error(e)}") from e
    return model.eval(), {"layout": "diffusers", "config": dict(model.config), "control_type": None, "ignored": []}


# --- the library: identity and the RAM cache ----------------------------------------------------


@dataclass
class LoadedControlNet:
    """A loaded ControlNet: the model, its name and content hash, where it came from, its config and
    control type."""
    model: object  # SD3ControlNetModel
    name: str  # catalog id, folder/file stem or Hub id
    sha256: str  # content identity (file sha256, or the folder identity)
    source: ControlNetSource
    entry: ControlNetEntry | None
    config: dict
    control_type: str | None = None  # from the catalog entry or a Stability file's control_type
    info: dict = field(default_factory=dict)

    @property
    def short_hash(self) -> str:
        """The hash Forge-style infotext shows beside the name (first 10 hex, as A1111's model hash)."""
        return self.sha256[:10]

    @property
    def inpaint(self) -> bool:
        """Whether it is an inpainting ControlNet (its config has extra conditioning channels)."""
        return bool(self.config.get("extra_conditioning_channels"))


class ControlNetLibrary:
    """Loads ControlNets from any source, identified by content, with a small RAM cache.

    ``get(spec, dtype)`` returns the same model object for the same content and dtype; the
    ``MAX_CACHED`` most recently used stay in RAM (a 2B-parameter ControlNet is 4.3 GB in bf16)."""

    def __init__(self, hashes: HashCache, max_cached: int = MAX_CACHED, progress: ProgressFn | None = None):
        self.hashes = hashes
        self.max_cached = max_cached
        self.progress = progress
        self.lock = threading.RLock()
        self._cache: OrderedDict[tuple[str, str, str], LoadedControlNet] = OrderedDict()

    def _resolve(self, src: ControlNetSource, progress) -> Path:
        if src.kind != "hub":
            return Path(src.ref)
        return hub_snapshot(src.ref, CONTROLNET_ALLOW, progress, what=f"the ControlNet {src.name}")

    def identity(self, path: Path) -> str:
        """The content identity of a ControlNet file (its sha256) or folder."""
        return self.hashes.file_hash(path) if path.is_file() else self.hashes.folder_identity(path)

    def get(self, spec: str, dtype=None, base_config: dict | None = None,
            progress: ProgressFn | None = None, setup: str = "") -> LoadedControlNet:
        """The ControlNet ``spec`` names (catalog id, Hub id, folder or file) at ``dtype``: from the
        cache when the same content is held, else loaded (downloaded first for the Hub).
        ``setup``: how the preset stores and places it (``Preset.controlnet_key``) — a net cast
        or hooked for one preset is another cache entry than for another."""
        src = parse_controlnet_source(spec)
        progress = progress or self.progress
        with self.lock:
            path = self._resolve(src, progress)
            sha = self.identity(path)
            key = (sha, str(dtype), setup)
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            if progress:
                progress(f"Loading the ControlNet {src.name}", None)
            if path.is_file():
                model, info = load_controlnet_file(path, dtype, base_config)
            else:
                model, info = load_controlnet_folder(path, dtype)
            code = info.get("control_type")
            control_type = src.entry.control_type if src.entry else CONTROL_TYPE_CODES.get(code)
            loaded = LoadedControlNet(model, src.name, sha, src, src.entry, info["config"], control_type, info)
            self._cache[key] = loaded
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
            return loaded

    def cached(self) -> list[str]:
        """The names of the ControlNets held in RAM, least recently used first."""
        with self.lock:
            return [c.name for c in self._cache.values()]

    def clear(self) -> None:
        """Drop every cached ControlNet."""
        with self.lock:
            self._cache.clear()


# --- the pipeline ---------------------------------------------------------------------------------


def _is_offloaded(module) -> bool:
    """Whether accelerate or diffusers hooks move ``module``'s weights (offload of any kind)."""
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    return any(hasattr(m, "_hf_hook") for m in module.modules()) or _is_group_offload_enabled(module)


def controlnet_blocker(pipe, configs=()) -> str | None:
    """Why this base pipeline cannot take these ControlNets (None when it can).

    Checked on CPU (tests/test_controlnet.py): fp8 layerwise-cast transformers take a ControlNet
    (the ControlNet adds to activations, not to weights). A quantized (bitsandbytes) transformer
    reports its compute dtype to the pipeline the same way (``ModelMixin.dtype`` is the first
    floating parameter, the unquantized patch embedder) — not run here (bitsandbytes needs CUDA
    for diffusers). What cannot work:

    * a pipeline spread over several GPUs (``device_map``): a new component cannot be placed
      into it;
    * an 8B ControlNet (``use_pos_embed=False``) on a transformer whose position embedding is
      offloaded off the device (sequential offload leaves meta tensors behind): the pipeline
      copies that embedding into the ControlNet.
    """
    if getattr(pipe, "hf_device_map", None):
        return ("The model is spread over several GPUs (device_map); a ControlNet cannot be added to it. "
                "Pick a single-GPU preset in Models & Memory to use ControlNets.")
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        return "The loaded pipeline has no transformer."
    needs_pos = any(not c.get("use_pos_embed", True) for c in configs)
    if needs_pos and any(t.is_meta for t in transformer.pos_embed.state_dict().values()):
        return ("The SD3.5 Large ControlNets reuse the transformer's position embedding, and this preset "
                "(sequential offload) keeps it off the device. Pick model or group offload in Models & "
                "Memory to use them.")
    return None


def _multi_class():
    from diffusers import SD3MultiControlNetModel

    class AlignedMultiControlNet(SD3MultiControlNetModel):
        """Several SD3 ControlNets, each with its own scale, added per *transformer* block.

        diffusers' ``SD3MultiControlNetModel`` adds the nets' outputs list position by list
        position (``zip``), and the transformer spreads a list of n outputs over its blocks with
        ``interval = blocks / n``: nets of different depths (InstantX canny has 6 blocks, depth
        12) would be truncated to the shortest and mapped onto the wrong blocks. When the depths
        differ, each net's outputs are first laid out per transformer block exactly as the
        transformer would lay them out for that net alone, then summed; equal depths keep
        diffusers' own sum."""

        def __init__(self, controlnets, transformer_layers: int):
            super().__init__(controlnets)
            self.transformer_layers = transformer_layers

        def forward(self, hidden_states, controlnet_cond, conditioning_scale, pooled_projections,
                    encoder_hidden_states=None, timestep=None, joint_attention_kwargs=None, return_dict=True):
            outputs = []
            for image, scale, net in zip(controlnet_cond, conditioning_scale, self.nets, strict=True):
                samples = net(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                              pooled_projections=pooled_projections, controlnet_cond=image, conditioning_scale=scale,
                              joint_attention_kwargs=joint_attention_kwargs, return_dict=False)[0]
                outputs.append(list(samples))
            if len({len(o) for o in outputs}) > 1:
                n = self.transformer_layers
                outputs = [[o[int(j / (n / len(o)))] for j in range(n)] for o in outputs]
            merged = outputs[0]
            for o in outputs[1:]:
                merged = [a + b for a, b in zip(merged, o, strict=True)]
            return (merged,)

    return AlignedMultiControlNet


def pipeline_for(base_pipe, controlnets, dtype, *, inpaint: bool = False, share_pos_embed: bool = True,
                 preset=None):
    """A StableDiffusion3ControlNet(Inpainting)Pipeline on the base pipeline's components.

    ``controlnets``: one or more SD3ControlNetModel (or LoadedControlNet); several become one
    multi-ControlNet (one scale each at call time; nets of different depths are
    aligned per transformer block, see ``AlignedMultiControlNet``). The components are the base's own
    objects and are not cast: ``from_pipe(..., dtype=)`` would call ``.to(dtype)`` on every
    component, which undoes fp8 layerwise-cast storage (the weights come back as bf16 until the
    next forward — checked on CPU) and only warns for bitsandbytes ones; here only the
    ControlNets are moved to ``dtype`` and to the base's execution device — or, with ``preset``
    (the loaded model's memory preset), stored and placed as the preset says beside the
    transformer (:meth:`Preset.apply_controlnet`: fp8 with a quantized transformer; with its
    offload, model, group or sequential). They are then in the preset's dtype already (the
    ControlNet library loads them so), and nothing is cast.

    The 8B ControlNets (``use_pos_embed=False``) read the transformer's patch + position
    embedding. diffusers' pipeline gives each a copy of it (for SD3.5 Large: a 192² × 2432 table,
    0.18 GB in bf16); with ``share_pos_embed`` and a transformer that no hook moves, the copy is
    replaced by the transformer's own module (identical weights, no extra bytes).
    """
    from diffusers import (
        SD3ControlNetModel,
        StableDiffusion3ControlNetInpaintingPipeline,
        StableDiffusion3ControlNetPipeline,
    )

    nets = [getattr(c, "model", c) for c in (controlnets if isinstance(controlnets, (list, tuple)) else [controlnets])]
    if not nets or not all(isinstance(n, SD3ControlNetModel) for n in nets):
        raise ModelError("pipeline_for needs one or more SD3ControlNetModel.")
    designs = {(n.config.joint_attention_dim is None, bool(n.config.force_zeros_for_pooled_projection)) for n in nets}
    if len(designs) > 1:  # the pipeline reads these two settings from the first net for all of them
        raise ValidationError("These ControlNets cannot run together: some are Stability's 8B design (no text "
                              "input, real pooled embedding) and some InstantX's (text input, zero pooled "
                              "embedding). Combine ControlNets of one design.", "controlnet")
    problem = controlnet_blocker(base_pipe, [dict(n.config) for n in nets])
    if problem:
        raise ModelError(problem)
    device = base_pipe._execution_device
    for net in nets if preset is None else ():  # moved only when needed (a cached one usually is in place)
        if dtype is not None and net.dtype != dtype:
            net.to(dtype=dtype)
        if net.device != device:
            net.to(device)
    controlnet = nets[0] if len(nets) == 1 else _multi_class()(nets, base_pipe.transformer.config.num_layers)
    cls = StableDiffusion3ControlNetInpaintingPipeline if inpaint else StableDiffusion3ControlNetPipeline
    expected, _ = cls._get_signature_keys(cls)
    components = {k: v for k, v in base_pipe.components.items() if k in expected and k != "controlnet"}
    pipe = cls(**components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    transformer = base_pipe.transformer
    if share_pos_embed and not _is_offloaded(transformer):
        for net in nets:
            if not net.config.use_pos_embed:
                net.pos_embed = transformer.pos_embed  # the pipeline's copy is dropped here
    if preset is not None:
        for net in nets:
            preset.apply_controlnet(net, device)
            if preset.controlnet_placement == "group" and not net.config.use_pos_embed:
                # the pipeline's copy of the position embedding (made above, on every build) is
                # not in the net's offload groups: it stays on the device (0.18 GB for 3.5 Large)
                net.pos_embed.to(device)
    return pipe


def release_controlnets(nets) -> None:
    """After an image: a ControlNet under model offload goes back to the CPU (its hook brought it
    to the device at its first step, and it stayed there through the denoise and the decode)."""
    for net in nets:
        hook = getattr(getattr(net, "model", net), "_studio_offload_hook", None)
        if hook is not None:
            hook.offload()
