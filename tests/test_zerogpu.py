"""ZeroGPU's process model, offline: the stand-in (tests/zerogpu_standin/spaces) against the
behaviour of spaces 0.51 it copies, the GPU-time estimate, the progress/cancel channel across a
fork, and the studio in Space mode with the stand-in in this process — prepare here, infer in a
forked worker, save here. The same run through ``python app.py`` is in tests/test_space.py."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import pickle
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

STANDIN = Path(__file__).resolve().parent / "zerogpu_standin" / "spaces" / "__init__.py"


def load_standin(mp: pytest.MonkeyPatch, zero: bool = True, log: Path | None = None):
    """A fresh copy of the stand-in as ``spaces`` (it reads SPACES_ZERO_GPU at import, as spaces)."""
    if zero:
        mp.setenv("SPACES_ZERO_GPU", "1")
    else:
        mp.delenv("SPACES_ZERO_GPU", raising=False)
    if log is not None:
        mp.setenv("ZEROGPU_STANDIN_LOG", str(log))
    spec = importlib.util.spec_from_file_location("spaces", STANDIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    mp.setitem(sys.modules, "spaces", module)
    return module


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def standin(monkeypatch, tmp_path):
    module = load_standin(monkeypatch, log=tmp_path / "standin.log")
    yield module
    module.standin_shutdown()


# --- the stand-in is ZeroGPU's process model ---------------------------------------------------------

COUNTER = {"n": 0}


def test_standin_runs_each_call_in_a_forked_worker_whose_state_never_comes_back(standin, tmp_path):
    def bump(x):
        COUNTER["n"] += 1
        return os.getpid(), COUNTER["n"], x

    f = standin.GPU(bump, duration=lambda x: 10 + x)
    pid1, n1, _ = f(1)
    pid2, n2, _ = f(2)
    assert pid1 == pid2 != os.getpid()  # one worker, kept and reused
    assert (n1, n2) == (1, 2) and COUNTER["n"] == 0  # the worker's state stays in the worker
    COUNTER["n"] = 100  # the main process changes after the fork …
    assert f(3)[1] == 3  # … never reach the worker
    COUNTER["n"] = 0
    calls = [e for e in read_log(tmp_path / "standin.log") if e["event"] == "call"]
    assert [(c["duration"], c["fresh"]) for c in calls] == [(11.0, True), (12.0, False), (13.0, False)]
    assert standin.GPU(bump, duration=5) is f  # decorated once, as spaces caches it


def test_standin_refuses_what_zerogpu_cannot_carry(standin):
    import gradio as gr
    import torch

    with pytest.raises(gr.Error, match="PicklingError"):  # the lock the first try returned
        standin.GPU(lambda: {"result": threading.RLock()})()
    with pytest.raises(gr.Error, match="DeviceTensorReturned"):  # spaces would hang on a CUDA tensor
        standin.GPU(lambda: {"images": [torch.zeros(2, device="meta")]})()
    assert standin.GPU(lambda: torch.ones(2))().tolist() == [1.0, 1.0]  # CPU tensors travel

    def fails():
        raise ValueError("the message the user needed")

    with pytest.raises(gr.Error) as info:  # only the class name reaches the caller, as in spaces
        standin.GPU(fails)()
    assert info.value.message == "ValueError" and "the message" not in str(info.value)

    def says():
        raise gr.Error("a gr.Error keeps its message")

    with pytest.raises(gr.Error, match="keeps its message"):
        standin.GPU(says)()
    with pytest.raises(pickle.PicklingError):  # arguments are pickled in the caller
        standin.GPU(lambda lock: None)(threading.Lock())
    with pytest.raises(gr.Error, match="larger than the maximum allowed"):
        standin.GPU(lambda: None, duration=301)()


def test_standin_is_effect_free_without_zero_gpu(monkeypatch):
    module = load_standin(monkeypatch, zero=False)

    def f():
        return os.getpid()

    assert module.GPU(f) is f and module.GPU(duration=30)(f) is f and f() == os.getpid()


def test_standin_worker_retires_on_sigterm_after_the_call_in_flight(standin):
    import signal

    def slow(s):
        time.sleep(s)
        return os.getpid()

    f = standin.GPU(slow)
    pid = f(0)
    result = []
    t = threading.Thread(target=lambda: result.append(f(0.5)))
    t.start()
    time.sleep(0.2)
    os.kill(pid, signal.SIGTERM)  # mid-call: the call still finishes …
    t.join(20)
    assert result == [pid]
    deadline = time.time() + 10
    while pid in standin.standin_workers() and time.time() < deadline:
        time.sleep(0.05)
    assert pid not in standin.standin_workers()  # … then the worker is gone
    assert f(0) != pid  # and the next call forks a fresh one


# --- the GPU time a request asks for ----------------------------------------------------------------


def _facts(variant: str) -> dict:
    from studio.app.spaces import facts_from_config
    from studio.catalog import get_variant
    from studio.memory.bytes import component_params

    return facts_from_config(get_variant(variant).transformer_config, component_params(variant)["transformer"])


def _work(steps=28, size=1024, batch_size=1, batch_count=1, cfg=True, slg=0.0, variant="sd3.5-large", hires=None):
    passes = [{"name": "base", "calls": steps, "width": size, "height": size}]
    if hires:
        passes.append({"name": "hires", "calls": hires[0], "width": hires[1], "height": hires[1]})
    return {"variant": variant, "tiny": False, "batch_size": batch_size, "batch_count": batch_count, "cfg": cfg,
            "slg_fraction": slg, "text_tokens": 333, "passes": passes,
            "placement": {"name": "full", "device": "cuda", "resident": True}}


def test_estimate_follows_the_request_within_zerogpus_limits():
    from studio.app.spaces import MAX_CALL_S, OVERHEAD_S, estimate, forward_flops

    large, medium = _facts("sd3.5-large"), _facts("sd3.5-medium")
    # the FLOP count: 8.06 B params × 4429 tokens (+ attention) for SD3.5 Large at 1024²
    assert 4.0e13 < forward_flops(large, 1024, 1024) < 4.6e13
    one = estimate(_work(), large)
    assert 30 <= one.seconds <= 60 and not one.measured and 0.4 < one.step_s < 0.9
    assert estimate(_work(steps=4, cfg=False, variant="sd3.5-large-turbo"), large).seconds < one.seconds
    assert estimate(_work(steps=40, slg=0.19, variant="sd3.5-medium"), medium).seconds < one.seconds
    assert estimate(_work(steps=40, slg=0.19), large).seconds > estimate(_work(steps=40), large).seconds
    four = estimate(_work(batch_count=4), large)
    assert four.seconds - OVERHEAD_S == pytest.approx(4 * (one.seconds - OVERHEAD_S), abs=4)
    assert estimate(_work(size=1344), large).seconds > one.seconds
    # the hook for a hires pass: its own entry adds its steps at its size
    assert estimate(_work(hires=(14, 1536)), large).seconds > one.seconds + 10
    # too long for one call: refused with the field to lower and what fits
    big = estimate(_work(batch_count=12), large)
    assert not big.fits(MAX_CALL_S)
    err = big.too_long(MAX_CALL_S)
    assert err.field == "batch_count" and "more than the 300 s one ZeroGPU call may take" in str(err)
    fit = int(str(err).split("batch count to ")[1].split(" ")[0])
    assert estimate(_work(batch_count=fit), large).fits(MAX_CALL_S)
    assert not estimate(_work(batch_count=fit + 1), large).fits(MAX_CALL_S)
    assert estimate(_work(batch_size=8, steps=60), large).too_long(MAX_CALL_S).field == "batch_size"


def test_a_measured_figure_replaces_the_prior():
    from studio.app.spaces import MARGIN_MEASURED, GpuFigures, estimate, measured_throughput

    large, work = _facts("sd3.5-large"), _work(batch_count=2)
    prior = estimate(work, large)
    out = {"images": [{}, {}], "timings": {"total_s": 60.0}, "cancelled": False}  # a slow GPU: 30 s a run
    figures = GpuFigures()
    figures.record(work, measured_throughput(work, large, out))
    figures.record(work, measured_throughput(work, large, {**out, "timings": {"total_s": 20.0}}))
    again = estimate(work, large, figures.throughput(work))
    assert again.measured and again.margin == MARGIN_MEASURED
    assert again.compute_s == pytest.approx(60.0, rel=0.01)  # the slowest measurement is kept
    assert again.seconds > prior.seconds
    assert measured_throughput(work, large, {**out, "cancelled": True}) is None  # a cancelled run says nothing
    assert figures.throughput(_work(variant="sd3.5-medium")) is None  # per model


# --- the channel crosses the fork --------------------------------------------------------------------


def _child_sends_and_waits(address, cancel_path, ready):
    import torch

    from studio.app.spaces import FileCancel, ProgressSender
    from studio.engine.request import ProgressEvent

    torch.set_num_threads(1)
    sender = ProgressSender(address, "job1")
    sender.every = 0.0
    latents = torch.randn(1, 16, 8, 8)
    for step in range(1, 4):
        sender.progress(ProgressEvent(step, 10, 0, 1, latents, 0.1 * step))
    ready.set()
    token = FileCancel(cancel_path)
    deadline = time.time() + 20
    while not token.cancelled and time.time() < deadline:
        time.sleep(0.02)
    os._exit(0 if token.cancelled else 3)


def test_progress_previews_and_cancel_cross_the_process_boundary():
    from studio.app.spaces import ProgressChannel
    from studio.engine.request import CancelToken

    channel = ProgressChannel()
    events = []
    token = CancelToken()
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    try:
        with channel.job("job1", on_progress=events.append, cancel=token):
            child = ctx.Process(target=_child_sends_and_waits,
                                args=(channel.address, str(channel.cancel_path("job1")), ready))
            child.start()
            assert ready.wait(30)
            token.cancel()  # the Cancel button, in the main process
            child.join(30)
        assert child.exitcode == 0  # the worker saw the cancel
        assert [(e.step, e.steps, e.latents) for e in events] == [(1, 10, None), (2, 10, None), (3, 10, None)]
        assert all(e.preview is not None and e.preview.size == (256, 256) for e in events)
        assert not channel.cancel_path("job1").exists()  # cleaned after the job
        with channel.job("job2"):  # a job's datagrams go to that job only
            pass
    finally:
        channel.close()
    assert not channel.dir.exists()


# --- the studio in Space mode on ZeroGPU (the stand-in, in this process) ------------------------------


@pytest.fixture(scope="module")
def zero_space(tmp_path_factory, tiny_family):
    from studio.app.spaces import build_space, space_config
    from tests.test_security import _link_tiny

    tmp = tmp_path_factory.mktemp("zero")
    log = tmp / "standin.log"
    with pytest.MonkeyPatch.context() as mp:
        module = load_standin(mp, log=log)
        for k, v in {"SPACE_ID": "tester/sd35-studio", "SD35_STUDIO_DEMO": "1",
                     "SD35_STUDIO_DATA_DIR": str(tmp / "data"), "HF_HUB_OFFLINE": "1"}.items():
            mp.setenv(k, v)
        config = space_config()
        _link_tiny(config.data_dir, tiny_family)
        studio, _demo, _kwargs = build_space(config)
        try:
            yield SimpleNamespace(studio=studio, spaces=module, log=log)
        finally:
            module.standin_shutdown()
            studio.gpu_runner.channel.close()


def _calls(log: Path) -> list[dict]:
    return [e for e in read_log(log) if e["event"] == "call"]


def _req(**kw):
    from studio.engine.request import build_request

    return build_request({"prompt": "a zero fox", "steps": 2, "width": 256, "height": 256, "seed": 1, **kw})


def test_loading_happens_here_and_the_worker_only_computes(zero_space, capfd):
    studio = zero_space.studio
    assert studio.gpu_runner is not None and studio.current is not None  # loaded at start-up, here
    loads = []
    inner = studio.models.load
    studio.models.load = lambda *a, **k: loads.append(os.getpid()) or inner(*a, **k)
    try:
        before = len(_calls(zero_space.log))
        first = studio.generate(_req(seed=1))
        second = studio.generate(_req(seed=2, prompt="a second fox"))
    finally:
        studio.models.load = inner
    assert loads == []  # no load in this process …
    assert "inside a GPU worker" not in capfd.readouterr().err  # … nor in the worker
    calls = _calls(zero_space.log)[before:]
    assert len(calls) == 2 and calls[0]["worker"] == calls[1]["worker"] != os.getpid()
    assert all(16 <= c["duration"] <= 300 for c in calls)  # the dynamic duration, within the limits
    for result, seed in ((first, 1), (second, 2)):
        assert [i.seed for i in result.images] == [seed] and result.images[0].id  # saved here, afterwards
    assert studio.gallery.get(second.images[0].id).metadata["prompt"] == "a second fox"


def test_the_engine_result_holds_a_lock_and_infer_returns_plain_values(zero_space):
    """The issue's first try returned ``Engine.generate``'s result: its gallery futures hold locks."""
    studio = zero_space.studio
    result = studio.engine.generate(_req(seed=3))  # in this process (as the CLI does)
    with pytest.raises(TypeError, match="pickle"):
        pickle.dumps(result)
    result.wait_saved()
    count = studio.gallery.count()
    prepared = studio.prepare(_req(seed=4))
    pickle.dumps(prepared)  # what goes into the worker
    plain = studio.infer(prepared)
    assert pickle.loads(pickle.dumps(plain))["images"][0]["seed"] == 4
    assert zero_space.spaces._device_tensor(plain) is None
    assert studio.gallery.count() == count  # infer saved nothing


def test_a_switch_happens_here_and_a_stale_worker_is_replaced(zero_space, capfd):
    studio = zero_space.studio
    studio.generate(_req(seed=5))
    old = _calls(zero_space.log)[-1]["worker"]
    studio.load_model(variant="sd3.5-large")  # in this process, under the manager's lock
    out = capfd.readouterr().out
    assert "model load: SD3.5 Large (tiny demo)" in out and "read from disk: transformer (" in out  # shared reused
    try:
        result = studio.generate(_req(seed=6))
        assert result.images[0].metadata["variant"] == "sd3.5-large"
        calls = _calls(zero_space.log)[-2:]
        assert calls[0]["worker"] == old and calls[1]["worker"] != old and calls[1]["fresh"]
        assert old not in zero_space.spaces.standin_workers()  # the stale worker retired itself
        assert "holds an older model state" in capfd.readouterr().out
    finally:
        studio.load_model(variant="sd3.5-medium")


def test_progress_previews_and_cancel_reach_the_jobs_wrapper(zero_space):
    from studio.ui.jobs import Jobs

    jobs = Jobs(zero_space.studio)
    request = SimpleNamespace(session_hash="zero-session", username=None)
    updates = []
    stream = jobs.stream(_req(seed=7, steps=30, batch_count=3), request)
    for u in stream:
        updates.append(u)
        if u.kind == "progress" and u.event.run == 0 and u.event.step == 5:
            assert jobs.cancel(request) == 1
    done = updates[-1]
    progress = [u for u in updates if u.kind == "progress"]
    assert done.kind == "done" and done.result.cancelled and len(done.result.images) < 3
    assert len(progress) >= 5 and progress[0].event.steps == 30 and progress[0].event.latents is None
    assert any(u.preview is not None for u in progress)  # made in the worker, shown here
    assert not any(zero_space.studio.gpu_runner.channel.dir.joinpath("cancel").iterdir())


def test_a_hires_pass_runs_in_the_worker_and_counts_in_the_duration(zero_space):
    from studio.errors import ValidationError

    studio = zero_space.studio
    plain = studio.prepare(_req(steps=4))
    hires = studio.prepare(_req(steps=4, hires_scale=1.5, hires_steps=4))
    assert [p["name"] for p in hires["work"]["passes"]] == ["base", "hires"]
    assert hires["work"]["passes"][1]["width"] == 384
    runner = studio.gpu_runner
    assert runner.estimate(hires["work"]).compute_s > runner.estimate(plain["work"]).compute_s
    result = studio.generate(_req(seed=12, steps=4, hires_scale=1.5, hires_steps=4))
    assert result.images[0].image.size == (384, 384) and result.images[0].metadata["hires_size"] == [384, 384]
    with pytest.raises(ValidationError, match="hires pass runs on the loaded model") as info:
        studio.generate(_req(hires_scale=1.5, hires_variant="sd3.5-large"))
    assert info.value.field == "hires_variant"


def test_a_worker_missing_what_the_request_needs_is_stale(zero_space):
    studio = zero_space.studio
    prepared = studio.prepare(_req(seed=13))
    assert studio.holds(prepared["needs"])
    assert not studio.holds({**prepared["needs"], "loras": ["a-lora-loaded-after-the-fork"]})
    assert not studio.holds({"controlnets": ["a-controlnet"]}) and not studio.holds({"upscalers": ["0" * 64]})
    assert studio.infer({**prepared, "needs": {"loras": ["a-lora-loaded-after-the-fork"]}}) == {"stale": True}
    assert studio.infer({**prepared, "state": ("sd3.5-large",)}) == {"stale": True}


def test_errors_in_the_worker_keep_their_message_and_field(zero_space, monkeypatch):
    from studio.errors import GenerationError, ValidationError

    studio = zero_space.studio
    zero_space.spaces.standin_shutdown()  # the next worker forks from the patched engine below

    def out_of_memory(*a, **k):
        raise GenerationError("Out of GPU memory at 256×256: try a smaller size.")

    monkeypatch.setattr(studio.engine, "_run", out_of_memory)
    try:
        with pytest.raises(GenerationError, match="Out of GPU memory at 256×256"):
            studio.generate(_req(seed=8))
    finally:
        monkeypatch.undo()
        zero_space.spaces.standin_shutdown()
    with pytest.raises(ValidationError) as info:  # refused here, before any GPU is asked for
        studio.generate(_req(width="abc"))
    assert info.value.field == "width"


def test_a_request_too_long_for_one_call_is_refused_before_asking(zero_space, monkeypatch):
    from studio.app.spaces import GpuFigures, forward_flops
    from studio.errors import ValidationError

    runner = zero_space.studio.gpu_runner
    req = _req(steps=50, batch_count=40, guidance=4.0, slg="off")
    work = zero_space.studio.prepare(req)["work"]
    # a GPU measured at 1 s a step: a run of 50 steps costs 62.5 s with the margin
    figures = GpuFigures()
    figures.record(work, 2 * forward_flops(runner.facts(), 256, 256, work["text_tokens"]))
    monkeypatch.setattr(runner, "figures", figures)
    monkeypatch.setenv("SD35_STUDIO_ZEROGPU_MAX_S", "200")
    before = len(_calls(zero_space.log))
    with pytest.raises(ValidationError, match="one ZeroGPU call may take") as info:
        zero_space.studio.generate(req)
    assert info.value.field == "batch_count" and "batch count to 2 (that fits)" in str(info.value)
    assert "50 steps of ≈1.00 s measured on this Space" in str(info.value)
    assert len(_calls(zero_space.log)) == before  # nothing was asked of ZeroGPU


def test_zerogpus_own_errors_reach_the_page_as_they_were_said(zero_space, monkeypatch):
    import gradio as gr

    from studio.ui.jobs import Jobs

    def quota(payload):
        raise gr.Error("You have exceeded your free ZeroGPU quota (30s requested vs. 12s left). Try again in 0:05:00.")

    monkeypatch.setattr(zero_space.studio.gpu_runner, "call", quota)
    with pytest.raises(gr.Error, match="exceeded your free ZeroGPU quota"):
        list(Jobs(zero_space.studio).stream(_req(seed=9), SimpleNamespace(session_hash="q", username=None)))


# --- elsewhere: the local path and dedicated GPU Spaces ---------------------------------------------


def test_the_local_path_forks_nothing_and_pickles_nothing(studio, monkeypatch, tmp_path):
    module = load_standin(monkeypatch, log=tmp_path / "standin.log")
    monkeypatch.setattr(type(studio), "prepare", lambda *a, **k: pytest.fail("the local path must not prepare"))
    monkeypatch.setattr(pickle, "dumps", lambda *a, **k: pytest.fail("the local path must not pickle"))
    result = studio.generate(_req(seed=10))
    monkeypatch.undo()
    assert studio.gpu_runner is None and result.images[0].id and not _calls(tmp_path / "standin.log")
    assert module.standin_workers() == []


def test_a_dedicated_gpu_space_runs_in_one_process(monkeypatch, tmp_path, tiny_family):
    from studio.app.spaces import build_space, space_config
    from studio.hardware import detect_hardware
    from tests.test_security import _link_tiny

    module = load_standin(monkeypatch, zero=False, log=tmp_path / "standin.log")  # spaces installed, no ZeroGPU
    monkeypatch.setenv("SPACE_ID", "tester/sd35-studio")
    monkeypatch.setenv("SD35_STUDIO_DEMO", "1")
    monkeypatch.setenv("SD35_STUDIO_DATA_DIR", str(tmp_path / "data"))
    config = space_config()
    _link_tiny(config.data_dir, tiny_family)
    studio, _, _ = build_space(config)
    assert studio.gpu_runner is None and studio.current is not None
    result = studio.generate(_req(seed=11))
    assert result.images[0].id and not _calls(tmp_path / "standin.log") and module.standin_workers() == []
    # the planner sees the card as on any machine: an L4 / A10G (24 GB) and an L40S (48 GB)
    studio.config.demo = False
    l4 = studio.placement_for("auto", "sd3.5-large", hardware=detect_hardware(vram_gb=22.5, ram_gb=30))
    l40s = studio.placement_for("auto", "sd3.5-large", hardware=detect_hardware(vram_gb=44.5, ram_gb=62))
    assert (l4.name, l40s.name) == ("model-offload", "full") and l40s.resident and not l4.resident
