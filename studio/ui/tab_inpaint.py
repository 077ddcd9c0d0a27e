"""Inpaint: an image with a mask painted over it in the browser (or uploaded), repainted where the
mask is — the whole picture at once, or only the masked region at full resolution.

The painted layer's alpha is the mask (``studio.inpaint.mask_from_editor``); an uploaded mask
(white = change) wins over the painted one. Everything else is the engine's: it checks the mask,
crops, repaints, pastes back through the blurred mask and stores the mask beside the image.
"""

from __future__ import annotations

import gradio as gr

from ..engine import GenerationRequest
from .controls import AdvancedGroup, BatchGroup, PromptRow, ResultPanel, SamplingGroup, SeedRow
from .generate import GenTab

WHOLE = "Whole picture"
ONLY_MASKED = "Only masked"


class InpaintTab(GenTab):
    mode = "inpaint"
    tab_id = "inpaint"

    def __init__(self, ctx):
        super().__init__(ctx)
        variant = ctx.variant()
        p = self.tab_id
        self.prompt_row = PromptRow(p, placeholder="Describe what the masked area should show…")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=320, elem_classes=["settings-col"]):
                self.editor = gr.ImageMask(
                    label="Image — paint the area to change", type="pil", sources=["upload", "clipboard"],
                    format="png", height=420, layers=False, transforms=(),
                    brush=gr.Brush(default_size=24, colors=["#ffffff"], default_color="#ffffff",
                                   color_mode="fixed"),
                    elem_id=f"{p}-editor",
                )
                with gr.Accordion("Upload a mask instead", open=False, elem_id=f"{p}-mask-upload-acc"):
                    self.mask_upload = gr.Image(
                        label="Mask (white = change, black = keep; wins over the painted mask)", type="pil", image_mode=None,
                        sources=["upload", "clipboard"], height=200, elem_id=f"{p}-mask-upload",
                    )
                self.strength = gr.Slider(
                    0, 1, value=0.85, step=0.01, label="Strength", elem_id=f"{p}-strength",
                    info="How much of the masked area to repaint: 1 ignores what was there.",
                )
                with gr.Row():
                    self.mask_blur = gr.Slider(0, 64, value=4, step=1, label="Mask blur (px)",
                                               elem_id=f"{p}-mask-blur")
                    self.area = gr.Radio([WHOLE, ONLY_MASKED], value=WHOLE, label="Inpaint area",
                                         elem_id=f"{p}-area")
                    self.padding = gr.Slider(0, 256, value=32, step=4, label="Only masked: padding (px)",
                                             elem_id=f"{p}-padding")
                self.sampling = SamplingGroup(p, variant.steps, variant.guidance)
                self.seed_row = SeedRow(p)
                self.batch = BatchGroup(p)
                self.advanced = AdvancedGroup(p, slg_visible=False, slg_value=False, with_slg=False)
            with gr.Column(scale=6, min_width=360):
                self.result = ResultPanel(p)

    def inputs(self) -> list:
        return [self.editor, self.mask_upload, self.strength, self.mask_blur, self.area, self.padding,
                self.prompt_row.prompt, self.prompt_row.negative, self.sampling.steps, self.sampling.guidance,
                self.seed_row.seed, self.batch.batch_count, self.batch.batch_size, self.advanced.shift,
                self.advanced.max_sequence_length]

    def field_components(self) -> dict:
        d = super().field_components()
        d.update(strength=self.strength, mask_blur=self.mask_blur, padding=self.padding)
        return d

    def request(self, v: dict) -> GenerationRequest:
        from ..inpaint import mask_from_editor

        image, mask = mask_from_editor(v[self.editor])
        if v[self.mask_upload] is not None:
            mask = v[self.mask_upload]
        return GenerationRequest(
            prompt=v[self.prompt_row.prompt],
            negative_prompt=v[self.prompt_row.negative],
            mode="inpaint",
            init_image=image,
            mask_image=mask,
            strength=v[self.strength],
            mask_blur=v[self.mask_blur],
            only_masked=v[self.area] == ONLY_MASKED,
            padding=v[self.padding],
            steps=v[self.sampling.steps],
            guidance=v[self.sampling.guidance],
            seed=v[self.seed_row.seed] if v[self.seed_row.seed] is not None else -1,
            batch_count=v[self.batch.batch_count],
            batch_size=v[self.batch.batch_size],
            shift=v[self.advanced.shift],
            max_sequence_length=v[self.advanced.max_sequence_length],
            variant=self.ctx.variant_for_request(),
        )

    # -- reuse parameters: the stored mask comes back painted over the image it made --

    def apply_fields(self, fields: dict) -> dict:
        out = super().apply_fields(fields)
        if fields.get("only_masked") is not None:
            out[self.area] = ONLY_MASKED if fields.get("only_masked") else WHOLE
        editor = self.editor_value(fields)
        if editor is not None:
            out[self.editor] = editor
            out[self.mask_upload] = None
        return out

    def editor_value(self, fields: dict):
        """Editor value: the gallery image (``_source_image``) as background, the stored mask
        (``mask_sha256``) as the painted layer. None when either is missing."""
        from PIL import Image

        masks = self.ctx.studio.engine.masks
        mask = masks.get(fields.get("mask_sha256")) if masks is not None else None
        src = fields.get("_source_image")
        if mask is None or not src:
            return None
        with Image.open(src) as im:
            background = im.convert("RGBA")
        if mask.size != background.size:
            mask = mask.resize(background.size)
        layer = Image.new("RGBA", background.size, (255, 255, 255, 0))
        layer.putalpha(mask)
        return {"background": background, "layers": [layer], "composite": None}

    def reuse_targets(self) -> list:
        return [*super().reuse_targets(), self.area, self.editor, self.mask_upload]


def create_ui(ctx) -> InpaintTab:
    return InpaintTab(ctx)
