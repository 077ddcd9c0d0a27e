"""Memory presets through the model manager on the tiny family, up to the GPU boundary.

The planner's per-component byte estimate (counted on the meta device) is held against the
bytes loading really allocates, for every preset that runs on a CPU: bf16, fp8 storage, 8-bit
and NF4 T5. The NF4 transformer stops where diffusers stops (no GPU): that refusal is checked,
and the full load runs only on CUDA.
"""

import json

import pytest
import torch

from studio.config import StudioConfig
from studio.memory import Storage, allocated_bytes, build_meta_model, get_preset, module_bytes
from studio.models import ModelError, ModelManager, placement_from_preset
from studio.service import Studio


def _estimated(folder, component, cls, storage) -> int:
    config = json.loads((folder / component / "config.json").read_text())
    return sum(module_bytes(build_meta_model(cls, config), storage).values())


@pytest.mark.parametrize("preset_name", ["cpu-bf16", "fp8-layerwise", "t5-8bit", "nf4-t5-4bit-offload"])
def test_estimated_bytes_equal_allocated_after_loading(preset_name, tiny_family, tmp_path):
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    preset = get_preset(preset_name)
    placement = placement_from_preset(preset, "cpu", validate_on_cpu=True)
    if preset.transformer == "nf4":  # the GPU boundary: keep the transformer in bf16 here
        placement.component_kwargs.pop("transformer")
    manager = ModelManager(StudioConfig(data_dir=tmp_path), placement=placement)
    folder = tiny_family["sd3.5-large"]
    loaded = manager.load(str(folder))
    pipe = loaded.pipe
    classes = {"transformer": SD3Transformer2DModel, "vae": AutoencoderKL,
               "text_encoder": CLIPTextModelWithProjection, "text_encoder_2": CLIPTextModelWithProjection,
               "text_encoder_3": T5EncoderModel}
    checked = []
    for component, cls in classes.items():
        storage = preset.storage(component)
        if component == "transformer" and preset.transformer == "nf4":
            storage = Storage("plain", preset.dtype)
        estimate = _estimated(folder, component, cls, storage)
        actual = allocated_bytes(getattr(pipe, component))
        assert abs(estimate - actual) <= 0.02 * actual, (component, storage, estimate, actual)
        checked.append((component, storage.kind))
    if preset.t5 in ("int8", "nf4"):
        kinds = {type(m).__name__ for m in pipe.text_encoder_3.modules()}
        assert ("Linear8bitLt" if preset.t5 == "int8" else "Linear4bit") in kinds, "T5 really is quantized"
    if preset.transformer == "fp8":
        fp8 = [p for p in pipe.transformer.parameters() if p.dtype == torch.float8_e4m3fn]
        assert fp8, "transformer weights are stored in fp8"
    # and it still generates on the CPU
    image = pipe("a red fox", num_inference_steps=1, height=256, width=256,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (256, 256)
    assert len(checked) == 5


def test_nf4_transformer_stops_at_the_gpu_boundary_with_a_clear_message(tiny_family, tmp_path):
    placement = placement_from_preset(get_preset("nf4-t5-8bit"), "cpu", validate_on_cpu=True)
    assert type(placement.component_kwargs["transformer"]["quantization_config"]).__module__.startswith("diffusers")
    assert placement.component_kwargs["transformer"]["quantization_config"].bnb_4bit_compute_dtype == torch.bfloat16
    manager = ModelManager(StudioConfig(data_dir=tmp_path), placement=placement)
    with pytest.raises(ModelError, match="needs a CUDA GPU"):
        manager.load(str(tiny_family["sd3-medium"]))
    assert manager.current is None


def test_cuda_presets_are_refused_on_a_cpu_machine_with_the_reason(tmp_path):
    studio = Studio(StudioConfig(data_dir=tmp_path, device="cpu"))
    with pytest.raises(ModelError, match="cannot run here: NF4 quantization of the SD3 transformer needs a CUDA GPU"):
        studio.placement_for("nf4-t5-8bit")
    with pytest.raises(ModelError, match="Unknown memory preset 'turbo-max'. Valid presets: auto, full, "):
        studio.placement_for("turbo-max")
    p = studio.placement_for("cpu-bf16")
    assert p.device == "cpu" and p.dtype == torch.bfloat16


def test_no_t5_preset_drops_t5(tiny_family, tmp_path):
    placement = placement_from_preset(get_preset("no-t5"), "cpu", validate_on_cpu=True)
    manager = ModelManager(StudioConfig(data_dir=tmp_path), placement=placement)
    loaded = manager.load(str(tiny_family["sd3-medium"]))
    assert loaded.pipe.text_encoder_3 is None and loaded.pipe.tokenizer_3 is None
    assert loaded.pipe("x", num_inference_steps=1, height=256, width=256).images[0].size == (256, 256)


def test_changing_preset_reloads_what_it_changes(tiny_family, tmp_path):
    manager = ModelManager(StudioConfig(data_dir=tmp_path))
    folder = str(tiny_family["sd3-medium"])
    manager.load(folder, placement=placement_from_preset(get_preset("cpu-bf16"), "cpu"))
    loaded = manager.load(folder, placement=placement_from_preset(get_preset("t5-8bit"), "cpu", validate_on_cpu=True))
    reloaded = set(loaded.fresh)
    assert "text_encoder_3" in reloaded, "T5 is reloaded in 8-bit"
    assert manager.current.placement.name == "t5-8bit"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bitsandbytes NF4 transformer)")
def test_nf4_transformer_loads_and_runs_on_cuda(tiny_family, tmp_path):
    placement = placement_from_preset(get_preset("nf4-t5-8bit"), "cuda")
    manager = ModelManager(StudioConfig(data_dir=tmp_path), placement=placement)
    loaded = manager.load(str(tiny_family["sd3.5-large"]))
    kinds = {type(m).__name__ for m in loaded.pipe.transformer.modules()}
    assert "Linear4bit" in kinds
    assert loaded.pipe("x", num_inference_steps=2, height=256, width=256).images[0].size == (256, 256)
