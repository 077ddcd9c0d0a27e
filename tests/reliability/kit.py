"""Helpers for the reliability suite: crafted and awkward image files, process memory, clients.

Imported by the test modules (``from tests.reliability.kit import ...``); no fixtures here.
"""

from __future__ import annotations

import ctypes
import gc
import io
import struct
import zlib
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

from PIL import Image

FAST = dict(width=256, height=256, steps=1)  # the tiny family's native size, one step: ~0.3 s on a CPU


# --- the launched app ----------------------------------------------------------------------------


def new_client(url: str, downloads):
    from tests.conftest_ui import api_client

    return api_client(url, downloads)


@contextmanager
def launched_with_queue(data_dir, tiny_family, max_size: int):
    """The app as ``running_studio`` launches it, but with a small queue (``max_size``) so a
    burst of requests overflows it. Yields (url, studio, demo)."""
    from studio.app.server import launch_kwargs
    from studio.config import StudioConfig
    from studio.service import Studio
    from studio.ui.app import build_app, launch_options
    from tests.conftest_ui import free_port

    config = StudioConfig(data_dir=data_dir, demo=True, port=free_port())
    config.tiny_dir.parent.mkdir(parents=True, exist_ok=True)
    config.tiny_dir.symlink_to(next(iter(tiny_family.values())).parent, target_is_directory=True)
    studio = Studio(config)
    demo = build_app(studio)
    demo.queue(default_concurrency_limit=1, max_size=max_size)
    kwargs = launch_kwargs(config, SimpleNamespace())
    kwargs.update(quiet=True, prevent_thread_lock=True)
    demo.launch(**kwargs, **launch_options())
    try:
        yield f"http://127.0.0.1:{config.port}/", studio, demo
    finally:
        demo.close()


# --- process memory (Linux /proc) ----------------------------------------------------------------


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def rss() -> int:
    """Resident set size now, in bytes."""
    return _status("VmRSS")


def peak_rss() -> int:
    """The high-water mark of the resident set since the last :func:`reset_peak_rss`."""
    return _status("VmHWM")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0). False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def settled_rss() -> int:
    """RSS after a full collection and handing freed heap pages back to the OS.

    glibc keeps freed memory in its arenas (many threads → many arenas); ``malloc_trim`` returns
    it, so what is left is memory something still holds — what a leak would show up as.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return rss()


# --- crafted PNGs ------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def crafted_png(width: int, height: int, idat: bytes = b"", extra: list[bytes] = (), color_type: int = 2) -> bytes:
    """A PNG built chunk by chunk: any header, any body (need not match the header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + b"".join(extra) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bomb_png(side: int = 30_000) -> bytes:
    """A decompression bomb: a side×side RGB header (2.7 GB of pixels at 30,000²) over a few
    kilobytes of a zlib stream of zeros. Decoding it would allocate the whole image."""
    return crafted_png(side, side, zlib.compress(b"\0" * (1 << 20), 9))


def text_chunk(key: str, text: bytes) -> bytes:
    return chunk(b"tEXt", key.encode("latin-1") + b"\0" + text)


def itxt_chunk(key: str, payload: bytes) -> bytes:
    """An uncompressed iTXt chunk whose payload is written as given (may be invalid UTF-8)."""
    return chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0" + b"\0" + b"\0" + payload)


# --- awkward but valid init images ---------------------------------------------------------------


def exif_rotated_jpeg(size=(320, 256)) -> bytes:
    """A JPEG stored landscape whose EXIF says "rotate 90° clockwise to display" (orientation 6).

    The stored pixels are red on the left half and blue on the right; displayed upright the
    image is portrait with red on top.
    """
    im = Image.new("RGB", size, (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def sixteen_bit_png(size=(256, 256)) -> bytes:
    """A 16-bit greyscale PNG: a horizontal ramp over the full 0..65535 range."""
    import numpy as np

    ramp = np.tile(np.linspace(0, 65535, size[0]).astype(np.uint16), (size[1], 1))
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")  # uint16 → mode I;16
    return buf.getvalue()


def animated(fmt: str, size=(256, 256)) -> bytes:
    """A two-frame animation (GIF or APNG): the first frame green, the second magenta."""
    frames = [Image.new("RGB", size, (0, 200, 0)), Image.new("RGB", size, (200, 0, 200))]
    if fmt == "GIF":
        frames = [f.convert("P") for f in frames]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def init_image_files(folder: Path) -> dict[str, Path]:
    """Every awkward-but-valid init image the suite feeds in, written under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        files[name] = folder / name
        files[name].write_bytes(data)

    def save(name: str, image: Image.Image, **kw) -> None:
        buf = io.BytesIO()
        image.save(buf, **kw)
        put(name, buf.getvalue())

    save("rgba.png", Image.new("RGBA", (256, 256), (255, 0, 0, 0)), format="PNG")  # fully transparent red
    save("grey.png", Image.linear_gradient("L").resize((256, 256)), format="PNG")
    p = Image.new("P", (256, 256), 1)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    save("palette-transparent.png", p, format="PNG", transparency=1)  # every pixel the transparent index
    save("cmyk.jpg", Image.new("CMYK", (256, 256), (0, 255, 255, 0)), format="JPEG")  # red in CMYK
    put("16bit.png", sixteen_bit_png())
    put("exif-rotated.jpg", exif_rotated_jpeg())
    put("animated.gif", animated("GIF"))
    put("animated.png", animated("PNG"))
    return files


def broken_image_files(folder: Path) -> dict[str, Path]:
    """Init images that must be refused: corrupt, truncated, 0×0, a decompression bomb."""
    folder.mkdir(parents=True, exist_ok=True)
    good = io.BytesIO()
    Image.effect_noise((256, 256), 60).convert("RGB").save(good, format="PNG")
    data = {
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + b"this is not a PNG body" * 20,
        "not-an-image.png": b"hello, world",
        "truncated.png": good.getvalue()[: len(good.getvalue()) // 2],
        "zero.png": crafted_png(0, 0, zlib.compress(b"")),
        "bomb.png": bomb_png(),
    }
    files = {}
    for name, blob in data.items():
        files[name] = folder / name
        files[name].write_bytes(blob)
    return files
