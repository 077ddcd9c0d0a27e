"""AUTOMATIC1111's own infotext and hash logic, re-implemented from its source for the tests.

Independent of the studio's reader (``studio.metadata.infotext``): what A1111, Forge and the
tools that copy them (Civitai's uploader) run on our PNGs. From stable-diffusion-webui v1.10:

* ``modules/infotext_utils.py``: ``re_param``, ``re_imagesize``, ``unquote`` and
  ``parse_generation_parameters`` — the regex logic. Left out: the UI defaults it fills in for
  keys that are absent ("Clip skip": "1", "RNG": "GPU", …), style extraction and
  ``skip_fields`` (settings), none of which reads anything from the text;
* ``extensions-builtin/Lora/scripts/lora_script.py``: ``infotext_pasted``'s reading of
  ``Lora hashes``;
* ``modules/hashes.py``: ``calculate_sha256`` (the model hash is its first 10 digits,
  ``shorthash``) and ``addnet_hash_safetensors`` (LoRAs: first 12 digits).
"""

from __future__ import annotations

import hashlib
import json
import re

re_param_code = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'
re_param = re.compile(re_param_code)
re_imagesize = re.compile(r"^(\d+)x(\d+)$")


def unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(x: str) -> dict:
    """A1111's parser: prompt lines, ``Negative prompt:`` lines, and the last line's
    ``key: value`` pairs when it has at least 3; ``WxH`` values split into ``key-1``/``key-2``."""
    res = {}
    prompt = ""
    negative_prompt = ""
    done_with_prompt = False

    *lines, lastline = x.strip().split("\n")
    if len(re_param.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""

    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line

    for k, v in re_param.findall(lastline):
        try:
            if v[0] == '"' and v[-1] == '"':  # an empty value raises here: A1111 skips it
                v = unquote(v)
            m = re_imagesize.match(v)
            if m is not None:
                res[f"{k}-1"] = m.group(1)
                res[f"{k}-2"] = m.group(2)
            else:
                res[k] = v
        except Exception:
            pass

    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    return res


def lora_hashes(d: dict) -> dict:
    """The Lora extension's reading of ``Lora hashes``: {name: shorthash}."""
    hashes = d.get("Lora hashes")
    if not hashes:
        return {}
    hashes = [x.strip().split(":", 1) for x in hashes.split(",")]
    return {x[0].strip().replace(",", ""): x[1].strip() for x in hashes}


def calculate_sha256(filename) -> str:
    hash_sha256 = hashlib.sha256()
    blksize = 1024 * 1024
    with open(filename, "rb") as f:
        for chunk in iter(lambda: f.read(blksize), b""):
            hash_sha256.update(chunk)
    return hash_sha256.hexdigest()


def addnet_hash_safetensors(b) -> str:
    """kohya-ss hash for safetensors (A1111 modules/hashes.py)."""
    hash_sha256 = hashlib.sha256()
    blksize = 1024 * 1024
    b.seek(0)
    header = b.read(8)
    n = int.from_bytes(header, "little")
    offset = n + 8
    b.seek(offset)
    for chunk in iter(lambda: b.read(blksize), b""):
        hash_sha256.update(chunk)
    return hash_sha256.hexdigest()


def model_shorthash(filename) -> str:
    """What A1111 writes as ``Model hash`` for a checkpoint file."""
    return calculate_sha256(filename)[0:10]


def lora_shorthash(filename) -> str:
    """What A1111 writes for a LoRA in ``Lora hashes``."""
    with open(filename, "rb") as f:
        return addnet_hash_safetensors(f)[0:12]
