"""A messy real-world folder: every file either works or is skipped with a reason, and listed."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datus.commands.cli import main
from datus.outputs.drawing import overlay
from datus.core.io import read_label_png
from tests.generated import TINY

pytestmark = pytest.mark.integration


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = (30, 80, 200)
    pixels[:, width // 2 :] = (210, 60, 40)
    return np.clip(pixels + rng.integers(0, 20, pixels.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("messy")
    images, masks = root / "images", root / "masks"
    (images / "sub").mkdir(parents=True)
    (masks / "sub").mkdir(parents=True)
    Image.fromarray(_photo(48, 64)).save(images / "good.jpg")
    Image.fromarray(_photo(40, 56, 1)).save(images / "sub" / "good.jpg")  # same stem, other folder
    Image.fromarray(_photo(44, 60, 2)).save(images / "üñí çødé name.png")
    buffer = io.BytesIO()
    Image.fromarray(_photo(64, 64, 3)).save(buffer, format="JPEG")
    (images / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])
    (images / "zero.png").write_bytes(b"")
    (images / "text.jpg").write_text("not an image at all")
    Image.fromarray((np.linspace(0, 65535, 48 * 64).reshape(48, 64)).astype(np.uint16)).save(images / "gray16.png")
    Image.fromarray(_photo(48, 64, 4)).convert("P").save(images / "palette.png")
    Image.fromarray(_photo(48, 64, 5)).convert("CMYK").save(images / "cmyk.jpg")
    Image.fromarray(_photo(4, 4)).save(images / "tiny.png")  # smaller than one 8 px patch
    Image.new("RGB", (12000, 9000), (90, 120, 30)).save(images / "huge.png")
    good_mask = np.zeros((48, 64), np.uint8)
    good_mask[:, 32:] = 1
    Image.fromarray(good_mask).save(masks / "good.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / "sub" / "good.png")  # wrong size
    Image.fromarray(np.full((44, 60), 7, np.uint8)).save(masks / "üñí çødé name.png")  # 7 >= 2 classes
    output_dir = root / "run"
    main(
        [
            "predict", "--config", TINY, "--data.root", str(images), "--data.mask_dir", str(masks),
            "--eval.num_classes", "2", "--output_dir", str(output_dir),
            "--trainer.enable_progress_bar", "false",
        ]
    )  # fmt: skip
    return images, output_dir


def test_bad_files_are_skipped_with_reasons_and_the_run_finishes(messy: tuple[Path, Path]) -> None:
    images, output_dir = messy
    skipped = {Path(entry["path"]).name: entry["reason"] for entry in json.loads((output_dir / "skipped.json").read_text())}
    assert set(skipped) == {"truncated.jpg", "zero.png", "text.jpg", "tiny.png", "good.png", "üñí çødé name.png"}
    assert "smaller than one patch" in skipped["tiny.png"]
    assert "mask is 10x10" in skipped["good.png"]
    assert "values [7]" in skipped["üñí çødé name.png"]
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["images_in_run"] == 7 and len(summary["skipped"]) == 6


@pytest.mark.parametrize(
    ("image_id", "size"),
    [
        ("good", (48, 64)),
        ("sub/good", (40, 56)),
        ("üñí çødé name", (44, 60)),
        ("gray16", (48, 64)),
        ("palette", (48, 64)),
        ("cmyk", (48, 64)),
        ("huge", (9000, 12000)),
    ],
)
def test_readable_images_get_full_size_masks(messy: tuple[Path, Path], image_id: str, size: tuple[int, int]) -> None:
    _, output_dir = messy
    mask = read_label_png(output_dir / "masks" / f"{image_id}.png")
    assert mask.shape == size and mask.max() < 3


def test_only_the_well_formed_mask_is_scored(messy: tuple[Path, Path]) -> None:
    _, output_dir = messy
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["num_pixels"] == 48 * 64  # good.png only
    assert metrics["num_images"] == 7


def test_outputs_never_leave_the_output_folder(messy: tuple[Path, Path]) -> None:
    _, output_dir = messy
    for path in output_dir.rglob("*"):
        assert path.resolve().is_relative_to(output_dir.resolve())
    assert not list(output_dir.rglob(".datus-tmp-*"))  # no temporary file was left behind


def test_overlay_is_an_integer_blend() -> None:
    image = np.array([[[0, 100, 255]]], dtype=np.uint8)
    colours = np.array([[[255, 100, 0]]], dtype=np.uint8)
    assert overlay(image, colours).tolist() == [[[128, 100, 128]]]
