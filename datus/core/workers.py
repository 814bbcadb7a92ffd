"""How many CPU processes datus may use, read from the machine (container limits included)."""

from __future__ import annotations

import math
import os
import signal
import threading
import time


_command_process = False
"""Whether this process is the ``datus`` command (:func:`datus.commands.cli.start`), whose main module is safe to re-import."""


def mark_command_process() -> None:
    """Called by the ``datus`` command: spawned workers may be started without being asked for.

    A spawned worker imports the parent's main module again; the ``datus`` command's is safe, a
    user's script (the Python API) may not be, so there datus starts workers only when told to.
    """
    global _command_process
    _command_process = True


def spawns_by_default() -> bool:
    return _command_process


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


PARENT_CHECK_SECONDS = 0.5
"""How often a worker process (Louvain, painting) checks that the process that started it still runs."""


def exit_with_parent(parent: int) -> None:
    """Worker initializer: end this worker when its parent process is gone; leave Ctrl-C to the parent.

    A parent killed outright (SIGKILL, the OOM killer, a pre-empted job) cannot shut its pool
    down, and an idle worker would otherwise wait on its queue for ever. Ctrl-C reaches every
    process of the terminal's group: the parent stops its pools, and a worker that raised
    KeyboardInterrupt itself would only print a traceback.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, name="datus-parent-watch", daemon=True).start()
