"""studio.memory: parameter counts, byte rules checked against real quantization, the planner."""

import argparse
import json

import pytest
import torch
from torch import nn

from studio import catalog, memory
from studio.memory import bytes as membytes
from studio.app.cli import add_plan_arguments
from studio.app.plan import run_plan_command
from studio import hardware as hw
from studio.hardware import GB, Hardware, detect_hardware
from studio.memory import Storage, allocated_bytes, build_meta_model, estimate, weight_bytes

VRAM_GRID = (4, 6, 8, 12, 16, 24, 48, 80)


@pytest.fixture(autouse=True)
def _no_real_gpu(monkeypatch):
    """Plans depend only on the simulated inventory, never on this machine's devices."""
    monkeypatch.setattr(hw, "_real_gpus", lambda: [])
    monkeypatch.setattr(hw, "_real_mps", lambda: (False, 0))


def machine(vram=None, gpus=None, ram=64, device=None) -> Hardware:
    return detect_hardware(vram_gb=vram, ram_gb=ram, gpus=gpus, device=device)


# --- parameter counts from the real configs on the meta device ---------------------------------


def test_component_params_match_the_published_models():
    large = memory.component_params("sd3.5-large")
    assert large["transformer"] == 8_056_627_520
    assert memory.component_params("sd3.5-medium")["transformer"] == 2_243_171_520
    assert memory.component_params("sd3-medium")["transformer"] == 2_028_328_000
    assert memory.component_params("sd3.5-large-turbo")["transformer"] == 8_056_627_520
    assert large["text_encoder_3"] == 4_762_310_656
    assert large["text_encoder_2"] == 694_659_840
    assert large["text_encoder"] == 123_650_304
    assert large["vae"] == 83_819_683


def test_meta_models_allocate_nothing_and_are_cached():
    m = memory.meta_model("transformer", "sd3.5-large")
    assert all(p.device.type == "meta" for p in m.parameters())
    assert memory.meta_model("transformer", "sd3.5-large-turbo") is m  # same config, same object
    assert memory.meta_model("text_encoder_3", "sd3-medium") is memory.meta_model(
        "text_encoder_3", "sd3.5-large"
    )


def test_bf16_bytes_are_two_per_param_plus_buffers():
    t = memory.meta_model("transformer", "sd3.5-large")
    cfg = catalog.SD35_LARGE_TRANSFORMER
    pos_embed = cfg["pos_embed_max_size"] ** 2 * cfg["num_attention_heads"] * 64  # a buffer
    assert weight_bytes(t, Storage("plain", torch.bfloat16)) == 2 * (8_056_627_520 + pos_embed)
    assert weight_bytes(t, Storage("plain", torch.float32)) == 4 * (8_056_627_520 + pos_embed)


def test_t5_wo_is_never_quantized_and_fp32_only_under_fp16():
    t5 = memory.meta_model("text_encoder_3", "sd3.5-large")
    converted = membytes._bnb_converted_linears(t5)
    assert converted and not any(n.endswith(".wo") for n in converted)
    wo = sum(m.weight.numel() for n, m in t5.named_modules() if n.endswith(".wo"))
    assert wo == 24 * 4096 * 10240
    bf16 = weight_bytes(t5, Storage("plain", torch.bfloat16))
    fp16 = weight_bytes(t5, Storage("plain", torch.float16))
    assert fp16 - bf16 == 2 * wo  # transformers keeps `wo` in fp32 only for fp16
    int8 = weight_bytes(t5, Storage("int8", torch.bfloat16))
    assert 5.4 * GB < int8 < 5.6 * GB  # not 4.8 GB: the 1.0 B `wo` params stay bf16


def test_fp8_layerwise_keeps_adaln_linears_in_bf16():
    """diffusers skips every module whose path matches "norm": norm1.linear (adaLN) included."""
    t = memory.meta_model("transformer", "sd3.5-large")
    cast = membytes._layerwise_cast_modules(t)
    assert "transformer_blocks.0.attn.to_q" in cast
    assert "transformer_blocks.0.norm1.linear" not in cast
    assert not any(n.startswith("pos_embed") for n in cast)
    fp8 = weight_bytes(t, Storage("fp8"))
    bf16 = weight_bytes(t, Storage("plain"))
    assert 0.6 < fp8 / bf16 < 0.7


# --- the byte rules against real quantized / cast tiny models ----------------------------------

TINY_T5 = {
    "vocab_size": 256,
    "d_model": 128,
    "d_ff": 320,
    "d_kv": 32,
    "num_heads": 4,
    "num_layers": 2,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "is_encoder_decoder": True,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_t5")
    T5EncoderModel(T5Config(**TINY_T5)).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "storage",
    [
        Storage("plain", torch.bfloat16),
        Storage("int8", torch.bfloat16),
        Storage("nf4", torch.bfloat16),
        Storage("nf4", torch.bfloat16, double_quant=True),
    ],
    ids=lambda s: f"{s.kind}{'-dq' if s.double_quant else ''}",
)
def test_t5_estimate_matches_real_bitsandbytes_quantization(tiny_t5_dir, storage):
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig, T5EncoderModel

    q = None
    if storage.kind == "int8":
        q = BitsAndBytesConfig(load_in_8bit=True)
    elif storage.kind == "nf4":
        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=storage.double_quant,
        )
    model = T5EncoderModel.from_pretrained(tiny_t5_dir, quantization_config=q, dtype=torch.bfloat16)
    q_proj = model.encoder.block[0].layer[0].SelfAttention.q
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert type(wo) is nn.Linear and wo.weight.dtype == torch.bfloat16  # kept, as estimated
    if storage.kind == "int8":
        assert isinstance(q_proj.weight, bnb.nn.Int8Params) and q_proj.weight.dtype == torch.int8
    elif storage.kind == "nf4":
        assert isinstance(q_proj.weight, bnb.nn.Params4bit)
        assert q_proj.weight.quant_state.quant_type == "nf4"
        assert q_proj.compute_dtype == torch.bfloat16
    from transformers import T5EncoderModel as cls

    estimated = weight_bytes(build_meta_model(cls, TINY_T5), storage)
    actual = allocated_bytes(model)
    assert abs(estimated - actual) / actual < 0.02, (estimated, actual)
    with torch.no_grad():  # and it runs
        out = model(torch.tensor([[3, 4, 5, 1]])).last_hidden_state
    assert out.shape == (1, 4, TINY_T5["d_model"])


TINY_SD3 = {
    "sample_size": 32,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 3,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "caption_projection_dim": 64,
    "pooled_projection_dim": 32,
    "pos_embed_max_size": 32,
    "qk_norm": "rms_norm",
    "dual_attention_layers": [0],
}


@pytest.mark.parametrize("kind", ["plain", "fp8"])
def test_sd3_transformer_estimate_matches_real_layerwise_casting(kind):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel.from_config(TINY_SD3).to(torch.bfloat16)
    if kind == "fp8":
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
        assert model.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
        assert model.transformer_blocks[0].norm1.linear.weight.dtype == torch.bfloat16
        assert model.pos_embed.proj.weight.dtype == torch.bfloat16
    estimated = weight_bytes(build_meta_model(SD3Transformer2DModel, TINY_SD3), Storage(kind))
    actual = allocated_bytes(model)
    assert abs(estimated - actual) / actual < 0.02, (estimated, actual)
    with torch.no_grad():  # still runs after casting
        out = model(
            hidden_states=torch.randn(1, 16, 8, 8, dtype=torch.bfloat16),
            encoder_hidden_states=torch.randn(1, 5, 64, dtype=torch.bfloat16),
            pooled_projections=torch.randn(1, 32, dtype=torch.bfloat16),
            timestep=torch.tensor([500]),
        ).sample
    assert out.shape == (1, 16, 8, 8)


def test_group_offload_footprint_follows_diffusers_grouping():
    t = memory.meta_model("transformer", "sd3.5-large")
    sizes = memory.module_bytes(t, Storage())
    block = membytes._subtree(sizes, "transformer_blocks.0")
    total = sum(sizes.values())
    rest = total - sum(membytes._subtree(sizes, f"transformer_blocks.{i}") for i in range(38))
    fp = memory.group_offload_footprint(t, Storage(), use_stream=True)
    assert fp == rest + 2 * block
    # transformers' T5 has no top-level ModuleList: it is one group, moved whole
    t5 = memory.meta_model("text_encoder_3", "sd3.5-large")
    assert memory.group_offload_footprint(t5, Storage()) == weight_bytes(t5, Storage())


# --- activations --------------------------------------------------------------------------------


def test_activation_formulas_scale_with_resolution():
    cfg = catalog.SD35_LARGE_TRANSFORMER
    a1 = memory.transformer_activation_bytes(cfg, 1024, 1024)
    tokens = 64 * 64 + 333
    assert a1 == 2 * tokens * 2432 * 2 * memory.TRANSFORMER_ACT_FACTOR
    assert memory.transformer_activation_bytes(cfg, 1024, 1024, batch=1) * 2 == a1
    v = memory.vae_decode_bytes(catalog.VAE_CONFIG, 1024, 1024)
    assert v == int(5 * 256 * 1024 * 1024 * 2)  # 2.5 GB in bf16 on CUDA: 4.0 live + 1.0 slack
    assert memory.vae_decode_bytes(catalog.VAE_CONFIG, 2048, 2048) == 4 * v
    cpu = memory.vae_decode_bytes(catalog.VAE_CONFIG, 1024, 1024, device="cpu")
    assert cpu == int(4 * 256 * 1024 * 1024 * 2)  # measured on CPU: no CUDA slack
    tiled = memory.vae_decode_bytes(catalog.VAE_CONFIG, 1024, 1024, tiled=True)
    assert tiled < v / 3  # a 512 px tile at a time
    assert memory.vae_decode_bytes(catalog.VAE_CONFIG, 512, 512, tiled=True) == \
        memory.vae_decode_bytes(catalog.VAE_CONFIG, 512, 512)  # one tile: nothing changes
    medium = catalog.SD35_MEDIUM_TRANSFORMER
    dual = memory.transformer_activation_bytes(medium, 1024, 1024)
    assert dual == 2 * tokens * 1536 * 2 * (memory.TRANSFORMER_ACT_FACTOR + memory.DUAL_ATTENTION_EXTRA)
    assert memory.TRANSFORMER_ACT_FACTOR + memory.DUAL_ATTENTION_EXTRA == 22  # measured on Medium


# --- presets -------------------------------------------------------------------------------------


def test_presets_are_documented_and_totally_ordered():
    ranks = [p.quality_rank for p in memory.PRESETS.values()]
    assert len(set(ranks)) == len(ranks)
    for p in memory.PRESETS.values():
        assert p.name and p.label and p.description and p.quality_cost
        assert p.speed_factor > 0
        assert p.needs_gpu_count >= (1 if p.needs_cuda else 0)
    for required in (
        "full", "t5-8bit", "fp8-layerwise", "nf4-t5-8bit", "nf4-t5-4bit", "no-t5",
        "model-offload", "group-offload", "sequential-offload", "cpu-bf16", "cpu-fp32", "mps",
        "multi-gpu-balanced", "nf4-t5-8bit-offload",
    ):
        assert required in memory.PRESETS
    assert memory.PRESETS["full"].quality_rank == max(ranks)


def test_load_kwargs_build_the_right_config_objects():
    import diffusers
    import transformers
    from diffusers import PipelineQuantizationConfig

    kw = memory.get_preset("nf4-t5-8bit").load_kwargs("cuda")
    assert kw["dtype"] == torch.bfloat16
    qc = kw["quantization_config"]
    assert isinstance(qc, PipelineQuantizationConfig)
    assert set(qc.quant_mapping) == {"transformer", "text_encoder_3"}
    tq, eq = qc.quant_mapping["transformer"], qc.quant_mapping["text_encoder_3"]
    assert isinstance(tq, diffusers.BitsAndBytesConfig)
    assert tq.load_in_4bit and tq.bnb_4bit_quant_type == "nf4"
    assert tq.bnb_4bit_compute_dtype == torch.bfloat16
    assert isinstance(eq, transformers.BitsAndBytesConfig) and eq.load_in_8bit

    kw = memory.get_preset("nf4-t5-4bit").load_kwargs("cuda")
    eq = kw["quantization_config"].quant_mapping["text_encoder_3"]
    assert isinstance(eq, transformers.BitsAndBytesConfig)
    assert eq.load_in_4bit and eq.bnb_4bit_compute_dtype == torch.bfloat16

    assert memory.get_preset("full").load_kwargs("cuda") == {"dtype": torch.bfloat16}
    assert memory.get_preset("fp8-layerwise").load_kwargs("cuda")["quantization_config"].quant_mapping.keys() == {"text_encoder_3"}
    kw = memory.get_preset("no-t5").load_kwargs("cuda")
    assert kw["text_encoder_3"] is None and kw["tokenizer_3"] is None
    assert "quantization_config" not in kw
    kw = memory.get_preset("multi-gpu-balanced").load_kwargs("cuda", machine(24, 2))
    assert kw["device_map"] == "balanced" and set(kw["max_memory"]) == {0, 1}
    assert memory.get_preset("cpu-fp32").load_kwargs("cpu") == {"dtype": torch.float32}
    with pytest.raises(ValueError, match="CUDA"):
        memory.get_preset("nf4-t5-8bit").load_kwargs("cpu")


class FakePipe:
    def __init__(self):
        self.calls = []
        outer = self

        class T:
            def enable_layerwise_casting(self, **kw):
                outer.calls.append(("layerwise", kw))

        self.transformer = T()

    def __getattr__(self, name):
        def record(*args, **kw):
            self.calls.append((name, kw or args))
            return self

        return record


@pytest.mark.parametrize(
    "name, expected",
    [
        ("full", ["to"]),
        ("model-offload", ["enable_model_cpu_offload"]),
        ("group-offload", ["enable_group_offload"]),
        ("sequential-offload", ["enable_sequential_cpu_offload"]),
        ("fp8-layerwise", ["layerwise", "to"]),
        ("fp8-model-offload", ["layerwise", "enable_model_cpu_offload"]),
        ("multi-gpu-balanced", []),
        ("cpu-bf16", ["to"]),
    ],
)
def test_apply_never_moves_to_the_gpu_before_offloading(name, expected):
    pipe = FakePipe()
    device = "cpu" if name.startswith("cpu") else "cuda"
    memory.get_preset(name).apply(pipe, device)
    assert [c[0] for c in pipe.calls] == expected
    if name == "group-offload":
        kw = pipe.calls[0][1]
        assert kw["offload_type"] == "block_level" and kw["use_stream"] is True
    if "layerwise" in expected:
        assert pipe.calls[0][1]["storage_dtype"] == torch.float8_e4m3fn


def test_check_explains_why_a_preset_cannot_run_on_cpu():
    cpu = machine(gpus=0, ram=64)
    msg = memory.get_preset("nf4-t5-8bit").check(cpu)
    assert "NF4" in msg and "CUDA GPU" in msg and "diffusers 0.42" in msg
    assert "CUDA" in memory.get_preset("full").check(cpu)
    assert "MPS" in memory.get_preset("mps").check(cpu)
    assert memory.get_preset("cpu-bf16").check(cpu) is None
    one = machine(8)
    assert "2 CUDA GPUs" in memory.get_preset("multi-gpu-balanced").check(one)
    assert memory.get_preset("nf4-t5-8bit").check(one) is None
    forced_cpu = machine(8, device="cpu")
    assert "cpu" in memory.get_preset("full").check(forced_cpu)


# --- the planner ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(catalog.VARIANTS))
@pytest.mark.parametrize("gpus", [1, 2])
@pytest.mark.parametrize("ram", [16, 64])
def test_more_vram_never_chooses_a_worse_plan(variant, gpus, ram):
    """The planner's objective (Preset.cost: quality lost + time) never gets worse with VRAM."""
    previous = None
    for vram in VRAM_GRID:
        plan = memory.choose(machine(vram, gpus, ram), variant, 1024, 1024)
        cost = plan.preset_obj.cost if plan.fits else float("inf")
        if previous is not None:
            assert cost <= previous, (variant, gpus, ram, vram, plan.preset)
        previous = cost


@pytest.mark.parametrize("variant", list(catalog.VARIANTS))
@pytest.mark.parametrize("vram", VRAM_GRID)
def test_every_size_gets_a_fitting_plan_or_an_honest_no(variant, vram):
    plan = memory.choose(machine(vram, 1, 64), variant, 1024, 1024)
    if plan.fits:
        assert plan.peak_bytes <= vram * GB
        assert plan.estimate.ram_bytes <= 64 * GB
        assert f"fits with preset '{plan.preset}'" in plan.explanation
    else:
        assert plan.explanation.startswith("No preset fits")
    # every named preset that ranks better is accounted for, with its reason
    better = {p.name for p in memory.presets_by_rank() if p.cost < plan.preset_obj.cost}
    rejected = {r.preset: r.reason for r in plan.rejected if not r.axis}
    assert better <= set(rejected)
    assert all(rejected[name] for name in better)


def test_large_on_8gb_fits_and_says_why():
    plan = memory.choose(machine(8, 1, 32), "sd3.5-large", 1024, 1024)
    assert plan.fits and plan.peak_bytes <= 8 * GB
    assert plan.preset == "nf4-t5-8bit-offload"
    assert "full — needs 29.1 GB > 8.0 GB" in plan.explanation
    assert "× the time of 'full'" in plan.explanation
    assert "NF4" in plan.explanation


def test_big_gpu_runs_full():
    for v in catalog.VARIANTS:
        assert memory.choose(machine(80), v).preset == "full"


def test_two_gpus_pick_multi_gpu_when_one_cannot_hold_full():
    one = memory.choose(machine(24, 1), "sd3.5-large")
    two = memory.choose(machine(24, 2), "sd3.5-large")
    assert one.preset != "full" and one.fits
    assert two.preset == "multi-gpu-balanced" and two.fits
    devices = {r.component: r.device for r in two.estimate.components}
    assert devices["transformer"] != devices["text_encoder_3"]
    # two GPUs too small for the transformer: balanced would leave it on the CPU
    small = memory.choose(machine(12, 2), "sd3.5-large")
    assert small.preset != "multi-gpu-balanced"
    assert any("CPU" in r.reason for r in small.rejected if r.preset == "multi-gpu-balanced")


def test_no_gpu_chooses_a_cpu_preset():
    plan = memory.choose(machine(gpus=0, ram=64), "sd3.5-medium")
    assert plan.preset.startswith("cpu-") and plan.fits
    assert all(r.device == "cpu" for r in plan.estimate.components)
    tiny_ram = memory.choose(machine(gpus=0, ram=8), "sd3.5-large")
    assert not tiny_ram.fits and tiny_ram.explanation.startswith("No preset fits")


def test_mps_machine_uses_the_mps_preset():
    plan = memory.choose(machine(device="mps", ram=64), "sd3.5-medium")
    assert plan.preset == "mps" and plan.fits


def test_estimate_rows_and_turbo_without_cfg():
    e = estimate("sd3.5-large", "nf4-t5-4bit-offload")
    assert [r.component for r in e.components] == list(memory.COMPONENTS)
    by = {r.component: r for r in e.components}
    assert by["transformer"].dtype == "nf4" and by["text_encoder_3"].dtype == "nf4"
    assert by["vae"].dtype == "bf16"
    assert "offload" in by["transformer"].device
    no_t5 = estimate("sd3.5-large", "no-t5")
    assert {r.component: r for r in no_t5.components}["text_encoder_3"].bytes == 0
    turbo = estimate("sd3.5-large-turbo", "full")
    large = estimate("sd3.5-large", "full")
    assert turbo.activations["transformer"] < large.activations["transformer"]  # batch 1, no CFG


def _run(argv, capsys):
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    rc = run_plan_command(parser.parse_args(argv))
    return rc, capsys.readouterr()


def test_plan_command_json(capsys):
    rc, out = _run(["--vram", "8", "--ram", "32", "--variant", "sd3.5-large", "--json"], capsys)
    assert rc == 0
    data = json.loads(out.out)
    assert {"variant", "preset", "fits", "peak_bytes", "components", "explanation", "hardware"} <= set(data)
    assert data["fits"] is True and data["variant"] == "sd3.5-large"
    for c in data["components"]:
        assert {"name", "device", "dtype", "quantization", "bytes"} <= set(c)
    assert data["hardware"]["gpus"][0]["total_bytes"] == 8 * GB


def test_plan_command_human_table(capsys):
    rc, out = _run(["--vram", "8", "--ram", "32", "--variant", "sd3.5-large"], capsys)
    assert rc == 0
    assert "→ nf4-t5-8bit-offload" in out.out
    assert "Better presets rejected" in out.out and "(simulated)" in out.out


def test_plan_command_errors_and_snapping(capsys):
    rc, out = _run(["--gpus", "2"], capsys)
    assert rc == 2 and "--vram" in out.err
    rc, out = _run(["--vram", "80", "--width", "1000", "--height", "1000", "--json"], capsys)
    assert rc == 0 and "snapped to 992×992" in out.err
    rc, out = _run(["--gpus", "0", "--ram", "4", "--variant", "sd3.5-large"], capsys)
    assert rc == 1 and "DOES NOT FIT" in out.out


# --- the counts table the planner reads instead of importing the model libraries ----------------


def test_the_counts_table_is_the_live_count():
    """studio/memory/counts.py (written by `python -m studio.memory.bytes`) holds exactly what
    counting the catalog's components on the meta device gives with the installed libraries."""
    from studio.memory.counts import COUNTS

    configs = membytes._catalog_configs()
    nets = membytes._catalog_controlnets()
    assert set(COUNTS) == set(configs) | set(nets), "regenerate: python -m studio.memory.bytes"
    models = [(key, memory.meta_model(component, variant)) for key, (component, variant) in configs.items()]
    models += [(key, membytes.controlnet_meta_model(name)) for key, name in nets.items()]
    for key, model in models:
        entry = COUNTS[key]
        assert entry["params"] == memory.count_params(model), key
        for storage in membytes.COUNT_STORAGES:
            assert entry[storage.key] == membytes.live_numbers(model, storage), (key, storage.key)


def test_component_numbers_come_from_the_table_for_the_catalog(monkeypatch):
    membytes.component_numbers.cache_clear()
    monkeypatch.setattr(membytes, "meta_model", lambda *a: pytest.fail("counted live"))
    try:
        n = memory.component_numbers("transformer", "sd3.5-large", Storage("nf4"))
        assert n["params"] == 8_056_627_520 and 4 * GB < n["bytes"] < 5 * GB
    finally:
        membytes.component_numbers.cache_clear()
