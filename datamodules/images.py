"""Stream images (and the paths of their masks) from a folder tree for prediction.

Two layouts: any folder of images (searched recursively), or the DatUS layout
``ROOT/<split>/images/*`` with optional ``ROOT/<split>/true_masks/<stem>.png``. Decoding and
resizing happen in the loader's worker processes, off the device's critical path; batches
travel as uint8 (4x fewer bytes to the device than float) and the module normalises them on
the device. A file that cannot be decoded does not stop the run: it travels through the batch
as a skip with a reason, and the run lists it in ``skipped.json``.

The run's own output folder, and any other datus run folder below the root, are never read as
input: their masks and pictures are not images of the dataset.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from datus.core.errors import ConfigurationError
from datus.core.files import EXPORT_MARKER
from datus.core.io import IMAGE_EXTENSIONS, UnreadableFile, load_rgb, locate_images, paired_mask, read_json
from datus.runfolder.run import RUN_FILE, Run, image_id_for
from datus.core.tars import (
    TAR_SUFFIX, Member, digest, index_shard, is_tar_source, iter_samples, list_shards, shard_stem,
)  # fmt: skip
from datus.core.workers import available_cores

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageEntry:
    """One input image: where it is, its stable id, and its mask if one exists."""

    path: Path
    image_id: str
    mask_path: Path | None
    member: Member | None = None
    """Where the image is inside a tar shard (``path`` is then the path through the tar)."""
    mark: tuple[int, int] | None = None
    """(member size, shard modification time) of a tar member, as listed."""


def _image_files(image_dir: Path, exclude: Path | None) -> list[Path]:
    """Image files below ``image_dir``, sorted, leaving out ``exclude`` and datus's run and export folders.

    Symbolically linked folders are followed (each real folder read once, so a link back up
    cannot loop). Every name with an image suffix is listed, whatever it is: one that is not a
    readable regular file (a FIFO, a broken or looping link) is skipped with its reason when
    it is read, not dropped in silence.
    """
    excluded = exclude.resolve() if exclude is not None else None
    found, runs, shards, seen = [], [], [], set()
    for folder, subfolders, files in os.walk(image_dir, followlinks=True):
        here = Path(folder)
        try:
            status = os.stat(here)
        except OSError:
            subfolders.clear()
            continue
        if (status.st_dev, status.st_ino) in seen:  # a link to a folder already read
            subfolders.clear()
            continue
        seen.add((status.st_dev, status.st_ino))
        own_output = RUN_FILE in files and Run(here).is_datus_run() or EXPORT_MARKER in files and _is_export(here)
        if here != image_dir and (own_output or here.resolve() == excluded):
            runs.append(here)
            subfolders.clear()
            continue
        subfolders[:] = sorted(name for name in subfolders if (here / name).resolve() != excluded)  # first link wins
        found.extend(here / name for name in files if Path(name).suffix.lower() in IMAGE_EXTENSIONS)
        shards.extend(here / name for name in files if name.lower().endswith(TAR_SUFFIX))
    if shards:  # listed in the same walk: a folder of images is not walked twice
        log.warning(
            "%d tar shard(s) below %s are not read (e.g. %s): the folder holds image files; give the shards as a "
            "--data.root of their own", len(shards), image_dir, min(shards)
        )
    if runs:
        log.info("not read as input: %d datus run or export folder(s) below the data root (%s)", len(runs), runs[0])
    return sorted(found)


def _is_export(folder: Path) -> bool:
    """Whether ``folder`` holds a ``datus export`` (its images are copies of inputs: never inputs again)."""
    try:
        marker = read_json(folder / EXPORT_MARKER)
    except (OSError, UnreadableFile):
        return False
    return isinstance(marker, dict) and "datus_export" in marker


def list_images(image_dir: Path, mask_dir: Path | None = None, exclude: Path | None = None) -> list[ImageEntry]:
    """All images below ``image_dir`` in a stable (sorted) order, paired with their masks.

    Masks are paired by relative path and stem (``a/b.jpg`` <-> ``mask_dir/a/b.png``). Two
    images that differ only in extension (``a.jpg``, ``a.png``) would share an id; both then
    keep their extension in the id (``a.jpg`` -> ``a_jpg``); any id still shared (``a.jpg`` and
    ``a.JPG``) gets a number, in sorted order (``a_jpg``, ``a_jpg_2``), so ids are always unique.
    """
    paths = _image_files(image_dir, exclude)
    relative = [path.relative_to(image_dir) for path in paths]
    ids = _unique_ids(paths, [image_id_for(path) for path in relative])
    entries = []
    for path, image_id in zip(paths, ids):
        mask_path = paired_mask(path, image_dir, mask_dir) if mask_dir is not None else None
        entries.append(ImageEntry(path=path, image_id=image_id, mask_path=mask_path))
    return entries


def _unique_ids(paths: Sequence[Path], ids: list[str]) -> list[str]:
    """Make ``ids`` unique: shared ones keep their extension, then get a number (see :func:`list_images`)."""
    counts: dict[str, int] = {}
    for image_id in ids:
        counts[image_id] = counts.get(image_id, 0) + 1
    ids = [
        f"{image_id}_{path.suffix.lstrip('.').lower()}" if counts[image_id] > 1 else image_id
        for path, image_id in zip(paths, ids)
    ]
    natural, taken = set(ids), set[str]()
    for position, image_id in enumerate(ids):
        unique, number = image_id, 2
        while unique in taken or (unique != image_id and unique in natural):
            unique, number = f"{image_id}_{number}", number + 1
        ids[position] = unique
        taken.add(unique)
    return ids


def list_tar_images(base: Path, shards: Sequence[Path], mask_dir: Path | None = None) -> list[ImageEntry]:
    """Every image member of ``shards`` (as :func:`datus.core.tars.list_shards` lists a ``.tar``, a
    folder of them or a brace pattern, below ``base``), in (shard, member offset) order.

    An image is a member
    whose name ends in an image extension (``<key>.jpg``; ``<key>.seg.png`` is ground truth);
    its id is ``<shard>/<key>``: the shard's path below the base folder
    (:func:`datus.core.tars.list_shards`) without ``.tar``, then the member name without its
    extension, through :func:`image_id_for`. The shard is always part of the id, so ids never
    depend on which other shards are read, and keys repeated across shards stay apart. Masks
    pair with ``<key>.seg.png`` in the same shard, or with ``--data.mask_dir``, whose
    ``<shard>/<key>.png`` wins when given. Refused members (links, devices, names that leave
    the shard, sizes beyond the shard) and damaged shards are listed too, and skipped with
    their reason when read, as undecodable files are.
    """
    found: list[tuple[Path, str, Member, Member | None, int] | ImageEntry] = []  # an image member, or a refused shard
    for shard in shards:
        stem = shard_stem(shard, base)
        try:
            index = index_shard(shard)
        except UnreadableFile as error:
            found.append(_refused(shard, f"{stem}/~shard", f"shard {shard.name}: {error}"))
            continue
        for member, mask in iter_samples(index):
            name = member.name if not member.refused else f"_refused{len(found)}.x"
            found.append((Path(member.path), image_id_for(Path(stem) / name), member, mask, index.mtime_ns))
        if index.damaged:
            found.append(_refused(shard, f"{stem}/~damaged", f"shard {shard.name}: {index.damaged}"))
    images = [item for item in found if not isinstance(item, ImageEntry)]
    # unique over every shard: a.tar's b/x.jpg and a/b.tar's x.jpg both give a/b/x
    unique = iter(_unique_ids([item[0] for item in images], [item[1] for item in images]))
    entries: list[ImageEntry] = []
    for item in found:
        if isinstance(item, ImageEntry):
            entries.append(item)
            continue
        path, _, member, mask, mtime_ns = item
        mask_path = paired_mask(path, base, mask_dir) if mask_dir is not None else Path(mask.path) if mask is not None else None
        entries.append(ImageEntry(path, next(unique), mask_path, member, (member.size, mtime_ns)))
    return entries


def _refused(shard: Path, image_id: str, reason: str) -> ImageEntry:
    return ImageEntry(shard, image_id, None, Member(str(shard), "", 0, 0, reason), (0, 0))


class ImageDataset(Dataset):
    """Images resized to a square uint8 model input.

    Each item is a dict: ``image`` (3 x S x S uint8), ``image_id``, ``index`` (dataset index),
    ``orig_size`` ((H, W) of the file after EXIF rotation), ``image_path`` and ``mask_path``
    ('' when there is none). Masks are not decoded here: evaluation reads them at their
    original size after clustering, so they never travel through the device batches. An
    unreadable file yields ``{"error": reason, "image_path": ..., "index": ...}`` instead.
    """

    def __init__(self, entries: Sequence[ImageEntry], image_size: int, min_side: int) -> None:
        self.entries = list(entries)
        self.image_size = image_size
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.entries[index]
        try:
            if entry.member is not None:  # a member of a tar shard, read through this worker's handle
                mark = entry.mark or (entry.member.size, 0)
                image, (height, width) = load_rgb(entry.member, min_side=self.image_size)
            else:
                status = os.stat(entry.path)  # before decoding: a file replaced meanwhile is then predicted again
                mark = (status.st_size, status.st_mtime_ns)
                image, (height, width) = load_rgb(entry.path, min_side=self.image_size)
            if min(height, width) < self.min_side:
                raise UnreadableFile(f"image is {width}x{height}, smaller than one patch ({self.min_side} px)")
            resized = TF.resize(
                TF.pil_to_tensor(image),
                [self.image_size, self.image_size],
                interpolation=TF.InterpolationMode.BICUBIC,
                antialias=True,
            )
        except (UnreadableFile, OSError, ValueError, RuntimeError) as error:
            return {"error": str(error), "image_path": str(entry.path), "index": index}
        return {
            "image": resized,
            "image_id": entry.image_id,
            "index": index,
            "orig_size": torch.tensor([height, width]),
            "image_mark": torch.tensor(mark, dtype=torch.int64),
            "image_path": str(entry.path),
            "mask_path": str(entry.mask_path) if entry.mask_path else "",
        }


def collate_with_skips(items: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Stack the readable items; carry unreadable ones as ``skipped`` (path, reason) pairs."""
    good, skipped = [], []
    for item in items:
        if "error" in item:
            skipped.append({"path": item["image_path"], "reason": item["error"]})
        else:
            good.append(item)
    batch: dict[str, Any] = {"skipped": skipped}
    if good:
        batch.update(torch.utils.data.default_collate(good))
    return batch


class ImageFolderDataModule(L.LightningDataModule):
    """Predict-only DataModule over a folder of images, or over WebDataset tar shards.

    Args:
        root: a folder of images (recursive), or the root of a DatUS-layout dataset when
            ``split`` is given, or tar shards: a ``.tar``, a folder of them or a pattern like
            ``train-{0000..0099}.tar`` (README: Tar shards).
        split: read ``root/<split>/images`` and masks from ``root/<split>/true_masks``.
        mask_dir: masks for a plain folder, paired by relative path and stem (ignored with
            ``split``, whose layout fixes it).
        image_size: side of the square model input (linked from ``--model.image_size``).
        patch_size: images smaller than one patch are skipped (linked from the model).
        batch_size: images per device batch.
        num_workers: decoding processes; ``auto`` leaves one core to the main process (at most
            4); a count above the cores available is lowered to it, with a warning.
        pin_memory: pin host batches for faster copies to a GPU.
        exclude: a folder never read as input (linked from ``--output_dir``: the run's own outputs).
    """

    def __init__(
        self,
        root: Path,
        split: str | None = None,
        mask_dir: Path | None = None,
        image_size: int = 224,
        patch_size: int = 8,
        batch_size: int = 8,
        num_workers: int | Literal["auto"] = "auto",
        pin_memory: bool = True,
        exclude: Path | None = None,
    ) -> None:
        super().__init__()
        image_dir, mask_dir = locate_images(root, split, mask_dir)
        check_loader_options(batch_size, num_workers)
        self.image_dir = image_dir
        self.mask_dir = mask_dir
        self.split = split
        self.tars = is_tar_source(root)
        if self.tars:
            self.image_dir, self.shards = list_shards(root)
            self.entries = list_tar_images(self.image_dir, self.shards, self.mask_dir)
        else:
            self.entries = list_images(image_dir, self.mask_dir, Path(exclude).expanduser() if exclude else None)
        self.image_size = image_size
        self.patch_size = patch_size
        self.batch_size = batch_size
        self.num_workers = _worker_count(num_workers)
        self.pin_memory = pin_memory
        self._pending: list[ImageEntry] | None = None

    def describe(self) -> dict[str, Any]:
        """What the run is made from (recorded in ``run.json``; a resumed run must match it)."""
        described = {
            "images": str(self.image_dir.resolve()),
            "masks": str(self.mask_dir.resolve()) if self.mask_dir is not None else None,
        }
        if self.tars:  # the base folder of the shards; which shards is in inputs(), not compared
            described["input"] = "tar shards"
        return described

    def inputs(self) -> dict[str, Any] | None:
        """The tar shards a run is made from (names below the base, a digest of their sizes and times), for ``run.json``.

        Not part of the compared identity: a rerun over other shards is handled like a folder
        whose files changed (records of rewritten shards are predicted again, those of vanished
        ones leave the dataset stages).
        """
        return {"tar_shards": digest(self.shards, self.image_dir)} if self.tars else None

    def exclude_recorded(self, recorded: Mapping[str, str]) -> None:
        """Leave out images an earlier, interrupted run recorded, and keep ids unique across both runs.

        Args:
            recorded: {absolute image path: image id} of the images already in the run's shards.
                A new image whose id was given to another file in the earlier run (``a.png``
                added beside a recorded ``a.jpg``) gets a numbered id instead, so that no
                recorded image is predicted again under a new id.
        """
        taken = set(recorded.values())
        pending = []
        for entry in self.entries:
            if os.path.abspath(entry.path) in recorded:
                continue
            image_id, number = entry.image_id, 2
            while image_id in taken:
                image_id, number = f"{entry.image_id}_{number}", number + 1
            taken.add(image_id)
            pending.append(replace(entry, image_id=image_id))
        self._pending = pending

    @property
    def pending_entries(self) -> list[ImageEntry]:
        return self.entries if self._pending is None else self._pending

    def predict_dataloader(self) -> DataLoader:
        dataset = ImageDataset(self.pending_entries, self.image_size, self.patch_size)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            collate_fn=collate_with_skips,
            persistent_workers=False,
        )


def check_loader_options(batch_size: int, num_workers: int | Literal["auto"]) -> None:
    """Refuse loader options that cannot work (the CLI calls this before any model is built)."""
    if batch_size < 1:
        raise ConfigurationError(f"--data.batch_size must be >= 1, got {batch_size}")
    if num_workers != "auto" and num_workers < 0:
        raise ConfigurationError(f"--data.num_workers must be 'auto' or >= 0, got {num_workers}")


def _worker_count(requested: int | Literal["auto"]) -> int:
    cores = available_cores()
    if requested == "auto":
        return min(4, cores - 1)
    if requested > cores:
        log.warning("--data.num_workers %d is more than the %d cores available; using %d", requested, cores, cores)
        return cores
    return requested
