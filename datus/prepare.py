"""Convert publishers' raw dataset layouts into the DatUS layout that the rest of datus reads.

Output layout (the contract with the data modules and the evaluation)::

    OUT/<split>/images/<stem>.<original ext>   image files copied byte-for-byte
    OUT/<split>/true_masks/<stem>.png          single-channel uint8 class ids, 255 = ignore
    OUT/classes.json                           class names, ids, ignore index, source, problems

Images are copied, never re-encoded, so the pixels the model sees are the publisher's.
Masks are decoded once here into plain class-id PNGs, so that no other part of datus has to
know a dataset's colour code. Real annotations have quirks (off colours along borders, masks
taller than their images, stray files); every file handled specially or skipped is named in
the report, and nothing is ever resized, because resizing a label map invents labels.

All checks that can refuse a dataset run before the first file is written, so a refused
conversion leaves ``OUT`` as it was. ``classes.json`` is written last: its presence marks a
finished conversion.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from datus.io import atomic_path, write_json, write_png
from datus.run import CLASSES_FILE

IGNORE_INDEX = 255
"""Mask value that evaluation ignores."""

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
_SINGLE_CHANNEL_MODES = frozenset({"L", "P", "I;16", "I"})

_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_MAX_LISTED = 12


@dataclass
class PrepareReport:
    """What a conversion did.

    Attributes:
        dataset: Dataset name as written to ``classes.json`` (``"suim"``, ``"camvid"``).
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
    stem: str
    image: Path
    mask: Path | None
    crop_to: tuple[int, int] | None = None  # (width, height) of the image when the mask is larger


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

    Returns:
        The report; ``out_dir/classes.json`` repeats its problems.

    Raises:
        FileNotFoundError: ``raw_dir`` does not hold the SUIM layout.
        ValueError: A bad argument, a refused size mismatch, an unreadable mask mode, or two
            files that would write the same output.
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
    problems: list[str] = []
    items: list[_Item] = []
    for image_dir, mask_dir, split in splits:
        pairs = _pair_files(raw_dir, image_dir, mask_dir, split, SUIM_IMAGE_SUFFIXES, SUIM_MASK_SUFFIXES, problems)
        for item in pairs:
            items.append(_plan_suim_item(raw_dir, item, size_mismatch, problems))

    def decode(item: _Item) -> np.ndarray:
        assert item.mask is not None
        with Image.open(item.mask) as mask:
            rgb = np.asarray(mask.convert("RGB"))
        if item.crop_to is not None:
            width, height = item.crop_to
            rgb = rgb[:height, :width]
        return decode_suim_mask(rgb, classes)

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
    return _write_dataset("suim", out_dir, items, decode, metadata, problems)


def prepare_camvid(raw_dir: Path, out_dir: Path) -> PrepareReport:
    """Convert SegNet's 11-class CamVid into the DatUS layout.

    Ids 0..10 are kept; 11 (unlabelled) becomes 255 so that evaluation ignores it. Any other
    value above 10 is not a SegNet CamVid class either: it also becomes 255, and the file is
    reported with the pixel count, since it hints at a different CamVid variant.

    Args:
        raw_dir: Folder holding ``train/`` + ``trainannot/`` and optionally ``val/`` +
            ``valannot/`` and ``test/`` + ``testannot/`` (PNG frames and single-channel PNG
            annotations with the same names).
        out_dir: Destination; the split names are kept.

    Returns:
        The report; ``out_dir/classes.json`` repeats its problems.

    Raises:
        FileNotFoundError: ``raw_dir`` does not hold the SegNet CamVid layout.
        ValueError: An annotation that is not single-channel (e.g. the colour-coded 32-class
            CamVid), an annotation whose size differs from its frame, or two files that would
            write the same output.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    splits = _find_splits(
        raw_dir,
        [(raw_dir / split, raw_dir / annot, split) for split, annot in CAMVID_SPLITS.items()],
        dataset="SegNet CamVid",
        expected="train + trainannot (and optionally val + valannot, test + testannot)",
    )
    _refuse_out_inside_sources(raw_dir, out_dir, splits)
    problems: list[str] = []
    items: list[_Item] = []
    for image_dir, annot_dir, split in splits:
        for item in _pair_files(raw_dir, image_dir, annot_dir, split, CAMVID_SUFFIXES, CAMVID_SUFFIXES, problems):
            if item.mask is not None:
                _check_camvid_pair(raw_dir, item)
            items.append(item)

    def decode(item: _Item) -> np.ndarray:
        assert item.mask is not None
        with Image.open(item.mask) as annotation:
            ids = np.asarray(annotation)
        unexpected = int(np.count_nonzero(ids > CAMVID_UNLABELLED))
        if unexpected:
            values = np.unique(ids[ids > CAMVID_UNLABELLED])
            problems.append(
                f"{_rel(item.mask, raw_dir)}: {unexpected} pixels with ids outside 0..11 "
                f"({_short_list(values.tolist())}); set to {IGNORE_INDEX} (ignored)"
            )
        return np.where(ids >= CAMVID_UNLABELLED, IGNORE_INDEX, ids).astype(np.uint8)

    metadata = {
        "dataset": "camvid",
        "ignore_index": IGNORE_INDEX,
        "classes": list(CAMVID_CLASSES),
        "class_ids": list(range(len(CAMVID_CLASSES))),
        "source": str(raw_dir.absolute()),
    }
    return _write_dataset("camvid", out_dir, items, decode, metadata, problems)


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


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Validate a ``Literal`` argument for Python callers, which no type checker stops."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")


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
        raise ValueError(
            f"out_dir {out_dir} is the raw folder or inside one of its split folders; "
            f"choose a separate output folder (e.g. a sibling of {raw_dir})"
        )


def _pair_files(
    raw_dir: Path,
    image_dir: Path,
    mask_dir: Path,
    split: str,
    image_suffixes: frozenset[str],
    mask_suffixes: frozenset[str],
    problems: list[str],
) -> list[_Item]:
    """Pair images with masks by stem, reporting every file that cannot be paired.

    An image without a mask is still worth copying (pseudo masks need no ground truth); a mask
    without an image is useless and skipped. Files of other types are skipped and reported so
    that a wrong extension never silently drops data.
    """
    images = _index_by_stem(raw_dir, image_dir, image_suffixes, problems)
    masks = _index_by_stem(raw_dir, mask_dir, mask_suffixes, problems)
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
            raise ValueError(
                f"{_rel(by_stem[path.stem], raw_dir)} and {path.name} in {folder} share the stem "
                f"{path.stem!r} and would write the same output; remove or rename one of them"
            )
        by_stem[path.stem] = path
    return by_stem


def _plan_suim_item(raw_dir: Path, item: _Item, size_mismatch: str, problems: list[str]) -> _Item:
    """Check a SUIM pair's sizes (headers only) and decide whether its mask is cropped."""
    if item.mask is None:
        return item
    image_size, orientation_note = _oriented_size(item.image)
    with Image.open(item.mask) as mask:
        mask_size, mode = mask.size, mask.mode
    if mode not in ("RGB", "RGBA", "P"):
        raise ValueError(
            f"{_rel(item.mask, raw_dir)}: expected an RGB-coded SUIM mask, got image mode {mode!r}; "
            f"replace it with the published RGB mask"
        )
    if mask_size == image_size:
        return item
    sizes = f"mask {_wh(mask_size)} vs image {_wh(image_size)}{orientation_note} (width x height)"
    larger = mask_size[0] >= image_size[0] and mask_size[1] >= image_size[1]
    if not larger:
        raise ValueError(
            f"{_rel(item.mask, raw_dir)}: {sizes}; the mask is smaller than its image and masks "
            f"are never resized. Fix or remove the pair {item.stem!r} from the raw data."
        )
    if size_mismatch == "error":
        raise ValueError(
            f"{_rel(item.mask, raw_dir)}: {sizes}. Pass size_mismatch='crop' to keep the mask's "
            f"top-left {_wh(image_size)} (the published SUIM images match their masks' top rows), "
            f"or fix or remove the pair {item.stem!r}."
        )
    problems.append(f"{_rel(item.mask, raw_dir)}: {sizes}; cropped the mask to its top-left {_wh(image_size)}")
    return _Item(split=item.split, stem=item.stem, image=item.image, mask=item.mask, crop_to=image_size)


def _check_camvid_pair(raw_dir: Path, item: _Item) -> None:
    """Refuse (headers only, before writing) annotations of the wrong kind or size."""
    assert item.mask is not None
    image_size, orientation_note = _oriented_size(item.image)
    with Image.open(item.mask) as annotation:
        mask_size, mode = annotation.size, annotation.mode
    if mode not in _SINGLE_CHANNEL_MODES:
        raise ValueError(
            f"{_rel(item.mask, raw_dir)}: expected a single-channel id PNG (SegNet 11-class CamVid), "
            f"got image mode {mode!r}. Colour-coded annotations (the 32-class CamVid) are not this "
            f"format; use the SegNet version (train/ + trainannot/ ...)."
        )
    if mask_size != image_size:
        raise ValueError(
            f"{_rel(item.mask, raw_dir)}: annotation {_wh(mask_size)} vs frame {_wh(image_size)}"
            f"{orientation_note} (width x height); masks are never resized. Fix or remove the pair "
            f"{item.stem!r}."
        )


def _oriented_size(path: Path) -> tuple[tuple[int, int], str]:
    """An image's (width, height) as datus reads it (EXIF orientation applied), and a note.

    The data modules apply EXIF orientation, so that is the size a mask must match; the note
    says so in messages where it differs from the stored size.
    """
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(_EXIF_ORIENTATION)
    if orientation in _TRANSPOSING_ORIENTATIONS:
        return (height, width), f" after EXIF orientation {orientation} (stored {width}x{height})"
    return (width, height), ""


def _write_dataset(
    dataset: str,
    out_dir: Path,
    items: Sequence[_Item],
    decode: Callable[[_Item], np.ndarray],
    metadata: dict[str, object],
    problems: list[str],
) -> PrepareReport:
    """Copy images, write decoded masks, report leftovers, then write ``classes.json``.

    The old ``classes.json`` goes first so that a conversion killed midway never looks
    finished; files in ``OUT`` that this run did not write are reported, because the data
    modules would read them as part of the dataset.
    """
    (out_dir / CLASSES_FILE).unlink(missing_ok=True)
    written: set[Path] = set()
    converted = 0
    per_split: dict[str, dict[str, int]] = {}
    for item in items:
        image_out = out_dir / item.split / "images" / item.image.name
        with atomic_path(image_out) as temporary:
            shutil.copyfile(item.image, temporary)
        written.add(image_out)
        counts = per_split.setdefault(item.split, {"images": 0, "masks": 0})
        counts["images"] += 1
        if item.mask is None:
            continue
        mask_out = out_dir / item.split / "true_masks" / f"{item.stem}.png"
        write_png(mask_out, decode(item))
        written.add(mask_out)
        counts["masks"] += 1
        converted += 1
    for split in per_split:
        for folder in (out_dir / split / "images", out_dir / split / "true_masks"):
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                if path not in written:
                    problems.append(
                        f"{path}: in the output but not written by this run (left from an earlier "
                        f"one?); left in place, delete it if it does not belong"
                    )
    write_json(out_dir / CLASSES_FILE, {**metadata, "splits": per_split, "problems": problems})
    return PrepareReport(dataset=dataset, out_dir=out_dir, converted=converted, problems=problems)


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
