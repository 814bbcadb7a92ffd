"""Train a segmentation model on the pseudo masks of a finished ``datus predict`` run.

A run folder is a dataset: ``manifest.jsonl`` pairs every input image with its mask
(``masks/<id>.png``, cluster ids at the image's original size) and ``classes.json`` names the
K pseudo classes. This DataModule reads both, splits the images into train and validation
sets, and yields image/mask pairs transformed *jointly* (one random crop and flip for both),
so a label never drifts off the pixels it describes. Masks are always resized with nearest
neighbour: any other interpolation invents label ids between two neighbouring classes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from datus.core.io import UnreadableFile, load_rgb, read_label_png, read_json
from datus.outputs.manifest import Split, read_manifest_entries
from datus.runfolder.run import CLASSES_FILE, MANIFEST_FILE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PseudoPair:
    """One training example of a run: the input image and the pseudo mask painted for it."""

    image_id: str
    image: Path
    mask: Path


def read_manifest(run_dir: Path, image_root: Path | None = None) -> list[PseudoPair]:
    """The (image, mask) pairs of a run folder, sorted by image id.

    Image paths are relative to the run's input root (``dataset.json``; ``image_root`` overrides
    it when the images moved). Sorting makes the pairs independent of the order in which ranks
    wrote their shards.
    """
    pairs = [
        PseudoPair(entry.image_id, entry.image, entry.mask) for entry in read_manifest_entries(Path(run_dir), image_root)
    ]
    if not pairs:
        raise ValueError(f"{run_dir / MANIFEST_FILE} lists no images: the run predicted nothing, so there is nothing to train on.")
    return sorted(pairs, key=lambda pair: pair.image_id)


def split_pairs(
    pairs: Sequence[PseudoPair], val_fraction: float, seed: int
) -> tuple[list[PseudoPair], list[PseudoPair]]:
    """Split pairs into (train, val) by a seeded per-id hash (:class:`datus.outputs.manifest.Split`): same seed, same split.

    ``datus export`` applies the same rule while streaming. Any positive fraction keeps at least
    one validation image (a tiny run still gets a validation number), and the training set is
    never left empty.
    """
    split = Split.of((pair.image_id for pair in pairs), val_fraction, seed)
    train = [pair for pair in pairs if not split.is_val(pair.image_id)]
    val = [pair for pair in pairs if split.is_val(pair.image_id)]
    return train, val


class PseudoMaskDataset(Dataset):
    """Image/mask pairs of a run, decoded and transformed together.

    Each item is a dict: ``image`` (3 x S x S float32, normalised), ``mask`` (S x S int64
    cluster ids) and ``image_id``.

    Args:
        pairs: the examples.
        transform: a ``torchvision.transforms.v2`` transform applied to the whole item, so that
            the same random parameters reach the ``tv_tensors.Image`` and the ``tv_tensors.Mask``.
        num_classes: K; a mask value outside 0..K-1 (other than ``ignore_index``) is refused here
            rather than surfacing later as an opaque cross-entropy device assert.
        ignore_index: mask value that the loss skips.
    """

    def __init__(self, pairs: Sequence[PseudoPair], transform: v2.Transform, num_classes: int, ignore_index: int) -> None:
        self.pairs = list(pairs)
        self.transform = transform
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index]
        image, _ = load_rgb(pair.image)
        mask = read_label_png(pair.mask).astype(np.int64)
        if mask.shape != (image.height, image.width):
            raise ValueError(
                f"{pair.mask} is {mask.shape[1]}x{mask.shape[0]} but its image {pair.image} is "
                f"{image.width}x{image.height}: the image changed after `datus predict`; predict again."
            )
        invalid = (mask >= self.num_classes) & (mask != self.ignore_index)
        if invalid.any():
            raise ValueError(
                f"{pair.mask} holds label {int(mask[invalid].max())}, outside 0..{self.num_classes - 1} of "
                f"{CLASSES_FILE}; the mask belongs to another run or K."
            )
        item = self.transform(
            {"image": tv_tensors.Image(TF.pil_to_tensor(image)), "mask": tv_tensors.Mask(torch.from_numpy(mask))}
        )
        return {
            "image": item["image"].as_subclass(torch.Tensor),
            "mask": item["mask"].as_subclass(torch.Tensor),
            "image_id": pair.image_id,
        }


class PseudoMaskDataModule(L.LightningDataModule):
    """Train/val DataModule over the pseudo masks of a finished ``datus predict`` run.

    Args:
        run_dir: the ``--output_dir`` of a finished run (holds ``manifest.jsonl``, ``classes.json``
            and ``masks/``).
        image_size: side of the square training input.
        val_fraction: share of images held out for validation, in [0, 1).
        batch_size: examples per batch.
        num_workers: decoding processes per loader.
        seed: decides the train/val split, so runs with the same seed are comparable.
        augment: random resized crop (scale 0.5-1) and horizontal flip for training; without it
            training images are resized like validation images.
        mean: per-channel normalisation mean (ImageNet by default, what most backbones expect).
        std: per-channel normalisation std.
        image_root: where the input images are now, when they moved since the run (default: the
            ``image_root`` of the run's ``dataset.json``).
    """

    def __init__(
        self,
        run_dir: Path,
        image_size: int = 224,
        val_fraction: float = 0.1,
        batch_size: int = 8,
        num_workers: int = 2,
        seed: int = 0,
        augment: bool = True,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        image_root: Path | None = None,
    ) -> None:
        super().__init__()
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need one value per RGB channel, got mean={mean}, std={std}")
        self.run_dir = Path(run_dir).expanduser()
        classes_path = self.run_dir / CLASSES_FILE
        if not classes_path.is_file():
            raise FileNotFoundError(
                f"{classes_path} not found: {self.run_dir} is not a finished datus run. Run `datus predict ... "
                f"--output_dir {self.run_dir}` first."
            )
        try:
            self.classes = read_json(classes_path)
        except UnreadableFile as error:
            raise ValueError(f"{error} (or predict again into a new --output_dir)") from None
        if "num_clusters" not in self.classes:
            raise ValueError(
                f"{classes_path} has no num_clusters: it describes a ground-truth dataset (`datus prepare`), not "
                "a run. Pass the --output_dir of `datus predict` as run_dir."
            )
        self._ignore_index = int(self.classes.get("ignore_index", 255))
        if 0 <= self._ignore_index < self.num_classes:
            log.warning(
                "%s: ignore_index %d is also a cluster id (K = %d); pseudo masks have no holes, so nothing is "
                "ignored (ignore_index -100) rather than training without cluster %d.",
                classes_path, self._ignore_index, self.num_classes, self._ignore_index,
            )
            self._ignore_index = -100
        self.pairs = read_manifest(self.run_dir, image_root)
        self.train_pairs, self.val_pairs = split_pairs(self.pairs, val_fraction, seed)
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.mean = list(mean)
        self.std = list(std)
        self.train_dataset: PseudoMaskDataset | None = None
        self.val_dataset: PseudoMaskDataset | None = None

    @property
    def num_classes(self) -> int:
        """K, the number of pseudo classes (the segmentation head's output channels)."""
        return int(self.classes["num_clusters"])

    @property
    def class_names(self) -> list[str]:
        """A name per cluster: the matched ground-truth class when the run was scored, else ``cluster <i>``."""
        return list(self.classes["classes"])

    @property
    def ignore_index(self) -> int:
        """Mask value that the loss and metrics skip; never one of the K cluster ids."""
        return self._ignore_index

    def _transform(self, train: bool) -> v2.Transform:
        if train and self.augment:
            geometry = [v2.RandomResizedCrop(self.image_size, scale=(0.5, 1.0)), v2.RandomHorizontalFlip()]
        else:
            geometry = [v2.Resize((self.image_size, self.image_size))]
        return v2.Compose(
            [
                *geometry,
                v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
                v2.Normalize(self.mean, self.std),
            ]
        )

    def _dataset(self, pairs: Sequence[PseudoPair], train: bool) -> PseudoMaskDataset:
        return PseudoMaskDataset(pairs, self._transform(train), self.num_classes, self.ignore_index)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.train_dataset = self._dataset(self.train_pairs, train=True)
        if stage in ("fit", "validate"):
            self.val_dataset = self._dataset(self.val_pairs, train=False)

    def _loader(self, dataset: PseudoMaskDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("PseudoMaskDataModule: call setup('fit') or setup('validate') before asking for loaders")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)
