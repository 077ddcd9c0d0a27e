"""The SD3 / SD3.5 variants the studio knows: Hub ids, recommended settings and real configs.

The component configs below are the ones published with the official diffusers repos. They are
the source of truth for the memory planner (which instantiates them on the meta device to count
parameters) and for the offline tiny family (which keeps their *shape* — qk-norm, dual
attention layers, channel counts — and shrinks their widths).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# --- Shared components (identical in every SD3 / SD3.5 release) ---------------------------------

CLIP_L_CONFIG = {
    "architectures": ["CLIPTextModelWithProjection"],
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

CLIP_G_CONFIG = {
    "architectures": ["CLIPTextModelWithProjection"],
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "projection_dim": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

T5_XXL_CONFIG = {
    "architectures": ["T5EncoderModel"],
    "vocab_size": 32128,
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.1,
    "is_encoder_decoder": True,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
}

VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}

SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}

_TRANSFORMER_COMMON = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "attention_head_dim": 64,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 2048,
}

SD3_MEDIUM_TRANSFORMER = {
    **_TRANSFORMER_COMMON,
    "num_layers": 24,
    "num_attention_heads": 24,
    "caption_projection_dim": 1536,
    "pos_embed_max_size": 192,
    "qk_norm": None,
    "dual_attention_layers": [],
}

SD35_MEDIUM_TRANSFORMER = {
    **_TRANSFORMER_COMMON,
    "num_layers": 24,
    "num_attention_heads": 24,
    "caption_projection_dim": 1536,
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
    "dual_attention_layers": list(range(13)),
}

SD35_LARGE_TRANSFORMER = {
    **_TRANSFORMER_COMMON,
    "num_layers": 38,
    "num_attention_heads": 38,
    "caption_projection_dim": 2432,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
    "dual_attention_layers": [],
}


@dataclass(frozen=True)
class SLGAdvice:
    """Skip Layer Guidance: whether to offer it, and the settings that work."""

    recommended: bool
    layers: tuple[int, ...] = (7, 8, 9)
    scale: float = 2.8
    start: float = 0.01
    stop: float = 0.2
    note: str = ""


@dataclass(frozen=True)
class Variant:
    """One SD3 / SD3.5 release: its Hub repo and single file, transformer config, recommended settings
    and size limits."""
    name: str  # the studio's short id, used on the CLI and in metadata
    label: str  # what the UI shows
    repo_id: str  # the official diffusers repo on the Hub (gated)
    single_file: str  # the file name of the official single-file release
    transformer_config: dict
    steps: int
    guidance: float
    shift: float = 3.0
    default_size: tuple[int, int] = (1024, 1024)
    min_pixels: int = 512 * 512
    max_pixels: int = 1536 * 1536
    max_side: int = 2048
    max_sequence_length: int = 256
    max_sequence_length_warn: int = 512  # past this many T5 tokens quality is known to drop
    slg: SLGAdvice = field(default_factory=lambda: SLGAdvice(recommended=False))
    distilled: bool = False  # Turbo: no CFG, negative prompt ignored
    notes: str = ""

    @property
    def uses_cfg(self) -> bool:
        """Whether the recommended guidance needs classifier-free guidance (above 1; not Turbo)."""
        return self.guidance > 1.0


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            name="sd3-medium",
            label="SD3 Medium",
            repo_id="stabilityai/stable-diffusion-3-medium-diffusers",
            single_file="sd3_medium.safetensors",
            transformer_config=SD3_MEDIUM_TRANSFORMER,
            steps=28,
            guidance=7.0,
            max_pixels=1536 * 1536,
            slg=SLGAdvice(
                recommended=False,
                note="Skip Layer Guidance was tuned for SD3.5 Medium; on SD3 Medium it is untested.",
            ),
            notes="2B MMDiT, no qk-norm. Good at 1024², weaker anatomy than 3.5.",
        ),
        Variant(
            name="sd3.5-medium",
            label="SD3.5 Medium",
            repo_id="stabilityai/stable-diffusion-3.5-medium",
            single_file="sd3.5_medium.safetensors",
            transformer_config=SD35_MEDIUM_TRANSFORMER,
            steps=40,
            guidance=4.5,
            min_pixels=512 * 512,  # 0.25 MP
            max_pixels=1440 * 1440,  # ~2 MP
            max_sequence_length_warn=256,
            slg=SLGAdvice(
                recommended=True,
                note="Skip Layer Guidance (layers 7, 8, 9) improves anatomy and coherence on "
                "SD3.5 Medium; it costs one extra transformer pass per step while active.",
            ),
            notes="2.5B MMDiT-X with qk-norm and dual attention in layers 0-12. "
            "Edge artefacts past 256 T5 tokens.",
        ),
        Variant(
            name="sd3.5-large",
            label="SD3.5 Large",
            repo_id="stabilityai/stable-diffusion-3.5-large",
            single_file="sd3.5_large.safetensors",
            transformer_config=SD35_LARGE_TRANSFORMER,
            steps=28,
            guidance=3.5,
            max_pixels=1216 * 1216,  # ~1.4 MP, quality drops past it
            slg=SLGAdvice(
                recommended=False,
                note="Skip Layer Guidance degrades SD3.5 Large images (diffusers issue 10455); "
                "leave it off.",
            ),
            notes="8B MMDiT with qk-norm. Best quality; needs quantization or offload below 24 GB.",
        ),
        Variant(
            name="sd3.5-large-turbo",
            label="SD3.5 Large Turbo",
            repo_id="stabilityai/stable-diffusion-3.5-large-turbo",
            single_file="sd3.5_large_turbo.safetensors",
            transformer_config=SD35_LARGE_TRANSFORMER,
            steps=4,
            guidance=0.0,
            max_pixels=1216 * 1216,
            slg=SLGAdvice(
                recommended=False,
                note="Turbo runs without CFG, and Skip Layer Guidance needs CFG: not available.",
            ),
            distilled=True,
            notes="Timestep-distilled Large: 4 steps, no CFG (the negative prompt is ignored).",
        ),
    )
}

DEFAULT_VARIANT = "sd3.5-medium"
TURBO_VARIANT = "sd3.5-large-turbo"

# A1111-style aspect presets (width, height) — the landscape ones and their portraits.
ASPECT_PRESETS: dict[str, tuple[int, int]] = {
    "1:1 (1024×1024)": (1024, 1024),
    "5:4 (1152×896)": (1152, 896),
    "4:5 (896×1152)": (896, 1152),
    "3:2 (1216×832)": (1216, 832),
    "2:3 (832×1216)": (832, 1216),
    "16:9 (1344×768)": (1344, 768),
    "9:16 (768×1344)": (768, 1344),
}

# Size limits the engine enforces for every variant (a variant may recommend less).
VAE_FACTOR = 8  # SD3's VAE: one latent pixel per 8×8 image pixels
SIZE_MULTIPLE = 16  # SD3's: the VAE's 8 × the transformer's 2×2 patches
MIN_SIDE = 256
MAX_SIDE = 2048
MAX_T5_TOKENS = 512


@dataclass(frozen=True)
class SizeRules:
    """The sizes one model accepts: sides a multiple of ``multiple`` and at most ``max_side``."""

    multiple: int = SIZE_MULTIPLE
    max_side: int = MAX_SIDE


def vae_factor(block_out_channels) -> int:
    """How many pixels one latent pixel spans for a VAE with these ``block_out_channels``:
    diffusers' ``vae_scale_factor``, 2 ** (blocks - 1) (SD3's four blocks: 8)."""
    return 2 ** (len(block_out_channels) - 1)


def size_rules(transformer_config: Mapping, vae_factor: int = VAE_FACTOR) -> SizeRules:
    """The one place a model's sizes are decided. The multiple is the VAE's factor × the
    transformer's patch size (what diffusers' SD3 pipelines check: 16 for every SD3 release, 32
    for the demo's 16× VAE); the largest side is what the position embedding covers
    (``pos_embed_max_size`` patches), within MAX_SIDE and rounded down to the multiple."""
    patch = int(transformer_config.get("patch_size") or 2)
    multiple = patch * int(vae_factor)
    pos = transformer_config.get("pos_embed_max_size")
    side = min(MAX_SIDE, int(pos) * multiple) if isinstance(pos, int) and not isinstance(pos, bool) else MAX_SIDE
    return SizeRules(multiple, side // multiple * multiple)


def get_variant(name: str) -> Variant:
    """The catalog variant called ``name`` (KeyError naming the known ones otherwise)."""
    try:
        return VARIANTS[name]
    except KeyError:
        known = ", ".join(VARIANTS)
        raise KeyError(f"Unknown variant {name!r}. Known variants: {known}.") from None


def variant_for_transformer_config(config: dict) -> Variant | None:
    """Which catalog variant a transformer config belongs to (None for unknown architectures).

    Large and Large Turbo share an architecture, so this returns ``sd3.5-large`` for both;
    callers that know the source (repo id, file name) refine it.

    The decision is structural, so it holds for any size of the same architecture: dual attention
    layers mean SD3.5 Medium (MMDiT-X), qk-norm without them means SD3.5 Large, neither means
    SD3 Medium.
    """
    if "dual_attention_layers" not in config and "qk_norm" not in config and "num_layers" not in config:
        return None
    if list(config.get("dual_attention_layers") or []):
        return VARIANTS["sd3.5-medium"]
    if config.get("qk_norm"):
        return VARIANTS["sd3.5-large"]
    return VARIANTS["sd3-medium"]
