"""Dense-CRF refinement (datus.stages.crf): borders move onto colour edges, inputs, memory path, workers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip(
    "pydensecrf.densecrf", reason="dense-CRF tests need the 'crf' extra: pip install -e '.[crf]' (pydensecrf2)"
)

from datus.stages.crf import (  # noqa: E402
    MISSING_EXTRA,
    CRFJob,
    CRFParams,
    pixel_probabilities,
    refine,
    refine_job,
    refine_many,
    refine_segments,
    segment_probabilities,
    working_size,
)
from datus.core.errors import ConfigurationError  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
COLOURS = np.array([[40, 70, 150], [210, 180, 50], [60, 170, 80]], dtype=np.float64)


def scene(height: int = 96, width: int = 128, noise: float = 2.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A flat blue background (0), a yellow rectangle (1) and a green disc (2), with mild noise."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((height, width), dtype=np.int64)
    truth[height * 20 // 96 : height * 70 // 96, width * 16 // 128 : width * 72 // 128] = 1
    rows, cols = np.mgrid[:height, :width]
    radius = min(height, width) * 22 // 96
    truth[(rows - height * 56 // 96) ** 2 + (cols - width * 96 // 128) ** 2 < radius**2] = 2
    image = COLOURS[truth] + rng.normal(0, noise, (height, width, 3))
    return np.clip(image, 0, 255).round().astype(np.uint8), truth


def soft(labels: np.ndarray, num_labels: int, confidence: float) -> np.ndarray:
    """K x H x W probabilities: ``confidence`` on ``labels``, the rest shared by the others."""
    probabilities = np.full((num_labels, *labels.shape), (1 - confidence) / (num_labels - 1), dtype=np.float32)
    np.put_along_axis(probabilities, labels[None], np.float32(confidence), axis=0)
    return probabilities


def mean_iou(predicted: np.ndarray, truth: np.ndarray, num_labels: int) -> float:
    return float(
        np.mean([((predicted == c) & (truth == c)).sum() / ((predicted == c) | (truth == c)).sum() for c in range(num_labels)])
    )


def assert_hole_free(labels: np.ndarray, size: tuple[int, int], num_labels: int) -> None:
    assert labels.shape == size and labels.dtype == np.uint8
    assert labels.min() >= 0 and labels.max() < num_labels


# --- refinement ---------------------------------------------------------------------------------


@pytest.mark.parametrize("distortion", ["shifted", "dilated"])
def test_refinement_moves_borders_onto_colour_edges(distortion: str) -> None:
    image, truth = scene()
    if distortion == "shifted":
        off = np.roll(truth, (5, 5), axis=(0, 1))
    else:  # the rectangle grown by 5 px on every side, over background and disc alike
        off = truth.copy()
        rows, cols = np.nonzero(truth == 1)
        off[rows.min() - 5 : rows.max() + 6, cols.min() - 5 : cols.max() + 6] = 1
    before = mean_iou(off, truth, 3)
    refined = refine(image, soft(off, 3, confidence=0.6))
    after = mean_iou(refined, truth, 3)
    assert_hole_free(refined, truth.shape, 3)
    assert before < 0.86  # the distortion is real (0.73 shifted, 0.85 dilated)
    assert after > 0.97
    assert after - before > 0.12


def test_patch_grid_mask_snaps_to_edges() -> None:
    """The DatUS case: one segment per 8 px patch (centre-sampled labels), soft from distances."""
    image, truth = scene(height=100, width=132)  # not a multiple of the patch size
    grid = truth[4::8, 4::8]
    segment_map = np.arange(grid.size, dtype=np.int32).reshape(grid.shape)
    distances = np.full((grid.size, 3), 2.0)
    distances[np.arange(grid.size), grid.ravel()] = 1.2  # unit vectors: cos 0.4 vs 0.0
    probabilities = pixel_probabilities(segment_probabilities(distances), segment_map, truth.shape)
    blocky = probabilities.argmax(axis=0)
    refined = refine(image, probabilities)
    assert_hole_free(refined, truth.shape, 3)
    assert mean_iou(refined, truth, 3) > max(0.97, mean_iou(blocky, truth, 3) + 0.03)


def test_confident_one_hot_labels_stay_put_in_flat_regions() -> None:
    image, truth = scene()
    one_hot = (np.arange(3)[:, None, None] == truth[None]).astype(np.float32)
    refined = refine(image, one_hot)
    assert_hole_free(refined, truth.shape, 3)
    # Flat regions: pixels whose 5 x 5 neighbourhood has one true label.
    padded = np.pad(truth, 2, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (5, 5))
    flat = (windows == truth[..., None, None]).all(axis=(-2, -1))
    assert flat.mean() > 0.8
    np.testing.assert_array_equal(refined[flat], truth[flat])
    assert (refined == truth).mean() > 0.995


def test_single_label_is_all_zeros() -> None:
    image, truth = scene(height=20, width=30)
    labels = refine(image, np.ones((1, 20, 30), dtype=np.float32))
    assert_hole_free(labels, (20, 30), 1)
    assert not labels.any()
    segment_labels = refine_segments(image, np.ones((4, 1), dtype=np.float32), np.arange(4).reshape(2, 2))
    assert_hole_free(segment_labels, (20, 30), 1)


def test_zero_and_unnormalised_probabilities_still_give_every_pixel_a_label() -> None:
    image, truth = scene(height=40, width=50)
    probabilities = soft(truth, 3, 0.7) * 5.0
    probabilities[:, :10, :10] = 0.0  # no information at all: clipped to equal unaries
    labels = refine(image, probabilities)
    assert_hole_free(labels, truth.shape, 3)
    np.testing.assert_array_equal(refine(image, probabilities), refine(image, probabilities / 5.0))


def test_read_only_and_strided_inputs_are_accepted() -> None:
    image, truth = scene(height=40, width=50)
    probabilities = soft(truth, 3, 0.7)
    expected = refine(image, probabilities)
    frozen = np.asarray(Image.fromarray(image))  # PIL arrays are read-only
    assert not frozen.flags.writeable
    np.testing.assert_array_equal(refine(frozen, probabilities), expected)
    bgr_view = np.ascontiguousarray(image[..., ::-1])[..., ::-1]  # non-contiguous view, same pixels
    np.testing.assert_array_equal(refine(bgr_view, probabilities.astype(np.float64)), expected)


def test_bad_inputs_are_refused() -> None:
    image, truth = scene(height=20, width=30)
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        refine(image.astype(np.float32), soft(truth, 3, 0.7))
    with pytest.raises(ValueError, match="K x H x W"):
        refine(image, soft(truth, 3, 0.7)[:, :10])
    bad = soft(truth, 3, 0.7)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        refine(image, bad)


# --- soft inputs from segments ------------------------------------------------------------------


def test_segment_probabilities_match_a_loop() -> None:
    rng = np.random.default_rng(1)
    distances = rng.uniform(0, 4, size=(5, 3))
    for temperature in (1.0, 0.25):
        expected = np.empty_like(distances)
        for s in range(5):
            weights = [np.exp(-distances[s, k] / temperature) for k in range(3)]
            expected[s] = [w / sum(weights) for w in weights]
        got = segment_probabilities(distances, temperature)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_segment_probabilities_equal_stego_softmax_of_twice_the_cosine() -> None:
    rng = np.random.default_rng(2)
    points = rng.normal(size=(6, 8))
    centroids = rng.normal(size=(4, 8))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    squared = ((points[:, None] - centroids[None]) ** 2).sum(-1)
    logits = 2 * points @ centroids.T
    stego = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(segment_probabilities(squared), stego, rtol=1e-5)


def test_segment_probabilities_are_stable_and_checked() -> None:
    far = segment_probabilities(np.array([[1e4, 1e4 + 1.0]]))
    np.testing.assert_allclose(far, [[1 / (1 + np.exp(-1)), 1 - 1 / (1 + np.exp(-1))]], rtol=1e-5)
    with pytest.raises(ValueError, match="S x K"):
        segment_probabilities(np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        segment_probabilities(np.array([[np.inf, 0.0]]))
    with pytest.raises(ValueError, match="temperature"):
        segment_probabilities(np.zeros((2, 2)), temperature=0)


def test_pixel_probabilities_match_a_loop() -> None:
    rng = np.random.default_rng(3)
    segment_probs = rng.dirichlet(np.ones(3), size=4).astype(np.float32)
    segment_map = rng.integers(0, 4, size=(3, 4)).astype(np.int32)
    height, width = 7, 10
    got = pixel_probabilities(segment_probs, segment_map, (height, width))
    assert got.shape == (3, height, width) and got.dtype == np.float32 and got.flags.c_contiguous
    for y in range(height):
        for x in range(width):
            cell = segment_map[int((y + 0.5) * 3 / height), int((x + 0.5) * 4 / width)]  # the cell its centre is in
            np.testing.assert_array_equal(got[:, y, x], segment_probs[cell])
    # Its argmax is the unrefined DatUS mask: segment labels painted with nearest neighbour.
    from datus.stages.paint import upsample_nearest

    np.testing.assert_array_equal(got.argmax(0), upsample_nearest(segment_probs.argmax(1)[segment_map], (height, width)))


def test_pixel_probabilities_refuse_ids_outside_the_segments() -> None:
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        pixel_probabilities(np.full((2, 2), 0.5), np.array([[0, 2]]), (4, 4))
    with pytest.raises(ValueError, match="integer"):
        pixel_probabilities(np.full((2, 2), 0.5), np.zeros((2, 2)), (4, 4))


# --- pixel budget -------------------------------------------------------------------------------


def test_working_size_keeps_aspect_within_budget() -> None:
    assert working_size((480, 640), 4_000_000) == (480, 640)
    height, width = working_size((3000, 4000), 4_000_000)
    assert height * width <= 4_000_000 and abs(width / height - 4 / 3) < 0.01 and height * width > 3_990_000
    assert working_size((1, 10_000), 10) == (1, 10)
    assert working_size((5, 5), 1) == (1, 1)


def test_large_image_is_refined_downscaled_to_a_full_size_map() -> None:
    image, truth = scene(height=480, width=640)
    params = CRFParams(max_pixels=30_000)  # runs at 150 x 200
    off = np.roll(truth, (20, 20), axis=(0, 1))
    labels = refine(image, soft(off, 3, 0.6), params)
    assert_hole_free(labels, truth.shape, 3)
    assert mean_iou(labels, truth, 3) > 0.93 > mean_iou(off, truth, 3)

    grid = off[8::16, 8::16]
    segment_map = np.arange(grid.size).reshape(grid.shape)
    segment_probs = soft(grid.ravel()[None], 3, 0.6)[:, 0].T
    labels = refine_segments(image, segment_probs, segment_map, params)
    assert_hole_free(labels, truth.shape, 3)
    assert mean_iou(labels, truth, 3) > 0.93


def test_within_budget_refine_segments_equals_refine() -> None:
    image, truth = scene(height=64, width=80)
    grid = np.roll(truth, (4, 4), axis=(0, 1))[4::8, 4::8]
    segment_map = np.arange(grid.size).reshape(grid.shape)
    segment_probs = soft(grid.ravel()[None], 3, 0.6)[:, 0].T
    np.testing.assert_array_equal(
        refine_segments(image, segment_probs, segment_map),
        refine(image, pixel_probabilities(segment_probs, segment_map, truth.shape)),
    )


# --- many images --------------------------------------------------------------------------------


def _jobs(count: int) -> list[CRFJob]:
    jobs = []
    for index in range(count):
        image, truth = scene(height=48 + 8 * index, width=64 + 4 * index, seed=index)
        grid = np.roll(truth, (3, 3), axis=(0, 1))[4::8, 4::8]
        segment_probs = soft(grid.ravel()[None], 3, 0.6)[:, 0].T
        jobs.append(CRFJob(image, segment_probs, np.arange(grid.size, dtype=np.int32).reshape(grid.shape)))
    return jobs


def test_refine_many_with_two_workers_equals_sequential_in_order() -> None:
    jobs = _jobs(5)
    sequential = [refine_job(job) for job in jobs]
    parallel = list(refine_many(iter(jobs), workers=2, max_pending=2))
    assert len(parallel) == len(jobs)
    for got, expected in zip(parallel, sequential):
        assert got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
    assert [labels.shape for labels in refine_many(jobs, workers=1)] == [labels.shape for labels in sequential]


def test_refine_many_raises_a_failing_job_and_stops_cleanly() -> None:
    jobs = _jobs(3)
    broken = CRFJob(jobs[1].image, jobs[1].segment_probs, jobs[1].segment_map + 1000)
    results = refine_many([jobs[0], broken, jobs[2]], workers=2)
    np.testing.assert_array_equal(next(results), refine_job(jobs[0]))
    with pytest.raises(ValueError, match="segment map ids"):
        next(results)
    early = refine_many(_jobs(4), workers=2)
    next(early)
    early.close()  # cancels what has not started, shuts the pool down


def test_jobs_can_carry_image_paths(tmp_path: Path) -> None:
    image, truth = scene(height=48, width=64)
    Image.fromarray(image).save(tmp_path / "a.png")
    job = _jobs(1)[0]
    from_path = CRFJob(tmp_path / "a.png", job.segment_probs, job.segment_map)
    (labels,) = refine_many([from_path], workers=1)
    np.testing.assert_array_equal(labels, refine_job(job))


# --- settings and packaging ---------------------------------------------------------------------


def test_defaults_are_stegos() -> None:
    params = CRFParams()
    assert (params.iterations, params.gaussian_sxy, params.gaussian_compat) == (10, 1, 3)
    assert (params.bilateral_sxy, params.bilateral_srgb, params.bilateral_compat) == (67, 3, 4)
    assert params.temperature == 1 and params.max_pixels == 4_000_000


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("iterations", 0, "--crf.iterations must be a positive whole number, got 0"),
        ("iterations", 2.5, "--crf.iterations must be a positive whole number"),
        ("iterations", True, "--crf.iterations must be a positive whole number"),
        ("gaussian_sxy", -1.0, "--crf.gaussian_sxy must be a positive number, got -1.0"),
        ("gaussian_compat", 0, "--crf.gaussian_compat must be a positive number"),
        ("bilateral_sxy", float("nan"), "--crf.bilateral_sxy must be a positive number"),
        ("bilateral_srgb", float("inf"), "--crf.bilateral_srgb must be a positive number"),
        ("bilateral_compat", "4", "--crf.bilateral_compat must be a positive number"),
        ("temperature", 0.0, "--crf.temperature must be a positive number"),
        ("max_pixels", 0, "--crf.max_pixels must be a positive whole number"),
    ],
)
def test_params_validation_names_the_option(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        CRFParams(**{field: value})
    assert str(caught.value).startswith(message)


def test_missing_extra_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)  # import now raises ImportError
    image, truth = scene(height=20, width=30)
    with pytest.raises(ConfigurationError, match=r"pip install 'datus\[crf\]'") as caught:
        refine(image, soft(truth, 3, 0.7))
    assert str(caught.value) == MISSING_EXTRA


def test_module_imports_fast_without_torch_or_pydensecrf() -> None:
    code = "import sys, datus.stages.crf; print(sorted(m for m in ('torch', 'lightning', 'timm', 'pydensecrf') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
