"""Accuracy that can be checked without pretrained weights: a hand-set ViT on planted colour scenes.

The planted network (:mod:`tests.planted`) makes patch keys and segment embeddings encode the
colour of a patch, and the scenes are flat colour regions with curved borders. A correct pipeline
then gets every pixel right except those of patches that straddle a border: dense mIoU >= 0.98 at
an 80 x 80 patch grid, and 100 % accuracy once every ground-truth border is eroded by one patch.
A mask painted a patch off, an EXIF rotation missed, or two labels swapped between the fit and
the painting breaks that, which random-weight runs never show.

Everything goes through the real CLI (``datus predict``, ``datus cluster``, ``python -m datus``
for DDP). Scoring here is independent of datus: numpy confusion counts and a brute-force
matching over the 24 permutations of 4 classes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from datus.commands.cli import main
from datus.core.io import read_label_png
from tests.generated import run_ddp_predict
from tests.planted import (
    NUM_CLASSES,
    SCENES_A,
    SCENES_B,
    Scene,
    best_matching,
    classes_of_centroids,
    confusion,
    interior,
    patch_radius,
    write_planted_config,
    write_planted_weights,
    write_scenes,
)

pytestmark = pytest.mark.integration

GRID = 80
"""Patches per side of the model input (image_size = GRID x patch size). Only patches that straddle
a border can be wrong, so mIoU grows with the grid; at 80 an ideal painting of these scenes scores
0.985 (the patch grid's own limit, which the runs below reach exactly)."""

MIN_MIOU = 0.98

CASES = [(8, "crop"), (8, "packed"), (16, "crop"), (16, "packed")]
CASE_IDS = [f"patch{patch}-{embedding}" for patch, embedding in CASES]


def crf_missing() -> str | None:
    """Why the CRF cases cannot run here, or None when ``datus.stages.crf`` has pydensecrf2."""
    try:
        import pydensecrf.densecrf  # noqa: F401  (what datus.stages.crf needs; the `crf` extra installs it)

        import datus.stages.crf  # noqa: F401
    except ImportError as error:
        return f"--cluster.crf needs the crf extra (pydensecrf2): {error}"
    return None


@dataclass
class Planted:
    """Scenes, weights and configs written once for the module; runs made on first use."""

    root: Path
    runs: dict[tuple[int, str], Path] = field(default_factory=dict)

    @property
    def scenes_a(self) -> Path:
        return self.root / "scenes_a"

    @property
    def scenes_b(self) -> Path:
        return self.root / "scenes_b"

    def config(self, patch: int) -> Path:
        path = self.root / f"planted{patch}.yaml"
        if not path.is_file():
            weights = write_planted_weights(self.root / f"planted{patch}.pth", patch)
            write_planted_config(path, patch, weights, grid=GRID)
        return path

    def predict_flags(self, patch: int, embedding: str, scenes: Path, output_dir: Path) -> list[str]:
        return [
            "predict", "--config", str(self.config(patch)), "--model.embedding", embedding,
            "--data.root", str(scenes / "images"), "--data.mask_dir", str(scenes / "masks"),
            "--output_dir", str(output_dir),
        ]  # fmt: skip

    def run(self, patch: int, embedding: str) -> Path:
        """The single-process fp32 ``datus predict`` of scenes A for a case (made once)."""
        key = (patch, embedding)
        if key not in self.runs:
            output_dir = self.root / f"run-{patch}-{embedding}"
            main(self.predict_flags(patch, embedding, self.scenes_a, output_dir))
            self.runs[key] = output_dir
        return self.runs[key]


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Planted:
    root = tmp_path_factory.mktemp("planted")
    state = Planted(root)
    write_scenes(state.scenes_a, SCENES_A)
    write_scenes(state.scenes_b, SCENES_B)
    return state


@dataclass(frozen=True)
class Quality:
    miou: float
    eroded_accuracy: float
    eroded_errors: int
    eroded_pixels: int
    matching: dict[int, int]


def measure(results: Path, scenes_root: Path, scenes: tuple[Scene, ...]) -> Quality:
    """Score a results folder's masks against the planted ground truth, without datus's metric code.

    Checks first that datus scored every image (an image left out of scoring, e.g. for a mask of
    the wrong size, would raise its mIoU unseen), that its matching is the one found here, and
    that each cluster paints the colour its centroid in ``fit/`` stands for (a matching absorbs
    any renaming of clusters, so only the fit can tell that painting swapped two of them).
    """
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics["num_images"] == len(scenes)
    pairs = [
        (read_label_png(results / "masks" / f"{scene.name}.png"), read_label_png(scenes_root / "masks" / f"{scene.name}.png"))
        for scene in scenes
    ]
    counts = confusion(pairs, NUM_CLASSES, NUM_CLASSES)
    assert int(counts.sum()) == metrics["protocols"]["dense"]["num_pixels"]
    matching = best_matching(counts)
    assert {int(k): v for k, v in metrics["mapping"].items()} == matching
    matched = np.zeros_like(counts)
    for cluster, true_class in matching.items():
        matched[:, true_class] += counts[cluster]
    hits = np.diag(matched)
    miou = float(np.mean(hits / (matched.sum(0) + matched.sum(1) - hits)))
    assert miou == pytest.approx(metrics["protocols"]["dense"]["miou"], abs=1e-9)
    assert classes_of_centroids(np.load(results / "fit" / "centroids.npy")) == matching  # masks paint what the fit found
    lookup = np.array([matching[k] for k in range(NUM_CLASSES)], dtype=np.uint8)
    errors = pixels = 0
    for predicted, truth in pairs:
        kept = interior(truth, patch_radius(truth.shape, GRID))
        errors += int((lookup[predicted][kept] != truth[kept]).sum())
        pixels += int(kept.sum())
    return Quality(miou, 1 - errors / pixels, errors, pixels, matching)


def assert_planted_quality(quality: Quality) -> None:
    errors = f"{quality.eroded_errors} errors in {quality.eroded_pixels} pixels"
    print(f"dense mIoU {quality.miou:.4f}, eroded accuracy {quality.eroded_accuracy:.2%} ({errors})")
    assert quality.miou >= MIN_MIOU, quality
    assert quality.eroded_errors == 0, quality  # only pixels of border-straddling patches may be wrong


@pytest.mark.parametrize(("patch", "embedding"), CASES, ids=CASE_IDS)
def test_planted_scenes_are_segmented_up_to_the_patch_grid(planted: Planted, patch: int, embedding: str) -> None:
    run = planted.run(patch, embedding)
    assert json.loads((run / "skipped.json").read_text()) == []
    assert_planted_quality(measure(run, planted.scenes_a, SCENES_A))


@pytest.mark.parametrize(("patch", "embedding"), CASES, ids=CASE_IDS)
def test_reclustering_with_a_dense_crf_keeps_the_planted_quality(planted: Planted, patch: int, embedding: str) -> None:
    reason = crf_missing()
    if reason is not None:
        pytest.skip(reason)
    run = planted.run(patch, embedding)
    main(["cluster", "--run", str(run), "--cluster.num_clusters", str(NUM_CLASSES), "--cluster.crf", "true"])
    results = run / "clusters" / f"k{NUM_CLASSES}"
    assert json.loads((results / "metrics.json").read_text())["crf"]["applied"] is True
    assert_planted_quality(measure(results, planted.scenes_a, SCENES_A))


def test_reclustering_and_fitted_centroids_on_new_scenes_keep_the_planted_quality(planted: Planted) -> None:
    """``datus cluster`` refits from the shards alone; ``--cluster.centroids`` labels a second set
    (a 4100 x 300 panorama and an EXIF orientation 8 JPEG among them) with the first set's fit."""
    run = planted.run(8, "crop")
    main(["cluster", "--run", str(run), "--cluster.num_clusters", str(NUM_CLASSES), "--cluster.crf", "false"])
    assert_planted_quality(measure(run / "clusters" / f"k{NUM_CLASSES}", planted.scenes_a, SCENES_A))
    applied = planted.root / "applied-8-crop"
    main([*planted.predict_flags(8, "crop", planted.scenes_b, applied), "--cluster.centroids", str(run)])
    assert json.loads((applied / "skipped.json").read_text()) == []
    assert np.array_equal(np.load(applied / "fit" / "centroids.npy"), np.load(run / "fit" / "centroids.npy"))
    assert_planted_quality(measure(applied, planted.scenes_b, SCENES_B))


def assert_same_masks(results: Path, reference: Path) -> None:
    """Every mask pixel equal, and the same metrics to the last digit.

    Not the PNG files' bytes: each mask carries a note naming the painting it came from, a digest
    that includes the run's own shard files, so it differs between any two runs.
    """
    for scene in SCENES_A:
        name = f"{scene.name}.png"
        assert np.array_equal(read_label_png(results / "masks" / name), read_label_png(reference / "masks" / name)), name
    assert (results / "metrics.json").read_text() == (reference / "metrics.json").read_text()


def test_two_ddp_processes_paint_the_planted_masks_of_one(planted: Planted) -> None:
    reference = planted.run(8, "packed")
    output_dir = planted.root / "ddp-8-packed"
    run_ddp_predict(*planted.predict_flags(8, "packed", planted.scenes_a, output_dir)[1:], "--data.batch_size", "2")
    assert {path.name[:7] for path in (output_dir / "shards").glob("*.npz")} == {"rank000", "rank001"}
    assert_same_masks(output_dir, reference)


def test_bf16_autocast_changes_only_pixels_of_border_patches(planted: Planted) -> None:
    """bf16 rounds the patch embedding, so a patch that mixes two colours near the t = 1/4 tie of
    the key products may join the other colour's segment (8 pixels of one such patch, measured).
    Nothing else may change: every pixel more than one patch from a border is fp32's, at most
    0.05 % of all pixels differ, and the run keeps the planted quality."""
    reference = planted.run(8, "crop")
    output_dir = planted.root / "bf16-8-crop"
    main([*planted.predict_flags(8, "crop", planted.scenes_a, output_dir), "--trainer.precision", "bf16-mixed"])
    changed = pixels = 0
    for scene in SCENES_A:
        name = f"{scene.name}.png"
        truth = read_label_png(planted.scenes_a / "masks" / name)
        differs = read_label_png(output_dir / "masks" / name) != read_label_png(reference / "masks" / name)
        assert not (differs & interior(truth, patch_radius(truth.shape, GRID))).any(), name
        changed, pixels = changed + int(differs.sum()), pixels + differs.size
    assert changed <= 0.0005 * pixels, f"{changed} of {pixels} pixels differ from fp32"
    assert_planted_quality(measure(output_dir, planted.scenes_a, SCENES_A))
