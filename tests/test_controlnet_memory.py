"""ControlNets in the memory planner (#15): each one's bytes are its real config counted on the
meta device, stored and placed with the transformer (fp8 beside a quantized one; offloaded with
it), in every phase's peak and in the RAM; the plan for SD3.5 Large with a ControlNet on 12, 16
and 24 GB cards; ``plan --controlnet``; and the service refusing a ControlNet that does not fit
before anything loads. The machines are simulated."""

from __future__ import annotations

import json

import pytest

from studio.control_catalog import CONTROLNETS, controlnet_config
from studio.hardware import Gpu, Hardware
from studio.memory import choose, estimate, get_preset, plan_for
from studio.memory.bytes import Storage, build_meta_model, weight_bytes

GB = 2**30
CANNY = "sd3.5-large-canny"


def gpu(gb: float, ram: float = 64) -> Hardware:
    return Hardware(gpus=[Gpu(0, "sim", int(gb * GB), int(gb * GB), (8, 9))], ram_total_bytes=int(ram * GB),
                    ram_available_bytes=int((ram - 4) * GB), device="cuda", simulated=("gpus", "ram"))


def cpu(gb: float) -> Hardware:
    return Hardware(ram_total_bytes=int(gb * GB), ram_available_bytes=int(gb * GB), device="cpu", simulated=("ram",))


def _row(est):
    rows = [r for r in est.components if r.component == "controlnet"]
    assert len(rows) == 1
    return rows[0]


@pytest.mark.parametrize("name", list(CONTROLNETS))
def test_the_planners_bytes_for_a_controlnet_are_its_config_counted_on_the_meta_device(name):
    import torch
    from diffusers import SD3ControlNetModel

    model = build_meta_model(SD3ControlNetModel, controlnet_config(name))
    variant = CONTROLNETS[name].bases[0]
    for preset, storage in (("full", Storage("plain", torch.bfloat16)),
                            ("fp8-layerwise", Storage("fp8", torch.bfloat16)),
                            ("cpu-fp32", Storage("plain", torch.float32))):
        est = estimate(variant, preset, 1024, 1024, controlnets=[name])
        row = _row(est)
        assert row.bytes == weight_bytes(model, storage), (name, preset)
        assert row.params == sum(p.numel() for p in model.parameters())
        without = estimate(variant, preset, 1024, 1024)
        assert est.weights_bytes - without.weights_bytes == row.bytes


def test_the_controlnet_is_stored_with_the_transformer():
    assert _row(estimate("sd3.5-large", "full", controlnets=[CANNY])).dtype == "bf16"
    assert _row(estimate("sd3.5-large", "fp8-layerwise", controlnets=[CANNY])).dtype == "fp8 e4m3"
    # a quantized transformer (NF4, torchao, GGUF): the ControlNet in fp8 layerwise beside it
    for preset in ("nf4-t5-8bit", "nf4-t5-4bit-offload"):
        row = _row(estimate("sd3.5-large", preset, controlnets=[CANNY]))
        assert row.dtype == "fp8 e4m3" and "layerwise" in row.quantization
    assert get_preset("nf4-t5-8bit").controlnet_storage().kind == "fp8"
    # in the dtype of a CPU preset
    assert _row(estimate("sd3.5-large", "cpu-fp32", controlnets=[CANNY])).dtype == "fp32"


def test_the_controlnet_is_offloaded_with_the_transformer():
    net = _row(estimate("sd3.5-large", "full", controlnets=[CANNY])).bytes

    def added(preset, phase):
        with_net = estimate("sd3.5-large", preset, controlnets=[CANNY]).phase_bytes[phase]
        return with_net - estimate("sd3.5-large", preset).phase_bytes[phase]

    # resident: on the GPU in every phase
    assert all(added("full", phase) >= net for phase in ("text encode", "denoise", "decode"))
    # model offload: brought at the first step, kept through the decode, not there for the text encoders
    assert added("model-offload", "denoise") >= net and added("model-offload", "decode") >= net
    assert added("model-offload", "text encode") == 0
    # group offload: block by block, as the transformer: far less than the whole net
    assert 0 < added("group-offload", "denoise") < net / 4
    est = estimate("sd3.5-large", "group-offload", controlnets=[CANNY])
    assert "per block" in _row(est).device
    # the RAM holds it whenever it is not on the GPU (with a pinned copy under group offload)
    assert est.ram_bytes - estimate("sd3.5-large", "group-offload").ram_bytes >= 2 * net
    # what cannot work is said
    seq = estimate("sd3.5-large", "sequential-offload", controlnets=[CANNY])
    assert not seq.feasible and any("position embedding" in n for n in seq.notes)
    assert estimate("sd3-medium", "sequential-offload", controlnets=["sd3-medium-canny"]).feasible  # carries its own
    multi = estimate("sd3.5-large", "multi-gpu-balanced", controlnets=[CANNY])
    assert not multi.feasible and any("several GPUs" in n for n in multi.notes)


def test_the_controlnet_residuals_are_in_the_denoise_activations():
    one = estimate("sd3-medium", "full", controlnets=["sd3-medium-canny"]).activations["transformer"]
    none = estimate("sd3-medium", "full").activations["transformer"]
    deeper = estimate("sd3-medium", "full", controlnets=["sd3-medium-depth"]).activations["transformer"]
    two = estimate("sd3-medium", "full", controlnets=["sd3-medium-canny", "sd3-medium-depth"])
    assert none < one < deeper < two.activations["transformer"]  # 6 blocks < 12 < 6 + 12
    assert sum(r.component == "controlnet" for r in two.components) == 2


@pytest.mark.parametrize("vram", [12, 16, 24])
def test_sd35_large_with_one_controlnet_is_planned_and_explained(vram):
    hw = gpu(vram)
    plan = choose(hw, "sd3.5-large", 1024, 1024, controlnets=[CANNY])
    assert plan.fits and plan.peak_bytes <= hw.vram_bytes and plan.estimate.ram_bytes <= hw.ram_available_bytes
    text = plan.explanation
    assert text.startswith("SD3.5 Large with 1 ControlNet at 1024×1024 fits with preset")
    assert "ControlNet " in text and "SD3.5 Large Canny" in text and "residuals" in text
    # the ControlNet is in the choice: the same preset without it needs less
    alone = plan_for(hw, "sd3.5-large", plan.preset, 1024, 1024)
    assert alone.peak_bytes < plan.peak_bytes or alone.estimate.ram_bytes < plan.estimate.ram_bytes
    # each rejected better choice was rejected with the ControlNet counted
    for r in plan.rejected:
        if r.axis and "needs" in r.reason:
            again = plan_for(hw, "sd3.5-large", r.preset, 1024, 1024, controlnets=[CANNY])
            assert not again.fits
    assert plan.to_dict()["controlnets"] == [CANNY]


def test_a_controlnet_can_change_the_choice():
    """Somewhere between 8 and 48 GB a card fits SD3.5 Large better without the ControlNet than with it."""
    changed = [v for v in range(8, 49, 2)
               if choose(gpu(v), "sd3.5-large").preset != choose(gpu(v), "sd3.5-large", controlnets=[CANNY]).preset]
    assert changed, "the ControlNet never changed the planner's choice"


def test_plan_command_takes_controlnets(capsys):
    from studio.app.cli import main

    assert main(["plan", "--vram", "16", "--ram", "64", "--variant", "sd3.5-large", "--controlnet", CANNY,
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["controlnets"] == [CANNY]
    assert [c for c in out["components"] if c["name"] == "controlnet"][0]["params"] == 2_153_518_976
    assert main(["plan", "--vram", "16", "--variant", "sd3.5-large", "--controlnet", CANNY]) == 0
    report = capsys.readouterr().out
    assert f"with ControlNet {CANNY}" in report and "ControlNet" in report.split("Named presets")[0]
    assert main(["plan", "--variant", "sd3.5-large", "--controlnet", "sd3-medium-canny"]) == 2
    err = capsys.readouterr().err
    assert "made for SD3 Medium" in err and "sd3.5-large-canny" in err
    assert main(["plan", "--controlnet", "no-such-net"]) == 2
    assert "not in the ControlNet catalog" in capsys.readouterr().err


def test_the_service_refuses_a_controlnet_that_does_not_fit_before_any_load(tmp_path, monkeypatch):
    from PIL import Image

    from studio.config import StudioConfig
    from studio.engine import build_request
    from studio.errors import ValidationError
    from studio.service import Studio

    control = tmp_path / "edges.png"
    Image.new("RGB", (64, 64)).save(control)
    studio = Studio(StudioConfig(data_dir=tmp_path / "data", variant="sd3.5-large", preset="model-offload"))
    monkeypatch.setattr(studio, "hardware", lambda: gpu(18))
    plain = build_request(dict(prompt="x"))
    studio.check_request(plain)  # SD3.5 Large alone fits model offload on 18 GB …
    req = build_request(dict(prompt="x", control_image=str(control), controlnet=CANNY))
    with pytest.raises(ValidationError) as e:  # … not with the 8B ControlNet beside it
        studio.check_request(req)
    msg = str(e.value)
    assert e.value.field == "controlnet" and "does not fit" in msg and "'model-offload'" in msg
    better = choose(gpu(18), "sd3.5-large", 1024, 1024, controlnets=[CANNY])
    assert better.fits and f"preset {better.preset!r}" in msg and "launch.py plan" in msg
    assert studio.current is None  # nothing loaded
    # a request naming no ControlNet is planned with the catalog's default for its control type
    default = build_request(dict(prompt="x", control_image=str(control), control_type="depth"))
    with pytest.raises(ValidationError, match="sd3.5-large-depth does not fit"):
        studio.check_request(default)
    # on a card it fits, nothing is said
    monkeypatch.setattr(studio, "hardware", lambda: gpu(32))
    studio.check_request(build_request(dict(prompt="x", control_image=str(control), controlnet=CANNY)))
