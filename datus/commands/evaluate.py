"""Score a folder of predicted label maps against a folder of ground-truth label maps.

This works for any method's output, not only datus's own masks, so that baselines and other
backbones are scored by exactly the same code and protocols (see :mod:`datus.stages.metrics`). Files are
streamed one pair at a time into a pooled confusion matrix: memory does not grow with the dataset.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from datus.stages.classes import CLASSES_SEARCH_DEPTH, find_classes_file, read_classes_file
from datus.stages.crf import CRFJob, CRFParams, refine_many, require_densecrf
from datus.outputs.drawing import save_confusion_png
from datus.core.errors import ConfigurationError
from datus.core.io import IMAGE_EXTENSIONS, TEMPORARY_NAME, UnreadableFile, open_regular, read_label_png, write_json, write_text
from datus.stages.metric import MatchedSegmentationMetric
from datus.stages.metrics import format_table
from datus.runfolder.run import CLASSES_FILE, CONFUSION_FILE, METRICS_FILE, METRICS_TABLE
from datus.core.settings import IGNORE_INDEX
from datus.core.workers import available_cores

log = logging.getLogger(__name__)

LABEL_SUFFIXES = frozenset({".png", ".bmp", ".tif", ".tiff", ".gif", ".pgm"})
"""File suffixes read as label maps; lossy formats (JPEG) are left out on purpose: they corrupt ids."""

MAX_LABELS = 65535
"""Most cluster or class ids scored (a 16-bit label map); the pooled counts grow with K x C."""

MAX_CRF_LABELS = 255
"""Most labels a CRF refines (it holds one probability plane per label)."""

LABEL_CONFIDENCE = 0.8
"""Probability a label map's own label gets as the CRF's input (label maps carry no probabilities)."""

_LISTED = 5
"""File names shown in a warning; the full lists are in ``metrics.json``."""

def _index_label_files(root: Path, skip: set[Path], suffixes: frozenset[str] = LABEL_SUFFIXES) -> dict[str, Path]:
    """Map "relative path without extension" to file for every label image (or ``suffixes`` file) under ``root``.

    Hidden files and folders are skipped (they include half-written temporaries of atomic writes),
    as are ``skip`` (this evaluation's own outputs, in case ``output_dir`` lies inside a scanned
    folder).

    Raises:
        ValueError: if two files differ only by extension, since either could be the intended one.
    """
    files: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.suffix.lower() not in suffixes or any(part.startswith(".") for part in relative.parts):
            continue
        if not path.is_file() or path.resolve() in skip:
            continue
        key = relative.with_suffix("").as_posix()
        if key in files:
            raise ConfigurationError(
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


MAX_CONFUSION_CELLS = 1 << 27
"""Most counts of the pooled (2, K + 1, C) matrix (1 GiB of int64): K x C near 65535^2 would need 68 GB."""


def _check_cells(num_clusters: int, num_classes: int, source: Path | None = None) -> None:
    """Refuse a K x C whose confusion matrix does not fit in memory, naming where K came from."""
    cells = 2 * (num_clusters + 1) * num_classes
    if cells > MAX_CONFUSION_CELLS:
        where = f" (the prediction {source} holds the id {num_clusters - 1})" if source is not None else ""
        raise ConfigurationError(
            f"{num_clusters} clusters x {num_classes} classes{where} need {cells} counts, more than the "
            f"{MAX_CONFUSION_CELLS} datus keeps in memory; check --num_classes and that the predictions are label maps "
            "of cluster ids, not images"
        )


def _read_labels(path: Path, role: str) -> np.ndarray:
    """A label map, or one line naming the file when it is truncated or not a label image."""
    try:
        labels = read_label_png(path).astype(np.int64)
    except UnreadableFile as error:
        raise ConfigurationError(f"{role} file {error}; re-create or remove it") from None
    if labels.ndim != 2:
        raise ConfigurationError(f"{role} file {path}: expected a single-channel label map, got shape {labels.shape}")
    return labels


def _warn_about_nesting(pred_dir: Path, gt_dir: Path) -> None:
    """Scoring a folder against itself, or a folder inside the other, is nearly always a typo."""
    pred, gt = pred_dir.resolve(), gt_dir.resolve()
    if pred == gt:
        log.warning(
            "pred_dir (--pred) and gt_dir (--gt) are the same folder %s: every file is scored against itself; "
            "pass the folder of predictions and the folder of ground truth",
            pred_dir,
        )
    elif gt.is_relative_to(pred):
        log.warning(
            "gt_dir (--gt) %s lies inside pred_dir (--pred) %s: the ground-truth files are also read as "
            "predictions; pass two separate folders",
            gt_dir,
            pred_dir,
        )
    elif pred.is_relative_to(gt):
        log.warning(
            "pred_dir (--pred) %s lies inside gt_dir (--gt) %s: the predictions are also read as ground truth "
            "(without predictions of their own); pass two separate folders",
            pred_dir,
            gt_dir,
        )


def _short(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (", ..." if len(names) > _LISTED else "")


def _check_folder(folder: Path, argument: str, what: str) -> None:
    if not folder.exists():
        raise FileNotFoundError(f"{argument}={folder} does not exist; pass the folder of {what}.")
    if not folder.is_dir():
        raise ConfigurationError(f"{argument}={folder} is a file, not a folder; pass the folder of {what}.")


def evaluate_folders(
    pred_dir: Path,
    gt_dir: Path,
    num_classes: int | None,
    output_dir: Path,
    ignore_index: int | None = None,
    num_clusters: int | None = None,
    class_names: Sequence[str] | None = None,
    images_dir: Path | None = None,
    crf: bool | str = False,
    crf_params: CRFParams | None = None,
    label_confidence: float = LABEL_CONFIDENCE,
) -> dict[str, Any]:
    """Score predicted label maps against ground truth with Hungarian matching, both protocols.

    Files pair by relative path without extension (pred ``a/b.png`` with gt ``a/b.png`` or
    ``a/b.bmp``). A prediction of another size than its ground truth is resized to it with
    nearest-neighbour (and a warning says which). Ground-truth files without a prediction still
    count, as pixels with no prediction (an error in the dense protocol), so that a method cannot
    score higher by skipping hard images; a warning names them. Predictions without ground truth
    are listed and ignored.

    The number and names of the classes come from a ``classes.json`` in ``gt_dir`` or up to three
    folders above it (``datus prepare`` writes one at the dataset root) when there is one.

    Args:
        pred_dir: folder of predicted cluster-id maps (single-channel PNGs, any nesting).
        gt_dir: folder of ground-truth class-id maps, same relative layout.
        num_classes: C; ground-truth values must lie in [0, C) or equal ``ignore_index``. None:
            the length of the ``classes.json`` class list; a value that disagrees with it is
            refused.
        output_dir: where ``metrics.json``, ``metrics.txt`` and ``confusion.png`` are written.
        ignore_index: ground-truth value to leave out; as a prediction value, "no prediction".
            None: the ``classes.json`` value, else 255.
        num_clusters: K; defaults to the largest predicted id + 1 over all files.
        class_names: names of the C classes for the table and the picture; None: those of
            ``classes.json``, if any.
        images_dir: the images the predictions were made from (same relative paths); needed
            for ``crf``.
        crf: refine each prediction with a dense CRF on its image before scoring; ``both``
            scores it with and without (``without_crf`` in the result).
        crf_params: the CRF's settings (STEGO's by default).
        label_confidence: a label map has no probabilities, so each pixel's own label gets this
            probability and the others share the rest (pixels without a prediction: uniform).

    Returns:
        The :meth:`MatchedSegmentationMetric.compute` dict plus ``num_images``, ``mapping`` (the
        dense protocol's), ``unpaired``, ``resized_predictions`` and a description of the
        inputs; also saved as ``metrics.json``.

    Raises:
        FileNotFoundError: if a folder is missing.
        ConfigurationError: no ``num_classes`` and no ``classes.json``, a ``num_classes`` that
            disagrees with it, no file pairs up, a file that cannot be decoded, or ids out of range.
    """
    pred_dir, gt_dir, output_dir = Path(pred_dir), Path(gt_dir), Path(output_dir)
    _check_folder(pred_dir, "pred_dir", "predicted label maps (e.g. the masks written by `datus predict`)")
    _check_folder(gt_dir, "gt_dir", "ground-truth label maps")
    _warn_about_nesting(pred_dir, gt_dir)
    if num_clusters is not None and num_clusters < 1:
        raise ConfigurationError(
            f"--num_clusters must be >= 1 (or left out: largest predicted id + 1), got {num_clusters}"
        )
    _check_output_dir(output_dir, pred_dir, gt_dir)
    classes_file = find_classes_file(gt_dir)
    num_classes, names, ignore_index = _resolve_classes(classes_file, gt_dir, num_classes, class_names, ignore_index)

    skip = {(output_dir / name).resolve() for name in (METRICS_FILE, CONFUSION_FILE)}
    suffixes = ", ".join(sorted(LABEL_SUFFIXES))
    predictions = _index_label_files(pred_dir, skip)
    ground_truth = _index_label_files(gt_dir, skip)
    if not ground_truth:
        raise ConfigurationError(f"gt_dir={gt_dir} holds no label maps ({suffixes}); check the folder.")
    if not predictions:
        raise ConfigurationError(f"pred_dir={pred_dir} holds no label maps ({suffixes}); check the folder.")
    if not ground_truth.keys() & predictions.keys():
        raise ConfigurationError(
            f"no prediction in pred_dir={pred_dir} pairs with a ground-truth file in gt_dir={gt_dir}. Files "
            f"pair by relative path without extension (pred 'a/b.png' with gt 'a/b.png' or 'a/b.bmp'); "
            f"e.g. pred {next(iter(predictions))!r} vs gt {next(iter(ground_truth))!r}. Point both folders "
            f"at the same level of the dataset tree."
        )

    if crf and images_dir is None:
        raise ConfigurationError("--crf needs --images DIR: the images the predictions were made from (same relative paths)")
    if crf:
        require_densecrf()
        if not 0 < label_confidence < 1:
            raise ConfigurationError(f"--label_confidence must lie strictly between 0 and 1, got {label_confidence}")
        if num_clusters is None:
            num_clusters = max(_largest_id(_read_labels(path, "prediction"), ignore_index) for path in predictions.values()) + 1
        if num_clusters > MAX_CRF_LABELS:
            raise ConfigurationError(
                f"--crf needs one probability plane per label: at most {MAX_CRF_LABELS} labels, the predictions have {num_clusters}"
            )
    if num_classes > MAX_LABELS or (num_clusters or 0) > MAX_LABELS:
        raise ConfigurationError(f"--num_classes and --num_clusters must be at most {MAX_LABELS}, got {num_classes} and {num_clusters}")
    _check_cells(num_clusters or 1, num_classes)
    # Without an explicit K, start small and grow as larger ids show up: one pass over the files.
    try:
        metric = MatchedSegmentationMetric(num_clusters if num_clusters is not None else 1, num_classes, ignore_index)
    except ValueError as error:
        raise ConfigurationError(f"--ignore_index: {error}") from None
    unrefined = MatchedSegmentationMetric(metric.num_clusters, num_classes, ignore_index) if crf == "both" else None
    resized: list[str] = []
    pairs = _pairs(ground_truth, predictions, pred_dir, ignore_index, resized)
    if crf:
        images = _index_label_files(Path(images_dir), set(), IMAGE_EXTENSIONS)  # type: ignore[arg-type]
        pairs = _refined(pairs, images, metric.num_clusters, ignore_index, crf_params or CRFParams(), label_confidence, unrefined)
    for _, gt_path, pred_path, preds, target in pairs:
        try:
            if num_clusters is None:
                needed = _largest_id(preds, ignore_index) + 1
                if needed > MAX_LABELS:
                    raise ValueError(f"holds the id {needed - 1}; label maps hold at most {MAX_LABELS} ids")
                if needed > metric.num_clusters:
                    _check_cells(needed, num_classes, pred_path)
                    metric = metric.expanded(needed)
            metric.update(torch.from_numpy(preds), torch.from_numpy(target))
        except ValueError as error:
            files = f"pred {pred_path} / gt {gt_path}" if pred_path is not None else f"gt {gt_path}"
            raise ConfigurationError(f"{files}: {error}") from None

    missing_predictions = [
        path.relative_to(gt_dir).as_posix() for key, path in ground_truth.items() if key not in predictions
    ]
    missing_ground_truth = [
        path.relative_to(pred_dir).as_posix() for key, path in predictions.items() if key not in ground_truth
    ]
    _warn_about_pairing(pred_dir, gt_dir, len(ground_truth), missing_predictions, missing_ground_truth, resized)
    scores = metric.compute()
    scores["crf"] = {"applied": bool(crf), "settings": asdict(crf_params or CRFParams()) if crf else None}
    if unrefined is not None:
        scores["without_crf"] = unrefined.compute()["protocols"]
    dense = scores["protocols"]["dense"]
    result: dict[str, Any] = {
        **scores,
        "num_images": len(ground_truth),
        "num_paired": len(ground_truth) - len(missing_predictions),
        "num_resized_predictions": len(resized),
        "resized_predictions": resized,
        "mapping": dense["mapping"],
        "unpaired": {"missing_predictions": missing_predictions, "missing_ground_truth": missing_ground_truth},
        "ignore_index": ignore_index,
        "class_names": names,
        "classes_file": str(classes_file) if classes_file is not None else None,
        "pred_dir": str(pred_dir),
        "gt_dir": str(gt_dir),
    }
    write_json(output_dir / METRICS_FILE, result)
    write_text(output_dir / METRICS_TABLE, format_table(scores, names))
    save_confusion_png(np.asarray(dense["confusion"]), dense["mapping"], output_dir / CONFUSION_FILE, names)
    return result


def _check_output_dir(output_dir: Path, pred_dir: Path, gt_dir: Path) -> None:
    """Refuse an output folder whose files are not an earlier evaluation's, or that is an input.

    ``datus evaluate`` writes three files there; it must not overwrite a user's, nor leave a
    confusion matrix picture among the label maps it reads next time.
    """
    output = output_dir.resolve()
    for folder, option in ((pred_dir, "--pred"), (gt_dir, "--gt")):
        if output.is_relative_to(folder.resolve()):
            raise ConfigurationError(
                f"--output_dir {output_dir} lies in {option} {folder}: its files would be read as label maps next "
                "time; give a folder outside the inputs"
            )
    for folder in [output_dir, *output_dir.absolute().parents]:
        if folder.exists() and not folder.is_dir():
            raise ConfigurationError(f"--output_dir {output_dir}: {folder} is a file; give a folder")
    if not output_dir.is_dir():
        return
    ours = {METRICS_FILE, METRICS_TABLE, CONFUSION_FILE}
    foreign = [entry.name for entry in output_dir.iterdir() if entry.name not in ours and not TEMPORARY_NAME.fullmatch(entry.name)]
    earlier = output_dir / METRICS_FILE
    present = any((output_dir / name).exists() for name in ours)
    if foreign or (present and not _is_evaluation(earlier)):
        raise ConfigurationError(
            f"--output_dir {output_dir} holds files that an earlier datus evaluate did not write ({', '.join(foreign[:3]) or METRICS_FILE}); "
            "give a new or empty folder"
        )


def _is_evaluation(path: Path) -> bool:
    try:
        with open_regular(path) as stream:
            content = json.loads(stream.read().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(content, dict) and "protocols" in content and "gt_dir" in content


def _largest_id(labels: np.ndarray, ignore_index: int) -> int:
    valid = labels[labels != ignore_index]
    return int(valid.max()) if valid.size else 0


_Pair = tuple[str, Path, "Path | None", np.ndarray, np.ndarray]
"""(key, gt file, prediction file, prediction, ground truth) of one ground-truth file."""


def _pairs(
    ground_truth: dict[str, Path], predictions: dict[str, Path], pred_dir: Path, ignore_index: int, resized: list[str]
) -> Iterator[_Pair]:
    """Every ground-truth file with its prediction resized to its size (all "no prediction" without one)."""
    for key, gt_path in ground_truth.items():
        pred_path = predictions.get(key)
        target = _read_labels(gt_path, "ground-truth")
        if pred_path is None:
            yield key, gt_path, None, np.full(target.shape, ignore_index, dtype=np.int64), target
            continue
        preds = _read_labels(pred_path, "prediction")
        if preds.shape != target.shape:
            resized.append(
                f"{pred_path.relative_to(pred_dir).as_posix()} ({preds.shape[1]}x{preds.shape[0]} -> "
                f"{target.shape[1]}x{target.shape[0]})"
            )
            try:
                preds = _resize_nearest(preds, target.shape)
            except ValueError as error:
                raise ConfigurationError(f"prediction file {pred_path}: {error}") from None
        yield key, gt_path, pred_path, preds, target


def _refined(
    pairs: Iterator[_Pair],
    images: dict[str, Path],
    num_clusters: int,
    ignore_index: int,
    params: CRFParams,
    confidence: float,
    unrefined: MatchedSegmentationMetric | None,
) -> Iterator[_Pair]:
    """The same pairs with each prediction refined by a dense CRF on its image (in worker processes).

    Each label becomes a "segment" whose probabilities are ``confidence`` on itself; pixels
    without a prediction get a uniform row, so the CRF may fill them from their neighbours.
    A pair without a matching image keeps its prediction, with a warning.
    """
    probabilities = np.full((num_clusters + 1, num_clusters), (1 - confidence) / max(num_clusters - 1, 1), np.float32)
    np.fill_diagonal(probabilities[:num_clusters], confidence if num_clusters > 1 else 1.0)
    probabilities[num_clusters] = 1 / num_clusters
    for_jobs, for_results = itertools.tee(pairs)
    jobs = (
        CRFJob(images[key], probabilities, np.where(preds == ignore_index, num_clusters, preds))
        for key, _, pred_path, preds, _ in for_jobs
        if pred_path is not None and key in images
    )
    refined = refine_many(jobs, params, available_cores())
    for key, gt_path, pred_path, preds, target in for_results:
        if unrefined is not None:
            unrefined.update(torch.from_numpy(preds), torch.from_numpy(target))
        if pred_path is None or key not in images:
            if pred_path is not None:
                log.warning("no image for %s in --images: scored without CRF", pred_path)
            yield key, gt_path, pred_path, preds, target
            continue
        labels = next(refined)
        if labels is None or labels.shape != target.shape:
            log.warning("no CRF for %s: its image cannot be read or has another size", pred_path)
            labels = preds
        yield key, gt_path, pred_path, labels.astype(np.int64), target


def _resolve_classes(
    classes_file: Path | None,
    gt_dir: Path,
    num_classes: int | None,
    class_names: Sequence[str] | None,
    ignore_index: int | None,
) -> tuple[int, list[str] | None, int]:
    """C, class names and ignore index from the arguments and the dataset's ``classes.json``."""
    described: list[str] | None = None
    described_ignore: int | None = None
    if classes_file is not None:
        described, described_ignore = read_classes_file(classes_file)
        if num_classes is not None and num_classes != len(described):
            raise ConfigurationError(
                f"--num_classes {num_classes} disagrees with {classes_file}, which names {len(described)} classes; "
                f"drop --num_classes to use {len(described)}, or pass the ground truth that matches it"
            )
    if num_classes is None:
        if described is None:
            raise ConfigurationError(
                f"--num_classes is needed: no {CLASSES_FILE} in gt_dir={gt_dir} or the {CLASSES_SEARCH_DEPTH} "
                f"folders above it; pass --num_classes C (the number of ground-truth classes)"
            )
        num_classes = len(described)
    if num_classes < 1:
        raise ConfigurationError(f"--num_classes must be >= 1, got {num_classes}")
    names = list(class_names) if class_names is not None else described
    if names is not None and len(names) != num_classes:
        raise ConfigurationError(f"class_names has {len(names)} entries but num_classes={num_classes}")
    if ignore_index is None:
        ignore_index = described_ignore if described_ignore is not None else IGNORE_INDEX
    return num_classes, names, ignore_index


def _warn_about_pairing(
    pred_dir: Path,
    gt_dir: Path,
    num_ground_truth: int,
    missing_predictions: Sequence[str],
    missing_ground_truth: Sequence[str],
    resized: Sequence[str],
) -> None:
    """One message per fact about files that did not pair one to one (full lists: metrics.json)."""
    if missing_predictions:
        log.warning(
            "%d of %d ground-truth files have NO PREDICTION in %s (%s): the dense protocol counts all their "
            "labelled pixels as errors, the paper protocol leaves them out; check --pred if this is not intended "
            "(all listed in metrics.json under unpaired)",
            len(missing_predictions), num_ground_truth, pred_dir, _short(missing_predictions),
        )  # fmt: skip
    if resized:
        log.warning(
            "%d prediction(s) differ in size from their ground truth and were resized to it with "
            "nearest-neighbour: %s",
            len(resized), _short(resized),
        )  # fmt: skip
    if missing_ground_truth:
        log.info(
            "%d prediction(s) have no ground truth in %s and were not scored: %s",
            len(missing_ground_truth), gt_dir, _short(missing_ground_truth),
        )  # fmt: skip
