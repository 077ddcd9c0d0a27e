"""The gallery store: files + SQLite index, owners, concurrency, crash recovery, scale."""

from __future__ import annotations

import datetime as dt
import errno
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from studio.bench import gallery as bench_gallery
from studio.metadata import png as pnginfo
from studio.gallery import Gallery, GalleryError

ROOT = Path(__file__).resolve().parents[1]


def meta(prompt="a cat in a hat", **kw):
    m = {
        "studio_version": "0.1.0", "mode": "txt2img", "prompt": prompt,
        "negative_prompt": "blurry", "steps": 28, "guidance": 3.5, "seed": 1,
        "width": 64, "height": 48, "variant": "sd3.5-medium", "model": "SD3.5 Medium",
        "source": "stabilityai/stable-diffusion-3.5-medium", "preset": "balanced",
        "sampler": "Euler", "scheduler": "FlowMatchEulerDiscreteScheduler", "shift": 3.0,
        "slg": None, "max_sequence_length": 256, "strength": None, "init_image_sha256": None,
        "batch_size": 1, "batch_count": 1, "batch_index": 0, "image_index": 0,
        "timings": {"total_s": 1.0}, "created_at": "2025-03-04T05:06:07+00:00",
        "extra_key": ["kept"],
    }
    m.update(kw)
    return m


def img(w=64, h=48, color=(200, 30, 30)):
    return Image.new("RGB", (w, h), color)


@pytest.fixture
def gallery(tmp_path):
    g = Gallery(tmp_path / "data")
    yield g
    g.close()


def index_ids(g: Gallery) -> set[str]:
    return {r[0] for r in sqlite3.connect(g.db_path).execute("SELECT id FROM images")}


def png_ids(g: Gallery) -> set[str]:
    return {p.stem for p in g.images_dir.rglob("*.png") if Gallery.valid_id(p.stem)}


# --- basics -----------------------------------------------------------------------------------


def test_save_get_files_and_metadata(gallery):
    item = gallery.save(img(), meta())
    assert gallery.valid_id(item.id) and len(item.id) == 16
    assert item.path == gallery.images_dir / "2025-03-04" / f"{item.id}.png"
    assert item.path.is_file() and item.thumb_path.is_file()
    with Image.open(item.thumb_path) as t:
        assert t.format == "WEBP" and max(t.size) <= 256
    info = pnginfo.read_png_info(item.path)
    assert info.source == "studio" and info.fields == meta()  # metadata in the file, exact
    got = gallery.get(item.id)
    assert got.metadata == meta() and got.prompt == "a cat in a hat" and got.seed == 1
    assert got.created_at == "2025-03-04T05:06:07.000000+00:00" and not got.starred
    assert gallery.path_for(item.id) == item.path
    assert gallery.count() == 1
    assert (gallery.data_dir / "gallery.sqlite").is_file()
    mode = sqlite3.connect(gallery.db_path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_big_image_thumbnail_is_256(gallery):
    item = gallery.save(img(1024, 512), meta(width=1024, height=512))
    with Image.open(item.thumb_path) as t:
        assert t.size == (256, 128)


def test_ids_are_random_and_paths_are_never_user_supplied(gallery):
    ids = {gallery.save(img(8, 8), meta()).id for _ in range(5)}
    assert len(ids) == 5
    for bad in ("../gallery.sqlite", "..", "/etc/passwd", "ABCDEF0123456789", "0" * 15, "", None, 5,
                "0123456789abcdef/../../x"):
        assert gallery.get(bad) is None
        assert gallery.path_for(bad) is None
        assert gallery.star(bad) is False
        assert gallery.delete(bad) is False


def test_list_newest_first_paging_and_filters(gallery):
    base = dt.datetime(2025, 5, 1, 12, 0, tzinfo=dt.timezone.utc)
    made = []
    for i in range(7):
        made.append(gallery.save(img(8, 8), meta(
            prompt=f"image {i} " + ("red castle" if i % 2 else "blue ocean, waves"),
            negative_prompt="ugly" if i == 3 else "blurry",
            variant="sd3.5-large" if i < 3 else "sd3.5-medium",
            mode="img2img" if i == 5 else "txt2img",
            created_at=(base + dt.timedelta(days=i)).isoformat())))
    page = gallery.list(page=0, page_size=3)
    assert [x.id for x in page.items] == [made[6].id, made[5].id, made[4].id]
    assert page.total == 7 and page.pages == 3
    assert [x.id for x in gallery.list(page=2, page_size=3).items] == [made[0].id]
    assert gallery.list(page=9, page_size=3).items == []
    assert {x.id for x in gallery.list(query="castle").items} == {made[i].id for i in (1, 3, 5)}
    assert gallery.list(query="CAST").total == 3  # prefix, case-insensitive
    assert gallery.list(query="blue waves").total == 4  # every word must match
    assert gallery.list(query="ugly").items[0].id == made[3].id  # negative prompt searched too
    assert gallery.list(query='"; DROP TABLE images; --').total == 0  # FTS syntax is escaped
    assert gallery.list(query="NEAR(").total == 0
    assert gallery.list(query=" ,; ").total == 7  # no words: no text filter
    gallery.has_fts = False  # SQLite without FTS5: the LIKE fallback gives the same answers
    assert {x.id for x in gallery.list(query="castle").items} == {made[i].id for i in (1, 3, 5)}
    assert gallery.list(query="blue waves").total == 4 and gallery.list(query="100%").total == 0
    gallery.has_fts = True
    assert gallery.list(variant="sd3.5-large").total == 3
    assert gallery.list(mode="img2img").items[0].id == made[5].id
    assert gallery.list(query="castle", variant="sd3.5-medium").total == 2
    assert gallery.list(date_from="2025-05-03", date_to="2025-05-04").total == 2
    assert gallery.list(date_from=dt.date(2025, 5, 6)).total == 2
    assert gallery.list(date_to=base + dt.timedelta(days=1)).total == 2  # datetime: inclusive
    with pytest.raises(GalleryError, match="YYYY-MM-DD"):
        gallery.list(date_from="last tuesday")


def test_star_delete_and_export_zip(gallery, tmp_path):
    a, b, c = (gallery.save(img(8, 8), meta(prompt=p)) for p in ("one", "two", "three"))
    assert gallery.star(a.id) and gallery.get(a.id).starred
    assert [x.id for x in gallery.list(starred=True).items] == [a.id]
    assert gallery.list(starred=False).total == 2
    assert gallery.star(a.id, False) and not gallery.get(a.id).starred

    assert gallery.delete(b.id)
    assert not b.path.exists() and not b.thumb_path.exists() and gallery.get(b.id) is None
    assert gallery.delete(b.id) is False
    assert gallery.count() == 2

    out = gallery.export_zip([a.id, b.id, c.id, a.id, "../../etc"], tmp_path / "out.zip")
    with zipfile.ZipFile(out) as zf:
        assert sorted(zf.namelist()) == sorted([f"{a.id}.png", f"{c.id}.png"])
        assert zf.read(f"{a.id}.png") == a.path.read_bytes()  # the original bytes
        assert pnginfo.read_png_info(zf.read(f"{c.id}.png")).fields["prompt"] == "three"
    with pytest.raises(GalleryError, match="nothing to export"):
        gallery.export_zip([b.id], tmp_path / "none.zip")
    assert not (tmp_path / "none.zip").exists()


def test_owner_isolation(gallery, tmp_path):
    alice = gallery.save(img(8, 8), meta(prompt="alice castle"), owner="alice")
    bob = gallery.save(img(8, 8), meta(prompt="bob castle"), owner="bob")
    assert gallery.get(alice.id, owner="alice").owner == "alice"
    assert gallery.get(alice.id, owner="bob") is None
    assert gallery.path_for(alice.id, owner="bob") is None
    assert [x.id for x in gallery.list(owner="bob").items] == [bob.id]
    assert [x.id for x in gallery.list(query="castle", owner="alice").items] == [alice.id]
    assert gallery.count(owner="alice") == 1 and gallery.count() == 2
    assert gallery.star(alice.id, owner="bob") is False and not gallery.get(alice.id).starred
    assert gallery.delete(alice.id, owner="bob") is False and alice.path.exists()
    with pytest.raises(GalleryError):
        gallery.export_zip([alice.id], tmp_path / "x.zip", owner="bob")
    assert gallery.delete(alice.id, owner="alice") and gallery.count() == 1


# --- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
def test_full_or_read_only_dir_raises_clear_error(gallery, monkeypatch, err):
    keep = gallery.save(img(8, 8), meta())

    def fail(*_a, **_k):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(pnginfo.os, "replace", fail)  # the rename of the finished PNG fails
    with pytest.raises(GalleryError) as e:
        gallery.save(img(8, 8), meta())
    msg = str(e.value)
    assert str(gallery.data_dir) in msg and "--data-dir" in msg
    assert ("disk space" in msg) if err == errno.ENOSPC else ("read-only" in msg)
    monkeypatch.undo()
    assert gallery.integrity_ok() and index_ids(gallery) == {keep.id} == png_ids(gallery)
    assert not list(gallery.data_dir.rglob("*.tmp"))
    assert {p.stem for p in gallery.thumbs_dir.iterdir()} == {keep.id}


def test_index_write_failure_leaves_no_files(gallery, monkeypatch):
    def fail(*_a, **_k):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(gallery, "_write", fail)
    with pytest.raises(GalleryError, match="read-only"):
        gallery.save(img(8, 8), meta())
    monkeypatch.undo()
    assert gallery.count() == 0 and png_ids(gallery) == set()
    assert list(gallery.thumbs_dir.iterdir()) == [] and gallery.integrity_ok()


# --- reconcile --------------------------------------------------------------------------------


def test_reconcile_repairs_injected_inconsistencies(gallery):
    keep, gone, nothumb = (gallery.save(img(8, 8), meta(prompt=p), owner="o") for p in ("keep", "gone", "nothumb"))
    orphan = gallery.save(img(8, 8), meta(prompt="orphan castle"), owner="o")
    gone.path.unlink()  # file deleted by hand
    nothumb.thumb_path.unlink()  # thumbnail lost
    with sqlite3.connect(gallery.db_path) as c:  # row lost (crash before commit)
        c.execute("DELETE FROM images WHERE id = ?", (orphan.id,))
    day = keep.path.parent
    (day / f".{'a' * 16}.png.1234.tmp").write_bytes(keep.path.read_bytes()[:100])  # half written
    (gallery.thumbs_dir / f"{'b' * 16}.webp").write_bytes(b"stray")
    (day / "holiday.png").write_bytes(keep.path.read_bytes())  # dropped in by hand: not an id
    (day / f"{'c' * 16}.png").write_bytes(keep.path.read_bytes()[:300])  # truncated PNG

    report = gallery.reconcile(temp_grace_s=0)
    assert report.dropped == [gone.id]
    assert report.added == [orphan.id]
    assert report.thumbs == [nothumb.id] and nothumb.thumb_path.is_file()
    assert len(report.temp_removed) == 1
    assert sorted(report.thumbs_removed) == sorted([f"{'b' * 16}.webp", f"{gone.id}.webp"])
    skipped = dict(report.skipped)
    rel = day.relative_to(gallery.data_dir).as_posix()  # images/o-<keyed hash of "o">/<date>
    assert rel.startswith("images/o-") and "/o/" not in rel, "the owner's folder names nobody"
    assert "not a gallery id" in skipped[f"{rel}/holiday.png"]
    assert "damaged or incomplete" in skipped[f"{rel}/{'c' * 16}.png"]
    assert report.errors == []
    summary = report.summary()
    assert "1 image re-indexed" in summary and "1 entry dropped" in summary
    assert "1 thumbnail rebuilt" in summary and "1 unfinished temp file removed" in summary

    back = gallery.get(orphan.id)
    assert back.metadata == meta(prompt="orphan castle")
    assert back.owner == "o", "re-indexed with its owner, from its owner folder (the PNG names no owner)"
    assert gallery.list(query="castle").items[0].id == orphan.id
    assert gallery.get(orphan.id, owner="o").id == orphan.id and gallery.get(orphan.id, owner="p") is None
    again = gallery.reconcile(temp_grace_s=0)
    assert not again.changed and "consistent" in again.summary()


def test_reconcile_keeps_young_temp_files(gallery):
    tmp = gallery.images_dir / "2025-01-01"
    tmp.mkdir()
    young = tmp / f".{'d' * 16}.png.beef.tmp"
    young.write_bytes(b"in progress")
    assert gallery.reconcile().temp_removed == [] and young.exists()  # default grace: 5 minutes
    assert gallery.reconcile(temp_grace_s=0).temp_removed and not young.exists()


def test_reconcile_reports_unreadable_files_without_raising(gallery, monkeypatch):
    a = gallery.save(img(8, 8), meta())
    a.thumb_path.unlink()

    def boom(*_a, **_k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Image, "open", boom)
    report = gallery.reconcile(temp_grace_s=0)
    assert report.errors and "disk on fire" in report.errors[0][1]
    assert "Problems:" in report.summary()


# --- crashes and concurrency --------------------------------------------------------------------

WRITER = r"""
import sys, itertools
from PIL import Image
from studio.gallery import Gallery
g = Gallery(sys.argv[1])
owner, count, size = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
for i in (itertools.count() if count < 0 else range(count)):
    im = Image.effect_noise((size, size), 80).convert("RGB")  # noise: slow to encode
    m = {"prompt": f"{owner} picture {i}", "negative_prompt": "", "mode": "txt2img",
         "seed": i, "width": 256, "height": 256, "variant": "sd3.5-medium", "steps": 4}
    g.save(im, m, owner=owner)
    print(i, flush=True)
"""


def spawn_writer(data_dir, owner, count, size=256):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", WRITER, str(data_dir), owner, str(count), str(size)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def test_writer_killed_mid_save_then_reconcile(tmp_path):
    data = tmp_path / "data"
    # Big images die mostly inside the PNG write, small ones anywhere in save() (thumbnail,
    # index commit): between them the kill lands in every phase.
    for round_, (size, delay) in enumerate([(256, 0.0), (256, 0.013), (16, 0.0), (16, 0.002), (16, 0.005)]):
        child = spawn_writer(data, "w", -1, size)
        try:
            for _ in range(3 + round_):  # let it save a few, then kill it mid-flight
                assert child.stdout.readline(), child.stderr.read()
            time.sleep(delay)
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
            child.stdout.close()
            child.stderr.close()
        g = Gallery(data)
        report = g.reconcile(temp_grace_s=0)
        assert report.errors == [], report.summary()
        assert g.integrity_ok()
        assert not list(data.rglob("*.tmp"))
        rows = g.list(page_size=1000).items
        for item in rows:  # every row's file opens and is a complete image
            with Image.open(item.path) as im:
                im.load()
            assert item.thumb_path.is_file()
            assert pnginfo.read_png_info(item.path).fields["prompt"] == item.prompt
        assert index_ids(g) == png_ids(g)  # every complete PNG is indexed
        g.close()
    assert len(rows) >= 3 + 4 + 5 + 6 + 7


def test_concurrent_threads_and_processes(tmp_path):
    data = tmp_path / "data"
    procs = [spawn_writer(data, f"p{i}", 6) for i in range(2)]
    g = Gallery(data)  # opened while the children open it too
    errors = []

    def work(n):
        try:
            for i in range(8):
                g.save(img(32, 32, (n * 40, i * 20, 0)), meta(prompt=f"thread {n} image {i}"), owner=f"t{n}")
                g.list(query="image", page_size=5)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert errors == []
    assert g.count() == 2 * 6 + 4 * 8
    assert all(g.count(owner=f"p{i}") == 6 for i in range(2))
    assert all(g.count(owner=f"t{n}") == 8 for n in range(4))
    assert g.list(query="thread", owner="t2").total == 8 and g.list(query="picture").total == 12
    assert g.integrity_ok() and index_ids(g) == png_ids(g)
    assert not g.reconcile(temp_grace_s=0).changed
    g.close()


# --- scale ----------------------------------------------------------------------------------------


@pytest.mark.slow  # builds a 10,000-row index (about 2 s)
def test_bulk_index_10k_page_and_search_results(tmp_path):
    result = bench_gallery.run(n=10_000, data_dir=tmp_path / "bench")
    assert result["n"] == 10_000
    assert result["page_ids"] == [f"{i:016x}" for i in range(9999, 9999 - 48, -1)]  # newest first
    assert result["search_total"] == result["search_expected"] == len(range(0, 10_000, 97))
    assert result["search_ids"][:3] == [f"{i:016x}" for i in (9991, 9894, 9797)]
    for key in ("page_ms", "deep_page_ms", "search_ms", "filtered_search_ms"):
        assert result[key] > 0
    g = Gallery(tmp_path / "bench")  # filters over the bulk rows
    assert g.count(owner="alice") == 5000
    assert g.list(variant="sd3-medium", starred=True).total == len(
        [i for i in range(10_000) if i % 4 == 3 and i % 10 == 0])
    g.close()


def test_bulk_index_rejects_bad_ids(gallery):
    with pytest.raises(GalleryError, match="16 hex"):
        gallery.bulk_index([{"_id": "../x", "prompt": "p"}])
    assert gallery.count() == 0
