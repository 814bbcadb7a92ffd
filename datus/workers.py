"""How many CPU processes datus may use, read from the machine (container limits included)."""

from __future__ import annotations

import math
import os


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, which container limits also set)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def louvain_workers_for(louvain_seconds: float, backbone_seconds: float, cores: int) -> int:
    """Worker processes that keep Louvain's CPU time per batch below the device's time per batch.

    Sized from a measurement of both on the first batch (rather than a fixed share of the
    cores), and never more than the cores left beside the main process.
    """
    needed = math.ceil(louvain_seconds / max(backbone_seconds, 1e-6))
    return max(1, min(needed, cores - 1))
