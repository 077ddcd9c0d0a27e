"""Start the web UI: auth, share link, which files may be served, logs without secrets.

What a deployment guarantees (tests/test_security.py, tests/test_space.py):

* **Files.** Gradio serves ``/gradio_api/file=PATH`` from ``allowed_paths``, its static paths and
  its own cache (uploads and copies of what handlers return), minus ``blocked_paths``. We allow
  the images, thumbnails and inpaint-masks folders only so that Gradio may *copy* what a handler
  returns into its cache (it refuses to copy anything else); the cached copy lives at
  ``<cache>/<sha256(secret seed + content)>/<id>.png`` and that is the only URL a page ever gets.
  :class:`FileRouteGuard` refuses every file request that resolves into the data dir, so the
  originals, the index, the settings, the hash cache and the models are never served, whatever
  the spelling (``..``, percent-encoding, symlinks planted in the images folder).
* **Share link.** ``--share`` needs ``--auth`` (or an explicit ``--insecure-no-auth``). Where the
  tunnel cannot be opened Gradio carries on locally; we say so in one line with the local URL.
* **Shared deployments** (``--share``, ``--shared``, a Hugging Face Space): the studio is
  ``shared`` — a gallery per login (with ``--auth``) or per browser session, no token field,
  no model paths or arbitrary Hub ids, no unload button (see ``studio.services``).
* **Secrets.** Every logging handler the studio installs carries :class:`RedactSecrets`, which
  replaces Hugging Face tokens (``hf_…``) in messages, arguments and tracebacks.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import sys
from pathlib import Path
from urllib.parse import unquote

from .config import StudioConfig

MAX_UPLOAD = "50mb"  # Gradio refuses larger uploads (HTTP 413) before our code sees them

TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{20,}")
REDACTED = "hf_***"


class StartupError(Exception):
    pass


# --- secrets in logs ---------------------------------------------------------------------------


def redact(text: str) -> str:
    """Replace anything that looks like a Hugging Face token."""
    return TOKEN_RE.sub(REDACTED, text)


class RedactSecrets(logging.Filter):
    """A handler filter: the record's message, arguments and traceback text lose their tokens."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 — a broken format string is still logged, redacted
            message = str(record.msg)
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (it may be replaced after start-up)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


_FILTER = RedactSecrets()
# Loggers whose handlers (if any are already there) get the filter too.
_LOGGERS = ("", "studio", "gradio", "uvicorn", "uvicorn.error", "uvicorn.access", "httpx",
            "huggingface_hub", "diffusers", "transformers")


def install_logging(level: int = logging.WARNING) -> logging.Handler:
    """Install the studio's console handler (stderr, redacting) on the root logger, once, and add
    the redacting filter to every handler already attached to the loggers the studio runs with."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_sd35_studio", False)), None)
    if handler is None:
        handler = _StderrHandler()
        handler._sd35_studio = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        if root.level > level or root.level == logging.NOTSET:
            root.setLevel(level)
    for name in _LOGGERS:
        for h in logging.getLogger(name).handlers:
            if _FILTER not in h.filters:
                h.addFilter(_FILTER)
    return handler


# --- which files may be served -----------------------------------------------------------------


_FILE_ROUTE = re.compile(r"/file[=/]")


class FileRouteGuard:
    """ASGI middleware: refuse any Gradio file request whose path lands inside ``root``.

    Gradio's own check (allowed/blocked paths) still runs after this one; the guard only adds a
    refusal for the data dir, which must stay in ``allowed_paths`` for Gradio to copy returned
    images into its cache. Every reading of the path is checked: as routed (the server has
    decoded it once), decoded once more, with backslashes as separators, and with symlinks
    resolved.
    """

    def __init__(self, app, root: str | os.PathLike):
        self.app = app
        root = Path(os.path.abspath(root))
        self.roots = {root, root.resolve()}

    def refused(self, path: str) -> bool:
        for m in _FILE_ROUTE.finditer(path):
            rest = path[m.end():]
            for candidate in {rest, unquote(rest), rest.replace("\\", "/"), unquote(rest).replace("\\", "/")}:
                if candidate and self._inside(candidate):
                    return True
        return False

    def _inside(self, candidate: str) -> bool:
        try:
            p = Path(os.path.abspath(candidate))
            forms = {p, p.resolve()}
        except (OSError, ValueError, RuntimeError):
            return True  # a path we cannot even normalise is not served
        return any(f == r or r in f.parents for f in forms for r in self.roots)

    async def __call__(self, scope, receive, send):
        if scope.get("type") == "http" and self.refused(scope.get("path", "")):
            from starlette.responses import PlainTextResponse

            await PlainTextResponse("File not allowed.", status_code=403)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def file_access(config: StudioConfig) -> dict:
    """The launch() arguments that decide which files Gradio may serve."""
    from starlette.middleware import Middleware

    data = config.data_dir
    return dict(
        # Gradio copies returned images from here into its cache; the guard stops direct access.
        allowed_paths=[str(data / "images"), str(data / "thumbs"), str(data / "masks")],
        blocked_paths=[str(data / "gallery.sqlite"), str(data / "models"), str(data / "cache"),
                       str(data / "settings.json"), str(data / "loras")],
        app_kwargs={"middleware": [Middleware(FileRouteGuard, root=str(data))]},
    )


# --- launch ------------------------------------------------------------------------------------


def parse_auth(spec: str | None) -> list[tuple[str, str]] | None:
    """``USER:PASS`` or the path of a file with one ``USER:PASS`` per line."""
    if not spec:
        return None
    lines = [spec]
    path = Path(spec).expanduser()
    if ":" not in spec or path.is_file():
        try:
            lines = path.read_text().splitlines()
        except OSError as e:
            raise StartupError(f"--auth {spec}: not USER:PASS and not a readable file ({e.strerror}).") from e
    creds = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise StartupError("--auth needs USER:PASS (or a file of USER:PASS lines) with both parts non-empty.")
        creds.append((user, password))
    if not creds:
        raise StartupError(f"--auth {spec}: the file holds no USER:PASS line.")
    return creds


def is_loopback(host: str | None) -> bool:
    if not host or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_shared(args) -> bool:
    """Shared deployments: a share link, ``--shared``, or a Hugging Face Space. A LAN address
    (``--host 0.0.0.0``) alone is not: that is one person's studio reached from another machine
    (a warning says to add ``--auth``); pass ``--shared`` for per-session galleries there."""
    from .spaces_support import on_space

    return bool(getattr(args, "share", False) or getattr(args, "shared", False) or on_space())


def launch_kwargs(config: StudioConfig, args) -> dict:
    auth = parse_auth(getattr(args, "auth", None))
    share = bool(getattr(args, "share", False))
    if share and not auth and not getattr(args, "insecure_no_auth", False):
        raise StartupError(
            "--share makes the studio public: anyone with the link could use your GPU and see "
            "your images. Add --auth USER:PASS (or --auth FILE), or pass --insecure-no-auth if you "
            "really mean it."
        )
    return dict(
        server_name=config.host,
        server_port=config.port,
        share=share,
        auth=auth,
        max_file_size=MAX_UPLOAD,
        show_error=False,
        quiet=False,
        **file_access(config),
    )


def launch(demo, kwargs: dict, *, share_requested: bool, block: bool = True):
    """``demo.launch(**kwargs)``; if a share link was asked for but could not be opened, say so
    (Gradio prints its reason and carries on locally). Returns the share URL or None."""
    demo.launch(**{**kwargs, "prevent_thread_lock": True})
    share_url = getattr(demo, "share_url", None)
    if share_requested and not share_url:
        local = getattr(demo, "local_url", None) or f"http://{kwargs.get('server_name')}:{kwargs.get('server_port')}/"
        why = ("share links are not available on a Hugging Face Space" if getattr(demo, "space_id", None)
               else "the Gradio tunnel could not be reached; see the reason above")
        print(f"Could not open a share link ({why}): the studio is running locally only at {local}",
              flush=True)
    if block:
        demo.block_thread()
    return share_url


def serve(config: StudioConfig, args) -> int:
    from .cli import quiet_libraries
    from .services import Studio

    install_logging()
    try:
        kwargs = launch_kwargs(config, args)
    except StartupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not is_loopback(config.host) and not kwargs["auth"]:
        print(f"warning: listening on {config.host} without --auth: anyone who can reach this machine "
              "can use the studio and see its gallery. Add --auth USER:PASS.", file=sys.stderr)
    studio = Studio(config)
    studio.shared = is_shared(args)
    ok, message = studio.availability()
    print(("Model: " if ok else "No model yet: ") + message, file=sys.stderr)
    quiet_libraries()
    from .ui.app import build_app, launch_options

    demo = build_app(studio)
    demo.queue(default_concurrency_limit=1, max_size=64)
    install_logging()  # gradio and uvicorn add their handlers late
    launch(demo, {**kwargs, **launch_options()}, share_requested=kwargs["share"])
    return 0
