"""COCO-Stuff-27: fine label maps (0..181) grouped into the 27 coarse classes of IIC, PiCIE and STEGO.

COCO's masks were drawn on the stored pixels while datus reads images upright, so a mask follows
its image's EXIF orientation here (:func:`_plan_exif_aligned_item`); a curated image list
(:func:`_read_image_list`) restricts the conversion to the evaluation subset.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from datus.core.errors import ConfigurationError
from datus.commands.prepare.core import (
    _EXIF_ORIENTATION,
    _SINGLE_CHANNEL_MODES,
    _TRANSPOSING_ORIENTATIONS,
    PrepareReport,
    _check_out_dir,
    _find_splits,
    _header,
    _index_by_stem,
    _Item,
    _lookup,
    _oriented_size,
    _pair,
    _Plan,
    _read_ids,
    _reading,
    _refuse_out_inside_sources,
    _rel,
    _short_list,
    _unexpected_values,
    _wh,
    _write_dataset,
)
from datus.core.settings import IGNORE_INDEX

COCOSTUFF_SPLITS: dict[str, str] = {"train2017": "train", "val2017": "val"}
"""COCO 2017 split folders and the DatUS split names they become."""

COCOSTUFF_MASK_ROOT = "stuffthingmaps_trainval2017"
"""Folder of the fine label maps (``stuffthingmaps_trainval2017.zip``), beside ``images/``."""

COCOSTUFF_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
COCOSTUFF_MASK_SUFFIXES = frozenset({".png"})
COCOSTUFF_NUM_FINE = 182
"""Fine ids 0..181 (COCO category id - 1; 0-90 things, 91-181 stuff); 255 is unlabelled."""

COCOSTUFF27_CLASSES: tuple[tuple[str, tuple[int, ...]], ...] = (
    # Things (COCO supercategories); fine id = COCO category id - 1.
    ("electronic", (*range(71, 77),)),  # tv .. cell phone
    ("appliance", (*range(77, 83),)),  # microwave .. blender
    ("food-things", (*range(51, 61),)),  # banana .. cake
    ("furniture-things", (*range(61, 71),)),  # chair .. door
    ("indoor", (*range(83, 91),)),  # book .. hair brush
    ("kitchen", (*range(43, 51),)),  # bottle .. bowl
    ("accessory", (*range(25, 33),)),  # hat .. suitcase
    ("animal", (*range(15, 25),)),  # bird .. giraffe
    ("outdoor", (*range(9, 15),)),  # traffic light .. bench
    ("person", (0,)),
    ("sports", (*range(33, 43),)),  # frisbee .. tennis racket
    ("vehicle", (*range(1, 9),)),  # bicycle .. boat
    # Stuff (COCO-Stuff supercategories).
    ("ceiling", (101, 102)),
    ("floor", (100, *range(113, 118))),  # carpet, floor-*
    ("food-stuff", (120, 121, 152, 169)),  # food-other, fruit, salad, vegetable
    ("furniture-stuff", (97, 106, 107, 109, 111, 122, 129, 132, 155, 160, 164)),
    ("rawmaterial", (99, 131, 138, 142)),  # cardboard, metal, paper, plastic
    ("textile", (91, 92, 103, 104, 108, 130, 136, 140, 151, 166, 167)),
    ("wall", (*range(170, 177),)),  # wall-*
    ("window", (179, 180)),
    ("building", (94, 95, 127, 150, 157, 165)),  # bridge, building-other, house, roof, skyscraper, tent
    ("ground", (110, 124, 125, 135, 139, 143, 144, 146, 148, 153, 158)),
    ("plant", (93, 96, 118, 123, 128, 133, 141, 162, 168)),  # branch, bush, flower, grass, leaves ...
    ("sky", (105, 156)),  # clouds, sky-other
    ("solid", (126, 134, 149, 159, 161, 181)),  # hill, mountain, rock, solid-other, stone, wood
    ("structural", (98, 112, 137, 145, 163)),  # cage, fence, net, railing, structural-other
    ("water", (119, 147, 154, 177, 178)),  # fog, river, sea, water-other, waterdrops
)
"""The 27 coarse COCO-Stuff classes in coarse-id order, each with the fine ids it groups.

This is the grouping of the COCO-Stuff supercategories that IIC, PiCIE and STEGO evaluate on
("COCO-Stuff-27"): 12 thing classes (ids 0-11), then 15 stuff classes (ids 12-26). Every fine id
0..181 belongs to exactly one coarse class.
"""

COCOSTUFF_FINE_TO_COARSE = np.full(256, IGNORE_INDEX, dtype=np.uint8)
"""Lookup table fine id -> coarse id; 255 (unlabelled) and ids without a coarse class -> 255."""
for _coarse, (_, _fine_ids) in enumerate(COCOSTUFF27_CLASSES):
    COCOSTUFF_FINE_TO_COARSE[list(_fine_ids)] = _coarse
COCOSTUFF_FINE_TO_COARSE.flags.writeable = False

_EXIF_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""The pixel operation that displays an image with EXIF orientation 2..8 upright (as datus reads it)."""


def cocostuff27_from_fine(fine: np.ndarray) -> np.ndarray:
    """Map COCO-Stuff fine ids (0..181, 255 unlabelled) to the 27 coarse classes (255 ignored).

    Values that are no fine id (182..254, or anything outside 0..255) also become 255.
    """
    return _lookup(fine, COCOSTUFF_FINE_TO_COARSE)


def prepare_cocostuff27(
    raw_dir: Path,
    out_dir: Path,
    image_list: Path | None = None,
    *,
    overwrite: bool = False,
    skip_damaged: bool = False,
    workers: int | None = None,
) -> PrepareReport:
    """Convert COCO-Stuff (2017 images + stuffthingmaps) into the DatUS layout with 27 classes.

    Fine ids 0..181 are grouped into the 27 coarse classes of :data:`COCOSTUFF27_CLASSES`;
    255 (unlabelled) stays 255, and any other value (no fine id) also becomes 255 and is
    reported. COCO's annotations were drawn on the stored pixels, while datus reads images with
    their EXIF orientation applied: a mask whose image carries an EXIF orientation is rotated or
    flipped the same way (exactly, no resampling) and reported.

    Args:
        raw_dir: Folder holding ``images/{train2017,val2017}/*.jpg`` and
            ``stuffthingmaps_trainval2017/{train2017,val2017}/*.png`` (either split may be absent).
        out_dir: Destination; ``train2017`` becomes split ``train``, ``val2017`` becomes ``val``.
        image_list: Convert only the images listed in this text file, one image id per line
            (such as the curated ``Coco164kFull_Stuff_Coarse.txt`` of IIC/PiCIE/STEGO).
            Ids match with or without extension and zero padding (``000000000139``, ``139``,
            ``000000000139.jpg``); blank lines and ``#`` comments are skipped. Listed ids with no
            image are reported.
        overwrite, skip_damaged, workers: As for :func:`prepare_suim`.

    Returns:
        The report; ``out_dir/classes.json`` repeats its problems and the missing listed ids.

    Raises:
        FileNotFoundError: ``raw_dir`` does not hold the layout.
        ConfigurationError: an unreadable or empty ``image_list``, one that matches no image, a
            mask that is not single-channel or not of its image's size, damaged files, or an
            ``out_dir`` that is not empty.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    splits = _find_splits(
        raw_dir,
        [
            (raw_dir / "images" / name, raw_dir / COCOSTUFF_MASK_ROOT / name, split)
            for name, split in COCOSTUFF_SPLITS.items()
        ],
        dataset="COCO-Stuff",
        expected=f"images/val2017 + {COCOSTUFF_MASK_ROOT}/val2017 (and/or the same for train2017)",
    )
    _refuse_out_inside_sources(raw_dir, out_dir, splits)
    listed = _read_image_list(image_list) if image_list is not None else None
    _check_out_dir(out_dir, overwrite)
    plan = _Plan(raw_dir)
    found: set[str] = set()
    for image_dir, mask_dir, split in splits:
        images = _index_by_stem(raw_dir, image_dir, COCOSTUFF_IMAGE_SUFFIXES, plan.problems)
        masks = _index_by_stem(raw_dir, mask_dir, COCOSTUFF_MASK_SUFFIXES, plan.problems)
        if listed is not None:
            images = {stem: path for stem, path in images.items() if _coco_key(stem) in listed}
            masks = {stem: path for stem, path in masks.items() if _coco_key(stem) in listed}
            found.update(_coco_key(stem) for stem in images)
        for item in _pair(raw_dir, images, masks, image_dir, mask_dir, split, plan.problems):
            plan.add(item, lambda item: _plan_exif_aligned_item(raw_dir, item, plan.problems))
    list_summary: dict[str, object] | None = None
    if listed is not None and image_list is not None:
        missing = [original for key, original in listed.items() if key not in found]
        searched = ", ".join(_rel(image_dir, raw_dir) for image_dir, _, _ in splits)
        if len(missing) == len(listed):
            raise ConfigurationError(
                f"--image_list {image_list}: none of its {len(listed)} ids (e.g. {next(iter(listed.values()))!r}) "
                f"matches an image in {searched}; check that the list belongs to this dataset and split"
            )
        if missing:
            plan.problems.insert(
                0,
                f"{image_list}: {len(missing)} of {len(listed)} listed ids have no image in {searched} "
                f"({_short_list(missing)}); skipped",
            )
        list_summary = {"path": str(Path(image_list).absolute()), "listed": len(listed), "missing": missing}

    def decode(item: _Item) -> tuple[np.ndarray, list[str]]:
        assert item.mask is not None
        fine = _read_ids(item.mask, item.transpose)
        unexpected = (fine >= COCOSTUFF_NUM_FINE) & (fine != IGNORE_INDEX)
        notes = _unexpected_values(item.mask, raw_dir, fine, unexpected, "values that are no fine id (0..181, 255)")
        return cocostuff27_from_fine(fine), notes

    metadata: dict[str, object] = {
        "dataset": "cocostuff27",
        "ignore_index": IGNORE_INDEX,
        "classes": [name for name, _ in COCOSTUFF27_CLASSES],
        "class_ids": list(range(len(COCOSTUFF27_CLASSES))),
        "class_kinds": ["thing" if coarse < 12 else "stuff" for coarse in range(len(COCOSTUFF27_CLASSES))],
        "fine_ids": [list(fine_ids) for _, fine_ids in COCOSTUFF27_CLASSES],
        "mapping": "COCO-Stuff fine ids 0..181 -> 27 coarse supercategories (as IIC, PiCIE, STEGO); 255 ignored",
        "source": str(raw_dir.absolute()),
    }
    if list_summary is not None:
        metadata["image_list"] = list_summary
    return _write_dataset("cocostuff27", out_dir, plan, decode, metadata, overwrite, skip_damaged, workers)


def _read_image_list(path: Path) -> dict[str, str]:
    """The ids of a curated list file, normalised (see :func:`_coco_key`) -> as written."""
    path = Path(path)
    fix = "pass a text file with one image id per line (e.g. 000000000139)"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigurationError(f"--image_list {path} does not exist; {fix}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigurationError(f"--image_list {path} cannot be read as text ({error}); {fix}") from None
    listed: dict[str, str] = {}
    for line in text.splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            listed.setdefault(_coco_key(entry), entry)
    if not listed:
        raise ConfigurationError(f"--image_list {path} lists no image ids; {fix}")
    return listed


def _coco_key(name: str) -> str:
    """A COCO image id in a form that ignores folders, extension and zero padding (``'139'``)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, suffix = base.rpartition(".")
    if dot and f".{suffix.lower()}" in COCOSTUFF_IMAGE_SUFFIXES | COCOSTUFF_MASK_SUFFIXES:
        base = stem
    return str(int(base)) if base.isdigit() else base


def _plan_exif_aligned_item(raw_dir: Path, item: _Item, problems: list[str]) -> _Item:
    """COCO: a mask drawn on the stored pixels follows its image's EXIF orientation (exactly)."""
    if item.mask is None:
        _oriented_size(item.image)
        return item
    with _reading(item.image), Image.open(item.image) as image:
        stored = image.size
        orientation = image.getexif().get(_EXIF_ORIENTATION)
    mask_size, mode = _header(item.mask)
    if mode not in _SINGLE_CHANNEL_MODES:
        raise ConfigurationError(
            f"{_rel(item.mask, raw_dir)}: expected a single-channel PNG of fine ids (from "
            f"{COCOSTUFF_MASK_ROOT}.zip), got image mode {mode!r}; the colour-coded or stuff-only "
            f"maps are another format"
        )
    transpose = _EXIF_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    upright = (stored[1], stored[0]) if orientation in _TRANSPOSING_ORIENTATIONS else stored
    if mask_size == stored and transpose is not None:
        problems.append(
            f"{_rel(item.mask, raw_dir)}: its image has EXIF orientation {orientation}, which datus applies when "
            f"reading it; the mask (drawn on the stored pixels) was turned the same way"
        )
        return replace(item, transpose=transpose)
    if mask_size == upright:
        return item
    note = f" (upright {_wh(upright)} after EXIF orientation {orientation})" if upright != stored else ""
    raise ConfigurationError(
        f"{_rel(item.mask, raw_dir)}: mask {_wh(mask_size)} vs image {_wh(stored)}{note} (width x height); "
        f"masks are never resized. Fix or remove the pair {item.stem!r}."
    )
