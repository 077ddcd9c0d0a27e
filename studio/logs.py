"""What the studio's console shows: its own lines, without library noise and without secrets.

* :func:`quiet_libraries` — library progress bars and warnings are noise in a studio's console.
  It sets what the libraries read when they are imported and applies their setters only if they
  are already imported (importing diffusers here would pull in torch before the page is served).
* :func:`redact` / :class:`RedactSecrets` — Hugging Face tokens (``hf_…``) never reach a log.
* :func:`install_logging` — the studio's console handler, redacting, plus the filter on every
  handler the web stack brings; :func:`redact_streams` wraps stdout and stderr themselves, so a
  traceback a library prints directly is redacted too.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import warnings

TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{20,}")
REDACTED = "hf_***"

# Loggers that print warnings a studio user cannot act on (bitsandbytes' optional CPU kernels,
# accelerate's offload notes, httpx request lines).
_NOISY_LOGGERS = ("bitsandbytes", "bitsandbytes.backends.cpu.ops", "accelerate", "httpx", "torchao")


def quiet_libraries() -> None:
    """Silence library progress bars and warnings (idempotent; cheap before torch is imported)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(diffusers|transformers|accelerate)\b")
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        import transformers.utils.logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    if "diffusers" in sys.modules:
        import diffusers.utils.logging as dlog

        dlog.set_verbosity_error()


# --- secrets ---------------------------------------------------------------------------------


def redact(text: str) -> str:
    """Replace anything that looks like a Hugging Face token."""
    return TOKEN_RE.sub(REDACTED, text)


class RedactSecrets(logging.Filter):
    """A handler filter: the record's message, arguments and traceback text lose their tokens."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact the record in place (message with its arguments merged, traceback, stack);
        always keeps it."""
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


class RedactingStream(io.TextIOBase):
    """A text stream that redacts tokens before writing to the stream it wraps.

    Writes are buffered up to each newline (a token split across two ``write`` calls is still
    caught); ``flush`` writes what is pending."""

    def __init__(self, inner):
        self._inner = inner
        self._pending = ""

    def write(self, text) -> int:
        """Buffer ``text`` and write every finished line redacted; returns the characters taken."""
        text = str(text)
        self._pending += text
        if "\n" in self._pending:
            head, _, self._pending = self._pending.rpartition("\n")
            self._inner.write(redact(head + "\n"))
        if len(self._pending) > 1 << 16:  # a very long line without a newline
            self.flush()
        return len(text)

    def flush(self) -> None:
        """Write what is pending (redacted), then flush the wrapped stream."""
        if self._pending:
            self._inner.write(redact(self._pending))
            self._pending = ""
        self._inner.flush()

    def isatty(self) -> bool:
        """Whether the wrapped stream is a terminal."""
        return self._inner.isatty()

    def fileno(self) -> int:
        """The wrapped stream's file descriptor."""
        return self._inner.fileno()

    @property
    def encoding(self):
        """The wrapped stream's encoding (utf-8 when it has none)."""
        return getattr(self._inner, "encoding", "utf-8")

    @property
    def inner(self):
        """The wrapped stream."""
        return self._inner


def redact_streams() -> None:
    """Wrap ``sys.stdout`` and ``sys.stderr`` (once) so whatever prints to them — a library's
    traceback, uvicorn, a stray ``print`` — is redacted."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))


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
