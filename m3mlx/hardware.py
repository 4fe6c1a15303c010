"""Named Macs: memory, memory bandwidth and SSD read speed, with where each figure comes from;
and the memory of the machine m3mlx runs on. The planner (`m3mlx plan`) predicts decode speed
from these.

Bandwidths are Apple's peak figures (as collected in the project's hardware notes); SSD speeds
are measured sequential reads of the internal drive of the configuration named (larger drives
read faster: Apple's SSDs spread over more NAND chips).
"""

import os
from dataclasses import dataclass
from typing import Optional, Tuple

from .units import GiB


@dataclass(frozen=True)
class Mac:
    name: str
    memory: int  # bytes of unified memory
    bandwidth: float  # peak memory bandwidth, bytes/s
    ssd_read: float  # sequential read of the internal SSD, bytes/s
    sources: Tuple[str, ...]


GB = 1e9  # bandwidths and disk speeds are decimal, as vendors and reviewers quote them

MACS = (
    Mac("MacBook Pro M5 Max, 128 GB", 128 * GiB, 614 * GB, 13.6 * GB, (
        "bandwidth: https://news.while1.co.il/article/33565624",
        "SSD: The Verge's 16-inch M5 Max (4 TB) sustained 13.6 GB/s reads, via "
        "https://briefly.co/anchor/Gadgets/story/apples-new-m5-max-feels-like-a-huge-upgrade-if-"
        "you-bought-your-laptop-3-years-ago")),
    Mac("MacBook Pro M4 Max, 128 GB", 128 * GiB, 546 * GB, 7.3 * GB, (
        "bandwidth: Apple's spec page, quoted in https://github.com/youssofal/MTPLX/issues/64",
        "SSD: The Verge measured the M5 Max reading 86% faster than the M4 Max, i.e. "
        "13.6 / 1.86 = 7.3 GB/s (same page as above); https://bytebuys.com/performance-"
        "analysis-of-macbook-pro-16-m4-maxs-ssd-speed-and-reliability: over 7,000 MB/s")),
    Mac("Mac Studio M3 Ultra, 96 GB", 96 * GiB, 819 * GB, 7.3 * GB, (
        "bandwidth: https://techpowerup.com/news-tags/Mac%20Studio",
        "SSD: no measurement in the stored sources; assumed equal to the M4 Max's")),
    Mac("Mac mini M4 Pro, 64 GB", 64 * GiB, 273 * GB, 5.0 * GB, (
        "bandwidth: https://peerip.com/best-apple-silicon-hardware-for-mlx-local-llm-inference/",
        "SSD: Apple quotes over 5 GB/s for the 1 TB drive and up, via "
        "https://applech2.com/archives/20241110-mac-mini-2024-ssd-speed.html (the 256 GB drive"
        " reads 2.8 GB/s)")),
)

# What a decode step reaches of those peaks, for predictions: MLX's MoE decode runs at about
# 35% of peak bandwidth and llama.cpp's at about 55% (the project's landscape notes); reads of
# whole experts (megabytes each, several in parallel) come close to the sequential speed.
MEMORY_EFFICIENCY = 0.5
SSD_EFFICIENCY = 0.8
# One GPU->CPU synchronisation on Apple silicon (command buffer commit and wait); assumed, not
# measured here: no Mac runs these tests.
SYNC_SECONDS = 150e-6


# Of a Mac's unified memory, the share Metal keeps for the GPU without paging by default
# (recommendedMaxWorkingSetSize, about 3/4 on Macs with 64 GB and more; `machine_memory` reads
# the real figure on the machine itself): the budget the planner gives a named Mac.
WORKING_SET_SHARE = 0.75


def usable_memory(mac: Mac) -> int:
    return int(mac.memory * WORKING_SET_SHARE)


def find(name: str) -> Optional[Mac]:
    return next((m for m in MACS if m.name == name), None)


def physical_memory() -> int:
    """Bytes of memory this machine has."""
    import mlx.core as mx

    if mx.metal.is_available():
        return int(mx.device_info()["memory_size"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def machine_memory() -> int:
    """Bytes this process may plan to use: on a Mac, the GPU's recommended working set (what
    Metal keeps wired without paging); elsewhere the physical memory."""
    import mlx.core as mx

    if mx.metal.is_available():
        info = mx.device_info()
        return int(info.get("max_recommended_working_set_size") or info["memory_size"])
    return physical_memory()
