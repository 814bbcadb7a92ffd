"""Stage 8 for a run: score pseudo masks against the ground truth that came with the images.

Each rank adds its own images to one pooled confusion matrix (a torchmetrics metric, summed
across ranks); the maths is in :mod:`datus.metrics`. A mask that cannot be scored (unreadable,
wrong size, values outside the classes) is left out with a reason, never resized or clipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datus.drawing import save_confusion_png
from datus.errors import ConfigurationError
from datus.io import UnreadableFile, read_json, read_label_png, write_json, write_text
from datus.metrics import MatchedSegmentationMetric, format_table, pixel_counts
from datus.records import ImageRecord
from datus.run import CLASSES_FILE, CONFUSION_FILE, METRICS_FILE, METRICS_TABLE, Results
from datus.settings import EvaluationSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassInfo:
    """The ground truth's classes: how many, their names (if known), where they were read."""

    num_classes: int
    names: list[str] | None = None
    source: str = "--eval.num_classes"


BLOCK_PIXELS = 1 << 22
"""Pixels scored at once (about 4 MP: a few tens of MB of 64-bit temporaries)."""


def _blocks(array: np.ndarray) -> list[np.ndarray]:
    """Row blocks of an H x W array holding about :data:`BLOCK_PIXELS` pixels each (views, no copies)."""
    rows = max(1, BLOCK_PIXELS // max(array.shape[1], 1))
    return [array[start : start + rows] for start in range(0, array.shape[0], rows)]


def find_class_file(mask_path: str | Path) -> Path | None:
    """``classes.json`` of a DatUS-layout dataset, at most three folders above a mask."""
    for folder in list(Path(mask_path).parents)[:4]:
        if (folder / CLASSES_FILE).is_file():
            return folder / CLASSES_FILE
    return None


def class_info(settings: EvaluationSettings, mask_path: str | None) -> ClassInfo | None:
    """Classes for scoring: the option, else the dataset's ``classes.json``; None skips scoring.

    Args:
        settings: evaluation settings.
        mask_path: any ground-truth file of the run (None when no image has one).
    """
    if mask_path is None:
        return None
    class_file = find_class_file(mask_path)
    names = None
    if class_file is not None:
        try:
            described = read_json(class_file)
            names = [str(name) for name in described["classes"]]
        except (UnreadableFile, KeyError, TypeError) as error:
            log.warning("ignoring %s: %s", class_file, error)
    if settings.num_classes is not None:
        matching = names if names is not None and len(names) == settings.num_classes else None
        return ClassInfo(settings.num_classes, matching)
    if names is not None:
        return ClassInfo(len(names), names, str(class_file))
    return None


@dataclass
class Scorer:
    """Accumulates the pooled confusion matrix of a run's masks and writes the metric files."""

    classes: ClassInfo
    num_clusters: int
    settings: EvaluationSettings
    device: torch.device
    skipped: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        try:
            metric = MatchedSegmentationMetric(self.num_clusters, self.classes.num_classes, self.settings.ignore_index)
        except ValueError as error:
            raise ConfigurationError(f"--eval.ignore_index: {error}") from error
        self.metric = metric.to(self.device)

    def ground_truth(self, record: ImageRecord) -> np.ndarray | None:
        """The record's mask, or None (with a listed reason when it exists but cannot be scored)."""
        if not record.mask_path:
            return None
        try:
            target = read_label_png(Path(record.mask_path))
        except UnreadableFile as error:
            return self._refuse(record, str(error))
        if target.shape != record.orig_size:
            return self._refuse(
                record,
                f"mask is {target.shape[1]}x{target.shape[0]}, image is {record.orig_size[1]}x{record.orig_size[0]}; "
                "fix the mask (datus prepare crops SUIM's tall masks) so that sizes match",
            )
        ignore, count = self.settings.ignore_index, self.classes.num_classes
        invalid = np.unique(np.concatenate([block[(block >= count) & (block != ignore)] for block in _blocks(target)]))
        if invalid.size:
            return self._refuse(
                record,
                f"mask has values {invalid[:10].tolist()} >= num_classes {count} that are not the ignore index "
                f"{ignore}; map them to {ignore} or raise --eval.num_classes",
            )
        return target

    def _refuse(self, record: ImageRecord, reason: str) -> None:
        self.skipped.append({"path": record.mask_path, "reason": f"not scored: {reason}"})
        log.warning("not scored: %s: %s", record.mask_path, reason)
        return None

    def add(self, mask: np.ndarray, target: np.ndarray, noise: np.ndarray) -> None:
        """Add one image (mask ids < K by construction, ``target`` from :meth:`ground_truth`), counted
        with numpy in blocks of rows so that a 250 MP image never needs 64-bit copies of itself."""
        total = sum(
            pixel_counts(preds, truth, flags, self.num_clusters, self.classes.num_classes, self.settings.ignore_index)
            for preds, truth, flags in zip(_blocks(mask), _blocks(target), _blocks(noise))
        )
        self.metric.update(counts=torch.from_numpy(total))

    def compute(self) -> dict[str, Any]:
        """Both protocols on the counts of every rank (a collective: every rank calls it)."""
        return self.metric.compute()

    def write(self, results: Results, metrics: dict[str, Any], num_images: int) -> None:
        """``metrics.json``, ``metrics.txt`` and ``confusion.png`` (rank 0)."""
        metrics["num_images"] = num_images
        metrics["mapping"] = metrics["protocols"]["dense"]["mapping"]
        metrics["class_names"] = self.classes.names
        write_json(results.file(METRICS_FILE), metrics)
        dense = metrics["protocols"]["dense"]
        save_confusion_png(np.asarray(dense["confusion"]), dense["mapping"], results.file(CONFUSION_FILE), self.classes.names)
        write_text(results.file(METRICS_TABLE), format_table(metrics, self.classes.names))
