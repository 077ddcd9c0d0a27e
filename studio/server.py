"""Start the web UI: auth, share link, which files may be served."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .config import StudioConfig


class StartupError(Exception):
    pass


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


def launch_kwargs(config: StudioConfig, args) -> dict:
    auth = parse_auth(getattr(args, "auth", None))
    share = bool(getattr(args, "share", False))
    if share and not auth and not getattr(args, "insecure_no_auth", False):
        raise StartupError(
            "--share makes the studio public: anyone with the link could use your GPU and see "
            "your images. Add --auth USER:PASS (or --auth FILE), or pass --insecure-no-auth if you "
            "really mean it."
        )
    data = config.data_dir
    return dict(
        server_name=config.host,
        server_port=config.port,
        share=share,
        auth=auth,
        # Only the images and thumbnails are served; never the index, settings or models.
        allowed_paths=[str(data / "images"), str(data / "thumbs")],
        blocked_paths=[str(data / "gallery.sqlite"), str(data / "models"), str(data / "cache"),
                       str(data / "settings.json"), str(data / "loras")],
        max_file_size="50mb",
        show_error=False,
        quiet=False,
    )


def serve(config: StudioConfig, args) -> int:
    from .cli import quiet_libraries
    from .services import Studio

    try:
        kwargs = launch_kwargs(config, args)
    except StartupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    studio = Studio(config)
    ok, message = studio.availability()
    print(("Model: " if ok else "No model yet: ") + message, file=sys.stderr)
    quiet_libraries()
    from .ui.app import build_app, launch_options

    demo = build_app(studio)
    demo.queue(default_concurrency_limit=1, max_size=64)
    demo.launch(**kwargs, **launch_options())
    return 0
