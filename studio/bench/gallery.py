"""Gallery index latency at scale: page and search times over ``n`` indexed images.

Rows are inserted through :meth:`Gallery.bulk_index` (no PNG is encoded), so building a
10,000-image index takes about a second; the timings are what the gallery tab waits for.
"""

from __future__ import annotations

import datetime as dt
import random
import statistics
import tempfile
import time
from pathlib import Path

from studio.gallery import Gallery

_SUBJECTS = ["cat", "dog", "castle", "robot", "forest", "portrait", "city", "ocean", "dragon",
             "astronaut", "flower", "mountain", "car", "owl", "lighthouse", "samurai"]
_STYLES = ["oil painting", "photograph", "watercolor", "pixel art", "3d render", "ink sketch",
           "cinematic lighting", "studio lighting", "golden hour", "isometric"]
_VARIANTS = ["sd3.5-medium", "sd3.5-large", "sd3.5-large-turbo", "sd3-medium"]
NEEDLE = "zanzibarquux"  # a word put in exactly every 97th prompt, for a checkable search


def build_entries(n: int, seed: int = 0) -> list[dict]:
    """``n`` synthetic index rows (seeded): varied prompts, modes, variants, owners and stars,
    :data:`NEEDLE` in every 97th prompt."""
    rng = random.Random(seed)
    start = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    entries = []
    for i in range(n):
        words = [rng.choice(_SUBJECTS), "in a", rng.choice(_SUBJECTS), rng.choice(_STYLES)]
        if i % 97 == 0:
            words.append(NEEDLE)
        variant = _VARIANTS[i % len(_VARIANTS)]
        entries.append({
            "_id": f"{i:016x}",
            "_owner": "alice" if i % 2 else "bob",
            "_starred": i % 10 == 0,
            "studio_version": "0.1.0",
            "mode": "img2img" if i % 5 == 0 else "txt2img",
            "prompt": ", ".join(words),
            "negative_prompt": "blurry, low quality" if i % 3 else "",
            "steps": 28, "guidance": 3.5, "seed": rng.randrange(2**32),
            "width": 1024, "height": 1024, "variant": variant,
            "created_at": (start + dt.timedelta(minutes=i)).isoformat(),
        })
    return entries


def _ms(fn, repeat: int = 7) -> float:
    fn()  # warm the page cache / statement cache
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def run(n: int = 10_000, data_dir: str | Path | None = None) -> dict:
    """Build an ``n``-image index and time the gallery's queries (median of 7, in ms).

    Returns ``page_ms`` (first page, 48 newest), ``deep_page_ms`` (a page near the end),
    ``search_ms`` (full-text search, first page), ``filtered_search_ms`` (search + variant +
    owner + starred filters), ``build_s``, plus the result counts so callers can check them.
    """
    tmp = None
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="gallery-bench-")
        data_dir = tmp.name
    try:
        gallery = Gallery(data_dir)
        entries = build_entries(n)
        t0 = time.perf_counter()
        gallery.bulk_index(entries)
        build_s = time.perf_counter() - t0
        last_page = max(0, (n - 1) // 48)
        first = gallery.list(page=0)
        search = gallery.list(query=NEEDLE)
        result = {
            "n": gallery.count(),
            "build_s": round(build_s, 3),
            "page_ms": round(_ms(lambda: gallery.list(page=0)), 3),
            "deep_page_ms": round(_ms(lambda: gallery.list(page=last_page)), 3),
            "search_ms": round(_ms(lambda: gallery.list(query=NEEDLE)), 3),
            "filtered_search_ms": round(_ms(lambda: gallery.list(
                query="cat", variant="sd3.5-large", owner="alice", starred=False)), 3),
            "fts": gallery.has_fts,
            "page_ids": [item.id for item in first.items],
            "search_total": search.total,
            "search_expected": sum(1 for e in entries if NEEDLE in e["prompt"]),
            "search_ids": [item.id for item in search.items],
        }
        gallery.close()
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


def build_data_dir(data_dir: str | Path, n: int) -> Path:
    """A data dir holding ``n`` consistent gallery images — PNG with metadata, thumbnail and index
    row each — as a studio that made them leaves it: the state every start reconciles. One image
    is saved for real; the rest are byte copies under their own ids (no PNG is encoded ``n`` times)."""
    import shutil

    from PIL import Image

    data_dir = Path(data_dir)
    gallery = Gallery(data_dir)
    try:
        first = gallery.save(Image.new("RGB", (64, 64), (90, 120, 150)), build_entries(1)[0] | {"prompt": "seed"})
        png, thumb = Path(first.path), gallery._thumb(first.id)  # noqa: SLF001 - the bench builds the layout
        entries = build_entries(n - 1, seed=1)
        for e in entries:
            rel = f"images/2024-01-01/{e['_id']}.png"
            target = data_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, target)
            shutil.copyfile(thumb, gallery._thumb(e["_id"]))  # noqa: SLF001
            e["_path"] = rel
            e.pop("_owner")  # no owner folder: the local layout
        gallery.bulk_index(entries)
        assert gallery.count() == n
    finally:
        gallery.close()
    return data_dir


def reconcile_run(n: int = 10_000, data_dir: str | Path | None = None, repeat: int = 5) -> dict:
    """``reconcile_s``: what every start spends bringing an ``n``-image gallery and its files into
    agreement when nothing needs fixing (median of ``repeat``); ``reconcile_per_1k_ms``."""
    tmp = None
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="reconcile-bench-")
        data_dir = tmp.name
    try:
        build_data_dir(data_dir, n)
        times = []
        for _ in range(repeat):
            gallery = Gallery(data_dir)
            t0 = time.perf_counter()
            report = gallery.reconcile()
            times.append(time.perf_counter() - t0)
            gallery.close()
            assert not (report.added or report.dropped or report.errors), "a consistent gallery changed"
        s = statistics.median(times)
        return {"reconcile_n": n, "reconcile_s": round(s, 4), "reconcile_per_1k_ms": round(1000 * s / n * 1000, 3)}
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    out = run()
    print({k: v for k, v in out.items() if not k.endswith("_ids")})
