"""Convert publishers' raw dataset layouts into the DatUS layout that the rest of datus reads.

Output layout (the contract with the data modules and the evaluation)::

    OUT/<split>/images/<id>.<original ext>   image files copied byte-for-byte
    OUT/<split>/true_masks/<id>.png          single-channel uint8 class ids, 255 = ignore
    OUT/classes.json                         class names, ids, ignore index, source, problems

``<id>`` is the image's stem, or ``<city>/<stem>`` for Cityscapes (the city folders are kept).
Images are copied, never re-encoded, so the pixels the model sees are the publisher's. Masks
are decoded once here into plain class-id PNGs, so that no other part of datus has to know a
dataset's colour code or fine-to-coarse mapping. Real annotations have quirks (off colours
along borders, masks taller than their images, stray files); every file handled specially or
skipped is named in the report, and nothing is ever resized, because resizing a label map
invents labels.

A conversion is all or nothing. Checks that read only file headers (layout, sizes, modes) run
before anything is written; then every image and mask is decoded in full while the result is
written into a hidden sibling folder (``.OUT.partial-*``), which is renamed to ``OUT`` only when
everything succeeded. A refused, failed or interrupted conversion therefore leaves ``OUT`` as
it was. An ``OUT`` that already holds files is refused unless ``overwrite`` is set, and even
then only when it holds nothing but an earlier ``datus prepare`` output; it is swapped out
only after the new conversion succeeded. A truncated or undecodable file refuses the
conversion with one line naming it (all damaged files found are named), unless
``skip_damaged`` is set: then the pair is left out and listed.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from datus.errors import ConfigurationError
from datus.io import DECODE_ERRORS, decode_reason, write_json, write_png
from datus.run import CLASSES_FILE
from datus.settings import IGNORE_INDEX

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- SUIM

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

# ----------------------------------------------------------------------------- CamVid

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

# ----------------------------------------------------------------------------- COCO-Stuff

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

# ----------------------------------------------------------------------------- Cityscapes

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

# ----------------------------------------------------------------------------- shared

_SINGLE_CHANNEL_MODES = frozenset({"L", "P", "I;16", "I"})
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
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

_MAX_LISTED = 12

_STAGING_TAG = "partial"
_REPLACED_TAG = "replaced"


@dataclass
class PrepareReport:
    """What a conversion did.

    Attributes:
        dataset: Dataset name as written to ``classes.json`` (``"suim"``, ``"camvid"``,
            ``"cocostuff27"``, ``"cityscapes"``).
        out_dir: The DatUS-layout folder written.
        converted: Image/mask pairs written (images copied without a mask are not counted).
        problems: One line per file handled specially or skipped: the file (relative to the
            raw folder), what was wrong, and what was done.
    """

    dataset: str
    out_dir: Path
    converted: int
    problems: list[str]


@dataclass(frozen=True)
class _Item:
    """One image (and its mask, if it has one) planned for conversion."""

    split: str
    stem: str  # output id: the image's stem, or a relative path without extension (Cityscapes)
    image: Path
    mask: Path | None
    crop_to: tuple[int, int] | None = None  # (width, height) of the image when the mask is larger
    transpose: Image.Transpose | None = None  # applied to the mask to follow the image's EXIF orientation


class _Damaged(Exception):
    """A file PIL cannot decode (truncated, corrupt, not an image); carries the file's path."""

    def __init__(self, path: Path, error: BaseException) -> None:
        super().__init__(f"{path}: {error}")
        self.path = path
        self.reason = decode_reason(error)


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn PIL's decoding errors for ``path`` into :class:`_Damaged`, which names the file."""
    try:
        yield
    except ConfigurationError:
        raise
    except DECODE_ERRORS as error:
        raise _Damaged(path, error) from error


Decoder = Callable[[_Item], tuple[np.ndarray, list[str]]]
"""Decodes an item's mask into class ids; also returns report lines about it."""


@dataclass
class _Plan:
    """What a converter found before writing: the pairs, report lines and damaged files."""

    raw_dir: Path
    items: list[_Item] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    damaged: list[_Damaged] = field(default_factory=list)

    def add(self, item: _Item, check: Callable[[_Item], _Item] | None = None) -> None:
        """Keep ``item`` after ``check`` (header checks); a damaged header is recorded instead."""
        try:
            self.items.append(check(item) if check is not None else item)
        except _Damaged as damaged:
            self.damaged.append(damaged)


# ----------------------------------------------------------------------------- decoders


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


def cocostuff27_from_fine(fine: np.ndarray) -> np.ndarray:
    """Map COCO-Stuff fine ids (0..181, 255 unlabelled) to the 27 coarse classes (255 ignored).

    Values that are no fine id (182..254, or anything outside 0..255) also become 255.
    """
    return _lookup(fine, COCOSTUFF_FINE_TO_COARSE)


def cityscapes27_from_label_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map Cityscapes labelIds to the 27 classes: 7..33 -> 0..26, everything else -> 255."""
    return _lookup(label_ids, CITYSCAPES_LABEL_TO_CLASS)


def _lookup(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``table[values]`` for a 256-entry table; values outside 0..255 map to ``IGNORE_INDEX``."""
    values = np.asarray(values)
    if values.dtype == np.uint8:
        return table[values]
    inside = (values >= 0) & (values < len(table))
    return np.where(inside, table[np.where(inside, values, 0)], IGNORE_INDEX).astype(np.uint8)


# ----------------------------------------------------------------------------- converters


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


def format_report(report: PrepareReport) -> str:
    """A short multi-line summary for the CLI; the full problem list is in ``classes.json``."""
    lines = [f"{report.dataset}: wrote {report.converted} image/mask pairs to {report.out_dir}"]
    if not report.problems:
        lines.append("no problems found")
        return "\n".join(lines)
    lines.append(f"{len(report.problems)} file(s) handled specially or skipped:")
    shown = report.problems[:_MAX_LISTED]
    lines.extend(f"  {problem}" for problem in shown)
    if len(report.problems) > len(shown):
        lines.append(
            f"  ... and {len(report.problems) - len(shown)} more (all listed under \"problems\" in "
            f"{report.out_dir / 'classes.json'})"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- planning helpers


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Validate a ``Literal`` argument for Python callers, which no type checker stops."""
    if value not in choices:
        raise ConfigurationError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")


def _find_splits(
    raw_dir: Path, candidates: list[tuple[Path, Path, str]], dataset: str, expected: str
) -> list[tuple[Path, Path, str]]:
    """The candidate (image folder, mask folder, split) triples present in ``raw_dir``.

    A split needs both folders: one without the other means a partial download or the wrong
    folder, which a converter should not guess around.
    """
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"{dataset} raw folder {raw_dir} does not exist (or is not a folder)")
    found = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in raw_dir.iterdir())
    found_text = _short_list(found) if found else "nothing"
    present = []
    for image_dir, mask_dir, split in candidates:
        if image_dir.is_dir() and mask_dir.is_dir():
            present.append((image_dir, mask_dir, split))
        elif image_dir.is_dir() or mask_dir.is_dir():
            have, lack = (image_dir, mask_dir) if image_dir.is_dir() else (mask_dir, image_dir)
            raise FileNotFoundError(
                f"{dataset} raw folder {raw_dir}: found {_rel(have, raw_dir)}/ but not {_rel(lack, raw_dir)}/; "
                f"expected {expected}. Restore the missing folder or remove the incomplete split."
            )
    if not present:
        raise FileNotFoundError(
            f"{dataset} raw folder {raw_dir} is not in the published layout: expected {expected}, "
            f"found {found_text}. Pass the folder that directly contains the split folders."
        )
    return present


def _refuse_out_inside_sources(raw_dir: Path, out_dir: Path, splits: Iterable[tuple[Path, Path, str]]) -> None:
    """Writing into the raw folders would mix outputs with inputs (and pollute a rerun)."""
    out = out_dir.resolve()
    sources = [folder.resolve() for image_dir, mask_dir, _ in splits for folder in (image_dir, mask_dir)]
    if out == raw_dir.resolve() or any(out.is_relative_to(folder) for folder in sources):
        raise ConfigurationError(
            f"out_dir {out_dir} is the raw folder or inside one of its split folders; "
            f"choose a separate output folder (e.g. a sibling of {raw_dir})"
        )


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse an ``out_dir`` that is a file or already holds files, unless it may be replaced.

    Runs before any file is read, so the answer comes at once. ``overwrite`` only replaces a
    folder that holds nothing but an earlier ``datus prepare`` output, so that a mistyped path
    can never delete unrelated files.
    """
    if out_dir.is_symlink():  # replacing it would swap the user's link for a folder
        raise ConfigurationError(
            f"out_dir {out_dir} is a symbolic link; give the folder it points to ({out_dir.resolve()}) or a new folder"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigurationError(f"out_dir {out_dir} is a file; pass a folder path for the converted dataset")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise ConfigurationError(
            f"out_dir {out_dir} already exists and is not empty; pass --overwrite (overwrite=True) to replace "
            f"an earlier conversion there once the new one has succeeded, or choose a new folder"
        )
    foreign = _foreign_entries(out_dir)
    if foreign:
        raise ConfigurationError(
            f"out_dir {out_dir} holds {_short_list(foreign)}, which is not part of an earlier `datus prepare` "
            f"output (a classes.json naming its dataset and <split>/images, <split>/true_masks); --overwrite "
            f"will not delete it: move it away, delete {out_dir} yourself, or choose a new folder"
        )


def _foreign_entries(out_dir: Path) -> list[str]:
    """Entries of ``out_dir`` that the earlier conversion described by its ``classes.json`` did not write.

    Beyond the layout, each split folder must hold exactly as many files as that conversion
    recorded (``splits`` in ``classes.json``), so that a file a user added there (an extra
    image, notes) is never deleted by ``--overwrite``.
    """
    classes_file = out_dir / CLASSES_FILE
    try:
        described = json.loads(classes_file.read_text(encoding="utf-8"))
        splits = described.get("splits") if isinstance(described, dict) and isinstance(described.get("dataset"), str) else None
    except (OSError, ValueError, RecursionError):
        splits = None
    if not isinstance(splits, dict):
        return [f"no {CLASSES_FILE} of an earlier conversion"]
    foreign = []
    for entry in sorted(out_dir.iterdir()):
        if entry.name == CLASSES_FILE and entry.is_file():
            continue
        counts = splits.get(entry.name)
        if not entry.is_dir() or entry.is_symlink() or not isinstance(counts, dict):
            foreign.append(entry.name)
            continue
        for child in sorted(entry.iterdir()):
            recorded = counts.get({"images": "images", "true_masks": "masks"}.get(child.name, ""))
            if not child.is_dir() or child.is_symlink() or not isinstance(recorded, int):
                foreign.append(f"{entry.name}/{child.name}")
                continue
            found = sum(1 for path in child.rglob("*") if path.is_file() or path.is_symlink())
            if found != recorded:
                foreign.append(f"{entry.name}/{child.name} ({found} files, the earlier conversion wrote {recorded})")
    return foreign


def _pair_files(
    raw_dir: Path,
    image_dir: Path,
    mask_dir: Path,
    split: str,
    image_suffixes: frozenset[str],
    mask_suffixes: frozenset[str],
    problems: list[str],
) -> list[_Item]:
    """Pair the images and masks of two flat folders by stem (see :func:`_pair`)."""
    images = _index_by_stem(raw_dir, image_dir, image_suffixes, problems)
    masks = _index_by_stem(raw_dir, mask_dir, mask_suffixes, problems)
    return _pair(raw_dir, images, masks, image_dir, mask_dir, split, problems)


def _pair(
    raw_dir: Path,
    images: dict[str, Path],
    masks: dict[str, Path],
    image_dir: Path,
    mask_dir: Path,
    split: str,
    problems: list[str],
) -> list[_Item]:
    """Pair images with masks by id, reporting every file that cannot be paired.

    An image without a mask is still worth copying (pseudo masks need no ground truth); a mask
    without an image is useless and skipped.
    """
    items = []
    for stem in sorted(images.keys() | masks.keys()):
        image, mask = images.get(stem), masks.get(stem)
        if image is None:
            assert mask is not None
            problems.append(f"{_rel(mask, raw_dir)}: no matching image in {_rel(image_dir, raw_dir)}/; skipped")
            continue
        if mask is None:
            problems.append(
                f"{_rel(image, raw_dir)}: no mask in {_rel(mask_dir, raw_dir)}/; image copied without a mask"
            )
        items.append(_Item(split=split, stem=stem, image=image, mask=mask))
    return items


def _index_by_stem(raw_dir: Path, folder: Path, suffixes: frozenset[str], problems: list[str]) -> dict[str, Path]:
    """Files of ``folder`` with an accepted suffix, by stem; two files with one stem are refused.

    Outputs are named by stem, so ``a.jpg`` and ``a.png`` would overwrite each other's mask.
    Files of other types are skipped and reported so that a wrong extension never silently
    drops data.
    """
    by_stem: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in suffixes:
            kind = "folder" if path.is_dir() else "file"
            problems.append(
                f"{_rel(path, raw_dir)}: {kind} is not {'/'.join(sorted(suffixes))}; skipped"
            )
            continue
        if path.stem in by_stem:
            raise ConfigurationError(
                f"{_rel(by_stem[path.stem], raw_dir)} and {path.name} in {folder} share the stem "
                f"{path.stem!r} and would write the same output; remove or rename one of them"
            )
        by_stem[path.stem] = path
    return by_stem


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


def _check_single_channel_pair(raw_dir: Path, item: _Item, expected: str, hint: str) -> _Item:
    """Refuse (headers only, before writing) annotations of the wrong kind or size."""
    image_size, orientation_note = _oriented_size(item.image)
    if item.mask is None:
        return item
    mask_size, mode = _header(item.mask)
    if mode not in _SINGLE_CHANNEL_MODES:
        raise ConfigurationError(f"{_rel(item.mask, raw_dir)}: expected {expected}, got image mode {mode!r}. {hint}")
    if mask_size != image_size:
        raise ConfigurationError(
            f"{_rel(item.mask, raw_dir)}: annotation {_wh(mask_size)} vs image {_wh(image_size)}"
            f"{orientation_note} (width x height); masks are never resized. Fix or remove the pair "
            f"{item.stem!r}."
        )
    return item


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


def _header(path: Path) -> tuple[tuple[int, int], str]:
    """(width, height) and mode of an image file, from its header."""
    with _reading(path), Image.open(path) as image:
        return image.size, image.mode


def _oriented_size(path: Path) -> tuple[tuple[int, int], str]:
    """An image's (width, height) as datus reads it (EXIF orientation applied), and a note.

    The data modules apply EXIF orientation, so that is the size a mask must match; the note
    says so in messages where it differs from the stored size.
    """
    with _reading(path), Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(_EXIF_ORIENTATION)
    if orientation in _TRANSPOSING_ORIENTATIONS:
        return (height, width), f" after EXIF orientation {orientation} (stored {width}x{height})"
    return (width, height), ""


def _read_ids(path: Path, transpose: Image.Transpose | None) -> np.ndarray:
    """A single-channel label map's values, optionally rotated/flipped (exact pixel permutation)."""
    with _reading(path), Image.open(path) as image:
        image.load()
        if transpose is not None:
            return np.asarray(image.transpose(transpose))
        return np.asarray(image)


def _unexpected_values(path: Path, raw_dir: Path, values: np.ndarray, unexpected: np.ndarray, what: str) -> list[str]:
    """A report line for pixels with values that the dataset's format does not define."""
    count = int(np.count_nonzero(unexpected))
    if not count:
        return []
    found = np.unique(values[unexpected]).tolist()
    shown = _short_list(found)
    return [f"{_rel(path, raw_dir)}: {count} pixels with {what} ({shown}); set to {IGNORE_INDEX} (ignored)"]


def _verify_image(path: Path) -> None:
    """Decode an image in full, so a truncated file is found now rather than mid-run.

    JPEGs are decoded at reduced scale (``draft``), which still reads the whole stream and so
    still notices truncation, at a fraction of the cost.
    """
    with _reading(path), Image.open(path) as image:
        if image.format == "JPEG":
            image.draft("RGB", (max(image.width // 8, 1), max(image.height // 8, 1)))
        image.load()


# ----------------------------------------------------------------------------- writing


@dataclass
class _Outcome:
    notes: list[str] = field(default_factory=list)
    mask_written: bool = False
    damaged: _Damaged | None = None


def _convert_one(root: Path, item: _Item, decode: Decoder) -> _Outcome:
    """Decode and write one pair into the staging folder ``root``; damaged pairs write nothing."""
    try:
        _verify_image(item.image)
        decoded = decode(item) if item.mask is not None else None
    except _Damaged as damaged:
        return _Outcome(damaged=damaged)
    image_out = root / item.split / "images" / f"{item.stem}{item.image.suffix}"
    image_out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(item.image, image_out)
    if decoded is None:
        return _Outcome()
    ids, notes = decoded
    write_png(root / item.split / "true_masks" / f"{item.stem}.png", ids)
    return _Outcome(notes=notes, mask_written=True)


def _write_dataset(
    dataset: str,
    out_dir: Path,
    plan: _Plan,
    decode: Decoder,
    metadata: dict[str, object],
    overwrite: bool,
    skip_damaged: bool,
    workers: int | None,
) -> PrepareReport:
    """Decode and write every planned pair into a staging folder, then move it to ``out_dir``.

    Damaged headers found while planning refuse the conversion before anything is written;
    files found damaged while decoding refuse it at the end (all of them named), so one run
    lists every broken file. ``classes.json`` is written last.
    """
    problems = plan.problems
    _handle_damaged(plan.damaged, plan.raw_dir, skip_damaged, problems, before_writing=True)
    _warn_about_leftovers(out_dir)
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    if workers < 1:
        raise ConfigurationError(f"workers (--workers): expected >= 1, got {workers}")
    with _staged(out_dir, overwrite) as root:
        outcomes = _map_in_threads(lambda item: _convert_one(root, item, decode), plan.items, workers)
        damaged: list[_Damaged] = []
        converted = 0
        per_split: dict[str, dict[str, int]] = {}
        for item, outcome in zip(plan.items, outcomes):
            if outcome.damaged is not None:
                damaged.append(outcome.damaged)
                continue
            problems.extend(outcome.notes)
            counts = per_split.setdefault(item.split, {"images": 0, "masks": 0})
            counts["images"] += 1
            counts["masks"] += int(outcome.mask_written)
            converted += int(outcome.mask_written)
        _handle_damaged(damaged, plan.raw_dir, skip_damaged, problems, before_writing=False)
        if not per_split:
            raise ConfigurationError(
                f"{plan.raw_dir}: no image could be converted (none found, or all damaged and skipped); "
                f"nothing was written to {out_dir}"
            )
        write_json(root / CLASSES_FILE, {**metadata, "splits": per_split, "problems": problems})
    return PrepareReport(dataset=dataset, out_dir=out_dir, converted=converted, problems=problems)


def _handle_damaged(
    damaged: Sequence[_Damaged], raw_dir: Path, skip: bool, problems: list[str], before_writing: bool
) -> None:
    """Refuse the conversion naming every damaged file, or (``skip``) list them as skipped."""
    if not damaged:
        return
    lines = [f"{_rel(entry.path, raw_dir)}: {entry.reason}" for entry in damaged]
    if skip:
        problems.extend(f"{line}; pair skipped (damaged file)" for line in lines)
        return
    shown = "; ".join(lines[:3]) + (f"; ... ({len(lines)} in all)" if len(lines) > 3 else "")
    when = "nothing was written" if before_writing else "the output was discarded"
    raise ConfigurationError(
        f"{len(lines)} damaged file(s) in {raw_dir}: {shown}. Re-download or remove them, or pass "
        f"--skip_damaged (skip_damaged=True) to convert without those pairs; {when}"
    )


def _map_in_threads(function: Callable[[_Item], _Outcome], items: Sequence[_Item], workers: int) -> list[_Outcome]:
    """``[function(item) for item in items]`` in threads (PIL and zlib release the GIL), in order."""
    progress = tqdm(total=len(items), desc="prepare", unit="image", disable=None, leave=False)
    try:
        if workers == 1:
            results = []
            for item in items:
                results.append(function(item))
                progress.update()
            return results
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="datus-prepare")
        try:
            results = []
            for result in executor.map(function, items):
                results.append(result)
                progress.update()
            return results
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
    finally:
        progress.close()


def _sibling(out_dir: Path, tag: str) -> Path:
    """A hidden, unused name beside ``out_dir``: ``.OUT.<tag>-<random>`` (same file system: renames are atomic)."""
    out_dir = _absolute(out_dir)
    return out_dir.parent / f".{out_dir.name}.{tag}-{secrets.token_hex(4)}"


def _absolute(path: Path) -> Path:
    """``path`` made absolute with ``.`` and ``..`` resolved, so that ``OUT = .`` has a name and a parent."""
    return Path(os.path.abspath(path))


def _warn_about_leftovers(out_dir: Path) -> None:
    """Name staging folders that a killed conversion left beside ``out_dir`` (never deleted here,
    as another conversion might still be writing one)."""
    out_dir = _absolute(out_dir)
    parent = out_dir.parent
    if not parent.is_dir():
        return
    for tag in (_STAGING_TAG, _REPLACED_TAG):
        for leftover in sorted(parent.glob(f".{out_dir.name}.{tag}-*")):
            log.warning("%s was left by an interrupted conversion; delete it once no conversion is running", leftover)


@contextmanager
def _staged(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty staging folder beside ``out_dir``; on success it becomes ``out_dir``.

    On any error (or Ctrl-C) the staging folder, and any parent folders created for it, are
    removed, so ``out_dir`` and its surroundings are left as they were. An empty ``out_dir`` is
    replaced by the rename itself; a non-empty one (only with ``overwrite``, checked earlier) is
    moved aside, the new one moved in, and the old one deleted.
    """
    out_dir = _absolute(out_dir)
    parent = out_dir.parent
    created = [folder for folder in (parent, *parent.parents) if not folder.exists()]
    staging = _sibling(out_dir, _STAGING_TAG)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()  # mkdir, not mkdtemp: ordinary permissions for the folder that becomes OUT
    except OSError as error:
        for folder in created:
            with suppress(OSError):
                folder.rmdir()
        raise ConfigurationError(
            f"out_dir {out_dir}: cannot create folders there ({error.strerror}); choose a writable location"
        ) from None
    try:
        yield staging
        if out_dir.is_dir() and any(out_dir.iterdir()):
            if not overwrite:  # appeared while converting
                raise ConfigurationError(
                    f"out_dir {out_dir} was filled by another process during the conversion; nothing was written"
                )
            replaced = _sibling(out_dir, _REPLACED_TAG)
            os.rename(out_dir, replaced)
            os.rename(staging, out_dir)
            shutil.rmtree(replaced)
        else:
            os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # deepest first
            with suppress(OSError):
                folder.rmdir()
        raise


def _rel(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` where possible: short, and the same on every machine."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _wh(size: tuple[int, int]) -> str:
    """PIL's (width, height) as ``WxH``."""
    return f"{size[0]}x{size[1]}"


def _short_list(values: Sequence[object]) -> str:
    """A comma-separated list, cut after ``_MAX_LISTED`` items so messages stay readable."""
    shown = ", ".join(str(value) for value in values[:_MAX_LISTED])
    return shown + (f", ... ({len(values)} in all)" if len(values) > _MAX_LISTED else "")
