"""SegNet's 11-class CamVid: single-channel id PNGs beside their frames; 11 (unlabelled) is ignored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from datus.commands.prepare.core import (
    PrepareReport,
    _check_out_dir,
    _check_single_channel_pair,
    _find_splits,
    _Item,
    _pair_files,
    _Plan,
    _reading,
    _refuse_out_inside_sources,
    _unexpected_values,
    _write_dataset,
)
from datus.core.settings import IGNORE_INDEX

CAMVID_SPLITS: dict[str, str] = {"train": "trainannot", "val": "valannot", "test": "testannot"}
"""SegNet CamVid's image folders and the annotation folder beside each."""

CAMVID_CLASSES: tuple[str, ...] = (
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
)
CAMVID_UNLABELLED = 11
"""SegNet CamVid's id for unlabelled pixels; it becomes ``IGNORE_INDEX``."""

CAMVID_SUFFIXES = frozenset({".png"})


def prepare_camvid(
    raw_dir: Path,
    out_dir: Path,
    *,
    overwrite: bool = False,
    skip_damaged: bool = False,
    workers: int | None = None,
) -> PrepareReport:
    """Convert SegNet's 11-class CamVid into the DatUS layout.

    Ids 0..10 are kept; 11 (unlabelled) becomes 255 so that evaluation ignores it. Any other
    value above 10 is not a SegNet CamVid class either: it also becomes 255, and the file is
    reported with the pixel count, since it hints at a different CamVid variant.

    Args:
        raw_dir: Folder holding ``train/`` + ``trainannot/`` and optionally ``val/`` +
            ``valannot/`` and ``test/`` + ``testannot/`` (PNG frames and single-channel PNG
            annotations with the same names).
        out_dir: Destination; the split names are kept.
        overwrite, skip_damaged, workers: As for :func:`prepare_suim`.

    Returns:
        The report; ``out_dir/classes.json`` repeats its problems.

    Raises:
        FileNotFoundError: ``raw_dir`` does not hold the SegNet CamVid layout.
        ConfigurationError: An annotation that is not single-channel (e.g. the colour-coded
            32-class CamVid), an annotation whose size differs from its frame, two files that
            would write the same output, damaged files, or an ``out_dir`` that is not empty.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    splits = _find_splits(
        raw_dir,
        [(raw_dir / split, raw_dir / annot, split) for split, annot in CAMVID_SPLITS.items()],
        dataset="SegNet CamVid",
        expected="train + trainannot (and optionally val + valannot, test + testannot)",
    )
    _refuse_out_inside_sources(raw_dir, out_dir, splits)
    _check_out_dir(out_dir, overwrite)
    plan = _Plan(raw_dir)
    for image_dir, annot_dir, split in splits:
        for item in _pair_files(raw_dir, image_dir, annot_dir, split, CAMVID_SUFFIXES, CAMVID_SUFFIXES, plan.problems):
            plan.add(
                item,
                lambda item: _check_single_channel_pair(
                    raw_dir, item, "a single-channel id PNG (SegNet 11-class CamVid)",
                    "Colour-coded annotations (the 32-class CamVid) are not this format; use the SegNet "
                    "version (train/ + trainannot/ ...).",
                ),
            )  # fmt: skip

    def decode(item: _Item) -> tuple[np.ndarray, list[str]]:
        assert item.mask is not None
        with _reading(item.mask), Image.open(item.mask) as annotation:
            ids = np.asarray(annotation)
        notes = _unexpected_values(item.mask, raw_dir, ids, ids > CAMVID_UNLABELLED, "ids outside 0..11")
        return np.where(ids >= CAMVID_UNLABELLED, IGNORE_INDEX, ids).astype(np.uint8), notes

    metadata = {
        "dataset": "camvid",
        "ignore_index": IGNORE_INDEX,
        "classes": list(CAMVID_CLASSES),
        "class_ids": list(range(len(CAMVID_CLASSES))),
        "source": str(raw_dir.absolute()),
    }
    return _write_dataset("camvid", out_dir, plan, decode, metadata, overwrite, skip_damaged, workers)
