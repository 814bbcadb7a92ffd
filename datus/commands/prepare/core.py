"""The conversion core that every dataset converter shares: the output layout, the all-or-nothing
rule, and the planning and writing that keep them.

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

A dataset module (:mod:`datus.commands.prepare.suim`, ...) only finds its files, checks its headers and
decodes its masks; everything that makes a conversion safe lives here, once. Names with a
leading underscore are private to the ``datus.commands.prepare`` package: its dataset modules use them,
nothing outside it should.
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from datus.core.errors import ConfigurationError
from datus.core.io import DECODE_ERRORS, decode_reason, write_json, write_png
from datus.runfolder.run import CLASSES_FILE
from datus.core.settings import IGNORE_INDEX

log = logging.getLogger(__name__)

_SINGLE_CHANNEL_MODES = frozenset({"L", "P", "I;16", "I"})
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})

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


def _lookup(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``table[values]`` for a 256-entry table; values outside 0..255 map to ``IGNORE_INDEX``."""
    values = np.asarray(values)
    if values.dtype == np.uint8:
        return table[values]
    inside = (values >= 0) & (values < len(table))
    return np.where(inside, table[np.where(inside, values, 0)], IGNORE_INDEX).astype(np.uint8)


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
