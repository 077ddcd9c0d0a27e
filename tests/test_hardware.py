"""studio.hardware: detection, simulated inventories, the live readout."""

import sys

import pytest

from studio import hardware as hw
from studio.hardware import GB, detect_hardware


def test_real_detection_on_this_machine():
    h = detect_hardware()
    assert h.device in ("cuda", "mps", "cpu")
    assert not h.overridden
    assert h.ram_total_bytes > 0
    assert 0 < h.ram_available_bytes <= h.ram_total_bytes
    if not h.gpus and not h.mps:
        assert h.device == "cpu"
    lines = h.describe().splitlines()
    assert lines[-1] == f"→ the studio will use: {h.device}"
    assert any(line.startswith("cpu") for line in lines)


def test_vram_override_without_gpu_simulates_one_cuda_gpu(monkeypatch):
    monkeypatch.setattr(hw, "_real_gpus", lambda: [])
    h = detect_hardware(vram_gb=8)
    assert h.overridden and h.device == "cuda"
    assert len(h.gpus) == 1
    assert h.gpus[0].total_bytes == h.gpus[0].free_bytes == 8 * GB
    assert h.vram_bytes == 8 * GB
    assert "8.0 GB total" in h.describe() and "(simulated)" in h.describe()


def test_vram_and_gpus_override(monkeypatch):
    monkeypatch.setattr(hw, "_real_gpus", lambda: [])
    h = detect_hardware(vram_gb=24, gpus=2, ram_gb=64)
    assert [g.index for g in h.gpus] == [0, 1]
    assert all(g.total_bytes == 24 * GB for g in h.gpus)
    assert h.ram_total_bytes == h.ram_available_bytes == 64 * GB
    assert len(h.describe().splitlines()) == 4  # two GPUs, RAM, the chosen device


def test_overrides_replace_real_gpus(monkeypatch):
    real = [hw.Gpu(0, "RTX 4090", 24 * GB, 20 * GB)]
    monkeypatch.setattr(hw, "_real_gpus", lambda: real)
    h = detect_hardware(vram_gb=8)
    assert h.gpus[0].name == "RTX 4090" and h.gpus[0].total_bytes == 8 * GB
    h = detect_hardware(gpus=3)  # extra GPUs copy the real one
    assert len(h.gpus) == 3 and all(g.total_bytes == 24 * GB for g in h.gpus)
    h = detect_hardware(gpus=0)
    assert h.gpus == [] and h.device in ("cpu", "mps")
    h = detect_hardware(device="cpu")
    assert h.device == "cpu" and h.gpus == real


def test_no_gpu_means_cpu(monkeypatch):
    monkeypatch.setattr(hw, "_real_gpus", lambda: [])
    monkeypatch.setattr(hw, "_real_mps", lambda: (False, 0))
    h = detect_hardware()
    assert h.device == "cpu" and h.gpus == [] and not h.mps


def test_simulated_mps(monkeypatch):
    monkeypatch.setattr(hw, "_real_mps", lambda: (False, 0))
    h = detect_hardware(device="mps", ram_gb=32)
    assert h.mps and h.device == "mps" and h.gpus == []
    assert h.mps_budget_bytes == 24 * GB  # 3/4 of unified memory
    h = detect_hardware(device="mps", vram_gb=20, ram_gb=32)
    assert h.mps_budget_bytes == 20 * GB
    assert "mps" in h.describe()


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"gpus": 2}, "--vram"),
        ({"device": "cuda"}, "--vram"),
        ({"device": "tpu"}, "Unknown device"),
        ({"vram_gb": 0}, "--vram"),
        ({"ram_gb": -1}, "--ram"),
        ({"gpus": -1}, "--gpus"),
    ],
)
def test_bad_overrides_explain_themselves(monkeypatch, kwargs, needle):
    monkeypatch.setattr(hw, "_real_gpus", lambda: [])
    with pytest.raises(ValueError, match=needle.replace("-", r"\-")):
        detect_hardware(**kwargs)


def test_meminfo_parsing(tmp_path):
    p = tmp_path / "meminfo"
    p.write_text("MemTotal:       16384000 kB\nMemFree:         1000 kB\nMemAvailable:    8192000 kB\n")
    info = hw._read_meminfo(str(p))
    assert info["MemTotal"] == 16384000 * 1024
    assert info["MemAvailable"] == 8192000 * 1024
    assert hw._read_meminfo(str(tmp_path / "missing")) == {}


def test_memory_snapshot_is_cheap_and_does_not_initialise_cuda():
    import torch

    before = torch.cuda.is_initialized()
    snap = hw.memory_snapshot()
    assert torch.cuda.is_initialized() == before
    assert set(snap) == {"gpus", "mps", "ram", "process_rss_bytes"}
    assert snap["ram"]["total_bytes"] > 0
    assert 0 <= snap["ram"]["used_bytes"] <= snap["ram"]["total_bytes"]
    for g in snap["gpus"]:
        assert {"index", "name", "used_bytes", "total_bytes"} <= set(g)
    line = hw.format_snapshot(snap)
    assert "RAM" in line and "GB" in line


def test_memory_snapshot_does_not_import_torch(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    snap = hw.memory_snapshot()  # works, and does not import torch itself
    assert "torch" not in sys.modules
    assert snap["ram"]["total_bytes"] > 0


def test_to_dict_is_json_ready(monkeypatch):
    import json

    monkeypatch.setattr(hw, "_real_gpus", lambda: [])
    d = detect_hardware(vram_gb=12, ram_gb=32).to_dict()
    assert json.loads(json.dumps(d))["gpus"][0]["total_bytes"] == 12 * GB
