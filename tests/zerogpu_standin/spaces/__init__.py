"""A stand-in for Hugging Face's ``spaces`` package (ZeroGPU), for the studio's tests.

Put ``tests/zerogpu_standin`` on ``sys.path`` / ``PYTHONPATH`` and ``import spaces`` gets this.
It reproduces what decides whether an app works on ZeroGPU, as spaces 0.51 does it (read from
its wheel: ``spaces/config.py``, ``spaces/zero/decorator.py``, ``spaces/zero/wrappers.py``,
``spaces/zero/client.py``):

* ``GPU`` is effect-free unless ``SPACES_ZERO_GPU`` is true ("1", "t", "true"; read at import,
  as ``spaces.config.Settings``): on a dedicated GPU Space it returns the function itself.
* Each call runs in a **forked worker** (fork context). The worker is kept and reused for later
  calls while it lives (``workers[nvidia_index]`` when the scheduler answers ``idle``), so state
  changed in the worker is never seen by the main process, and state the main process changes
  after the fork never reaches the worker. A busy worker is not shared: a concurrent call gets
  its own (another GPU, on ZeroGPU).
* Arguments are pickled in the caller (an unpicklable one raises ``PicklingError`` there); the
  return value is pickled in the worker. A ``gr.Error`` raised in the worker reaches the caller
  as it is; any other exception — an unpicklable return value included — reaches it as
  ``gr.Error(<class name>, title="ZeroGPU worker error")``, its message lost (the traceback is
  printed in the main process, as spaces prints it). A worker that dies mid-call gives
  ``gr.Error("GPU task aborted")``.
* The task runs in a fresh thread of the worker (spaces submits it to a ThreadPoolExecutor), so
  a lock some thread of the main process held at the fork is held for ever in the worker.
* SIGTERM makes a worker close its argument queue (spaces: ``drop_params(arg_queue.close)``):
  it finishes the call in flight, then exits.
* ``duration``: seconds, a ``timedelta``, or a callable of the function's arguments; default 60.
  More than ``ZEROGPU_STANDIN_MAX_DURATION`` (default 300) is refused with spaces' message for
  an illegal duration (the scheduler's answer there).

Beyond spaces, for the tests: a return value holding a torch tensor that is not on the CPU is
refused (spaces hangs on CUDA tensors: they cannot cross the process boundary); a call that
gives no result within ``ZEROGPU_STANDIN_TIMEOUT`` seconds (default 600) is aborted; each
import, wrap and call is written as a JSON line to ``$ZEROGPU_STANDIN_LOG`` when it is set.

Not reproduced (there is no GPU here): the fake CUDA tensors of the main process, their packing
to disk at ``launch()`` and their move to the GPU when a worker starts; the scheduler, its queue
and the visitors' quotas; Gradio's progress and toasts relayed from the worker (spaces patches
``Queue.set_progress`` / ``log_message`` there). The studio relies on none of those relays.
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import json
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from functools import wraps
from pickle import PicklingError

__version__ = "0.51.0+standin"

DEFAULT_DURATION = 60  # spaces/zero/client.py DEFAULT_SCHEDULE_DURATION


def _boolean(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "t", "true")


ZERO_GPU = _boolean(os.environ.get("SPACES_ZERO_GPU"))
MAX_DURATION = float(os.environ.get("ZEROGPU_STANDIN_MAX_DURATION", "300"))
TIMEOUT = float(os.environ.get("ZEROGPU_STANDIN_TIMEOUT", "600"))

_ctx = multiprocessing.get_context("fork")
forked = False  # True inside a worker (spaces.zero.wrappers.forked)
_decorated: dict = {}
_all_workers: list = []


def _log(event: str, **fields) -> None:
    path = os.environ.get("ZEROGPU_STANDIN_LOG")
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n")


_log("import", torch_loaded="torch" in sys.modules, zero_gpu=ZERO_GPU)


def _gradio_error(message: str, title: str):
    import gradio as gr

    return gr.Error(message, title=title, print_exception=False)


class DeviceTensorReturned(RuntimeError):
    """The stand-in's own refusal: spaces would hang trying to send a CUDA tensor back."""


def _device_tensor(value, path: str = "result", seen: set | None = None, depth: int = 0) -> str | None:
    """Where in ``value`` a torch tensor off the CPU sits (a readable path), or None."""
    torch = sys.modules.get("torch")
    if torch is None or depth > 10:
        return None
    seen = set() if seen is None else seen
    if id(value) in seen:
        return None
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return f"{path} ({value.device.type})" if value.device.type != "cpu" else None
    if isinstance(value, (str, bytes, int, float, bool, type(None), type)):
        return None
    items = ()
    if isinstance(value, dict):
        items = ((f"{path}[{k!r}]", v) for k, v in value.items())
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    elif dataclasses.is_dataclass(value):
        items = ((f"{path}.{f.name}", getattr(value, f.name, None)) for f in dataclasses.fields(value))
    elif isinstance(getattr(value, "__dict__", None), dict) and not inspect.ismodule(value):
        items = ((f"{path}.{k}", v) for k, v in vars(value).items())
    for where, item in items:
        found = _device_tensor(item, where, seen, depth + 1)
        if found:
            return found
    return None


def _failure(exc: BaseException) -> tuple:
    """What the worker sends back for an exception (spaces' ExceptionResult)."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        import gradio as gr

        if isinstance(exc, gr.Error):
            return ("gradio_error", pickle.dumps(exc), text)
    except Exception:  # noqa: BLE001 — an unpicklable gr.Error falls through to the generic form
        pass
    return ("error", type(exc).__name__, text)


def _serve(task, args_r, res_w) -> None:
    """The worker's loop (spaces' ``thread_wrapper``)."""
    global forked
    forked = True
    signal.signal(signal.SIGTERM, lambda *_: args_r.close())
    while True:
        try:
            data = args_r.recv_bytes()
        except (OSError, EOFError, TypeError):
            break

        def run(data=data):
            try:
                args, kwargs = pickle.loads(data)
                value = task(*args, **kwargs)
                where = _device_tensor(value)
                if where:
                    raise DeviceTensorReturned(
                        f"the GPU function returned a torch tensor off the CPU at {where}: ZeroGPU cannot "
                        "send it back (spaces hangs); return CPU values")
                try:
                    return ("ok", pickle.dumps(value))
                except Exception as e:  # noqa: BLE001 — spaces turns these into PicklingError
                    raise PicklingError(str(e)) from e
            except Exception as e:  # noqa: BLE001 — sent to the caller
                return _failure(e)

        with ThreadPoolExecutor(1) as pool:
            result = pool.submit(contextvars.copy_context().run, run).result()
        try:
            res_w.send_bytes(pickle.dumps(result))
        except (OSError, ValueError):
            break


class _Aborted(Exception):
    pass


class _Worker:
    def __init__(self, task):
        args_r, self.args_w = _ctx.Pipe(duplex=False)
        self.res_r, res_w = _ctx.Pipe(duplex=False)
        self.process = _ctx.Process(target=_serve, args=(task, args_r, res_w), daemon=True)
        self.process.start()
        args_r.close()  # the worker's ends: a dead worker then reads as EOF here
        res_w.close()
        _all_workers.append(self)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.is_alive()

    def call(self, data: bytes) -> tuple:
        try:
            self.args_w.send_bytes(data)
        except OSError as e:
            raise _Aborted("the worker is gone") from e
        deadline = time.monotonic() + TIMEOUT
        while not self.res_r.poll(0.1):
            if not self.process.is_alive() and not self.res_r.poll(0):
                raise _Aborted("the worker died")
            if time.monotonic() > deadline:
                self.process.kill()
                raise _Aborted(f"no result after {TIMEOUT:.0f} s (a lock held across the fork?)")
        try:
            return pickle.loads(self.res_r.recv_bytes())
        except (EOFError, OSError) as e:
            raise _Aborted("the worker died") from e


def _seconds(duration, args, kwargs) -> float:
    if callable(duration):
        duration = duration(*args, **kwargs)
    if duration is None:
        return float(DEFAULT_DURATION)
    if isinstance(duration, timedelta):
        return duration.total_seconds()
    return float(duration)


def _wrap(task, duration):
    idle: list[_Worker] = []
    lock = threading.Lock()
    name = getattr(task, "__qualname__", getattr(task, "__name__", "task"))

    @wraps(task)
    def gradio_handler(*args, **kwargs):
        if forked:
            return task(*args, **kwargs)
        seconds = _seconds(duration, args, kwargs)
        if seconds > MAX_DURATION:
            raise _gradio_error(f"The requested GPU duration ({round(seconds)}s) is larger than the maximum allowed",
                                "ZeroGPU illegal duration")
        try:
            data = pickle.dumps((args, kwargs))
        except Exception as e:  # noqa: BLE001 — spaces raises PicklingError before scheduling
            raise PicklingError(str(e)) from e
        worker = None
        with lock:
            while idle and worker is None:
                candidate = idle.pop()
                if candidate.alive():
                    worker = candidate
        fresh = worker is None
        if fresh:
            worker = _Worker(task)
        _log("call", function=name, duration=seconds, worker=worker.pid, fresh=fresh)
        try:
            result = worker.call(data)
        except _Aborted as e:
            print(f"ZeroGPU stand-in: worker {worker.pid}: {e}", file=sys.stderr, flush=True)
            raise _gradio_error("GPU task aborted", "ZeroGPU worker error") from None
        if worker.alive():
            with lock:
                idle.append(worker)
        kind = result[0]
        if kind == "ok":
            return pickle.loads(result[1])
        print(result[2], file=sys.stderr, flush=True)  # spaces prints the worker's traceback here
        if kind == "gradio_error":
            raise pickle.loads(result[1])
        raise _gradio_error(result[1], "ZeroGPU worker error")

    gradio_handler.zerogpu = None
    return gradio_handler


def GPU(task=None, *, duration=None, size=None, **kwargs):  # noqa: N802 — spaces' name
    """``@spaces.GPU``, ``@spaces.GPU(duration=...)`` or ``spaces.GPU(fn, duration=...)``."""
    if not callable(task):
        if isinstance(task, str):
            size = task
        elif task is not None:
            duration = task
        return lambda f: _GPU(f, duration, size)
    return _GPU(task, duration, size)


def _GPU(task, duration, size):  # noqa: N802
    if not ZERO_GPU:
        return task
    if task in _decorated:
        return _decorated[task]
    if inspect.iscoroutinefunction(task) or inspect.isgeneratorfunction(task):
        raise NotImplementedError("the ZeroGPU stand-in runs regular functions only")
    decorated = _wrap(task, duration)
    _decorated[task] = decorated
    _decorated[decorated] = decorated
    _log("wrap", function=getattr(task, "__qualname__", "task"),
         duration="callable" if callable(duration) else duration)
    return decorated


# --- for the tests (not part of spaces) -------------------------------------------------------


def standin_workers() -> list[int]:
    """The pids of the workers alive now."""
    return [w.pid for w in _all_workers if w.alive()]


def standin_shutdown(timeout: float = 10.0) -> None:
    """Stop every worker (SIGTERM, then SIGKILL after ``timeout``)."""
    for w in _all_workers:
        if w.alive():
            w.process.terminate()
    for w in _all_workers:
        w.process.join(timeout)
        if w.alive():
            w.process.kill()
            w.process.join(5)
    _all_workers.clear()
