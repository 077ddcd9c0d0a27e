"""The model manager: sources, safety, sharing by content, swap, failure recovery, Hub errors."""

import json
import shutil

import pytest

from studio.config import StudioConfig
from studio.models import HUB_ALLOW, ModelError, ModelManager, parse_source


@pytest.fixture
def manager(tmp_path):
    return ModelManager(StudioConfig(data_dir=tmp_path / "data"))


def test_parse_source(tiny_family, tmp_path):
    folder = tiny_family["sd3-medium"]
    assert parse_source(str(folder)).kind == "folder"
    assert parse_source("stabilityai/stable-diffusion-3.5-large").kind == "hub"
    assert parse_source("sd3.5-large").ref == "stabilityai/stable-diffusion-3.5-large"
    st = tmp_path / "sd3.5_medium.safetensors"
    st.write_bytes(b"")
    assert parse_source(str(st)).kind == "file"
    for bad, words in [
        ("model.ckpt", "pickled checkpoint"),
        ("weights.bin", "pickled checkpoint"),
        (str(tmp_path), "no model_index.json"),
        (str(tmp_path / "nope"), "No such folder or file"),
        ("", "No model given"),
        ("not a model", "No such folder or file: not a model.*a Hub id such as"),
    ]:
        with pytest.raises(ModelError, match=words):
            parse_source(bad)


def test_swap_reloads_only_the_transformer(manager, tiny_family):
    first = manager.load(str(tiny_family["sd3.5-large"]))
    assert first.variant.name == "sd3.5-large" and first.is_tiny
    assert set(first.fresh) == {
        "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
        "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler",
    }
    second = manager.load(str(tiny_family["sd3.5-large-turbo"]))
    assert list(second.fresh) == ["transformer"], "encoders, tokenizers, VAE, scheduler reused"
    assert second.variant.name == "sd3.5-large-turbo"
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        assert getattr(second.pipe, name) is getattr(first.pipe, name), name
    assert second.pipe.transformer is not first.pipe.transformer
    # back to Large: its transformer is still in the RAM cache — nothing is read from disk
    third = manager.load(str(tiny_family["sd3.5-large"]))
    assert third.fresh == () and third.pipe.transformer is first.pipe.transformer


def test_identity_is_by_content_not_by_path(manager, tiny_family, tmp_path):
    copy = tmp_path / "copy-of-medium"
    shutil.copytree(tiny_family["sd3.5-medium"], copy)
    manager.load(str(tiny_family["sd3.5-medium"]))
    assert manager.load(str(copy)).fresh == (), "an identical copy elsewhere is recognised by its hashes"
    # change one byte of a weight file: that component (and only it) is loaded again
    from safetensors.torch import load_file, save_file

    vae_file = next((copy / "vae").glob("*.safetensors"))
    tensors = load_file(vae_file)
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1
    save_file(tensors, vae_file, metadata={"format": "pt"})
    assert list(manager.load(str(copy)).fresh) == ["vae"]


def test_hashes_are_cached_across_managers(tiny_family, tmp_path, monkeypatch):
    from studio.models.identity import HashCache

    hashed = []
    real = HashCache._digest
    monkeypatch.setattr(HashCache, "_digest", staticmethod(lambda path: hashed.append(path) or real(path)))
    config = StudioConfig(data_dir=tmp_path / "data")
    a = ModelManager(config)
    a.load(str(tiny_family["sd3-medium"]))
    assert hashed, "files are hashed the first time"
    hashed.clear()
    b = ModelManager(config)
    b.load(str(tiny_family["sd3-medium"]))
    assert hashed == [], "unchanged files are not hashed again"


def test_failed_load_keeps_the_previous_model(manager, tiny_family, tmp_path):
    good = manager.load(str(tiny_family["sd3-medium"]))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_family["sd3.5-medium"], broken)
    weights = next((broken / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated download
    with pytest.raises(ModelError, match="Could not load transformer"):
        manager.load(str(broken))
    assert manager.current is good
    assert good.pipe("x", num_inference_steps=1, height=256, width=256, output_type="pil").images


def test_foreign_pipeline_is_refused_clearly(manager, tiny_family, tmp_path):
    other = tmp_path / "flux"
    shutil.copytree(tiny_family["sd3-medium"], other)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "FluxPipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="FluxPipeline, not a Stable Diffusion 3 pipeline"):
        manager.load(str(other))


def test_pickle_only_component_is_refused(manager, tiny_family, tmp_path):
    other = tmp_path / "pickled"
    shutil.copytree(tiny_family["sd3-medium"], other)
    for f in (other / "vae").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ModelError, match=".safetensors only"):
        manager.load(str(other))


def test_availability_without_weights_never_touches_the_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    manager = ModelManager(StudioConfig(data_dir=tmp_path / "d"))
    ok, message = manager.availability("sd3.5-large")
    assert not ok
    assert "https://huggingface.co/stabilityai/stable-diffusion-3.5-large" in message
    assert "hf auth login" in message and "--demo" in message


@pytest.mark.parametrize(
    "error, words",
    [
        ("GatedRepoError", "is gated: accept its licence"),
        ("RepositoryNotFoundError", "No repo"),
        ("LocalEntryNotFoundError", "could not be reached"),
    ],
)
def test_hub_errors_teach(manager, monkeypatch, error, words):
    import huggingface_hub
    import huggingface_hub.errors as errors

    seen = {}

    def fake_snapshot_download(repo_id, **kwargs):
        seen.update(kwargs)
        cls = getattr(errors, error)
        if error == "LocalEntryNotFoundError":
            raise cls("offline")
        import httpx

        response = httpx.Response(401 if error == "GatedRepoError" else 404,
                                  request=httpx.Request("GET", "https://hub.invalid"))
        raise cls("nope", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(ModelError, match=words):
        manager.load("stabilityai/stable-diffusion-3.5-large")
    assert seen["allow_patterns"] == HUB_ALLOW and "*.bin" in seen["ignore_patterns"]
    assert manager.current is None


def test_ram_cache_is_bounded_least_recently_used_first(tiny_family, tmp_path):
    from studio.models.manager import _module_bytes

    probe = ModelManager(StudioConfig(data_dir=tmp_path / "probe"))
    one_transformer = _module_bytes(probe.load(str(tiny_family["sd3.5-large"])).pipe.transformer)
    # room for about one transformer that is not in use
    manager = ModelManager(StudioConfig(data_dir=tmp_path / "d"), cache_bytes=int(one_transformer * 1.5))
    for name in ("sd3.5-large", "sd3.5-large-turbo", "sd3-medium"):
        manager.load(str(tiny_family[name]))
    assert manager.load(str(tiny_family["sd3.5-large-turbo"])).fresh == ()  # the most recent idle one: cached
    assert list(manager.load(str(tiny_family["sd3.5-large"])).fresh) == ["transformer"]  # the oldest: evicted


def test_progress_reaches_the_caller(manager, tiny_family):
    seen = []
    manager.load(str(tiny_family["sd3-medium"]), progress=lambda m, f: seen.append((m, f)))
    assert seen[0][0].startswith("Loading") and seen[-1] == ("Ready", 1.0)
    assert all(f is None or 0 <= f <= 1 for _, f in seen)


def test_a_swap_never_interleaves_with_a_generation(demo_config, tiny_family):
    import threading
    import time

    from studio.engine import Engine, GenerationRequest

    engine = Engine(ModelManager(demo_config))
    engine.models.load(str(tiny_family["sd3.5-medium"]))
    events = []
    in_step = threading.Event()

    def on_progress(ev):
        in_step.set()
        events.append(("step", ev.step))
        time.sleep(0.05)

    gen = threading.Thread(target=engine.generate, args=(
        GenerationRequest("x", steps=8, seed=1, width=256, height=256, variant="sd3.5-medium"),),
        kwargs={"on_progress": on_progress})
    gen.start()
    assert in_step.wait(60)
    engine.models.load(str(tiny_family["sd3-medium"]))  # must wait for the generation
    events.append(("swapped", None))
    gen.join(60)
    assert events[-1] == ("swapped", None) and [e for e in events if e[0] == "step"][-1] == ("step", 8)


def test_hub_download_progress_reaches_the_caller(manager, tiny_family, monkeypatch):
    import huggingface_hub

    def fake_snapshot_download(repo_id, tqdm_class=None, **kwargs):
        bar = tqdm_class(total=4 * 2**30, disable=True)
        for _ in range(4):
            bar.update(2**30)
        bar.close()
        return str(tiny_family["sd3.5-large"])  # as if this were the cached snapshot

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    seen = []
    loaded = manager.load("stabilityai/stable-diffusion-3.5-large", progress=lambda m, f: seen.append((m, f)))
    downloads = [(m, f) for m, f in seen if m.startswith("Downloading")]
    assert downloads[-1] == ("Downloading stabilityai/stable-diffusion-3.5-large: 4.00 of 4.00 GB", 0.5)
    assert loaded.source.kind == "hub" and loaded.variant.name == "sd3.5-large"


def test_a_4bit_t5_this_cpu_cannot_run_is_refused_with_the_fix(tiny_family, tmp_path, monkeypatch):
    """AVX512-BF16 CPUs run bitsandbytes' 4-bit layers through a packed kernel that needs outputs in
    multiples of 32: a T5 whose shapes miss that is refused at load, naming the layers and the fix
    (simulated: this CPU's flag is patched; the real kernel assertion is proven in test_tiny.py)."""
    import json

    from transformers import T5Config, T5EncoderModel

    from studio.memory import get_preset
    from studio.models import placement_from_preset

    odd = tmp_path / "odd-t5"
    shutil.copytree(tiny_family["sd3-medium"], odd)
    cfg = json.loads((odd / "text_encoder_3" / "config.json").read_text())
    shutil.rmtree(odd / "text_encoder_3")
    T5EncoderModel(T5Config(**{**cfg, "d_ff": 37})).save_pretrained(odd / "text_encoder_3")
    placement = placement_from_preset(get_preset("nf4-t5-4bit-offload"), "cpu", validate_on_cpu=True)
    placement.component_kwargs.pop("transformer")  # the NF4 transformer stops at the GPU boundary anyway
    monkeypatch.setattr("studio.models.manager._has_avx512bf16", lambda: True)
    manager = ModelManager(StudioConfig(data_dir=tmp_path / "d"), placement=placement)
    with pytest.raises(ModelError, match=r"text_encoder_3 cannot run in 4-bit on this CPU: .*wi_0 \(\d+→37\).*t5-8bit"):
        manager.load(str(odd))
    assert manager.current is None
    monkeypatch.setattr("studio.models.manager._has_avx512bf16", lambda: False)
    assert manager.load(str(odd)).pipe.text_encoder_3 is not None, "elsewhere the same T5 loads"
