"""Inpaint: an image with a mask painted over it in the browser (or uploaded), repainted where the
mask is — the whole picture at once, or only the masked region at full resolution.

The painted layer's alpha is the mask (``studio.engine.inpaint.mask_from_editor``); an uploaded mask
(white = change) wins over the painted one. Everything else is the engine's: it checks the mask,
crops, repaints, pastes back through the blurred mask and stores the mask beside the image.
"""

from __future__ import annotations

import gradio as gr

from studio.engine.inpaint import editor_value, mask_from_editor

from .components import ImageMaskPaths, ImagePath
from .controls import AdvancedGroup, BatchGroup, PromptRow, ResultPanel, SamplingGroup, SeedRow, slider
from .generate import GenTab

WHOLE = "Whole picture"
ONLY_MASKED = "Only masked"


class InpaintTab(GenTab):
    """The inpaint tab: the image with its painted mask, an uploaded mask, and the inpaint settings."""
    mode = "inpaint"
    tab_id = "inpaint"

    def __init__(self, ctx):
        super().__init__(ctx)
        variant = ctx.variant()
        p = self.tab_id
        self.prompt_row = PromptRow(p, placeholder="Describe what the masked area should show…",
                                    styles=ctx.studio.style_names())
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=320, elem_classes=["settings-col"]):
                gr.Markdown("Upload an image, then paint over what should change.",
                            elem_classes=["sd-muted", "mask-note"])
                self.editor = ImageMaskPaths(
                    label="Image", sources=["upload", "clipboard"],
                    format="png", height=420, layers=False, transforms=(),
                    brush=gr.Brush(default_size=24, colors=["#ffffff"], default_color="#ffffff",
                                   color_mode="fixed"),
                    elem_id=f"{p}-editor",
                )
                with gr.Accordion("Upload a mask instead", open=False, elem_id=f"{p}-mask-upload-acc") as self.mask_acc:
                    gr.Markdown("White = change, black = keep. An uploaded mask wins over the painted one.",
                                elem_classes=["sd-muted", "mask-note"])
                    self.mask_upload = ImagePath(
                        label="Mask", image_mode=None,
                        sources=["upload", "clipboard"], height=220, elem_id=f"{p}-mask-upload",
                    )
                self.strength = slider(
                    "strength", "inpaint", elem_id=f"{p}-strength",
                    info="How much of the masked area to repaint: 1 ignores what was there.",
                )
                self.area = gr.Radio([WHOLE, ONLY_MASKED], value=WHOLE, label="Inpaint area",
                                     info="Only masked: repaint the mask's box (plus padding) at full resolution.",
                                     elem_id=f"{p}-area")
                with gr.Row():
                    self.mask_blur = slider("mask_blur", "inpaint", elem_id=f"{p}-mask-blur")
                    self.padding = slider("padding", "inpaint", label="Padding (px, only masked)",
                                          elem_id=f"{p}-padding")
                self.sampling = SamplingGroup(p, variant.steps, variant.guidance)
                self.seed_row = SeedRow(p)
                self.batch = BatchGroup(p)
                self.advanced = AdvancedGroup(p, slg_visible=False, slg_value=False, with_slg=False)
            with gr.Column(scale=6, min_width=360):
                self.result = ResultPanel(p)

    def inputs(self) -> list:
        """The components whose values make the request."""
        return [self.editor, self.mask_upload, self.strength, self.mask_blur, self.area, self.padding,
                self.prompt_row.prompt, self.prompt_row.negative, self.sampling.steps, self.sampling.guidance,
                self.seed_row.seed, self.batch.batch_count, self.batch.batch_size, self.advanced.shift,
                self.advanced.max_sequence_length]

    def field_components(self) -> dict:
        """The shared fields plus strength, mask blur and padding."""
        d = super().field_components()
        d.update(strength=self.strength, mask_blur=self.mask_blur, padding=self.padding)
        return d

    def fields(self, v: dict) -> dict:
        """The image and the mask (an uploaded one wins over the painted one) and the inpaint settings."""
        image, mask = mask_from_editor(v[self.editor])  # files, header-checked before decoding
        if v[self.mask_upload] is not None:
            mask = v[self.mask_upload]
        return {**super().fields(v), "init_image": image, "mask_image": mask, "strength": v[self.strength],
                "mask_blur": v[self.mask_blur], "only_masked": v[self.area] == ONLY_MASKED,
                "padding": v[self.padding]}

    # -- reuse parameters: the stored mask comes back painted over the image it made --

    def apply_fields(self, fields: dict, inputs: dict | None = None) -> dict:
        """The shared reuse updates plus the stored source with its mask painted over it, and the mask in its box."""
        out = super().apply_fields(fields, inputs)
        if fields.get("only_masked") is not None:
            out[self.area] = ONLY_MASKED if fields.get("only_masked") else WHOLE
        inputs = inputs or {}
        if inputs.get("init_image"):  # the stored source, with the stored mask painted over it
            out[self.editor] = editor_value(inputs["init_image"], inputs.get("mask_image"))
            out[self.mask_upload] = inputs.get("mask_image")
            out[self.mask_acc] = gr.Accordion(open=bool(inputs.get("mask_image")))
        return out

    def image_checks(self) -> list:
        """The editor's image and the uploaded mask are checked on upload."""
        return [(self.editor, "init_image"), (self.mask_upload, "mask_image")]

    def reuse_targets(self) -> list:
        """The shared targets plus the area, the editor, the mask box and its accordion."""
        return [*super().reuse_targets(), self.area, self.editor, self.mask_upload, self.mask_acc]


def create_ui(ctx) -> InpaintTab:
    """Build the inpaint tab."""
    return InpaintTab(ctx)
