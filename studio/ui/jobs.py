"""The one wrapper around every engine / model / gallery call the UI makes.

* the GPU lock: every event that runs the engine or loads a model shares ``concurrency_id="gpu"``
  with a limit of one (see :func:`gpu_event`);
* a cancel token per browser session (the Cancel button sets it; the engine stops between steps
  and keeps the finished images);
* progress: the engine runs in a worker thread and streams its events through a queue, so the
  handler can report step/ETA through ``gr.Progress`` and yield live previews;
* error capture: the studio's own errors become ``gr.Error`` toasts carrying their message (the
  API client raises ``AppError`` with it); notes become ``gr.Warning`` toasts.
"""

from __future__ import annotations

import contextvars
import html
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import gradio as gr

from studio.engine.preview import latents_to_preview
from studio.engine.request import CancelToken
from studio.errors import StudioError, ValidationError

log = logging.getLogger(__name__)

GPU = "gpu"
PREVIEW_EVERY_S = 0.5  # at most two previews a second


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions whose message is meant for the user (``studio.errors``; no torch)."""
    return (StudioError,)


def safe(text) -> str:
    """Toasts render HTML: escape messages that may quote user input."""
    return html.escape(str(text), quote=False)


def error(message, title: str = "Error") -> gr.Error:
    """A toast-ready gr.Error with the message made safe for display (no traceback printed)."""
    return gr.Error(safe(message), title=title, print_exception=False)


def as_gr_error(e: BaseException) -> gr.Error:
    """The gr.Error for one of the studio's errors (a refusal: "Check the settings"; a failure: "Could
    not finish")."""
    return error(e, "Check the settings" if isinstance(e, ValidationError) else "Could not finish")


def call(fn: Callable, *args, **kwargs):
    """Run a studio call; turn the studio's errors into a toast, anything else into a short one."""
    try:
        return fn(*args, **kwargs)
    except gr.Error:
        raise
    except user_errors() as e:
        raise as_gr_error(e) from None
    except Exception as e:  # noqa: BLE001 — the UI must say something rather than hang
        log.exception("unexpected error in %s", getattr(fn, "__name__", fn))
        raise error(f"Unexpected error ({type(e).__name__}); the details are in the studio's log.") from None


def gpu_event(trigger, fn, inputs, outputs, **kwargs):
    """Register an event that holds the GPU: one at a time across the whole app."""
    kwargs.setdefault("concurrency_limit", 1)
    return trigger(fn, inputs, outputs, concurrency_id=GPU, **kwargs)


def notify(notes) -> None:
    """Show each note as a warning toast."""
    for note in notes or ():
        gr.Warning(safe(note), duration=8)


# --- generation -------------------------------------------------------------------------------


@dataclass
class Update:
    """One thing the handler hears from the worker thread."""

    kind: str  # "progress" | "image" | "done" | "error"
    event: object = None  # ProgressEvent
    preview: object = None  # PIL image
    image: object = None  # GeneratedImage
    result: object = None  # GenerationResult
    error: BaseException | None = None


@dataclass
class JobState:
    """One running job: its cancel token and when it started."""
    token: object
    started: float = field(default_factory=time.monotonic)


class Jobs:
    """Runs generations for the UI and the API: one worker thread per job, cancel per session."""

    def __init__(self, studio):
        self.studio = studio
        self._lock = threading.Lock()
        self._active: dict[str, list[JobState]] = {}

    # -- cancel --

    def _key(self, request: gr.Request | None) -> str:
        return getattr(request, "session_hash", None) or "-"

    def cancel(self, request: gr.Request | None = None) -> int:
        """Cancel this session's running generations. Returns how many were told to stop."""
        with self._lock:
            states = list(self._active.get(self._key(request), ()))
        for s in states:
            s.token.cancel()
        return len(states)

    def _register(self, request, state: JobState) -> None:
        with self._lock:
            self._active.setdefault(self._key(request), []).append(state)

    def _unregister(self, request, state: JobState) -> None:
        with self._lock:
            states = self._active.get(self._key(request), [])
            if state in states:
                states.remove(state)
            if not states:
                self._active.pop(self._key(request), None)

    # -- run --

    def run(self, req, request: gr.Request | None = None, progress: gr.Progress | None = None):
        """Blocking generation (the API endpoints): returns the GenerationResult or raises gr.Error."""
        result = None
        for update in self.stream(req, request, progress, previews=False):
            if update.kind == "done":
                result = update.result
        try:
            result.wait_saved()  # a failed save (full disk, read-only folder) is the caller's error
        except user_errors() as e:
            raise as_gr_error(e) from None
        return result

    def stream(self, req, request: gr.Request | None = None, progress: gr.Progress | None = None,
               previews: bool = True) -> Iterator[Update]:
        """Run ``req`` in a worker thread; yield progress (with previews) and finished images.

        Ends with a "done" update; the studio's errors are raised as gr.Error. If the consumer
        goes away (browser closed, generator closed) the job is cancelled.
        """
        studio = self.studio
        owner = self.studio.owner_for(request)
        token = CancelToken()
        state = JobState(token)
        q: queue.Queue[Update] = queue.Queue()
        last_preview = [0.0]

        def on_progress(ev):
            preview = None
            now = time.monotonic()
            last = ev.step >= ev.steps
            ready = getattr(ev, "preview", None)  # made in a ZeroGPU worker: its latents stay there
            if previews and (ready is not None or ev.latents is not None) and not last \
                    and now - last_preview[0] >= PREVIEW_EVERY_S:
                last_preview[0] = now
                try:
                    preview = ready if ready is not None else latents_to_preview(ev.latents)
                except Exception:  # noqa: BLE001 — a preview is never worth failing a job
                    preview = None
            q.put(Update("progress", event=ev, preview=preview))

        def on_image(item):
            q.put(Update("image", image=item))

        def work():
            try:
                result = studio.generate(req, on_progress=on_progress, cancel=token, owner=owner,
                                         on_image=on_image)
                q.put(Update("done", result=result))
            except BaseException as e:  # noqa: BLE001 — handed to the consumer
                q.put(Update("error", error=e))

        self._register(request, state)
        # the worker runs in a copy of this context: gr.Request-scoped state (ZeroGPU's quota) follows
        worker = threading.Thread(target=contextvars.copy_context().run, args=(work,), name="studio-generate",
                                  daemon=True)
        worker.start()
        finished = False
        try:
            if progress is not None:
                progress(0, desc="Loading model…" if self.studio.current is None else "Starting…")
            while True:
                try:
                    update = q.get(timeout=0.2)
                except queue.Empty:
                    if not worker.is_alive() and q.empty():
                        raise gr.Error("The generation stopped without a result.", print_exception=False)
                    continue
                if update.kind == "progress":
                    ev = update.event
                    if progress is not None:
                        eta = f" · ETA {ev.eta_s:.0f}s" if ev.eta_s is not None else ""
                        runs = f"run {ev.run + 1}/{ev.runs} · " if ev.runs > 1 else ""
                        progress(ev.fraction, desc=f"{runs}step {ev.step}/{ev.steps}{eta}")
                    yield update
                elif update.kind == "image":
                    yield update
                elif update.kind == "error":
                    e = update.error
                    if isinstance(e, gr.Error):  # ZeroGPU's own (quota, queue, worker): as it said it
                        raise e
                    if isinstance(e, user_errors()):
                        raise as_gr_error(e) from None
                    log.error("generation failed", exc_info=e)
                    raise error(f"Generation failed ({type(e).__name__}); the details are in the studio's log.")
                else:
                    finished = True
                    yield update
                    return
        finally:
            if not finished:
                token.cancel()  # the consumer left (or failed): stop the engine between steps
            self._unregister(request, state)
