"""Command line: ``python launch.py [serve flags]``, ``generate``, ``upscale``, ``plan``.

Heavy libraries (torch, diffusers, gradio) are imported inside the commands, so ``--help`` and
the start of the web server stay fast. Every flag's default and range comes from the limits table
(``studio.engine.limits``), so ``generate --help`` says what the engine accepts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from studio.catalog import DEFAULT_VARIANT, VARIANTS
from studio.control_catalog import CONTROLNETS
from studio.config import ConfigError, StudioConfig, __version__
from studio.engine.limits import LIMITS, MODES


def _common(p: argparse.ArgumentParser, sub: bool = False) -> None:
    """Flags every command takes. On a subcommand they default to "not given", so flags placed
    before the subcommand (``launch.py --demo generate ...``) are not overwritten."""
    d = (lambda value: argparse.SUPPRESS) if sub else (lambda value: value)
    p.add_argument("--data-dir", type=Path, default=d(None),
                   help="where images, the gallery index and the demo models live "
                        "(default: the platform's user data dir)")
    p.add_argument("--model",
                   help="Hub id, local diffusers folder or .safetensors file (default: the variant's Hub repo)",
                   default=d(None))
    p.add_argument("--config-dir", type=Path, default=d(None), dest="single_file_config_dir", metavar="DIR",
                   help="for a single .safetensors --model: a diffusers folder holding the configs "
                        "and tokenizers (default: $SD35_STUDIO_CONFIG_DIR, else the variant's repo in the "
                        "Hugging Face cache)")
    p.add_argument("--variant", choices=sorted(VARIANTS), default=d(None),
                   help="which SD3 variant (default: inferred from --model, else sd3.5-medium)")
    p.add_argument("--preset", default=d(None), metavar="NAME",
                   help="memory preset: auto (the planner's choice, default) or one of "
                        + ", ".join(_preset_names()) + " (see `launch.py plan`)")
    p.add_argument("--device", choices=["cuda", "mps", "cpu"], default=d(None), help="override device detection")
    p.add_argument("--demo", action="store_true", default=d(False),
                   help="use the offline demo models (no download): the shapes model trained offline, shipped "
                        "in assets/demo; cannot be combined with --model")
    p.add_argument("--demo-random", action="store_true", default=d(False),
                   help="with --demo: the tiny random family instead (the four architectures, coloured noise)")
    p.add_argument("--offline", action="store_true", default=d(False),
                   help="never touch the network (HF_HUB_OFFLINE=1)")
    p.add_argument("--compile", action="store_true", default=d(False),
                   help="torch.compile the transformer's blocks when a model loads: the first image pays for the "
                        "compilation, later ones run faster; refused with sequential or group offload")


def _preset_names() -> list[str]:
    """The preset names, without importing torch."""
    from studio.memory.names import PRESET_NAMES

    return list(PRESET_NAMES)


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps help text without breaking names at their hyphens (preset names stay whole)."""

    def _split_lines(self, text, width):
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def add_plan_arguments(parser) -> None:
    """The ``plan`` subcommand's flags (defined here, not in studio.memory: that imports torch)."""
    parser.add_argument("--vram", type=float, default=None, metavar="GB",
                        help="plan for CUDA GPUs with this much memory (simulated; 1 GB = 2^30 B)")
    parser.add_argument("--ram", type=float, default=None, metavar="GB",
                        help="plan for this much system RAM (simulated; default: this machine's available RAM)")
    parser.add_argument("--gpus", type=int, default=None, metavar="N",
                        help="plan for N CUDA GPUs (0 = none)")
    parser.add_argument("--device", choices=("cuda", "mps", "cpu"), default=None,
                        help="the device the studio will use (default: detected)")
    parser.add_argument("--variant", default=DEFAULT_VARIANT, choices=list(VARIANTS),
                        help=f"model variant (default: {DEFAULT_VARIANT})")
    parser.add_argument("--preset", default=None, metavar="NAME",
                        help="explain this preset instead of choosing one (" + ", ".join(_preset_names()) + ")")
    parser.add_argument("--width", type=int, default=None, help="image width (default: 1024)")
    parser.add_argument("--height", type=int, default=None, help="image height (default: 1024)")
    parser.add_argument("--controlnet", action="append", default=[], metavar="ID",
                        help="plan with this catalog ControlNet beside the model (repeat for several): "
                             + ", ".join(CONTROLNETS))
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def _limit_help(name: str, what: str | None = None) -> str:
    lim = LIMITS[name]
    default = lim.default_for("txt2img")
    default_text = "the variant's recommendation" if default is None and name in ("steps", "guidance") else (
        "the model's native size" if default is None else default)
    return f"{what or lim.help} ({lim.range_text()}; default: {default_text})"


def _named(parse, what: str):
    """An argparse type for a sampler or schedule name: ours exactly, or refused naming ours."""
    def convert(text: str) -> str:
        ours, note = parse(text)
        if ours is None:
            raise argparse.ArgumentTypeError(note)
        if ours != text:  # a peer's spelling (dpmpp_2m, karras): say how it is written here
            raise argparse.ArgumentTypeError(f"{what} {text!r} is written {ours!r} here. {note}".strip())
        return ours
    convert.__name__ = what.lower()
    return convert


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``launch.py``: the serve flags and the ``generate``, ``upscale`` and
    ``plan`` subcommands."""
    from studio.control_catalog import CONTROL_TYPES, CONTROLNETS, PREPROCESSORS
    from studio.engine import samplers
    from studio.engine.stepcache import SPEED_DEFAULT, SPEED_HELP, SPEED_MODES
    from studio.engine.weighting import EMPHASIS

    parser = argparse.ArgumentParser(
        prog="launch.py", formatter_class=_HelpFormatter,
        description="SD3.5 Studio: a local studio for Stable Diffusion 3 / 3.5. "
        "Without a subcommand it starts the web UI.",
    )
    parser.add_argument("--version", action="version", version=f"SD3.5 Studio {__version__}")
    _common(parser)
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", help="open a public gradio share link (needs --auth)")
    parser.add_argument("--auth", default=None, help="USER:PASS, or a file with one USER:PASS per line")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="allow --share without --auth (anyone with the link can use your GPU)")
    parser.add_argument("--shared", action="store_true",
                        help="a gallery per login/browser session, catalog models only, no token field "
                             "(implied by --share and on a Hugging Face Space)")
    sub = parser.add_subparsers(dest="command", metavar="{generate,upscale,plan}")

    gen = sub.add_parser("generate", help="generate images headlessly and save them to the gallery",
                         formatter_class=_HelpFormatter)
    gen.add_argument("prompt")
    gen.add_argument("--mode", choices=list(MODES), default="txt2img", help="what to generate (default: txt2img)")
    gen.add_argument("--negative", default="", help="negative prompt (default: none)")
    gen.add_argument("--steps", type=int, default=None, help=_limit_help("steps"))
    gen.add_argument("--guidance", type=float, default=None, help=_limit_help("guidance"))
    gen.add_argument("--seed", type=int, default=-1, help=_limit_help("seed"))
    gen.add_argument("--width", type=int, default=None, help=_limit_help("width"))
    gen.add_argument("--height", type=int, default=None, help=_limit_help("height"))
    gen.add_argument("--count", type=int, default=1, help=f"number of images (1–{LIMITS['batch_count'].hi}; default: 1)")
    gen.add_argument("--batch-size", type=int, default=1, help=_limit_help("batch_size"))
    gen.add_argument("--init-image", type=Path, default=None, help="init image (img2img, inpaint)")
    gen.add_argument("--strength", type=float, default=None,
                     help=f"img2img / inpaint strength ({LIMITS['strength'].range_text()}; default: "
                          f"{LIMITS['strength'].default_for('img2img')} img2img, "
                          f"{LIMITS['strength'].default_for('inpaint')} inpaint)")
    gen.add_argument("--mask", type=Path, default=None, help="inpaint mask PNG (white = repaint)")
    gen.add_argument("--mask-blur", type=int, default=None, help=_limit_help("mask_blur"))
    gen.add_argument("--only-masked", action="store_true", help="inpaint only the mask's box at full resolution")
    gen.add_argument("--padding", type=int, default=None, help=_limit_help("padding"))
    gen.add_argument("--lora", action="append", default=[], metavar="NAME_OR_PATH[:WEIGHT]",
                     help="a LoRA from the loras folder or a .safetensors path (weight 1 when left out); repeatable")
    gen.add_argument("--slg", choices=["auto", "on", "off"], default="auto",
                     help="Skip Layer Guidance (default: auto, the variant's advice)")
    gen.add_argument("--max-sequence-length", type=int, default=None, help=_limit_help("max_sequence_length"))
    gen.add_argument("--shift", type=float, default=None, help=_limit_help("shift"))
    gen.add_argument("--sampler", type=_named(samplers.sampler_from_name, "Sampler"), default=None, metavar="NAME",
                     help="sampler, as Forge names it: " + ", ".join(samplers.SAMPLERS) + " (default: Euler)")
    gen.add_argument("--schedule", type=_named(samplers.schedule_from_name, "Schedule"), default=None, metavar="NAME",
                     help="schedule type: " + ", ".join(samplers.SCHEDULES)
                          + " (default: the sampler's own; Euler: Normal)")
    gen.add_argument("--prompt-3", default="", metavar="TEXT", help="what T5 reads instead of the prompt")
    gen.add_argument("--negative-prompt-3", default="", metavar="TEXT",
                     help="what T5 reads instead of the negative prompt")
    gen.add_argument("--style", action="append", default=[], dest="styles", metavar="NAME",
                     help="a style from styles.csv (the defaults, or <data-dir>/styles.csv); repeatable, applied in order")
    gen.add_argument("--no-prompt-weighting", action="store_false", dest="prompt_weighting",
                     help="read (word:1.2) and [word] as plain text, and only the first 75 CLIP tokens")
    gen.add_argument("--emphasis", choices=list(EMPHASIS), default="Original",
                     help="A1111's emphasis: Original (default) restores each chunk's mean after weighting")
    gen.add_argument("--speed", choices=list(SPEED_MODES), default=SPEED_DEFAULT,
                     help="step caching: " + "; ".join(f"{m}: {SPEED_HELP[m]}" for m in SPEED_MODES)
                          + f" (default: {SPEED_DEFAULT})")
    gen.add_argument("--hires-scale", type=float, default=None, metavar="X", help=_limit_help("hires_scale"))
    gen.add_argument("--hires-steps", type=int, default=None, metavar="N", help=_limit_help("hires_steps"))
    gen.add_argument("--hires-denoise", type=float, default=None, metavar="D",
                     help=f"hires fix: the second pass's denoising strength ({LIMITS['hires_denoise'].range_text()}; "
                          f"default {LIMITS['hires_denoise'].default_for('txt2img')}, Turbo "
                          f"{LIMITS['hires_denoise'].default_for('turbo')})")
    gen.add_argument("--hires-upscaler", default=None, metavar="NAME",
                     help="hires fix: Lanczos (default), latent-bislerp, latent-nearest-exact or an upscaler "
                          "file's name in <data-dir>/upscalers")
    gen.add_argument("--hires-variant", choices=sorted(VARIANTS), default=None,
                     help="hires fix: run the second pass on another variant (e.g. Large, then Medium)")
    gen.add_argument("--control-image", type=Path, default=None, metavar="PNG",
                     help="ControlNet: the image to follow (the picture, or the ready map with --no-preprocess)")
    gen.add_argument("--control-type", choices=list(CONTROL_TYPES), default=None,
                     help="ControlNet: what the control image gives (default: the ControlNet's, else canny; "
                          "inpaint needs --mode inpaint)")
    gen.add_argument("--controlnet", default=None, metavar="SRC",
                     help="ControlNet: a catalog id (" + ", ".join(CONTROLNETS) + "), a Hub id, a diffusers folder "
                          "or a .safetensors file (default: the catalog's for the model and type)")
    gen.add_argument("--control-scale", type=float, default=None, metavar="S", help=_limit_help("control_scale"))
    gen.add_argument("--control-start", type=float, default=None, metavar="A", help=_limit_help("control_start"))
    gen.add_argument("--control-end", type=float, default=None, metavar="B", help=_limit_help("control_end"))
    gen.add_argument("--preprocess", choices=list(PREPROCESSORS), default=None,
                     help="ControlNet: the preprocessor (default: the ControlNet's)")
    gen.add_argument("--no-preprocess", action="store_const", const="none", dest="preprocess",
                     help="ControlNet: the control image is already the map (same as --preprocess none)")
    gen.add_argument("--canny-low", type=int, default=None, metavar="N", help=_limit_help("canny_low"))
    gen.add_argument("--canny-high", type=int, default=None, metavar="N", help=_limit_help("canny_high"))
    gen.add_argument("--blur-radius", type=float, default=None, metavar="R", help=_limit_help("blur_radius"))
    gen.add_argument("--depth-model", default=None, metavar="SRC",
                     help="ControlNet: the depth preprocessor's model, a Hub id or a local folder "
                          "(default: depth-anything/Depth-Anything-V2-Small-hf, downloaded on first use)")
    gen.add_argument("--json", action="store_true", help="print a JSON object instead of paths")
    _common(gen, sub=True)

    up = sub.add_parser("upscale", help="upscale an image, save it to the gallery and print its path",
                        formatter_class=_HelpFormatter)
    up.add_argument("image", type=Path, help="the PNG/JPEG/WebP to upscale")
    up.add_argument("--scale", type=float, default=None, help=_limit_help("upscale_scale"))
    up.add_argument("--upscaler", default=None, metavar="NAME",
                    help="Lanczos (default) or an upscaler file's name in <data-dir>/upscalers")
    up.add_argument("--refine-prompt", default=None, metavar="TEXT",
                    help="run a refine pass (img2img over the upscaled image) with this prompt")
    up.add_argument("--refine-denoise", type=float, default=None, metavar="D",
                    help=f"run a refine pass at this strength ({LIMITS['refine_denoise'].range_text()}; default "
                         f"{LIMITS['refine_denoise'].default} when --refine-prompt is given)")
    up.add_argument("--refine-steps", type=int, default=None, metavar="N",
                    help="the refine pass's steps (default: the variant's recommendation)")
    up.add_argument("--seed", type=int, default=-1, help="the refine pass's seed (-1: random)")
    up.add_argument("--json", action="store_true", help="print a JSON object instead of the path")
    _common(up, sub=True)

    add_plan_arguments(sub.add_parser("plan", help="show which memory preset fits this machine, and why",
                                      formatter_class=_HelpFormatter))
    return parser


def config_from_args(args: argparse.Namespace) -> StudioConfig:
    """The StudioConfig of a command line (raises ConfigError for contradictory flags)."""
    kwargs = {}
    for name in ("model", "variant", "preset", "device", "single_file_config_dir"):
        if getattr(args, name, None) is not None:
            kwargs[name] = getattr(args, name)
    if getattr(args, "data_dir", None) is not None:
        kwargs["data_dir"] = args.data_dir
    if getattr(args, "host", None):
        kwargs["host"] = args.host
    if getattr(args, "port", None):
        kwargs["port"] = args.port
    return StudioConfig(demo=bool(getattr(args, "demo", False)), offline=bool(getattr(args, "offline", False)),
                        demo_weights="random" if getattr(args, "demo_random", False) else "trained",
                        compile=bool(getattr(args, "compile", False)), **kwargs)


def fail(message: str, code: int = 2) -> int:
    """Every CLI error: ``error: <message>`` on stderr, exit status 2 (never a traceback)."""
    print(f"error: {message}", file=sys.stderr)
    return code


def _loras(studio, specs: list[str]) -> list[tuple[str, object]]:
    """``--lora`` values → [(name, weight)]; a path is imported into the loras folder first."""
    out = []
    for spec in specs:
        name, weight = spec, 1.0
        head, sep, tail = spec.rpartition(":")
        if sep and head and not tail.startswith(("/", "\\")):
            try:
                name, weight = head, float(tail)
            except ValueError:
                name, weight = spec, 1.0
        if name.endswith(".safetensors") or os.sep in name:
            name = studio.import_lora(name, name=Path(name).stem).name
        out.append((name, weight))
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    """``launch.py generate``: generate headlessly into the gallery and print the saved paths (or JSON
    with ``--json``); the exit status."""
    from studio.logs import quiet_libraries

    quiet_libraries()
    from studio.engine import build_request
    from studio.errors import StudioError
    from studio.service import Studio

    try:
        config = config_from_args(args)
    except ConfigError as e:
        return fail(str(e))
    if args.mask is not None and args.mode != "inpaint":
        return fail("--mask is for --mode inpaint.")
    if args.init_image is not None and args.mode not in ("img2img", "inpaint"):
        return fail("--init-image is for --mode img2img or inpaint.")
    if args.count < 1 or args.batch_size < 1:
        return fail(f"--count and --batch-size must be at least 1 (got {args.count} and {args.batch_size}).")
    fields = {
        "prompt": args.prompt, "negative_prompt": args.negative, "mode": args.mode, "width": args.width,
        "height": args.height, "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
        "batch_size": args.batch_size, "batch_count": -(-args.count // args.batch_size),
        "strength": args.strength, "slg": args.slg, "max_sequence_length": args.max_sequence_length,
        "shift": args.shift, "variant": args.variant, "mask_blur": args.mask_blur,
        "only_masked": args.only_masked, "padding": args.padding,
        "init_image": str(args.init_image) if args.init_image else None,
        "mask_image": str(args.mask) if args.mask else None,
        "sampler": args.sampler, "schedule": args.schedule, "prompt_3": args.prompt_3,
        "negative_prompt_3": args.negative_prompt_3, "styles": list(args.styles),
        "prompt_weighting": args.prompt_weighting, "emphasis": args.emphasis,
        "hires_scale": args.hires_scale, "hires_steps": args.hires_steps, "hires_denoise": args.hires_denoise,
        "hires_upscaler": args.hires_upscaler, "hires_variant": args.hires_variant,
        "control_image": str(args.control_image) if args.control_image else None,
        "control_type": args.control_type, "controlnet": args.controlnet, "control_scale": args.control_scale,
        "control_start": args.control_start, "control_end": args.control_end, "preprocess": args.preprocess,
        "canny_low": args.canny_low, "canny_high": args.canny_high, "blur_radius": args.blur_radius,
        "depth_model": args.depth_model, "speed": args.speed,
    }
    try:
        studio = Studio(config)
        studio.start()
        fields["loras"] = _loras(studio, args.lora)
        req = build_request(fields, args.mode)
        studio.check_request(req)  # a bad width is refused before seconds of loading
        studio.placement_for(None, args.variant)  # and so is an unknown or impossible --preset
        if not config.demo:
            ok, message = studio.availability(args.variant if args.mode != "turbo" else "sd3.5-large-turbo")
            if not ok:
                return fail(message)
        studio.models.progress = lambda message, fraction: print(f"{message}…", file=sys.stderr)
        progress = None
        if not args.json and sys.stderr.isatty():
            def progress(ev):
                print(f"\r  step {ev.step}/{ev.steps} (run {ev.run + 1}/{ev.runs})", end="", file=sys.stderr)
        result = studio.generate(req, on_progress=progress)
        result.wait_saved()
    except StudioError as e:
        return fail(str(e))
    if progress:
        print(file=sys.stderr)
    if args.json:
        print(json.dumps({
            "images": [{"path": i.path, "id": i.id, "seed": i.seed} for i in result.images],
            "seed": result.seed,
            "notes": result.notes,
            "info": result.info,
            "model": result.images[0].metadata["model"] if result.images else None,
            "preset": result.images[0].metadata["preset"] if result.images else None,
        }, indent=2))
    else:
        for note in result.notes:
            print(f"note: {note}", file=sys.stderr)
        print(f"seed: {result.seed}", file=sys.stderr)
        for item in result.images:
            print(item.path)
    return 0


def cmd_upscale(args: argparse.Namespace) -> int:
    """``launch.py upscale``: upscale one image into the gallery and print its path (or JSON with
    ``--json``); the exit status."""
    from studio.logs import quiet_libraries

    quiet_libraries()
    from studio.errors import StudioError
    from studio.service import Studio

    try:
        config = config_from_args(args)
    except ConfigError as e:
        return fail(str(e))
    if not args.image.is_file():
        return fail(f"No such image: {args.image}.")
    try:
        studio = Studio(config)
        studio.start()
        studio.models.progress = lambda message, fraction: print(f"{message}…", file=sys.stderr)
        result = studio.upscale(image=str(args.image), upscaler=args.upscaler, scale=args.scale,
                                refine_prompt=args.refine_prompt, refine_denoise=args.refine_denoise,
                                seed=args.seed, refine_steps=args.refine_steps)
        result.wait_saved()
    except StudioError as e:
        return fail(str(e))
    item = result.images[0]
    if args.json:
        print(json.dumps({"path": item.path, "id": item.id, "width": item.image.width, "height": item.image.height,
                          "notes": result.notes, "info": result.info}, indent=2))
    else:
        for note in result.notes:
            print(f"note: {note}", file=sys.stderr)
        print(item.path)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """``launch.py plan``: how the model would fit this (or a simulated) machine; the exit status."""
    from studio.logs import quiet_libraries

    quiet_libraries()
    from studio.app.plan import run_plan_command

    return run_plan_command(args)


def cmd_serve(args: argparse.Namespace) -> int:
    """``launch.py`` without a subcommand: start the web UI; the exit status."""
    try:
        config = config_from_args(args)
    except ConfigError as e:
        return fail(str(e))
    if config.compile and config.preset not in (None, "auto"):  # refused before the server starts
        from studio.engine.compile import compile_problem
        from studio.memory import get_preset

        try:
            problem = compile_problem(get_preset(config.preset))
        except KeyError:  # an unknown name is refused, with the valid ones, by the first load
            problem = None
        if problem:
            return fail(problem)
    from studio.app.server import serve

    return serve(config, args)


def main(argv: list[str] | None = None) -> int:
    """``launch.py``: parse the flags and run the command (the web UI without one)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if getattr(args, "offline", False):
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "plan":
            return cmd_plan(args)
        if args.command == "upscale":
            return cmd_upscale(args)
        return cmd_serve(args)
    except KeyboardInterrupt:
        return 130
