"""Stage 8 for a run: score pseudo masks against the ground truth that came with the images.

Each rank adds its own images to one pooled confusion matrix (a torchmetrics metric, summed
across ranks); the maths is in :mod:`datus.stages.metrics`. A mask that cannot be scored (unreadable,
wrong size, values outside the classes) is left out with a reason, never resized or clipped.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datus.outputs.drawing import save_confusion_png
from datus.core.errors import ConfigurationError
from datus.stages.classes import find_classes_file, read_classes_file
from datus.core.io import UnreadableFile, read_json, read_label_png, write_json, write_text
from datus.stages.metrics import PROTOCOLS, format_table, pixel_counts
from datus.runfolder.records import ImageRecord
from datus.runfolder.run import CONFUSION_FILE, METRICS_FILE, METRICS_TABLE, Results
from datus.core.settings import EvaluationSettings

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


def class_info(settings: EvaluationSettings, mask_path: str | None) -> ClassInfo | None:
    """Classes for scoring: the option, else the dataset's ``classes.json``; None skips scoring.

    Args:
        settings: evaluation settings.
        mask_path: any ground-truth file of the run (None when no image has one).
    """
    if mask_path is None:
        return None
    class_file = find_classes_file(Path(mask_path).parent)
    names = None
    if class_file is not None:
        try:
            names, _ = read_classes_file(class_file)
        except ConfigurationError as error:
            log.warning("ignoring %s", error)
    if settings.num_classes is not None:
        matching = names if names is not None and len(names) == settings.num_classes else None
        return ClassInfo(settings.num_classes, matching)
    if names is not None:
        return ClassInfo(len(names), names, str(class_file))
    return None


@dataclass
class PixelCounter:
    """One process's pooled (2, K + 1, C) pixel counts of checked ground truth, in numpy.

    Painting workers count with it without importing torchmetrics; :class:`Scorer` sums their
    counts. A mask that cannot be scored is left out with a reason in ``skipped``.
    """

    classes: ClassInfo
    num_clusters: int
    settings: EvaluationSettings
    skipped: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.counts = np.zeros((2, self.num_clusters + 1, self.classes.num_classes), dtype=np.int64)

    def ground_truth(self, record: ImageRecord, mask_path: Path | None) -> np.ndarray | None:
        """The record's ground truth at ``mask_path``, or None (with a listed reason when it exists but cannot be scored)."""
        if mask_path is None:
            return None
        try:
            target = read_label_png(mask_path)
        except UnreadableFile as error:
            return self._refuse(mask_path, str(error))
        if target.shape != record.orig_size:
            return self._refuse(
                mask_path,
                f"mask is {target.shape[1]}x{target.shape[0]}, image is {record.orig_size[1]}x{record.orig_size[0]}; "
                "fix the mask (datus prepare crops SUIM's tall masks) so that sizes match",
            )
        ignore, count = self.settings.ignore_index, self.classes.num_classes
        invalid = np.unique(np.concatenate([block[(block >= count) & (block != ignore)] for block in _blocks(target)]))
        if invalid.size:
            return self._refuse(
                mask_path,
                f"mask has values {invalid[:10].tolist()} >= num_classes {count} that are not the ignore index "
                f"{ignore}; map them to {ignore} or raise --eval.num_classes",
            )
        return target

    def _refuse(self, mask_path: Path, reason: str) -> None:
        self.skipped.append({"path": str(mask_path), "reason": f"not scored: {reason}"})
        log.warning("not scored: %s: %s", mask_path, reason)
        return None

    def add(self, mask: np.ndarray, target: np.ndarray, noise: np.ndarray) -> None:
        """Add one image (mask ids < K by construction, ``target`` from :meth:`ground_truth`), counted
        in blocks of rows so that a 250 MP image never needs 64-bit copies of itself."""
        for preds, truth, flags in zip(_blocks(mask), _blocks(target), _blocks(noise)):
            self.counts += pixel_counts(preds, truth, flags, self.num_clusters, self.classes.num_classes, self.settings.ignore_index)


@dataclass
class Scorer:
    """The pooled confusion matrix of a run's masks, summed over workers and ranks; writes the metric files."""

    classes: ClassInfo
    num_clusters: int
    settings: EvaluationSettings
    device: torch.device
    skipped: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        from datus.stages.metric import MatchedSegmentationMetric  # torchmetrics: the main process only

        try:
            metric = MatchedSegmentationMetric(self.num_clusters, self.classes.num_classes, self.settings.ignore_index)
        except ValueError as error:
            raise ConfigurationError(f"--eval.ignore_index: {error}") from error
        self.metric = metric.to(self.device)

    def add_counts(self, counter: PixelCounter) -> None:
        """Add a :class:`PixelCounter`'s counts and the masks it left out."""
        self.metric.update(counts=torch.from_numpy(counter.counts))
        self.skipped += counter.skipped

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


_SCORES = ("miou", "pixel_accuracy", "mean_f1", "mean_accuracy", "nmi", "ari")
_PER_CLASS_SCORES = ("per_class_iou", "per_class_accuracy", "per_class_f1")


def read_metrics(path: Path, num_clusters: int | None = None) -> dict[str, Any] | None:
    """``metrics.json`` as :meth:`Scorer.write` wrote it, or None when absent, for another K or not sound.

    The file is read back to skip scoring again and to draw the report; a damaged or edited one is
    treated as absent (scored again, left off the report), never trusted to index tables.
    """
    try:
        metrics = read_json(path) if path.is_file() else None
    except UnreadableFile:
        return None
    if not _sound_metrics(metrics):
        return None
    return metrics if num_clusters is None or metrics["num_clusters"] == num_clusters else None


def _sound_metrics(metrics: Any) -> bool:
    """Whether every value that the console table, the report and a rerun read has its written type."""
    if not isinstance(metrics, dict) or not all(_count(metrics.get(key)) for key in ("num_clusters", "num_classes")):
        return False
    clusters, classes = metrics["num_clusters"], metrics["num_classes"]
    protocols = metrics.get("protocols")
    plain = metrics.get("without_crf") or {name: {"miou": None} for name in PROTOCOLS}
    names = metrics.get("class_names")
    return (
        isinstance(protocols, dict)
        and set(protocols) == set(PROTOCOLS)
        and all(_sound_protocol(protocol, clusters, classes) for protocol in protocols.values())
        and isinstance(plain, dict)
        and set(plain) == set(PROTOCOLS)
        and all(isinstance(protocol, dict) and _score(protocol.get("miou")) for protocol in plain.values())
        and isinstance(metrics.get("crf") or {}, dict)
        and (names is None or (isinstance(names, list) and len(names) == classes and all(isinstance(n, str) for n in names)))
    )


def _sound_protocol(protocol: Any, clusters: int, classes: int) -> bool:
    if not isinstance(protocol, dict) or not _count(protocol.get("num_pixels"), minimum=0):
        return False
    mapping = protocol.get("mapping")
    return (
        all(_score(protocol.get(key)) for key in _SCORES)
        and all(
            isinstance(protocol.get(key), list) and len(protocol[key]) == classes and all(map(_score, protocol[key]))
            for key in _PER_CLASS_SCORES
        )
        and isinstance(mapping, dict)
        and set(mapping) == {str(cluster) for cluster in range(clusters)}
        and all(matched is None or (_count(matched, minimum=0) and matched < classes) for matched in mapping.values())
    )


def _count(value: Any, minimum: int = 1) -> bool:
    return type(value) is int and value >= minimum


def _score(value: Any) -> bool:
    return value is None or (type(value) in (int, float) and math.isfinite(value))
