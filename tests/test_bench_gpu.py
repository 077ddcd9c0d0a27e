"""The GPU benchmark's code paths: the --tiny CPU run, the random-weight builder (scaled down
through the same function) loading through the model manager, and one real preset on CUDA."""

import ctypes
import json
import os
from types import SimpleNamespace

import pytest
import torch

from studio.bench import gpu as bench_gpu
from studio.config import StudioConfig
from studio.memory import build_meta_model, count_params, get_preset
from studio.models import ModelManager, placement_from_preset

ROW_KEYS = ("s_per_image", "bare_s_per_image", "overhead_ratio", "peak_bytes", "estimate_bytes",
            "estimate_ratio")

# The real architecture with every width and depth shrunk; vocab sizes stay real.
SMALL = {
    "transformer": {"num_attention_heads": 2, "attention_head_dim": 16, "caption_projection_dim": 32,
                    "joint_attention_dim": 64, "pooled_projection_dim": 64},
    "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "projection_dim": 32,
                     "num_attention_heads": 2},
    "text_encoder_2": {"hidden_size": 32, "intermediate_size": 64, "projection_dim": 32,
                       "num_attention_heads": 2},
    "text_encoder_3": {"d_model": 64, "d_ff": 128, "num_heads": 2, "d_kv": 32},
    "vae": {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1},
}


@pytest.fixture
def workdir(tmp_path, tiny_family):
    """A --workdir whose tiny/ is the session's tiny family, which --tiny reuses (no rebuild)."""
    (tmp_path / "tiny").symlink_to(tiny_family["sd3.5-large"].parent, target_is_directory=True)
    return tmp_path


def _assert_row(row):
    for key in ROW_KEYS:
        assert key in row and row[key] is not None and row[key] > 0, (key, row)


def test_tiny_json_runs_every_function_on_cpu(workdir, capsys):
    assert bench_gpu.main(["--tiny", "--json", "--workdir", str(workdir)]) == 0
    results = json.loads(capsys.readouterr().out)
    assert set(results) == {f"sd3.5-large/{p}" for p in bench_gpu.TINY_PRESETS}
    ran = [r for r in results.values() if "skipped" not in r]
    assert any(r["preset"] == "cpu-fp32" for r in ran)
    for row in ran:
        _assert_row(row)
        assert row["overhead_ratio"] == pytest.approx(row["s_per_image"] / row["bare_s_per_image"], rel=1e-3)
        assert (row["width"], row["height"], row["steps"]) == (256, 256, 2)
        assert row["s_per_it"] == pytest.approx(row["s_per_image"] / 2, rel=1e-3)
    first = ran[0]  # the step cache is measured on the first plan that runs, through Engine.generate
    assert first["stepcache_steps"] == 8
    for mode in bench_gpu.STEPCACHE_MODES:
        assert 0 <= first[f"stepcache_{mode}_skipped"] <= 1 and first[f"stepcache_{mode}_time_ratio"] > 0
        assert first[f"stepcache_{mode}_mad_255"] >= 0
    for row in results.values():
        if "skipped" in row:  # bf16 on a CPU without native bf16: says how to run it anyway
            assert row["preset"] == "cpu-bf16" and "--presets" in row["skipped"]
    table = bench_gpu.format_table(results)
    assert "sd3.5-large/cpu-fp32" in table and "overhead" in table
    assert table.startswith("| variant / plan |") and "step cache fast" in table


def test_tiny_compile_is_measured_apart(workdir):
    """--compile: a fresh load with compiled blocks (eager backend here: fast on a CPU)."""
    results = bench_gpu.run(["sd3.5-large"], ["cpu-fp32"], tiny=True, workdir=workdir, compile=True,
                            compile_backend="eager", log=lambda m: None, stepcache=False)
    row = results["sd3.5-large/cpu-fp32"]
    _assert_row(row)
    assert "compile_error" not in row, row.get("compile_error")
    assert row["compile_first_s"] > 0 and row["compile_s_per_image"] > 0 and row["compile_speedup"] > 0
    assert "compile_peak_bytes" in row and row["compile_backend"] == "eager"
    assert "compile" in bench_gpu.format_table(results)


@pytest.mark.slow
def test_tiny_bf16_runs_when_named(workdir):
    """cpu-bf16 runs on any CPU when named (about a minute where the CPU has no native bf16)."""
    results = bench_gpu.run(["sd3.5-large"], ["cpu-bf16"], tiny=True, workdir=workdir, log=lambda m: None,
                            stepcache=False)
    _assert_row(results["sd3.5-large/cpu-bf16"])


def test_cpu_peak_counts_allocations_that_reuse_memory_freed_before():
    """Memory freed under a live chunk stays resident; without trimming the heap first, a block
    that reuses it measured a peak of 0 (the bf16 row in CI, late in a long suite)."""
    chunk = 100_000  # under glibc's mmap threshold: these come from the heap
    freed = [torch.ones(chunk, dtype=torch.uint8) for _ in range(1000)]
    pin = torch.ones(chunk, dtype=torch.uint8)  # sits above them, so free() alone cannot trim
    del freed
    with bench_gpu.PeakMeter("cpu") as meter:
        made = [torch.ones(chunk // 2, dtype=torch.uint8) for _ in range(1000)]
    assert meter.result["peak_bytes"] > 0.8 * len(made) * chunk // 2, meter.result
    del pin, made


def test_heap_trim_is_a_no_op_off_posix(monkeypatch):
    """Windows has no process-symbol handle (``CDLL(None)`` raises there): free_all must still run."""
    windows = SimpleNamespace(name="nt")  # what ctypes and the benchmark see; the rest of the process is untouched
    monkeypatch.setattr(ctypes, "_os", windows)
    monkeypatch.setattr(bench_gpu, "os", windows)
    bench_gpu.free_all()


def test_compile_flag_compiles_each_block_once(tiny_family, tmp_path):
    placement = bench_gpu.with_compile(placement_from_preset(get_preset("cpu-fp32"), "cpu"), backend="eager")
    assert placement.name == "cpu-fp32+compile"
    loaded = ModelManager(StudioConfig(data_dir=tmp_path), placement=placement).load(str(tiny_family["sd3.5-large"]))
    blocks = loaded.pipe.transformer.transformer_blocks
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert bench_gpu.compile_blocks(loaded.pipe) == 0  # idempotent


def test_component_configs_scale_down_and_refuse_inconsistent_overrides():
    real = bench_gpu.component_configs("sd3.5-medium")
    assert real["transformer"]["num_layers"] == 24 and real["text_encoder_3"]["d_model"] == 4096
    small = bench_gpu.component_configs("sd3.5-medium", max_layers=2, overrides=SMALL)
    assert small["transformer"]["num_layers"] == 2 and small["transformer"]["dual_attention_layers"] == [0, 1]
    assert small["text_encoder_2"]["num_hidden_layers"] == 2 and small["text_encoder_3"]["num_layers"] == 2
    assert small["text_encoder"]["vocab_size"] == 49408 and small["text_encoder_3"]["vocab_size"] == 32128
    with pytest.raises(ValueError, match="joint_attention_dim"):
        bench_gpu.component_configs("sd3.5-large", max_layers=1,
                                    overrides={**SMALL, "transformer": {**SMALL["transformer"], "joint_attention_dim": 48}})
    with pytest.raises(ValueError, match="Unknown component"):
        bench_gpu.component_configs("sd3.5-large", overrides={"unet": {}})


def test_random_builder_writes_a_folder_that_loads_through_the_model_manager(tmp_path):
    from safetensors import safe_open

    from studio.bench import gpu as b

    root = tmp_path / "models"
    configs = b.component_configs("sd3.5-large", max_layers=1, overrides=SMALL)
    folder = b.build_random_variant(root, "sd3.5-large", max_layers=1, overrides=SMALL, device="cpu",
                                    progress=None)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    assert index["tokenizer"][0] == "transformers" and index["scheduler"][1] == "FlowMatchEulerDiscreteScheduler"
    # bf16 safetensors; the shared components are file symlinks into one shared folder
    for sub in ("transformer", "text_encoder_3", "vae"):
        files = list((folder / sub).glob("*.safetensors"))
        assert files, sub
        with safe_open(str(files[0]), "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert dtypes <= {"BF16", "F32", "I64"} and "BF16" in dtypes, (sub, dtypes)
    assert all(p.is_symlink() for p in (folder / "text_encoder_3").iterdir())
    assert not any(p.is_symlink() for p in (folder / "transformer").iterdir())
    # reused, not rebuilt, when the stamp matches
    mtime = (folder / "transformer").stat().st_mtime_ns
    assert b.build_random_variant(root, "sd3.5-large", max_layers=1, overrides=SMALL, device="cpu",
                                  progress=None) == folder
    assert (folder / "transformer").stat().st_mtime_ns == mtime
    # Medium shares the text encoders and VAE (same configs): one shared folder for both
    b.build_random_variant(root, "sd3.5-medium", max_layers=1, overrides=SMALL, device="cpu", progress=None)
    assert len(list(root.glob("shared-*"))) == 1

    placement = placement_from_preset(get_preset("cpu-fp32"), "cpu")
    manager = ModelManager(StudioConfig(data_dir=tmp_path / "data"), placement=placement)
    loaded = manager.load(str(folder))
    assert loaded.variant.name == "sd3.5-large"  # inferred from the architecture (qk-norm, no dual)
    for name, cls_name in (("transformer", "SD3Transformer2DModel"), ("text_encoder_3", "T5EncoderModel")):
        module = getattr(loaded.pipe, name)
        cls = type(module)
        assert cls.__name__ == cls_name
        assert count_params(module) == count_params(build_meta_model(cls, configs[name]))
    assert loaded.pipe.text_encoder.config.vocab_size == 49408
    # the planner's arithmetic on the folder's own configs is the bytes loading allocated (fp32)
    from studio.memory import allocated_bytes

    est = b.folder_estimate(folder, get_preset("cpu-fp32"), 256, 256, guidance=3.5)
    allocated = sum(allocated_bytes(getattr(loaded.pipe, c)) for c in b.COMPONENT_CLASSES)
    assert est["weights_bytes"] == pytest.approx(allocated, rel=0.02)
    image = loaded.pipe("a fox", num_inference_steps=1, height=256, width=256,
                        generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (256, 256)


def test_presets_to_run_follows_the_planner_on_a_simulated_gpu(monkeypatch):
    """The default subset: the planner's choice for this GPU, then its choices for 24, 8 and 4 GB
    cards on the same machine, each with the budget it was planned for."""
    from studio import memory
    from studio.hardware import GB, detect_hardware

    monkeypatch.setattr("studio.hardware._real_gpus", lambda: [])
    hw = detect_hardware(vram_gb=80, ram_gb=128)
    out = bench_gpu.presets_to_run("sd3.5-large", hw, 1024, 1024)
    assert out[0].preset.name == "full" and out[0].recommended and out[0].budget_bytes is None
    assert out[0].estimate.peak_bytes > 0 and out[0].skipped is None
    planned = {c.planned_for: c for c in out[1:]}
    assert set(planned) <= {"24 GB", "8 GB", "4 GB"} and "4 GB" in planned
    for label, c in planned.items():
        card = detect_hardware(vram_gb=float(label.split()[0]), ram_gb=128)
        assert c.preset.name == memory.choose(card, "sd3.5-large").preset
        assert c.budget_bytes == int(float(label.split()[0]) * GB) and c.estimate.peak_bytes <= c.budget_bytes
        assert not c.recommended and c.preset.device == "cuda"
    assert len({c.preset.name for c in out}) == len(out)  # deduplicated
    small = {c.preset.name: c for c in bench_gpu.presets_to_run("sd3.5-large", detect_hardware(vram_gb=8, ram_gb=64),
                                                                 1024, 1024, ["full", "nf4+t5-cpu+group-offload"])}
    assert small["full"].skipped and "needs" in small["full"].skipped
    assert small["nf4+t5-cpu+group-offload"].skipped is None
    named = bench_gpu.presets_to_run("sd3.5-large", hw, 1024, 1024, ["sequential-offload"])
    assert [c.preset.name for c in named] == ["sequential-offload"] and named[0].skipped is None
    with pytest.raises(ValueError, match="Unknown preset"):
        bench_gpu.presets_to_run("sd3.5-large", hw, 1024, 1024, ["turbo-max"])


def test_the_time_budget_skips_what_would_start_late(workdir):
    results = bench_gpu.run(["sd3.5-large"], ["cpu-fp32"], tiny=True, workdir=workdir, log=lambda m: None,
                            budget_s=0.0)
    row = results["sd3.5-large/cpu-fp32"]
    assert "time budget" in row["skipped"] and "--budget-s" in row["skipped"]


def test_bare_recipes_cover_the_axes(tiny_family):
    assert "no bare-diffusers recipe" in bench_gpu.bare_recipe_problem(get_preset("nf4+t5-cpu+group-offload"))
    assert bench_gpu.bare_recipe_problem(get_preset("nf4-t5-8bit-offload")) is None
    pipe = bench_gpu.bare_pipeline(str(tiny_family["sd3.5-large"]), get_preset("cpu+fp32+vae-tiling"), "cpu")
    assert pipe.vae.use_tiling and pipe.vae.tile_sample_min_size == 512 and pipe.vae.tile_latent_min_size == 64
    with pytest.raises(ValueError, match="CPU"):
        bench_gpu.bare_pipeline(str(tiny_family["sd3.5-large"]), get_preset("bf16+t5-cpu"), "cuda")


def test_the_table_is_markdown_with_every_column():
    rows = {
        "sd3.5-large/full": {"recommended": True, "s_per_it": 0.31, "bare_s_per_it": 0.30, "overhead_ratio": 1.02,
                             "measured_bytes": 30 * 2**30, "estimate_bytes": 31 * 2**30, "estimate_ratio": 1.02,
                             "stepcache_fast_skipped": 0.4, "stepcache_fast_time_ratio": 0.66,
                             "stepcache_fast_mad_255": 2.1, "stepcache_faster_skipped": 0.6,
                             "stepcache_faster_time_ratio": 0.5, "stepcache_faster_mad_255": 4.5},
        "sd3.5-large/nf4+t5-cpu+group-offload": {"planned_for": "4 GB", "s_per_it": 0.9, "bare": "none",
                                                 "measured_bytes": 3 * 2**30, "estimate_bytes": 3.5 * 2**30,
                                                 "estimate_ratio": 0.98, "budget_bytes": 4 * 2**30,
                                                 "fits_budget": True},
        "sd3.5-large/sequential-offload": {"skipped": "about 15× slower"},
    }
    table = bench_gpu.format_table(rows).splitlines()
    assert table[0].startswith("| variant / plan | for | s/it | bare s/it")
    assert all(line.count("|") == table[0].count("|") for line in table[:5])
    assert "★ sd3.5-large/full" in table[2] and "40 % · ×0.66 · 2.1" in table[2] and "1.020 ok" in table[2]
    assert "| 4 GB |" in table[3] and "| yes |" in table[3] and "| — |" in table[3]
    assert "skipped: about 15× slower" in table[4]


def test_without_cuda_the_gpu_mode_says_to_use_tiny(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_gpu.main(["--json"]) == 2
    assert "--tiny" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_real_preset_on_cuda(tmp_path_factory):
    """Full-size SD3.5 Medium with random weights (≈16 GB on disk; reuse a build with
    STUDIO_BENCH_GPU_WORKDIR), the planner's preset for this GPU, 4 steps at 1024²."""
    workdir = os.environ.get("STUDIO_BENCH_GPU_WORKDIR") or tmp_path_factory.mktemp("bench_gpu")
    from studio.hardware import detect_hardware
    from studio.memory import choose

    preset = choose(detect_hardware(), "sd3.5-medium").preset
    results = bench_gpu.run(["sd3.5-medium"], [preset], steps=4, repeat=1, workdir=workdir)
    row = results[f"sd3.5-medium/{preset}"]
    assert "error" not in row, row.get("error")
    _assert_row(row)
    assert row["peak_reserved_bytes"] >= row["peak_bytes"]
    print(bench_gpu.format_table(results))
    assert 0.5 < row["estimate_ratio"] < 2.0  # the goal is ±10 %; this only catches a broken meter
