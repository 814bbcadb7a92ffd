"""``report.png`` on real run folders made by the in-process CLI (configs/tiny.yaml, generated images).

Two runs are made once per module: one on a DatUS-layout dataset with masks (so the run is
scored and has ``confusion.png``) and one on a plain folder of images without masks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datus.outputs.report
from datus.commands.cli import main
from datus.outputs.drawing import LINE_HEIGHT, MISSING_GREY, PAD, palette
from datus.runfolder.records import ImageRecord
from datus.outputs.report import BANNER_HEIGHT, BANNER_RED, MAX_CONFUSION_SCALE, TITLE_HEIGHT
from datus.outputs.report import make_report as draw_report
from datus.runfolder.run import Run
from tests.generated import TINY, two_region_size, write_datus_layout, write_two_region_dataset

NUM_IMAGES = 5  # two prediction batches of 4, so two shards
THUMB = 160
image_size = two_region_size


def predict(output_dir: Path, *data_flags: str) -> None:
    """The real ``datus predict``, in-process (the progress bar is left at its default, pytest captures it)."""
    main(["predict", "--config", TINY, *data_flags, "--output_dir", str(output_dir)])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_datus_layout(tmp_path_factory.mktemp("data"), NUM_IMAGES, ["water", "fish"])


@pytest.fixture(scope="module")
def scored_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output_dir = tmp_path_factory.mktemp("run")
    predict(output_dir, "--data.root", str(dataset), "--data.split", "train")
    return output_dir


@pytest.fixture(scope="module")
def unlabelled_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    images = tmp_path_factory.mktemp("plain")
    write_two_region_dataset(images, 3)
    output_dir = tmp_path_factory.mktemp("plain_run")
    predict(output_dir, "--data.root", str(images))
    return output_dir


@pytest.fixture
def copied_run(scored_run: Path, tmp_path: Path) -> Path:
    """A private copy of the scored run, free to be edited (its shards still point at the dataset)."""
    copy = tmp_path / "run"
    shutil.copytree(scored_run, copy)
    (copy / "report.png").unlink(missing_ok=True)
    return copy


def make_report(run_dir: Path, **options: object) -> Path:
    return draw_report(Run(run_dir), **options)  # type: ignore[arg-type]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def count_colour(picture: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int((picture == np.array(colour, dtype=np.uint8)).all(axis=-1).sum())


def expected_size(
    rows: int, columns: int, cell_width: int, legend_lines: int, banner: bool, confusion: Path | None
) -> tuple[int, int]:
    """The layout of datus.outputs.report recomputed from its constants: header, grid of rows, confusion matrix."""
    width = PAD + columns * (cell_width + PAD)
    height = PAD + TITLE_HEIGHT + (BANNER_HEIGHT if banner else 0) + LINE_HEIGHT * (legend_lines + 1)
    height += rows * (LINE_HEIGHT + THUMB + PAD)
    if confusion is not None:
        with Image.open(confusion) as matrix:
            scale = max(1, min(MAX_CONFUSION_SCALE, width // (matrix.width + 2 * PAD)))
            width = max(width, matrix.width * scale + 2 * PAD)
            height += matrix.height * scale + PAD
    return width, height


def widest_cell(num_images: int) -> int:
    return max(round(w * THUMB / h) for h, w in map(image_size, range(num_images)))


def tile_origin(row: int, column: int, cell_width: int, tile_width: int, legend_lines: int) -> tuple[int, int]:
    """(x, y) of the top-left pixel of a thumbnail, with the random-weights banner present."""
    x = PAD + column * (cell_width + PAD) + (cell_width - tile_width) // 2
    y = PAD + TITLE_HEIGHT + BANNER_HEIGHT + LINE_HEIGHT * (legend_lines + 1)
    y += row * (LINE_HEIGHT + THUMB + PAD) + LINE_HEIGHT
    return x, y


def test_report_has_the_grid_header_and_confusion_and_is_deterministic(scored_run: Path) -> None:
    path = make_report(scored_run, num_samples=NUM_IMAGES, thumb_height=THUMB)
    assert path == scored_run / "report.png"
    first = path.read_bytes()
    with Image.open(path) as picture:
        size = picture.size
    # five columns (image, segments, mask, ground truth, attention), legend lines for masks and classes
    assert size == expected_size(NUM_IMAGES, 5, widest_cell(NUM_IMAGES), 2, True, scored_run / "confusion.png")
    assert make_report(scored_run, num_samples=NUM_IMAGES, thumb_height=THUMB).read_bytes() == first

    make_report(scored_run, num_samples=2, seed=3, thumb_height=THUMB)
    with Image.open(path) as picture, Image.open(scored_run / "confusion.png") as matrix:
        scale = max(1, min(MAX_CONFUSION_SCALE, picture.width // (matrix.width + 2 * PAD)))
        header = PAD + TITLE_HEIGHT + BANNER_HEIGHT + LINE_HEIGHT * 3
        assert picture.height == header + 2 * (LINE_HEIGHT + THUMB + PAD) + matrix.height * scale + PAD


def test_ground_truth_and_masks_share_the_class_colours(scored_run: Path) -> None:
    make_report(scored_run, num_samples=NUM_IMAGES, thumb_height=THUMB)
    picture = pixels(scored_run / "report.png")
    metrics = json.loads((scored_run / "metrics.json").read_text())
    colours = palette(metrics["num_clusters"] + metrics["num_classes"])
    height, width = image_size(1)  # "img 1" sorts first: "img 1" < "img 2" < "img 4" < "nested/..."
    tile_width = round(width * THUMB / height)
    x, y = tile_origin(0, 3, widest_cell(NUM_IMAGES), tile_width, 2)
    assert tuple(picture[y + THUMB // 2, x + tile_width // 4]) == tuple(colours[0])  # class 0, left half
    assert tuple(picture[y + THUMB // 2, x + 3 * tile_width // 4]) == tuple(colours[1])  # class 1, right half
    assert tuple(picture[y + 1, x + tile_width // 2]) == (0, 0, 0)  # the ignored top rows
    stored = pixels(scored_run / "color" / "img 1.png")
    x, _ = tile_origin(0, 2, widest_cell(NUM_IMAGES), tile_width, 2)
    assert tuple(picture[y + THUMB // 2, x + tile_width // 4]) == tuple(stored[height // 2, width // 4])


def test_random_weights_banner_follows_run_json(copied_run: Path) -> None:
    random_weights = pixels(make_report(copied_run, thumb_height=THUMB))
    assert count_colour(random_weights, BANNER_RED) >= random_weights.shape[1] * (BANNER_HEIGHT - 6)

    described = json.loads((copied_run / "run.json").read_text())
    described["identity"]["model"]["weights"] = "pretrained"
    (copied_run / "run.json").write_text(json.dumps(described))
    trained = pixels(make_report(copied_run, thumb_height=THUMB))
    assert count_colour(trained, BANNER_RED) == 0
    assert trained.shape[0] == random_weights.shape[0] - BANNER_HEIGHT


def test_same_picture_from_label_masks_and_from_shards_alone(copied_run: Path) -> None:
    reference = make_report(copied_run, thumb_height=THUMB).read_bytes()
    shutil.rmtree(copied_run / "color")  # colour the label masks with the same table instead
    (copied_run / "manifest.jsonl").unlink()  # sample from the shards' ids instead
    assert make_report(copied_run, thumb_height=THUMB).read_bytes() == reference


def test_only_the_shards_holding_sampled_images_are_read(scored_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(list((scored_run / "shards").glob("*.npz"))) == 2
    loaded: list[Path] = []
    original = datus.outputs.report.read_records

    def counting(shard: Path) -> list[ImageRecord]:
        loaded.append(shard)
        return original(shard)

    monkeypatch.setattr(datus.outputs.report, "read_records", counting)
    make_report(scored_run, num_samples=1, thumb_height=THUMB)
    assert len(loaded) == 1


def test_no_ground_truth_column_without_masks(unlabelled_run: Path) -> None:
    path = make_report(unlabelled_run, thumb_height=THUMB)
    with Image.open(path) as picture:
        size = picture.size
    assert not (unlabelled_run / "confusion.png").exists()
    # four columns, one legend line (the pseudo-mask colours), no confusion matrix
    assert size == expected_size(3, 4, widest_cell(3), 1, True, None)


def test_a_moved_input_image_becomes_a_grey_tile(dataset: Path, scored_run: Path) -> None:
    before = pixels(make_report(scored_run, num_samples=NUM_IMAGES, thumb_height=THUMB))
    image = dataset / "train" / "images" / "img 2.jpg"
    moved = image.with_name("moved.bin")
    image.rename(moved)
    try:
        after = pixels(make_report(scored_run, num_samples=NUM_IMAGES, thumb_height=THUMB))
    finally:
        moved.rename(image)
    height, width = image_size(2)
    tile = round(width * THUMB / height) * THUMB
    assert after.shape == before.shape
    assert count_colour(before, MISSING_GREY) < 0.05 * tile
    assert count_colour(after, MISSING_GREY) > 0.9 * tile
