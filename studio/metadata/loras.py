"""How a LoRA selection is written down: ``<lora:name:weight>`` tags (A1111's prompt convention),
the API's ``name:0.8, other`` text, and the metadata's ``loras`` list. Text only: no files."""

from __future__ import annotations

import os
import re

TAG_RE = re.compile(r"<lora:([^:<>\n]+):([^:<>\n]+)>")


def format_weight(weight) -> str:
    """A LoRA weight as it is written in tags and text: ``0.8``, ``1`` (no trailing zeros)."""
    return f"{float(weight):g}"


def tags(loras) -> str:
    """``<lora:name:weight>`` tags for metadata ``loras`` entries (A1111's prompt convention)."""
    return " ".join(f"<lora:{d['name']}:{format_weight(d['weight'])}>" for d in loras or ()
                    if isinstance(d, dict) and d.get("name"))


def split_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """A prompt with ``<lora:name:weight>`` tags → (the prompt without them, [(name, weight)]).

    Tags with an unreadable weight are left in the prompt."""
    found: list[tuple[str, float]] = []

    def take(m):
        try:
            found.append((m.group(1).strip(), float(m.group(2))))
        except ValueError:
            return m.group(0)
        return ""

    text = TAG_RE.sub(take, prompt or "")
    if found:
        text = re.sub(r"[ \t]+,", ",", re.sub(r"[ \t]{2,}", " ", text))
        text = re.sub(r"^[ \t]*,[ \t]*|[ \t]*,?[ \t]*$", "", text, flags=re.M).strip()
    return text, found


def parse_selection(spec) -> list[tuple[str, object]]:
    """The API's ``loras`` text (``name:0.8, other`` or ``<lora:name:0.8>``; weight 1 when left
    out) or a list of pairs/dicts → [(name, weight)]. Weights that are not numbers are passed on
    as they are, for the engine to refuse."""
    if spec is None or spec == "":
        return []
    if isinstance(spec, (list, tuple)):
        out = []
        for item in spec:
            if isinstance(item, dict):
                out.append((item.get("name"), item.get("weight", 1.0)))
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                out.append((item[0], item[1]))
            else:
                out.append((item, 1.0))
        return out
    text = str(spec)
    _, tagged = split_tags(text)
    if tagged:
        return list(tagged)
    out = []
    for part in re.split(r"[,\n]", text):
        part = part.strip()
        if not part:
            continue
        name, sep, weight = part.rpartition(":")
        if not sep:
            name, weight = part, "1"
        try:
            w: object = float(weight)
        except ValueError:
            w = weight.strip()
        out.append((name.strip(), w))
    return out


def selection_from_fields(fields: dict) -> tuple[str, list[tuple[str, float]]]:
    """"Reuse parameters": (prompt, [(name, weight)]) from studio fields — the JSON metadata's
    ``loras`` when present, else the ``<lora:name:weight>`` tags of an infotext prompt (ours or
    A1111's), which are taken out of the prompt."""
    prompt = str(fields.get("prompt") or "")
    loras = fields.get("loras")
    if isinstance(loras, list) and loras:
        out = []
        for d in loras:
            if isinstance(d, dict) and isinstance(d.get("name"), str):
                try:
                    out.append((os.path.splitext(d["name"])[0] if d["name"].endswith(".safetensors")
                                else d["name"], float(d.get("weight", 1.0))))
                except (TypeError, ValueError):
                    continue
        return prompt, out
    return split_tags(prompt)
