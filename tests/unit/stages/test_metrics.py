"""Tests of datus.stages.metrics against an independent brute-force numpy reference.

The reference never builds a confusion matrix: it tries every injective cluster -> class
assignment, keeps the one that matches the most pixels, and counts TP/FP/FN with boolean masks.
"""

from __future__ import annotations

import datetime
import itertools
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from datus.outputs.drawing import save_confusion_png
from datus.stages.metric import MatchedSegmentationMetric
from datus.stages.metrics import (
    agreement_scores,
    format_protocol,
    format_table,
    match_clusters,
    metrics_from_confusion,
    pixel_counts,
    protocol_scores,
)

IGNORE = 255
DDP_TIMEOUT_S = 120.0


def brute_force_matching(preds: np.ndarray, target: np.ndarray, num_clusters: int, num_classes: int) -> dict[int, int]:
    """Best injective cluster -> class assignment by matched pixel count, found by enumeration.

    Asserts that the optimum is unique, so that the comparison with the Hungarian solver is not
    at the mercy of tie breaking.
    """
    if num_clusters >= num_classes:
        candidates = [
            dict(zip(clusters, range(num_classes), strict=True))
            for clusters in itertools.permutations(range(num_clusters), num_classes)
        ]
    else:
        candidates = [
            dict(zip(range(num_clusters), classes, strict=True))
            for classes in itertools.permutations(range(num_classes), num_clusters)
        ]
    scores = [
        sum(int(np.count_nonzero((preds == k) & (target == c))) for k, c in candidate.items())
        for candidate in candidates
    ]
    best = max(scores)
    assert scores.count(best) == 1, "test data has several optimal matchings; change the data"
    return candidates[scores.index(best)]


def reference_protocol(
    preds: np.ndarray,
    target: np.ndarray,
    noise: np.ndarray,
    num_clusters: int,
    num_classes: int,
    protocol: str,
) -> dict[str, Any]:
    """Scores of one protocol computed by counting pixels with numpy masks."""
    labelled = target != IGNORE
    if protocol == "dense":
        match_on = labelled & (preds != IGNORE)
    else:
        match_on = labelled & ~noise & (preds != IGNORE)
    mapping = brute_force_matching(preds[match_on], target[match_on], num_clusters, num_classes)
    if protocol == "dense":
        counted = labelled
    else:
        counted = match_on & np.isin(preds, list(mapping))
    predicted_class = np.full(preds.shape, -1)
    for cluster, c in mapping.items():
        predicted_class[preds == cluster] = c
    p, t = predicted_class[counted], target[counted]

    iou, accuracy, f1 = [], [], []
    total_tp = 0
    for c in range(num_classes):
        tp = int(np.count_nonzero((p == c) & (t == c)))
        fp = int(np.count_nonzero((p == c) & (t != c)))
        fn = int(np.count_nonzero((p != c) & (t == c)))
        total_tp += tp
        iou.append(tp / (tp + fp + fn) if tp + fp + fn else None)
        accuracy.append(tp / (tp + fn) if tp + fn else None)
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None)

    def mean(values: list[float | None]) -> float | None:
        defined = [v for v in values if v is not None]
        return sum(defined) / len(defined) if defined else None

    return {
        "mapping": {str(k): mapping.get(k) for k in range(num_clusters)},
        "per_class_iou": iou,
        "per_class_accuracy": accuracy,
        "per_class_f1": f1,
        "miou": mean(iou),
        "mean_accuracy": mean(accuracy),
        "mean_f1": mean(f1),
        "pixel_accuracy": total_tp / p.size,
        "num_pixels": int(p.size),
    }


def assert_close(actual: Any, expected: Any) -> None:
    """Equality for nested results: floats approximately, ``None`` exactly."""
    if isinstance(expected, list):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_close(a, e)
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, abs=1e-12)
    else:
        assert actual == expected


def check_against_reference(
    result: dict[str, Any],
    preds: np.ndarray,
    target: np.ndarray,
    noise: np.ndarray,
    num_clusters: int,
    num_classes: int,
) -> None:
    for protocol in ("dense", "paper"):
        expected = reference_protocol(preds, target, noise, num_clusters, num_classes, protocol)
        actual = result["protocols"][protocol]
        for key, value in expected.items():
            assert_close(actual[key], value)
            if isinstance(value, float):
                assert 0.0 <= actual[key] <= 1.0
    assert result["num_pixels"] == int(np.count_nonzero(target != IGNORE))
    assert result["num_clusters"] == num_clusters
    assert result["num_classes"] == num_classes


def random_case(
    num_clusters: int, num_classes: int, seed: int, size: int = 3000
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predictions that mostly follow a permuted class -> cluster rule, with all kinds of clutter."""
    rng = np.random.default_rng(seed)
    target = rng.choice(num_classes, size=size, p=rng.dirichlet(np.ones(num_classes) * 3))
    rule = rng.permutation(max(num_clusters, num_classes))[:num_classes] % num_clusters
    preds = np.where(rng.random(size) < 0.7, rule[target], rng.integers(0, num_clusters, size))
    preds[rng.random(size) < 0.05] = IGNORE
    target[rng.random(size) < 0.05] = IGNORE
    noise = rng.random(size) < 0.15
    preds[noise & (rng.random(size) < 0.7)] = rng.integers(0, num_clusters)
    return preds, target, noise


def run_metric(
    preds: np.ndarray, target: np.ndarray, noise: np.ndarray | None, num_clusters: int, num_classes: int
) -> dict[str, Any]:
    metric = MatchedSegmentationMetric(num_clusters, num_classes, ignore_index=IGNORE)
    metric.update(
        torch.from_numpy(preds), torch.from_numpy(target), None if noise is None else torch.from_numpy(noise)
    )
    return metric.compute()


@pytest.mark.parametrize(
    ("num_clusters", "num_classes", "seed"),
    [(3, 3, 0), (4, 4, 1), (5, 3, 2), (6, 4, 3), (2, 4, 4), (3, 5, 5), (1, 3, 6), (4, 1, 7)],
)
def test_matches_brute_force_reference(num_clusters: int, num_classes: int, seed: int) -> None:
    preds, target, noise = random_case(num_clusters, num_classes, seed)
    result = run_metric(preds, target, noise, num_clusters, num_classes)
    check_against_reference(result, preds, target, noise, num_clusters, num_classes)


def test_perfect_prediction_with_permuted_labels_scores_one() -> None:
    rng = np.random.default_rng(10)
    target = rng.integers(0, 4, size=(3, 20, 20))
    target[:, :2] = IGNORE
    permutation = np.array([2, 0, 3, 1, IGNORE])
    preds = permutation[np.where(target == IGNORE, 4, target)]
    result = run_metric(preds, target, None, 4, 4)
    for protocol in ("dense", "paper"):
        scores = result["protocols"][protocol]
        assert scores["miou"] == scores["pixel_accuracy"] == scores["mean_f1"] == scores["mean_accuracy"] == 1.0
        assert scores["mapping"] == {"2": 0, "0": 1, "3": 2, "1": 3}
        assert scores["num_pixels"] == 3 * 18 * 20


def test_k_greater_than_c_exact_values() -> None:
    # Cluster 2 is unmatched: dense counts its pixels as misses, paper leaves them out.
    target = np.array([0, 0, 0, 0, 0, 1, 1, 1, 0, IGNORE])
    preds = np.array([0, 0, 0, 2, 2, 1, 1, 2, IGNORE, 1])
    result = run_metric(preds, target, None, 3, 2)
    dense, paper = result["protocols"]["dense"], result["protocols"]["paper"]

    assert dense["mapping"] == paper["mapping"] == {"0": 0, "1": 1, "2": None}
    assert dense["num_pixels"] == result["num_pixels"] == 9
    # class 0: TP 3, FN 2 (cluster 2) + 1 (no prediction); class 1: TP 2, FN 1 (cluster 2).
    assert dense["per_class_iou"] == pytest.approx([3 / 6, 2 / 3])
    assert dense["per_class_accuracy"] == pytest.approx([3 / 6, 2 / 3])
    assert dense["per_class_f1"] == pytest.approx([6 / 9, 4 / 5])
    assert dense["miou"] == pytest.approx((3 / 6 + 2 / 3) / 2)
    assert dense["pixel_accuracy"] == pytest.approx(5 / 9)
    assert dense["confusion"] == [[3, 0], [0, 2], [2, 1]]

    assert paper["num_pixels"] == 5
    assert paper["miou"] == paper["pixel_accuracy"] == paper["mean_f1"] == 1.0
    assert paper["confusion"] == [[3, 0], [0, 2], [2, 1]]


def test_k_less_than_c_unmatched_class_gets_iou_zero() -> None:
    target = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    preds = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])
    result = run_metric(preds, target, None, 2, 3)
    for protocol in ("dense", "paper"):
        scores = result["protocols"][protocol]
        assert scores["mapping"] == {"0": 0, "1": 2}
        assert scores["per_class_iou"] == pytest.approx([3 / 5, 0.0, 1.0])
        assert scores["per_class_accuracy"] == pytest.approx([1.0, 0.0, 1.0])
        assert scores["miou"] == pytest.approx((3 / 5 + 1.0) / 3)
        assert scores["pixel_accuracy"] == pytest.approx(7 / 9)


def test_ignored_target_pixels_are_dropped() -> None:
    preds, target, noise = random_case(4, 3, seed=20)
    keep = target != IGNORE
    assert not keep.all()
    with_ignore = run_metric(preds, target, noise, 4, 3)
    without = run_metric(preds[keep], target[keep], noise[keep], 4, 3)
    assert with_ignore == without
    assert with_ignore["num_pixels"] == int(keep.sum())


def test_noise_pixels_are_excluded_in_paper_only() -> None:
    target = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    preds = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    noise = np.array([False] * 6 + [True, True])
    result = run_metric(preds, target, noise, 2, 2)
    dense, paper = result["protocols"]["dense"], result["protocols"]["paper"]
    assert paper["miou"] == paper["pixel_accuracy"] == 1.0
    assert paper["num_pixels"] == 6
    assert paper["confusion"] == [[0, 3], [3, 0]]
    assert dense["mapping"] == {"0": 1, "1": 0}
    assert dense["per_class_iou"] == pytest.approx([3 / 5, 3 / 5])
    assert dense["pixel_accuracy"] == pytest.approx(6 / 8)
    assert dense["confusion"] == [[1, 3], [3, 1]]


def test_class_absent_from_truth_and_prediction_is_left_out_of_the_mean() -> None:
    target = np.array([0, 0, 0, 2, 2, 2, 2])
    preds = np.array([0, 0, 1, 1, 1, 1, 1])
    result = run_metric(preds, target, None, 2, 3)
    for protocol in ("dense", "paper"):
        scores = result["protocols"][protocol]
        assert scores["per_class_iou"][1] is None
        assert scores["per_class_accuracy"][1] is None
        assert scores["per_class_f1"][1] is None
        assert scores["per_class_iou"] == pytest.approx([2 / 3, None, 4 / 5])
        assert scores["miou"] == pytest.approx((2 / 3 + 4 / 5) / 2)
        assert scores["mean_f1"] == pytest.approx((4 / 5 + 8 / 9) / 2)


def test_class_absent_from_truth_but_predicted_counts_as_zero() -> None:
    # With K = C every class gets a cluster; a predicted but absent class is a false positive.
    target = np.array([0, 0, 0, 1, 1])
    preds = np.array([0, 0, 0, 1, 2])
    scores = run_metric(preds, target, None, 3, 3)["protocols"]["dense"]
    assert scores["mapping"] == {"0": 0, "1": 1, "2": 2}
    assert scores["per_class_iou"] == pytest.approx([1.0, 0.5, 0.0])
    assert scores["per_class_accuracy"][2] is None
    assert scores["mean_accuracy"] == pytest.approx(0.75)


def test_accumulating_batches_equals_one_update() -> None:
    preds, target, noise = random_case(5, 3, seed=30, size=2800)
    metric = MatchedSegmentationMetric(5, 3)
    for batch in range(4):
        part = slice(700 * batch, 700 * (batch + 1))
        metric.update(*(torch.from_numpy(array[part]).reshape(7, 100) for array in (preds, target, noise)))
    assert metric.compute() == run_metric(preds, target, noise, 5, 3)


def test_state_is_one_int64_count_tensor() -> None:
    preds, target, noise = random_case(4, 3, seed=40, size=500)
    metric = MatchedSegmentationMetric(4, 3)
    metric.update(torch.from_numpy(preds), torch.from_numpy(target), torch.from_numpy(noise))
    assert metric.confusion.dtype == torch.int64
    assert metric.confusion.shape == (2, 5, 3)
    assert int(metric.confusion.sum()) == int(np.count_nonzero(target != IGNORE))
    assert int(metric.confusion[1].sum()) == int(np.count_nonzero(noise & (target != IGNORE)))
    assert int(metric.confusion[:, 4].sum()) == int(np.count_nonzero((preds == IGNORE) & (target != IGNORE)))


def test_expanded_keeps_counts() -> None:
    preds, target, noise = random_case(3, 3, seed=50, size=500)
    metric = MatchedSegmentationMetric(3, 3)
    metric.update(torch.from_numpy(preds), torch.from_numpy(target), torch.from_numpy(noise))
    grown = metric.expanded(5)
    direct = MatchedSegmentationMetric(5, 3)
    direct.update(torch.from_numpy(preds), torch.from_numpy(target), torch.from_numpy(noise))
    assert torch.equal(grown.confusion, direct.confusion)


def test_bad_inputs_raise() -> None:
    metric = MatchedSegmentationMetric(3, 2)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        metric.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target holds values 2, 7 .*ignore index \(255\)"):
        metric.update(torch.tensor([0, 1, 2]), torch.tensor([0, 7, 2]))
    with pytest.raises(ValueError, match=r"preds holds values -1, 3 .*ignore index"):
        metric.update(torch.tensor([0, -1, 3, 255]), torch.tensor([0, 1, 1, 1]))
    with pytest.raises(TypeError, match="integer"):
        metric.update(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="noise"):
        metric.update(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([True]))
    assert int(metric.confusion.sum()) == 0
    with pytest.raises(ValueError, match="ignore_index"):
        MatchedSegmentationMetric(300, 2, ignore_index=255)
    with pytest.raises(ValueError, match="num_clusters"):
        MatchedSegmentationMetric(0, 2)


def test_pure_functions() -> None:
    confusion = np.array([[5, 1], [0, 7], [4, 0]])
    assert match_clusters(confusion).tolist() == [0, 1, -1]
    assert match_clusters(confusion.T).tolist() == [0, 1]
    scores = protocol_scores(confusion, np.array([0, 1, -1]), np.array([2, 0]))
    assert scores["per_class_iou"] == pytest.approx([5 / 12, 7 / 8])
    assert scores["num_pixels"] == 19
    assert scores["pixel_accuracy"] == pytest.approx(12 / 19)
    empty = metrics_from_confusion(np.zeros((2, 3, 2), dtype=np.int64))
    assert empty["protocols"]["dense"]["miou"] is None
    assert empty["protocols"]["paper"]["pixel_accuracy"] is None


@pytest.mark.parametrize("seed", range(6))
def test_nmi_and_ari_equal_scikit_learn_on_the_same_pixels(seed: int) -> None:
    """Both protocols' NMI/ARI against scikit-learn on the pixel labels each protocol keeps."""
    preds, target, noise = random_case(6, 4, seed=seed, size=3000)
    result = run_metric(preds, target, noise, 6, 4)
    keep = target != IGNORE
    dense = result["protocols"]["dense"]
    assert dense["nmi"] == pytest.approx(normalized_mutual_info_score(target[keep], preds[keep]), abs=1e-9)
    assert dense["ari"] == pytest.approx(adjusted_rand_score(target[keep], preds[keep]), abs=1e-9)
    paper = result["protocols"]["paper"]
    mapping = paper["mapping"]
    matched = np.array([mapping[str(p)] is not None if p != IGNORE else False for p in preds])
    kept = keep & ~noise & matched
    assert paper["nmi"] == pytest.approx(normalized_mutual_info_score(target[kept], preds[kept]), abs=1e-9)
    assert paper["ari"] == pytest.approx(adjusted_rand_score(target[kept], preds[kept]), abs=1e-9)


def test_agreement_scores_of_perfect_and_of_one_label() -> None:
    perfect = agreement_scores(np.array([[0, 9], [4, 0]]))
    assert perfect["nmi"] == pytest.approx(1.0) and perfect["ari"] == pytest.approx(1.0)
    assert agreement_scores(np.zeros((2, 2))) == {"nmi": None, "ari": None}
    one_cluster = agreement_scores(np.array([[5, 5]]))
    assert one_cluster["nmi"] == pytest.approx(normalized_mutual_info_score([0] * 5 + [1] * 5, [0] * 10))
    assert one_cluster["ari"] == pytest.approx(0.0)


def test_format_table_and_confusion_png(tmp_path: Path) -> None:
    preds, target, noise = random_case(5, 3, seed=60, size=800)
    result = run_metric(preds, target, noise, 5, 3)
    table = format_table(result, ["water", "reef", "fish"])
    assert "water" in table and "reef" in table and "fish" in table
    assert "dense: mIoU" in table and "paper: mIoU" in table
    assert f"{100 * result['protocols']['dense']['miou']:.2f}" in table

    dense = result["protocols"]["dense"]
    path = tmp_path / "confusion.png"
    save_confusion_png(np.array(dense["confusion"]), dense["mapping"], path, ["water", "reef", "fish"])
    with Image.open(path) as image:
        assert image.mode == "RGB"
        assert image.width >= 3 * 24 and image.height >= 5 * 24
    assert [p.name for p in tmp_path.iterdir()] == ["confusion.png"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ddp_worker(rank: int, world_size: int, port: int, data_file: str, out_dir: str) -> None:
    # A forked child must not enter the parent's OpenMP pool; the work here is tiny anyway.
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        data = np.load(data_file)
        # Uneven split: ranks may see different numbers of pixels and batches.
        split = int(data["preds"].size * 0.4)
        part = slice(0, split) if rank == 0 else slice(split, None)
        preds, target, noise = (torch.from_numpy(data[name][part]) for name in ("preds", "target", "noise"))
        metric = MatchedSegmentationMetric(5, 3)
        for chunk in range(0, preds.numel(), 500):
            window = slice(chunk, chunk + 500)
            metric.update(preds[window], target[window], noise[window])
        result = metric.compute()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "start_method",
    [
        pytest.param("fork", marks=pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")),
        pytest.param("spawn", marks=pytest.mark.slow),
    ],
)
def test_ddp_sync_equals_single_process(tmp_path: Path, start_method: str) -> None:
    """Two gloo ranks with uneven halves of the data give the single-process result.

    ``fork`` is the default variant because spawned children must import torch and torchmetrics
    again (10-20 s on a loaded 2-core machine); ``spawn`` (what multi-node jobs use) is the slow
    variant.
    """
    preds, target, noise = random_case(5, 3, seed=70)
    data_file = tmp_path / "data.npz"
    np.savez(data_file, preds=preds, target=target, noise=noise)
    context = mp.start_processes(
        _ddp_worker,
        args=(2, _free_port(), str(data_file), str(tmp_path)),
        nprocs=2,
        join=False,
        start_method=start_method,
    )
    deadline = time.monotonic() + DDP_TIMEOUT_S
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"DDP workers did not finish within {DDP_TIMEOUT_S} s")
    expected = json.loads(json.dumps(run_metric(preds, target, noise, 5, 3)))
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected


def test_numpy_pixel_counts_equal_the_metric_update() -> None:
    preds, target, noise = random_case(5, 3, seed=11, size=5000)
    preds = np.where(preds == IGNORE, 0, preds)  # datus's own masks are dense
    counted = MatchedSegmentationMetric(5, 3, ignore_index=IGNORE)
    counted.update(counts=torch.from_numpy(pixel_counts(preds, target, noise, 5, 3, IGNORE)))
    assert counted.compute() == run_metric(preds, target, noise, 5, 3)
    with pytest.raises(ValueError, match="counts must have shape"):
        counted.update(counts=torch.zeros(2, 5, 3, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("ignore", [IGNORE, 1])  # past the classes (the usual 255) or one of them
def test_pixel_counts_of_label_maps_equal_counting_selected_pixels(dtype: type, ignore: int) -> None:
    """Unsigned label maps take the lookup path; int64 maps select the kept pixels first."""
    rng = np.random.default_rng(5)
    preds = rng.integers(0, 4, size=(37, 53))
    target = rng.choice([0, 1, 2, ignore], size=(37, 53))
    noise = rng.random((37, 53)) < 0.3
    expected = pixel_counts(preds.astype(np.int64), target.astype(np.int64), noise, 4, 3, ignore)
    assert expected.sum() == (target != ignore).sum()
    assert np.array_equal(pixel_counts(preds.astype(dtype), target.astype(dtype), noise, 4, 3, ignore), expected)


def _stego_reference(preds: np.ndarray, target: np.ndarray, num_classes: int) -> tuple[float, float]:
    """STEGO's ``UnsupervisedMetrics`` (src/utils.py, extra_clusters = 0), re-derived in numpy:
    drop pixels whose prediction or target lies outside [0, C), build the C x C matrix, match
    with the Hungarian algorithm, mIoU over classes with a defined IoU, accuracy over kept pixels."""
    from scipy.optimize import linear_sum_assignment

    keep = (target >= 0) & (target < num_classes) & (preds >= 0) & (preds < num_classes)
    stats = np.bincount(num_classes * target[keep] + preds[keep], minlength=num_classes**2).reshape(num_classes, num_classes).T
    _, columns = linear_sum_assignment(stats, maximize=True)
    histogram = stats[np.argsort(columns), :].astype(np.float64)
    tp = np.diag(histogram)
    iou = tp / (tp + (histogram.sum(0) - tp) + (histogram.sum(1) - tp))
    return float(np.nanmean(iou)), float(tp.sum() / histogram.sum())


def test_the_three_protocols_differ_as_their_definitions_say_when_k_exceeds_c() -> None:
    """K = 5 > C = 3 with noise, ignored pixels and a cluster id >= C holding pixels: stego equals an
    independent re-derivation of STEGO's metric, dense counts every pixel, paper drops noise and
    unmatched clusters; with K = C stego equals dense."""
    rng = np.random.default_rng(7)
    target = rng.integers(0, 3, 4000)
    preds = np.where(rng.random(4000) < 0.7, target, rng.integers(0, 5, 4000))
    preds[target == 2] = np.where(rng.random(int((target == 2).sum())) < 0.5, 4, 2)  # half of class 2 in cluster 4 >= C
    target[:100] = IGNORE
    noise = rng.random(4000) < 0.2
    counts = pixel_counts(preds.astype(np.uint8), target.astype(np.uint8), noise, 5, 3, IGNORE)
    metrics = metrics_from_confusion(counts)
    stego = metrics["protocols"]["stego"]
    miou, accuracy = _stego_reference(preds, target, 3)
    assert stego["miou"] == pytest.approx(miou, abs=1e-12) and stego["pixel_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    kept = target != IGNORE
    assert stego["dropped_pixels"] == int((kept & (preds >= 3)).sum()) > 0
    assert metrics["protocols"]["dense"]["num_pixels"] == int(kept.sum())
    assert metrics["protocols"]["paper"]["num_pixels"] < int((kept & ~noise).sum())  # unmatched clusters dropped too
    assert stego["miou"] > metrics["protocols"]["dense"]["miou"]  # dropping clusters >= C flatters
    assert set(stego["mapping"]) == {str(k) for k in range(5)} and stego["mapping"]["4"] is None

    square = pixel_counts(np.minimum(preds, 2).astype(np.uint8), target.astype(np.uint8), noise, 3, 3, IGNORE)
    same = metrics_from_confusion(square)["protocols"]
    assert same["stego"]["miou"] == pytest.approx(same["dense"]["miou"], abs=1e-12)
    assert same["stego"]["pixel_accuracy"] == pytest.approx(same["dense"]["pixel_accuracy"], abs=1e-12)


def test_one_protocol_prints_as_its_peers_report_it() -> None:
    counts = pixel_counts(np.array([[0, 1, 3]], np.uint8), np.array([[0, 1, 1]], np.uint8), np.zeros((1, 3), bool), 4, 2, IGNORE)
    text = format_protocol(metrics_from_confusion(counts), "stego", ["sky", "sea"])
    assert text.splitlines()[0].startswith("stego protocol (ids >= C dropped")
    assert "mIoU 100.00  Accuracy 100.00" in text and "1 pixels of cluster ids >= C dropped" in text
    paper = format_protocol(metrics_from_confusion(counts), "paper")
    assert "mIoU" in paper and "mean F1" in paper and "Accuracy" not in paper
