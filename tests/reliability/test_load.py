"""Load: twenty API clients at once, and a burst past the queue's limit. Every request completes
or is refused with a message; nothing deadlocks; memory comes back; the gallery holds exactly
the successful generations."""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import pytest
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError

from tests.reliability.kit import launched_with_queue, new_client, rss, settled_rss

USERS = 20
DEADLINE_S = 240  # 20 one-step 256² generations take ~10 s on one CPU core; a hang never ends


def _wave(url, downloads: Path, first_seed: int) -> tuple[dict, list, list]:
    """USERS threads, each with its own client, each submitting one generation at once.

    The clients connect first, one after another (each reads the app's whole config and API, a
    few hundred components: twenty at once on two busy cores time out before any generation is
    asked for, which is not what this test measures); the generations then start together."""
    done: dict[int, tuple] = {}
    refused: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(USERS)
    clients = [new_client(url, downloads / f"u{i}") for i in range(USERS)]

    def user(i: int) -> None:
        client = clients[i]
        try:
            start.wait(60)
            out = client.predict(prompt=f"crowd {first_seed + i}", seed=first_seed + i, steps=1,
                                 width=256, height=256, api_name="/txt2img")
            with lock:
                done[i] = out
        except QueueError as e:
            with lock:
                refused.append(str(e))
        except Exception as e:  # noqa: BLE001 — collected and reported
            with lock:
                errors.append(f"user {i}: {type(e).__name__}: {e}")
        finally:
            if client is not None:
                client.close()  # the user leaves (stops its heartbeat, as a closed browser tab does)

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(USERS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, DEADLINE_S - (time.monotonic() - t0)))
    assert not any(t.is_alive() for t in threads), f"requests still hanging after {DEADLINE_S} s"
    return done, refused, errors


def _alive(cls) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is cls)


@pytest.mark.slow
def test_twenty_clients_at_once_all_finish_and_memory_comes_back(app, tmp_path):
    from studio.engine import GeneratedImage, GenerationResult

    gallery = app.studio.gallery
    count0 = gallery.count()
    # A first burst pays one-off costs: Gradio's worker threads, a glibc malloc arena per thread,
    # per-session state. It is also a full check of its own.
    warm, refused, errors = _wave(app.url, tmp_path, 1000)
    assert errors == [] and refused == []  # 20 < the queue's 64: nobody is turned away
    assert sorted(warm) == list(range(USERS))
    for i, (images, seed, info) in warm.items():
        assert seed == 1000 + i and len(images) == 1 and Path(images[0]).is_file()
    gallery.flush(30)
    assert gallery.count() == count0 + USERS, "every success is in the gallery, once"
    baseline = settled_rss()
    threads = threading.active_count()

    done, refused, errors = _wave(app.url, tmp_path, 2000)
    assert errors == [] and refused == [] and len(done) == USERS
    gallery.flush(30)
    assert gallery.count() == count0 + 2 * USERS
    # RSS, after gc and malloc_trim, comes back near the warm baseline. RSS is a coarse
    # instrument here: over five further bursts of 20 it measured -5 to +110 MB, one jump of up to
    # ~85 MB (glibc arenas of Gradio's worker threads settling) then ~3 MB a burst (Gradio keeps
    # each client session's state until it expires). A leak of per-request output at a real size
    # (latents + pixels + PNG of one 1024² image are ~8 MB: 160 MB a burst) or of activations
    # crosses 150 MB; the object checks below catch small leaks exactly.
    growth = settled_rss() - baseline
    print(f"RSS after the second wave: {growth / 2**20:+.0f} MB over the warm baseline ({rss() >> 20} MB)")
    assert growth < 150 << 20, f"the second wave left {growth >> 20} MB behind"
    # Nothing of a finished request is held: no result or image object survives, no generation
    # thread is left behind.
    assert _alive(GenerationResult) == 0 and _alive(GeneratedImage) == 0
    assert not [t for t in threading.enumerate() if t.name == "studio-generate"]
    # client and worker threads of the burst wind down on their own; give them a moment on a busy machine
    deadline = time.monotonic() + 30
    while threading.active_count() > threads + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert threading.active_count() <= threads + 2, sorted(t.name for t in threading.enumerate())
    assert gallery.integrity_ok()


@pytest.mark.slow
def test_a_burst_past_the_queue_limit_is_refused_with_a_message(tmp_path, tiny_family):
    """A queue of 3: one generation running (held), three waiting, two more refused at once with
    "Queue is full"; the held and queued ones then finish and are the only ones in the gallery."""
    with launched_with_queue(tmp_path / "data", tiny_family, max_size=3) as (url, studio, demo):
        warm = new_client(url, tmp_path / "warm")
        warm.predict(prompt="warm up", steps=1, width=256, height=256, api_name="/txt2img")
        gallery = studio.gallery
        gallery.flush(30)
        count0 = gallery.count()

        real = studio.engine.generate
        entered, release = threading.Event(), threading.Event()

        def held(*a, **k):
            entered.set()
            release.wait(120)
            return real(*a, **k)

        studio.engine.generate = held
        try:
            clients = []

            def submit(i):
                client = new_client(url, tmp_path / f"c{i}")
                clients.append(client)
                return client.submit(prompt=f"burst {i}", seed=i, steps=1, width=256, height=256,
                                     api_name="/txt2img")

            running = submit(0)
            assert entered.wait(60), "the first request never started"
            queued = [submit(i) for i in (1, 2, 3)]
            deadline = time.monotonic() + 60
            while len(demo._queue) < 3:
                assert time.monotonic() < deadline, "the three requests never reached the queue"
                time.sleep(0.05)
            overflow = [submit(i) for i in (4, 5)]
            for job in overflow:
                with pytest.raises(QueueError, match="Queue is full"):
                    job.result(timeout=60)
        finally:
            release.set()
            studio.engine.generate = real
        results = [job.result(timeout=120) for job in [running, *queued]]
        for client in clients:
            client.close()
        assert [r[1] for r in results] == [0, 1, 2, 3]
        gallery.flush(30)
        assert gallery.count() == count0 + 4, "exactly the accepted requests were generated and saved"
        # and it serves afterwards, queue empty again
        images, seed, _ = warm.predict(prompt="after the burst", seed=9, steps=1, width=256, height=256,
                                       api_name="/txt2img")
        assert seed == 9 and len(images) == 1
        with pytest.raises(AppError, match="Steps is 0"):  # errors still carry their message
            warm.predict(prompt="x", steps=0, api_name="/txt2img")
