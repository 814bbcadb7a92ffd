"""The lowest layer of reading files: what an input image is, and opening a file without ever blocking.

:mod:`datus.core.io` (which also reads through tar shards) and :mod:`datus.core.tars` both build on it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
"""File suffixes read as input images (compared in lower case)."""


RUN_MARKER = "run.json"
"""Marks a datus run folder (``datus.runfolder.run.RUN_FILE``)."""
EXPORT_MARKER = "export.json"
"""Marks a datus export (``datus.outputs.export.EXPORT_FILE``)."""
OUTPUT_MARKERS = (RUN_MARKER, EXPORT_MARKER)
"""A folder holding one of these is datus's own output: never read as input."""


class UnreadableFile(ValueError):
    """An input file could not be decoded; the message names it and says why."""


class NotRegularFile(OSError):
    """A path that is not a regular file: a FIFO, device or socket would block or never end."""


def open_regular_file(path: Path) -> BinaryIO:
    """Open ``path`` for reading, refusing anything but a regular file without ever blocking.

    Every file datus reads (images, masks, shards, its own run files) goes through here: a path
    that became a FIFO would otherwise hang ``open()`` for ever, and a device never ends.
    """
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise NotRegularFile(f"{path} is not a regular file (a FIFO, device or socket); datus reads only regular files")
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise
