"""Models: where weights come from, how they are identified, placed, loaded, shared and swapped.

    sources.py     Hub ids, local folders, single files; pickles refused; downloads
    identity.py    content hashes of component files (the sharing key)
    placement.py   device, dtype, quantization and offload of each component
    manager.py     ModelManager: load, share, swap, the RAM cache, LoRA activation
    singlefile.py  official single-file checkpoints (+ text_encoders/)
    lora.py        the LoRA folder and file formats
"""

from studio.errors import ModelError
from studio.models.identity import HashCache
from studio.models.manager import LoadedModel, ModelManager, free_memory, lora_blocker
from studio.models.placement import Placement, default_placement, placement_from_preset
from studio.models.sources import HUB_ALLOW, ModelSource, download, parse_source

__all__ = ["HUB_ALLOW", "HashCache", "LoadedModel", "ModelError", "ModelManager", "ModelSource", "Placement",
           "default_placement", "download", "free_memory", "lora_blocker", "parse_source", "placement_from_preset"]
