"""Score a folder of predicted label maps against a folder of ground-truth label maps.

This works for any method's output, not only datus's own masks, so that baselines and other
backbones are scored by exactly the same code and protocols (see :mod:`datus.metrics`). Files are
streamed one pair at a time into a pooled confusion matrix: memory does not grow with the dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from datus.io import read_label_png, write_json, write_text
from datus.metrics import MatchedSegmentationMetric, format_table, save_confusion_png

LABEL_SUFFIXES = frozenset({".png", ".bmp", ".tif", ".tiff", ".gif", ".pgm"})
"""File suffixes read as label maps; lossy formats (JPEG) are left out on purpose: they corrupt ids."""

METRICS_FILE = "metrics.json"
TABLE_FILE = "metrics.txt"
CONFUSION_FILE = "confusion.png"


def _index_label_files(root: Path, skip: set[Path]) -> dict[str, Path]:
    """Map "relative path without extension" to file for every label image under ``root``.

    Hidden files and folders are skipped (they include half-written temporaries of atomic writes),
    as are ``skip`` (this evaluation's own outputs, in case ``output_dir`` lies inside a scanned
    folder).

    Raises:
        ValueError: if two files differ only by extension, since either could be the intended one.
    """
    files: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.suffix.lower() not in LABEL_SUFFIXES or any(part.startswith(".") for part in relative.parts):
            continue
        if not path.is_file() or path.resolve() in skip:
            continue
        key = relative.with_suffix("").as_posix()
        if key in files:
            raise ValueError(
                f"{root}: both {files[key].relative_to(root)} and {relative} could be the label map of "
                f"{key!r}; keep only one of them."
            )
        files[key] = path
    return files


def _resize_nearest(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Resize a label map to ``shape`` (H, W) with nearest-neighbour, which never invents ids."""
    if labels.min(initial=0) < np.iinfo(np.int32).min or labels.max(initial=0) > np.iinfo(np.int32).max:
        raise ValueError("label values do not fit in 32 bits")
    image = Image.fromarray(labels.astype(np.int32))
    resized = image.resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    return np.asarray(resized).astype(np.int64)


def _check_folder(folder: Path, argument: str, what: str) -> None:
    if not folder.exists():
        raise FileNotFoundError(f"{argument}={folder} does not exist; pass the folder of {what}.")
    if not folder.is_dir():
        raise NotADirectoryError(f"{argument}={folder} is a file, not a folder; pass the folder of {what}.")


def evaluate_folders(
    pred_dir: Path,
    gt_dir: Path,
    num_classes: int,
    output_dir: Path,
    ignore_index: int = 255,
    num_clusters: int | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Score predicted label maps against ground truth with Hungarian matching, both protocols.

    Files pair by relative path without extension (pred ``a/b.png`` with gt ``a/b.png`` or
    ``a/b.bmp``). A prediction of another size than its ground truth is resized to it with
    nearest-neighbour. Ground-truth files without a prediction still count, as pixels with no
    prediction (an error in the dense protocol), so that a method cannot score higher by skipping
    hard images; predictions without ground truth are listed and ignored.

    Args:
        pred_dir: folder of predicted cluster-id maps (single-channel PNGs, any nesting).
        gt_dir: folder of ground-truth class-id maps, same relative layout.
        num_classes: C; ground-truth values must lie in [0, C) or equal ``ignore_index``.
        output_dir: where ``metrics.json``, ``metrics.txt`` and ``confusion.png`` are written.
        ignore_index: ground-truth value to leave out; as a prediction value, "no prediction".
        num_clusters: K; defaults to the largest predicted id + 1 over all files.
        class_names: optional names of the C classes, used in the table and the picture.

    Returns:
        The :meth:`MatchedSegmentationMetric.compute` dict plus ``num_images``, ``mapping`` (the
        dense protocol's), ``unpaired`` and a description of the inputs; also saved as
        ``metrics.json``.

    Raises:
        FileNotFoundError: if a folder is missing.
        ValueError: if no file pairs up, or a file holds ids out of range.
    """
    pred_dir, gt_dir, output_dir = Path(pred_dir), Path(gt_dir), Path(output_dir)
    _check_folder(pred_dir, "pred_dir", "predicted label maps (e.g. the masks written by `datus predict`)")
    _check_folder(gt_dir, "gt_dir", "ground-truth label maps")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    names = list(class_names) if class_names is not None else None
    if names is not None and len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} entries but num_classes={num_classes}")

    skip = {(output_dir / name).resolve() for name in (METRICS_FILE, CONFUSION_FILE)}
    suffixes = ", ".join(sorted(LABEL_SUFFIXES))
    predictions = _index_label_files(pred_dir, skip)
    ground_truth = _index_label_files(gt_dir, skip)
    if not ground_truth:
        raise ValueError(f"gt_dir={gt_dir} holds no label maps ({suffixes}); check the folder.")
    if not predictions:
        raise ValueError(f"pred_dir={pred_dir} holds no label maps ({suffixes}); check the folder.")
    if not ground_truth.keys() & predictions.keys():
        raise ValueError(
            f"no prediction in pred_dir={pred_dir} pairs with a ground-truth file in gt_dir={gt_dir}. Files "
            f"pair by relative path without extension (pred 'a/b.png' with gt 'a/b.png' or 'a/b.bmp'); "
            f"e.g. pred {next(iter(predictions))!r} vs gt {next(iter(ground_truth))!r}. Point both folders "
            f"at the same level of the dataset tree."
        )

    # Without an explicit K, start small and grow as larger ids show up: one pass over the files.
    metric = MatchedSegmentationMetric(num_clusters if num_clusters is not None else 1, num_classes, ignore_index)
    resized = 0
    for key, gt_path in ground_truth.items():
        pred_path = predictions.get(key)
        try:
            target = read_label_png(gt_path)
            if target.ndim != 2:
                raise ValueError(f"expected a single-channel label map, got shape {target.shape}")
            if pred_path is None:
                preds = np.full(target.shape, ignore_index, dtype=np.int64)
            else:
                preds = read_label_png(pred_path)
                if preds.shape != target.shape:
                    preds = _resize_nearest(preds, target.shape)
                    resized += 1
            if num_clusters is None:
                valid = preds[preds != ignore_index]
                needed = int(valid.max()) + 1 if valid.size else 1
                if needed > metric.num_clusters:
                    metric = metric.expanded(needed)
            metric.update(torch.from_numpy(preds), torch.from_numpy(target))
        except ValueError as error:
            files = f"pred {pred_path} / gt {gt_path}" if pred_path is not None else f"gt {gt_path}"
            raise ValueError(f"{files}: {error}") from error

    missing_predictions = [
        path.relative_to(gt_dir).as_posix() for key, path in ground_truth.items() if key not in predictions
    ]
    missing_ground_truth = [
        path.relative_to(pred_dir).as_posix() for key, path in predictions.items() if key not in ground_truth
    ]
    scores = metric.compute()
    dense = scores["protocols"]["dense"]
    result: dict[str, Any] = {
        **scores,
        "num_images": len(ground_truth),
        "num_paired": len(ground_truth) - len(missing_predictions),
        "num_resized_predictions": resized,
        "mapping": dense["mapping"],
        "unpaired": {"missing_predictions": missing_predictions, "missing_ground_truth": missing_ground_truth},
        "ignore_index": ignore_index,
        "class_names": names,
        "pred_dir": str(pred_dir),
        "gt_dir": str(gt_dir),
    }
    write_json(output_dir / METRICS_FILE, result)
    write_text(output_dir / TABLE_FILE, format_table(scores, names))
    save_confusion_png(np.asarray(dense["confusion"]), dense["mapping"], output_dir / CONFUSION_FILE, names)
    return result
