"""The offline tiny SD3 family: faithful to the real architecture, shared parts bit-identical."""

import hashlib
import json

import pytest

from studio.demo.tiny import TINY_VARIANTS, build_tiny_family


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _weights(folder, component):
    return {p.name: _sha(p) for p in sorted((folder / component).glob("*.safetensors"))}


def test_every_variant_is_a_diffusers_folder(tiny_family):
    assert set(tiny_family) == set(TINY_VARIANTS)
    for folder in tiny_family.values():
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "StableDiffusion3Pipeline"
        for component in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            assert list((folder / component).glob("*.safetensors")), component
            assert not list((folder / component).glob("*.bin")), "no pickled weights"
        for component in ("tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"):
            assert (folder / component).is_dir()


def test_shared_components_are_bit_identical(tiny_family):
    folders = list(tiny_family.values())
    for component in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        first = _weights(folders[0], component)
        assert first
        for other in folders[1:]:
            assert _weights(other, component) == first, component
    transformers = {name: tuple(_weights(f, "transformer").values()) for name, f in tiny_family.items()}
    assert len(set(transformers.values())) == 4, "each variant has its own transformer weights"


def test_architecture_is_faithful(tiny_family):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_family["sd3.5-medium"])
    vae = pipe.vae.config
    assert vae.latent_channels == 16
    assert pipe.vae_scale_factor == 8
    assert vae.scaling_factor == pytest.approx(1.5305)
    assert vae.shift_factor == pytest.approx(0.0609)
    assert not vae.use_quant_conv and not vae.use_post_quant_conv
    t = pipe.transformer.config
    assert t.patch_size == 2 and t.in_channels == 16 and t.out_channels == 16
    assert t.joint_attention_dim == pipe.text_encoder_3.config.d_model
    assert t.pooled_projection_dim == (
        pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    )
    assert type(pipe.text_encoder).__name__ == "CLIPTextModelWithProjection"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert type(pipe.text_encoder_3).__name__ == "T5EncoderModel"
    assert pipe.tokenizer.model_max_length == 77 and pipe.tokenizer_2.model_max_length == 77
    assert pipe.tokenizer_3.model_max_length == 512
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.scheduler.config.shift == 3.0


def test_variants_differ_as_the_real_ones_do(tiny_family):
    def config(name):
        return json.loads((tiny_family[name] / "transformer" / "config.json").read_text())

    sd3, m35, large, turbo = (config(n) for n in TINY_VARIANTS)
    assert sd3["qk_norm"] is None and not sd3["dual_attention_layers"]
    assert m35["qk_norm"] == "rms_norm" and len(m35["dual_attention_layers"]) > 0
    assert large["qk_norm"] == "rms_norm" and not large["dual_attention_layers"]
    assert large["num_layers"] > m35["num_layers"]
    drop = {"_diffusers_version", "_name_or_path"}
    assert {k: v for k, v in large.items() if k not in drop} == {k: v for k, v in turbo.items() if k not in drop}
    # the real catalog's variant detection recognises each tiny architecture
    from studio.catalog import variant_for_transformer_config

    assert variant_for_transformer_config(sd3).name == "sd3-medium"
    assert variant_for_transformer_config(m35).name == "sd3.5-medium"
    assert variant_for_transformer_config(large).name == "sd3.5-large"


def test_build_is_deterministic_and_reused(tmp_path, tiny_family):
    folder = build_tiny_family(tmp_path, variants=["sd3-medium"])["sd3-medium"]
    assert _weights(folder, "transformer") == _weights(tiny_family["sd3-medium"], "transformer")
    assert _weights(folder, "text_encoder_3") == _weights(tiny_family["sd3-medium"], "text_encoder_3")
    stamp_mtime = (folder / "transformer").stat().st_mtime_ns
    again = build_tiny_family(tmp_path, variants=["sd3-medium"])["sd3-medium"]
    assert (again / "transformer").stat().st_mtime_ns == stamp_mtime, "an intact build is reused"


def test_half_written_build_is_rebuilt(tmp_path):
    folder = build_tiny_family(tmp_path, variants=["sd3-medium"])["sd3-medium"]
    (folder / "studio_tiny.json").unlink()  # as if the build had been killed before the stamp
    rebuilt = build_tiny_family(tmp_path, variants=["sd3-medium"])["sd3-medium"]
    assert (rebuilt / "studio_tiny.json").is_file()


def _quantized_t5_linears(model):
    """(name, module) of every T5 Linear transformers quantizes (it keeps ``wo`` unquantized)."""
    import torch

    keep = set(type(model)._keep_in_fp32_modules or ())
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in keep]


@pytest.mark.parametrize("scale", [1, 2, 3, 4])
def test_t5_linears_fit_the_cpu_4bit_kernel_at_every_scale(scale):
    """bitsandbytes' AVX512-BF16 path packs 4-bit weights in blocks of 32 output rows and reads
    absmax per 64 inputs (NF4 blocksize): out_features % 32 == 0 and in_features % 64 == 0."""
    import torch
    from transformers import T5Config, T5EncoderModel

    from studio.demo.tiny import _dims

    dims = _dims(scale)
    config = T5Config(vocab_size=128, d_model=dims["t5_dim"], d_ff=dims["t5_ff"], d_kv=16,
                      num_heads=4 * scale, num_layers=1, feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        model = T5EncoderModel(config)
    linears = _quantized_t5_linears(model)
    assert {n.rsplit(".", 1)[-1] for n, _ in linears} == {"q", "k", "v", "o", "wi_0", "wi_1"}
    for name, m in linears:
        assert m.out_features % 32 == 0 and m.in_features % 64 == 0, (scale, name, m)


def test_tiny_t5_nf4_weights_pack_for_the_cpu_kernel(tiny_family):
    """Load the tiny T5 in NF4 on the CPU and run the packing the AVX512-BF16 forward runs, on
    every Linear4bit (pure torch, so it is proven on CPUs without AVX512 too)."""
    import copy

    import torch
    from bitsandbytes.functional import _convert_weight_packed_for_cpu
    from bitsandbytes.nn import Linear4bit
    from transformers import BitsAndBytesConfig, T5EncoderModel

    model = T5EncoderModel.from_pretrained(
        tiny_family["sd3.5-medium"] / "text_encoder_3",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
        device_map="cpu",
    )
    quantized = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == len(_quantized_t5_linears(model)) > 0
    for name, m in quantized:
        state = copy.deepcopy(m.weight.quant_state)
        packed, state = _convert_weight_packed_for_cpu(m.weight.data, state)
        n, k = m.out_features, m.in_features
        assert packed.shape == (n, k // 2) and packed.dtype == torch.uint8, name
        assert state.absmax.shape == (k // state.blocksize, n), name


def test_demo_vocabulary_is_one_token_a_word():
    """The demo model's prompt grammar (studio.demo.shapes) reads one token a word in the shared
    CLIP and T5 tokenizers, so the frozen encoders see whole words."""
    from studio.demo.shapes import VOCABULARY
    from studio.demo.tiny import build_shared_components

    shared = build_shared_components()
    clip, t5 = shared["tokenizer"], shared["tokenizer_3"]
    for word in VOCABULARY:
        assert clip.tokenize(word) == [word + "</w>"], word
        assert t5.tokenize(word) == ["▁" + word], word
    prompt = "a large blue square at the left and a small yellow triangle at the right on a white background"
    assert len(clip(prompt).input_ids) == len(prompt.split()) + 2  # + start and end
    assert len(t5(prompt).input_ids) == len(prompt.split()) + 1  # + </s>
