"""Models & Memory: what the machine has, which model to load from where, the memory preset
(with the planner's explanation drawn as a bar of each component's bytes against VRAM), a live
VRAM/RAM readout, and the Hugging Face token on local runs.

The hardware and memory modules are imported inside the handlers so the tab still builds if
they are missing or fail; everything drawn as HTML is escaped.
"""

from __future__ import annotations

import html
import logging

import gradio as gr

from studio.catalog import DEFAULT_VARIANT, VARIANTS
from .jobs import call

log = logging.getLogger(__name__)
e = html.escape

GB = 1024**3


def _gb(n) -> str:
    try:
        return f"{float(n) / GB:.1f} GB"
    except (TypeError, ValueError):
        return "?"


# --- hardware / memory (studio.hardware, studio.memory; imported when the tab opens) -----------


def detect():
    """The machine's hardware, or None when detection fails (the tab still renders)."""
    try:
        from studio.hardware import detect_hardware

        return detect_hardware()
    except Exception as ex:  # noqa: BLE001 — the tab must still render
        log.warning("hardware detection failed: %s", ex)
        return None


def hardware_html(hw) -> str:
    """The hardware card (escaped)."""
    if hw is None:
        return "<div class='sd-card sd-muted'>Hardware detection failed; see the console.</div>"
    rows = []
    for g in hw.gpus:
        rows.append(("cuda:%d" % g.index, f"{g.name} — {_gb(g.total_bytes)} ({_gb(g.free_bytes)} free)"))
    if hw.mps:
        rows.append(("mps", f"Apple GPU — Metal budget {_gb(hw.mps_budget_bytes)}"))
    if not hw.gpus and not hw.mps:
        rows.append(("GPU", "none detected"))
    rows.append(("RAM", f"{_gb(hw.ram_total_bytes)} ({_gb(hw.ram_available_bytes)} available)"))
    rows.append(("Uses", hw.device + (" (simulated)" if hw.overridden else "")))
    cells = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows)
    return f"<div class='sd-card'><table class='sd-kv'>{cells}</table></div>"


def preset_choices() -> list[tuple[str, str]]:
    """The memory preset dropdown's choices: auto, then every preset by rank."""
    choices = [("auto — the planner picks", "auto")]
    try:
        from studio.memory import presets_by_rank

        choices += [(f"{p.label} ({p.name})", p.name) for p in presets_by_rank()]
    except Exception as ex:  # noqa: BLE001
        log.warning("memory presets unavailable: %s", ex)
    return choices


COLORS = {"text_encoder": "#a5b4fc", "text_encoder_2": "#818cf8", "text_encoder_3": "#0ea5e9",
          "transformer": "#6366f1", "vae": "#10b981"}


def demo_note(studio, hw, variant: str, preset: str, planned: str) -> str:
    """In demo mode, how the tiny models load for this choice (``placement_for`` is the one
    decision) and why that differs from the plan, which is for the real weights."""
    if studio is None or not studio.config.demo:
        return ""
    try:
        placement = studio.placement_for(preset or "auto", variant, hardware=hw)
    except Exception as ex:  # noqa: BLE001 — the plan still renders
        return f"<div class='sd-demo-note'>Demo: this preset cannot load here ({e(str(ex))}).</div>"
    why = (placement.reason or "the preset chosen").removeprefix("demo: ")
    same = placement.name == planned
    return (f"<div class='sd-demo-note'>Demo: the tiny models load as <b>{e(placement.name)}</b> on "
            f"{e(placement.device)}{'' if same else f' (not {e(planned)})'} — {e(why)}.</div>")


def plan_html(hw, variant: str, preset: str, width: int = 1024, height: int = 1024, studio=None) -> str:
    """The planner's verdict for a variant + preset, with a bar of each component's bytes (and the
    activations at peak) against the memory budget. Everything interpolated is escaped. With a
    demo ``studio``, it says how the demo loads instead, and that the verdict is for the real
    weights."""
    if hw is None:
        return "<div class='sd-card sd-muted'>No plan without hardware information.</div>"
    try:
        from studio import memory

        if preset in (None, "", "auto"):
            plan = memory.choose(hw, variant, width, height)
            p = memory.get_preset(plan.preset)
            est, budget, ok, reason, text = plan.estimate, plan.budget_bytes, plan.fits, None, plan.explanation
        else:
            p = memory.get_preset(preset)
            est = memory.estimate(variant, p, width, height, hardware=hw)
            budget = memory.budget_bytes(p, hw)
            reason = p.check(hw) or memory.fits(est, p, hw)
            ok, text = reason is None, p.description
    except Exception as ex:  # noqa: BLE001
        return f"<div class='sd-card sd-muted'>No plan: {e(str(ex))}</div>"
    where = {"cuda": "VRAM", "mps": "Metal budget", "cpu": "usable RAM"}.get(p.device, "memory")
    verdict = "<span class='sd-ok'>fits</span>" if ok else "<span class='sd-bad'>does not fit</span>"
    demo = demo_note(studio, hw, variant, preset, p.name)
    if demo:
        verdict += " <span class='sd-muted'>(the real weights, on this machine)</span>"
    lines = text.splitlines()
    head, rest = (lines[0], lines[1:]) if lines else ("", [])
    if reason:
        head = f"{p.description} — {reason}"
        rest = []
    scale = max(budget, est.peak_bytes, 1)
    segs, legend = [], []
    for r in est.components:
        if not r.bytes:
            legend.append(f"<span class='sd-leg sd-muted'><i style='background:#e2e8f0'></i>{e(r.label)} not loaded</span>")
            continue
        c = COLORS.get(r.component, "#64748b")
        segs.append(f"<div class='sd-seg' style='width:{100 * r.bytes / scale:.2f}%;background:{c}' "
                    f"title='{e(r.label)} {e(_gb(r.bytes))}'></div>")
        legend.append(f"<span class='sd-leg'><i style='background:{c}'></i>{e(r.label)} {e(_gb(r.bytes))}"
                      f" <small>{e(r.device)} · {e(r.dtype)}</small></span>")
    extra = max(est.peak_bytes - est.weights_bytes, 0)
    if extra:
        segs.append(f"<div class='sd-seg sd-act' style='width:{100 * extra / scale:.2f}%' "
                    f"title='activations + overhead at peak {e(_gb(extra))}'></div>")
        legend.append(f"<span class='sd-leg'><i class='sd-act'></i>activations at peak ({e(est.peak_phase)}) "
                      f"{e(_gb(extra))}</span>")
    marker = f"<div class='sd-budget' style='left:{min(100, 100 * budget / scale):.2f}%'></div>" if budget else ""
    details = ("<details class='sd-details'><summary>Details</summary><pre>" + e("\n".join(rest)) + "</pre></details>"
               if rest else "")
    return (
        f"<div class='sd-card'><div class='sd-plan-head'>Preset <b>{e(p.name)}</b> · {e(p.label)} {verdict}</div>"
        f"{demo}<div class='sd-plan-expl'>{e(head)}</div>"
        f"<div class='sd-bar-wrap'><div class='sd-bar'>{''.join(segs)}</div>{marker}</div>"
        f"<div class='sd-bar-cap'>peak {e(_gb(est.peak_bytes))} of {e(_gb(budget))} {e(where)} "
        f"· {width}×{height}</div>"
        f"<div class='sd-legend'>{''.join(legend)}</div>{details}</div>"
    )


def memory_html() -> str:
    """The live VRAM/RAM meters (escaped)."""
    try:
        from studio.hardware import memory_snapshot

        snap = memory_snapshot()
    except Exception as ex:  # noqa: BLE001
        return f"<div class='sd-muted'>No memory readout ({e(type(ex).__name__)}).</div>"
    parts = []
    for g in snap.get("gpus", []):
        parts.append(_meter(f"cuda:{g['index']}", g["used_bytes"], g["total_bytes"]))
    mps = snap.get("mps")
    if mps:
        parts.append(_meter("mps", mps.get("driver_bytes", 0), mps.get("budget_bytes", 0)))
    ram = snap.get("ram") or {}
    parts.append(_meter("RAM", ram.get("used_bytes", 0), ram.get("total_bytes", 0)))
    rss = snap.get("process_rss_bytes")
    note = f"<div class='sd-muted sd-small'>this process: {e(_gb(rss))}</div>" if rss else ""
    return "<div class='sd-meters'>" + "".join(parts) + note + "</div>"


def _meter(label, used, total) -> str:
    pct = max(0.0, min(100.0, 100 * float(used or 0) / float(total))) if total else 0.0
    return (f"<div class='sd-meter'><span class='sd-meter-label'>{e(label)}</span>"
            f"<div class='sd-meter-bar'><div style='width:{pct:.1f}%'></div></div>"
            f"<span class='sd-meter-val'>{e(_gb(used))} / {e(_gb(total))}</span></div>")


# --- Hugging Face token ------------------------------------------------------------------------


def token_status() -> str:
    """Whether a token is saved (no network; the token itself is never shown)."""
    try:
        from huggingface_hub import get_token

        return ("A Hugging Face token is saved on this machine. Use **Check** to verify it."
                if get_token() else
                "No Hugging Face token saved. The official repos are gated: accept the licence on "
                "the model page, then paste a read token below.")
    except Exception:  # noqa: BLE001
        return "huggingface_hub is not available."


def token_login(token: str) -> tuple[str, str]:
    """Save a Hugging Face token (never echoed back); returns (status, cleared box)."""
    token = (token or "").strip()
    if not token:
        raise gr.Error("Paste a Hugging Face access token (read access is enough).", print_exception=False)
    try:
        from huggingface_hub import login

        login(token=token, add_to_git_credential=False, skip_if_logged_in=False)
    except Exception as ex:  # noqa: BLE001 — never echo the token back
        raise gr.Error(f"Login failed: {type(ex).__name__}. Check the token and your connection.",
                       print_exception=False) from None
    return token_check(), ""


def token_check() -> str:
    """What **Check** says: always a fresh line (and a toast), never a silent no-op."""
    try:
        from huggingface_hub import get_token, whoami

        if not get_token():
            gr.Warning("No Hugging Face token to check: paste one and press Save token.")
            return ("Checked: **no token is saved** on this machine (nor `HF_TOKEN` set). The official "
                    "repos are gated: accept the licence on the model page, paste a read token above and "
                    "press *Save token*.")
        me = whoami()
        return f"Logged in to the Hugging Face Hub as **{e(str(me.get('name', '?')))}**."
    except Exception as ex:  # noqa: BLE001
        return f"A token is saved, but the Hub could not confirm it ({e(type(ex).__name__)}: offline or invalid)."


# --- the tab -----------------------------------------------------------------------------------


def load_model(studio, variant, source, preset, progress=None) -> str:
    """Load a model; returns a one-line status. ModelError → a toast with its message."""
    def report(message, fraction):
        if progress is not None:
            progress(fraction if fraction is not None else 0, desc=str(message))

    loaded = call(studio.load_model, source=(source or "").strip() or None, variant=variant or None,
                  preset=preset or None, progress=report)
    return (f"Loaded {loaded.label} from {loaded.source.ref} · preset {loaded.placement.name} on "
            f"{loaded.placement.device} · native {loaded.native_size[0]}×{loaded.native_size[1]}")


class ModelsTab:
    """The Models & Memory tab's components and handlers."""
    tab_id = "models"

    def __init__(self, ctx):
        self.ctx = ctx
        studio = ctx.studio
        current = studio.current
        variant = (current.variant.name if current else None) or studio.config.variant or DEFAULT_VARIANT
        self._hw = None  # detected when the tab first opens (the planner imports torch)
        self._variant0 = variant
        with gr.Row(equal_height=False):
            with gr.Column(scale=6, min_width=360):
                gr.Markdown("### Model")
                self.variant = gr.Dropdown([(v.label, k) for k, v in VARIANTS.items()], value=variant,
                                           label="Variant", elem_id="models-variant")
                self.variant_note = gr.Markdown(_variant_note(variant), elem_classes=["sd-muted"])
                self.source = gr.Textbox(
                    label="Source (optional)", elem_id="models-source", visible=not studio.shared,
                    placeholder=source_placeholder(variant),
                    info="A Hub id, a local diffusers folder (with model_index.json) or a single .safetensors file.",
                )
                preset0 = studio.config.preset or "auto"
                self.preset = gr.Dropdown([("auto — the planner picks", "auto")] + ([(preset0, preset0)] if preset0 != "auto" else []),
                                          value=preset0, label="Memory preset", elem_id="models-preset")
                with gr.Row():
                    self.load_btn = gr.Button("Load model", variant="primary", elem_id="models-load")
                    self.unload_btn = gr.Button("Unload", elem_id="models-unload", visible=not studio.shared)
                self.status = gr.Textbox(label="Status", interactive=False, lines=2, elem_id="models-status")
                gr.Markdown("### Plan" + (" <small>(for the real weights at 1024²; the demo's tiny models need almost nothing)</small>"
                                          if studio.config.demo else " <small>(at 1024²)</small>"))
                self.plan = gr.HTML("<div class='sd-card sd-muted'>Planning…</div>", elem_id="models-plan")
            with gr.Column(scale=5, min_width=320):
                gr.Markdown("### This machine")
                self.hardware = gr.HTML("<div class='sd-card sd-muted'>Detecting…</div>", elem_id="models-hardware")
                gr.Markdown("### Memory now")
                self.memory = gr.HTML(memory_html(), elem_id="models-memory")
                self.timer = gr.Timer(2.0, active=False)
                with gr.Column(visible=not studio.shared, elem_id="models-hf"):
                    gr.Markdown("### Hugging Face")
                    self.token_status = gr.Markdown(token_status() if not studio.shared else "",
                                                    elem_id="models-token-status", elem_classes=["sd-muted"])
                    self.token = gr.Textbox(label="Access token", type="password", placeholder="hf_…",
                                            elem_id="models-token")
                    with gr.Row():
                        self.login_btn = gr.Button("Save token", size="sm", elem_id="models-login")
                        self.check_btn = gr.Button("Check", size="sm", elem_id="models-check")
        self._wire(studio)

    def _wire(self, studio):
        kw = dict(api_visibility="private", show_progress="hidden")
        for trig in (self.variant.change, self.preset.change):
            trig(self._replan, [self.variant, self.preset], self.plan, concurrency_limit=None, **kw)
        self.variant.change(_variant_note, self.variant, self.variant_note, queue=False, api_visibility="private")
        self.variant.change(lambda v: gr.update(placeholder=source_placeholder(v)), self.variant, self.source,
                            queue=False, api_visibility="private")
        self.timer.tick(memory_html, None, self.memory, concurrency_limit=None, **kw)
        if not studio.shared:
            self.login_btn.click(token_login, self.token, [self.token_status, self.token],
                                 concurrency_limit=None, **kw)
            self.check_btn.click(token_check, None, self.token_status, concurrency_limit=None, **kw)

    def _replan(self, variant, preset):
        if self._hw is None:
            return gr.update()
        return plan_html(self._hw, variant, preset, studio=self.ctx.studio)

    def opened(self, variant, preset):
        """The tab opened: detect the hardware once, list the presets, plan, start the readout."""
        if self._hw is None:
            self._hw = detect()
        return {
            self.hardware: hardware_html(self._hw),
            self.preset: gr.update(choices=preset_choices()),
            self.plan: plan_html(self._hw, variant, preset, studio=self.ctx.studio),
            self.memory: memory_html(),
            self.timer: gr.Timer(active=True),
        }

    def opened_targets(self):
        """What opening the tab updates."""
        return [self.hardware, self.preset, self.plan, self.memory, self.timer]

    def load(self, variant, source, preset, progress=gr.Progress()):
        """The Load model button: the status line."""
        return load_model(self.ctx.studio, variant, source, preset, progress)

    def unload(self):
        """The Unload button: the status line."""
        call(self.ctx.studio.unload_model)
        return "Unloaded. The next Generate loads the model again."


def source_placeholder(name) -> str:
    """The Source box's hint for a variant: its own repo, then the other kinds of source."""
    v = VARIANTS.get(name or "") or VARIANTS[DEFAULT_VARIANT]
    return (f"blank: {v.repo_id} · another Hub id · /path/to/diffusers-folder · "
            f"/path/to/{v.single_file}")


def _variant_note(name) -> str:
    v = VARIANTS.get(name or "")
    if v is None:
        return ""
    slg = " · SLG recommended" if v.slg.recommended else ""
    return f"{e(v.notes)}  \nRecommended: {v.steps} steps, CFG {v.guidance:g}{slg}."


def create_ui(ctx) -> ModelsTab:
    """Build the Models & Memory tab."""
    return ModelsTab(ctx)
