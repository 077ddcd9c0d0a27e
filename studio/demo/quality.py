"""Does the demo model draw what it is asked? ``python -m studio.demo.quality [--folder DIR]``

Generates held-out prompts (colour×shape×position combinations never drawn in training, see
``shapes.is_held_out``) on seeds training never used, with plain diffusers
(``StableDiffusion3Pipeline.from_pretrained``) at 256², 12 steps, CFG 4, and measures, over the
images:

- colour: the named colour is the dominant colour that is not the background: the colour of the
  largest connected blob (so scattered speckles of a colour, however many, are not an object);
- shape: a geometric classifier (fill ratio of the bounding box and solidity, the area over
  the convex hull's) recognises the named shape in the largest blob of that colour;
- position: the blob's centroid is nearest the named position's anchor;
- background: the most common colour is the named background (grey when none is named).

Each pixel is labelled with the nearest palette colour (``shapes.COLOURS`` plus grey); pixels far
from every palette colour (soft edges) are left unlabelled.

The same measures on the held-out scenes' own pictures after the VAE's encode and decode
(:func:`round_trip`) are the ceiling the VAE leaves the transformer: a transformer that drew every
latent perfectly would score them. The table prints both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from studio.demo import shapes

GOALS = {"colour": 0.90, "position": 0.85, "shape": 0.70}
STEPS, GUIDANCE = 12, 4.0
QUALITY_SEED = 90_000  # training scenes and noise use seeds far below this

PALETTE_NAMES = (*shapes.COLOURS, "grey")
PALETTE = np.array([*shapes.COLOURS.values(), shapes.GREY], dtype=np.float32)
_MAX_DISTANCE = 80.0  # RGB distance beyond which a pixel is "no palette colour"


def label_map(image) -> np.ndarray:
    """Per pixel, the index into PALETTE_NAMES of the nearest palette colour, or -1."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    d = np.linalg.norm(rgb[:, :, None, :] - PALETTE[None, None], axis=-1)
    labels = d.argmin(-1)
    labels[d.min(-1) > _MAX_DISTANCE] = -1
    return labels


def colour_fractions(image) -> dict[str, float]:
    """Fraction of the picture labelled with each palette colour (and "none")."""
    labels = label_map(image)
    out = {name: float((labels == i).mean()) for i, name in enumerate(PALETTE_NAMES)}
    out["none"] = float((labels == -1).mean())
    return out


def largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask."""
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, blob = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            blob.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(blob) > len(best):
            best = blob
    out = np.zeros_like(mask, dtype=bool)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2-D points (Andrew's monotone chain + shoelace)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = np.array(lower[:-1] + upper[:-1], dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def shape_features(blob: np.ndarray) -> dict[str, float]:
    """Fill ratio of the bounding box, solidity (area / convex hull), aspect, top/bottom widths."""
    ys, xs = np.nonzero(blob)
    if len(ys) < 20:
        return {"area": float(len(ys)), "fill": 0.0, "solidity": 0.0, "aspect": 0.0, "taper": 0.0}
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    area = float(len(ys))
    # the hull of the pixels' corners, so a filled square has solidity 1
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    rows = blob[y0:y1, x0:x1].sum(1).astype(np.float64)
    third = max(1, len(rows) // 3)
    return {
        "area": area,
        "fill": area / float((y1 - y0) * (x1 - x0)),
        "solidity": area / max(_hull_area(corners), 1.0),
        "aspect": float(x1 - x0) / float(y1 - y0),
        "taper": float(rows[:third].mean() / max(rows[-third:].mean(), 1.0)),  # triangle ≪ 1
    }


def classify_shape(blob: np.ndarray) -> str | None:
    """circle / square / triangle / star from the blob's geometry (None: too small to say)."""
    f = shape_features(blob)
    if f["area"] < 20:
        return None
    if f["solidity"] < 0.8:
        return "star"
    if f["fill"] > 0.9:
        return "square"
    if f["fill"] < 0.66 or f["taper"] < 0.6:
        return "triangle"
    return "circle"


def nearest_position(cx: float, cy: float) -> str:
    """The named position (shapes.ANCHORS) nearest a centroid given in fractions of the picture."""
    return min(shapes.ANCHORS, key=lambda p: (shapes.ANCHORS[p][0] - cx) ** 2 + (shapes.ANCHORS[p][1] - cy) ** 2)


@dataclass
class Reading:
    """What the measures see in one picture of one named object."""

    background: str | None  # the most common palette colour
    dominant: str | None  # the colour of the largest connected blob that is not the expected background
    shape: str | None  # the classifier's reading of the largest blob of the named colour
    position: str | None  # the anchor nearest that blob's centroid


def read_image(image, colour: str, background_rgb) -> Reading:
    """What the measures read in one picture: background, dominant colour, and the named colour's shape
    and position."""
    labels = label_map(image)
    counts = np.bincount(labels[labels >= 0].ravel(), minlength=len(PALETTE_NAMES))
    bg_index = int(np.argmin(np.linalg.norm(PALETTE - np.asarray(background_rgb, np.float32), axis=1)))
    background = PALETTE_NAMES[int(counts.argmax())] if counts.sum() else None
    min_pixels = 0.002 * labels.size
    # each colour's largest connected blob, not its pixel count: speckles of the named colour
    # scattered over a noisy picture are many pixels but no object
    blobs = {i: largest_blob(labels == i) for i in range(len(PALETTE_NAMES))
             if i != bg_index and counts[i] >= min_pixels}
    sizes = {i: int(b.sum()) for i, b in blobs.items()}
    best = max(sizes, key=sizes.get, default=None)
    dominant = PALETTE_NAMES[best] if best is not None and sizes[best] >= min_pixels else None
    named = PALETTE_NAMES.index(colour)
    blob = blobs[named] if named in blobs else largest_blob(labels == named)
    if blob.sum() < min_pixels:
        return Reading(background, dominant, None, None)
    ys, xs = np.nonzero(blob)
    h, w = labels.shape
    return Reading(background, dominant, classify_shape(blob), nearest_position(xs.mean() / w, ys.mean() / h))


def held_out_scenes(count: int, seed: int = QUALITY_SEED) -> list[shapes.Scene]:
    """Single-object scenes, every one a held-out colour×shape×position combination."""
    rng = np.random.default_rng(seed)
    return [shapes.sample_scene(rng, held_out=True) for _ in range(count)]


def score(scene: shapes.Scene, image) -> tuple[Reading, dict[str, bool]]:
    """The reading of one picture of ``scene`` and which measures it meets."""
    obj = scene.objects[0]
    r = read_image(image, obj.colour, scene.background_rgb)
    return r, {
        "colour": r.dominant == obj.colour,
        "shape": r.shape == obj.shape,
        "position": r.position == obj.position,
        "background": r.background == (scene.background or "grey"),
    }


def round_trip(vae, scenes, batch: int = 16) -> dict:
    """The measures on the scenes' own pictures encoded and decoded by ``vae`` (the mean latent):
    the most the transformer can score through this VAE. The pictures go in and come out through
    diffusers' VaeImageProcessor, as in the pipelines that :func:`measure` runs."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor()
    hits = {"colour": 0, "shape": 0, "position": 0, "background": 0}
    for start in range(0, len(scenes), batch):
        chunk = scenes[start:start + batch]
        x = processor.preprocess([shapes.render(s) for s in chunk]).to(vae.dtype)
        with torch.no_grad():
            y = vae.decode(vae.encode(x).latent_dist.mean).sample.float()
        for scene, image in zip(chunk, processor.postprocess(y, output_type="pil")):
            for k, v in score(scene, image)[1].items():
                hits[k] += v
    n = max(len(scenes), 1)
    return {"n": len(scenes), **{k: v / n for k, v in hits.items()}}


def measure(pipe, scenes, seed: int = QUALITY_SEED, batch: int = 8, steps: int = STEPS,
            guidance: float = GUIDANCE, save_dir: Path | None = None, **call_kwargs) -> dict:
    """Generate one image a scene (seed + its index) and score it; returns the fractions."""
    import torch

    hits = {"colour": 0, "shape": 0, "position": 0, "background": 0}
    rows = []
    for start in range(0, len(scenes), batch):
        chunk = scenes[start:start + batch]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images = pipe([s.prompt for s in chunk], num_inference_steps=steps, guidance_scale=guidance,
                      height=shapes.SIZE, width=shapes.SIZE, generator=generators, **call_kwargs).images
        for i, (scene, image) in enumerate(zip(chunk, images)):
            r, ok = score(scene, image)
            for k, v in ok.items():
                hits[k] += v
            rows.append({"prompt": scene.prompt, "named": scene.objects[0].colour, **ok, "read": r.__dict__})
            if save_dir is not None:
                save_dir.mkdir(parents=True, exist_ok=True)
                image.save(save_dir / f"{start + i:03d}.png")
    n = max(len(scenes), 1)
    return {"n": len(scenes), **{k: v / n for k, v in hits.items()}, "rows": rows}


def by_position(rows: list[dict]) -> dict[str, tuple[int, int]]:
    """Of :func:`measure`'s rows, per named position: (images whose object sits there, images)."""
    out: dict[str, list[int]] = {}
    for row in rows:
        named = [w for w in row["prompt"].split(" ") if w in shapes.ANCHORS]
        if named:
            hit_total = out.setdefault(named[0], [0, 0])
            hit_total[0] += bool(row["position"])
            hit_total[1] += 1
    return {k: (v[0], v[1]) for k, v in sorted(out.items())}


LAYOUT_PROMPT = "a large red circle at the {}"


def first_step_layout(pipe, prompts, seeds: int = 8, guidance: float = GUIDANCE,
                      seed: int = QUALITY_SEED) -> list[tuple[float, float]]:
    """Where the transformer puts each prompt's object before sampling has begun.

    At σ 1 the input is pure noise, so the best prediction of the clean latent, x0 = x − σ·v (with
    CFG), is the mean of everything the prompt allows: a blur where the object will be. Averaged
    over ``seeds`` noises, the centroid of its squared departure from its own spatial mean is that
    place, as (x, y) fractions of the picture. The final image cannot put an object where this
    does not: the sampler's first steps decide the layout, the later ones the edges.
    """
    import torch

    transformer = pipe.transformer
    side = shapes.SIZE // pipe.vae_scale_factor
    noise = torch.randn(seeds, transformer.config.in_channels, side, side,
                        generator=torch.Generator().manual_seed(seed))
    ys, xs = torch.meshgrid(torch.arange(side) + 0.5, torch.arange(side) + 0.5, indexing="ij")
    dtype = transformer.dtype
    hidden = torch.cat([noise, noise]).to(dtype)  # the unconditional half, then the conditional
    timestep = torch.full((2 * seeds,), 1000.0)
    out = []
    for prompt in prompts:
        with torch.no_grad():
            embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
                prompt, prompt, prompt, negative_prompt="", do_classifier_free_guidance=True)
            embeds = torch.cat([negative.expand(seeds, -1, -1), embeds.expand(seeds, -1, -1)])
            pooled = torch.cat([negative_pooled.expand(seeds, -1), pooled.expand(seeds, -1)])
            v_uncond, v_cond = transformer(
                hidden_states=hidden, encoder_hidden_states=embeds.to(dtype), pooled_projections=pooled.to(dtype),
                timestep=timestep, return_dict=False)[0].float().chunk(2)
        x0 = (noise - (v_uncond + guidance * (v_cond - v_uncond))).mean(0)
        d = (x0 - x0.mean((-2, -1), keepdim=True)).pow(2).sum(0)
        out.append((float((d * xs).sum() / d.sum() / side), float((d * ys).sum() / d.sum() / side)))
    return out


def layout_table(pipe, template: str = LAYOUT_PROMPT, seeds: int = 8) -> str:
    """:func:`first_step_layout` for each named position in ``template``, against its anchor."""
    names = list(shapes.ANCHORS)
    found = first_step_layout(pipe, [template.format(n) for n in names], seeds=seeds)
    lines = [f"first-step layout of {template.format('…')!r} ({seeds} noises, CFG {GUIDANCE:g}):",
             f"{'position':<9} {'anchor x, y':>12} {'at σ 1 x, y':>12}"]
    for name, (x, y) in zip(names, found):
        ax, ay = shapes.ANCHORS[name]
        lines.append(f"{name:<9} {ax:>6.2f}{ay:>6.2f} {x:>6.2f}{y:>6.2f}")
    return "\n".join(lines)


def table(result: dict, ceiling: dict | None = None) -> str:
    """The figures as a text table, each against its goal (and the VAE's ceiling, when given:
    :func:`round_trip`)."""
    head = f"{'measure':<11} {'figure':>7} {'goal':>6}  met"
    lines = [head + (f"  {'VAE round trip':>14}" if ceiling else ""), "-" * (32 + (16 if ceiling else 0))]
    for key in ("colour", "position", "shape", "background"):
        goal = GOALS.get(key)
        met = "" if goal is None else ("yes" if result[key] >= goal else "NO")
        goal_text = "" if goal is None else f"{goal:.0%}"
        line = f"{key:<11} {result[key]:>7.1%} {goal_text:>6}  {met:<3}"
        lines.append((line + f"  {ceiling[key]:>14.1%}" if ceiling else line).rstrip())
    lines.append(f"({result['n']} held-out images, 256², {STEPS} steps, CFG {GUIDANCE:g})")
    return "\n".join(lines)


GRID_PROMPTS = (
    "a red circle on a white background",
    "a large blue square at the left",
    "a small yellow triangle at the top",
    "a green star in the center on a black background",
    "a purple circle at the bottom on a yellow background",
    "a large blue square at the left and a small yellow triangle at the right",
)


def labelled_sheet(header: str, rows, cell: int, pad: int, column_labels=()):
    """Pictures on a white sheet: ``header`` on top, then the ``column_labels`` (if any) as a line
    of their own, then each row's label over its pictures (``rows``: (label, pictures) pairs, each
    picture resized to ``cell`` square). :func:`grid` and :func:`trajectory` draw theirs with it."""
    from PIL import Image, ImageDraw

    label_h = 28
    top = label_h * (2 if column_labels else 1)
    columns = max(len(pictures) for _, pictures in rows)
    sheet = Image.new("RGB", (pad + columns * (cell + pad), top + len(rows) * (cell + label_h + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 8), header, fill=(0, 0, 0))
    for col, text in enumerate(column_labels):
        draw.text((pad + col * (cell + pad), label_h + 8), text, fill=(0, 0, 0))
    for row, (label, pictures) in enumerate(rows):
        y = top + row * (cell + label_h + pad)
        draw.text((pad, y + 8), label, fill=(0, 0, 0))
        for col, picture in enumerate(pictures):
            sheet.paste(picture.resize((cell, cell)), (pad + col * (cell + pad), y + label_h))
    return sheet


def grid(pipe, prompts=GRID_PROMPTS, seeds=(1, 2, 3, 4), steps: int = STEPS, guidance: float = GUIDANCE):
    """A labelled grid: one row a prompt, one column a seed (what assets/demo-grid.png shows)."""
    import torch

    # "x", not "²": the default font has no "²"
    header = f"seeds {', '.join(map(str, seeds))}  |  {shapes.SIZE}x{shapes.SIZE} px, {steps} steps, CFG {guidance:g}"
    rows = [(prompt, pipe([prompt] * len(seeds), num_inference_steps=steps, guidance_scale=guidance,
                          height=shapes.SIZE, width=shapes.SIZE,
                          generator=[torch.Generator().manual_seed(s) for s in seeds]).images)
            for prompt in prompts]
    return labelled_sheet(header, rows, cell=shapes.SIZE // 2, pad=4)


TRAJECTORY_PROMPTS = (
    "a large blue square at the left",
    "a small yellow triangle at the top",
    "a red circle on a white background",
)


def predictions(pipe, prompt: str, seed: int = 1, steps: int = STEPS, guidance: float = GUIDANCE):
    """What the sampler believes the picture is at each of its steps: the prediction of the clean
    latent, x0 = x − σ·v, decoded, one image a step (the last is the final picture), and the σ of
    each step. The velocity is read back from the Euler step itself, v = (x' − x) / (σ' − σ), so
    the pipeline runs unchanged. That reading holds for a deterministic Euler step only, so any
    other scheduler is refused."""
    import torch

    name = type(pipe.scheduler).__name__
    stochastic = bool(pipe.scheduler.config.get("stochastic_sampling"))
    if name != "FlowMatchEulerDiscreteScheduler" or stochastic:
        raise ValueError(f"predictions reads x0 back from deterministic Euler steps; this pipeline samples with "
                         f"{name}{' (stochastic)' if stochastic else ''}. "
                         "Load the pipeline folder with its own FlowMatchEulerDiscreteScheduler.")
    side = shapes.SIZE // pipe.vae_scale_factor
    start = torch.randn(1, pipe.transformer.config.in_channels, side, side,
                        generator=torch.Generator().manual_seed(seed)).to(pipe.transformer.dtype)
    latents = [start]

    def keep(_pipe, _i, _t, kwargs):
        latents.append(kwargs["latents"].detach().clone())
        return kwargs

    pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=shapes.SIZE, width=shapes.SIZE,
         latents=start.clone(), callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents"],
         output_type="latent")
    sigmas = [float(s) for s in pipe.scheduler.sigmas]
    vae = pipe.vae
    images = []
    for i in range(len(latents) - 1):
        x, nxt = latents[i].float(), latents[i + 1].float()
        # the last step lands on σ 0: its x0 is where it lands (the formula, up to rounding)
        x0 = nxt if sigmas[i + 1] == 0 else x - sigmas[i] * (nxt - x) / (sigmas[i + 1] - sigmas[i])
        with torch.no_grad():
            pixels = vae.decode(x0.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor).sample
        images.append(pipe.image_processor.postprocess(pixels, output_type="pil")[0])
    return images, sigmas[:-1]


def trajectory(pipe, prompts=TRAJECTORY_PROMPTS, seed: int = 1, steps: int = STEPS, guidance: float = GUIDANCE):
    """A labelled sheet of :func:`predictions`: one row a prompt, one column a sampling step. It
    shows which step decides what: colour and layout in the first steps, and whether the later
    ones still change the outline."""
    rows, sigmas = [], []
    for prompt in prompts:
        images, sigmas = predictions(pipe, prompt, seed, steps, guidance)  # the same σ for every prompt
        rows.append((prompt, images))
    return labelled_sheet(f"the clean picture each step predicts  |  seed {seed}, {steps} steps, CFG {guidance:g}",
                          rows, cell=shapes.SIZE // 3, pad=3, column_labels=[f"sigma {sigma:.2f}" for sigma in sigmas])


def colour_misses(rows: list[dict]) -> list[tuple[str, str, int]]:
    """Of :func:`measure`'s rows that miss the colour: (named, read, count), most common first."""
    from collections import Counter

    counts = Counter((row["named"], row["read"]["dominant"] or "none") for row in rows if not row["colour"])
    return [(named, read, n) for (named, read), n in counts.most_common()]


def load_pipeline(folder: Path | None = None):
    """The pipeline folder (default: the shipped demo weights) as plain diffusers loads it, in fp32,
    without progress bars: what every measure here runs."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    from studio.demo import trained_folder

    pipe = StableDiffusion3Pipeline.from_pretrained(folder or trained_folder(), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None) -> int:
    """The command line: measure a pipeline folder (default: the shipped one), print the table,
    optionally save JSON and a grid."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m studio.demo.quality", description=__doc__.split("\n")[0])
    parser.add_argument("--folder", type=Path, default=None, help="pipeline folder (default: the shipped one)")
    parser.add_argument("--count", type=int, default=96, help="held-out images to generate")
    parser.add_argument("--seed", type=int, default=QUALITY_SEED)
    parser.add_argument("--save", type=Path, default=None, help="also save the images here")
    parser.add_argument("--json", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--grid", type=Path, default=None, help="also write the labelled grid PNG here")
    parser.add_argument("--layout", action="store_true",
                        help="also print where the first sampling step puts an object for each named position")
    parser.add_argument("--trajectory", type=Path, default=None,
                        help="also write a PNG of the clean picture each sampling step predicts, for a few prompts")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    pipe = load_pipeline(args.folder)
    started = time.time()
    scenes = held_out_scenes(args.count, args.seed)
    result = measure(pipe, scenes, seed=args.seed, save_dir=args.save)
    result["vae_round_trip"] = round_trip(pipe.vae, scenes)
    print(table(result, result["vae_round_trip"]))
    print("position, by the named one: " + ", ".join(
        f"{k} {hit}/{n}" for k, (hit, n) in by_position(result["rows"]).items()))
    misses = colour_misses(result["rows"])
    if misses:
        print("colour misses, named → read: " + ", ".join(f"{a} → {b} {n}" for a, b, n in misses))
    if args.layout:
        print(layout_table(pipe))
    print(f"measured in {time.time() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.grid:
        grid(pipe).save(args.grid)
        print(f"grid written to {args.grid}")
    if args.trajectory:
        trajectory(pipe).save(args.trajectory)
        print(f"trajectory written to {args.trajectory}")
    return 0 if all(result[k] >= g for k, g in GOALS.items()) else 1


if __name__ == "__main__":
    sys.exit(main())
