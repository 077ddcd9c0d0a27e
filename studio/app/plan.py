"""``launch.py plan``: the planner's answer for this (or a simulated) machine, as a report or JSON;
``--preset NAME`` explains that preset here instead of choosing one.

The printing lives here, in the app layer; ``studio.memory`` only computes. Planning imports
torch but neither diffusers, transformers nor bitsandbytes (their counts come from a table), so
nothing prints a library warning before the answer.
"""

from __future__ import annotations

import json
import sys

from studio import catalog
from studio.control_catalog import controlnets_problem
from studio.engine.limits import snap
from studio.hardware import detect_hardware
from studio.memory import choose, estimate, fits, plan_for, presets_by_rank
from studio.memory.planner import Plan, gb


def format_plan(plan: Plan) -> str:
    """The human report: hardware, the plan, and a table of the named presets."""
    v = catalog.get_variant(plan.variant)
    out = ["Hardware:"]
    out += ["  " + line for line in plan.hardware.describe().splitlines()]
    out.append("")
    status = "fits" if plan.fits else "DOES NOT FIT"
    what = "Preset" if plan.explained else "Plan"
    nets = f" with ControlNet {', '.join(plan.controlnets)}" if plan.controlnets else ""
    out.append(f"{what} for {v.label} ({plan.variant}){nets} at {plan.estimate.width}×{plan.estimate.height}: "
               f"{plan.preset} — {status}")
    out.append(plan.explanation)
    out.append("")
    out.append("Named presets (peak on the accelerator, RAM needed, cost: lower is better):")
    out.append(f"  {'preset':<22} {'cost':>5} {'peak':>9} {'RAM':>9} {'speed':>6}  status")
    shown = False
    rows = [(p, p.name == plan.preset) for p in presets_by_rank()]
    if not any(mark for _, mark in rows):
        rows.insert(0, (plan.preset_obj, True))
    for p, mark in rows:
        shown = shown or mark
        reason = p.check(plan.hardware)
        hw = None if reason else plan.hardware
        est = estimate(plan.variant, p, plan.estimate.width, plan.estimate.height, hw,
                       component_bytes=plan.component_bytes or None, controlnets=plan.controlnets)
        if reason:
            status = "n/a: " + reason
        else:
            why = fits(est, p, plan.hardware)
            status = "fits" if why is None else why
        out.append(
            f"{'→' if mark else ' '} {p.name:<22} {p.cost:>5.1f} {gb(est.peak_bytes):>9} "
            f"{gb(est.ram_bytes):>9} {p.speed_factor:>5.3g}×  {status}"
        )
    return "\n".join(out)


def run_plan_command(args) -> int:
    """``launch.py plan``: print the plan; exit 0 when it fits, 1 when nothing does (or the
    named ``--preset`` does not), 2 on bad arguments."""
    try:
        hw = detect_hardware(vram_gb=args.vram, ram_gb=args.ram, gpus=args.gpus, device=args.device,
                             compute_capability=getattr(args, "compute_capability", None))
        variant = catalog.get_variant(getattr(args, "variant", None) or catalog.DEFAULT_VARIANT)
    except (ValueError, KeyError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    width = getattr(args, "width", None) or variant.default_size[0]
    height = getattr(args, "height", None) or variant.default_size[1]
    for name, value in (("width", width), ("height", height)):
        if not catalog.MIN_SIDE <= snap(value) <= catalog.MAX_SIDE:
            print(f"error: --{name} {value} is out of range: use {catalog.MIN_SIDE}–{catalog.MAX_SIDE} pixels.",
                  file=sys.stderr)
            return 2
    snapped = (snap(width), snap(height))
    if snapped != (width, height):
        print(f"note: {width}×{height} snapped to {snapped[0]}×{snapped[1]} (multiples of {catalog.SIZE_MULTIPLE}).",
              file=sys.stderr)
        width, height = snapped
    nets = list(getattr(args, "controlnet", None) or [])
    problem = controlnets_problem(variant.name, nets)
    if problem:
        print(f"error: --controlnet: {problem}", file=sys.stderr)
        return 2
    preset = (getattr(args, "preset", None) or "").strip()
    if preset and preset != "auto":
        try:
            plan = plan_for(hw, variant.name, preset, width, height, controlnets=nets)
        except KeyError as e:
            print(f"error: --preset: {e.args[0] if e.args else e}", file=sys.stderr)
            return 2
    else:
        plan = choose(hw, variant.name, width, height, controlnets=nets)
    if getattr(args, "json", False):
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(format_plan(plan))
    return 0 if plan.fits else 1
