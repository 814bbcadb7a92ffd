"""Cityscapes: gtFine labelIds 7..33 become the 27 classes of PiCIE and STEGO; the city folders are kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datus.commands.prepare.core import (
    PrepareReport,
    _check_out_dir,
    _check_single_channel_pair,
    _find_splits,
    _Item,
    _lookup,
    _pair,
    _Plan,
    _read_ids,
    _refuse_out_inside_sources,
    _rel,
    _unexpected_values,
    _write_dataset,
)
from datus.core.settings import IGNORE_INDEX

CITYSCAPES_SPLITS: tuple[str, ...] = ("train", "val", "test")
CITYSCAPES_IMAGE_SUFFIX = "_leftImg8bit.png"
CITYSCAPES_MASK_SUFFIX = "_gtFine_labelIds.png"
CITYSCAPES_FIRST_ID = 7
"""Cityscapes labelIds 7..33 become classes 0..26; 0..6 (void) and anything else become 255."""

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "parking",
    "rail track",
    "building",
    "wall",
    "fence",
    "guard rail",
    "bridge",
    "tunnel",
    "pole",
    "polegroup",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "caravan",
    "trailer",
    "train",
    "motorcycle",
    "bicycle",
)
"""The 27 classes of Cityscapes labelIds 7..33, in id order (the STEGO/PiCIE evaluation)."""

CITYSCAPES_LABEL_TO_CLASS = np.full(256, IGNORE_INDEX, dtype=np.uint8)
CITYSCAPES_LABEL_TO_CLASS[CITYSCAPES_FIRST_ID : CITYSCAPES_FIRST_ID + len(CITYSCAPES_CLASSES)] = np.arange(
    len(CITYSCAPES_CLASSES), dtype=np.uint8
)
CITYSCAPES_LABEL_TO_CLASS.flags.writeable = False


def cityscapes27_from_label_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map Cityscapes labelIds to the 27 classes: 7..33 -> 0..26, everything else -> 255."""
    return _lookup(label_ids, CITYSCAPES_LABEL_TO_CLASS)


def prepare_cityscapes(
    raw_dir: Path,
    out_dir: Path,
    *,
    overwrite: bool = False,
    skip_damaged: bool = False,
    workers: int | None = None,
) -> PrepareReport:
    """Convert Cityscapes (leftImg8bit + gtFine labelIds) into the DatUS layout with 27 classes.

    LabelIds 7..33 become classes 0..26 (road .. bicycle, :data:`CITYSCAPES_CLASSES`); the void
    ids 0..6 and anything else become 255. The city folders are kept and the publisher's name
    suffix is dropped: ``leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png`` becomes
    ``val/images/lindau/lindau_000000_000019.png`` with its mask at
    ``val/true_masks/lindau/lindau_000000_000019.png`` (image id ``lindau/lindau_000000_000019``).
    The other gtFine files (colour, instance ids, polygons) are not used.

    Args:
        raw_dir: Folder holding ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` and
            ``gtFine/<split>/<city>/*_gtFine_labelIds.png`` for splits train, val and/or test.
        out_dir: Destination; the split names are kept.
        overwrite, skip_damaged, workers: As for :func:`prepare_suim`.

    Returns:
        The report; ``out_dir/classes.json`` repeats its problems.

    Raises:
        FileNotFoundError: ``raw_dir`` does not hold the layout.
        ConfigurationError: a labelIds file that is not single-channel or not of its image's
            size, damaged files, or an ``out_dir`` that is not empty.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    splits = _find_splits(
        raw_dir,
        [(raw_dir / "leftImg8bit" / split, raw_dir / "gtFine" / split, split) for split in CITYSCAPES_SPLITS],
        dataset="Cityscapes",
        expected="leftImg8bit/<split>/<city>/ + gtFine/<split>/<city>/ for split train, val and/or test",
    )
    _refuse_out_inside_sources(raw_dir, out_dir, splits)
    _check_out_dir(out_dir, overwrite)
    plan = _Plan(raw_dir)
    for image_dir, mask_dir, split in splits:
        images = _index_by_suffix(raw_dir, image_dir, CITYSCAPES_IMAGE_SUFFIX, plan.problems)
        masks = _index_by_suffix(raw_dir, mask_dir, CITYSCAPES_MASK_SUFFIX, None)
        for item in _pair(raw_dir, images, masks, image_dir, mask_dir, split, plan.problems):
            plan.add(
                item,
                lambda item: _check_single_channel_pair(
                    raw_dir, item, "a single-channel gtFine labelIds PNG",
                    "Use the *_gtFine_labelIds.png files of gtFine_trainvaltest.zip.",
                ),
            )  # fmt: skip

    def decode(item: _Item) -> tuple[np.ndarray, list[str]]:
        assert item.mask is not None
        label_ids = _read_ids(item.mask, None)
        last = CITYSCAPES_FIRST_ID + len(CITYSCAPES_CLASSES) - 1
        notes = _unexpected_values(item.mask, raw_dir, label_ids, label_ids > last, f"labelIds above {last}")
        return cityscapes27_from_label_ids(label_ids), notes

    metadata = {
        "dataset": "cityscapes",
        "ignore_index": IGNORE_INDEX,
        "classes": list(CITYSCAPES_CLASSES),
        "class_ids": list(range(len(CITYSCAPES_CLASSES))),
        "label_ids": list(range(CITYSCAPES_FIRST_ID, CITYSCAPES_FIRST_ID + len(CITYSCAPES_CLASSES))),
        "mapping": "Cityscapes labelIds 7..33 -> 0..26 (as PiCIE, STEGO); all other ids ignored",
        "source": str(raw_dir.absolute()),
    }
    return _write_dataset("cityscapes", out_dir, plan, decode, metadata, overwrite, skip_damaged, workers)


def _index_by_suffix(raw_dir: Path, folder: Path, suffix: str, problems: list[str] | None) -> dict[str, Path]:
    """Files below ``folder`` named ``*<suffix>``, by relative path without that suffix.

    Other files are reported to ``problems`` (when given) and skipped; the gtFine folders also
    hold colour, instance and polygon files that are expected and passed over silently.
    """
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_dir():
            continue
        relative = path.relative_to(folder).as_posix()
        if not relative.endswith(suffix) or any(part.startswith(".") for part in path.relative_to(folder).parts):
            if problems is not None:
                problems.append(f"{_rel(path, raw_dir)}: not a *{suffix} file; skipped")
            continue
        found[relative[: -len(suffix)]] = path
    return found
