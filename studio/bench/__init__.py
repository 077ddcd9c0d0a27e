"""Benchmarks that print ratios: ``python -m studio.bench [--json] [--quick] [--only NAME ...]``.

Every ratio is measured side by side in one process (interleaved repeats, medians), never
against a number from another run, so it holds on a busy shared machine too:

- ``overhead_ratio``     studio ``Engine.generate`` (validation, prompt cache, gallery save)
                         ÷ a bare diffusers pipeline call, same model and settings. Goal ≤ 1.03.
- ``swap_shared_ratio``  switching to a variant that shares encoders + VAE ÷ a cold load.
- ``swap_cached_ratio``  switching back to a variant still in the RAM cache ÷ a cold load. Goal ≤ 0.10.
- ``prompt_cache_ratio`` a repeat prompt's encode time with the cache ÷ without; plus
                         ``prompt_cache_hit_encoder_passes`` (goal 0).
- ``startup_ratio``      ``launch.py --demo`` time to first HTTP 200 ÷ a bare gradio Blocks
                         hello-world started the same way. Goal ≤ 1.5.
- ``gallery_page_ms`` / ``gallery_search_ms``  one page / one search over 10,000 entries. Goal ≤ 50 ms.
- ``reconcile_start_ratio`` ``launch.py --demo`` time to first HTTP 200 with a 10,000-image
                         gallery (reconciled at every start: index and files brought into
                         agreement) ÷ with an empty one. Goal ≤ 1.25; plus ``reconcile_s``, the
                         reconcile of a consistent 10,000-image gallery in-process.
- ``stepcache_<mode>_*`` the step cache (``studio.engine.stepcache``, Speed fast / faster) on the
                         trained demo model (``studio.demo.trained_folder()``; the tiny random
                         family until it ships) at 28 steps, each against the same image uncached:
                         ``_skipped`` (fraction of transformer passes cached; goal for fast ≥ 0.35),
                         ``_time_ratio`` (wall time cached ÷ uncached), ``_mad_255`` (mean
                         absolute pixel difference, in 0–255 steps; goal for fast ≤ 4).
- ``compile_ratio``      steady-state transformer forward time with ``torch.compile``d blocks
                         (``studio.engine.compile``, inductor) ÷ eager, on the CPU; plus
                         ``compile_first_s`` (the first, compiling call).

The GPU benchmark (full-size architectures, presets, peak VRAM vs the planner) is
``python -m studio.bench_gpu``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository (launch.py)
GOALS = {
    "overhead_ratio": ("<=", 1.03),
    "swap_cached_ratio": ("<=", 0.10),
    "prompt_cache_ratio": ("<=", 0.10),
    "prompt_cache_hit_encoder_passes": ("==", 0),
    "startup_ratio": ("<=", 1.5),
    "gallery_page_ms": ("<=", 50.0),
    "gallery_search_ms": ("<=", 50.0),
    "reconcile_start_ratio": ("<=", 1.25),
    "stepcache_fast_skipped": (">=", 0.35),
    "stepcache_fast_mad_255": ("<=", 4.0),
}
STEPCACHE_PROMPTS = (
    "a red circle on a blue background",
    "a small green square at the top left on a white background",
    "a big yellow triangle on a black background",
    "a purple circle on the right on a grey background",
)


def _median_pair(a, b, repeat: int) -> tuple[float, float]:
    """Time two callables alternately; return their median seconds."""
    ta, tb = [], []
    for i in range(repeat):
        for fn, out in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def bench_overhead(family: dict, work: Path, repeat: int, size: int, steps: int) -> dict:
    """``overhead_ratio``: ``Engine.generate`` ÷ a bare pipeline call on the same model and settings
    (medians of ``repeat`` interleaved runs)."""
    import torch

    from studio.config import StudioConfig
    from studio.engine import Engine, GenerationRequest
    from studio.gallery import Gallery
    from studio.models import ModelManager

    config = StudioConfig(data_dir=work / "overhead")
    config.ensure_dirs()
    engine = Engine(ModelManager(config), Gallery(config.data_dir))
    engine.models.load(str(family["sd3.5-large"]))
    pipe = engine.models.current.pipe
    prompt = "a red fox in the snow, photograph"
    req = GenerationRequest(prompt, steps=steps, guidance=3.5, seed=1, width=size, height=size)

    def studio():
        engine.generate(req)

    def bare():
        pipe(prompt, num_inference_steps=steps, guidance_scale=3.5, height=size, width=size,
             generator=torch.Generator().manual_seed(1))

    studio(), bare()  # warm up
    t_studio, t_bare = _median_pair(studio, bare, repeat)
    return {"overhead_ratio": t_studio / t_bare, "overhead_studio_s": t_studio, "overhead_bare_s": t_bare}


def bench_swap(family: dict, work: Path, repeat: int) -> dict:
    """``swap_shared_ratio`` and ``swap_cached_ratio``: a switch to Turbo (shared encoders + VAE) and
    back to Large (RAM cache), each ÷ a cold load."""
    from studio.config import StudioConfig
    from studio.models import ModelManager

    config = StudioConfig(data_dir=work / "swap")
    warm = ModelManager(config)
    warm.load(str(family["sd3.5-large"]))  # fill the hash cache and the OS page cache

    def cold():
        ModelManager(config).load(str(family["sd3.5-large-turbo"]))

    shared_times, cached_times, cold_times = [], [], []
    for _ in range(repeat):
        manager = ModelManager(config)
        manager.load(str(family["sd3.5-large"]))
        t0 = time.perf_counter()
        manager.load(str(family["sd3.5-large-turbo"]))  # shares encoders + VAE
        shared_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        manager.load(str(family["sd3.5-large"]))  # back: its transformer is in the RAM cache
        cached_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        cold()
        cold_times.append(time.perf_counter() - t0)
    t_cold = statistics.median(cold_times)
    return {
        "swap_shared_ratio": statistics.median(shared_times) / t_cold,
        "swap_cached_ratio": statistics.median(cached_times) / t_cold,
        "swap_cold_s": t_cold,
    }


def bench_prompt_cache(family: dict, work: Path, repeat: int) -> dict:
    """``prompt_cache_ratio``: a repeat prompt's encode with the cache ÷ without; and the encoder
    passes a cache hit still makes (goal 0)."""
    from studio.config import StudioConfig
    from studio.engine import Engine, PromptCache
    from studio.models import ModelManager

    manager = ModelManager(StudioConfig(data_dir=work / "cache"))
    loaded = manager.load(str(family["sd3.5-large"]))
    pipe = loaded.pipe
    passes = {"n": 0}
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name)
        module.register_forward_hook(lambda *a: passes.__setitem__("n", passes["n"] + 1))
    cached = Engine(manager)
    uncached = Engine(manager, prompt_cache=PromptCache(max_entries=0))
    from studio.engine import GenerationRequest

    r = cached.prepare(GenerationRequest("a red fox in the snow, photograph", negative_prompt="blurry"), loaded)
    cached.encode(pipe, loaded, r, True)  # the miss that fills the cache
    passes["n"] = 0
    cached.encode(pipe, loaded, r, True)
    hit_passes = passes["n"]
    t_hit, t_miss = _median_pair(lambda: cached.encode(pipe, loaded, r, True),
                                 lambda: uncached.encode(pipe, loaded, r, True), repeat)
    return {"prompt_cache_ratio": t_hit / t_miss, "prompt_cache_hit_encoder_passes": hit_passes}


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _time_to_200(cmd: list[str], port: int, env: dict, timeout: float = 120) -> float:
    import urllib.request

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    try:
        while time.perf_counter() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode} before serving")
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).status == 200:
                    return time.perf_counter() - t0
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{' '.join(cmd)} did not answer within {timeout}s")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


HELLO = """
import sys, gradio as gr
with gr.Blocks() as demo:
    gr.Markdown("hello")
demo.launch(server_port=int(sys.argv[1]), server_name="127.0.0.1")
"""


def bench_startup(work: Path, repeat: int) -> dict:
    """``startup_ratio``: ``launch.py --demo`` time to first HTTP 200 ÷ a bare Gradio hello-world's."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    data = work / "startup"
    # build the demo family once, outside the timing: startup never builds models anyway
    from studio.demo.tiny import build_tiny_family

    build_tiny_family(data / "models" / "tiny")

    def studio():
        port = _free_port()
        return _time_to_200([sys.executable, str(ROOT / "launch.py"), "--demo", "--port", str(port),
                             "--data-dir", str(data)], port, env)

    def hello():
        port = _free_port()
        return _time_to_200([sys.executable, "-c", HELLO, str(port)], port, env)

    ts, th = [], []
    for i in range(repeat):
        pair = (studio, hello) if i % 2 == 0 else (hello, studio)
        for fn in pair:
            (ts if fn is studio else th).append(fn())
    s, h = statistics.median(ts), statistics.median(th)
    return {"startup_ratio": s / h, "startup_studio_s": s, "startup_hello_s": h}


def bench_reconcile(work: Path, repeat: int, n: int = 10_000) -> dict:
    """``reconcile_start_ratio``: ``launch.py --demo`` time to first HTTP 200 with an ``n``-image
    gallery (reconciled at start, #12) ÷ with an empty one — plus ``reconcile_s``, the reconcile
    itself in-process."""
    from studio.bench.gallery import build_data_dir, reconcile_run
    from studio.demo.tiny import build_tiny_family

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    empty, full = work / "reconcile-empty", work / "reconcile-full"
    for data in (empty, full):
        build_tiny_family(data / "models" / "tiny")  # outside the timing: a start never builds models
    build_data_dir(full, n)

    def start(data: Path) -> float:
        port = _free_port()
        return _time_to_200([sys.executable, str(ROOT / "launch.py"), "--demo", "--port", str(port),
                             "--data-dir", str(data)], port, env)

    te, tf = [], []
    for i in range(repeat):
        for data in ((empty, full) if i % 2 == 0 else (full, empty)):
            (te if data is empty else tf).append(start(data))
    e, f = statistics.median(te), statistics.median(tf)
    inproc = reconcile_run(n, work / "reconcile-inproc", repeat=3)
    return {"reconcile_start_ratio": f / e, "reconcile_start_s": f, "plain_start_s": e, **inproc}


def stepcache_model(work: Path) -> tuple[Path, str]:
    """The model the step cache is measured on: the trained demo model when it ships, else the
    tiny random family's SD3.5 Medium (its first block's residual behaves unlike a trained one's)."""
    from studio.demo import DemoAssetsError, trained_folder

    try:
        return trained_folder(), "trained demo (assets/demo)"
    except DemoAssetsError:
        from studio.demo.tiny import build_tiny_family

        folder = build_tiny_family(work / "family-stepcache", variants=["sd3.5-medium"])["sd3.5-medium"]
        return folder, "tiny random sd3.5-medium (no trained demo model in assets/demo yet)"


def bench_stepcache(work: Path, steps: int = 28, prompts=STEPCACHE_PROMPTS, modes=("fast", "faster"),
                    model: Path | None = None) -> dict:
    """Each mode (a Speed setting or a threshold) against the very same generation uncached (same
    prompt, seed, steps), timed in alternating order; see the module docstring for the keys.
    ``model``: a pipeline folder to measure instead (threshold calibration)."""
    import numpy as np
    import torch

    from studio.config import StudioConfig
    from studio.engine.stepcache import StepCache
    from studio.models import ModelManager

    folder, label = (model, str(model)) if model else stepcache_model(work)
    pipe = ModelManager(StudioConfig(data_dir=work / "stepcache")).load(str(folder)).pipe
    side = int(pipe.transformer.config.sample_size) * 8
    variant_cfg = 4.5

    def image(prompt, speed):
        with StepCache(pipe.transformer, speed) as cache:
            t0 = time.perf_counter()
            out = pipe(prompt, num_inference_steps=steps, guidance_scale=variant_cfg, height=side, width=side,
                       generator=torch.Generator().manual_seed(1), output_type="np").images[0]
            seconds = time.perf_counter() - t0
        return out, seconds, cache.stats

    image(prompts[0], "off")  # warm-up
    results: dict = {"stepcache_model": label, "stepcache_steps": steps, "stepcache_size": side}
    exact = {}
    for mode in modes:
        t_off, t_on, mads, cached, passes = [], [], [], 0, 0
        for i, prompt in enumerate(prompts):
            order = ("off", mode) if i % 2 == 0 else (mode, "off")
            for speed in order:
                out, seconds, stats = image(prompt, speed)
                if speed == "off":
                    t_off.append(seconds)
                    exact.setdefault(prompt, out)
                else:
                    t_on.append(seconds)
                    cached, passes = cached + stats.skipped, passes + stats.passes
                    on = out
            mads.append(float(np.abs(on.astype(np.float64) - exact[prompt].astype(np.float64)).mean() * 255))
        results[f"stepcache_{mode}_skipped"] = cached / max(passes, 1)
        results[f"stepcache_{mode}_time_ratio"] = statistics.median(t_on) / statistics.median(t_off)
        results[f"stepcache_{mode}_mad_255"] = statistics.mean(mads)
    return results


def bench_compile(work: Path, repeat: int, backend: str = "inductor") -> dict:
    """Steady-state transformer forward, compiled blocks ÷ eager, on the CPU (the trained demo
    model's transformer when it ships, else the tiny family's)."""
    import copy

    import torch

    from studio.engine.compile import compile_transformer

    folder, label = stepcache_model(work)
    from diffusers import SD3Transformer2DModel

    eager = SD3Transformer2DModel.from_pretrained(str(folder), subfolder="transformer").eval()
    compiled = copy.deepcopy(eager)
    cfg = eager.config
    g = torch.Generator().manual_seed(0)
    side = cfg.sample_size
    inputs = dict(hidden_states=torch.randn(2, cfg.in_channels, side, side, generator=g),
                  encoder_hidden_states=torch.randn(2, 77 + 256, cfg.joint_attention_dim, generator=g),
                  pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=g),
                  timestep=torch.tensor([500.0, 500.0]), return_dict=False)
    compile_transformer(compiled, backend=backend)

    def call(model):
        def run():
            with torch.no_grad():
                model(**inputs)
        return run

    t0 = time.perf_counter()
    call(compiled)()
    first = time.perf_counter() - t0
    call(eager)()
    t_compiled, t_eager = _median_pair(call(compiled), call(eager), repeat)
    torch._dynamo.reset()
    return {"compile_model": label, "compile_backend": backend, "compile_first_s": first,
            "compile_eager_ms": t_eager * 1000, "compile_ms": t_compiled * 1000,
            "compile_ratio": t_compiled / t_eager}


def bench_gallery(n: int) -> dict:
    """One page and one search over an ``n``-entry gallery index, in ms (:func:`studio.bench.gallery.run`)."""
    from studio.bench.gallery import run

    r = run(n=n)
    return {"gallery_page_ms": r["page_ms"], "gallery_search_ms": r["search_ms"], "gallery_entries": n}


def _verdict(key: str, value) -> str:
    if key not in GOALS:
        return ""
    op, goal = GOALS[key]
    ok = value <= goal if op == "<=" else value >= goal if op == ">=" else value == goal
    return f"{op} {goal:g}  {'ok' if ok else 'MISSED'}"


def format_table(results: dict) -> str:
    """The results as a plain-text table: measure, value, and the verdict against its goal."""
    lines = [f"{'measure':36} {'value':>10}  goal"]
    for key, value in results.items():
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:36} {shown:>10}  {_verdict(key, value)}")
    return "\n".join(lines)


BENCHES = ("overhead", "swap", "cache", "startup", "gallery", "reconcile", "stepcache", "compile")


def run(only: list[str] | None = None, quick: bool = False, work: Path | None = None) -> dict:
    """Run the benchmarks in ``only`` (default: all) in ``work`` (default: a temp dir) and return
    their figures; ``quick``: smaller models, fewer repeats."""
    from studio.logs import quiet_libraries
    from studio.demo.tiny import build_tiny_family

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_libraries()
    repeat = 3 if quick else 7
    want = set(only or BENCHES)
    tmp = None
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="studio-bench-")
        work = Path(tmp.name)
    try:
        results: dict = {}
        family = None
        if want & {"overhead", "swap", "cache"}:
            # big enough to time: transformers of tens of MB, T5 about half of Large's
            family = build_tiny_family(work / "family", variants=["sd3.5-large", "sd3.5-large-turbo"],
                                       scale=1 if quick else 4)
        if "overhead" in want:
            results.update(bench_overhead(family, work, repeat, size=256 if quick else 384, steps=4))
        if "swap" in want:
            results.update(bench_swap(family, work, repeat))
        if "cache" in want:
            results.update(bench_prompt_cache(family, work, repeat * 3))
        if "startup" in want:
            results.update(bench_startup(work, 1 if quick else 3))
        if "gallery" in want:
            results.update(bench_gallery(1000 if quick else 10_000))
        if "reconcile" in want:
            results.update(bench_reconcile(work, 1 if quick else 3, 1000 if quick else 10_000))
        if "stepcache" in want:
            results.update(bench_stepcache(work, steps=8 if quick else 28,
                                           prompts=STEPCACHE_PROMPTS[:1] if quick else STEPCACHE_PROMPTS))
        if "compile" in want:  # quick: the eager backend (the same code without the C++ build)
            results.update(bench_compile(work, repeat, backend="eager" if quick else "inductor"))
        return results
    finally:
        if tmp:
            tmp.cleanup()


def main(argv=None) -> int:
    """``python -m studio.bench``: run and print the table (or JSON); exit status 0."""
    p = argparse.ArgumentParser(prog="python -m studio.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print a JSON object of the ratios")
    p.add_argument("--quick", action="store_true", help="smaller models and fewer repeats (for tests)")
    p.add_argument("--only", nargs="+", choices=list(BENCHES))
    args = p.parse_args(argv)
    results = run(args.only, args.quick)
    if args.json:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}, indent=2))
    else:
        print(format_table(results))
    return 0

