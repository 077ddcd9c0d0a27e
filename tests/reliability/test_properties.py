"""Property tests: metadata survives the whole save path (PNG, index, rebuilt index) whatever the
text; the request validator answers every input with a sane Resolved or a ValidationError that
names a field — never another exception."""

from __future__ import annotations

import dataclasses
import math
import sqlite3
import tempfile

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from studio.catalog import MAX_SIDE, MIN_SIDE, SIZE_MULTIPLE, VARIANTS
from studio.engine import MAX_SEED, MODES, GenerationRequest, Resolved, ValidationError, validate
from studio.engine.limits import LIMITS, MAX_IMAGES

MAX_BATCH_COUNT = LIMITS["batch_count"].hi
MAX_BATCH_SIZE = LIMITS["batch_size"].hi
MAX_GUIDANCE = LIMITS["guidance"].hi
MAX_STEPS = LIMITS["steps"].hi
from studio.gallery import Gallery
from studio.metadata import read_png_info

# --- metadata: writer → PNG → reader, index, and index rebuilt from the PNG ----------------------

_chars = st.characters(blacklist_categories=("Cs",))  # any code point a str can carry in UTF-8
_tricky = st.sampled_from([
    '"', "'", "\\", "\n", "\r\n", "\r", "\t", "\0", ", ", ": ", "Negative prompt: ",
    "Steps: 4, Seed: 1, Sampler: Euler",
    "<script>alert(1)</script>", "&amp;", "ü", "🦊", "\u202e", "\ufeff", "\u2028", " ", "{\"a\": 1}", "<lora:x:0.5>",
])
texts = st.lists(st.one_of(st.text(_chars, max_size=40), _tricky), max_size=8).map("".join)
finite = st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63), finite, st.text(_chars, max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(_chars, max_size=8), inner, max_size=3)),
    max_leaves=8,
)
metas = st.fixed_dictionaries(
    {
        "prompt": texts,
        "negative_prompt": texts,
        "mode": st.sampled_from(MODES),
        "seed": st.integers(0, MAX_SEED),
        "steps": st.integers(1, MAX_STEPS),
        "guidance": st.floats(0, MAX_GUIDANCE),
        "width": st.integers(MIN_SIDE // 16, MAX_SIDE // 16).map(lambda n: n * 16),
        "height": st.integers(MIN_SIDE // 16, MAX_SIDE // 16).map(lambda n: n * 16),
        "variant": st.sampled_from(list(VARIANTS)),
        "created_at": st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    },
    optional={"extra": json_values,
              "slg": st.none() | st.fixed_dictionaries({"layers": st.lists(st.integers(0, 40), max_size=4),
                                                        "scale": finite})},
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(meta=metas)
def test_metadata_round_trips_through_the_gallery(meta):
    with tempfile.TemporaryDirectory() as d:
        gallery = Gallery(d)
        try:
            item = gallery.save(Image.new("RGB", (16, 16), (9, 9, 9)), meta)
            assert gallery.get(item.id).metadata == meta, "the index holds it exactly"
            info = read_png_info(item.path)
            assert info.error is None and info.source == "studio" and info.fields == meta, "so does the PNG"
            row = gallery.get(item.id)
            assert (row.prompt, row.negative_prompt, row.seed) == (meta["prompt"], meta["negative_prompt"],
                                                                   meta["seed"])
            # the index is lost: the PNG alone brings the image back, metadata intact
            with sqlite3.connect(gallery.db_path) as c:
                c.execute("DELETE FROM images")
            report = gallery.reconcile(temp_grace_s=0)
            assert report.added == [item.id] and not report.errors
            assert gallery.get(item.id).metadata == meta
            assert gallery.integrity_ok()
        finally:
            gallery.close()


# --- the validator: any input → a sane Resolved or a ValidationError ------------------------------

FIELDS = {f.name for f in dataclasses.fields(GenerationRequest)}
anything = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6),
    st.sampled_from([10**400, -10**400, 2**32, 2**63, "12", " 256 ", "nan", "-inf", "1e400", "0x10", b"7",
                     [1], (2, 3), {}, 1 + 2j, object(), np.float32("nan"), np.int64(7), np.array([4])]),
)
def mostly(valid, rate: int = 20):
    """``valid`` ``rate`` times in ``rate + 1``, else anything at all: with twenty fields, many
    requests are valid (the Resolved is checked) and many break exactly one field. The boundary
    values themselves are covered by the ``anything`` draws and by the next test."""
    return st.sampled_from([True] * rate + [False]).flatmap(lambda ok: valid if ok else anything)


def whole(valid_ints):  # 3, 3.0 and numpy's 3 are the same number to the validator ("3", text, is refused)
    return valid_ints.flatmap(lambda n: st.sampled_from([n, float(n)] + ([np.int64(n)] if abs(n) < 2**63 else [])))


def _image(mode, w, h):
    return Image.new(mode, (w, h))


images = mostly(st.builds(_image, st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "CMYK", "1", "I", "I;16", "F",
                                                   "YCbCr"]), st.integers(0, 64), st.integers(0, 64)), 3) | \
    st.sampled_from([None, b"", b"\x89PNG\r\n\x1a\n", b"GIF89a", "/nonexistent/x.png", "/", "", 5, 3.5,
                     np.zeros((4, 4, 3), np.uint8), ["a"]])
sizes = st.none() | whole(st.integers(0, 140).map(lambda n: n * 16)) | st.floats(-10, 2100)
requests = st.builds(
    GenerationRequest,
    prompt=mostly(st.text(max_size=30) | st.none()),
    negative_prompt=mostly(st.text(max_size=10) | st.none()),
    mode=mostly(st.sampled_from(MODES)),
    width=mostly(sizes), height=mostly(sizes),
    steps=mostly(st.none() | whole(st.integers(1, 150))),
    guidance=mostly(st.none() | st.floats(0, 30) | whole(st.integers(0, 30))),
    seed=mostly(whole(st.integers(-1, MAX_SEED))),
    batch_count=mostly(whole(st.integers(1, 12))), batch_size=mostly(whole(st.integers(1, 8))),
    strength=mostly(st.floats(-0.1, 1.1) | whole(st.integers(0, 1))),
    init_image=images, mask_image=images,
    mask_blur=mostly(whole(st.integers(-1, 70))), only_masked=mostly(st.booleans()),
    padding=mostly(whole(st.integers(-1, 300))),
    loras=mostly(st.lists(st.tuples(st.sampled_from(["style", "detail_v2", "bad name!"]), st.floats(-3, 3)),
                          max_size=2, unique_by=lambda t: t[0])),
    slg=mostly(st.none() | st.booleans()),
    max_sequence_length=mostly(whole(st.integers(1, 512))),
    shift=mostly(st.none() | st.floats(0.1, 20)),
    variant=st.none(),
)

limits = st.tuples(st.sampled_from(list(VARIANTS.values())), st.sampled_from([512, 1024, 2048, 4096]),
                   st.sampled_from([(256, 256), (1024, 1024)]))


def _check_resolved(r: Resolved, max_side: int) -> None:
    limit = min(max_side, MAX_SIDE)
    for side in (r.width, r.height):
        assert type(side) is int and side % SIZE_MULTIPLE == 0 and MIN_SIDE <= side <= limit
    assert type(r.steps) is int and 1 <= r.steps <= MAX_STEPS
    assert isinstance(r.guidance, float) and math.isfinite(r.guidance) and 0 <= r.guidance <= MAX_GUIDANCE
    assert type(r.seed) is int and 0 <= r.seed <= MAX_SEED
    assert 0.1 <= r.shift <= 20
    q = r.request  # what the pipeline loop and the metadata read: clean numbers too
    assert type(q.batch_size) is int and 1 <= q.batch_size <= MAX_BATCH_SIZE
    assert type(q.batch_count) is int and 1 <= q.batch_count <= MAX_BATCH_COUNT
    assert q.batch_size * q.batch_count <= MAX_IMAGES
    assert type(q.max_sequence_length) is int and 1 <= q.max_sequence_length <= 512
    assert isinstance(q.prompt, str) and isinstance(q.negative_prompt, str)
    if q.mode in ("img2img", "inpaint"):
        assert r.init_image.mode == "RGB" and min(r.init_image.size) >= 1
        assert isinstance(q.strength, float) and 0 < q.strength <= 1
        assert 1 <= r.effective_steps <= r.steps
    assert all(isinstance(n, str) and n for n in r.notes)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(req=requests, lim=limits)
def test_the_validator_answers_any_request_sanely(req, lim):
    variant, max_side, native = lim
    try:
        resolved = validate(req, variant, max_side, native)
    except ValidationError as e:
        assert e.field in FIELDS, e.field
        assert isinstance(str(e), str) and 10 < len(str(e)) < 2000
        event(f"refused: {e.field}")
        return
    event(f"resolved: {resolved.request.mode}")
    _check_resolved(resolved, max_side)


@settings(max_examples=400, deadline=None)
@given(
    width=st.integers(-100, 5000), height=st.integers(-100, 5000), steps=st.integers(-5, 200),
    guidance=st.floats(-5, 40), seed=st.integers(-5, 2**33), strength=st.floats(-0.5, 1.5),
    mode=st.sampled_from(["txt2img", "turbo", "img2img"]), lim=limits,
)
def test_the_validator_on_plausible_numbers(width, height, steps, guidance, seed, strength, mode, lim):
    """The same property where most requests are valid: the Resolved checks get exercised."""
    variant, max_side, native = lim
    init = Image.new("RGB", (300, 200)) if mode == "img2img" else None
    req = GenerationRequest("a fox", mode=mode, width=width, height=height, steps=steps, guidance=guidance,
                            seed=seed, strength=strength, init_image=init)
    try:
        resolved = validate(req, variant, max_side, native)
    except ValidationError as e:
        assert e.field in FIELDS and str(e)
        return
    _check_resolved(resolved, max_side)
