"""The engine: one way to generate.

``Engine.generate(GenerationRequest)`` is the only path from a request to images; requests are
built by :func:`build_request` from field dicts and checked by :func:`validate` against the one
table of limits (``limits``). Inside:

    limits.py        the limits and defaults per mode, the mode list, the one snapping function
    request.py       GenerationRequest, build_request, results, progress events, cancel tokens
    images.py        image inputs, checked from their headers before any decode
    validate.py      validate: every refusal, with the field, the range and the fix
    prompts.py       what the text encoders read (token notes) and the prompt-embedding cache
    preview.py       cheap latent → RGB previews
    inpaint.py       masks, the box to repaint, paste-back
    run.py           Engine: the run loop
"""

from studio.engine.images import normalize_init_image, open_image
from studio.engine.limits import LIMITS, MAX_SEED, MODES, snap
from studio.engine.preview import latents_to_preview
from studio.engine.prompts import PromptCache, token_notes
from studio.engine.request import (
    CancelToken,
    GeneratedImage,
    GenerationRequest,
    GenerationResult,
    ProgressEvent,
    Resolved,
    build_request,
)
from studio.engine.run import Engine
from studio.engine.validate import check_number, validate
from studio.errors import GenerationError, ValidationError

__all__ = [
    "LIMITS", "MAX_SEED", "MODES", "CancelToken", "Engine", "GeneratedImage", "GenerationError",
    "GenerationRequest", "GenerationResult", "ProgressEvent", "PromptCache", "Resolved", "ValidationError",
    "build_request", "check_number", "latents_to_preview", "normalize_init_image", "open_image", "snap",
    "token_notes", "validate",
]
