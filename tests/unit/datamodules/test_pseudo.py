"""Training on pseudo masks: the run folder as a dataset, the example script, the Python API recipe.

A real run folder comes from the in-process CLI on configs/tiny.yaml; cases that need exact
control over pixels and labels (alignment, 16-bit masks, bad labels) use run folders written
by hand in the same layout.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from datus.callbacks.pipeline import ClusterPaintEvaluate
from datus.callbacks.writer import SegmentShardWriter
from datus.datamodules.images import ImageFolderDataModule
from datus.datamodules.pseudo import PseudoMaskDataModule
from datus.commands.cli import main
from datus.core.io import read_label_png
from datus.discovery.module import DatusModule
from datus.core.settings import ClusterSettings
from tests.generated import REPO, TINY, write_classes, write_photos, write_two_region_dataset

NUM_IMAGES = 6


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two-region images of varied sizes (some nested), ground-truth masks beside them, classes.json."""
    root = tmp_path_factory.mktemp("data")
    write_two_region_dataset(root / "images", NUM_IMAGES, root / "masks", nested_every=2, ignored_rows=0)
    write_classes(root / "classes.json", ["blue", "red"])
    return root


@pytest.fixture(scope="module")
def run_dir(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished ``datus predict`` run (tiny random ViT, K = 3) over ``images``."""
    output_dir = tmp_path_factory.mktemp("run")
    main(
        [
            "predict",
            "--config",
            TINY,
            "--data.root",
            str(images / "images"),
            "--data.mask_dir",
            str(images / "masks"),
            "--output_dir",
            str(output_dir),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    return output_dir


def manifest_ids(run: Path) -> list[str]:
    return [json.loads(line)["image_id"] for line in (run / "manifest.jsonl").read_text().splitlines()]


def write_run(run: Path, pairs: Mapping[str, tuple[np.ndarray, np.ndarray]], num_clusters: int) -> Path:
    """A run folder written by hand: ``pairs`` maps image id -> (RGB uint8 image, label mask)."""
    lines = []
    for image_id, (rgb, mask) in pairs.items():
        image_path = run / "inputs" / f"{image_id}.png"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(image_path)
        (run / "masks" / image_id).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(run / "masks" / f"{image_id}.png")  # uint16 arrays save as I;16
        lines.append(json.dumps({"image_id": image_id, "image": str(image_path), "mask": f"masks/{image_id}.png"}))
    (run / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    names = [f"cluster {c}" for c in range(num_clusters)]
    (run / "classes.json").write_text(json.dumps({"num_clusters": num_clusters, "classes": names, "ignore_index": 255}))
    return run


def ids_of(dataset: torch.utils.data.Dataset) -> list[str]:
    return [pair.image_id for pair in dataset.pairs]


def test_split_is_deterministic_disjoint_and_complete(run_dir: Path) -> None:
    first = PseudoMaskDataModule(run_dir, val_fraction=0.34, seed=0, num_workers=0)
    again = PseudoMaskDataModule(run_dir, val_fraction=0.34, seed=0, num_workers=0)
    for module in (first, again):
        module.setup("fit")
    train, val = ids_of(first.train_dataset), ids_of(first.val_dataset)
    assert (train, val) == (ids_of(again.train_dataset), ids_of(again.val_dataset))
    assert len(val) == 2 and not set(train) & set(val)
    assert sorted(train + val) == sorted(manifest_ids(run_dir))

    validate_only = PseudoMaskDataModule(run_dir, val_fraction=0.34, seed=0, num_workers=0)
    validate_only.setup("validate")
    assert validate_only.train_dataset is None and ids_of(validate_only.val_dataset) == val

    splits = set()
    for seed in range(10):
        module = PseudoMaskDataModule(run_dir, val_fraction=0.34, seed=seed, num_workers=0)
        splits.add(tuple(pair.image_id for pair in module.val_pairs))
    assert len(splits) > 1, "the seed must decide the split"
    assert PseudoMaskDataModule(run_dir, val_fraction=0.0, num_workers=0).val_pairs == []


def test_items_and_batches_have_the_right_shapes_and_only_original_labels(run_dir: Path) -> None:
    data = PseudoMaskDataModule(run_dir, image_size=32, val_fraction=0.34, batch_size=2, num_workers=0)
    data.setup("fit")
    assert data.num_classes == 3 and len(data.class_names) == 3 and data.ignore_index == 255
    for dataset in (data.train_dataset, data.val_dataset):
        for index, pair in enumerate(dataset.pairs):
            original = set(np.unique(read_label_png(run_dir / "masks" / f"{pair.image_id}.png")).tolist())
            for seed in range(3):
                torch.manual_seed(seed)
                item = dataset[index]
                assert item["image_id"] == pair.image_id
                assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
                assert item["mask"].shape == (32, 32) and item["mask"].dtype == torch.int64
                assert set(item["mask"].unique().tolist()) <= original
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["mask"].shape == (2, 32, 32)
    assert len(batch["image_id"]) == 2 and len(next(iter(data.val_dataloader()))["image_id"]) == 2


def test_image_and_mask_stay_aligned_under_the_joint_transform(tmp_path: Path) -> None:
    """Left half red with label 0, right half blue with label 1: every flip and crop must move both."""
    height, width = 60, 90
    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    rgb[:, : width // 2], rgb[:, width // 2 :] = (220, 30, 30), (30, 30, 220)
    mask = (np.arange(width) >= width // 2).astype(np.uint8)[None].repeat(height, axis=0)
    run = write_run(tmp_path, {"halves": (rgb, mask), "other": (rgb, mask)}, num_clusters=2)
    data = PseudoMaskDataModule(run, image_size=32, val_fraction=0.5, num_workers=0)
    data.setup("fit")
    mean, std = torch.tensor(data.mean).view(3, 1, 1), torch.tensor(data.std).view(3, 1, 1)
    flipped = 0
    for dataset, draws in ((data.train_dataset, 60), (data.val_dataset, 1)):
        for seed in range(draws):
            torch.manual_seed(seed)
            item = dataset[0]
            pixels = item["image"] * std + mean
            label_of_colour = (pixels[2] > pixels[0]).long()  # blue -> 1, red -> 0
            # interpolation may place the two boundaries one pixel apart, never more
            assert (label_of_colour != item["mask"]).sum(dim=1).max() <= 1, f"seed {seed}"
            flipped += int(item["mask"][0, 0] == 1)
    assert 0 < flipped < 60, "the flip must have happened in some draws and not in others"


def test_sixteen_bit_masks_keep_their_labels(tmp_path: Path) -> None:
    """K > 255: uint16 masks, labels (255 included) survive resizing untouched, nothing is ignored."""
    stripes = np.repeat(np.array([0, 255, 299, 7], dtype=np.uint16), 12)[None].repeat(30, axis=0)
    rgb = np.random.default_rng(0).integers(0, 256, (30, 48, 3), dtype=np.uint8)
    run = write_run(tmp_path, {"a": (rgb, stripes), "b": (rgb, stripes)}, num_clusters=300)
    assert Image.open(run / "masks" / "a.png").mode == "I;16"
    data = PseudoMaskDataModule(run, image_size=20, val_fraction=0.5, num_workers=0)
    assert data.num_classes == 300 and data.ignore_index == -100
    data.setup("fit")
    for seed in range(5):
        torch.manual_seed(seed)
        values = set(data.train_dataset[0]["mask"].unique().tolist())
        assert values <= {0, 7, 255, 299} and len(values) >= 2
    assert set(data.val_dataset[0]["mask"].unique().tolist()) == {0, 7, 255, 299}


def test_labels_outside_the_classes_are_refused(tmp_path: Path) -> None:
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    run = write_run(tmp_path, {"bad": (rgb, np.full((16, 16), 5, dtype=np.uint8))}, num_clusters=2)
    data = PseudoMaskDataModule(run, image_size=8, val_fraction=0.0, num_workers=0)
    data.setup("fit")
    with pytest.raises(ValueError, match="label 5, outside 0..1"):
        data.train_dataset[0]


def test_missing_or_wrong_run_folders_say_what_to_do(run_dir: Path, images: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"classes\.json.*datus predict"):
        PseudoMaskDataModule(tmp_path / "nowhere")
    (tmp_path / "classes.json").write_text((run_dir / "classes.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"manifest\.jsonl.*datus predict"):
        PseudoMaskDataModule(tmp_path)
    with pytest.raises(ValueError, match="not a run"):
        PseudoMaskDataModule(images)  # a ground-truth dataset's classes.json


@pytest.mark.parametrize(
    ("options", "argument"),
    [({"val_fraction": 1.0}, "val_fraction"), ({"val_fraction": -0.1}, "val_fraction"), ({"batch_size": 0}, "batch_size")],
)
def test_bad_arguments_are_named(run_dir: Path, options: dict[str, float], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        PseudoMaskDataModule(run_dir, **options)


def load_example_script() -> ModuleType:
    path = REPO / "scripts" / "train_on_pseudo_masks.py"
    spec = importlib.util.spec_from_file_location("train_on_pseudo_masks", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_script_trains_on_the_run(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = load_example_script()
    argv = ["--run", str(run_dir), "--steps", "8", "--image_size", "32", "--batch_size", "2"]
    argv += ["--num_workers", "0", "--accelerator", "cpu", "--output_dir", str(tmp_path)]
    results = script.main(argv)
    assert math.isfinite(results["train_loss"])
    assert 0.0 <= results["val_miou"] <= 1.0
    assert list(tmp_path.rglob("*.ckpt")) and list(tmp_path.rglob("metrics.csv"))
    printed = capsys.readouterr().out
    assert "s a step here: the 2 steps left take about" in printed  # said before the wait, measured after warm-up
    assert f"checkpoint: {next(tmp_path.rglob('*.ckpt'))}" in printed


def test_python_api_recipe_from_the_readme(images: Path, tmp_path: Path) -> None:
    """The README's recipe without the CLI, with the tiny settings; masks get scored via mask_dir."""
    output_dir = tmp_path / "x"
    model = DatusModule(
        backbone="vit_tiny_patch16_224",
        weights="random",
        image_size=64,
        min_patches=1,
        louvain_workers=0,
        backbone_kwargs={"depth": 2, "embed_dim": 48, "num_heads": 2, "patch_size": 8},
    )
    data = ImageFolderDataModule(
        images / "images",
        mask_dir=images / "masks",
        image_size=model.image_size,
        patch_size=model.patch_size,
        num_workers=0,
    )
    pipeline = ClusterPaintEvaluate(output_dir, ClusterSettings(num_clusters=3))
    trainer = L.Trainer(
        callbacks=[SegmentShardWriter(output_dir), pipeline], logger=False, accelerator="cpu", enable_progress_bar=False
    )
    trainer.predict(model, datamodule=data, return_predictions=False)
    assert pipeline.outcome is not None and pipeline.outcome.summary["images_predicted_now"] == NUM_IMAGES
    ids = manifest_ids(output_dir)
    assert len(ids) == NUM_IMAGES
    for image_id in ids:
        with Image.open(images / "images" / f"{image_id}.jpg") as image:
            assert read_label_png(output_dir / "masks" / f"{image_id}.png").shape == (image.height, image.width)
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["num_images"] == NUM_IMAGES and metrics["num_classes"] == 2
    assert 0 <= metrics["protocols"]["dense"]["miou"] <= 1
    assert PseudoMaskDataModule(output_dir).num_classes == 3

    again = ClusterPaintEvaluate(output_dir, ClusterSettings(num_clusters=4))  # nothing left to predict: same path
    trainer = L.Trainer(callbacks=[SegmentShardWriter(output_dir), again], logger=False, accelerator="cpu", enable_progress_bar=False)
    trainer.predict(model, datamodule=data, return_predictions=False)
    assert again.outcome is not None and again.outcome.summary["images_predicted_now"] == 0
    assert PseudoMaskDataModule(output_dir).num_classes == 4


def test_the_readme_python_snippet_runs_offline_as_written(tmp_path: Path) -> None:
    """Copied from the README, run in a folder where `make demo` left its images: it must not ask for weights."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Python API") :]
    snippet = section[section.index("```python") + len("```python") : section.index("```", section.index("```python") + 9)]
    write_photos(tmp_path / "runs" / "data" / "demo" / "train" / "images", 12, size=(96, 128))
    completed = subprocess.run(
        [sys.executable, "-c", snippet], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert len(list((tmp_path / "runs" / "x" / "masks").glob("*.png"))) == 12
    assert "Tip:" not in completed.stderr and "is deprecated" not in completed.stderr  # Lightning's chatter
