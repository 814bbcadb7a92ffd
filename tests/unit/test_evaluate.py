"""Tests of datus.evaluate on label folders generated here (nesting, resizing, unpaired files)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from datus.evaluate import evaluate_folders

IGNORE = 255
NUM_CLASSES = 3
NUM_CLUSTERS = 4
RULE = np.array([2, 0, 1])
"""Class c is mostly predicted as cluster RULE[c]; cluster 3 only appears as clutter."""


def save_labels(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.astype(np.uint8)).save(path)


def make_case(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    target = rng.integers(0, NUM_CLASSES, size=shape)
    target[rng.random(shape) < 0.05] = IGNORE
    clean = RULE[np.minimum(target, NUM_CLASSES - 1)]
    preds = np.where(rng.random(shape) < 0.8, clean, rng.integers(0, NUM_CLUSTERS, shape))
    preds[rng.random(shape) < 0.05] = IGNORE
    return preds, target


def build_folders(root: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """Write pred/ and gt/ folders; return them with the pixels the evaluation must see, pooled."""
    rng = np.random.default_rng(0)
    pred_dir, gt_dir = root / "pred", root / "gt"

    preds_a, target_a = make_case(rng, (16, 20))
    save_labels(gt_dir / "a.png", target_a)
    save_labels(pred_dir / "a.png", preds_a)

    # Nested, ground truth stored as BMP, prediction at half resolution.
    small, _ = make_case(rng, (8, 8))
    preds_b = np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)
    _, target_b = make_case(rng, (16, 16))
    cluster_to_class = np.argsort(RULE)
    target_b = np.where(rng.random((16, 16)) < 0.7, cluster_to_class[np.minimum(preds_b, 2)], target_b)
    save_labels(gt_dir / "sub" / "b.bmp", target_b)
    save_labels(pred_dir / "sub" / "b.png", small)

    # Ground truth without a prediction: all its pixels are "no prediction".
    _, target_c = make_case(rng, (12, 12))
    save_labels(gt_dir / "sub" / "c.png", target_c)
    preds_c = np.full(target_c.shape, IGNORE)

    # Prediction without ground truth: listed, never read (a value this large would change K).
    save_labels(pred_dir / "extra.png", np.full((4, 4), 9))
    (gt_dir / "notes.txt").write_text("not a label map")

    preds = np.concatenate([preds_a.ravel(), preds_b.ravel(), preds_c.ravel()])
    target = np.concatenate([target_a.ravel(), target_b.ravel(), target_c.ravel()])
    return pred_dir, gt_dir, preds, target


def scores_with_mapping(preds: np.ndarray, target: np.ndarray, mapping: dict[int, int], dense: bool) -> dict[str, Any]:
    """IoU and pixel accuracy by counting pixels, for a known cluster -> class mapping."""
    counted = target != IGNORE
    if not dense:
        counted &= np.isin(preds, list(mapping))
    predicted = np.full(preds.shape, -1)
    for cluster, c in mapping.items():
        predicted[preds == cluster] = c
    p, t = predicted[counted], target[counted]
    iou = []
    for c in range(NUM_CLASSES):
        tp = np.count_nonzero((p == c) & (t == c))
        union = np.count_nonzero((p == c) | (t == c))
        iou.append(tp / union)
    return {"per_class_iou": iou, "pixel_accuracy": np.count_nonzero(p == t) / p.size, "num_pixels": int(p.size)}


def test_evaluate_folders_pairs_resizes_and_scores(tmp_path: Path) -> None:
    pred_dir, gt_dir, preds, target = build_folders(tmp_path)
    output_dir = tmp_path / "out"
    result = evaluate_folders(pred_dir, gt_dir, NUM_CLASSES, output_dir, class_names=["sand", "reef", "fish"])

    saved = json.loads((output_dir / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["num_images"] == 3
    assert saved["num_paired"] == 2
    assert saved["num_resized_predictions"] == 1
    assert saved["num_clusters"] == NUM_CLUSTERS
    assert saved["num_classes"] == NUM_CLASSES
    assert saved["unpaired"] == {"missing_predictions": ["sub/c.png"], "missing_ground_truth": ["extra.png"]}
    assert saved["num_pixels"] == int(np.count_nonzero(target != IGNORE))

    labelled = (target != IGNORE) & (preds != IGNORE)
    expected_confusion = np.zeros((NUM_CLUSTERS, NUM_CLASSES), dtype=np.int64)
    np.add.at(expected_confusion, (preds[labelled], target[labelled]), 1)
    mapping = {int(cluster): int(c) for c, cluster in enumerate(RULE)}
    for protocol in ("dense", "paper"):
        scores = saved["protocols"][protocol]
        assert scores["confusion"] == expected_confusion.tolist()
        assert scores["mapping"] == {"0": 1, "1": 2, "2": 0, "3": None}
        expected = scores_with_mapping(preds, target, mapping, dense=protocol == "dense")
        assert scores["per_class_iou"] == pytest.approx(expected["per_class_iou"])
        assert scores["miou"] == pytest.approx(np.mean(expected["per_class_iou"]))
        assert scores["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"])
        assert scores["num_pixels"] == expected["num_pixels"]
    assert saved["mapping"] == saved["protocols"]["dense"]["mapping"]
    assert saved["protocols"]["paper"]["miou"] > saved["protocols"]["dense"]["miou"]

    table = (output_dir / "metrics.txt").read_text()
    assert "reef" in table and "dense: mIoU" in table
    with Image.open(output_dir / "confusion.png") as image:
        assert image.width >= NUM_CLASSES * 24 and image.height >= NUM_CLUSTERS * 24


def test_explicit_num_clusters_and_output_inside_pred_dir(tmp_path: Path) -> None:
    pred_dir, gt_dir, _, _ = build_folders(tmp_path)
    output_dir = pred_dir / "evaluation"
    first = evaluate_folders(pred_dir, gt_dir, NUM_CLASSES, output_dir, num_clusters=6)
    assert first["num_clusters"] == 6
    # A rerun must not mistake its own confusion.png for a prediction.
    second = evaluate_folders(pred_dir, gt_dir, NUM_CLASSES, output_dir, num_clusters=6)
    assert second == first
    with pytest.raises(ValueError, match=r"a\.png.*num_clusters"):
        evaluate_folders(pred_dir, gt_dir, NUM_CLASSES, tmp_path / "out", num_clusters=2)


def test_missing_and_empty_folders_raise(tmp_path: Path) -> None:
    pred_dir, gt_dir, _, _ = build_folders(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="pred_dir"):
        evaluate_folders(tmp_path / "nope", gt_dir, NUM_CLASSES, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="gt_dir"):
        evaluate_folders(pred_dir, tmp_path / "nope", NUM_CLASSES, tmp_path / "out")
    with pytest.raises(ValueError, match="gt_dir.*no label maps"):
        evaluate_folders(pred_dir, empty, NUM_CLASSES, tmp_path / "out")
    with pytest.raises(ValueError, match="pred_dir.*no label maps"):
        evaluate_folders(empty, gt_dir, NUM_CLASSES, tmp_path / "out")
    with pytest.raises(ValueError, match="pairs with"):
        evaluate_folders(pred_dir / "sub", gt_dir, NUM_CLASSES, tmp_path / "out")
    with pytest.raises(ValueError, match="class_names"):
        evaluate_folders(pred_dir, gt_dir, NUM_CLASSES, tmp_path / "out", class_names=["only one"])
    assert not (tmp_path / "out").exists()


def test_out_of_range_ground_truth_names_the_file(tmp_path: Path) -> None:
    pred_dir, gt_dir, _, _ = build_folders(tmp_path)
    save_labels(gt_dir / "a.png", np.full((16, 20), 7))
    with pytest.raises(ValueError, match=r"a\.png.*values 7.*ignore index"):
        evaluate_folders(pred_dir, gt_dir, NUM_CLASSES, tmp_path / "out")


def test_ambiguous_ground_truth_raises(tmp_path: Path) -> None:
    pred_dir, gt_dir, _, _ = build_folders(tmp_path)
    save_labels(gt_dir / "a.bmp", np.zeros((16, 20)))
    with pytest.raises(ValueError, match="keep only one"):
        evaluate_folders(pred_dir, gt_dir, NUM_CLASSES, tmp_path / "out")
