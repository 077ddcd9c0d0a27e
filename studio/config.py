"""Settings and paths.

Everything the studio writes lives under one data directory (``--data-dir``; default: the
platform's user data dir, e.g. ``~/.local/share/sd35-studio`` on Linux):

    <data-dir>/images/     generated PNGs (served only as Gradio cache copies, never by path)
    <data-dir>/thumbs/     gallery thumbnails
    <data-dir>/gallery.sqlite
    <data-dir>/models/tiny/  the offline demo family (built on first use of --demo)
    <data-dir>/loras/      LoRA .safetensors files
    <data-dir>/masks/, inits/  inpaint masks and init images, stored by content (sha256)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

APP_NAME = "sd35-studio"


class ConfigError(ValueError):
    """Flags that contradict each other; the message says which and what to do."""
__version__ = "0.1.0"


def on_space() -> bool:
    """Running on a Hugging Face Space (``SPACE_ID`` is set on every Space)."""
    return bool(os.environ.get("SPACE_ID"))


def default_data_dir() -> Path:
    """``SD35_STUDIO_DATA_DIR`` when set, else the platform's user data dir for the studio."""
    env = os.environ.get("SD35_STUDIO_DATA_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir(APP_NAME, appauthor=False))


@dataclass
class StudioConfig:
    """What one studio runs with: its data dir, the model, variant and preset, demo / offline mode,
    the device and where to listen."""
    data_dir: Path = field(default_factory=default_data_dir)
    model: str | None = None  # Hub id, local diffusers folder or .safetensors file
    variant: str | None = None  # catalog variant name; inferred from the model when None
    preset: str | None = None  # memory preset; None = auto
    demo: bool = False  # use the offline demo models
    # which demo: "trained" (the shapes model shipped in assets/demo, when it is there; the random
    # family otherwise, and said) or "random" (the tiny random family: the four architectures)
    demo_weights: str = "random"
    offline: bool = False  # never touch the network (sets HF_HUB_OFFLINE)
    device: str | None = None  # cuda | mps | cpu; None = detect
    single_file_config_dir: Path | None = None  # diffusers folder with configs/tokenizers for .safetensors files
    compile: bool = False  # torch.compile the transformer's blocks on load (--compile; studio.engine.compile)
    host: str = "127.0.0.1"
    port: int = 7860

    def __post_init__(self):
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        if self.demo and self.model:
            raise ConfigError(
                f"--demo runs the offline demo models, so --model {self.model} would be ignored. Drop "
                "--demo to load that model, or drop --model to try the demo.")

    @property
    def images_dir(self) -> Path:
        """Where generated PNGs go."""
        return self.data_dir / "images"

    @property
    def tiny_dir(self) -> Path:
        """Where the tiny random family is built."""
        return self.data_dir / "models" / "tiny"

    @property
    def demo_dir(self) -> Path:
        """Where the trained demo family (from assets/demo) is written."""
        return self.data_dir / "models" / "demo"

    @property
    def loras_dir(self) -> Path:
        """Where LoRA .safetensors files live."""
        return self.data_dir / "loras"

    @property
    def upscalers_dir(self) -> Path:
        """Where upscaler models live."""
        return self.data_dir / "upscalers"  # upscaler models (studio.models.upscalers)

    def ensure_dirs(self) -> None:
        """Create the data dir and the images folder if they are missing."""
        for d in (self.data_dir, self.images_dir):
            d.mkdir(parents=True, exist_ok=True)
