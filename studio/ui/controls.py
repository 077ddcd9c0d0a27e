"""Shared control groups. Each group is a small class whose attributes are its components, so a
tab composes groups instead of repeating them (and "reuse parameters" finds a field's component
through ``fields``).

Nothing here validates: values go to the engine as they are, and the engine says what is wrong.
Every slider's range, step and default come from the limits table (``studio.engine.limits``), so
the UI offers exactly what the engine accepts.
"""

from __future__ import annotations

import gradio as gr

from studio.catalog import ASPECT_PRESETS, SIZE_MULTIPLE, VARIANTS, SizeRules
from studio.engine.limits import LIMITS, snap
from studio.engine.samplers import DEFAULT_SAMPLER, SAMPLERS, SCHEDULES
from studio.engine.stepcache import SPEED_DEFAULT, SPEED_HELP, SPEED_MODES

NATIVE = "Native (model size)"
MATCH_INIT = "Match init image"
CUSTOM = "Custom"


def slider(name: str, mode: str = "txt2img", value=None, **kwargs) -> gr.Slider:
    """A slider for one input of the limits table (its range, step, label and default).

    A value typed past the range is clamped by the slider when the box loses focus; the slider
    sends a ``release`` event with the typed value first, so the clamp is said, not silent."""
    lim = LIMITS[name]
    if value is None:
        value = lim.default_for(mode)
    kwargs.setdefault("label", lim.label)
    s = gr.Slider(lim.lo, lim.hi, value=value, step=lim.step, **kwargs)
    label = kwargs["label"]

    def said(raw):
        note = clamp_note(label, lim.lo, lim.hi, raw)
        if note:
            gr.Warning(note, duration=6)

    # preprocess=False: the raw typed value, before Gradio's own clamp
    # queued (toasts need the queue), never limited: it does not wait for a generation
    s.release(said, s, None, preprocess=False, concurrency_limit=None, show_progress="hidden",
              api_visibility="private")
    return s


def clamp_note(label: str, lo: float, hi: float, raw) -> str | None:
    """What the slider did to a typed value it clamps (None when the value is within range)."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    if value != value:  # NaN
        return None
    if value < lo:
        return f"{label} {value:g} is below {lo:g}: it was set to {lo:g}."
    if value > hi:
        return f"{label} {value:g} is above {hi:g}: it was set to {hi:g}."
    return None


class PromptRow:
    """Prompt (with its token counter), negative prompt and styles on the left, Generate / Cancel
    on the right."""

    def __init__(self, prefix: str, negative: bool = True, placeholder: str = "Describe the image…",
                 styles=()):
        with gr.Row(equal_height=False, elem_classes=["prompt-row"]):
            with gr.Column(scale=8, min_width=320):
                self.prompt = gr.Textbox(
                    label="Prompt", lines=3, max_lines=12, placeholder=placeholder,
                    elem_id=f"{prefix}-prompt",
                )
                # what the encoders will read, before Generate (filled once a model is loaded)
                self.tokens = gr.Markdown("", elem_id=f"{prefix}-tokens", elem_classes=["token-count"])
                self.negative = gr.Textbox(
                    label="Negative prompt", lines=1, max_lines=6, visible=negative,
                    placeholder="What to avoid (used only with CFG)", elem_id=f"{prefix}-negative",
                )
                self.styles = gr.Dropdown(list(styles), value=[], multiselect=True, label="Styles",
                                          info="from styles.csv (A1111's format), applied in order",
                                          elem_id=f"{prefix}-styles")
            with gr.Column(scale=1, min_width=150, elem_classes=["action-col"]):
                self.generate = gr.Button("Generate", variant="primary", size="lg",
                                          elem_id=f"{prefix}-generate", elem_classes=["generate-btn"])
                self.cancel = gr.Button("Cancel", variant="stop", size="md", elem_id=f"{prefix}-cancel")


class SeedRow:
    """Seed (-1 = random) with a dice (random) and a recycle (reuse the last seed used) button."""

    def __init__(self, prefix: str):
        self.last_seed = gr.State(None)
        with gr.Row(equal_height=False, elem_classes=["seed-row"]):
            self.seed = gr.Number(value=-1, label="Seed (-1 = random)", precision=0, scale=4,
                                  min_width=140, elem_id=f"{prefix}-seed")
            with gr.Column(scale=1, min_width=110, elem_classes=["seed-buttons"]):
                self.randomize = gr.Button("Random", size="sm", elem_id=f"{prefix}-seed-random")
                self.reuse = gr.Button("Last used", size="sm", elem_id=f"{prefix}-seed-reuse")
        self.randomize.click(lambda: -1, None, self.seed, queue=False, api_visibility="private")
        self.reuse.click(lambda last, cur: cur if last is None else last, [self.last_seed, self.seed],
                         self.seed, queue=False, api_visibility="private")


def preset_sizes(max_side: int, multiple: int = SIZE_MULTIPLE) -> dict[str, tuple[int, int]]:
    """The aspect presets (ratio → width, height) for a model whose largest side is ``max_side``
    and whose sides are multiples of ``multiple``: the catalog's sizes, or scaled down to fit
    (aspect kept, snapped to the multiple) where they are larger."""
    out = {}
    for name, (w, h) in ASPECT_PRESETS.items():
        scale = min(1.0, max_side / max(w, h))
        out[name.split(" ", 1)[0]] = (min(max_side, snap(w * scale, multiple)),
                                      min(max_side, snap(h * scale, multiple)))
    return out


class SizeGroup:
    """Aspect presets plus custom width/height.

    The first choice means "let the engine decide" (the model's native size for txt2img — the
    tiny demo's is 256² — or the init image's size for img2img): width and height go as None.
    The presets' values are their ratios ("16:9"); their sizes come from ``limit()`` — (the
    SizeRules of the tab's model, its name) — so a model with a smaller range gets the presets
    scaled to fit, and the dropdown says so. Width/height show for Custom only; the engine snaps
    them to the model's multiple (16 for SD3) and says so.
    """

    def __init__(self, prefix: str, native_label: str = NATIVE, native_size=None, limit=None):
        self.native_label = native_label
        self.native_size = native_size
        self.limit = limit or (lambda: (SizeRules(), "the model"))
        self.aspect = gr.Dropdown(**self.choices(), value=native_label, label="Size", elem_id=f"{prefix}-aspect")
        with gr.Row(visible=False) as self.custom_row:
            self.width = gr.Number(value=1024, label="Width", precision=0, step=16, elem_id=f"{prefix}-width")
            self.height = gr.Number(value=1024, label="Height", precision=0, step=16, elem_id=f"{prefix}-height")
        self.aspect.change(self._preset, [self.aspect, self.width, self.height],
                           [self.width, self.height, self.custom_row], queue=False, api_visibility="private")

    def presets(self) -> dict[str, tuple[int, int]]:
        """Ratio → (width, height) for the tab's model now."""
        rules = self.limit()[0]
        return preset_sizes(rules.max_side, rules.multiple)

    def choices(self) -> dict:
        """The dropdown's choices and note for the model the tab generates with now."""
        rules, name = self.limit()
        max_side = rules.max_side
        presets = preset_sizes(max_side, rules.multiple)
        scaled = any(presets[n.split(" ", 1)[0]] != wh for n, wh in ASPECT_PRESETS.items())
        info = (f"Presets scaled to fit {max_side} px, the largest side {name} accepts." if scaled else None)
        return dict(choices=[self.native_label, *((f"{r} ({w}×{h})", r) for r, (w, h) in presets.items()), CUSTOM],
                    info=info)

    def refresh(self):
        """An update of the dropdown after the model changed (the value, a ratio, stays)."""
        return gr.update(**self.choices())

    def _preset(self, aspect, width, height):
        """Presets fill W/H (so Custom starts from the last choice); W/H show only for Custom,
        and choosing Custom keeps what they hold (a reused size is not overwritten)."""
        custom = gr.update(visible=aspect == CUSTOM)
        presets = self.presets()
        if aspect in presets:
            return *presets[aspect], custom
        if aspect == self.native_label and self.native_size is not None:
            size = self.native_size()
            if size:
                return size[0], size[1], custom
        return gr.update(), gr.update(), custom

    def size(self, aspect, width, height) -> tuple[int | None, int | None]:
        """What the request gets: None/None for the automatic choice, else the numbers as typed."""
        if aspect == self.native_label:
            return None, None
        key = aspect.split(" ", 1)[0] if isinstance(aspect, str) and aspect != CUSTOM else None
        return self.presets().get(key, (width, height))

    def updates_for(self, width, height) -> list:
        """Updates (aspect, width, height, custom_row) showing a reused size."""
        for ratio, wh in self.presets().items():
            if wh == (width, height):
                return [gr.update(value=ratio), width, height, gr.update(visible=False)]
        return [gr.update(value=CUSTOM), width, height, gr.update(visible=True)]


AUTOMATIC = "Automatic"


class SamplingGroup:
    """Sampler and schedule (Forge's names), steps and guidance (defaults: the variant's
    recommendation). Changing the sampler never reloads the model."""

    def __init__(self, prefix: str, steps: int, guidance: float, guidance_visible: bool = True):
        with gr.Row():
            self.sampler = gr.Dropdown(list(SAMPLERS), value=DEFAULT_SAMPLER, label="Sampler",
                                       elem_id=f"{prefix}-sampler")
            self.schedule = gr.Dropdown([AUTOMATIC, *SCHEDULES], value=AUTOMATIC, label="Schedule type",
                                        info="Automatic: the sampler's own", elem_id=f"{prefix}-schedule")
        with gr.Row():
            self.steps = slider("steps", value=steps, elem_id=f"{prefix}-steps")
            self.guidance = slider("guidance", value=guidance, label="Guidance (CFG)", visible=guidance_visible,
                                   elem_id=f"{prefix}-guidance")


class BatchGroup:
    """Batch count (runs) and batch size (images per run)."""
    def __init__(self, prefix: str):
        with gr.Row():
            self.batch_count = slider("batch_count", elem_id=f"{prefix}-batch-count")
            self.batch_size = slider("batch_size", elem_id=f"{prefix}-batch-size")


class AdvancedGroup:
    """Skip Layer Guidance (offered for Medium variants), scheduler shift, T5 tokens, Speed (the
    step cache; off by default, for exact reproduction), prompt weighting and the T5 prompt."""

    def __init__(self, prefix: str, slg_visible: bool, slg_value: bool, with_slg: bool = True):
        with gr.Accordion("Advanced", open=False, elem_id=f"{prefix}-advanced"):
            self.slg = gr.Checkbox(
                value=slg_value, label="Skip Layer Guidance (layers 7–9)", visible=with_slg and slg_visible,
                info="Better anatomy on SD3.5 Medium; one extra pass per step while active.",
                elem_id=f"{prefix}-slg",
            )
            with gr.Row():
                self.shift = slider("shift", elem_id=f"{prefix}-shift")
                self.max_sequence_length = slider("max_sequence_length", elem_id=f"{prefix}-msl")
            self.speed = gr.Radio(list(SPEED_MODES), value=SPEED_DEFAULT, label="Speed (step cache)",
                                  info=" · ".join(f"{m}: {SPEED_HELP[m]}" for m in SPEED_MODES),
                                  elem_id=f"{prefix}-speed")
            self.prompt_weighting = gr.Checkbox(
                True, label="Prompt weighting", elem_id=f"{prefix}-weighting",
                info="A1111's (word:1.2) syntax and 75-token CLIP chunks; off: the prompt is literal text")
            self.prompt_3 = gr.Textbox("", label="T5 prompt", lines=2, max_lines=8, elem_id=f"{prefix}-prompt3",
                                       placeholder="What T5 reads instead of the prompt (empty: the prompt)")
            self.negative_prompt_3 = gr.Textbox("", label="T5 negative prompt", lines=1, max_lines=4,
                                                elem_id=f"{prefix}-negative3",
                                                placeholder="Empty: the negative prompt")
        self.loras = LoraGroup(prefix)


SAME_MODEL = "Same model"


class HiresGroup:
    """Hires fix (as A1111's): the first pass at the chosen size, upscaled by a factor with an
    upscaler, then a second img2img pass at the hires denoise — optionally on another variant
    (Large → Medium, Stability's recipe). Off unless enabled."""

    def __init__(self, prefix: str, mode: str = "txt2img"):
        with gr.Accordion("Hires fix", open=False, elem_id=f"{prefix}-hires") as self.accordion:
            self.enabled = gr.Checkbox(False, label="Enable hires fix", elem_id=f"{prefix}-hires-on")
            with gr.Row():
                self.upscaler = gr.Dropdown(["Lanczos"], value="Lanczos", label="Upscaler", allow_custom_value=True,
                                            elem_id=f"{prefix}-hires-upscaler")
                self.scale = slider("hires_scale", mode, value=2.0, elem_id=f"{prefix}-hires-scale")
            with gr.Row():
                self.steps = slider("hires_steps", mode, value=0, elem_id=f"{prefix}-hires-steps",
                                    info="0: half the first pass's steps")
                self.denoise = slider("hires_denoise", mode, elem_id=f"{prefix}-hires-denoise")
            self.variant = gr.Dropdown([SAME_MODEL, *((v.label, k) for k, v in VARIANTS.items())], value=SAME_MODEL,
                                       label="Second pass model", visible=mode != "turbo",
                                       info="e.g. Large, then Medium: the encoders and VAE are shared",
                                       elem_id=f"{prefix}-hires-variant")

    def components(self) -> list:
        """Every input of the group."""
        return [self.enabled, self.upscaler, self.scale, self.steps, self.denoise, self.variant]

    def fields(self, v: dict) -> dict:
        """The request's hires fields (none while the hires fix is off)."""
        if not v.get(self.enabled):
            return {}
        variant = v.get(self.variant)
        return {"hires_scale": v.get(self.scale), "hires_steps": v.get(self.steps) or None,
                "hires_denoise": v.get(self.denoise), "hires_upscaler": v.get(self.upscaler) or None,
                "hires_variant": None if variant in (None, "", SAME_MODEL) else variant}

    def field_components(self) -> dict:
        """studio field name -> component, for reuse parameters."""
        return {"hires_scale": self.scale, "hires_steps": self.steps, "hires_denoise": self.denoise,
                "hires_upscaler": self.upscaler, "hires_variant": self.variant}


LORA_SLOTS = 4


class LoraGroup:
    """Up to four LoRAs from the loras folder, each with a weight (0 = off), plus refresh, upload
    and unload. The choices are filled when the accordion opens (see GenTab.wire)."""

    def __init__(self, prefix: str, where: str = "<data-dir>/loras"):
        self.where = where
        self.slots: list[tuple[gr.Dropdown, gr.Slider]] = []
        with gr.Accordion("LoRA", open=False, elem_id=f"{prefix}-lora") as self.accordion:
            for i in range(LORA_SLOTS):
                with gr.Row(equal_height=True, elem_classes=["lora-row"]):
                    name = gr.Dropdown([], value=None, label=f"LoRA {i + 1}", scale=3, allow_custom_value=True,
                                       elem_id=f"{prefix}-lora-{i}")
                    weight = slider("lora_weight", label="Weight", scale=2, elem_id=f"{prefix}-lora-weight-{i}")
                self.slots.append((name, weight))
            with gr.Row():
                self.refresh = gr.Button("Refresh list", size="sm", elem_id=f"{prefix}-lora-refresh")
                self.upload = gr.UploadButton("Add LoRA file…", size="sm", file_types=[".safetensors"],
                                              file_count="single", elem_id=f"{prefix}-lora-upload")
                self.unload = gr.Button("Unload LoRAs", size="sm", elem_id=f"{prefix}-lora-unload")
            self.status = gr.Markdown("", elem_id=f"{prefix}-lora-status")

    def components(self) -> list:
        """Every slot's name and weight components."""
        return [c for pair in self.slots for c in pair]

    def hint(self, choices) -> str:
        """The status line for a list of LoRA names: where LoRAs go, when there are none."""
        if choices:
            return ""
        return (f"No LoRAs yet: put SD3 LoRA files (`.safetensors`) in `{self.where}` and press "
                "*Refresh list*, or use the *Add LoRA file…* button.")

    def selection(self, values: dict) -> list[tuple[str, float]]:
        """[(name, weight)] of the filled slots, as chosen (the engine checks them)."""
        out = []
        for name, weight in self.slots:
            n = values.get(name)
            if isinstance(n, str) and n.strip():
                out.append((n.strip(), values.get(weight)))
        return out

    def updates_for(self, selection, choices: list[str]) -> dict:
        """Slot updates showing a reused selection (unknown names are shown; the engine says so)."""
        out = {}
        sel = list(selection)[:LORA_SLOTS]
        names = list(dict.fromkeys([*choices, *(n for n, _ in sel)]))
        for i, (name, weight) in enumerate(self.slots):
            if i < len(sel):
                out[name] = gr.update(choices=names, value=sel[i][0])
                out[weight] = float(sel[i][1])
            else:
                out[name] = gr.update(choices=names, value=None)
                out[weight] = 1.0
        return out


class ResultPanel:
    """Live preview + progress, the saved PNGs, the info text and "send to img2img".

    Results are shown whole (contain, never cropped): one image fills the box, a batch is a
    grid (:func:`result_columns`); ``texts`` holds each result's (prompt, negative prompt) for
    "send to img2img"."""

    def __init__(self, prefix: str):
        self.paths = gr.State([])
        self.texts = gr.State([])
        self.selected = gr.State(0)
        self.progress = gr.HTML("", elem_id=f"{prefix}-progress", elem_classes=["job-progress"])
        self.preview = gr.Image(label="Preview", show_label=False, type="pil", interactive=False, visible=False,
                                height=RESULT_HEIGHT, elem_id=f"{prefix}-preview", buttons=[],
                                elem_classes=["result-preview"])
        self.gallery = gr.Gallery(
            label="Results", show_label=False, format="png", columns=1, height=RESULT_HEIGHT,
            object_fit="contain", preview=False, interactive=False, elem_id=f"{prefix}-results",
            elem_classes=["result-gallery"], buttons=["download", "fullscreen"],
        )
        self.info = gr.Textbox(label="Info", lines=2, max_lines=8, interactive=False,
                               elem_id=f"{prefix}-info", buttons=["copy"])
        with gr.Row():
            label = "Use as init image" if prefix == "img2img" else "Send to img2img"
            self.send_to_img2img = gr.Button(label, size="sm", elem_id=f"{prefix}-send-img2img")
        self.gallery.select(_selected_index, None, self.selected, queue=False, api_visibility="private")

    def show(self, paths: list) -> dict:
        """The gallery update showing ``paths`` as a grid that fits the box."""
        return gr.update(value=list(paths), columns=result_columns(len(paths)))


RESULT_HEIGHT = 520


def result_columns(n: int) -> int:
    """Columns of the result grid for ``n`` images: 1, 2×2, 3×3, then 4 wide (scrolling)."""
    return 1 if n <= 1 else 2 if n <= 4 else 3 if n <= 9 else 4


def _selected_index(evt: gr.SelectData):
    return evt.index if isinstance(evt.index, int) else 0


def progress_html(step: int, steps: int, run: int, runs: int, eta_s: float | None, fraction: float) -> str:
    """A small progress bar (numbers only: nothing user-supplied goes into this HTML)."""
    pct = max(0.0, min(1.0, float(fraction))) * 100
    eta = "" if eta_s is None else f" · ETA {_fmt_s(eta_s)}"
    runs_txt = f"Run {run + 1}/{runs} · " if runs > 1 else ""
    return (
        f'<div class="sd-progress"><div class="sd-progress-bar" style="width:{pct:.1f}%"></div></div>'
        f'<div class="sd-progress-text">{runs_txt}Step {int(step)}/{int(steps)} · {pct:.0f}%{eta}</div>'
    )


def _fmt_s(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"
