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
  no model paths or arbitrary Hub ids, no unload button (see ``studio.service``).
* **Secrets.** Every logging handler carries ``studio.logs.RedactSecrets``, and stdout/stderr
  themselves are wrapped (``redact_streams``): Hugging Face tokens (``hf_…``) are replaced in
  messages, arguments and tracebacks, whoever prints them.
"""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

from studio.app.guards import CancelGuard, FileRouteGuard, LoginThrottle  # noqa: F401
from studio.config import StudioConfig, on_space
from studio.logs import RedactSecrets, install_logging, quiet_libraries, redact, redact_streams  # noqa: F401

MAX_UPLOAD = "50mb"  # Gradio refuses larger uploads (HTTP 413) before our code sees them


class StartupError(Exception):
    """The studio cannot start as asked (bad ``--auth``, ``--share`` without auth, …); the message says why."""


# --- which files may be served -----------------------------------------------------------------


def file_access(config: StudioConfig) -> dict:
    """The launch() arguments that decide which files Gradio may serve, plus the login throttle
    and the cancel guard (``launch`` tells the cancel guard which app it guards)."""
    from types import SimpleNamespace

    from starlette.middleware import Middleware

    from studio.blobs import KINDS

    data = config.data_dir
    return dict(
        # Gradio copies returned images from here into its cache; the guard stops direct access.
        allowed_paths=[str(data / "images"), str(data / "thumbs"), *(str(data / k) for k in KINDS.values())],
        blocked_paths=[str(data / "gallery.sqlite"), str(data / "models"), str(data / "cache"),
                       str(data / "settings.json"), str(data / "loras"), str(data / "upscalers")],
        app_kwargs={"middleware": [Middleware(FileRouteGuard, root=str(data)), Middleware(LoginThrottle),
                                   Middleware(CancelGuard, holder=SimpleNamespace(blocks=None))]},
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
    """Whether ``host`` is reachable from this machine only (none, ``localhost`` or a loopback address)."""
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
    return bool(getattr(args, "share", False) or getattr(args, "shared", False) or on_space())


def launch_kwargs(config: StudioConfig, args) -> dict:
    """The keyword arguments of Gradio's ``launch()`` for this config and command line (raises
    StartupError for ``--share`` without ``--auth``)."""
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
    for m in kwargs.get("app_kwargs", {}).get("middleware", []):
        if getattr(m, "cls", None) is CancelGuard:
            m.kwargs["holder"].blocks = demo
    # quiet: Gradio's own start-up lines ("To create a public link, set share=True") are not the
    # studio's advice (its flag is --share --auth); the studio prints its one line instead
    demo.launch(**{**kwargs, "prevent_thread_lock": True, "quiet": True})
    share_url = getattr(demo, "share_url", None)
    local = getattr(demo, "local_url", None) or f"http://{kwargs.get('server_name')}:{kwargs.get('server_port')}/"
    print(f"SD3.5 Studio is running at {local} (Ctrl+C stops it)", flush=True)
    if share_requested and not share_url:
        why = ("share links are not available on a Hugging Face Space" if getattr(demo, "space_id", None)
               else "the Gradio tunnel could not be reached; see the reason above")
        print(f"Could not open a share link ({why}): the studio is running locally only at {local}",
              flush=True)
    if block:
        demo.block_thread()
    return share_url


def serve(config: StudioConfig, args) -> int:
    """``launch.py`` without a subcommand: check the gallery, build the UI, serve until stopped."""
    from studio.service import Studio

    redact_streams()
    install_logging()
    try:
        kwargs = launch_kwargs(config, args)
    except StartupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not is_loopback(config.host) and not kwargs["auth"]:
        print(f"warning: listening on {config.host} without --auth: anyone who can reach this machine "
              "can use the studio and see its gallery. Add --auth USER:PASS.", file=sys.stderr)
    studio = Studio(config, shared=is_shared(args))
    studio.start()
    ok, message = studio.availability()
    print(("Model: " if ok else "No model yet: ") + message, file=sys.stderr)
    quiet_libraries()
    from studio.ui.app import build_app, launch_options

    demo = build_app(studio)
    demo.queue(default_concurrency_limit=1, max_size=64)
    install_logging()  # gradio and uvicorn add their handlers late
    launch(demo, {**kwargs, **launch_options()}, share_requested=kwargs["share"])
    return 0
