"""A results folder's ``manifest.jsonl`` and ``dataset.json``: written, read back (streamed), split.

The manifest has one JSON object per line, ``{"image_id", "image", "mask"}``, each path relative
to one root:

- ``image``: relative to the input root, ``image_root`` of ``dataset.json`` (absolute when an image
  lies outside it, which only a data module that cannot describe its root produces);
- ``mask``: relative to the results folder (``masks/<id>.png``).

``dataset.json`` records the input root once (absolute, as the run read it; a relative root is
taken relative to the results folder), so a run folder can be moved or shared with its data:
move both and edit one line. Manifests of older versions (absolute image paths, no
``dataset.json``) read the same way.

The train/val split (:class:`Split`) is decided per id by a seeded hash, so a streamed export and
:class:`datus.datamodules.pseudo.PseudoMaskDataModule` agree without holding every record: the
validation set is the ``round(N * val_fraction)`` ids with the smallest keys (at least one for a
positive fraction, never all). This module imports numpy and nothing heavier.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datus.core.errors import ConfigurationError
from datus.core.io import UnreadableFile, json_text, open_regular, read_json
from datus.runfolder.run import DATASET_FILE, IMAGE_FOLDERS, MANIFEST_FILE, MASKS, check_image_id

MANIFEST_FORMAT = 2
"""``dataset.json``'s ``manifest_format``: 2 = paths relative to ``image_root`` and the results folder."""


@dataclass(frozen=True)
class ManifestEntry:
    """One line of a manifest, its paths resolved: ``image`` and ``mask`` are usable paths."""

    image_id: str
    image: Path
    mask: Path
    image_path: str
    """The image as the line records it (relative to the input root)."""


def relative_image(path: str | Path, image_root: Path | None) -> str:
    """``path`` relative to ``image_root`` (lexically, else through the real path of its folder); absolute otherwise."""
    absolute = Path(os.path.abspath(path))
    if image_root is None:
        return str(absolute)
    for candidate in (absolute, Path(os.path.realpath(absolute.parent)) / absolute.name):
        if candidate.is_relative_to(image_root):
            return candidate.relative_to(image_root).as_posix()
    return str(absolute)


def manifest_line(image_id: str, image_path: str | Path, image_root: Path | None) -> str:
    mask = f"{MASKS}/{image_id}{IMAGE_FOLDERS[MASKS]}"
    return json_text({"image_id": image_id, "image": relative_image(image_path, image_root), "mask": mask}, indent=None)


def dataset_description(image_root: Path | None) -> dict[str, Any]:
    """The content of ``dataset.json``."""
    return {
        "manifest": MANIFEST_FILE,
        "manifest_format": MANIFEST_FORMAT,
        "image_root": str(image_root) if image_root is not None else None,
        "mask_root": ".",
        "note": "manifest.jsonl: 'image' is relative to image_root (edit it when the images move), 'mask' to this folder",
    }


def image_root_of(results_root: Path, override: Path | None = None) -> Path | None:
    """The input root of a results folder's manifest: ``override``, else ``dataset.json``'s, else None (older runs)."""
    if override is not None:
        return Path(override).expanduser().absolute()
    path = results_root / DATASET_FILE
    if not path.is_file():
        return None
    try:
        root = read_json(path).get("image_root")
    except (UnreadableFile, AttributeError) as error:
        raise ValueError(f"{path} is damaged ({error}); run `datus cluster --run ...` again to rewrite it") from None
    if root is None:
        return None
    if not isinstance(root, str) or not root:
        raise ValueError(f"{path}: image_root must be a path, got {root!r}")
    return Path(os.path.normpath((results_root / root).absolute())) if not Path(root).is_absolute() else Path(root)


def read_entry(line: bytes | str, results_root: Path, image_root: Path | None, source: Path) -> ManifestEntry:
    """One manifest line, checked: a safe id, a mask inside the results folder, an image path.

    Raises:
        ValueError: the line is not a manifest entry, or its paths are unsafe.
    """
    try:
        entry = json.loads(line)
        image_id, image, mask = entry["image_id"], entry["image"], entry["mask"]
        if not all(isinstance(value, str) for value in (image_id, image, mask)):
            raise TypeError("image_id, image and mask must be strings")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, RecursionError) as error:
        raise ValueError(f"{source}: expected {{'image_id', 'image', 'mask'}}, got {str(line)[:200]!r} ({error})") from None
    try:
        check_image_id(image_id, source)
    except ConfigurationError as error:  # reported as a damaged line here
        raise ValueError(str(error)) from None
    mask_path = results_root / mask
    if not mask_path.resolve().is_relative_to(results_root.resolve()):
        raise ValueError(
            f"{source}: the mask {mask!r} lies outside {results_root}; the manifest was edited or not written by datus: "
            "predict again into a new --output_dir"
        )
    image_path = Path(image)
    if not image_path.is_absolute():
        if image_root is None:
            raise ValueError(f"{source}: the image {image!r} is relative but {results_root / DATASET_FILE} names no image_root")
        image_path = image_root / image_path
    return ManifestEntry(image_id, image_path, mask_path, image)


def manifest_lines(results_root: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of the non-empty lines of ``results_root/manifest.jsonl``, streamed."""
    path = results_root / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {results_root} is not a finished datus run. Run `datus predict ... --output_dir "
            f"{results_root}` first (the manifest is written once the masks are painted)."
        )
    with open_regular(path) as stream:
        for number, line in enumerate(stream, start=1):
            if line.strip():
                yield number, line


def read_manifest_entries(results_root: Path, image_root: Path | None = None) -> Iterator[ManifestEntry]:
    """Every entry of a results folder's manifest, streamed (a damaged line raises ValueError naming it)."""
    results_root = Path(results_root)
    root = image_root_of(results_root, image_root)
    source = results_root / MANIFEST_FILE
    for number, line in manifest_lines(results_root):
        yield read_entry(line, results_root, root, f"{source}, line {number}")  # type: ignore[arg-type]


def split_key(seed: int, image_id: str) -> int:
    """A 64-bit key of (seed, id): the order in which ids are drawn for validation."""
    digest = hashlib.blake2b(f"{seed}\0{image_id}".encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def validation_count(count: int, val_fraction: float) -> int:
    """``round(count * val_fraction)``, at least 1 for a positive fraction, and never every image."""
    num_val = round(count * val_fraction)
    if val_fraction > 0 and count > 0:
        num_val = min(max(num_val, 1), count - 1)
    return max(num_val, 0)


@dataclass(frozen=True)
class Split:
    """The seeded train/val split of a set of ids: validation is the ``num_val`` smallest keys.

    Built from the ids in one pass that keeps 8 bytes per id (:meth:`of`), then asked per id.
    Two ids with one 64-bit key (about 1 in 10^10 for a million ids) fall on the same side.
    """

    seed: int
    threshold: int | None
    """Largest validation key; None when nothing is held out."""

    @classmethod
    def of(cls, ids: Iterable[str], val_fraction: float, seed: int) -> Split:
        keys = np.fromiter((split_key(seed, image_id) for image_id in ids), dtype=np.uint64)
        num_val = validation_count(len(keys), val_fraction)
        if num_val == 0:
            return cls(seed, None)
        return cls(seed, int(np.partition(keys, num_val - 1)[num_val - 1]))

    def is_val(self, image_id: str) -> bool:
        return self.threshold is not None and split_key(self.seed, image_id) <= self.threshold

    def name(self, image_id: str) -> str:
        return "val" if self.is_val(image_id) else "train"
