"""What the machine has: CUDA GPUs, Apple MPS, RAM — and the device the studio will use.

``detect_hardware()`` reads the real inventory; its keyword overrides (the CLI's ``--vram``,
``--ram``, ``--gpus`` and ``--device``) *simulate* one instead, so that the memory planner can
answer "what would run on an 8 GB card?" from any machine. ``--vram 8`` on a machine without a
GPU means "plan as if there were one 8 GB CUDA GPU".

Sizes: a "GB" in this project is 2**30 bytes (a GiB), the unit nvidia-smi and the boxes of
graphics cards use — an "8 GB card" reports 8192 MiB.

Nothing here imports torch at module import time, and ``detect_hardware()`` only touches CUDA
when it is called (on ZeroGPU Spaces, ``import spaces`` must come before CUDA is initialised).
``memory_snapshot()`` is for the live readout: it never initialises CUDA and never synchronises.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace

GB = 2**30

DEVICES = ("cuda", "mps", "cpu")


@dataclass(frozen=True)
class Gpu:
    """One CUDA GPU: its index, name, total and free memory, and compute capability."""
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    # (major, minor) as torch.cuda.get_device_capability reports it; None when unknown (a
    # simulated GPU without --compute-capability). fp8 compute needs (8, 9): Ada, Hopper, newer.
    compute_capability: tuple[int, int] | None = None


@dataclass(frozen=True)
class Hardware:
    """The machine the planner plans for, detected or simulated: GPUs, MPS, RAM and the device used."""
    gpus: list[Gpu] = field(default_factory=list)
    mps: bool = False
    ram_total_bytes: int = 0
    ram_available_bytes: int = 0
    device: str = "cpu"  # the device the studio will use: "cuda" | "mps" | "cpu"
    overridden: bool = False
    # Which parts are simulated rather than detected: any of "gpus", "ram", "mps", "device".
    simulated: tuple[str, ...] = ()
    # Apple silicon shares RAM with the GPU: the most Metal lets the process allocate
    # (torch.mps.recommended_max_memory), 0 when there is no MPS.
    mps_budget_bytes: int = 0

    @property
    def gpu_count(self) -> int:
        """How many CUDA GPUs there are."""
        return len(self.gpus)

    @property
    def vram_bytes(self) -> int:
        """Total memory of the smallest CUDA GPU (0 without one): what one component can use."""
        return min((g.total_bytes for g in self.gpus), default=0)

    def describe(self) -> str:
        """One human line per device, then the device the studio will use."""
        def tag(part: str) -> str:
            return " (simulated)" if part in self.simulated else ""

        lines = []
        for g in self.gpus:
            cc = f", compute {g.compute_capability[0]}.{g.compute_capability[1]}" if g.compute_capability else ""
            lines.append(
                f"cuda:{g.index}  {g.name} — {_gb(g.total_bytes)} total, {_gb(g.free_bytes)} free{cc}{tag('gpus')}"
            )
        if self.mps:
            lines.append(
                f"mps     Apple GPU — unified memory, Metal budget {_gb(self.mps_budget_bytes)}{tag('mps')}"
            )
        lines.append(
            f"cpu     RAM — {_gb(self.ram_total_bytes)} total, "
            f"{_gb(self.ram_available_bytes)} available{tag('ram')}"
        )
        lines.append(f"→ the studio will use: {self.device}{tag('device')}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The inventory as plain dicts and lists (for JSON)."""
        d = asdict(self)
        d["gpus"] = [asdict(g) for g in self.gpus]
        return d


def _gb(n: int) -> str:
    return f"{n / GB:.1f} GB"


# --- RAM -------------------------------------------------------------------------------------


def _read_meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    """/proc/meminfo as bytes ({} where there is none, e.g. macOS and Windows)."""
    out: dict[str, int] = {}
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    scale = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
                    out[key.strip()] = int(parts[0]) * scale
    except OSError:
        pass
    return out


def ram_bytes() -> tuple[int, int]:
    """(total, available) system RAM in bytes; available falls back to total where unknown."""
    info = _read_meminfo()
    if "MemTotal" in info:
        total = info["MemTotal"]
        avail = info.get("MemAvailable", info.get("MemFree", total))
        return total, avail
    total = avail = 0
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = page * os.sysconf("SC_PHYS_PAGES")
        try:
            avail = page * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError):  # macOS has no SC_AVPHYS_PAGES
            avail = total
    except (ValueError, OSError, AttributeError):  # Windows: no sysconf
        pass
    return total, avail


# --- detection -------------------------------------------------------------------------------


def _real_gpus() -> list[Gpu]:
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        try:
            free, total = torch.cuda.mem_get_info(i)
            name = torch.cuda.get_device_name(i)
            cc = tuple(int(x) for x in torch.cuda.get_device_capability(i))
        except RuntimeError:  # a GPU that is busy in exclusive mode, or a broken driver
            continue
        gpus.append(Gpu(index=i, name=name, total_bytes=int(total), free_bytes=int(free),
                        compute_capability=cc))
    return gpus


def _real_mps() -> tuple[bool, int]:
    import torch

    backend = getattr(torch.backends, "mps", None)
    if backend is None or not backend.is_available():
        return False, 0
    try:
        budget = int(torch.mps.recommended_max_memory())
    except (AttributeError, RuntimeError):
        budget = 0
    return True, budget


_last_real: Hardware | None = None  # the last real inventory, for memory_snapshot()


def detect_hardware(
    vram_gb: float | None = None,
    ram_gb: float | None = None,
    gpus: int | None = None,
    device: str | None = None,
    compute_capability: float | str | tuple[int, int] | None = None,
) -> Hardware:
    """The machine's inventory, or a simulated one where overrides are given.

    ``vram_gb``: every CUDA GPU has this much memory (all free); with no real GPU it creates
    ``gpus`` (default 1) simulated ones. ``gpus``: how many CUDA GPUs (0 = none); without
    ``vram_gb`` extra GPUs copy the first real one. ``ram_gb``: total = available RAM.
    ``device``: the device the studio uses ("cuda" | "mps" | "cpu"); by default CUDA, then MPS,
    then CPU. ``compute_capability`` (e.g. 8.9, "8.9" or (8, 9)): what the CUDA GPUs report
    (simulated GPUs copy a real GPU's, else have none). Raises ``ValueError`` with the flag to add
    when an override cannot be honoured.
    """
    global _last_real
    if device is not None and device not in DEVICES:
        raise ValueError(f"Unknown device {device!r}: choose one of {', '.join(DEVICES)}.")
    if vram_gb is not None and vram_gb <= 0:
        raise ValueError("--vram must be a positive number of GB (use --gpus 0 for no GPU).")
    if ram_gb is not None and ram_gb <= 0:
        raise ValueError("--ram must be a positive number of GB.")
    if gpus is not None and gpus < 0:
        raise ValueError("--gpus must be 0 or more.")
    cc_override = _parse_capability(compute_capability)

    real_gpus = _real_gpus()
    mps, mps_budget = _real_mps()
    total, avail = ram_bytes()
    overridden = any(v is not None for v in (vram_gb, ram_gb, gpus, device, compute_capability))
    simulated = tuple(part for part, given in (
        ("gpus", vram_gb is not None or gpus is not None or compute_capability is not None),
        ("ram", ram_gb is not None), ("mps", device == "mps" and (vram_gb is not None or not mps)),
        ("device", device is not None)) if given)
    if not overridden:
        _last_real = None  # set below

    inventory = list(real_gpus)
    if device == "mps":
        # Apple silicon: --vram is the Metal budget; simulated MPS gets about 3/4 of the RAM.
        if ram_gb is not None:
            total = avail = int(ram_gb * GB)
        if vram_gb is not None:
            mps_budget = int(vram_gb * GB)
        elif not mps:
            mps_budget = int(total * 0.75)
        mps = True
        inventory = []
    elif vram_gb is not None:
        size = int(vram_gb * GB)
        count = gpus if gpus is not None else (len(real_gpus) or 1)
        inventory = [
            Gpu(
                index=i,
                name=(real_gpus[i].name if i < len(real_gpus) else "simulated CUDA GPU"),
                total_bytes=size,
                free_bytes=size,
                compute_capability=real_gpus[i].compute_capability if i < len(real_gpus) else None,
            )
            for i in range(count)
        ]
    elif gpus is not None:
        if gpus > 0 and not real_gpus:
            raise ValueError(
                f"--gpus {gpus} needs --vram GB on a machine without a CUDA GPU: "
                "say how much memory each simulated GPU has."
            )
        inventory = [
            Gpu(index=i, name=g.name, total_bytes=g.total_bytes, free_bytes=g.free_bytes,
                compute_capability=g.compute_capability)
            for i, g in enumerate(real_gpus[i % len(real_gpus)] for i in range(gpus))
        ]
    if cc_override is not None:
        inventory = [replace(g, compute_capability=cc_override) for g in inventory]
    if ram_gb is not None:
        total = avail = int(ram_gb * GB)

    if device == "cuda" and not inventory:
        raise ValueError(
            "--device cuda needs a CUDA GPU: on this machine add --vram GB to simulate one."
        )
    if device is None:
        device = "cuda" if inventory else ("mps" if mps else "cpu")

    hw = Hardware(
        gpus=inventory,
        mps=mps,
        ram_total_bytes=int(total),
        ram_available_bytes=int(avail),
        device=device,
        overridden=overridden,
        simulated=simulated,
        mps_budget_bytes=int(mps_budget) if mps else 0,
    )
    if not overridden:
        _last_real = hw
    return hw


def _parse_capability(value) -> tuple[int, int] | None:
    """8.9, "8.9", "8,9" or (8, 9) → (8, 9); None stays None. ValueError says the form."""
    if value is None:
        return None
    try:
        if isinstance(value, (tuple, list)):
            major, minor = (int(v) for v in value)
        else:
            text = str(value).strip().replace(",", ".")
            major_text, _, minor_text = text.partition(".")
            major, minor = int(major_text), int(minor_text or 0)
    except (TypeError, ValueError):
        raise ValueError(f"--compute-capability {value!r}: give MAJOR.MINOR, e.g. 8.9 (RTX 40xx), "
                         "9.0 (H100) or 8.6 (RTX 30xx).") from None
    if not (1 <= major <= 20 and 0 <= minor <= 9):
        raise ValueError(f"--compute-capability {value!r} is out of range: e.g. 8.9, 9.0 or 8.6.")
    return major, minor


# --- live readout ----------------------------------------------------------------------------


def memory_snapshot() -> dict:
    """Current memory use, cheap enough for a 2-second timer during a generation.

    ``{"gpus": [{"index", "name", "used_bytes", "total_bytes", "allocated_bytes",
    "reserved_bytes"}], "mps": {...} | None, "ram": {"used_bytes", "total_bytes"},
    "process_rss_bytes": int | None}``.

    ``used_bytes`` on a GPU is the driver's view (all processes, cudaMemGetInfo — no stream
    synchronisation); ``allocated``/``reserved`` are this process's PyTorch caching-allocator
    counters (host-side bookkeeping). CUDA is never initialised here: before the first model is
    loaded the GPUs are listed from the last ``detect_hardware()`` with nothing in use.
    """
    import sys

    gpus: list[dict] = []
    torch = sys.modules.get("torch")  # a readout does not import torch on its own
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            try:
                free, total = torch.cuda.mem_get_info(i)
            except RuntimeError:
                continue
            gpus.append(
                {
                    "index": i,
                    "name": torch.cuda.get_device_name(i),
                    "used_bytes": int(total - free),
                    "total_bytes": int(total),
                    "allocated_bytes": int(torch.cuda.memory_allocated(i)),
                    "reserved_bytes": int(torch.cuda.memory_reserved(i)),
                }
            )
    elif _last_real is not None:
        for g in _last_real.gpus:
            gpus.append(
                {
                    "index": g.index,
                    "name": g.name,
                    "used_bytes": int(g.total_bytes - g.free_bytes),
                    "total_bytes": int(g.total_bytes),
                    "allocated_bytes": 0,
                    "reserved_bytes": 0,
                }
            )

    mps = None
    if torch is not None and _last_real is not None and _last_real.mps:
        try:
            mps = {
                "allocated_bytes": int(torch.mps.current_allocated_memory()),
                "driver_bytes": int(torch.mps.driver_allocated_memory()),
                "budget_bytes": int(_last_real.mps_budget_bytes),
            }
        except (AttributeError, RuntimeError):
            mps = None

    total, avail = ram_bytes()
    return {
        "gpus": gpus,
        "mps": mps,
        "ram": {"used_bytes": int(total - avail), "total_bytes": int(total)},
        "process_rss_bytes": process_rss(),
    }


def process_rss() -> int | None:
    """This process's resident memory now, in bytes (Linux /proc; None where there is none)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def format_snapshot(snap: dict) -> str:
    """A one-line readout, e.g. ``cuda:0 6.1/8.0 GB · RAM 12.3/31.3 GB``."""
    parts = [
        f"cuda:{g['index']} {g['used_bytes'] / GB:.1f}/{g['total_bytes'] / GB:.1f} GB"
        for g in snap.get("gpus", [])
    ]
    if snap.get("mps"):
        m = snap["mps"]
        parts.append(f"mps {m['driver_bytes'] / GB:.1f}/{m['budget_bytes'] / GB:.1f} GB")
    ram = snap["ram"]
    parts.append(f"RAM {ram['used_bytes'] / GB:.1f}/{ram['total_bytes'] / GB:.1f} GB")
    return " · ".join(parts)
