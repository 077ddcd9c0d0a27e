"""Generation metadata: the field schema, A1111 infotext, PNG chunks and foreign readers.

    schema.py     every metadata field and its type, declared once; ``clean`` for outside values
    infotext.py   A1111 ``parameters`` text, both ways, through one key ↔ field registry
    png.py        writing PNGs with both chunks; reading any PNG's metadata (bounded, never raises)
    foreign.py    InvokeAI and ComfyUI metadata
    loras.py      how a LoRA selection is written (``<lora:name:weight>``, ``name:0.8``)
"""

from studio.metadata.infotext import fields_from_infotext, guess_variant, infotext_to_fields, parse_infotext, to_infotext
from studio.metadata.png import PARAMETERS_CHUNK, STUDIO_CHUNK, PngInfo, read_png_info, write_png
from studio.metadata.schema import FIELDS, REQUEST_FIELDS, clean, request_fields

__all__ = ["FIELDS", "PARAMETERS_CHUNK", "REQUEST_FIELDS", "STUDIO_CHUNK", "PngInfo", "clean", "fields_from_infotext",
           "guess_variant", "infotext_to_fields", "parse_infotext", "read_png_info", "request_fields",
           "to_infotext", "write_png"]
