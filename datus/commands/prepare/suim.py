"""SUIM (underwater scenes): RGB-coded masks thresholded into 8 classes or the DatUS 6-class grouping.

The published masks have anti-aliased off colours along borders (hence thresholding, not colour
matching) and some are taller than their images (hence the crop of :func:`_plan_suim_item`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from datus.core.errors import ConfigurationError
from datus.commands.prepare.core import (
    PrepareReport,
    _check_out_dir,
    _find_splits,
    _header,
    _Item,
    _oriented_size,
    _pair_files,
    _Plan,
    _reading,
    _refuse_out_inside_sources,
    _rel,
    _wh,
    _write_dataset,
)
from datus.core.settings import IGNORE_INDEX

SUIM_SPLITS: dict[str, str] = {"train_val": "train", "TEST": "test"}
"""SUIM's published split folders and the DatUS split names they become."""

SUIM_CLASSES_ALL: tuple[tuple[str, str], ...] = (
    ("BW", "background waterbody"),
    ("HD", "human divers"),
    ("PF", "aquatic plants and sea-grass"),
    ("WR", "wrecks and ruins"),
    ("RO", "robots and instruments"),
    ("RI", "reefs and invertebrates"),
    ("FV", "fish and vertebrates"),
    ("SR", "sea-floor and rocks"),
)
"""SUIM's 8 classes as (code name, description); the index is the code 4R + 2G + B."""

SUIM_CLASSES_COARSE: tuple[tuple[str, str], ...] = (
    ("HD", "human divers"),
    ("RO", "robots and instruments"),
    ("FV", "fish and vertebrates"),
    ("RI", "reefs and invertebrates"),
    ("WR", "wrecks and ruins"),
    ("BW+PF+SR", "background: waterbody, plants, sea-floor and rocks"),
)
"""The 6-class grouping the DatUS paper reports on SUIM."""

_SUIM_LOOKUP: dict[str, np.ndarray] = {
    "all": np.arange(8, dtype=np.uint8),
    # Indexed by code: BW, HD, PF, WR, RO, RI, FV, SR.
    "coarse": np.array([5, 0, 5, 4, 1, 3, 2, 5], dtype=np.uint8),
}

SUIM_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
SUIM_MASK_SUFFIXES = frozenset({".bmp"})


def decode_suim_mask(rgb: np.ndarray, classes: Literal["all", "coarse"] = "coarse") -> np.ndarray:
    """Turn an RGB-coded SUIM mask into class ids.

    Each channel is thresholded at 128 and the bits read as R G B (code = 4R + 2G + B).
    Thresholding, not exact colour matching, because the published masks have anti-aliased
    off colours along region borders.

    Args:
        rgb: H x W x 3 (or x 4; alpha is ignored) integer array.
        classes: ``"all"`` for the 8 SUIM classes, ``"coarse"`` for the DatUS 6-class grouping.

    Returns:
        H x W uint8 class ids.
    """
    _check_choice("classes", classes, tuple(_SUIM_LOOKUP))
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"rgb: expected an H x W x 3 array, got shape {rgb.shape}")
    bits = (rgb[..., :3] >= 128).astype(np.uint8)
    codes = (bits[..., 0] << 2) | (bits[..., 1] << 1) | bits[..., 2]
    return _SUIM_LOOKUP[classes][codes]


def prepare_suim(
    raw_dir: Path,
    out_dir: Path,
    classes: Literal["all", "coarse"] = "coarse",
    size_mismatch: Literal["crop", "error"] = "crop",
    *,
    overwrite: bool = False,
    skip_damaged: bool = False,
    workers: int | None = None,
) -> PrepareReport:
    """Convert SUIM (``train_val/`` and optionally ``TEST/``) into the DatUS layout.

    Args:
        raw_dir: Folder holding ``train_val/`` and/or ``TEST/``, each with ``images/*.jpg``
            and ``masks/*.bmp``.
        out_dir: Destination; ``train_val`` becomes split ``train``, ``TEST`` becomes ``test``.
        classes: ``"coarse"`` for the 6-class grouping of the DatUS paper, ``"all"`` for SUIM's 8.
        size_mismatch: Some SUIM masks are taller than their images, whose pixels match the
            mask's top rows. ``"crop"`` keeps the mask's top-left part of the image's size and
            reports it; ``"error"`` refuses. A mask smaller than its image is always refused.
        overwrite: Replace an ``out_dir`` that holds an earlier conversion (see the module doc).
        skip_damaged: Leave out and list pairs with a truncated or undecodable file instead of
            refusing the conversion.
        workers: Threads that decode and write files (default: up to 8).

    Returns:
        The report; ``out_dir/classes.json`` repeats its problems.

    Raises:
        FileNotFoundError: ``raw_dir`` does not hold the SUIM layout.
        ConfigurationError: A bad argument, a refused size mismatch, an unreadable mask mode,
            two files that would write the same output, damaged files, or an ``out_dir`` that
            is not empty.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    _check_choice("classes", classes, tuple(_SUIM_LOOKUP))
    _check_choice("size_mismatch", size_mismatch, ("crop", "error"))
    splits = _find_splits(
        raw_dir,
        [(raw_dir / name / "images", raw_dir / name / "masks", split) for name, split in SUIM_SPLITS.items()],
        dataset="SUIM",
        expected="train_val/images + train_val/masks (and optionally TEST/images + TEST/masks)",
    )
    _refuse_out_inside_sources(raw_dir, out_dir, splits)
    _check_out_dir(out_dir, overwrite)
    plan = _Plan(raw_dir)
    for image_dir, mask_dir, split in splits:
        pairs = _pair_files(raw_dir, image_dir, mask_dir, split, SUIM_IMAGE_SUFFIXES, SUIM_MASK_SUFFIXES, plan.problems)
        for item in pairs:
            plan.add(item, lambda item: _plan_suim_item(raw_dir, item, size_mismatch, plan.problems))

    def decode(item: _Item) -> tuple[np.ndarray, list[str]]:
        assert item.mask is not None
        with _reading(item.mask), Image.open(item.mask) as mask:
            rgb = np.asarray(mask.convert("RGB"))
        if item.crop_to is not None:
            width, height = item.crop_to
            rgb = rgb[:height, :width]
        return decode_suim_mask(rgb, classes), []

    names = SUIM_CLASSES_COARSE if classes == "coarse" else SUIM_CLASSES_ALL
    metadata = {
        "dataset": "suim",
        "ignore_index": IGNORE_INDEX,
        "classes": [description for _, description in names],
        "class_ids": list(range(len(names))),
        "class_codes": [code for code, _ in names],
        "grouping": classes,
        "source": str(raw_dir.absolute()),
    }
    return _write_dataset("suim", out_dir, plan, decode, metadata, overwrite, skip_damaged, workers)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Validate a ``Literal`` argument for Python callers, which no type checker stops."""
    if value not in choices:
        raise ConfigurationError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")


def _plan_suim_item(raw_dir: Path, item: _Item, size_mismatch: str, problems: list[str]) -> _Item:
    """Check a SUIM pair's sizes (headers only) and decide whether its mask is cropped."""
    if item.mask is None:
        _oriented_size(item.image)
        return item
    image_size, orientation_note = _oriented_size(item.image)
    mask_size, mode = _header(item.mask)
    if mode not in ("RGB", "RGBA", "P"):
        raise ConfigurationError(
            f"{_rel(item.mask, raw_dir)}: expected an RGB-coded SUIM mask, got image mode {mode!r}; "
            f"replace it with the published RGB mask"
        )
    if mask_size == image_size:
        return item
    sizes = f"mask {_wh(mask_size)} vs image {_wh(image_size)}{orientation_note} (width x height)"
    larger = mask_size[0] >= image_size[0] and mask_size[1] >= image_size[1]
    if not larger:
        raise ConfigurationError(
            f"{_rel(item.mask, raw_dir)}: {sizes}; the mask is smaller than its image and masks "
            f"are never resized. Fix or remove the pair {item.stem!r} from the raw data."
        )
    if size_mismatch == "error":
        raise ConfigurationError(
            f"{_rel(item.mask, raw_dir)}: {sizes}. Pass size_mismatch='crop' to keep the mask's "
            f"top-left {_wh(image_size)} (the published SUIM images match their masks' top rows), "
            f"or fix or remove the pair {item.stem!r}."
        )
    problems.append(f"{_rel(item.mask, raw_dir)}: {sizes}; cropped the mask to its top-left {_wh(image_size)}")
    return replace(item, crop_to=image_size)
