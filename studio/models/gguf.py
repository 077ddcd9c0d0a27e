"""GGUF transformers: city96's quantized SD3 / SD3.5 files (``sd3.5_large-Q4_K_S.gguf`` …).

What such a file is (city96's ComfyUI-GGUF ``tools/convert.py``): one MMDiT in the reference
(SAI) key layout without the ``model.diffusion_model.`` prefix (``joint_blocks.0.x_block.attn.qkv.weight``),
``general.architecture = "sd3"``, the matrices in a GGML quantization type (Q8_0, Q5_K_M,
Q4_K_S, …) and the small tensors (biases, norms, the patch embedding) in F32/F16. No VAE and no
text encoders: those come from beside the file and from the config folder, as for the official
single files (``studio.models.singlefile``, which calls this module for ``.gguf`` paths).

Loading is diffusers' own: ``SD3Transformer2DModel.from_single_file(path,
quantization_config=GGUFQuantizationConfig(compute_dtype=…), config=<local folder>,
subfolder="transformer")`` — the quantized tensors stay quantized in memory and each Linear
dequantizes its weight when it runs; the F32/F16 tensors are cast to the compute dtype.

Bytes are read from the header (:func:`gguf_tensor_bytes`), never guessed: the loaded transformer
takes ``quantized_bytes + unquantized_params × dtype size``.
"""

from __future__ import annotations

import os
from pathlib import Path

from studio.errors import ModelError
from studio.models.sources import short_error

ARCH = "sd3"
UNQUANTIZED = ("F32", "F16", "BF16", "F64")  # GGML types stored as plain floats (torch tensors once loaded)


def _reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError as e:  # requirements.txt has it; a trimmed install may not
        raise ModelError("Reading .gguf files needs the gguf package: `pip install gguf` (see requirements.txt).") from e
    try:
        return GGUFReader(str(path), "r")
    except Exception as e:  # noqa: BLE001 — truncated, not GGUF, wrong version: all the same to the user
        raise ModelError(
            f"{path.name} is not a readable GGUF file ({short_error(e)}). If it was downloaded, download it "
            "again (an interrupted download leaves a short file)."
        ) from e


def _field(reader, name: str):
    f = reader.fields.get(name)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:  # noqa: BLE001 — an odd field is just absent
        return None


def gguf_header(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """{tensor name: (GGML type name, torch-order shape, start, end)} of a GGUF file; checks that
    it is city96's SD3 layout (architecture "sd3", reference key names)."""
    path = Path(path)
    reader = _reader(path)
    arch = _field(reader, "general.architecture")
    names = [t.name for t in reader.tensors]
    if arch != ARCH:
        raise ModelError(
            f"{path.name} is a GGUF file for {arch or 'an unknown architecture'!r}, not SD3 "
            "(general.architecture must be \"sd3\"): load an SD3 / SD3.5 GGUF such as city96's "
            "stable-diffusion-3.5-large-gguf."
        )
    if any(n.startswith("transformer_blocks.") for n in names) and not any("joint_blocks." in n for n in names):
        raise ModelError(
            f"{path.name} holds an SD3 transformer in the diffusers key layout; GGUF files are read in "
            "the reference layout (joint_blocks.*), as city96's convert.py writes them."
        )
    size = path.stat().st_size
    out = {}
    for t in reader.tensors:
        start = int(t.data_offset)
        end = start + int(t.n_bytes)
        if end > size:
            raise ModelError(f"{path.name} is truncated: tensor {t.name} ends at byte {end:,}, the file has {size:,}.")
        out[t.name] = (t.tensor_type.name, tuple(int(d) for d in reversed(list(t.shape))), start, end)
    return out


def gguf_tensor_bytes(path: str | os.PathLike) -> dict:
    """What a GGUF transformer weighs, from its header (the tensor types, never guessed).

    Returns ``{"file_bytes", "total_bytes" (all tensor data), "params", "quantized_bytes",
    "unquantized_params", "by_type": {type: {"count", "params", "bytes"}}, "file_type"}``. Once
    loaded, quantized matrices keep their bytes (``quantized_bytes``); F32/F16 tensors, and the
    few quantized tensors that are not matrices (dequantized on load, see
    :func:`load_transformer`), are cast to the compute dtype (``unquantized_params``): the
    transformer takes ``quantized_bytes + unquantized_params × dtype size``.
    """
    path = Path(path)
    reader = _reader(path)
    by_type: dict[str, dict[str, int]] = {}
    total = params = qbytes = uparams = 0
    for t in reader.tensors:
        name, n, b = t.tensor_type.name, int(t.n_elements), int(t.n_bytes)
        entry = by_type.setdefault(name, {"count": 0, "params": 0, "bytes": 0})
        entry["count"] += 1
        entry["params"] += n
        entry["bytes"] += b
        total += b
        params += n
        if name in UNQUANTIZED or len(t.shape) != 2:
            uparams += n
        else:
            qbytes += b
    return {
        "file_bytes": path.stat().st_size,
        "total_bytes": total,
        "params": params,
        "quantized_bytes": qbytes,
        "unquantized_params": uparams,
        "by_type": by_type,
        "file_type": _field(reader, "general.file_type"),
    }


def check_types(path: Path, header: dict) -> None:
    """Refuse quantization types diffusers cannot dequantize (named, with what it can)."""
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    supported = {t.name for t in SUPPORTED_GGUF_QUANT_TYPES} | set(UNQUANTIZED)
    bad = sorted({ttype for ttype, *_ in header.values() if ttype not in supported})
    if bad:
        raise ModelError(
            f"{path.name} uses GGUF quantization types diffusers cannot read ({', '.join(bad)}); it reads "
            f"{', '.join(sorted(supported))}. Pick another quantization of the model."
        )


def load_transformer(path: Path, base: Path, dtype, header: dict | None = None):
    """The SD3Transformer2DModel of a GGUF file, config from ``base`` (offline), computing in ``dtype``.

    diffusers keeps a quantized tensor quantized only where a Linear layer dequantizes it; a
    quantized tensor of any other shape (city96's converter quantizes the 3-D ``pos_embed``, and
    can the patch-embedding conv) would reach the model as raw bytes. Those few are dequantized
    here, before diffusers sees them."""
    from diffusers import GGUFQuantizationConfig, SD3Transformer2DModel
    from diffusers.models.model_loading_utils import load_gguf_checkpoint
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    header = header if header is not None else gguf_header(path)
    check_types(path, header)
    try:
        sd = load_gguf_checkpoint(str(path))
    except Exception as e:
        raise ModelError(f"Could not read the tensors of {path.name}: {short_error(e)}") from e
    for name, (ttype, shape, *_) in header.items():
        if ttype not in UNQUANTIZED and len(shape) != 2 and name in sd:
            sd[name] = dequantize_gguf_tensor(sd[name]).float()
    try:
        return SD3Transformer2DModel.from_single_file(
            sd,
            quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
            config=str(base),
            subfolder="transformer",
            torch_dtype=dtype,
            local_files_only=True,
        )
    except KeyError as e:
        raise ModelError(
            f"{path.name} lacks the tensor {e.args[0]!r}: the file is incomplete or not an SD3 GGUF."
        ) from e
    except Exception as e:
        raise ModelError(
            f"Could not build the transformer from {path.name} with the config in {base / 'transformer'}: "
            f"{short_error(e)}"
        ) from e
