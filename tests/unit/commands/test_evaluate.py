"""Tests of datus.commands.evaluate on label folders generated here (nesting, resizing, unpaired files)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from datus.core.errors import ConfigurationError
from datus.commands.evaluate import evaluate_folders

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


def test_explicit_num_clusters_and_an_output_folder_that_is_not_ours(tmp_path: Path) -> None:
    pred_dir, gt_dir, _, _ = build_folders(tmp_path)
    output_dir = tmp_path / "evaluation"
    first = evaluate_folders(pred_dir, gt_dir, NUM_CLASSES, output_dir, num_clusters=6)
    assert first["num_clusters"] == 6
    assert evaluate_folders(pred_dir, gt_dir, NUM_CLASSES, output_dir, num_clusters=6) == first  # its own files
    for inside in (pred_dir / "evaluation", gt_dir):  # outputs among the inputs would be read next time
        with pytest.raises(ConfigurationError, match="give a folder outside the inputs"):
            evaluate_folders(pred_dir, gt_dir, NUM_CLASSES, inside, num_clusters=6)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "metrics.txt").write_text("my notes")
    with pytest.raises(ConfigurationError, match="an earlier datus evaluate did not write"):
        evaluate_folders(pred_dir, gt_dir, NUM_CLASSES, notes, num_clusters=6)
    assert (notes / "metrics.txt").read_text() == "my notes"
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


# ----------------------------------------------------------------------------- classes.json, warnings, damaged files


def write_classes(path: Path, names: list[str], **extra: Any) -> None:
    path.write_text(json.dumps({"dataset": "test", "classes": names, "ignore_index": IGNORE, **extra}))


def test_classes_json_above_gt_gives_num_classes_and_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from datus.commands.cli import run_evaluate

    pred_dir, gt_dir, _, _ = build_folders(tmp_path)
    write_classes(tmp_path / "classes.json", ["sand", "reef", "fish"])
    result = evaluate_folders(pred_dir, gt_dir, None, tmp_path / "out")
    assert result["num_classes"] == NUM_CLASSES and result["class_names"] == ["sand", "reef", "fish"]
    assert result["classes_file"] == str(tmp_path.absolute() / "classes.json")
    assert "fish" in (tmp_path / "out" / "metrics.txt").read_text()
    # Same numbers as with an explicit, agreeing --num_classes.
    explicit = evaluate_folders(pred_dir, gt_dir, NUM_CLASSES, tmp_path / "out2")
    assert explicit["protocols"] == result["protocols"]
    # The console table shows the names.
    capsys.readouterr()
    run_evaluate(["--pred", str(pred_dir), "--gt", str(gt_dir), "--output_dir", str(tmp_path / "out3")])
    table = capsys.readouterr().out
    assert all(name in table for name in ("sand", "reef", "fish"))


def test_num_classes_that_disagrees_with_classes_json_is_refused(tmp_path: Path) -> None:
    pred_dir, gt_dir, _, _ = build_folders(tmp_path)
    write_classes(gt_dir / "classes.json", ["sand", "reef", "fish"])
    with pytest.raises(ConfigurationError, match=r"--num_classes 4 disagrees with .*gt/classes\.json, which names 3 classes"):
        evaluate_folders(pred_dir, gt_dir, 4, tmp_path / "out")
    (gt_dir / "classes.json").write_text("{not json")
    with pytest.raises(ConfigurationError, match=r"gt/classes\.json: not a readable classes\.json"):
        evaluate_folders(pred_dir, gt_dir, None, tmp_path / "out")
    (gt_dir / "classes.json").unlink()
    with pytest.raises(ConfigurationError, match=r"--num_classes is needed: no classes\.json"):
        evaluate_folders(pred_dir, gt_dir, None, tmp_path / "out")
    with pytest.raises(ConfigurationError, match=r"--num_classes must be >= 1, got 0"):
        evaluate_folders(pred_dir, gt_dir, 0, tmp_path / "out")
    with pytest.raises(ConfigurationError, match=r"--num_clusters must be >= 1"):
        evaluate_folders(pred_dir, gt_dir, NUM_CLASSES, tmp_path / "out", num_clusters=0)
    assert not (tmp_path / "out").exists()


def test_unpaired_and_resized_files_are_warned_about_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pred_dir, gt_dir, _, _ = build_folders(tmp_path)
    with caplog.at_level(logging.INFO, logger="datus.commands.evaluate"):
        evaluate_folders(pred_dir, gt_dir, NUM_CLASSES, tmp_path / "out")
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    missing = [message for message in warnings if "NO PREDICTION" in message]
    assert len(missing) == 1
    assert "1 of 3 ground-truth files" in missing[0] and "sub/c.png" in missing[0] and "dense" in missing[0]
    resized = [message for message in warnings if "were resized" in message]
    assert len(resized) == 1 and "1 prediction(s)" in resized[0] and "sub/b.png (8x8 -> 16x16)" in resized[0]
    infos = [record.getMessage() for record in caplog.records if record.levelno == logging.INFO]
    assert any("extra.png" in message and "no ground truth" in message for message in infos)


def test_same_or_nested_folders_are_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, gt_dir, _, _ = build_folders(tmp_path)
    with caplog.at_level(logging.WARNING, logger="datus.commands.evaluate"):
        evaluate_folders(gt_dir, gt_dir, NUM_CLASSES, tmp_path / "out")
    assert [record.getMessage() for record in caplog.records if "same folder" in record.getMessage()] != []
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="datus.commands.evaluate"), pytest.raises(ConfigurationError, match="pairs with"):
        evaluate_folders(tmp_path, gt_dir, NUM_CLASSES, tmp_path.parent / f"{tmp_path.name}-out")  # keys gt/a vs a
    nested = [record.getMessage() for record in caplog.records if "lies inside" in record.getMessage()]
    assert len(nested) == 1 and "gt_dir (--gt)" in nested[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="datus.commands.evaluate"):
        evaluate_folders(tmp_path / "pred", gt_dir, NUM_CLASSES, tmp_path / "out")
    assert not [record for record in caplog.records if "folder" in record.getMessage() and "inside" in record.getMessage()]


@pytest.mark.parametrize(("role", "relative"), [("ground-truth", "gt/a.png"), ("prediction", "pred/sub/b.png")])
def test_truncated_file_is_named_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], role: str, relative: str
) -> None:
    from datus.commands.cli import console_main

    pred_dir, gt_dir, _, _ = build_folders(tmp_path)
    damaged = tmp_path / relative
    damaged.write_bytes(damaged.read_bytes()[:60])
    with pytest.raises(ConfigurationError, match=rf"{role} file .*{relative} cannot be decoded"):
        evaluate_folders(pred_dir, gt_dir, NUM_CLASSES, tmp_path / "out")
    args = ["datus", "evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--num_classes", "3", "--output_dir", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", args)
    monkeypatch.setattr("datus.commands.cli._show_own_logs", lambda: None)
    with pytest.raises(SystemExit) as exit_info:
        console_main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith(f"datus: error: {role} file {damaged}") and err.count("\n") == 1 and "Traceback" not in err


def test_evaluate_a_prepared_dataset_without_num_classes(tmp_path: Path) -> None:
    """datus prepare writes classes.json two levels above <split>/true_masks; evaluate finds it."""
    from datus.commands.prepare import prepare_cocostuff27

    raw = tmp_path / "raw"
    fine = np.array([[0, 0, 93, 93], [156, 156, 255, 255]])
    for stem in ("000000000139", "000000000285"):
        (raw / "images" / "val2017").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 2)).save(raw / "images" / "val2017" / f"{stem}.jpg")
        save_labels(raw / "stuffthingmaps_trainval2017" / "val2017" / f"{stem}.png", fine)
    dataset = tmp_path / "cocostuff27"
    prepare_cocostuff27(raw, dataset)
    pred_dir = tmp_path / "pred"
    for stem in ("000000000139", "000000000285"):
        save_labels(pred_dir / f"{stem}.png", np.array([[4, 4, 1, 1], [2, 2, 2, 2]]))
    result = evaluate_folders(pred_dir, dataset / "val" / "true_masks", None, tmp_path / "out")
    assert result["num_classes"] == 27 and result["class_names"][9] == "person"
    assert result["mapping"]["4"] == 9 and result["mapping"]["1"] == 22 and result["mapping"]["2"] == 23
    assert result["protocols"]["dense"]["pixel_accuracy"] == pytest.approx(1.0)


def test_crf_moves_a_shifted_prediction_back_onto_the_colour_edge(tmp_path: Path) -> None:
    """Any method's label maps can be scored with and without a dense CRF on their images."""
    pytest.importorskip("pydensecrf.densecrf", reason="the 'crf' extra (pydensecrf2) is not installed")
    rng = np.random.default_rng(0)
    for folder in ("images", "gt", "pred"):
        (tmp_path / folder).mkdir()
    for index in range(2):
        truth = np.zeros((96, 128), np.uint8)
        truth[:, 64:] = 1
        pixels = np.where(truth[..., None] == 1, [210, 50, 40], [30, 70, 190]).astype(np.float64)
        Image.fromarray(np.clip(pixels + rng.normal(0, 6, pixels.shape), 0, 255).astype(np.uint8)).save(
            tmp_path / "images" / f"im{index}.png"
        )
        Image.fromarray(truth).save(tmp_path / "gt" / f"im{index}.png")
        shifted = np.zeros_like(truth)
        shifted[:, 76:] = 1  # the border 12 px off
        Image.fromarray(shifted).save(tmp_path / "pred" / f"im{index}.png")
    result = evaluate_folders(
        tmp_path / "pred", tmp_path / "gt", 2, tmp_path / "out", images_dir=tmp_path / "images", crf="both"
    )
    assert result["crf"]["applied"] and result["crf"]["settings"]["iterations"] == 10
    before, after = result["without_crf"]["dense"]["miou"], result["protocols"]["dense"]["miou"]
    assert before < 0.85 and after > 0.95, (before, after)
    with pytest.raises(ConfigurationError, match="--crf needs --images"):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt", 2, tmp_path / "out2", crf=True)
