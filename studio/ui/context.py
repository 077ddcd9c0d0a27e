"""What every tab needs: the studio, the job runner, and the model the tabs generate with."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

from studio.catalog import DEFAULT_VARIANT, TURBO_VARIANT, VARIANTS, SizeRules, Variant
from .jobs import Jobs


@dataclass
class UIContext:
    """The studio, the job runner and the variant the main tabs generate with, shared by every tab."""
    studio: object
    jobs: Jobs
    # The variant txt2img/img2img run on: the one chosen in Models & Memory (or --variant), so a
    # Turbo run in between does not leave the other tabs on Turbo. None: whatever is loaded.
    main_variant: str | None = None
    tabs: object = None  # gr.Tabs, set by the app
    extra: dict = field(default_factory=dict)

    @classmethod
    def create(cls, studio) -> "UIContext":
        """The context for a studio (the main variant starts as ``--variant``)."""
        return cls(studio, Jobs(studio), main_variant=studio.config.variant)

    def variant(self) -> Variant:
        """The variant whose recommendations the txt2img/img2img controls show."""
        if self.main_variant in VARIANTS:
            return VARIANTS[self.main_variant]
        current = self.current()
        if current is not None and current.variant.name != TURBO_VARIANT:
            return current.variant
        return VARIANTS[DEFAULT_VARIANT]

    def current(self):
        """The loaded model, or None (never loads one)."""
        return self.studio.current

    def native_size(self):
        """The loaded model's native (width, height), or None before a model is loaded."""
        current = self.current()
        return current.native_size if current is not None else None

    def variant_for_request(self) -> str | None:
        """The variant a txt2img/img2img request names (None: the loaded model)."""
        if self.main_variant:
            return self.main_variant
        current = self.current()
        if current is not None and current.variant.name == TURBO_VARIANT:
            return DEFAULT_VARIANT if self.studio.config.demo else None
        return None

    def effective_variant(self) -> str:
        """The catalog variant txt2img / img2img / inpaint generate with now."""
        name = self.variant_for_request()
        if name:
            return name
        current = self.current()
        if current is not None:
            return current.variant.name
        return self.studio.config.variant or DEFAULT_VARIANT

    def size_limit(self, mode: str) -> tuple[SizeRules, str]:
        """(the sizes it accepts, the model's name) for the model a tab of ``mode`` generates with."""
        name = TURBO_VARIANT if mode == "turbo" else self.variant_for_request()
        current = self.current()
        if current is not None and (name is None or current.variant.name == name):
            label = current.label
        else:
            variant = VARIANTS.get(name or self.studio.config.variant or DEFAULT_VARIANT)
            label = (variant.label if variant else "the model") + (" (tiny demo)" if self.studio.config.demo else "")
        return self.studio.size_rules_for(name), label

    def lora_where(self) -> str:
        """Where LoRA files go, as the LoRA panel says it (no server path on shared deployments)."""
        if getattr(self.studio, "shared", False):
            return "<data-dir>/loras"
        return str(self.studio.config.loras_dir)

    def remember(self, result_variant: str | None) -> None:
        """After a run on the loaded model, the main tabs stay on its variant (never Turbo's)."""
        if self.main_variant is None and result_variant and result_variant != TURBO_VARIANT:
            self.main_variant = result_variant


def status_html(studio, loading: str | None = None) -> str:
    """The header's model line (``loading``: the label of a model being loaded now). Everything
    interpolated is escaped."""
    current = studio.current
    e = html.escape
    if loading:
        dot, text = "busy", f"Loading {e(loading)}…"
    elif current is None:
        ok, message = studio.availability(studio.config.variant)
        if ok:
            variant = VARIANTS.get(studio.config.variant or DEFAULT_VARIANT)
            dot, text = "idle", f"No model loaded · {e(variant.label if variant else 'the model')} loads on the first Generate"
        else:
            dot, text = "warn", f"No model yet · {e(message)}"
    else:
        dot = "ok"
        placement = current.placement
        text = (
            f"<b>{e(current.label)}</b> · preset {e(str(placement.name))} · {e(str(placement.device))}"
            f" · native {current.native_size[0]}×{current.native_size[1]}"
            f" · <span class='sd-src'>{e(str(current.source.ref))}</span>"
        )
    demo = "<span class='sd-badge'>demo</span>" if studio.config.demo else ""
    shared = "<span class='sd-badge'>shared</span>" if getattr(studio, "shared", False) else ""
    return (
        "<div class='sd-header'><div class='sd-title'>SD3.5 Studio</div>"
        f"<div class='sd-status'><span class='sd-dot sd-dot-{dot}'></span>{text}{demo}{shared}</div></div>"
    )
