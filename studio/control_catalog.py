"""The ControlNets the studio knows: Hub ids, file names, the bases they fit, their input rules,
recommended settings and real configs.

Bottom layer: no torch, no diffusers — the UI reads the lists, the engine the input rules, the
memory planner the configs (``controlnet_config``, instantiated on the meta device to count
bytes), the model manager the sources. Every number and rule says where it comes from; "not
checked" marks what could not be read at the source.

Sources (read for this module, December 2026):

* [SAI-REF] Stability's reference code, github.com/Stability-AI/sd3.5 (commit fbf8f48):
  ``sd3_infer.py`` (``CONFIGS`` per ControlNet file: shift 3.0, 60 steps, CFG 3.5, Euler;
  ``vae_encode``: canny ``x*255*0.5+0.5``, every other type ``2x-1``; ``CONTROLNET_MAP``; the
  ControlNet output is scaled by a hard-coded 1 in ``sd3_impls.BaseModel.apply_model``),
  ``dit_embedder.py`` (``ControlNetEmbedder``: ``control_type`` blur = 0, canny = 1, depth = 2),
  ``inputs/depth.png`` (the sample depth map: the near figure is *dark*, the far sky light) and
  ``README.md`` (single files in ``stabilityai/stable-diffusion-3.5-controlnets``).
* [DIFFUSERS-CONV] diffusers ``scripts/convert_sd3_controlnet_to_diffusers.py``: the config of
  the 8B ControlNets (19 layers, 38 heads, ``joint_attention_dim=None``, ``use_pos_embed=False``,
  ``pos_embed_type=None``, ``force_zeros_for_pooled_projection=False``; saved in fp32 by default).
* [COMFY] ComfyUI ``comfy/controlnet.py`` ``load_controlnet_sd35``: canny ``a*255*0.5+0.5``,
  depth ``1.0 - a`` (the inversion the issue mentions — it agrees with [SAI-REF]'s sample map:
  the model reads near = dark, while depth estimators and ready-made maps are near = bright).
* [HUB] Hub file listings and config.json pages (via the search index): SD3.5 Large ControlNet
  ``diffusion_pytorch_model.safetensors`` 8.61 GB, single files 8.65 GB; InstantX canny/pose/tile
  1.19 GB (fp16), InstantX depth 4.48 GB and config ``num_layers: 12``; InstantX canny config
  ``num_layers: 6``; Alimama config ``num_layers: 23``, ``extra_conditioning_channels: 1``,
  4.16 GB (fp16).
* [DIFFUSERS-DOC] diffusers 0.42 docstrings: ``StableDiffusion3ControlNetInpaintingPipeline``'s
  example (Alimama: ``controlnet_conditioning_scale=0.95``, ``guidance_scale=7``, 28 steps) and
  the ``SD3ControlNetModel`` code (InstantX ControlNets: zero pooled projections, no VAE shift).
* [CARD-DEPTH] the SD3.5 Large depth card's diffusers example (commit ce20077): guidance 4.5,
  40 steps.

**A correction to the issue:** the SD3.5 Large ControlNets are 8.6 GB in *fp32*, not bf16: the
config counts 2,153,518,976 parameters on the meta device (× 4 B = 8.614 GB, the Hub's
"8.61 GB"); the fp8 repacks of the same files are 2.17 GB. In bf16 one of them is 4.3 GB.
"""

from __future__ import annotations

from dataclasses import dataclass

from studio.catalog import VARIANTS
from studio.errors import ValidationError

# The control types the studio offers (request field ``control_type``) and the built-in
# preprocessors (``preprocess``). "none" means the control image is already the map the model
# reads (a pose skeleton, a tile image, a depth map made elsewhere).
CONTROL_TYPES = ("canny", "depth", "blur", "pose", "tile", "inpaint")
PREPROCESSORS = ("canny", "depth", "blur", "none")

# How the studio's maps are drawn, whatever the model: canny = white edges on black; depth =
# near is bright (Depth Anything's relative depth, min–max normalised, and the convention of
# every depth preprocessor peers ship); blur = the blurred photo.
DEPTH_CONVENTION = "near is bright"


@dataclass(frozen=True)
class InputRule:
    """How the control map (RGB, 0..1 per channel) becomes what the pipeline's VAE encodes.

    ``invert``: use ``1 - x`` first (depth polarity). ``encoding``: "signed" is ``2x - 1`` (what
    diffusers' ``VaeImageProcessor`` does by default); "sd35-canny" is ``x * 255 * 0.5 + 0.5``
    with no normalisation (the custom image processor of Stability's canny model card, and
    [SAI-REF] ``vae_encode``). ``source`` says where the rule comes from."""

    encoding: str = "signed"
    invert: bool = False
    source: str = ""

    def __post_init__(self):
        if self.encoding not in ("signed", "sd35-canny"):
            raise ValueError(f"Unknown control encoding {self.encoding!r}.")


SIGNED = InputRule("signed", False, "diffusers VaeImageProcessor default (2x - 1); [SAI-REF] vae_encode")


@dataclass(frozen=True)
class ControlNetEntry:
    """One ControlNet: its Hub repo and files, control type, the bases it fits, its input rule,
    recommended settings and real config."""
    id: str  # the studio's short id (CLI --controlnet, metadata)
    label: str  # what the UI shows
    control_type: str  # one of CONTROL_TYPES
    developer: str
    repo_id: str  # the diffusers layout on the Hub (config.json + safetensors at the root)
    bases: tuple[str, ...]  # catalog variant ids it fits
    preprocessor: str  # the default built-in preprocessor (PREPROCESSORS)
    rule: InputRule
    scale: float  # recommended controlnet_conditioning_scale
    start: float  # recommended control guidance start (fraction of the steps)
    end: float  # recommended control guidance end
    steps: int | None  # recommended steps (None: the base variant's)
    guidance: float | None  # recommended CFG (None: the base variant's)
    config: dict  # the real SD3ControlNetModel config
    published: tuple[float, str]  # (GB the Hub lists for the diffusers weights, dtype they are in)
    single_file_repo: str | None = None  # Stability's single-file release (SAI key layout)
    single_file: str | None = None
    inpaint: bool = False  # runs through StableDiffusion3ControlNetInpaintingPipeline
    gated: bool = False  # the Hub repo needs a licence click and a token
    notes: str = ""
    sources: str = ""  # where the numbers above come from

    @property
    def files(self) -> tuple[str, ...]:
        """What the diffusers repo holds that the studio downloads."""
        return ("config.json", "diffusion_pytorch_model.safetensors")


# --- real configs ---------------------------------------------------------------------------

# [DIFFUSERS-CONV]: the config every Stability SD3.5 Large ControlNet was converted with
# (blur, canny and depth are the same architecture; their config.json is 554 bytes on the Hub).
SD35_LARGE_CONTROLNET = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 19,
    "attention_head_dim": 64,
    "num_attention_heads": 38,
    "joint_attention_dim": None,  # no context embedder: SD3SingleTransformerBlocks
    "caption_projection_dim": 2048,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": None,
    "extra_conditioning_channels": 0,
    "dual_attention_layers": [],
    "qk_norm": None,
    "pos_embed_type": None,
    "use_pos_embed": False,  # uses the base transformer's position embedding
    "force_zeros_for_pooled_projection": False,
}

_SD3_MEDIUM_CONTROLNET = {  # [HUB] InstantX/SD3-Controlnet-Canny config.json (+ diffusers defaults)
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 6,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
    "extra_conditioning_channels": 0,
    "dual_attention_layers": [],
    "qk_norm": None,
    "pos_embed_type": "sincos",
    "use_pos_embed": True,
    "force_zeros_for_pooled_projection": True,
}

INSTANTX_6_LAYERS = dict(_SD3_MEDIUM_CONTROLNET)  # canny, pose, tile: 1.19 GB fp16 each [HUB]
INSTANTX_DEPTH = {**_SD3_MEDIUM_CONTROLNET, "num_layers": 12}  # [HUB] config.json, 4.48 GB fp32
ALIMAMA_INPAINT = {**_SD3_MEDIUM_CONTROLNET, "num_layers": 23, "extra_conditioning_channels": 1}  # [HUB]

_SD35_LARGE_BASES = ("sd3.5-large", "sd3.5-large-turbo")
_SAI_SOURCES = ("[SAI-REF] CONFIGS (60 steps, CFG 3.5, Euler, shift 3); scale 1.0 = the reference "
                "code's fixed ControlNet scale; start/end 0–1 = it conditions every step")
_SAI_NOTES = ("Stability's card names SD3.5 Large only; Large Turbo has the same 8B architecture, "
              "so the ControlNet runs on it too, untested by Stability (use more than 4 steps).")


def _sai(kind: str, preprocessor: str, rule: InputRule, notes: str = "") -> ControlNetEntry:
    return ControlNetEntry(
        id=f"sd3.5-large-{kind}",
        label=f"SD3.5 Large {kind.capitalize()} (Stability AI)",
        control_type=kind,
        developer="Stability AI",
        repo_id=f"stabilityai/stable-diffusion-3.5-large-controlnet-{kind}",
        bases=_SD35_LARGE_BASES,
        preprocessor=preprocessor,
        rule=rule,
        scale=1.0,
        start=0.0,
        end=1.0,
        steps=60,
        guidance=3.5,
        config=SD35_LARGE_CONTROLNET,
        published=(8.61, "fp32"),
        single_file_repo="stabilityai/stable-diffusion-3.5-controlnets",
        single_file=f"sd3.5_large_controlnet_{kind}.safetensors",
        gated=True,
        notes=" ".join(x for x in (notes, _SAI_NOTES) if x),
        sources=_SAI_SOURCES,
    )


_INSTANTX_SOURCES = ("scale 0.5: the InstantX card demo as diffusers' slow tests reproduce it "
                     "(the card itself was not read here); steps/CFG: the base variant's")


def _instantx(kind: str, preprocessor: str, config: dict, gb: float, dtype: str, notes: str,
              rule: InputRule = SIGNED) -> ControlNetEntry:
    return ControlNetEntry(
        id=f"sd3-medium-{kind}",
        label=f"SD3 Medium {kind.capitalize()} (InstantX)",
        control_type=kind,
        developer="InstantX",
        repo_id=f"InstantX/SD3-Controlnet-{kind.capitalize()}",
        bases=("sd3-medium",),
        preprocessor=preprocessor,
        rule=rule,
        scale=0.5,
        start=0.0,
        end=1.0,
        steps=None,
        guidance=None,
        config=config,
        published=(gb, dtype),
        notes=notes,
        sources=_INSTANTX_SOURCES,
    )


CONTROLNETS: dict[str, ControlNetEntry] = {e.id: e for e in (
    _sai("canny", "canny", InputRule(
        "sd35-canny", False,
        "the canny model card's SD3CannyImageProcessor (do_normalize=False, then x*255*0.5+0.5); "
        "[SAI-REF] vae_encode; [COMFY] the same formula")),
    _sai("depth", "depth", InputRule(
        "signed", True,
        "polarity: [SAI-REF] inputs/depth.png is near = dark and [COMFY] inverts (1 - d) the usual "
        "near = bright maps; encoding 2x - 1 as [SAI-REF] vae_encode"),
        notes="Trained on DepthFM depth maps (Stability's card); the studio estimates depth with "
              "Depth Anything V2 and inverts it to the model's near = dark convention. [CARD-DEPTH]'s "
              "diffusers example uses CFG 4.5 and 40 steps."),
    _sai("blur", "blur", SIGNED,
         notes="For high-fidelity upscaling: Stability's card recommends tiling the image at "
               "128–512 px and applying the ControlNet per tile."),
    _instantx("canny", "canny", INSTANTX_6_LAYERS, 1.19, "fp16", "Canny edges, white on black."),
    _instantx("pose", "none", INSTANTX_6_LAYERS, 1.19, "fp16",
              "Needs an OpenPose skeleton image (the studio has no pose detector built in: upload a "
              "ready pose map with preprocessor 'none')."),
    _instantx("tile", "none", INSTANTX_6_LAYERS, 1.19, "fp16",
              "The control image is the (low-resolution or blurry) picture itself."),
    _instantx("depth", "depth", INSTANTX_DEPTH, 4.48, "fp32",
              "Depth map, near = bright (the usual convention; the card's sample map was not checked "
              "here)."),
    ControlNetEntry(
        id="sd3-medium-inpaint",
        label="SD3 Medium Inpainting (Alimama)",
        control_type="inpaint",
        developer="Alimama Creative",
        repo_id="alimama-creative/SD3-Controlnet-Inpainting",
        bases=("sd3-medium",),
        preprocessor="none",
        rule=SIGNED,
        scale=0.95,
        start=0.0,
        end=1.0,
        steps=28,
        guidance=7.0,
        config=ALIMAMA_INPAINT,
        published=(4.16, "fp16"),
        inpaint=True,
        notes="Takes the image and the mask (white = repaint); runs through diffusers' "
              "StableDiffusion3ControlNetInpaintingPipeline. Its config.json on the Hub lacks "
              "extra_conditioning_channels in some revisions: the studio always passes 1.",
        sources="[DIFFUSERS-DOC] the inpainting pipeline's example (scale 0.95, CFG 7, 28 steps)",
    ),
)}


def get_controlnet(name: str) -> ControlNetEntry:
    """The catalog ControlNet called ``name`` (a ValidationError naming the known ones otherwise)."""
    try:
        return CONTROLNETS[name]
    except KeyError:
        raise ValidationError(
            f"Unknown ControlNet {name!r}. Known ControlNets: {', '.join(CONTROLNETS)} — or give a "
            "Hub id, a diffusers folder or a .safetensors file.", "controlnet") from None


def controlnet_config(name: str) -> dict:
    """The real config of a catalog ControlNet (a copy: callers may change it)."""
    config = get_controlnet(name).config
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in config.items()}


def controlnets_for(variant: str, control_type: str | None = None) -> list[ControlNetEntry]:
    """The catalog ControlNets that fit a base variant (optionally of one control type)."""
    return [e for e in CONTROLNETS.values()
            if variant in e.bases and (control_type is None or e.control_type == control_type)]


def controlnets_problem(variant: str, names) -> str | None:
    """Why these catalog ControlNet ids cannot be planned beside ``variant`` (None when they can):
    an id the catalog does not have, or a ControlNet made for another base."""
    for name in names:
        entry = CONTROLNETS.get(name)
        if entry is None:
            return f"{str(name)[:60]!r} is not in the ControlNet catalog: one of {', '.join(CONTROLNETS)}."
        if variant not in entry.bases:
            fitting = ", ".join(e.id for e in controlnets_for(variant)) or "none in the catalog"
            return (f"{entry.label} is made for {', '.join(_label(b) for b in entry.bases)}, not {_label(variant)}; "
                    f"for {_label(variant)}: {fitting}.")
    return None


def default_controlnet(variant: str, control_type: str) -> ControlNetEntry | None:
    """The catalog ControlNet the studio picks for a variant and a control type (or None)."""
    found = controlnets_for(variant, control_type)
    return found[0] if found else None


def _label(variant: str) -> str:
    v = VARIANTS.get(variant)
    return v.label if v else variant


def _pairs_text() -> str:
    by_base: dict[str, list[str]] = {}
    for e in CONTROLNETS.values():
        for b in e.bases:
            by_base.setdefault(b, []).append(e.id)
    return "; ".join(f"{_label(b)}: {', '.join(ids)}" for b, ids in by_base.items())


def check_pair(name: str, variant: str) -> ControlNetEntry:
    """The catalog entry of ``name`` when it fits ``variant``; else a ValidationError (field
    "controlnet") naming the ControlNets that fit this base and the pairs that work."""
    entry = get_controlnet(name)
    if variant in entry.bases:
        return entry
    fitting = [e.id for e in controlnets_for(variant)]
    here = (f"ControlNets for {_label(variant)}: {', '.join(fitting)}." if fitting else
            f"There is no ControlNet for {_label(variant)} in the catalog.")
    raise ValidationError(
        f"ControlNet {entry.id!r} is made for {' / '.join(_label(b) for b in entry.bases)}; the model "
        f"is {_label(variant)}. {here} Pairs that work — {_pairs_text()}. Switch the model, or pick a "
        "ControlNet for this one.", "controlnet")


# --- structure: ControlNets that are not in the catalog (a folder, a file, the tiny demo ones) --


def family_of(config: dict) -> tuple[str, ...]:
    """The base variants a ControlNet config is built for, from its structure.

    No context embedder (``joint_attention_dim`` None) means Stability's 8B design: SD3.5 Large and
    Large Turbo. Otherwise the blocks copy the base's: dual attention layers mean SD3.5 Medium,
    qk-norm without them SD3.5 Large, neither SD3 Medium (``studio.catalog`` decides the same way
    for transformers)."""
    if config.get("joint_attention_dim") is None:
        return _SD35_LARGE_BASES
    if list(config.get("dual_attention_layers") or []):
        return ("sd3.5-medium",)
    if config.get("qk_norm"):
        return _SD35_LARGE_BASES
    return ("sd3-medium",)


def shape_problem(config: dict, transformer_config: dict) -> str | None:
    """Why a ControlNet config cannot run beside a transformer config (None when it can): the
    widths its outputs are added at, the pooled and text inputs it reads, the latent patches."""
    inner = config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0)
    t_inner = transformer_config.get("num_attention_heads", 0) * transformer_config.get("attention_head_dim", 0)
    problems = []
    if inner != t_inner:
        problems.append(f"its width is {inner}, the transformer's {t_inner}")
    for key, what in (("pooled_projection_dim", "pooled text width"), ("patch_size", "patch size"),
                      ("in_channels", "latent channels")):
        if config.get(key) != transformer_config.get(key):
            problems.append(f"{what} {config.get(key)} vs {transformer_config.get(key)}")
    jad = config.get("joint_attention_dim")
    if jad is not None and jad != transformer_config.get("joint_attention_dim"):
        problems.append(f"text width {jad} vs {transformer_config.get('joint_attention_dim')}")
    return "; ".join(problems) or None


def rule_for(control_type: str | None, config: dict, entry: ControlNetEntry | None = None) -> InputRule:
    """The input rule of a ControlNet: the catalog's, or — for one that is not in the catalog —
    Stability's rules for the 8B design (no context embedder) by map type, else ``2x - 1``."""
    if entry is not None:
        return entry.rule
    if config.get("joint_attention_dim") is None and control_type in ("canny", "depth"):
        return CONTROLNETS[f"sd3.5-large-{control_type}"].rule
    return SIGNED


def check_fit(config: dict, variant: str, transformer_config: dict, name: str = "the ControlNet") -> None:
    """Refuse (ValidationError, field "controlnet") a ControlNet that is not in the catalog when its
    shape does not fit the loaded transformer, or its structure says it was built for other bases."""
    problem = shape_problem(config, transformer_config)
    family = family_of(config)
    if problem is None and variant in family:
        return
    why = problem or f"it is built for {' / '.join(_label(b) for b in family)}"
    fitting = [e.id for e in controlnets_for(variant)]
    raise ValidationError(
        f"{name} does not fit {_label(variant)}: {why}. "
        + (f"ControlNets for {_label(variant)}: {', '.join(fitting)}." if fitting else "")
        + f" Pairs that work — {_pairs_text()}.", "controlnet")
