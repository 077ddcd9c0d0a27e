"""Where weights come from: a variant name, a Hub id, a local diffusers folder or a single file.

:func:`parse_source` decides what a string names and refuses what cannot be loaded safely
(pickled checkpoints); :func:`download` fetches the diffusers layout of a Hub repo (and nothing
else: no pickles, no duplicate single-file weights) with errors that say what to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from studio.catalog import VARIANTS
from studio.errors import ModelError

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# What a diffusers SD3 repo holds that we need; everything else (single-file releases,
# pickles, sample images) is not downloaded.
HUB_ALLOW = [
    "model_index.json",
    "scheduler/*",
    "tokenizer/*",
    "tokenizer_2/*",
    "tokenizer_3/*",
    "text_encoder/*",
    "text_encoder_2/*",
    "text_encoder_3/*",
    "transformer/*",
    "vae/*",
]
HUB_IGNORE = ["*.bin", "*.ckpt", "*.pt", "*.pth", "*.msgpack", "*.onnx*", "*.h5"]
ProgressFn = Callable[[str, float | None], None]  # (message, fraction 0..1 or None)


@dataclass(frozen=True)
class ModelSource:
    """What ``--model`` names: a Hub repo, a diffusers folder or a single file (its string is ``ref``)."""
    kind: str  # "hub" | "folder" | "file"
    ref: str  # repo id, or an absolute path

    def __str__(self) -> str:
        return self.ref


def parse_source(spec: str) -> ModelSource:
    """Decide what kind of source ``spec`` names, refusing what cannot be loaded safely."""
    spec = (spec or "").strip()
    if not spec:
        raise ModelError("No model given. Pass a Hub id, a diffusers folder or a .safetensors file.")
    if spec in VARIANTS:
        return ModelSource("hub", VARIANTS[spec].repo_id)
    path = Path(spec).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelError(
            f"{path.name} is a pickled checkpoint ({path.suffix}); the studio does not load those "
            "because unpickling can run arbitrary code. Use a .safetensors file or a diffusers "
            "folder instead."
        )
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(
                f"{path} is a folder but not a diffusers pipeline (no model_index.json). Point "
                "--model at the folder that holds model_index.json, or at a .safetensors file."
            )
        return ModelSource("folder", str(path.resolve()))
    if path.suffix.lower() in (".safetensors", ".gguf"):  # .gguf: a quantized transformer (models.gguf)
        if not path.is_file():
            raise ModelError(f"No such file: {path}. Check the path to the .safetensors file.")
        return ModelSource("file", str(path.resolve()))
    if path.is_file():
        raise ModelError(
            f"{path.name}: unsupported model file. The studio loads .safetensors files and "
            "diffusers folders."
        )
    if not spec.startswith((".", "/", "~")) and HUB_ID.match(spec):
        return ModelSource("hub", spec)
    raise ModelError(
        f"No such folder or file: {spec}. Give a diffusers folder (with model_index.json), a "
        ".safetensors file, a Hub id such as stabilityai/stable-diffusion-3.5-medium, or a "
        f"variant name ({', '.join(VARIANTS)})."
    )



def short_error(e: Exception) -> str:
    """An exception's first line for a message (at most 300 characters; its class name when it has none)."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


# --- the Hub ----------------------------------------------------------------------------------


def missing_weights_message(repo_id: str) -> str:
    """What to do when a gated repo's weights are not on this machine and cannot be downloaded."""
    return (
        f"The weights of {repo_id} are not on this machine. To get them: accept the licence at "
        f"https://huggingface.co/{repo_id} (the repo is gated), log in with `hf auth login` or "
        "set HF_TOKEN, then load the model again with network access. Or point --model at a local "
        "diffusers folder or .safetensors file — or try the offline demo with --demo."
    )


def download(repo_id: str, progress: ProgressFn | None = None) -> Path:
    """Download the diffusers layout of a Hub repo (or find it in the cache); errors teach."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    if progress:
        progress(f"Fetching {repo_id}", 0.0)
    tqdm_class = None
    if progress:
        from tqdm.auto import tqdm as _tqdm

        class _Reporter(_tqdm):  # huggingface_hub's download bars, forwarded to the caller
            def update(self, n=1):
                out = super().update(n)
                self._studio_done = getattr(self, "_studio_done", 0) + (n or 0)  # counted even when disabled
                if self.total:
                    done = self._studio_done
                    progress(f"Downloading {repo_id}: {done / 2**30:.2f} of {self.total / 2**30:.2f} GB",
                             min(done / self.total, 1.0) * 0.5)
                return out

        tqdm_class = _Reporter
    try:
        path = snapshot_download(repo_id, allow_patterns=HUB_ALLOW, ignore_patterns=HUB_IGNORE,
                                 tqdm_class=tqdm_class)
    except GatedRepoError as e:
        raise ModelError(
            f"{repo_id} is gated: accept its licence at https://huggingface.co/{repo_id} while "
            "logged in, then log in here (`hf auth login`, HF_TOKEN, or the token field in "
            "Models & Memory) and try again."
        ) from e
    except RepositoryNotFoundError as e:
        raise ModelError(
            f"No repo {repo_id} on the Hugging Face Hub (or it is private and you are not logged "
            "in). Check the id, e.g. stabilityai/stable-diffusion-3.5-medium."
        ) from e
    except LocalEntryNotFoundError as e:
        raise ModelError(missing_weights_message(repo_id) + " (The Hub could not be reached.)") from e
    except HfHubHTTPError as e:
        raise ModelError(f"Downloading {repo_id} failed: {short_error(e)}. Try again later.") from e
    except OSError as e:
        raise ModelError(f"Downloading {repo_id} failed: {short_error(e)}.") from e
    if progress:
        progress(f"{repo_id} is on disk", 0.5)
    return Path(path)


