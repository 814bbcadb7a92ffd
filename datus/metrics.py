"""Unsupervised segmentation metrics: one pooled confusion matrix, Hungarian matching, two protocols.

Cluster ids carry no meaning of their own, so a prediction is scored after matching clusters to
classes one-to-one (Hungarian matching on the pooled cluster x class confusion matrix). Scores are
computed from the dataset-level matrix, never averaged over images: a per-image mean would let
small images weigh as much as large ones and would re-match clusters per image.

Two protocols are always reported side by side (see DESIGN.md, section 2, stage 8):

- ``dense`` is the honest number: every labelled pixel counts, pixels without a prediction and
  pixels of clusters left unmatched (K > C) are errors.
- ``paper`` reproduces what the DatUS code measured: noise-segment pixels, pixels without a
  prediction and pixels of unmatched clusters are all left out, which inflates the scores.

The maths lives in plain numpy functions (:func:`match_clusters`, :func:`protocol_scores`,
:func:`protocol_report`) so that it can be tested and reused without torchmetrics; the
:class:`MatchedSegmentationMetric` only accumulates counts and syncs them across processes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchmetrics
from PIL import Image, ImageDraw, ImageFont
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from datus.io import atomic_path

PROTOCOLS = ("dense", "paper")

_MAX_LISTED_VALUES = 10


def match_clusters(confusion: np.ndarray) -> np.ndarray:
    """Match clusters to classes one-to-one so that the matched pixel count is maximal.

    Rectangular matrices are allowed: with K > C some clusters stay unmatched, with K < C some
    classes do. The matching is deterministic for a given matrix, so both protocols and repeated
    evaluations agree.

    Args:
        confusion: K x C pixel counts, rows = predicted clusters, columns = true classes.

    Returns:
        An int64 array of length K: the class matched to each cluster, or -1 if unmatched.
    """
    confusion = np.asarray(confusion)
    if confusion.ndim != 2:
        raise ValueError(f"confusion must be a K x C matrix, got shape {confusion.shape}")
    mapping = np.full(confusion.shape[0], -1, dtype=np.int64)
    if confusion.size == 0:
        return mapping
    rows, cols = linear_sum_assignment(confusion.astype(np.float64), maximize=True)
    mapping[rows] = cols
    return mapping


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> list[float | None]:
    """Element-wise ratio as Python floats, ``None`` where the denominator is zero."""
    return [
        float(n) / float(d) if d > 0 else None
        for n, d in zip(numerator.tolist(), denominator.tolist(), strict=True)
    ]


def _mean(values: list[float | None]) -> float | None:
    """Mean over the defined entries, so that classes that never occur do not count as zeros."""
    defined = [value for value in values if value is not None]
    return float(sum(defined) / len(defined)) if defined else None


def protocol_scores(
    confusion: np.ndarray,
    mapping: np.ndarray,
    extra_errors_per_class: np.ndarray | None = None,
) -> dict[str, Any]:
    """Per-class and summary scores of a matched confusion matrix.

    Every pixel in ``confusion`` counts: a pixel of an unmatched cluster is a false negative of its
    true class (and a false positive of no class, since the cluster predicts no class). A protocol
    that must ignore such pixels zeroes those rows before calling this.

    Args:
        confusion: K x C pixel counts (rows = clusters, columns = classes).
        mapping: length-K class per cluster, -1 for unmatched clusters (see :func:`match_clusters`).
        extra_errors_per_class: length-C counts of further pixels of each class that no cluster
            predicts (e.g. "no prediction" pixels); they are false negatives.

    Returns:
        ``miou``, ``pixel_accuracy``, ``mean_f1``, ``mean_accuracy``, the per-class lists
        ``per_class_iou``/``per_class_accuracy``/``per_class_f1`` (``None`` where the class is
        absent from both ground truth and prediction, or for accuracy absent from ground truth)
        and ``num_pixels``.
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    mapping = np.asarray(mapping, dtype=np.int64)
    num_clusters, num_classes = confusion.shape
    if mapping.shape != (num_clusters,):
        raise ValueError(f"mapping must have one entry per cluster ({num_clusters}), got {mapping.shape}")
    extra = (
        np.zeros(num_classes, dtype=np.int64)
        if extra_errors_per_class is None
        else np.asarray(extra_errors_per_class, dtype=np.int64)
    )
    if extra.shape != (num_classes,):
        raise ValueError(f"extra_errors_per_class must have {num_classes} entries, got {extra.shape}")

    matched = mapping >= 0
    # Rows of matched clusters, re-indexed by the class they predict: predicted[c] = pixels
    # predicted as class c, split by their true class.
    predicted = np.zeros((num_classes, num_classes), dtype=np.int64)
    predicted[mapping[matched]] = confusion[matched]
    true_positives = np.diagonal(predicted).copy()
    false_positives = predicted.sum(axis=1) - true_positives
    false_negatives = confusion.sum(axis=0) + extra - true_positives

    iou = _ratio(true_positives, true_positives + false_positives + false_negatives)
    accuracy = _ratio(true_positives, true_positives + false_negatives)
    f1 = _ratio(2 * true_positives, 2 * true_positives + false_positives + false_negatives)
    num_pixels = int(confusion.sum() + extra.sum())
    return {
        "miou": _mean(iou),
        "pixel_accuracy": float(true_positives.sum()) / num_pixels if num_pixels > 0 else None,
        "mean_f1": _mean(f1),
        "mean_accuracy": _mean(accuracy),
        "per_class_iou": iou,
        "per_class_accuracy": accuracy,
        "per_class_f1": f1,
        "num_pixels": num_pixels,
    }


def protocol_report(confusion: np.ndarray, no_prediction: np.ndarray | None, drop_unmatched: bool) -> dict[str, Any]:
    """Match one protocol's K x C matrix and score it, in the layout of ``metrics.json``.

    Args:
        confusion: the protocol's K x C matrix before matching.
        no_prediction: length-C counts of pixels without a prediction, counted as errors; ``None``
            when the protocol leaves them out.
        drop_unmatched: leave the pixels of unmatched clusters out (paper) instead of counting
            them as false negatives (dense).

    Returns:
        The :func:`protocol_scores` dict plus ``mapping`` (``{"<cluster>": class or None}``) and
        ``confusion`` (the matrix before matching, as nested lists of ints).
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    mapping = match_clusters(confusion)
    scored = confusion.copy()
    if drop_unmatched:
        scored[mapping < 0] = 0
    report = protocol_scores(scored, mapping, no_prediction)
    report["mapping"] = {str(cluster): (int(c) if c >= 0 else None) for cluster, c in enumerate(mapping.tolist())}
    report["confusion"] = confusion.tolist()
    return report


def metrics_from_confusion(confusion: np.ndarray) -> dict[str, Any]:
    """Both protocols from the accumulated (2, K + 1, C) counts of :class:`MatchedSegmentationMetric`.

    Args:
        confusion: axis 0 = (regular pixel, noise pixel), rows 0..K-1 = clusters, row K = "no
            prediction", columns = true classes.

    Returns:
        ``{"num_clusters", "num_classes", "num_pixels", "protocols": {"dense": ..., "paper": ...}}``.
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    if confusion.ndim != 3 or confusion.shape[0] != 2 or confusion.shape[1] < 2:
        raise ValueError(f"expected counts of shape (2, K + 1, C), got {confusion.shape}")
    num_clusters = confusion.shape[1] - 1
    num_classes = confusion.shape[2]
    regular, noise = confusion[0], confusion[1]
    everything = regular + noise
    dense = protocol_report(everything[:num_clusters], everything[num_clusters], drop_unmatched=False)
    paper = protocol_report(regular[:num_clusters], None, drop_unmatched=True)
    return {
        "num_clusters": num_clusters,
        "num_classes": num_classes,
        "num_pixels": dense["num_pixels"],
        "protocols": {"dense": dense, "paper": paper},
    }


class MatchedSegmentationMetric(torchmetrics.Metric):
    """Unsupervised segmentation quality: one pooled confusion matrix, Hungarian matching, two protocols.

    The only state is a (2, K + 1, C) int64 count tensor summed across processes, so DDP ranks that
    saw different numbers of images still combine exactly, and the matching runs once on the
    pooled counts (matching per rank or per batch would give different, wrong mappings).

    Args:
        num_clusters: K, the number of predicted cluster ids (values in [0, K)).
        num_classes: C, the number of ground-truth classes (values in [0, C)).
        ignore_index: in targets, pixels to leave out; in predictions, "no prediction". It must lie
            outside both [0, K) and [0, C) so that it cannot be mistaken for an id.
        **kwargs: forwarded to :class:`torchmetrics.Metric` (e.g. ``sync_on_compute``).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    confusion: Tensor

    def __init__(self, num_clusters: int, num_classes: int, ignore_index: int = 255, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if int(num_clusters) < 1:
            raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= int(ignore_index) < max(int(num_clusters), int(num_classes)):
            raise ValueError(
                f"ignore_index={ignore_index} collides with the ids in [0, "
                f"{max(num_clusters, num_classes)}) (num_clusters={num_clusters}, "
                f"num_classes={num_classes}); pick an ignore_index outside that range, e.g. -1 or 65535."
            )
        self.num_clusters = int(num_clusters)
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.add_state(
            "confusion",
            default=torch.zeros(2, self.num_clusters + 1, self.num_classes, dtype=torch.int64),
            dist_reduce_fx="sum",
        )

    def update(self, preds: Tensor, target: Tensor, noise: Tensor | None = None) -> None:
        """Add one batch of pixels to the pooled counts.

        Args:
            preds: integer cluster ids in [0, K), or ``ignore_index`` for "no prediction".
            target: integer class ids in [0, C), or ``ignore_index`` for pixels to leave out.
            noise: optional boolean mask of pixels that belong to noise segments (excluded by the
                paper protocol only).

        Raises:
            ValueError: on mismatched shapes or ids out of range (silently clipping or dropping
                them would hide a wrong ``num_classes``/``num_clusters`` or an unmapped label).
            TypeError: on non-integer ``preds``/``target``.
        """
        if preds.shape != target.shape:
            raise ValueError(
                f"preds and target must have the same shape, got preds {tuple(preds.shape)} and "
                f"target {tuple(target.shape)}"
            )
        if noise is not None and noise.shape != target.shape:
            raise ValueError(
                f"noise must have the shape of target, got noise {tuple(noise.shape)} and target "
                f"{tuple(target.shape)}"
            )
        for name, tensor in (("preds", preds), ("target", target)):
            if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
                raise TypeError(f"{name} must hold integer ids, got dtype {tensor.dtype}")

        device = self.confusion.device
        preds = preds.reshape(-1).to(device=device, dtype=torch.int64)
        target = target.reshape(-1).to(device=device, dtype=torch.int64)
        self._check_range("target", target, self.num_classes, "num_classes")
        self._check_range("preds", preds, self.num_clusters, "num_clusters")

        keep = target != self.ignore_index
        target = target[keep]
        rows = preds[keep]
        rows = torch.where(rows == self.ignore_index, torch.full_like(rows, self.num_clusters), rows)
        index = rows * self.num_classes + target
        if noise is not None:
            is_noise = noise.reshape(-1).to(device=device)[keep] != 0
            index = index + is_noise.to(torch.int64) * ((self.num_clusters + 1) * self.num_classes)
        counts = torch.bincount(index, minlength=self.confusion.numel())
        self.confusion += counts.reshape(self.confusion.shape)

    def _check_range(self, name: str, values: Tensor, upper: int, argument: str) -> None:
        """Raise if ``values`` holds ids outside [0, upper) other than the ignore index."""
        bad = ((values < 0) | (values >= upper)) & (values != self.ignore_index)
        if bool(bad.any()):
            found = torch.unique(values[bad]).tolist()
            shown = ", ".join(str(value) for value in found[:_MAX_LISTED_VALUES])
            more = f" and {len(found) - _MAX_LISTED_VALUES} more" if len(found) > _MAX_LISTED_VALUES else ""
            raise ValueError(
                f"{name} holds values {shown}{more} outside [0, {upper}) ({argument}={upper}); "
                f"map them to the ignore index ({self.ignore_index}) or raise {argument}."
            )

    def compute(self) -> dict[str, Any]:
        """Match and score both protocols on the pooled counts.

        Returns:
            See :func:`metrics_from_confusion`.
        """
        return metrics_from_confusion(self.confusion.detach().cpu().numpy())

    def expanded(self, num_clusters: int) -> MatchedSegmentationMetric:
        """A copy with room for more clusters that keeps the counts accumulated so far.

        This lets a single streaming pass over prediction files discover K as it goes instead of
        reading every file twice.
        """
        if num_clusters < self.num_clusters:
            raise ValueError(f"cannot shrink from {self.num_clusters} to {num_clusters} clusters")
        grown = MatchedSegmentationMetric(num_clusters, self.num_classes, self.ignore_index)
        grown = grown.to(self.confusion.device)
        grown.confusion[:, : self.num_clusters] = self.confusion[:, : self.num_clusters]
        grown.confusion[:, num_clusters] = self.confusion[:, self.num_clusters]
        return grown


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.2f}"


def format_table(metrics: dict[str, Any], class_names: Sequence[str] | None = None) -> str:
    """Render both protocols as a plain-text table for logs and terminals.

    Args:
        metrics: the dict returned by :meth:`MatchedSegmentationMetric.compute`.
        class_names: optional names of the C classes; class ids are used otherwise.

    Returns:
        One row per class with IoU/accuracy/F1 (percent) of the dense and paper protocols side by
        side, then one summary line per protocol.
    """
    num_classes = int(metrics["num_classes"])
    names = [str(name) for name in class_names] if class_names is not None else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} entries but the metrics have {num_classes} classes")
    dense, paper = metrics["protocols"]["dense"], metrics["protocols"]["paper"]
    name_width = max([len("class"), *(len(name) for name in names)])
    column = 7

    def block(protocol: dict[str, Any], c: int) -> str:
        values = (protocol["per_class_iou"][c], protocol["per_class_accuracy"][c], protocol["per_class_f1"][c])
        return " ".join(_percent(value).rjust(column) for value in values)

    headings = " ".join(heading.rjust(column) for heading in ("IoU", "acc", "F1"))
    group_width = 3 * column + 2
    lines = [
        f"{'':{name_width}}   {'dense'.center(group_width)} | {'paper'.center(group_width)}",
        f"{'class':{name_width}}   {headings} | {headings}",
        "-" * (name_width + 3 + 2 * group_width + 3),
    ]
    for c, name in enumerate(names):
        lines.append(f"{name:{name_width}}   {block(dense, c)} | {block(paper, c)}")
    lines.append("-" * (name_width + 3 + 2 * group_width + 3))
    for label, protocol in (("dense", dense), ("paper", paper)):
        lines.append(
            f"{label}: mIoU {_percent(protocol['miou'])}  pixel acc {_percent(protocol['pixel_accuracy'])}  "
            f"mean F1 {_percent(protocol['mean_f1'])}  mean acc {_percent(protocol['mean_accuracy'])}  "
            f"({protocol['num_pixels']} pixels)"
        )
    lines.append(f"K = {metrics['num_clusters']} clusters, C = {num_classes} classes")
    return "\n".join(lines) + "\n"


def _mapping_array(mapping: Mapping[str, int | None] | Sequence[int] | np.ndarray, num_clusters: int) -> np.ndarray:
    """Normalise a mapping given as the JSON dict or as an array to a length-K array (-1 = unmatched)."""
    if isinstance(mapping, Mapping):
        array = np.full(num_clusters, -1, dtype=np.int64)
        for cluster, c in mapping.items():
            array[int(cluster)] = -1 if c is None else int(c)
        return array
    array = np.asarray(mapping, dtype=np.int64)
    if array.shape != (num_clusters,):
        raise ValueError(f"mapping must have one entry per cluster ({num_clusters}), got shape {array.shape}")
    return array


# Anchors of the viridis colour map: perceptually ordered and readable in greyscale print.
_COLOUR_ANCHORS = np.array(
    [
        [68, 1, 84],
        [72, 40, 120],
        [62, 74, 137],
        [49, 104, 142],
        [38, 130, 142],
        [31, 158, 137],
        [53, 183, 121],
        [109, 205, 89],
        [180, 222, 44],
        [253, 231, 37],
    ],
    dtype=np.float64,
)


def _heat_colours(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 colours (viridis, linearly interpolated)."""
    positions = np.linspace(0.0, 1.0, len(_COLOUR_ANCHORS))
    flat = np.clip(values, 0.0, 1.0).reshape(-1)
    channels = [np.interp(flat, positions, _COLOUR_ANCHORS[:, i]) for i in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8).reshape(*values.shape, 3)


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return int(right - left), int(bottom - top)


def save_confusion_png(
    confusion: np.ndarray,
    mapping: Mapping[str, int | None] | Sequence[int] | np.ndarray,
    path: Path,
    class_names: Sequence[str] | None = None,
    cell_size: int = 28,
) -> None:
    """Draw a cluster x class confusion matrix as a PNG heat map.

    Rows are reordered so that the cluster matched to class c sits in row c (the matched cells form
    the diagonal and are outlined); unmatched clusters follow, marked with ``*``. Each row is
    normalised to sum to 1, because clusters differ in size by orders of magnitude and raw counts
    would show only the biggest ones. Cells show the row percentage when it is at least 1.

    Args:
        confusion: K x C pixel counts (rows = clusters, columns = classes).
        mapping: class per cluster (-1/None = unmatched), as an array or the ``metrics.json`` dict.
        path: destination PNG, written atomically.
        class_names: optional names for the column labels; class ids are used otherwise.
        cell_size: side of one cell in pixels (at least 24 so that labels stay legible).
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    if confusion.ndim != 2:
        raise ValueError(f"confusion must be a K x C matrix, got shape {confusion.shape}")
    num_clusters, num_classes = confusion.shape
    matched = _mapping_array(mapping, num_clusters)
    names = [str(name) for name in class_names] if class_names is not None else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} entries but the matrix has {num_classes} columns")
    cell = max(24, int(cell_size))

    by_class = {int(c): k for k, c in enumerate(matched.tolist()) if c >= 0}
    order = [by_class[c] for c in range(num_classes) if c in by_class]
    order += [k for k in range(num_clusters) if matched[k] < 0]
    rows = confusion[order].astype(np.float64)
    totals = rows.sum(axis=1, keepdims=True)
    normalised = np.divide(rows, totals, out=np.zeros_like(rows), where=totals > 0)

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    row_labels = [f"cluster {k}" + ("" if matched[k] >= 0 else " *") for k in order]
    label_width = max(_text_size(measure, text, font)[0] for text in [*row_labels, "clusters"]) + 12
    column_label_height = max(_text_size(measure, name, font)[0] for name in [*names, "classes"]) + 12
    title = "rows: clusters (row-normalised %), columns: classes; outlined = matched, * = unmatched"
    title_height = _text_size(measure, title, font)[1] + 12
    legend_height = cell + 16
    grid_width, grid_height = num_classes * cell, num_clusters * cell
    width = max(label_width + grid_width + 8, _text_size(measure, title, font)[0] + 16, label_width + 200)
    height = title_height + column_label_height + grid_height + legend_height + 8
    origin_x, origin_y = label_width, title_height + column_label_height

    image = Image.new("RGB", (width, height), (255, 255, 255))
    colours = _heat_colours(normalised)
    cells = np.repeat(np.repeat(colours, cell, axis=0), cell, axis=1)
    image.paste(Image.fromarray(cells), (origin_x, origin_y))
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), title, fill=(0, 0, 0), font=font)

    for c, name in enumerate(names):
        text_width, text_height = _text_size(draw, name, font)
        label = Image.new("RGB", (text_width + 4, text_height + 6), (255, 255, 255))
        ImageDraw.Draw(label).text((2, 1), name, fill=(0, 0, 0), font=font)
        label = label.rotate(90, expand=True)
        x = origin_x + c * cell + (cell - label.width) // 2
        image.paste(label, (x, origin_y - label.height - 4))
    for r, text in enumerate(row_labels):
        text_width, text_height = _text_size(draw, text, font)
        position = (label_width - text_width - 6, origin_y + r * cell + (cell - text_height) // 2 - 1)
        draw.text(position, text, fill=(0, 0, 0), font=font)

    for r in range(num_clusters):
        for c in range(num_classes):
            share = normalised[r, c]
            x, y = origin_x + c * cell, origin_y + r * cell
            if share >= 0.01:
                text = f"{100 * share:.0f}"
                text_width, text_height = _text_size(draw, text, font)
                ink = (0, 0, 0) if share > 0.6 else (255, 255, 255)
                draw.text((x + (cell - text_width) // 2, y + (cell - text_height) // 2 - 1), text, fill=ink, font=font)
            if matched[order[r]] == c:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], outline=(230, 30, 30), width=2)
    draw.rectangle([origin_x - 1, origin_y - 1, origin_x + grid_width, origin_y + grid_height], outline=(0, 0, 0))

    bar_y = origin_y + grid_height + 8
    bar_width = 160
    gradient = _heat_colours(np.linspace(0.0, 1.0, bar_width)[None, :].repeat(cell // 2, axis=0))
    image.paste(Image.fromarray(gradient), (origin_x + 28, bar_y))
    draw.text((origin_x, bar_y), "0%", fill=(0, 0, 0), font=font)
    draw.text((origin_x + 32 + bar_width, bar_y), "100%", fill=(0, 0, 0), font=font)

    with atomic_path(Path(path)) as temporary:
        image.save(temporary, format="PNG")
