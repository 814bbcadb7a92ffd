"""Stream images (and the paths of their masks) from a folder tree for prediction.

Two layouts: any folder of images (searched recursively), or the DatUS layout
``ROOT/<split>/images/*`` with optional ``ROOT/<split>/true_masks/<stem>.png``. Decoding and
resizing happen in the loader's worker processes, off the device's critical path. A file that
cannot be decoded does not stop the run: it travels through the batch as a skip with a reason,
and the writer lists it in ``skipped.json``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from datus.backbones import normalization_of

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
MASK_EXTENSION = ".png"

Image.MAX_IMAGE_PIXELS = 250_000_000
"""Large survey or aerial images are legitimate input; PIL's default guard stops at 89 MP."""


@dataclass(frozen=True)
class ImageEntry:
    """One input image: where it is, its stable id, and its mask if one exists."""

    path: Path
    image_id: str
    mask_path: Path | None


_UNSAFE_CHARACTERS = re.compile(r"[\x00-\x1f\\:*?\"<>|]")


def image_id_for(relative_path: Path) -> str:
    """A stable id safe as a relative file name: the relative path without its extension.

    Folders are kept (so outputs mirror the input tree); control characters and characters
    that are illegal on common file systems become ``_``; ``..`` can never appear because ids
    come from paths found under the root.
    """
    parts = [_UNSAFE_CHARACTERS.sub("_", part) for part in relative_path.with_suffix("").parts]
    parts = [part if part not in ("", ".", "..") else "_" for part in parts]
    return "/".join(parts)


def list_images(image_dir: Path, mask_dir: Path | None = None) -> list[ImageEntry]:
    """All images below ``image_dir`` in a stable (sorted) order, paired with their masks.

    Masks are paired by relative path and stem (``a/b.jpg`` <-> ``mask_dir/a/b.png``). Two
    images that differ only in extension (``a.jpg``, ``a.png``) would share an id; both then
    keep their extension in the id (``a.jpg`` -> ``a_jpg``); any id still shared (``a.jpg`` and
    ``a.JPG``) gets a number, in sorted order (``a_jpg``, ``a_jpg_2``), so ids are always unique.
    """
    paths = sorted(
        path for path in image_dir.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
    )
    relative = [path.relative_to(image_dir) for path in paths]
    ids = [image_id_for(path) for path in relative]
    counts: dict[str, int] = {}
    for image_id in ids:
        counts[image_id] = counts.get(image_id, 0) + 1
    ids = [
        f"{image_id}_{path.suffix.lstrip('.').lower()}" if counts[image_id] > 1 else image_id
        for path, image_id in zip(paths, ids)
    ]
    # a.jpg + a.JPG, or a.jpg + a.png + a_jpg.png, still collide: number the later ones.
    natural, taken = set(ids), set[str]()
    for position, image_id in enumerate(ids):
        unique, number = image_id, 2
        while unique in taken or (unique != image_id and unique in natural):
            unique, number = f"{image_id}_{number}", number + 1
        ids[position] = unique
        taken.add(unique)
    entries = []
    for path, rel, image_id in zip(paths, relative, ids):
        mask_path = None
        if mask_dir is not None:
            candidate = mask_dir / rel.with_suffix(MASK_EXTENSION)
            mask_path = candidate if candidate.is_file() else None
        entries.append(ImageEntry(path=path, image_id=image_id, mask_path=mask_path))
    return entries


def load_rgb(path: Path) -> Image.Image:
    """Open any supported image as 8-bit RGB with its EXIF orientation applied.

    16-bit greyscale is scaled to 8 bits by its full range (PIL's own conversion clips it);
    palette and alpha images are flattened; CMYK is converted.
    """
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            values = np.asarray(image, dtype=np.float64)
            scale = 65535.0 if values.max(initial=0) > 255 else 255.0
            grey = np.clip(values / scale * 255.0, 0, 255).round().astype(np.uint8)
            return Image.fromarray(grey).convert("RGB")
        if image.mode == "F":
            values = np.asarray(image, dtype=np.float64)
            low, high = values.min(initial=0), values.max(initial=1)
            grey = ((values - low) / max(high - low, 1e-12) * 255).round().astype(np.uint8)
            return Image.fromarray(grey).convert("RGB")
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA", "PA"):
            background = Image.new("RGB", image.size, (0, 0, 0))
            background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
            return background
        return image.convert("RGB")


class ImageDataset(Dataset):
    """Images resized to a square model input and normalised for the backbone.

    Each item is a dict: ``image`` (3 x S x S float), ``image_id``, ``index`` (dataset index),
    ``orig_size`` ((H, W) of the file after EXIF rotation), ``image_path`` and ``mask_path``
    ('' when there is none). Masks are not decoded here: evaluation reads them at their
    original size after clustering, so they never travel through the device batches. An
    unreadable file yields ``{"error": reason, "image_path": ..., "index": ...}`` instead.
    """

    def __init__(
        self,
        entries: Sequence[ImageEntry],
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        min_side: int,
    ) -> None:
        self.entries = list(entries)
        self.image_size = image_size
        self.mean = list(mean)
        self.std = list(std)
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.entries[index]
        try:
            image = load_rgb(entry.path)
            if min(image.size) < self.min_side:
                raise ValueError(f"image is {image.width}x{image.height}, smaller than one patch ({self.min_side} px)")
            tensor = TF.pil_to_tensor(image)
            resized = TF.resize(
                tensor, [self.image_size, self.image_size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True
            )
            normalised = TF.normalize(TF.to_dtype(resized, torch.float32, scale=True), self.mean, self.std)
        except Exception as error:  # any decoder failure becomes a listed skip, never a crash
            return {"error": f"{type(error).__name__}: {error}", "image_path": str(entry.path), "index": index}
        return {
            "image": normalised,
            "image_id": entry.image_id,
            "index": index,
            "orig_size": torch.tensor([image.height, image.width]),
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


def locate_images(root: Path, split: str | None, mask_dir: Path | None) -> tuple[Path, Path | None]:
    """The image and mask folders of ``--data.*``, checked to exist and to hold an image.

    Cheap (stops at the first image), so the CLI runs it before building the model.
    """
    root = Path(root).expanduser()
    if split is not None:
        image_dir, layout_masks = root / split / "images", root / split / "true_masks"
        mask_dir = layout_masks if layout_masks.is_dir() else None
    else:
        image_dir = root
    if not image_dir.is_dir():
        hint = f" (with --data.split {split} the images must be in ROOT/{split}/images)" if split else ""
        raise FileNotFoundError(f"--data.root: no folder {image_dir}{hint}. Point --data.root at your images.")
    if mask_dir is not None and not Path(mask_dir).is_dir():
        raise FileNotFoundError(f"--data.mask_dir: no folder {mask_dir}.")
    if not any(path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file() for path in image_dir.rglob("*")):
        raise FileNotFoundError(
            f"--data.root: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {image_dir}."
        )
    return image_dir, Path(mask_dir) if mask_dir is not None else None


class ImageFolderDataModule(L.LightningDataModule):
    """Predict-only DataModule over a folder of images.

    Args:
        root: a folder of images (recursive), or the root of a DatUS-layout dataset when
            ``split`` is given.
        split: read ``root/<split>/images`` and masks from ``root/<split>/true_masks``.
        mask_dir: masks for a plain folder, paired by relative path and stem (ignored with
            ``split``, whose layout fixes it).
        backbone: timm name; decides the normalisation (linked from ``--model.backbone``).
        image_size: side of the square model input (linked from ``--model.image_size``).
        patch_size: images smaller than one patch are skipped (linked from the model).
        batch_size: images per device batch.
        num_workers: decoding processes.
        pin_memory: pin host batches for faster copies to a GPU.
    """

    def __init__(
        self,
        root: Path,
        split: str | None = None,
        mask_dir: Path | None = None,
        backbone: str = "vit_small_patch8_224.dino",
        image_size: int = 224,
        patch_size: int = 8,
        batch_size: int = 8,
        num_workers: int = 2,
        pin_memory: bool = True,
    ) -> None:
        super().__init__()
        image_dir, mask_dir = locate_images(root, split, mask_dir)
        if batch_size < 1:
            raise ValueError(f"--data.batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"--data.num_workers must be >= 0, got {num_workers}")
        self.image_dir = image_dir
        self.mask_dir = mask_dir
        self.entries = list_images(image_dir, self.mask_dir)
        self.mean, self.std = normalization_of(backbone)
        self.image_size = image_size
        self.patch_size = patch_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self._excluded: frozenset[str] = frozenset()

    def exclude_image_ids(self, image_ids: Iterable[str]) -> None:
        """Leave out images already processed by an earlier, interrupted run (resume)."""
        self._excluded = frozenset(image_ids)

    @property
    def pending_entries(self) -> list[ImageEntry]:
        return [entry for entry in self.entries if entry.image_id not in self._excluded]

    def predict_dataloader(self) -> DataLoader:
        dataset = ImageDataset(self.pending_entries, self.image_size, self.mean, self.std, self.patch_size)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            collate_fn=collate_with_skips,
            persistent_workers=False,
        )
