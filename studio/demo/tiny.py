"""An offline, tiny, architecture-faithful SD3 family (for tests, benchmarks and ``--demo``).

Nothing here downloads anything. Each variant keeps the real structure — 16 latent channels,
a VAE with scale factor 8 and the SD3 scaling/shift factors, patch size 2, CLIP-L + CLIP-G
(``CLIPTextModelWithProjection``) + T5 encoder with locally built tokenizers, a flow-matching
Euler scheduler with shift 3.0 — and the real differences between variants:

=====================  ==========  ==========================  ===========================
variant                qk_norm     dual attention layers       weights
=====================  ==========  ==========================  ===========================
sd3-medium             none        none                        seed 1
sd3.5-medium           rms_norm    first half of the blocks    seed 2
sd3.5-large            rms_norm    none, more/wider blocks     seed 3
sd3.5-large-turbo      rms_norm    none (same as large)        seed 4
=====================  ==========  ==========================  ===========================

All four share bit-identical text encoders, tokenizers and VAE, as the real releases do.
Each is saved with ``save_pretrained`` in the diffusers folder layout and is loaded back by the
same ``from_pretrained`` code path a real checkpoint takes.
"""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from pathlib import Path

TINY_VARIANTS = ("sd3-medium", "sd3.5-medium", "sd3.5-large", "sd3.5-large-turbo")

# Bumped whenever what build_tiny_variant writes changes, so stale demo folders are rebuilt.
TINY_FORMAT = 3
_STAMP = "studio_tiny.json"

_SHARED_SEED = 1234
SCHEDULER_SHIFT = 3.0  # the flow-matching shift of SD3's and SD3.5's schedulers


def _dims(scale: int) -> dict:
    """Widths of the shared encoders. ``scale`` > 1 makes a family big enough to time (the bench):
    the proportions stay roughly real — T5 about half the Large transformer."""
    clip = 32 * scale
    t5 = 64 * scale  # joint_attention_dim; must hold both CLIP hidden states side by side
    return {
        "clip_hidden": clip,
        "clip_ff": 37 if scale == 1 else 4 * clip,
        "clip_layers": 2 if scale == 1 else 4,
        "t5_dim": t5,
        # bitsandbytes' CPU 4-bit kernel packs weights in blocks of 32 output rows and 64 inputs
        # (NF4 blocksize): every quantized T5 Linear needs out % 32 == 0 and in % 64 == 0.
        "t5_ff": 64 if scale == 1 else int(2.5 * t5),
        "t5_layers": 2 if scale == 1 else 2 * scale,
        "vae_channels": [16, 32, 32, 32] if scale == 1 else [16 * scale, 32 * scale, 32 * scale, 32 * scale],
    }


def _transformer_config(variant: str, scale: int, sample_size: int = 32) -> dict:
    head_dim = 8 * scale
    if variant == "sd3-medium":
        layers, heads, qk, dual, pos = 4, 4, None, (), 64
    elif variant == "sd3.5-medium":
        layers, heads, qk, dual, pos = 4, 4, "rms_norm", (0, 1), 128
    elif variant in ("sd3.5-large", "sd3.5-large-turbo"):
        layers, heads, qk, dual, pos = 6, 6, "rms_norm", (), 64
    else:
        raise KeyError(f"No tiny build for {variant!r}; tiny variants: {', '.join(TINY_VARIANTS)}")
    return {
        "sample_size": sample_size,  # 32 latent pixels: native 256 px with SD3's 8× VAE, fast on CPU
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": layers * (2 if scale > 1 else 1),
        "attention_head_dim": head_dim,
        "num_attention_heads": heads,
        "joint_attention_dim": _dims(scale)["t5_dim"],
        "caption_projection_dim": heads * head_dim,
        "pooled_projection_dim": 2 * _dims(scale)["clip_hidden"],
        "pos_embed_max_size": pos,
        "qk_norm": qk,
        "dual_attention_layers": dual,
    }


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level BPE alphabet: every byte mapped to a printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# Whole-word tokens in both tokenizers: a few caption words, and every word of the trained demo
# model's prompt grammar (studio.demo.shapes), so one word is one token.
_WORDS = ("a", "the", "of", "red", "fox", "cat", "dog", "photo", "in", "on", "with")


def _words() -> tuple[str, ...]:
    from studio.demo.shapes import VOCABULARY

    return tuple(dict.fromkeys(_WORDS + VOCABULARY))


def _bpe_merges(words) -> list[tuple[str, str]]:
    """Train byte-level BPE on ``words`` (each once) until every word is a single token.

    Encoding applies merges in the order training made them, so a training word always comes
    back as the segmentation training ended with: one token. Ties go to the first pair seen.
    """
    segs = [[*w[:-1], w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in segs):
        counts: dict[tuple[str, str], int] = {}
        for seg in segs:
            for pair in zip(seg, seg[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = max(counts, key=counts.get)  # first-inserted wins a tie: deterministic
        merges.append(best)
        for seg in segs:
            i = 0
            while i < len(seg) - 1:
                if (seg[i], seg[i + 1]) == best:
                    seg[i:i + 2] = [seg[i] + seg[i + 1]]
                i += 1
    return merges


def _clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary: every byte (alone and word-final) plus whole-word merges."""
    byte_chars = list(_bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    tokens += byte_chars + [c + "</w>" for c in byte_chars]
    merges = _bpe_merges(_words())
    tokens += [a + b for a, b in merges]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def _t5_vocab() -> list[tuple[str, float]]:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + word, -3.0) for word in _words()]
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces += [(c, -5.0) for c in chars] + [("▁" + c, -6.0) for c in chars]
    return pieces


def build_shared_components(seed: int = _SHARED_SEED, scale: int = 1) -> dict:
    """Text encoders, tokenizers, VAE and scheduler shared by every tiny variant."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    dims = _dims(scale)
    vocab, merges = _clip_vocab()
    clip_tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    t5_tokenizer = T5TokenizerFast(vocab=_t5_vocab(), extra_ids=0, model_max_length=512)

    def clip(seed_offset: int, act: str):
        torch.manual_seed(seed + seed_offset)
        config = CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=dims["clip_hidden"],
            intermediate_size=dims["clip_ff"],
            projection_dim=dims["clip_hidden"],
            num_hidden_layers=dims["clip_layers"],
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act=act,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
        return CLIPTextModelWithProjection(config).eval()

    text_encoder = clip(1, "quick_gelu")  # CLIP-L
    text_encoder_2 = clip(2, "gelu")  # CLIP-G
    torch.manual_seed(seed + 3)
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=dims["t5_dim"],
            d_ff=dims["t5_ff"],
            d_kv=16,
            num_heads=4 * scale,
            num_layers=dims["t5_layers"],
            feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            pad_token_id=0,
            eos_token_id=1,
        )
    ).eval()
    torch.manual_seed(seed + 4)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=dims["vae_channels"],
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=256,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SCHEDULER_SHIFT)
    return {
        "tokenizer": clip_tokenizer,
        "tokenizer_2": clip_tokenizer,
        "tokenizer_3": t5_tokenizer,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "text_encoder_3": text_encoder_3,
        "vae": vae,
        "scheduler": scheduler,
    }


def build_transformer(variant: str, scale: int = 1, sample_size: int = 32):
    """A tiny random SD3Transformer2DModel for ``variant`` (seeded per variant, its zero-initialised
    matrices given small weights so images differ); ``sample_size``: its native size in latent
    pixels (the demo family's VAE is 16×, so its random transformers take 16 for 256 px)."""
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(TINY_VARIANTS.index(variant) + 1)
    model = SD3Transformer2DModel(**_transformer_config(variant, scale, sample_size)).eval()
    # Random init leaves the final projection near zero; give it real weights so images differ.
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(0, 0.02)
    return model


def build_tiny_pipeline(variant: str, scale: int = 1, shared: dict | None = None):
    """A tiny StableDiffusion3Pipeline for ``variant``: its own transformer around the shared encoders,
    tokenizers, VAE and scheduler."""
    from diffusers import StableDiffusion3Pipeline

    shared = shared or build_shared_components(scale=scale)
    return StableDiffusion3Pipeline(transformer=build_transformer(variant, scale), **shared)


def _stamp_ok(folder: Path, variant: str, scale: int) -> bool:
    try:
        stamp = json.loads((folder / _STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp == {"format": TINY_FORMAT, "variant": variant, "scale": scale}


def build_tiny_family(
    root: str | os.PathLike, variants=TINY_VARIANTS, scale: int = 1, force: bool = False
) -> dict[str, Path]:
    """Build (or reuse) the tiny family under ``root``; returns {variant: folder}.

    Each folder is a complete diffusers pipeline folder (model_index.json + subfolders).
    Folders are written to a temporary name and renamed, so an interrupted build never leaves a
    half-written model behind; an existing folder with a matching stamp is reused.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    shared = None
    for variant in variants:
        folder = root / (variant if scale == 1 else f"{variant}-x{scale}")
        out[variant] = folder
        if not force and _stamp_ok(folder, variant, scale):
            continue
        shared = shared or build_shared_components(scale=scale)
        pipe = build_tiny_pipeline(variant, scale, shared)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=root))
        pipe.save_pretrained(tmp)
        (tmp / _STAMP).write_text(json.dumps({"format": TINY_FORMAT, "variant": variant, "scale": scale}))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    return out


def tiny_variant_of(folder: str | os.PathLike) -> str | None:
    """The tiny variant a folder holds (from its stamp), or None if it is not a tiny build."""
    try:
        return json.loads((Path(folder) / _STAMP).read_text()).get("variant")
    except (OSError, ValueError):
        return None


if __name__ == "__main__":  # python -m studio.demo.tiny DIR
    import sys

    target = sys.argv[1] if len(sys.argv) > 1 else "tiny-sd3"
    for name, path in build_tiny_family(target).items():
        print(f"{name}: {path}")
