"""The gallery store: every generated image with its metadata, searchable and reusable.

Storage is split by responsibility (as in InvokeAI):

* files — ``<data_dir>/images/YYYY-MM-DD/<id>.png`` (metadata embedded, see ``pnginfo``) and
  ``<data_dir>/thumbs/<id>.webp`` (256 px on the longest side);
* index — ``<data_dir>/gallery.sqlite`` (WAL mode): one row per image with the fields the UI
  filters on, the full metadata JSON, and an FTS5 index over prompt + negative prompt.

The PNG is the source of truth. ``save`` writes it first (temp file + fsync + rename), then the
thumbnail, then commits the index row, so a crash at any point leaves at worst an orphan PNG or
a temp file, which :meth:`Gallery.reconcile` re-indexes or removes. Many threads and processes
may share one data dir: each thread has its own SQLite connection, writes are short
``BEGIN IMMEDIATE`` transactions, and SQLite's locking serialises processes.

Image ids are random (``secrets.token_hex(8)``) and validated on every call, so a caller can
never make the gallery touch a path it chose. Shared deployments pass ``owner=`` (a login or a
session id) to every call: a given owner sees and changes only its own rows. An owner's images
live in a folder of their own, ``images/o-<keyed hash of the owner>/<date>/<id>.png`` — the key
is random and stays in the data dir, and the owner itself is written only to the index and to
``cache/owners.json``, never into a PNG a user downloads — so after a crash, or with the index
lost, :meth:`Gallery.reconcile` gives every image back to its owner. Images without an owner
(a private run) live in ``images/<date>/`` and are visible only to callers that pass no owner.

``reconcile`` runs at every start (the service calls it): it lists the files against the rows
(no hashing), so a start with 10,000 images stays fast; a corrupt index is set aside and rebuilt
from the PNGs' own metadata.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from studio.metadata import png as pnginfo
from studio.errors import GalleryError
from studio.files import TEMP_SUFFIX, atomic_write

log = logging.getLogger(__name__)

THUMB_SIZE = 256
DB_NAME = "gallery.sqlite"
_ID_RE = re.compile(r"^[0-9a-f]{16}$")
_TEMP_SUFFIX = TEMP_SUFFIX
_BUSY_TIMEOUT_MS = 30_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id              TEXT PRIMARY KEY,
    path            TEXT NOT NULL,
    created_at      TEXT NOT NULL,          -- UTC, fixed width ISO-8601: sorts as text
    prompt          TEXT NOT NULL DEFAULT '',
    negative_prompt TEXT NOT NULL DEFAULT '',
    variant         TEXT,
    mode            TEXT,
    seed            INTEGER,
    width           INTEGER,
    height          INTEGER,
    starred         INTEGER NOT NULL DEFAULT 0,
    owner           TEXT,
    metadata        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS images_created ON images(created_at DESC);
CREATE INDEX IF NOT EXISTS images_owner_created ON images(owner, created_at DESC);
CREATE INDEX IF NOT EXISTS images_variant_created ON images(variant, created_at DESC);
CREATE INDEX IF NOT EXISTS images_starred_created ON images(starred, created_at DESC);
"""

_FTS_SCHEMA = """
CREATE VIRTUAL TABLE IF NOT EXISTS images_fts USING fts5(
    prompt, negative_prompt, content='images', content_rowid='rowid'
);
CREATE TRIGGER IF NOT EXISTS images_ai AFTER INSERT ON images BEGIN
    INSERT INTO images_fts(rowid, prompt, negative_prompt)
    VALUES (new.rowid, new.prompt, new.negative_prompt);
END;
CREATE TRIGGER IF NOT EXISTS images_ad AFTER DELETE ON images BEGIN
    INSERT INTO images_fts(images_fts, rowid, prompt, negative_prompt)
    VALUES ('delete', old.rowid, old.prompt, old.negative_prompt);
END;
CREATE TRIGGER IF NOT EXISTS images_au AFTER UPDATE OF prompt, negative_prompt ON images BEGIN
    INSERT INTO images_fts(images_fts, rowid, prompt, negative_prompt)
    VALUES ('delete', old.rowid, old.prompt, old.negative_prompt);
    INSERT INTO images_fts(rowid, prompt, negative_prompt)
    VALUES (new.rowid, new.prompt, new.negative_prompt);
END;
"""

_COLUMNS = "id, path, created_at, prompt, negative_prompt, variant, mode, seed, width, height, starred, owner, metadata"


@dataclass
class GalleryImage:
    """One indexed image: its id, PNG and thumbnail paths, full metadata, and the fields the UI
    filters on."""
    id: str
    path: Path  # absolute path of the PNG
    thumb_path: Path
    created_at: str  # UTC ISO-8601
    metadata: dict
    starred: bool = False
    owner: str | None = None
    prompt: str = ""
    negative_prompt: str = ""
    variant: str | None = None
    mode: str | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None


@dataclass
class Page:
    """One page of :meth:`Gallery.list`: its images and the total count that matched."""
    items: list[GalleryImage]
    total: int
    page: int
    page_size: int

    @property
    def pages(self) -> int:
        """How many pages the matches fill (at least 1)."""
        return max(1, -(-self.total // self.page_size))


@dataclass
class ReconcileReport:
    """What :meth:`Gallery.reconcile` changed, left alone and could not do."""
    added: list[str] = field(default_factory=list)  # ids re-indexed from orphan PNGs
    dropped: list[str] = field(default_factory=list)  # ids whose PNG was gone
    thumbs: list[str] = field(default_factory=list)  # ids whose thumbnail was rebuilt
    temp_removed: list[str] = field(default_factory=list)  # half-written temp files
    thumbs_removed: list[str] = field(default_factory=list)  # thumbnails of no image
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why) left alone
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path or id, error)

    @property
    def changed(self) -> bool:
        """Whether the check changed anything (re-indexed, dropped, rebuilt or removed)."""
        return bool(self.added or self.dropped or self.thumbs or self.temp_removed
                    or self.thumbs_removed)

    def summary(self) -> str:
        """One line for the log and the UI: what was changed, what was left alone, what failed."""
        def n(count: int, one: str, many: str) -> str:
            return f"{count} {one if count == 1 else many}"

        parts = []
        if self.added:
            parts.append(n(len(self.added), "image re-indexed from its PNG metadata",
                           "images re-indexed from their PNG metadata"))
        if self.dropped:
            parts.append(n(len(self.dropped), "entry dropped (its file is gone)",
                           "entries dropped (their files are gone)"))
        if self.thumbs:
            parts.append(n(len(self.thumbs), "thumbnail rebuilt", "thumbnails rebuilt"))
        if self.temp_removed:
            parts.append(n(len(self.temp_removed), "unfinished temp file removed",
                           "unfinished temp files removed"))
        if self.thumbs_removed:
            parts.append(n(len(self.thumbs_removed), "stray thumbnail removed",
                           "stray thumbnails removed"))
        text = "Gallery check: " + ("; ".join(parts) if parts else "everything is consistent") + "."
        if self.skipped:
            text += " Left alone: " + "; ".join(f"{p} ({why})" for p, why in self.skipped[:5])
            text += " …" if len(self.skipped) > 5 else ""
        if self.errors:
            text += " Problems: " + "; ".join(f"{p}: {e}" for p, e in self.errors[:5])
            text += " …" if len(self.errors) > 5 else ""
        return text


def _utc_iso(value: Any = None) -> str:
    """A fixed-width UTC ISO-8601 string (sortable as text). Naive times are local time."""
    if value is None:
        d = dt.datetime.now(dt.timezone.utc)
    elif isinstance(value, dt.datetime):
        d = value
    elif isinstance(value, dt.date):
        d = dt.datetime.combine(value, dt.time.min)
    else:
        d = dt.datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
    if d.tzinfo is None:
        d = d.astimezone()  # local time
    return d.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


def _date_bound(value: Any, end: bool) -> tuple[str, str]:
    """Filter bound -> (operator, UTC value). A date means the whole (local) day; both ends
    are inclusive."""
    if isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value.strip()):
        value = dt.date.fromisoformat(value.strip())
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        day = value + dt.timedelta(days=1) if end else value
        return ("<" if end else ">="), _utc_iso(dt.datetime.combine(day, dt.time.min))
    try:
        return ("<=" if end else ">="), _utc_iso(value)
    except (ValueError, TypeError):
        raise GalleryError(f"Invalid date {value!r}: use YYYY-MM-DD.") from None


def _statements(script: str) -> list[str]:
    """Split an SQL script into statements (triggers contain ';' inside BEGIN ... END)."""
    out, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    return out


def _fts_query(text: str) -> str:
    """User search text -> a safe FTS5 query: every word must match (as a prefix)."""
    words = re.findall(r"\w+", text)
    return " ".join('"' + w.replace('"', '""') + '"*' for w in words[:32])


def _is_storage_error(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT)
    text = str(e).lower()
    return any(s in text for s in ("readonly", "read-only", "disk is full", "disk i/o"))


class Gallery:
    """The gallery of one data dir. Safe to share between threads; many processes may open
    the same data dir at once."""

    def __init__(self, data_dir: str | os.PathLike):
        self.data_dir = Path(data_dir).expanduser().resolve()
        self._images = self.data_dir / "images"
        self._thumbs = self.data_dir / "thumbs"
        self.db_path = self.data_dir / DB_NAME
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._writer = None  # a one-thread executor for save_async, made on first use
        self._pending: set = set()
        self._owners_path = self.data_dir / "cache" / "owners.json"
        self._owner_key: bytes | None = None
        self._owner_folders: dict[str, str] | None = None  # folder name -> owner
        self.rebuilt_from = None  # the corrupt index set aside at start, if any
        try:
            self._images.mkdir(parents=True, exist_ok=True)
            self._thumbs.mkdir(parents=True, exist_ok=True)
            try:
                self.has_fts = self._init_schema()
            except sqlite3.DatabaseError as e:
                if not _is_corrupt(e):
                    raise
                self._set_aside_corrupt_index()
                self.has_fts = self._init_schema()
        except (OSError, sqlite3.Error) as e:
            raise GalleryError(self._storage_message(e, "open the gallery")) from e

    def _set_aside_corrupt_index(self) -> None:
        """Move a corrupt index (and its WAL) aside; the next reconcile rebuilds it from the PNGs."""
        self.close()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.db_path.with_name(f"{DB_NAME}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.db_path) + suffix)
            if src.exists():
                os.replace(src, Path(str(target) + suffix))
        self.rebuilt_from = target
        log.warning("the gallery index was corrupt; it was moved to %s and is rebuilt from the images", target.name)

    # --- owners ---------------------------------------------------------------------------

    def _key(self) -> bytes:
        if self._owner_key is None:
            key_file = self.data_dir / "cache" / "owners.key"
            try:
                self._owner_key = key_file.read_bytes()
            except FileNotFoundError:
                key_file.parent.mkdir(parents=True, exist_ok=True)
                key = secrets.token_bytes(32)
                try:
                    with open(key_file, "xb") as f:
                        f.write(key)
                    self._owner_key = key
                except FileExistsError:  # another process wrote it first
                    self._owner_key = key_file.read_bytes()
        return self._owner_key

    def owner_folder(self, owner: str) -> str:
        """The folder name of an owner's images: a keyed hash, so it names nobody."""
        return "o-" + hmac.new(self._key(), owner.encode(), hashlib.sha256).hexdigest()[:20]

    def _owners(self) -> dict[str, str]:
        if self._owner_folders is None:
            try:
                data = json.loads(self._owners_path.read_text())
                self._owner_folders = {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
            except (OSError, ValueError):
                self._owner_folders = {}
        return self._owner_folders

    def _remember_owner(self, folder: str, owner: str) -> None:
        with self._conns_lock:
            owners = self._owners()
            if owners.get(folder) == owner:
                return
            owners[folder] = owner
            try:
                self._owners_path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(self._owners_path, lambda f: f.write(json.dumps(owners).encode()))
            except OSError as e:  # the image is still indexed with its owner; only recovery is weaker
                log.warning("could not record an image owner: %s", e)

    # --- connections ----------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.db_path, timeout=_BUSY_TIMEOUT_MS / 1000,
                                   isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def _write(self, sql_or_fn, params: Sequence = ()):
        """Run a write (SQL text or ``fn(conn)``) in one BEGIN IMMEDIATE transaction."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = sql_or_fn(conn) if callable(sql_or_fn) else conn.execute(sql_or_fn, params)
            conn.execute("COMMIT")
            return result
        except BaseException:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise

    def _init_schema(self) -> bool:
        conn = self._conn()
        for attempt in range(50):  # switching to WAL needs a moment alone with the file
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or attempt == 49:
                    raise
                time.sleep(0.05)

        def create(c: sqlite3.Connection) -> bool:
            for statement in _statements(_SCHEMA):
                c.execute(statement)
            c.execute("SAVEPOINT fts")
            try:
                for statement in _statements(_FTS_SCHEMA):
                    c.execute(statement)
                c.execute("RELEASE fts")
                return True
            except sqlite3.OperationalError as e:
                c.execute("ROLLBACK TO fts")
                c.execute("RELEASE fts")
                if "fts5" not in str(e):
                    raise
                log.warning("SQLite has no FTS5; gallery search falls back to LIKE")
                return False

        return self._write(create)

    # --- saving off the critical path -------------------------------------------------------

    def save_async(self, image: Image.Image, meta: dict, owner: str | None = None):
        """Save on the gallery's writer thread; returns a ``concurrent.futures.Future`` of the
        GalleryImage (its ``result()`` raises GalleryError when the save failed).

        The caller gets control back at once, so the next image can be denoised while this one
        is encoded and indexed. Saves run in order; ``flush()`` (also run at interpreter exit)
        waits for every pending one, so nothing is lost on a clean shutdown.
        """
        from concurrent.futures import ThreadPoolExecutor

        with self._conns_lock:
            if self._writer is None:
                import atexit

                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gallery-save")
                atexit.register(self.flush)
            future = self._writer.submit(self.save, image, meta, owner)
            self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return future

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for pending saves; True when none is left."""
        from concurrent.futures import wait

        pending = list(self._pending)
        if pending:
            wait(pending, timeout=timeout)
        return not self._pending

    def close(self) -> None:
        """Close every connection this object opened (call when the app shuts down)."""
        self.flush()
        with self._conns_lock:
            for conn in self._conns:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._conns.clear()
        self._local = threading.local()

    # --- paths ----------------------------------------------------------------------------

    @property
    def images_dir(self) -> Path:
        """The folder the web app may serve (PNGs); thumbnails are in :attr:`thumbs_dir`."""
        return self._images

    @property
    def thumbs_dir(self) -> Path:
        """The folder of the thumbnails (``<id>.webp``)."""
        return self._thumbs

    def _thumb(self, image_id: str) -> Path:
        return self._thumbs / f"{image_id}.webp"

    def _abs(self, rel: str) -> Path:
        path = (self.data_dir / rel).resolve()
        if not path.is_relative_to(self._images):
            raise GalleryError(f"Index entry points outside the gallery: {rel!r}")
        return path

    @staticmethod
    def valid_id(image_id: Any) -> bool:
        """Whether ``image_id`` is a well-formed image id (16 lowercase hex digits)."""
        return isinstance(image_id, str) and bool(_ID_RE.match(image_id))

    def _storage_message(self, e: BaseException, action: str) -> str:
        reason = getattr(e, "strerror", None) or str(e)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or "full" in str(e).lower():
            hint = "Free some disk space, or start the studio with another data folder (--data-dir)."
        elif _is_storage_error(e):
            hint = ("The folder is read-only or not writable by this user: fix its permissions, "
                    "or start the studio with another data folder (--data-dir).")
        else:
            hint = "Check that the folder exists and is writable."
        return f"Could not {action} in {self.data_dir}: {reason}. {hint}"

    # --- rows -----------------------------------------------------------------------------

    def _row_values(self, image_id: str, rel: str, meta: dict, owner: str | None,
                    starred: bool = False) -> tuple:
        def num(key):  # an index column (SQLite INTEGER is 64-bit signed); the JSON keeps the exact value
            v = meta.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not abs(v) < 2**63:
                return None
            return int(v)

        try:
            created = _utc_iso(meta.get("created_at"))
        except (ValueError, TypeError, OverflowError):  # year 1 or 9999 shifted out of range by a zone
            created = _utc_iso()
        return (
            image_id, rel, created,
            str(meta.get("prompt") or ""), str(meta.get("negative_prompt") or ""),
            meta.get("variant") if isinstance(meta.get("variant"), str) else None,
            meta.get("mode") if isinstance(meta.get("mode"), str) else None,
            num("seed"), num("width"), num("height"), int(bool(starred)), owner,
            json.dumps(meta, ensure_ascii=False, default=str),
        )

    def _from_row(self, row: sqlite3.Row) -> GalleryImage:
        try:
            meta = json.loads(row["metadata"])
        except ValueError:
            meta = {}
        return GalleryImage(
            id=row["id"], path=self.data_dir / row["path"], thumb_path=self._thumb(row["id"]),
            created_at=row["created_at"], metadata=meta, starred=bool(row["starred"]),
            owner=row["owner"], prompt=row["prompt"], negative_prompt=row["negative_prompt"],
            variant=row["variant"], mode=row["mode"],
            seed=row["seed"] if row["seed"] is not None else _exact_int(meta.get("seed")), width=row["width"],
            height=row["height"],
        )

    # --- saving ---------------------------------------------------------------------------

    def save(self, image: Image.Image, meta: dict, owner: str | None = None) -> GalleryImage:
        """Store one image: PNG (atomic), thumbnail, then the index row.

        Raises :class:`GalleryError` (with what to do) when the data dir is read-only or full;
        nothing half-written is left in the index.
        """
        meta = dict(meta)
        meta.setdefault("created_at", dt.datetime.now().astimezone().isoformat(timespec="seconds"))
        image_id = secrets.token_hex(8)
        try:
            day = dt.datetime.fromisoformat(str(meta["created_at"]).replace("Z", "+00:00"))
            day = day.astimezone() if day.tzinfo else day
        except (ValueError, TypeError, OverflowError):
            day = dt.datetime.now()
        folder = self._images / day.strftime("%Y-%m-%d")
        if owner is not None:
            owner_dir = self.owner_folder(owner)
            self._remember_owner(owner_dir, owner)
            folder = self._images / owner_dir / day.strftime("%Y-%m-%d")
        path = folder / f"{image_id}.png"
        thumb = self._thumb(image_id)
        rel = path.relative_to(self.data_dir).as_posix()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            pnginfo.write_png(image, meta, path)
            self._write_thumb(image, thumb)
            values = self._row_values(image_id, rel, meta, owner)
            # Upsert: reconcile() running in another process may have indexed the PNG already
            # (without an owner); this row, with its owner, wins.
            self._write(
                f"INSERT INTO images ({_COLUMNS}) VALUES ({','.join('?' * 13)}) "
                "ON CONFLICT(id) DO UPDATE SET owner=excluded.owner, starred=excluded.starred",
                values,
            )
        except (OSError, sqlite3.Error) as e:
            for p in (path, thumb):
                try:
                    p.unlink()
                except OSError:
                    pass
            raise GalleryError(self._storage_message(e, "save the image")) from e
        return self._from_row(dict(zip(_COLUMNS.split(", "), values)))  # type: ignore[arg-type]

    def _write_thumb(self, image: Image.Image, thumb: Path) -> None:
        small = image.copy()
        small.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.LANCZOS)
        if small.mode not in ("RGB", "RGBA"):
            small = small.convert("RGBA" if "A" in small.getbands() else "RGB")
        atomic_write(thumb, lambda f: small.save(f, format="WEBP", quality=80, method=4))

    def bulk_index(self, entries: Iterable[dict]) -> int:
        """Insert index rows for PNGs written elsewhere (imports, benchmarks, tests).

        Each entry is a metadata dict with optional ``_id``, ``_path`` (relative to the data
        dir; default ``images/<date>/<id>.png``), ``_owner`` and ``_starred`` keys. No file is
        written or checked — run :meth:`reconcile` afterwards if the files may not exist. All
        rows go in one transaction. Returns the number of rows inserted.
        """
        rows = []
        for entry in entries:
            meta = {k: v for k, v in entry.items() if not k.startswith("_")}
            image_id = entry.get("_id") or secrets.token_hex(8)
            if not self.valid_id(image_id):
                raise GalleryError(f"Invalid image id {image_id!r}: ids are 16 hex digits.")
            values = self._row_values(image_id, "", meta, entry.get("_owner"), entry.get("_starred", False))
            rel = entry.get("_path") or f"images/{values[2][:10]}/{image_id}.png"
            rows.append((values[0], rel, *values[2:]))
        self._write(lambda c: c.executemany(
            f"INSERT INTO images ({_COLUMNS}) VALUES ({','.join('?' * 13)})", rows))
        return len(rows)

    # --- reading --------------------------------------------------------------------------

    def _owner_clause(self, owner: str | None) -> tuple[str, list]:
        return ("owner = ?", [owner]) if owner is not None else ("1", [])

    def get(self, image_id: str, owner: str | None = None) -> GalleryImage | None:
        """The image with this id, if this owner may see it (None otherwise, or for a malformed id)."""
        if not self.valid_id(image_id):
            return None
        clause, params = self._owner_clause(owner)
        row = self._conn().execute(
            f"SELECT {_COLUMNS} FROM images WHERE id = ? AND {clause}", [image_id, *params]
        ).fetchone()
        return self._from_row(row) if row else None

    def path_for(self, image_id: str, owner: str | None = None) -> Path | None:
        """The absolute PNG path of an image this owner may see (None otherwise)."""
        item = self.get(image_id, owner=owner)
        if item is None:
            return None
        try:
            return self._abs(item.path.relative_to(self.data_dir).as_posix())
        except (GalleryError, ValueError):
            return None

    def list(
        self,
        page: int = 0,
        page_size: int = 48,
        query: str | None = None,
        variant: str | None = None,
        mode: str | None = None,
        starred: bool | None = None,
        date_from: Any = None,
        date_to: Any = None,
        owner: str | None = None,
    ) -> Page:
        """One page of images, newest first, filtered. ``query`` matches words (as prefixes)
        in the prompt or negative prompt; dates are inclusive (a date means the whole day)."""
        page = max(0, min(int(page), 10**9))
        page_size = max(1, min(int(page_size), 1000))
        where, params = ["1"], []
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        if variant:
            where.append("variant = ?")
            params.append(variant)
        if mode:
            where.append("mode = ?")
            params.append(mode)
        if starred is not None:
            where.append("starred = ?")
            params.append(int(bool(starred)))
        for bound, end in ((date_from, False), (date_to, True)):
            if bound is not None and bound != "":
                op, value = _date_bound(bound, end)
                where.append(f"created_at {op} ?")
                params.append(value)
        if query and query.strip():
            if self.has_fts:
                fts = _fts_query(query)  # no words at all (just punctuation): no text filter
                if fts:
                    where.append("rowid IN (SELECT rowid FROM images_fts WHERE images_fts MATCH ?)")
                    params.append(fts)
            else:
                for word in re.findall(r"\w+", query)[:32]:
                    like = "%" + word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
                    where.append("(prompt LIKE ? ESCAPE '\\' OR negative_prompt LIKE ? ESCAPE '\\')")
                    params += [like, like]
        sql_where = " AND ".join(where)
        conn = self._conn()
        conn.execute("BEGIN")  # one snapshot for the count and the page
        try:
            total = conn.execute(f"SELECT count(*) FROM images WHERE {sql_where}", params).fetchone()[0]
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM images WHERE {sql_where} "
                "ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?",
                [*params, page_size, page * page_size],
            ).fetchall()
        finally:
            conn.execute("COMMIT")
        return Page([self._from_row(r) for r in rows], total, page, page_size)

    def references(self, sha: str) -> bool:
        """Whether any image's metadata names ``sha`` (a stored mask or init image)."""
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            return False
        row = self._conn().execute("SELECT 1 FROM images WHERE metadata LIKE ? LIMIT 1", [f"%{sha}%"]).fetchone()
        return row is not None

    def count(self, owner: str | None = None) -> int:
        """How many images this owner has (all of them with no owner)."""
        clause, params = self._owner_clause(owner)
        return self._conn().execute(f"SELECT count(*) FROM images WHERE {clause}", params).fetchone()[0]

    # --- changing -------------------------------------------------------------------------

    def star(self, image_id: str, starred: bool = True, owner: str | None = None) -> bool:
        """Star or unstar an image. Returns False when there is no such image (for this owner)."""
        if not self.valid_id(image_id):
            return False
        clause, params = self._owner_clause(owner)
        try:
            cur = self._write(f"UPDATE images SET starred = ? WHERE id = ? AND {clause}",
                              [int(bool(starred)), image_id, *params])
        except sqlite3.Error as e:
            raise GalleryError(self._storage_message(e, "update the gallery index")) from e
        return cur.rowcount > 0

    def delete(self, image_id: str, owner: str | None = None) -> bool:
        """Delete the PNG, the thumbnail and the row. Returns False when there is no such image.

        Files go first: if the process dies in between, reconcile drops the row (deleting the
        row first would let reconcile resurrect the image from its orphan PNG).
        """
        item = self.get(image_id, owner=owner)
        if item is None:
            return False
        try:
            for p in (self._abs(item.path.relative_to(self.data_dir).as_posix()), item.thumb_path):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
            clause, params = self._owner_clause(owner)
            self._write(f"DELETE FROM images WHERE id = ? AND {clause}", [image_id, *params])
        except (OSError, sqlite3.Error) as e:
            raise GalleryError(self._storage_message(e, "delete the image")) from e
        return True

    def export_zip(self, ids: Iterable[str], dest_path: str | os.PathLike,
                   owner: str | None = None) -> Path:
        """Write the original PNGs (metadata intact) of ``ids`` into a zip at ``dest_path``.

        Ids that do not exist (or belong to another owner) are left out; if none is left,
        :class:`GalleryError` is raised. The zip is written atomically.
        """
        dest = Path(dest_path)
        files = []
        for image_id in dict.fromkeys(ids):
            path = self.path_for(image_id, owner=owner)
            if path is not None and path.is_file():
                files.append((image_id, path))
        if not files:
            raise GalleryError("None of the selected images exist any more; nothing to export.")
        def write(f):
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf:
                for image_id, path in files:
                    zf.write(path, arcname=f"{image_id}.png")

        try:
            atomic_write(dest, write)
        except OSError as e:
            raise GalleryError(f"Could not write {dest}: {e.strerror or e}.") from e
        return dest

    # --- repair ---------------------------------------------------------------------------

    def reconcile(self, temp_grace_s: float = 300.0) -> ReconcileReport:
        """Make the index and the files agree again (after a crash, or files moved by hand).

        * temp files (``.*.tmp``) older than ``temp_grace_s`` are removed (younger ones may
          belong to a save in progress in another process);
        * rows whose PNG is gone are dropped;
        * PNGs with no row are re-indexed from their own metadata, each with its owner (from
          its owner folder, ``images/o-…/``); damaged/truncated PNGs are reported, not touched;
        * missing thumbnails are rebuilt, thumbnails of no image removed.

        Per-file problems are collected in the report, never raised.
        """
        report = ReconcileReport()
        now = time.time()
        for folder in (self._images, self._thumbs, self.data_dir):
            pattern = "**/.*" + _TEMP_SUFFIX if folder == self._images else ".*" + _TEMP_SUFFIX
            for tmp in folder.glob(pattern):
                try:
                    if now - tmp.stat().st_mtime >= temp_grace_s:
                        tmp.unlink()
                        report.temp_removed.append(str(tmp.relative_to(self.data_dir)))
                except FileNotFoundError:
                    pass
                except OSError as e:
                    report.errors.append((str(tmp), str(e)))

        conn = self._conn()
        rows = conn.execute("SELECT id, path FROM images").fetchall()
        known = {r["id"]: r["path"] for r in rows}
        # one listing of the files, matched against the rows (no per-row path resolution: a start
        # with 10,000 images stays fast); a row whose path is not in the listing is checked alone
        pngs = sorted([*self._images.glob("*/*.png"), *self._images.glob("o-*/*/*.png")])
        listed = {png.relative_to(self.data_dir).as_posix() for png in pngs}
        gone = []
        for image_id, rel in known.items():
            if rel in listed:
                continue
            try:
                if not self._abs(rel).is_file():
                    gone.append(image_id)
            except GalleryError:
                gone.append(image_id)
        if gone:
            try:
                self._write(lambda c: c.executemany(
                    "DELETE FROM images WHERE id = ?", [(i,) for i in gone]))
                report.dropped.extend(gone)
            except sqlite3.Error as e:
                report.errors.append(("index", str(e)))
        alive = set(known) - set(gone)

        owners = self._owners()
        for png in pngs:
            image_id = png.stem
            if image_id in alive:
                continue
            rel = png.relative_to(self.data_dir).as_posix()
            top = png.relative_to(self._images).parts[0]
            owner = owners.get(top) if top.startswith("o-") else None
            if top.startswith("o-") and owner is None:
                report.skipped.append((rel, "its owner is not recorded (cache/owners.json); kept, not indexed"))
                continue
            if not self.valid_id(image_id):
                report.skipped.append((rel, "file name is not a gallery id"))
                continue
            try:
                problem = _check_png(png)
                if problem:
                    report.skipped.append((rel, problem))
                    continue
                info = pnginfo.read_png_info(png)
                meta = dict(info.fields)
                if info.source != "studio":
                    meta.setdefault("created_at", dt.datetime.fromtimestamp(png.stat().st_mtime).astimezone().isoformat())
                    meta.setdefault("imported_from", info.source)
                if info.width and "width" not in meta:
                    meta["width"], meta["height"] = info.width, info.height
                values = self._row_values(image_id, rel, meta, owner)
                cur = self._write(
                    f"INSERT OR IGNORE INTO images ({_COLUMNS}) VALUES ({','.join('?' * 13)})", values)
                if cur.rowcount:
                    report.added.append(image_id)
                alive.add(image_id)
            except Exception as e:  # noqa: BLE001 — report and go on with the other files
                report.errors.append((rel, f"{type(e).__name__}: {e}"))

        thumbs = {t.stem for t in self._thumbs.glob("*.webp")}
        for image_id in sorted(alive):
            thumb = self._thumb(image_id)
            if image_id in thumbs:
                continue
            png = self.path_for(image_id)
            if png is None:
                continue
            try:
                with Image.open(png) as im:
                    im.load()
                    self._write_thumb(im, thumb)
                report.thumbs.append(image_id)
            except Exception as e:  # noqa: BLE001
                report.errors.append((image_id, f"thumbnail: {type(e).__name__}: {e}"))
        for thumb in (self._thumb(stem) for stem in sorted(thumbs - alive)):
            if self.valid_id(thumb.stem):
                try:
                    # A young thumbnail may belong to a save in progress in another process.
                    if now - thumb.stat().st_mtime < temp_grace_s or self.get(thumb.stem):
                        continue
                    thumb.unlink()
                    report.thumbs_removed.append(thumb.name)
                except OSError as e:
                    report.errors.append((str(thumb), str(e)))
        return report

    def integrity_ok(self) -> bool:
        """SQLite's own integrity check of the index (and of the FTS index when present)."""
        conn = self._conn()
        if conn.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            return False
        if self.has_fts:
            try:
                conn.execute("INSERT INTO images_fts(images_fts) VALUES ('integrity-check')")
            except sqlite3.DatabaseError:
                return False
        return True


def _exact_int(value):
    """A seed past SQLite's 64-bit signed column, from the JSON metadata (None if not a whole number)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _is_corrupt(e: BaseException) -> bool:
    text = str(e).lower()
    return "not a database" in text or "malformed" in text or "file is encrypted" in text


def _check_png(path: Path) -> str | None:
    """Why a PNG is not a complete, intact image (None when it is). Pixels are not decoded."""
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                return f"not a PNG ({im.format})"
            im.verify()  # walks every chunk to IEND and checks CRCs
    except Image.DecompressionBombError as e:
        return f"too large to be a studio image ({e})"
    except Exception as e:  # noqa: BLE001
        return f"damaged or incomplete PNG ({type(e).__name__}: {e})"
    return None
