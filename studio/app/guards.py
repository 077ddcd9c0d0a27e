"""ASGI guards in front of Gradio: the file route, the login, and cancel.

* :class:`FileRouteGuard` — refuse any Gradio file request whose path lands inside the data dir.
* :class:`LoginThrottle` — after repeated failed logins for one user name or one client address,
  refuse further tries for a while (HTTP 429) with a message that says how long.
* :class:`CancelGuard` — ``/gradio_api/cancel`` stops a job only for the session (and, behind
  ``--auth``, the login) that started it.

Each is plain ASGI middleware, passed to ``launch(app_kwargs={"middleware": …})``.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote

LOGIN_MAX_FAILURES = 5  # failed tries before a lock-out …
LOGIN_WINDOW_S = 300.0  # … counted over this window
LOGIN_LOCKOUT_S = 60.0  # and how long the lock-out lasts


def _is_post(scope, route: str) -> bool:
    """An HTTP POST to ``route`` (under any mount point, with or without a trailing slash)."""
    return scope.get("type") == "http" and scope.get("method") == "POST" and \
        scope.get("path", "").rstrip("/").endswith(route)


async def _read_body(receive) -> tuple[bytes, list]:
    chunks, messages = [], []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] == "http.request":
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        else:
            break
    return b"".join(chunks), messages


def _replay(messages):
    pending = list(messages)

    async def receive():
        if pending:
            return pending.pop(0)
        return {"type": "http.disconnect"}

    return receive


async def _send_json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


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
        """Whether ``path`` is a file route whose target, in any reading, lies inside the data dir."""
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


class LoginThrottle:
    """Count failed logins per user name and per client address; lock out repeat offenders."""

    def __init__(self, app, max_failures: int = LOGIN_MAX_FAILURES, window_s: float = LOGIN_WINDOW_S,
                 lockout_s: float = LOGIN_LOCKOUT_S, clock=time.monotonic):
        self.app = app
        self.max_failures, self.window_s, self.lockout_s, self.clock = max_failures, window_s, lockout_s, clock
        self._failures: dict[str, list[float]] = {}
        self._locked: dict[str, float] = {}
        self._lock = threading.Lock()

    def _keys(self, scope, username: str) -> list[str]:
        client = (scope.get("client") or ("?", 0))[0]
        return [f"ip:{client}", f"user:{username.strip().lower()}"] if username else [f"ip:{client}"]

    def locked_for(self, keys: list[str]) -> float:
        """Seconds left on the longest lock-out among ``keys`` (0 when none is locked out)."""
        now = self.clock()
        with self._lock:
            return max([self._locked.get(k, 0) - now for k in keys] + [0.0])

    def failed(self, keys: list[str]) -> None:
        """Count a failed login for each key; a key that reaches ``max_failures`` within the window is
        locked out for ``lockout_s``."""
        now = self.clock()
        with self._lock:
            for k in keys:
                recent = [t for t in self._failures.get(k, []) if now - t < self.window_s] + [now]
                self._failures[k] = recent[-self.max_failures:]
                if len(recent) >= self.max_failures:
                    self._locked[k] = now + self.lockout_s
                    self._failures[k] = []

    def succeeded(self, keys: list[str]) -> None:
        """A successful login: forget the keys' failed tries."""
        with self._lock:
            for k in keys:
                self._failures.pop(k, None)

    async def __call__(self, scope, receive, send):
        if not _is_post(scope, "/login"):
            await self.app(scope, receive, send)
            return
        body, messages = await _read_body(receive)
        try:
            username = parse_qs(body.decode("utf-8", "replace")).get("username", [""])[0][:200]
        except Exception:  # noqa: BLE001 — a malformed form is Gradio's to refuse
            username = ""
        keys = self._keys(scope, username)
        wait = self.locked_for(keys)
        if wait > 0:
            await _send_json(send, 429, {"detail": f"Too many failed logins: try again in {math.ceil(wait)} s."})
            return
        status = {}

        async def watch(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        await self.app(scope, _replay(messages), watch)
        if status.get("code") == 200:
            self.succeeded(keys)
        elif status.get("code") in (400, 401, 403):
            self.failed(keys)


class CancelGuard:
    """``POST …/cancel`` is honoured only for a running or queued job of the same session — and,
    when the studio runs with ``--auth``, only from a logged-in request of the same user.

    ``holder.blocks`` is the Gradio app (``gr.Blocks``): its queue knows each event's session and user,
    and its server app knows the login tokens."""

    def __init__(self, app, holder=None):
        self.app = app
        self.holder = holder  # .blocks: the gr.Blocks, set by studio.app.server.launch

    @property
    def blocks(self):
        """The guarded Gradio app (``gr.Blocks``), or None before ``launch`` sets it."""
        return getattr(self.holder, "blocks", None)

    def _user(self, scope) -> str | None:
        server = getattr(self.blocks, "server_app", None)
        if server is None:
            return None
        cookies = {}
        for name, value in scope.get("headers", []):
            if name == b"cookie":
                for part in value.decode("latin-1").split(";"):
                    k, _, v = part.strip().partition("=")
                    cookies[k] = v
        token = cookies.get(f"access-token-{server.cookie_id}") or cookies.get(
            f"access-token-unsecure-{server.cookie_id}")
        return server.tokens.get(token) if token else None

    def refused(self, scope, body: bytes) -> str | None:
        """Why this cancel request is refused, or None to let Gradio handle it."""
        try:
            data = json.loads(body or b"{}")
            session, event_id = str(data.get("session_hash", "")), str(data.get("event_id", ""))
        except (ValueError, AttributeError):
            return "a cancel needs session_hash and event_id"
        server = getattr(self.blocks, "server_app", None)
        queue = getattr(self.blocks, "_queue", None)
        auth = getattr(server, "auth", None) if server is not None else None
        user = self._user(scope)
        if auth is not None and user is None:
            return "log in first"
        event = queue.event_ids_to_events.get(event_id) if queue is not None else None
        if event is None:
            return None  # nothing runs under that id: Gradio's own no-op answer
        if event.session_hash != session:
            return "that job belongs to another session"
        if auth is not None and event.username != user:
            return "that job belongs to another user"
        return None

    async def __call__(self, scope, receive, send):
        if not _is_post(scope, "/cancel"):
            await self.app(scope, receive, send)
            return
        body, messages = await _read_body(receive)
        why = self.refused(scope, body)
        if why:
            await _send_json(send, 403, {"detail": f"Cancel refused: {why}."})
            return
        await self.app(scope, _replay(messages), send)
