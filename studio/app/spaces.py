"""Running as a Hugging Face Space (``app.py`` at the repo root is the entry file).

**Space mode** (``SPACE_ID`` is set on every Space): the studio is ``shared`` (a gallery per
browser session, catalog models only, no token field, no unload), the data dir is
``/data/sd35-studio`` on persistent storage or a temp dir, it listens on
``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT`` (0.0.0.0:7860), and the catalog's default variant
(``SD35_STUDIO_DEMO=1``: the offline demo family) is **loaded at start-up, in the main process,
before** ``launch()`` — placed where ``Studio.placement_for`` says, like every load. Nothing is
generated at start-up (no examples are cached).

**ZeroGPU** is on when ``SPACES_ZERO_GPU`` is true — the variable the ``spaces`` package itself
reads (``spaces/config.py``); without it ``spaces.GPU`` returns the function untouched
(``spaces/zero/decorator.py``). What spaces 0.51 does there, read from its sources, and what the
studio does about it:

* ``import spaces`` (before torch: ``app.py``) patches torch in the main process
  (``zero/torch/patching.py``): CUDA looks available — an H200 MIG slice, 70 GB — and
  ``.to("cuda")`` makes stand-in tensors whose data stays on the CPU. At ``launch()``
  (``zero/__init__.py`` → ``gradio.one_launch`` → ``torch.pack``) every such tensor is packed to
  disk; a GPU worker moves them onto the real GPU when it starts (``torch.move``), and tensors
  put on "cuda" after launch are moved from RAM the same way. So the planner sees the 70 GB card,
  chooses the resident "full" preset, and the model is loaded and placed on "cuda" here, before
  launch, as ZeroGPU expects.
* every ``@spaces.GPU`` call runs in a **forked worker** (``zero/wrappers.py``: ``Worker``, fork
  context), kept and reused for later calls while it lives (when the scheduler answers
  ``idle``). Arguments and the return value are pickled through a queue; an exception other
  than ``gr.Error`` reaches the caller as ``gr.Error(<its class name>)``, its message lost; a
  CUDA tensor returned hangs. What the call changes stays in the worker; what the main process
  changes after the fork never reaches it.
* Gradio's progress and toasts are carried back by patching ``Queue.set_progress`` and
  ``log_message`` in the worker into events on the result queue (``zero/gradio.py``:
  ``patch_gradio_queue``); the request's context (event id, ``gr.Progress``) is pickled into the
  worker (``GradioPartialContext``). The visitor's quota follows the ``gr.Request`` of the calling
  context (``client.schedule``): ``studio/ui/jobs.py`` runs the engine in a copy of it.
* ``duration`` (seconds, a ``timedelta``, or a callable of the function's arguments; default 60,
  ``zero/client.py``) is what the call asks the scheduler for: more than the visitor has left
  fails with spaces' quota message, more than the most one call may last with "larger than the
  maximum allowed", and a longer ask lowers the visitor's place in the queue.

So on ZeroGPU a generation is three steps (``Studio.generate``): :meth:`Studio.prepare` here
(the model for the request's variant — a switch happens here, under the manager's lock,
reusing shared components as always — and its LoRA adapters are loaded in this process), then
:func:`_gpu_generate` in the worker (``Studio.infer``: a plain payload in; PIL images, seeds,
metadata dicts and notes out — nothing saved, no lock, no CUDA tensor), then ``Studio.save``
here (the gallery). Work that must stick happens here, or is redone cheaply in the worker: the
prompt cache fills per worker (re-encoding a prompt costs milliseconds on the GPU), the LoRA
weights and the scheduler are set per call from the request, as locally.

* **Progress, previews, cancel** cross the boundary through a channel of our own that needs
  nothing from the fork (:class:`ProgressChannel`): the worker sends progress and a small JPEG
  preview as Unix datagrams to a socket the main process reads, never blocking (a datagram that
  cannot be sent is dropped); the Cancel button's token is mirrored into a flag file per job
  that the worker's engine checks between steps. Both live in a private (0700) temp folder.
* **A stale worker** — forked before the main process switched variant, or before it loaded a
  LoRA, ControlNet or upscaler the request needs — answers "stale" (``Studio.infer``:
  ``Studio.model_state`` and ``Studio.holds``), nothing having run, and retires itself; the call
  is made once more, on a fresh worker forked from the current state. A hires pass on another
  variant is refused here: that model would have to load inside the call.
* **The duration** is computed from the request (:func:`estimate`): the transformer's FLOPs per
  forward at the request's size (from the loaded model's own parameter count and config), times
  the model calls (steps, CFG, Skip Layer Guidance, batch, runs; a hires pass adds its own
  entry), over a throughput — a prior until this Space has measured its own, then the slowest of
  its last measurements — plus the VAE decode, a margin and a fixed overhead (the worker's start,
  which moves the weights onto the GPU). A request over ``SD35_STUDIO_ZEROGPU_MAX_S`` (300 s: the
  most one ZeroGPU call may ask for) is refused before anything is asked, naming the field to
  lower.

**Dedicated GPU Spaces** (L4, A10G, L40S, A100) do not set ``SPACES_ZERO_GPU``: one process, the
local path (``Engine.generate``), the planner sees the real card.
"""

from __future__ import annotations

import atexit
import io
import json
import logging
import math
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from studio.catalog import VAE_FACTOR
from studio.config import on_space  # noqa: F401 — part of this module's interface

log = logging.getLogger(__name__)

TRUE = ("1", "true", "yes", "on")

# --- the duration: what a request asks ZeroGPU for -------------------------------------------
MAX_CALL_S = 300  # the most one ZeroGPU call may ask for (the maintainers' figure; spaces itself has no limit)
OVERHEAD_S = 15  # a fresh worker's start (it moves every weight onto the GPU: ~27 GB for Large) + warm-up
PRIOR_FLOPS_PER_S = 1.4e14  # effective bf16 FLOP/s assumed for a ZeroGPU slice until this Space measured its own
DECODE_S_PER_MP = 0.5  # VAE decode, seconds per megapixel image (prior; folded into the measured figure)
MARGIN_PRIOR = 1.5  # on the compute while the throughput is the prior …
MARGIN_MEASURED = 1.25  # … and once it is this Space's own
MEASUREMENTS_KEPT = 8
TEXT_TOKENS = 77 + 256  # CLIP + T5 at the default max_sequence_length

# --- the channel -------------------------------------------------------------------------------
DATAGRAM_MAX = 60_000  # a preview larger than this is not sent (progress still is)
FLUSH_S = 2.0  # how long the main process waits for a job's last datagrams after the call
RETIRE_WAIT_S = 10.0  # how long a stale worker may take to exit before the call is made again


def demo_requested() -> bool:
    """``SD35_STUDIO_DEMO`` asks for the offline demo family ("1", "true", "yes" or "on", any case)."""
    return os.environ.get("SD35_STUDIO_DEMO", "").strip().lower() in TRUE


def zero_gpu() -> bool:
    """ZeroGPU hardware: ``SPACES_ZERO_GPU`` is "1", "t" or "true" (any case) — the rule of
    ``spaces.config.Settings``. Dedicated GPU Spaces and local runs do not set it."""
    value = os.environ.get("SPACES_ZERO_GPU")
    return value is not None and value.lower() in ("1", "t", "true")


def max_call_s() -> int:
    """The most GPU time one generation may ask for (``SD35_STUDIO_ZEROGPU_MAX_S`` lowers it)."""
    try:
        value = int(os.environ.get("SD35_STUDIO_ZEROGPU_MAX_S", MAX_CALL_S))
    except ValueError:
        value = MAX_CALL_S
    return max(OVERHEAD_S + 1, value)


def gpu(fn=None, *, duration=60):
    """``spaces.GPU(fn, duration=duration)`` where the ``spaces`` package exists, else ``fn``.

    Usable as ``gpu(fn, duration=...)`` or as a decorator ``@gpu(duration=...)``; ``duration``
    may be a callable of ``fn``'s arguments (spaces' dynamic duration)."""
    if fn is None:
        return lambda f: gpu(f, duration=duration)
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn, duration=duration)


# --- the data dir and the config -------------------------------------------------------------


def space_data_dir(persistent: str | os.PathLike = "/data") -> Path:
    """``<persistent>/sd35-studio`` when the Space has persistent storage (the folder exists and
    is writable), else a folder in the temp dir (the Space's disk is ephemeral anyway)."""
    root = Path(persistent)
    if root.is_dir() and os.access(root, os.W_OK | os.X_OK):
        target = root / "sd35-studio"
        try:
            target.mkdir(parents=True, exist_ok=True)
            return target
        except OSError:
            pass
    return Path(tempfile.gettempdir()) / "sd35-studio"


def space_config():
    """The StudioConfig of a Space run (``SD35_STUDIO_DATA_DIR`` still wins for the data dir)."""
    from studio.config import StudioConfig

    data_dir = os.environ.get("SD35_STUDIO_DATA_DIR") or space_data_dir()
    return StudioConfig(
        data_dir=data_dir,
        demo=demo_requested(),
        demo_weights="trained",
        host=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
        port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
    )


# --- the GPU time a request asks for ---------------------------------------------------------


def transformer_facts(pipe) -> dict:
    """What the FLOP count needs from a loaded pipeline: the transformer's parameters, layers,
    width, dual-attention layers and patch size, and the VAE's scale."""
    t = pipe.transformer
    cfg = t.config
    return {
        "params": int(sum(p.numel() for p in t.parameters())),
        "layers": int(cfg.num_layers),
        "inner_dim": int(cfg.num_attention_heads) * int(cfg.attention_head_dim),
        "dual_layers": len(cfg.get("dual_attention_layers", None) or ()),
        "patch": int(cfg.patch_size),
        "vae_scale": int(getattr(pipe, "vae_scale_factor", VAE_FACTOR) or VAE_FACTOR),
    }


def facts_from_config(config: dict, params: int) -> dict:
    """:func:`transformer_facts` for a catalog config (no weights loaded)."""
    return {"params": int(params), "layers": int(config["num_layers"]),
            "inner_dim": int(config["num_attention_heads"]) * int(config["attention_head_dim"]),
            "dual_layers": len(config.get("dual_attention_layers") or ()), "patch": int(config.get("patch_size", 2)),
            "vae_scale": VAE_FACTOR}


def forward_flops(facts: dict, width: int, height: int, text_tokens: int = TEXT_TOKENS,
                  extra_params: int = 0) -> float:
    """FLOPs of one transformer forward of one image: every token through its stream's half of
    the weights (2 FLOPs a multiply-add: ``params × tokens``), the joint attention over all tokens
    (``4·T²·d`` per layer) and SD3.5 Medium's extra image self-attention (``4·T_img²·d``).
    ``extra_params``: ControlNets running beside it, counted the same way (their attention aside)."""
    side = facts["vae_scale"] * facts["patch"]
    image = (int(width) // side) * (int(height) // side)
    tokens = image + int(text_tokens)
    d = facts["inner_dim"]
    return ((facts["params"] + extra_params) * tokens + 4.0 * facts["layers"] * tokens ** 2 * d
            + 4.0 * facts["dual_layers"] * image ** 2 * d)


def _pass_cost(work: dict, facts: dict, index: int, p: dict) -> tuple[float, float]:
    """(forwards per model call, FLOPs per forward) of pass ``index``: the batch, twice with CFG,
    Skip Layer Guidance's extra forward over its window and the ControlNets in the first pass."""
    batch = max(1, int(work.get("batch_size", 1)))
    forwards = batch * (2 if work.get("cfg") else 1)
    extra = 0
    if index == 0:
        forwards += batch * float(work.get("slg_fraction", 0.0))
        extra = int(work.get("control_params", 0))
    return forwards, forward_flops(facts, p["width"], p["height"], work.get("text_tokens", TEXT_TOKENS), extra)


@dataclass
class Estimate:
    """The GPU time a request asks for, and how it was reached."""

    seconds: int  # what the call asks ZeroGPU for
    compute_s: float  # the estimated compute (before margin and overhead)
    step_s: float  # seconds per step of the first pass (the whole batch, CFG included)
    run_s: float  # seconds per run (compute only)
    runs: int
    margin: float
    measured: bool  # the throughput is this Space's own measurement (else the prior)
    work: dict = field(default_factory=dict)

    def fits(self, limit: int) -> bool:
        """Whether the asked duration is within ``limit`` seconds."""
        return self.seconds <= limit

    def too_long(self, limit: int):
        """The ValidationError that says so, naming the field to lower and what would fit."""
        from studio.errors import ValidationError

        w = self.work
        base = w["passes"][0]
        fit_runs = int((limit - OVERHEAD_S) // (self.margin * self.run_s)) if self.run_s > 0 else 0
        field_name, hint = "steps", "Lower the steps or the size."
        if w.get("batch_count", 1) > 1 and fit_runs >= 1:
            field_name, hint = "batch_count", (f"Lower the batch count to {fit_runs} (that fits), or the steps or "
                                               "size.")
        elif w.get("batch_size", 1) > 1:
            field_name, hint = "batch_size", "Lower the batch size, or the steps or size."
        how = "measured on this Space" if self.measured else "estimated"
        return ValidationError(
            f"This request needs about {self.seconds} s of GPU time ({self.runs} run(s) × "
            f"{w.get('batch_size', 1)} image(s) at {base['width']}×{base['height']}, {base['calls']} steps of "
            f"≈{self.step_s:.2f} s {how}, with margin) — more than the {limit} s one ZeroGPU call may take. {hint}",
            field_name)


def estimate(work: dict, facts: dict, flops_per_s: float | None = None) -> Estimate:
    """The duration of a prepared request (``work`` from ``Studio.prepare``) on a model with
    ``facts`` (:func:`transformer_facts`). ``flops_per_s`` None: the prior.

    seconds = OVERHEAD_S + margin × runs × (Σ passes calls × forwards × FLOPs ÷ throughput
    + decode), with forwards per call = batch × (2 with CFG) (+ batch × the Skip Layer Guidance
    window's share, first pass) and decode = batch × the last pass's megapixels × DECODE_S_PER_MP.
    A hires fix is a second entry in ``work["passes"]`` (``Studio.prepare``)."""
    measured = flops_per_s is not None
    throughput = flops_per_s if measured else PRIOR_FLOPS_PER_S
    margin = MARGIN_MEASURED if measured else MARGIN_PRIOR
    batch = max(1, int(work.get("batch_size", 1)))
    runs = max(1, int(work.get("batch_count", 1)))
    run_s = 0.0
    step_s = None
    last = None
    for i, p in enumerate(work["passes"]):
        forwards, flops = _pass_cost(work, facts, i, p)
        s = forwards * flops / throughput
        step_s = s if step_s is None else step_s
        run_s += p["calls"] * s
        last = p
    run_s += batch * (last["width"] * last["height"] / 1e6) * DECODE_S_PER_MP
    compute = runs * run_s
    seconds = int(math.ceil(OVERHEAD_S + margin * compute))
    return Estimate(seconds, compute, step_s or 0.0, run_s, runs, margin, measured, work)


def measured_throughput(work: dict, facts: dict, out: dict) -> float | None:
    """FLOP/s a finished call achieved: the work of its finished runs over the engine's time in
    the worker, the decode prior taken out. None when it says nothing (cancelled, no images)."""
    images = out.get("images") or ()
    total = float((out.get("timings") or {}).get("total_s") or 0.0)
    batch = max(1, int(work.get("batch_size", 1)))
    if out.get("cancelled") or not images or total <= 0:
        return None
    runs = len(images) / batch
    flops = 0.0
    for i, p in enumerate(work["passes"]):
        forwards, per_forward = _pass_cost(work, facts, i, p)
        flops += p["calls"] * forwards * per_forward
    last = work["passes"][-1]
    decode = runs * batch * (last["width"] * last["height"] / 1e6) * DECODE_S_PER_MP
    denoise = max(total - decode, 0.1 * total)
    return runs * flops / denoise


class GpuFigures:
    """The throughput this Space measured, per model (variant, tiny, preset): the last few calls'
    figures; the estimate uses the slowest (a duration too short gets the call aborted; one too
    long only costs queue priority)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._seen: dict[tuple, deque] = {}

    @staticmethod
    def key(work: dict) -> tuple:
        """The model a measurement belongs to: (variant, tiny, preset name)."""
        return (work.get("variant"), bool(work.get("tiny")), (work.get("placement") or {}).get("name"))

    def throughput(self, work: dict) -> float | None:
        """The slowest FLOP/s measured for this request's model, or None before any measurement."""
        with self._lock:
            seen = self._seen.get(self.key(work))
            return min(seen) if seen else None

    def record(self, work: dict, value: float | None) -> None:
        """Keep a finished call's FLOP/s (the last ``MEASUREMENTS_KEPT`` per model); None or ≤ 0 is ignored."""
        if value is None or value <= 0:
            return
        with self._lock:
            self._seen.setdefault(self.key(work), deque(maxlen=MEASUREMENTS_KEPT)).append(value)


# --- the channel: progress and previews out of the worker, cancel into it ---------------------


def _encode(job: str, kind: str, info: dict, extra: bytes = b"") -> bytes:
    return json.dumps({"job": job, "kind": kind, **info}).encode() + b"\n" + extra


def _decode(data: bytes) -> tuple[dict, bytes]:
    head, _, extra = data.partition(b"\n")
    return json.loads(head), extra


class FileCancel:
    """The worker's cancel token: set when the job's flag file exists (``CancelToken``'s
    interface: the engine reads ``cancelled`` between steps)."""

    def __init__(self, path: str):
        self.path = path

    @property
    def cancelled(self) -> bool:
        """Whether the main process asked to cancel (the flag file exists)."""
        return os.path.exists(self.path)


class ProgressSender:
    """The worker's end of the channel: a datagram per step (a JPEG preview at most every
    ``PREVIEW_EVERY_S``), never blocking the run."""

    def __init__(self, address: str, job: str):
        from studio.ui.jobs import PREVIEW_EVERY_S

        self.address = address
        self.job = job
        self.every = PREVIEW_EVERY_S
        self._last = 0.0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)

    def progress(self, ev) -> None:
        """Send one step's progress (with a JPEG preview when one is due); an ``on_progress`` callback."""
        info = {"step": ev.step, "steps": ev.steps, "run": ev.run, "runs": ev.runs, "elapsed_s": ev.elapsed_s}
        extra = b""
        now = time.monotonic()
        if ev.latents is not None and ev.step < ev.steps and now - self._last >= self.every:
            self._last = now
            extra = _preview_jpeg(ev.latents)
        self._send("progress", info, extra)

    def _send(self, kind: str, info: dict, extra: bytes = b"") -> None:
        data = _encode(self.job, kind, info, extra)
        for attempt in (data, _encode(self.job, kind, info) if extra else None):
            if attempt is None or len(attempt) > DATAGRAM_MAX + 1024:
                continue
            try:
                self._sock.sendto(attempt, self.address)
                return
            except OSError:  # full (the reader is behind), too large, or the main process is gone
                continue

    def close(self) -> None:
        """Close the worker's socket."""
        self._sock.close()


def _preview_jpeg(latents) -> bytes:
    """The cheap latent preview as JPEG bytes (b"" when it cannot be made or is too large)."""
    from studio.engine.preview import latents_to_preview

    try:
        buf = io.BytesIO()
        latents_to_preview(latents).save(buf, format="JPEG", quality=80)
        data = buf.getvalue()
        return data if len(data) <= DATAGRAM_MAX else b""
    except Exception:  # noqa: BLE001 — a preview is never worth failing a step
        return b""


class ProgressChannel:
    """The main process's end: a Unix datagram socket read by one thread, which hands each job's
    progress (a ``ProgressEvent`` with ``latents=None`` and a decoded ``preview``) to the job's
    ``on_progress``; and a folder of cancel flags. Both in a private temp folder."""

    def __init__(self, root: str | None = None):
        base = root or (tempfile.gettempdir() if len(tempfile.gettempdir()) < 60 else "/tmp")
        self.dir = Path(tempfile.mkdtemp(prefix="sd35-zerogpu-", dir=base))  # mode 0700
        (self.dir / "cancel").mkdir()
        self.address = str(self.dir / "progress.sock")
        self._pid = os.getpid()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.address)
        self._handlers: dict[str, object] = {}
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="zerogpu-progress", daemon=True)
        self._reader.start()
        atexit.register(self.close)  # the main process's exit (workers leave through os._exit)

    def cancel_path(self, job: str) -> Path:
        """The flag file whose existence cancels ``job`` in the worker."""
        return self.dir / "cancel" / job

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(DATAGRAM_MAX + 4096)
            except OSError:
                return  # closed
            try:
                info, extra = _decode(data)
            except ValueError:
                continue
            with self._lock:
                handler = self._handlers.get(str(info.get("job")))
            if handler is not None:
                try:
                    handler(info, extra)
                except Exception:  # noqa: BLE001 — a listener's failure never stops the reader
                    log.exception("progress listener failed")

    @contextmanager
    def job(self, job: str, on_progress=None, cancel=None):
        """Listen for ``job``'s progress and mirror ``cancel`` into its flag file while the block
        runs; at the end, wait (at most ``FLUSH_S``) until its last datagrams were handed on."""
        from studio.engine.request import ProgressEvent

        flushed = threading.Event()
        done = threading.Event()

        def handle(info, extra):
            if info.get("kind") == "end":
                flushed.set()
            elif info.get("kind") == "progress" and on_progress is not None:
                ev = ProgressEvent(int(info["step"]), int(info["steps"]), int(info["run"]), int(info["runs"]),
                                   None, float(info.get("elapsed_s") or 0.0))
                ev.preview = _open_preview(extra)
                on_progress(ev)

        def mirror_cancel():
            while not done.wait(0.05):
                if cancel is not None and cancel.cancelled:
                    self.cancel_path(job).touch()
                    return

        with self._lock:
            self._handlers[job] = handle
        watcher = threading.Thread(target=mirror_cancel, name="zerogpu-cancel", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            done.set()
            try:  # the worker's datagrams were queued before the call returned: this one comes after
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                    s.settimeout(FLUSH_S)
                    s.sendto(_encode(job, "end", {}), self.address)
                flushed.wait(FLUSH_S)
            except OSError:
                pass
            with self._lock:
                self._handlers.pop(job, None)
            try:
                self.cancel_path(job).unlink()
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Close the socket and remove the channel's folder (in the main process only; a fork's copy
        leaves them)."""
        if os.getpid() != self._pid:  # a forked copy never removes the main process's channel
            return
        self._sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _open_preview(data: bytes):
    if not data:
        return None
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except Exception:  # noqa: BLE001 — a broken preview is just no preview
        return None


# --- the runner: what Studio.generate calls on ZeroGPU ----------------------------------------

_RUNNERS: dict[str, ZeroGpuRunner] = {}  # the worker finds its runner here (inherited by the fork)


def _gpu_generate(payload: dict) -> dict:
    """The GPU function (wrapped in ``spaces.GPU`` by :class:`ZeroGpuRunner`): runs in a ZeroGPU
    worker. Plain values in (the payload), plain values out (``Studio.infer``)."""
    runner = _RUNNERS.get(payload.get("runner"))
    if runner is None:
        return {"error": {"kind": "GenerationError", "message": "The GPU worker does not know this studio; reload "
                          "the page and try again."}}
    runner.enter_worker()
    sender = ProgressSender(payload["channel"], payload["job"])
    try:
        out = runner.studio.infer(payload, on_progress=sender.progress, cancel=FileCancel(payload["cancel"]))
    finally:
        sender.close()
    if out.get("stale") and os.getpid() != runner.main_pid:
        out["pid"] = os.getpid()
        _retire_this_worker()
    return out


def _gpu_duration(payload: dict) -> int:
    """spaces' dynamic duration: called with the GPU function's arguments, in the main process."""
    return int(payload["duration_s"])


def _retire_this_worker() -> None:
    """End this worker once its answer is sent: spaces' own SIGTERM handler closes the worker's
    argument queue (it exits after the call in flight); without one, exit shortly after."""
    handler = signal.getsignal(signal.SIGTERM)
    if callable(handler):
        os.kill(os.getpid(), signal.SIGTERM)
    else:
        threading.Timer(1.0, os._exit, (0,)).start()


def _wait_until_gone(pid: int | None, timeout: float = RETIRE_WAIT_S) -> None:
    """Wait until the worker ``pid`` has exited (it is one of this process's multiprocessing
    children, for spaces and for the tests' stand-in)."""
    if pid is None:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid not in {p.pid for p in multiprocessing.active_children()}:
            return
        time.sleep(0.05)


def _fresh_locks(studio) -> None:
    """In a new worker: a fork keeps only the thread that forked, so a lock another thread of
    the main process held at that moment would never be released here. The worker's own copies
    of the locks it takes (the model manager's, the prompt cache's, the hash cache's) start free."""
    rlock, lock = type(threading.RLock()), type(threading.Lock())
    objects = []
    if studio.is_built("models"):
        objects += [studio.models, getattr(studio.models, "hashes", None)]
    if studio.is_built("engine"):
        objects.append(getattr(studio.engine, "prompt_cache", None))
    for obj in objects:
        for name in ("lock", "_lock"):
            value = getattr(obj, name, None)
            if isinstance(value, rlock):
                setattr(obj, name, threading.RLock())
            elif isinstance(value, lock):
                setattr(obj, name, threading.Lock())


class ZeroGpuRunner:
    """``Studio.gpu_runner`` on ZeroGPU: estimates the GPU time, refuses what cannot fit, runs
    ``Studio.infer`` in a ZeroGPU worker (through ``spaces.GPU``) with the progress channel, and
    makes the call once more on a fresh worker when the first answered "stale"."""

    def __init__(self, studio, spaces_module):
        self.studio = studio
        self.main_pid = os.getpid()
        self.key = secrets.token_hex(8)
        self.channel = ProgressChannel()
        self.figures = GpuFigures()
        self._facts: dict[object, dict] = {}
        self._worker_pid = None
        _RUNNERS[self.key] = self
        # decorated before launch(): spaces reports its GPU functions when the app launches
        self.call = spaces_module.GPU(_gpu_generate, duration=_gpu_duration)

    # -- main process --

    def facts(self):
        """The loaded transformer's :func:`transformer_facts`, computed once per transformer."""
        current = self.studio.current
        ident = (current.identities.get("transformer") if current is not None else None) or id(current.pipe)
        if ident not in self._facts:
            self._facts[ident] = transformer_facts(current.pipe)
        return self._facts[ident]

    def estimate(self, work: dict) -> Estimate:
        """The GPU time a prepared request asks for, with this Space's measured throughput once it has one."""
        return estimate(work, self.facts(), self.figures.throughput(work))

    def check_placement(self, work: dict) -> None:
        """Offload hooks move weights at run time, which ZeroGPU's worker model does not allow:
        the model must stay resident (on "cuda", wherever CUDA shows — spaces makes it show on
        ZeroGPU; the tests' CPU stand-in has none)."""
        from studio.errors import ModelError

        placement = work.get("placement") or {}
        torch = sys.modules.get("torch")
        cuda = bool(torch is not None and torch.cuda.is_available())
        if not placement.get("resident", True) or (cuda and placement.get("device") != "cuda"):
            raise ModelError(
                f"On ZeroGPU the model must stay on the GPU: preset {placement.get('name')!r} "
                f"({placement.get('device')}) offloads or runs elsewhere. Load it with the preset 'auto' or 'full' in "
                "Models & Memory.")

    def __call__(self, prepared: dict, on_progress=None, cancel=None) -> dict:
        from studio.errors import GenerationError, ValidationError

        work = prepared["work"]
        self.check_placement(work)
        if work.get("hires_variant"):
            raise ValidationError(
                f"On ZeroGPU the hires pass runs on the loaded model: {work['hires_variant']} would have to load inside "
                "the GPU call, where it is lost when the call ends. Leave the hires model empty, or load that "
                "variant first (Models & Memory).", "hires_variant")
        est = self.estimate(work)
        limit = max_call_s()
        if not est.fits(limit):
            raise est.too_long(limit)
        job = secrets.token_hex(8)
        payload = {"request": prepared["request"], "state": prepared["state"], "needs": prepared.get("needs") or {},
                   "runner": self.key, "job": job,
                   "channel": self.channel.address, "cancel": str(self.channel.cancel_path(job)),
                   "duration_s": est.seconds}
        started = time.perf_counter()
        with self.channel.job(job, on_progress, cancel):
            out = self.call(payload)
            if out.get("stale"):
                print(f"ZeroGPU: worker {out.get('pid')} holds an older model state; retrying on a fresh worker",
                      flush=True)
                _wait_until_gone(out.get("pid"))
                out = self.call(payload)
                if out.get("stale"):
                    raise GenerationError("The GPU worker and this studio disagree on the loaded model (it changed "
                                          "while this request was starting). Generate again.")
        wall = time.perf_counter() - started
        value = measured_throughput(work, self.facts(), out)
        self.figures.record(work, value)
        if not out.get("error"):
            ran = (out.get("timings") or {}).get("total_s")
            print(f"ZeroGPU: asked {est.seconds} s, call {wall:.1f} s, engine {ran} s"
                  + (f", {value:.3g} FLOP/s measured" if value else ""), flush=True)
        return out

    # -- the worker --

    def enter_worker(self) -> None:
        """Once per worker process: fresh locks, and one CPU thread — after a fork that followed
        OpenMP work in the main process, torch's CPU thread pool hangs in the child (the GPU does
        the work there; what stays on the CPU is small)."""
        pid = os.getpid()
        if pid in (self.main_pid, self._worker_pid):
            return
        self._worker_pid = pid
        _fresh_locks(self.studio)
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(1)


# --- start-up --------------------------------------------------------------------------------


def log_loads(studio) -> None:
    """Print every model load (what it read from disk — ``LoadedModel.fresh`` — and how long it
    took) to the Space's log; a load inside a GPU worker, whose result is lost when the call
    ends, is printed as an error."""
    manager = studio.models
    inner = manager.load
    main_pid = os.getpid()

    def load(*args, **kwargs):
        started = time.perf_counter()
        loaded = inner(*args, **kwargs)
        fresh = ", ".join(loaded.fresh) or "nothing (every component shared)"
        line = (f"model load: {loaded.label} ({loaded.placement.name} on {loaded.placement.device}) read from disk: "
                f"{fresh} ({time.perf_counter() - started:.1f} s, pid {os.getpid()})")
        if os.getpid() == main_pid:
            print(line, flush=True)
        else:
            print("error: " + line + " — inside a GPU worker: lost when the call ends", file=sys.stderr, flush=True)
        return loaded

    manager.load = load


def preload(studio) -> tuple[bool, str]:
    """Load the default variant (the demo family's with ``SD35_STUDIO_DEMO=1``) now, in this
    process, with the placement the studio decides. A failure (no weights, no token, licence
    not accepted) is reported and the Space still starts: Generate then says what to do."""
    from studio.catalog import DEFAULT_VARIANT

    variant = studio.config.variant or DEFAULT_VARIANT
    try:
        loaded = studio.load_model(variant=variant)
    except Exception as e:  # noqa: BLE001 — the Space must come up and say why
        return False, f"{variant} not loaded at start-up: {e}"
    placement = loaded.placement
    torch = sys.modules.get("torch")
    cuda = bool(torch is not None and torch.cuda.is_available())
    if studio.gpu_runner is not None and (not placement.resident or (cuda and placement.device != "cuda")):
        log.warning("ZeroGPU: %s is placed with %s on %s; ZeroGPU needs it resident on cuda",
                    loaded.label, placement.name, placement.device)
    return True, f"{loaded.label} loaded at start-up ({placement.name} on {placement.device})"


def build_space(config=None):
    """(studio, demo, launch kwargs) for a Space run. The default model is loaded here, before
    ``launch()``; on ZeroGPU the GPU function is registered here too (``studio.gpu_runner``)."""
    from types import SimpleNamespace

    from studio.app.server import launch_kwargs
    from studio.logs import install_logging
    from studio.service import Studio
    from studio.ui.app import build_app, launch_options

    install_logging()
    config = config or space_config()
    studio = Studio(config, shared=True)
    studio.start()
    log_loads(studio)
    if zero_gpu():
        try:
            import spaces
        except ImportError:
            log.warning("SPACES_ZERO_GPU is set but the spaces package is missing: generating in this process")
        else:
            studio.gpu_runner = ZeroGpuRunner(studio, spaces)
    ok, message = preload(studio)
    print(("Model: " if ok else "No model yet: ") + message, flush=True)
    demo = build_app(studio)
    demo.queue(default_concurrency_limit=1, max_size=64)
    kwargs = launch_kwargs(config, SimpleNamespace())  # no share link, no auth (Space settings decide)
    kwargs.update(launch_options())
    return studio, demo, kwargs


def main() -> None:
    """Entry of ``app.py``."""
    from studio.app.server import launch
    from studio.logs import install_logging, quiet_libraries, redact_streams

    redact_streams()
    if os.environ.get("SD35_STUDIO_OFFLINE", "").strip().lower() in TRUE:
        os.environ["HF_HUB_OFFLINE"] = "1"
    quiet_libraries()
    _studio, demo, kwargs = build_space()
    install_logging()
    launch(demo, kwargs, share_requested=False)
