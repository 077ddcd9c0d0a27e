"""Command line: ``python launch.py [serve flags]``, ``generate``, ``plan``.

Heavy libraries (torch, diffusers, gradio) are imported inside the commands, so ``--help`` and
the start of the web server stay fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .catalog import DEFAULT_VARIANT, VARIANTS
from .config import StudioConfig, __version__


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
                        "and tokenizers (default: the variant's repo in the Hugging Face cache)")
    p.add_argument("--variant", choices=sorted(VARIANTS), default=d(None),
                   help="which SD3 variant (default: inferred from --model, else sd3.5-medium)")
    p.add_argument("--preset", default=d(None), help="memory preset (default: auto; see `launch.py plan`)")
    p.add_argument("--device", choices=["cuda", "mps", "cpu"], default=d(None), help="override device detection")
    p.add_argument("--demo", action="store_true", default=d(False),
                   help="use the offline tiny SD3 family (random weights, no download)")
    p.add_argument("--offline", action="store_true", default=d(False),
                   help="never touch the network (HF_HUB_OFFLINE=1)")


def add_plan_arguments(parser) -> None:
    """The ``plan`` subcommand's flags (defined here, not in studio.memory: that imports torch)."""
    parser.add_argument("--vram", type=float, default=None, metavar="GB",
                        help="plan for CUDA GPUs with this much memory (simulated; 1 GB = 2^30 B)")
    parser.add_argument("--ram", type=float, default=None, metavar="GB",
                        help="plan for this much system RAM (simulated)")
    parser.add_argument("--gpus", type=int, default=None, metavar="N",
                        help="plan for N CUDA GPUs (0 = none)")
    parser.add_argument("--device", choices=("cuda", "mps", "cpu"), default=None,
                        help="the device the studio will use (default: detected)")
    parser.add_argument("--variant", default=DEFAULT_VARIANT, choices=list(VARIANTS),
                        help=f"model variant (default: {DEFAULT_VARIANT})")
    parser.add_argument("--width", type=int, default=None, help="image width (default: 1024)")
    parser.add_argument("--height", type=int, default=None, help="image height (default: 1024)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch.py",
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
    sub = parser.add_subparsers(dest="command", metavar="{generate,plan}")

    gen = sub.add_parser("generate", help="generate images headlessly and save them to the gallery")
    gen.add_argument("prompt")
    gen.add_argument("--mode", choices=["txt2img", "img2img", "turbo"], default="txt2img")
    gen.add_argument("--negative", default="", help="negative prompt")
    gen.add_argument("--steps", type=int, default=None)
    gen.add_argument("--guidance", type=float, default=None, help="CFG scale")
    gen.add_argument("--seed", type=int, default=-1, help="-1 = random (the seed used is printed)")
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--count", type=int, default=1, help="number of images")
    gen.add_argument("--batch-size", type=int, default=1, help="images per pipeline call")
    gen.add_argument("--init-image", type=Path, default=None, help="init image for img2img")
    gen.add_argument("--strength", type=float, default=0.6, help="img2img strength (0-1]")
    gen.add_argument("--slg", choices=["auto", "on", "off"], default="auto", help="Skip Layer Guidance")
    gen.add_argument("--max-sequence-length", type=int, default=256, help="T5 tokens (max 512)")
    gen.add_argument("--shift", type=float, default=None, help="scheduler shift (default 3.0)")
    gen.add_argument("--json", action="store_true", help="print a JSON object instead of paths")
    _common(gen, sub=True)

    add_plan_arguments(sub.add_parser("plan", help="show which memory preset fits this machine, and why"))
    return parser


def config_from_args(args: argparse.Namespace) -> StudioConfig:
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
    return StudioConfig(demo=bool(getattr(args, "demo", False)), offline=bool(getattr(args, "offline", False)), **kwargs)


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def quiet_libraries() -> None:
    """Library progress bars and warnings are noise in a studio's console.

    Sets what the libraries read when they are imported, and applies their setters only if they
    are already imported: importing diffusers here would pull in torch and cost seconds of
    start-up before the page is served. The model manager calls this again when it loads.
    """
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    if "transformers" in sys.modules:
        import transformers.utils.logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    if "diffusers" in sys.modules:
        import diffusers.utils.logging as dlog

        dlog.set_verbosity_error()


def cmd_generate(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    quiet_libraries()
    from .engine import Engine, GenerationError, GenerationRequest, ValidationError, open_image
    from .gallery import Gallery, GalleryError
    from .models import ModelError, ModelManager

    init = None
    if args.init_image is not None:
        if args.mode != "img2img":
            return _fail("--init-image is for --mode img2img.")
        try:
            init = open_image(str(args.init_image))
        except (ValidationError, FileNotFoundError) as e:
            return _fail(f"{args.init_image}: {e}")
    req = GenerationRequest(
        prompt=args.prompt,
        negative_prompt=args.negative,
        mode=args.mode,
        width=args.width,
        height=args.height,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        batch_size=args.batch_size,
        batch_count=max(1, -(-args.count // max(args.batch_size, 1))) if args.count > 0 else args.count,
        strength=args.strength,
        init_image=init,
        slg={"auto": None, "on": True, "off": False}[args.slg],
        max_sequence_length=args.max_sequence_length,
        shift=args.shift,
        variant=args.variant,
    )
    try:
        config.ensure_dirs()
        gallery = Gallery(config.data_dir)
        models = ModelManager(config, progress=lambda message, fraction: print(f"{message}…", file=sys.stderr))
        if not config.demo:
            ok, message = models.availability(args.variant if args.mode != "turbo" else "sd3.5-large-turbo")
            if not ok:
                return _fail(message)
        engine = Engine(models, gallery)
        progress = None
        if not args.json and sys.stderr.isatty():
            def progress(ev):
                print(f"\r  step {ev.step}/{ev.steps} (run {ev.run + 1}/{ev.runs})", end="", file=sys.stderr)
        result = engine.generate(req, on_progress=progress)
        result.wait_saved()
    except (ValidationError, ModelError, GenerationError, GalleryError) as e:
        return _fail(str(e))
    if progress:
        print(file=sys.stderr)
    if args.json:
        print(json.dumps({
            "images": [{"path": i.path, "id": i.id, "seed": i.seed} for i in result.images],
            "seed": result.seed,
            "notes": result.notes,
            "info": result.info,
            "model": result.images[0].metadata["model"] if result.images else None,
        }, indent=2))
    else:
        for note in result.notes:
            print(f"note: {note}", file=sys.stderr)
        print(f"seed: {result.seed}", file=sys.stderr)
        for item in result.images:
            print(item.path)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .memory import run_plan_command

    return run_plan_command(args)


def cmd_serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    from .server import serve

    return serve(config, args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if getattr(args, "offline", False):
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "plan":
            return cmd_plan(args)
        return cmd_serve(args)
    except KeyboardInterrupt:
        return 130
