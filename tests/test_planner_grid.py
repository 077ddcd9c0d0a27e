"""The composing planner: every machine on the grid gets a plan or an honest no, the plan only
improves with memory, fp8 compute is gated on the GPU, VAE tiling is chosen when decode is the
peak, every name resolves, and `plan` neither imports bitsandbytes nor prints a warning."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from studio import catalog, memory
from studio import hardware as hw
from studio.app.cli import add_plan_arguments
from studio.app.plan import run_plan_command
from studio.hardware import GB, Gpu, Hardware, detect_hardware
from studio.memory import presets as mp
from studio.memory.names import PRESET_NAMES

VRAM = (4, 6, 8, 12, 16, 24, 48, 80)
RAM = (16, 32, 64)
VARIANTS = ("sd3.5-large", "sd3.5-medium")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_real_gpu(monkeypatch):
    monkeypatch.setattr(hw, "_real_gpus", lambda: [])
    monkeypatch.setattr(hw, "_real_mps", lambda: (False, 0))


def machine(vram=None, ram=64, gpus=None, cc=None, device=None) -> Hardware:
    return detect_hardware(vram_gb=vram, ram_gb=ram, gpus=gpus, device=device, compute_capability=cc)


@pytest.fixture(scope="module")
def grid():
    hw._real_gpus, saved = (lambda: []), hw._real_gpus
    hw._real_mps, saved_mps = (lambda: (False, 0)), hw._real_mps
    try:
        return {(v, vram, ram): memory.choose(detect_hardware(vram_gb=vram, ram_gb=ram), v)
                for v in VARIANTS for vram in VRAM for ram in RAM}
    finally:
        hw._real_gpus, hw._real_mps = saved, saved_mps


def test_every_grid_point_fits_or_says_why(grid):
    for (variant, vram, ram), plan in grid.items():
        if plan.fits:
            assert plan.peak_bytes <= vram * GB and plan.estimate.ram_bytes <= ram * GB, plan.preset
            assert f"fits with preset '{plan.preset}'" in plan.explanation
        else:
            assert plan.explanation.startswith("No preset fits"), (variant, vram, ram)
            assert "needs" in plan.explanation
        # the plan's name is the plan: it resolves to the same choices
        again = memory.get_preset(plan.preset)
        assert again.axes == plan.choice.axes and again.device == plan.choice.device
        assert plan.choice.check(plan.hardware) is None


def test_sd35_fits_every_grid_machine_at_1024(grid):
    """The issue's table: Large and Medium at 1024² find a plan on every VRAM × RAM pair."""
    missing = [key for key, plan in grid.items() if not plan.fits]
    assert not missing, missing


def test_more_memory_never_gives_a_worse_plan(grid):
    for variant in VARIANTS:
        for ram in RAM:
            costs = [grid[variant, vram, ram].preset_obj.cost for vram in VRAM]
            assert costs == sorted(costs, reverse=True), (variant, ram, costs)
        for vram in VRAM:
            costs = [grid[variant, vram, ram].preset_obj.cost for ram in RAM]
            assert costs == sorted(costs, reverse=True), (variant, vram, costs)


def test_the_issue_case_four_gb_finds_a_plan_that_offloads_with_a_smaller_t5():
    """Measured before: `plan --vram 4 --variant sd3.5-large` found nothing on 22 GB RAM, because
    sequential offload kept T5 in bf16 and no preset combined offload with a smaller T5."""
    plan = memory.choose(machine(4, ram=22), "sd3.5-large")
    assert plan.fits and plan.choice.placement in ("group", "sequential", "model")
    assert plan.choice.t5 != "plain" or plan.choice.placement == "group"
    assert "Better choices per component, and why not:" in plan.explanation
    assert "T5 (" in plan.explanation and "Offload (" in plan.explanation


def test_explanations_give_a_reason_for_every_better_choice_per_axis(grid):
    plan = grid["sd3.5-large", 8, 32]
    per_axis = [r for r in plan.rejected if r.axis]
    assert per_axis and all(r.reason for r in per_axis)
    for r in per_axis:  # each is the chosen plan with one axis changed to a choice that costs less
        alt = memory.get_preset(r.preset) if r.preset in memory.PRESETS else None
        if alt is not None:
            assert getattr(alt, r.axis) == r.choice
    data = plan.to_dict()
    assert any(r.get("axis") == "transformer" for r in data["rejected"])


def test_nothing_fits_says_so_plainly():
    plan = memory.choose(machine(2, ram=8), "sd3.5-large")
    assert not plan.fits
    assert plan.explanation.startswith("No preset fits SD3.5 Large at 1024×1024 on this machine")
    assert "Try a smaller size" in plan.explanation


# --- fp8 compute, torchao and GGUF: gated on what the machine has --------------------------------


def test_fp8_compute_only_where_the_gpu_has_fp8_tensor_cores(monkeypatch):
    monkeypatch.setattr(mp, "_available", lambda package: True)  # as if torchao were installed
    hopper = memory.choose(machine(16, cc=9.0), "sd3.5-large")
    assert hopper.choice.transformer == "ao-fp8", hopper.preset
    assert "fp8-compute" in hopper.preset
    ampere = memory.choose(machine(16, cc=8.6), "sd3.5-large")
    assert ampere.choice.transformer != "ao-fp8"
    reasons = {r.choice: r.reason for r in ampere.rejected if r.axis == "transformer"}
    assert "compute capability ≥ 8.9" in reasons["ao-fp8"] and "8.6" in reasons["ao-fp8"]
    simulated = memory.choose(machine(16), "sd3.5-large")
    reasons = {r.choice: r.reason for r in simulated.rejected if r.axis == "transformer"}
    assert "unknown" in reasons["ao-fp8"]


def test_torchao_is_offered_only_when_installed(monkeypatch):
    monkeypatch.setattr(mp, "_available", lambda package: False)
    plan = memory.choose(machine(16, cc=9.0), "sd3.5-large")
    assert plan.choice.transformer not in ("ao-int8", "ao-fp8")
    assert "torchao is not installed" in memory.get_preset("int8+model-offload").check(machine(16, cc=9.0))


def test_a_gguf_file_fixes_the_transformer_and_its_bytes(monkeypatch):
    monkeypatch.setattr(mp, "_available", lambda package: True)
    size = int(4.9 * GB)  # e.g. a Q4_K_M file's header count
    plan = memory.choose(machine(8, ram=32), "sd3.5-large", component_bytes={"transformer": size},
                         transformer_format="gguf")
    assert plan.fits and plan.choice.transformer == "gguf" and plan.preset.startswith("gguf")
    row = {r.component: r for r in plan.estimate.components}["transformer"]
    assert row.bytes == size and row.dtype == "gguf"
    assert plan.to_dict()["component_bytes"] == {"transformer": size}
    monkeypatch.setattr(mp, "_available", lambda package: False)
    none = memory.choose(machine(8, ram=32), "sd3.5-large", component_bytes={"transformer": size},
                         transformer_format="gguf")
    assert not none.fits and "gguf package" in none.explanation


# --- VAE tiling -----------------------------------------------------------------------------------


def test_vae_tiling_is_chosen_when_decode_is_the_peak():
    full = memory.estimate("sd3.5-medium", "full")
    tiled = memory.estimate("sd3.5-medium", "bf16+vae-tiling")
    assert full.peak_phase == "decode" and tiled.peak_bytes < full.peak_bytes
    assert tiled.phase_bytes["decode"] < full.phase_bytes["decode"] / 2 + full.weights_bytes
    between = (full.peak_bytes + tiled.peak_bytes) / 2 / GB
    plan = memory.choose(machine(between, ram=64), "sd3.5-medium")
    assert plan.fits and plan.choice.vae == "tiled", plan.preset
    assert plan.preset == "bf16+vae-tiling"
    vae_reasons = [r.reason for r in plan.rejected if r.axis == "vae"]
    assert vae_reasons and "decode" in vae_reasons[0]


def test_vae_tiling_really_tiles(monkeypatch):
    """enable_vae_tiling sets the tile size: the SD3 VAE's own is 1024 px (its sample_size), which
    never tiles a 1024² image. Scaled down here (128 px tiles of a 256² decode: the same 3 × 3
    grid a 1024² image gets from 512 px tiles) and the result matches the whole decode in the bulk."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL.from_config({**catalog.VAE_CONFIG, "block_out_channels": [8, 8, 8, 8],
                                     "norm_num_groups": 4, "layers_per_block": 1,
                                     "mid_block_add_attention": False}).eval()
    assert vae.tile_sample_min_size == 1024  # diffusers' default for this config: no tiling at 1024²
    monkeypatch.setattr(mp, "VAE_TILE", 128)
    z = torch.randn(1, 16, 32, 32) * 0.1
    with torch.no_grad():
        whole = vae.decode(z).sample
        mp.enable_vae_tiling(vae)
        calls = []
        vae.decoder.register_forward_hook(lambda *a: calls.append(1))
        tiled = vae.decode(z).sample
    assert vae.use_tiling and vae.use_slicing and vae.tile_latent_min_size == 16
    assert len(calls) == 9  # 3 × 3 overlapping tiles
    assert tiled.shape == whole.shape == (1, 3, 256, 256)
    # random weights: the tiles agree with the whole decode in the bulk, not to the last digit
    assert torch.corrcoef(torch.stack([tiled.flatten(), whole.flatten()]))[0, 1] > 0.8
    assert memory.VAE_TILE == 512  # what the planner and the presets use at full size


# --- names ------------------------------------------------------------------------------------


def test_named_presets_still_resolve_everywhere():
    assert tuple(memory.PRESETS) == PRESET_NAMES and len(PRESET_NAMES) == 18
    for name in PRESET_NAMES:
        p = memory.get_preset(name)
        assert p.name == name and p.named and name in memory.PRESETS and memory.PRESETS[name] is p
    # a combination equal to a named preset is that preset
    assert memory.get_preset("bf16").name == "full"
    assert memory.get_preset("nf4+t5-8bit+model-offload").name == "nf4-t5-8bit-offload"
    assert memory.get_preset("model-offload+t5-8bit+bf16").name == "t5-8bit-offload"  # any order
    assert memory.compose(transformer="fp8", t5="int8").name == "fp8-layerwise"


def test_composed_names_round_trip_and_validate():
    for cuda in (machine(8), machine(8, gpus=2)):
        for p in memory.candidate_presets(cuda):
            again = memory.get_preset(p.name)
            assert (again.device, again.dtype, again.axes) == (p.device, p.dtype, p.axes), p.name
            assert p.name in memory.PRESETS  # what the service checks names against
    for p in memory.candidate_presets(machine(gpus=0)):
        assert memory.get_preset(p.name).axes == p.axes
    assert "nf4+t5-cpu+group-offload" in memory.PRESETS
    assert "turbo-max" not in memory.PRESETS
    with pytest.raises(KeyError, match="Known presets: full"):
        memory.get_preset("turbo-max")
    with pytest.raises(KeyError, match="does not work: model offload"):
        memory.get_preset("nf4+t5-cpu+model-offload")
    with pytest.raises(KeyError, match="twice"):
        memory.get_preset("nf4+fp8")
    p = memory.get_preset("nf4+t5-cpu+group-offload+vae-tiling")
    assert (p.transformer, p.t5, p.placement, p.vae) == ("nf4", "cpu", "group", "tiled")
    assert p.label and p.description and "CPU" in p.description and p.quality_cost


def test_a_composed_plan_goes_through_placement_from_preset():
    """The model manager's interface is unchanged: placement_from_preset takes composed plans."""
    import torch

    from studio.models import placement_from_preset

    p = memory.get_preset("nf4+t5-cpu+group-offload+vae-tiling")
    placement = placement_from_preset(p, "cuda")
    assert placement.name == p.name and placement.dtype == torch.bfloat16
    assert set(placement.component_kwargs) == {"transformer"}
    assert not placement.resident  # the manager must not move the CPU-kept T5 to the GPU
    assert placement_from_preset(memory.get_preset("nf4+t5-8bit+vae-tiling"), "cuda").resident


class RecordingPipe:
    """Records which components the pipeline-wide calls saw."""

    def __init__(self):
        import torch

        self.calls = []
        self.text_encoder_3 = torch.nn.Linear(2, 2)
        self.vae = type("V", (), {})()
        self.vae.config = type("C", (), {"block_out_channels": [8, 8, 8, 8]})()
        for name in ("enable_tiling", "enable_slicing"):
            setattr(self.vae, name, lambda n=name: self.calls.append((n, None)))

    def register_modules(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)

    def __getattr__(self, name):
        def record(*args, **kw):
            self.calls.append((name, self.text_encoder_3))
            return self

        return record


@pytest.mark.parametrize("name", ["nf4+t5-cpu+group-offload", "bf16+t5-cpu", "bf16+t5-cpu+sequential-offload"])
def test_a_cpu_kept_t5_is_hidden_from_the_pipeline_wide_calls(name):
    pipe = RecordingPipe()
    t5 = pipe.text_encoder_3
    memory.get_preset(name).apply(pipe, "cuda")
    assert pipe.calls[0][0] in ("to", "enable_group_offload", "enable_sequential_cpu_offload")
    assert pipe.calls[0][1] is None  # T5 was not there when the pipeline moved / hooked
    assert pipe.text_encoder_3 is t5 and t5._studio_on_cpu
    assert len(t5._forward_pre_hooks) == 1 and len(t5._forward_hooks) == 1
    memory.keep_on_cpu(t5)  # idempotent
    assert len(t5._forward_pre_hooks) == 1
    import torch

    out = t5(torch.ones(1, 2))
    assert out.device.type == "cpu"


def test_tiled_presets_set_the_tile_size_on_apply():
    pipe = RecordingPipe()
    memory.get_preset("bf16+vae-tiling").apply(pipe, "cuda")
    names = [c[0] for c in pipe.calls]
    assert names == ["to", "enable_tiling", "enable_slicing"]
    assert pipe.vae.tile_sample_min_size == 512 and pipe.vae.tile_latent_min_size == 64


# --- the plan command -----------------------------------------------------------------------------


def _run(argv, capsys):
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    rc = run_plan_command(parser.parse_args(argv))
    return rc, capsys.readouterr()


def test_plan_preset_explains_that_preset_here(capsys):
    rc, out = _run(["--vram", "8", "--ram", "32", "--variant", "sd3.5-large", "--preset", "fp8-model-offload"], capsys)
    assert rc == 1 and "Preset for SD3.5 Large" in out.out and "DOES NOT FIT" in out.out
    assert "does NOT fit — needs" in out.out and "VRAM" in out.out
    rc, out = _run(["--vram", "8", "--ram", "32", "--variant", "sd3.5-large", "--preset", "nf4-t5-8bit-offload",
                    "--json"], capsys)
    data = json.loads(out.out)
    assert rc == 0 and data["fits"] and data["explained"] and data["preset"] == "nf4-t5-8bit-offload"
    rc, out = _run(["--vram", "4", "--ram", "32", "--variant", "sd3.5-large", "--preset", "nf4+t5-cpu+group-offload"],
                   capsys)
    assert rc == 0 and "→ nf4+t5-cpu+group-offload" in out.out
    rc, out = _run(["--vram", "8", "--preset", "turbo-max"], capsys)
    assert rc == 2 and "Known presets" in out.err
    rc, out = _run(["--vram", "8", "--preset", "auto", "--json"], capsys)
    assert rc == 0 and not json.loads(out.out)["explained"]


def test_plan_json_carries_activations_and_phase_bytes(capsys):
    rc, out = _run(["--vram", "12", "--ram", "32", "--variant", "sd3.5-medium", "--json"], capsys)
    data = json.loads(out.out)
    for key in ("variant", "preset", "fits", "peak_bytes", "components", "explanation", "hardware",
                "budget_bytes", "ram_bytes", "ram_budget_bytes", "speed_factor", "quality_cost", "width", "height",
                "rejected", "activations", "phase_bytes", "ram_parts", "axes", "cost", "overhead_bytes"):
        assert key in data, key
    assert set(data["phase_bytes"]) == {"text encode", "denoise", "decode"}
    assert max(data["phase_bytes"].values()) == data["peak_bytes"]
    assert data["activations"]["transformer"] > 0 and data["ram_parts"]["base"] == memory.BASE_RAM_BYTES["cuda"]


def test_ram_is_budgeted_from_what_is_available():
    busy = Hardware(gpus=[Gpu(0, "x", 24 * GB, 24 * GB)], ram_total_bytes=64 * GB, ram_available_bytes=10 * GB,
                    device="cuda")
    assert memory.ram_budget_bytes(busy) == 10 * GB
    plan = memory.choose(busy, "sd3.5-large")
    assert plan.fits and plan.estimate.ram_bytes <= 10 * GB and plan.ram_budget_bytes == 10 * GB
    assert "of 10.0 GB available" in plan.explanation


def test_ram_is_labelled_simulated_only_when_given():
    only_gpu = machine(8, ram=None)
    text = only_gpu.describe()
    assert "8.0 GB free (simulated)" in text
    assert "available (simulated)" not in text
    assert "available (simulated)" in machine(8, ram=32).describe()
    assert "compute 8.9" in machine(8, cc="8.9").describe()
    with pytest.raises(ValueError, match="MAJOR.MINOR"):
        machine(8, cc="ampere")


def test_plan_imports_no_bitsandbytes_and_prints_no_warning():
    code = (
        "import sys, json\n"
        "from studio.app.cli import build_parser\n"
        "from studio.app.plan import run_plan_command\n"
        "args = build_parser().parse_args(['plan', '--vram', '8', '--ram', '32', '--variant', 'sd3.5-large', '--json'])\n"
        "rc = run_plan_command(args)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('bitsandbytes', 'diffusers', 'transformers', 'peft', 'torchao'))\n"
        "print('HEAVY', json.dumps(heavy), rc, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1] == "HEAVY [] 0", lines[-5:]
    assert len(lines) == 1, lines  # nothing else on stderr: no library warning
    assert json.loads(done.stdout)["preset"]
