"""Unsupervised segmentation metrics: one pooled confusion matrix, Hungarian matching, two protocols.

Cluster ids carry no meaning of their own, so a prediction is scored after matching clusters to
classes one-to-one (Hungarian matching on the pooled cluster x class confusion matrix). Scores are
computed from the dataset-level matrix, never averaged over images: a per-image mean would let
small images weigh as much as large ones and would re-match clusters per image.

Three protocols are always reported side by side (README, "Evaluation protocols"):

- ``dense`` is the honest number: every labelled pixel counts, pixels without a prediction and
  pixels of clusters left unmatched (K > C) are errors.
- ``paper`` reproduces what the DatUS code measured: noise-segment pixels, pixels without a
  prediction and pixels of unmatched clusters are all left out, which inflates the scores.
- ``stego`` reproduces STEGO's ``UnsupervisedMetrics`` (its ``src/utils.py``), which HP, CAUSE,
  EAGLE and PriMaPs inherit: pixels predicted as a cluster id >= C are dropped before the
  matrix is built (so with K > C whole clusters vanish, whichever they are), Hungarian matching
  on the remaining C x C matrix, mIoU the mean over classes with a defined IoU, accuracy over
  the kept pixels. With K = C it equals ``dense``.

The maths lives here in plain numpy functions (:func:`match_clusters`, :func:`protocol_scores`,
:func:`protocol_report`, :func:`agreement_scores`, :func:`pixel_counts`), so that it is tested
and reused without torchmetrics (painting workers count pixels without importing it);
:class:`datus.stages.metric.MatchedSegmentationMetric` only accumulates counts and syncs them across
processes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

PROTOCOLS = ("dense", "paper", "stego")
"""The protocols every scoring reports, in this order (module docstring; README, "Evaluation protocols")."""


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


def agreement_scores(contingency: np.ndarray) -> dict[str, float | None]:
    """Normalised mutual information and adjusted Rand index of a cluster x class contingency table.

    Matching-free companions of mIoU, computed from the pooled pixel counts exactly as
    scikit-learn's ``normalized_mutual_info_score`` (arithmetic mean of the entropies) and
    ``adjusted_rand_score`` compute them from the pixel labels. Pair counts use Python
    integers: with 1e10 pixels they exceed int64.

    Args:
        contingency: rows = predicted labels, columns = true labels, pixel counts.

    Returns:
        ``{"nmi", "ari"}``, None when there are no pixels.
    """
    table = np.asarray(contingency, dtype=np.int64)
    table = table[table.sum(axis=1) > 0][:, table.sum(axis=0) > 0]
    total = int(table.sum())
    if total == 0:
        return {"nmi": None, "ari": None}
    rows, cols = table.sum(axis=1), table.sum(axis=0)
    if len(rows) == len(cols) == 1:
        return {"nmi": 1.0, "ari": 1.0}

    def entropy(counts: np.ndarray) -> float:
        share = counts[counts > 0] / total
        return float(-(share * np.log(share)).sum())

    cells = np.nonzero(table)
    joint = table[cells].astype(np.float64)
    mutual = float((joint / total * (np.log(joint) + math.log(total) - np.log(rows[cells[0]] * cols[cells[1]].astype(np.float64)))).sum())
    mutual = max(mutual, 0.0)
    mean_entropy = (entropy(rows) + entropy(cols)) / 2
    nmi = 0.0 if mutual == 0.0 else mutual / max(mean_entropy, np.finfo(np.float64).eps)

    def pairs(values: np.ndarray) -> int:
        return sum(int(v) * (int(v) - 1) // 2 for v in values.ravel().tolist())

    index, row_pairs, col_pairs, all_pairs = pairs(table), pairs(rows), pairs(cols), total * (total - 1) // 2
    expected = row_pairs * col_pairs / all_pairs if all_pairs else 0.0
    maximum = (row_pairs + col_pairs) / 2
    ari = 1.0 if maximum == expected else (index - expected) / (maximum - expected)
    return {"nmi": float(min(nmi, 1.0)), "ari": float(ari)}


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
        The :func:`protocol_scores` dict, ``nmi`` and ``ari`` (:func:`agreement_scores` of the
        scored pixels, "no prediction" being one more label), plus ``mapping`` (``{"<cluster>": class or None}``) and
        ``confusion`` (the matrix before matching, as nested lists of ints).
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    mapping = match_clusters(confusion)
    scored = confusion.copy()
    if drop_unmatched:
        scored[mapping < 0] = 0
    report = protocol_scores(scored, mapping, no_prediction)
    contingency = scored if no_prediction is None else np.vstack([scored, np.asarray(no_prediction)[None]])
    report.update(agreement_scores(contingency))
    report["mapping"] = {str(cluster): (int(c) if c >= 0 else None) for cluster, c in enumerate(mapping.tolist())}
    report["confusion"] = confusion.tolist()
    return report


def metrics_from_confusion(confusion: np.ndarray) -> dict[str, Any]:
    """The three protocols from the accumulated (2, K + 1, C) counts of :class:`datus.stages.metric.MatchedSegmentationMetric`.

    Args:
        confusion: axis 0 = (regular pixel, noise pixel), rows 0..K-1 = clusters, row K = "no
            prediction", columns = true classes.

    Returns:
        ``{"num_clusters", "num_classes", "num_pixels", "protocols": {"dense": ..., "paper": ..., "stego": ...}}``.
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
        "protocols": {"dense": dense, "paper": paper, "stego": stego_report(everything[:num_clusters])},
    }


def stego_report(confusion: np.ndarray) -> dict[str, Any]:
    """STEGO's protocol on a K x C matrix of every pixel of the dense masks (see the module docstring).

    Rows of cluster ids >= C are dropped, as STEGO's ``update`` drops those pixels (and pixels
    without a prediction); the remaining rows are matched and scored as they are. Clusters
    dropped this way are unmatched in ``mapping``; ``confusion`` holds the kept rows.
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    num_clusters, num_classes = confusion.shape
    report = protocol_report(confusion[: min(num_clusters, num_classes)], None, drop_unmatched=True)
    report["mapping"] |= {str(cluster): None for cluster in range(num_classes, num_clusters)}
    report["dropped_pixels"] = int(confusion[num_classes:].sum())
    return report


def pixel_counts(
    preds: np.ndarray, target: np.ndarray, noise: np.ndarray, num_clusters: int, num_classes: int, ignore_index: int
) -> np.ndarray:
    """(2, K + 1, C) counts of (regular or noise pixel, cluster, class) for already checked ids.

    ``preds`` must lie in [0, K) and ``target`` in [0, C) or equal ``ignore_index`` (the caller
    has checked them; :meth:`MatchedSegmentationMetric.update` checks and counts tensors).
    """
    bins = 2 * (num_clusters + 1) * num_classes
    if target.dtype in (np.uint8, np.uint16) and preds.dtype in (np.uint8, np.uint16) and 2 * bins < 2**31:
        # Label maps as read: a lookup sends the ignore index past the last bin, so no pixel
        # needs to be selected first (1.5x faster on a 1 MP image).
        lookup = np.full(np.iinfo(target.dtype).max + 1, bins, dtype=np.int32)
        lookup[:num_classes] = np.arange(num_classes, dtype=np.int32)
        if 0 <= ignore_index < len(lookup):
            lookup[ignore_index] = bins
        index = np.take(lookup, target)
        index += preds * np.int32(num_classes)
        index += noise * np.int32((num_clusters + 1) * num_classes)
        return np.bincount(index.ravel(), minlength=2 * bins)[:bins].reshape(2, num_clusters + 1, num_classes)
    keep = target != ignore_index
    index = preds[keep].astype(np.int64) * num_classes + target[keep]
    index += noise[keep].astype(np.int64) * ((num_clusters + 1) * num_classes)
    return np.bincount(index, minlength=bins).reshape(2, num_clusters + 1, num_classes)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.2f}"


def format_table(metrics: dict[str, Any], class_names: Sequence[str] | None = None) -> str:
    """Render the protocols as a plain-text table for logs and terminals.

    Args:
        metrics: the dict returned by :meth:`MatchedSegmentationMetric.compute`.
        class_names: optional names of the C classes; class ids are used otherwise.

    Returns:
        One row per class with IoU/accuracy/F1 (percent) of the dense and paper protocols side by
        side, then one summary line per protocol (stego's too).
    """
    num_classes = int(metrics["num_classes"])
    names = [str(name) for name in class_names] if class_names is not None else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} entries but the metrics have {num_classes} classes")
    protocols = metrics["protocols"]
    name_width = max([len("class"), *(len(name) for name in names)])
    column = 7

    def block(protocol: dict[str, Any], c: int) -> str:
        values = (protocol["per_class_iou"][c], protocol["per_class_accuracy"][c], protocol["per_class_f1"][c])
        return " ".join(_percent(value).rjust(column) for value in values)

    headings = " ".join(heading.rjust(column) for heading in ("IoU", "acc", "F1"))
    group_width = 3 * column + 2
    rule = "-" * (name_width + 3 + len(protocols) * (group_width + 3) - 3)
    lines = [
        f"{'':{name_width}}   " + " | ".join(label.center(group_width) for label in protocols),
        f"{'class':{name_width}}   " + " | ".join(headings for _ in protocols),
        rule,
    ]
    for c, name in enumerate(names):
        lines.append(f"{name:{name_width}}   " + " | ".join(block(protocol, c) for protocol in protocols.values()))
    lines.append(rule)
    for label, protocol in protocols.items():
        lines.append(
            f"{label}: mIoU {_percent(protocol['miou'])}  pixel acc {_percent(protocol['pixel_accuracy'])}  "
            f"mean F1 {_percent(protocol['mean_f1'])}  mean acc {_percent(protocol['mean_accuracy'])}  "
            f"NMI {_percent(protocol.get('nmi'))}  ARI {_percent(protocol.get('ari'))}  "
            f"({protocol['num_pixels']} pixels)"
            + (f", {protocol['dropped_pixels']} of ids >= C dropped" if protocol.get("dropped_pixels") else "")
        )
    lines.append(f"K = {metrics['num_clusters']} clusters, C = {num_classes} classes")
    if (metrics.get("crf") or {}).get("applied"):
        lines.append("masks refined with a dense CRF")
    if metrics.get("without_crf"):
        plain = metrics["without_crf"]
        lines.append("without CRF: " + ", ".join(f"{name} mIoU {_percent(plain[name]['miou'])}" for name in plain))
    return "\n".join(lines) + "\n"


PEER_SUMMARIES = {
    "dense": ("every labelled pixel; datus's own", ("miou", "mIoU"), ("pixel_accuracy", "pixel accuracy"), ("mean_f1", "mean F1"), ("nmi", "NMI"), ("ari", "ARI")),
    "paper": ("noise and unmatched clusters left out; DatUS's tables", ("miou", "mIoU"), ("pixel_accuracy", "pixel accuracy"), ("mean_f1", "mean F1")),
    "stego": ("ids >= C dropped; STEGO, HP, CAUSE, EAGLE, PriMaPs tables", ("miou", "mIoU"), ("pixel_accuracy", "Accuracy")),
}
"""Per protocol: what it is, then the (key, name) of each number its peers publish, in their order."""


def format_protocol(metrics: dict[str, Any], name: str, class_names: Sequence[str] | None = None) -> str:
    """One protocol alone, as its peers report it: per-class IoU, then the numbers of their tables.

    A row of a published table (STEGO's "mIoU, Accuracy"; DatUS's "mIoU, pixel accuracy, F1")
    can be set beside datus's numbers for released masks (``datus evaluate --protocol``).
    """
    protocol = metrics["protocols"][name]
    meaning, *numbers = PEER_SUMMARIES[name]
    num_classes = int(metrics["num_classes"])
    names = [str(n) for n in class_names] if class_names is not None else [str(c) for c in range(num_classes)]
    width = max(len(n) for n in names)
    lines = [f"{name} protocol ({meaning}), K = {metrics['num_clusters']}, C = {num_classes}"]
    lines += [f"  {label:{width}}  IoU {_percent(iou)}" for label, iou in zip(names, protocol["per_class_iou"])]
    lines.append("  ".join(f"{title} {_percent(protocol.get(key))}" for key, title in numbers))
    if protocol.get("dropped_pixels"):
        lines.append(f"{protocol['dropped_pixels']} pixels of cluster ids >= C dropped, as STEGO drops them")
    return "\n".join(lines) + "\n"
