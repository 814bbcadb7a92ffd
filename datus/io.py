"""Atomic file output: every file datus writes appears whole or not at all.

A run can be killed at any moment; readers (and a resumed run) must never see a
half-written PNG, JSON or shard. Each writer here writes to a temporary name in the
destination folder and renames it into place (``os.replace`` is atomic on POSIX).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


CLASSES_FILE = "classes.json"
"""Class names and ids, beside a prepared dataset and in every run folder (runs are datasets too)."""

MANIFEST_FILE = "manifest.jsonl"
"""(image, mask) pairs of a finished run: what makes its folder a training dataset."""

FILE_MODE = 0o666 & ~_current_umask()
"""Permissions of every output file: as an ordinary ``open()`` would give (mkstemp gives 0600).

Read once at import: ``os.umask`` can only be queried by setting it, which is not thread-safe.
"""


@contextmanager
def atomic_path(destination: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``destination``; rename it into place on success.

    The temporary name keeps the destination's suffix, so libraries that pick a format from
    the extension (PIL, numpy) behave as they would with the final name.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        dir=destination.parent, prefix=f".{destination.stem}.", suffix=f".tmp{destination.suffix}"
    )
    os.close(handle)
    os.chmod(temporary, FILE_MODE)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        os.replace(temporary_path, destination)
    finally:
        temporary_path.unlink(missing_ok=True)


TEMPORARY_PATTERN = ".*.tmp*"
"""Glob of the temporary files :func:`atomic_path` creates (left behind only by a killed run)."""


def remove_stale_temporaries(folder: Path) -> int:
    """Delete temporaries that a killed run left below ``folder``; returns how many.

    Only call this when no other process writes into ``folder``.
    """
    stale = [path for path in Path(folder).rglob(TEMPORARY_PATTERN) if path.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def _write_with(destination: Path, write: Callable[[IO[bytes]], None]) -> None:
    with atomic_path(destination) as temporary, open(temporary, "wb") as stream:
        write(stream)
        stream.flush()
        os.fsync(stream.fileno())


def write_json(destination: Path, payload: Any) -> None:
    """Write ``payload`` as indented UTF-8 JSON, atomically."""
    text = json.dumps(payload, indent=2, ensure_ascii=False) + "\n"
    _write_with(destination, lambda stream: stream.write(text.encode("utf-8")))


def write_text(destination: Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    _write_with(destination, lambda stream: stream.write(text.encode("utf-8")))


def write_png(destination: Path, array: np.ndarray, compress_level: int = 6) -> None:
    """Write a uint8/uint16 label map (H x W) or an RGB image (H x W x 3) as PNG, atomically.

    ``compress_level`` 1 suits photographic pictures (overlays): 3x faster to encode than the
    default 6 for files about 20% larger; label maps compress well at the default.
    """
    image = Image.fromarray(np.ascontiguousarray(array))  # uint16 becomes a 16-bit greyscale PNG
    _write_with(destination, lambda stream: image.save(stream, format="PNG", compress_level=compress_level))


def write_npz(destination: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays to an uncompressed ``.npz``, atomically (no pickled objects inside)."""
    _write_with(destination, lambda stream: np.savez(stream, **arrays))


def read_label_png(path: Path) -> np.ndarray:
    """Read a single-channel label PNG (8 or 16 bit) as an integer array, values untouched."""
    with Image.open(path) as image:
        if image.mode not in ("L", "P", "I;16", "I", "1"):
            raise ValueError(
                f"{path}: expected a single-channel label PNG (mode L, P or I;16), got mode "
                f"{image.mode!r}. Convert RGB-coded masks first, e.g. with `datus prepare`."
            )
        return np.asarray(image).astype(np.int64)
