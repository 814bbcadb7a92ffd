"""Tests for the dataset converters in ``datus.commands.prepare``.

Two tiers: the real SUIM and CamVid samples in ``../shared/data`` (skipped when absent), checked
against decodings written independently here; and tiny generated datasets for the edge cases
the samples do not have.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datus.core.errors import ConfigurationError
from datus.commands.prepare import (
    CITYSCAPES_CLASSES,
    COCOSTUFF27_CLASSES,
    PrepareReport,
    cityscapes27_from_label_ids,
    cocostuff27_from_fine,
    decode_suim_mask,
    format_report,
    prepare_camvid,
    prepare_cityscapes,
    prepare_cocostuff27,
    prepare_suim,
)
from tests.generated import SHARED_DATA

DATA = SHARED_DATA
SUIM_RAW = DATA / "suim-sample"
CAMVID_RAW = DATA / "camvid-sample"

# Independent statement of the SUIM code: thresholded (R, G, B) bits -> class abbreviation.
SUIM_BITS = {
    (0, 0, 0): "BW",
    (0, 0, 1): "HD",
    (0, 1, 0): "PF",
    (0, 1, 1): "WR",
    (1, 0, 0): "RO",
    (1, 0, 1): "RI",
    (1, 1, 0): "FV",
    (1, 1, 1): "SR",
}
SUIM_IDS = {
    "all": {"BW": 0, "HD": 1, "PF": 2, "WR": 3, "RO": 4, "RI": 5, "FV": 6, "SR": 7},
    "coarse": {"HD": 0, "RO": 1, "FV": 2, "RI": 3, "WR": 4, "BW": 5, "PF": 5, "SR": 5},
}
CROPPED_IN_SAMPLE = {"f_r_1058_": ((590, 430), (590, 375)), "f_r_1068_": ((590, 430), (590, 375))}


def _reference_id(colour: np.ndarray, classes: str) -> int:
    bits = tuple(int(int(value) >= 128) for value in colour[:3])
    return SUIM_IDS[classes][SUIM_BITS[bits]]


def _reference_histogram(rgb: np.ndarray, classes: str) -> Counter[int]:
    """Class histogram by thresholding each distinct colour in Python (no lookup table)."""
    packed = rgb.reshape(-1, 3).astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])
    values, counts = np.unique(packed, return_counts=True)
    histogram: Counter[int] = Counter()
    for value, count in zip(values.tolist(), counts.tolist()):
        colour = np.array([value >> 16, (value >> 8) & 255, value & 255])
        histogram[_reference_id(colour, classes)] += count
    return histogram


def _histogram(ids: np.ndarray) -> Counter[int]:
    return Counter({index: int(count) for index, count in enumerate(np.bincount(ids.ravel())) if count})


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _read_ids(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "L", f"{path}: mode {image.mode}"
        return np.asarray(image)


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


# ----------------------------------------------------------------------------- real samples


@pytest.fixture(scope="module", params=["coarse", "all"])
def suim_converted(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, PrepareReport]:
    if not SUIM_RAW.is_dir():
        pytest.skip(f"SUIM sample not found at {SUIM_RAW}")
    classes = request.param
    out = tmp_path_factory.mktemp(f"suim_{classes}")
    return classes, prepare_suim(SUIM_RAW, out, classes=classes)


@pytest.fixture(scope="module")
def camvid_converted(tmp_path_factory: pytest.TempPathFactory) -> PrepareReport:
    if not CAMVID_RAW.is_dir():
        pytest.skip(f"CamVid sample not found at {CAMVID_RAW}")
    return prepare_camvid(CAMVID_RAW, tmp_path_factory.mktemp("camvid"))


def test_suim_sample_every_image_gets_a_mask_of_its_size(suim_converted: tuple[str, PrepareReport]) -> None:
    classes, report = suim_converted
    raw_images = sorted((SUIM_RAW / "train_val" / "images").iterdir())
    out_images = sorted((report.out_dir / "train" / "images").iterdir())
    assert [path.name for path in out_images] == [path.name for path in raw_images]
    assert report.converted == len(raw_images) == 42
    n_classes = 6 if classes == "coarse" else 8
    for raw, out in zip(raw_images, out_images):
        assert out.read_bytes() == raw.read_bytes(), f"{out.name} was re-encoded"
        mask = report.out_dir / "train" / "true_masks" / f"{raw.stem}.png"
        ids = _read_ids(mask)
        assert (ids.shape[1], ids.shape[0]) == _size(raw), raw.name
        assert ids.max() < n_classes, raw.name


def test_suim_sample_classes_json(suim_converted: tuple[str, PrepareReport]) -> None:
    classes, report = suim_converted
    meta = json.loads((report.out_dir / "classes.json").read_text())
    assert meta["dataset"] == "suim"
    assert meta["ignore_index"] == 255
    assert meta["source"] == str(SUIM_RAW)
    assert meta["class_ids"] == list(range(len(meta["classes"])))
    assert meta["problems"] == report.problems
    if classes == "coarse":
        assert len(meta["classes"]) == 6
        assert meta["classes"][:5] == [
            "human divers",
            "robots and instruments",
            "fish and vertebrates",
            "reefs and invertebrates",
            "wrecks and ruins",
        ]
    else:
        assert len(meta["classes"]) == 8
        assert meta["classes"][0] == "background waterbody" and meta["classes"][7] == "sea-floor and rocks"


def test_suim_sample_reports_the_taller_masks_as_cropped(suim_converted: tuple[str, PrepareReport]) -> None:
    classes, report = suim_converted
    for stem, (mask_size, image_size) in CROPPED_IN_SAMPLE.items():
        lines = [line for line in report.problems if stem in line]
        assert len(lines) == 1, report.problems
        assert "crop" in lines[0]
        assert "x".join(map(str, mask_size)) in lines[0] and "x".join(map(str, image_size)) in lines[0]
        # The kept part is the mask's top rows, decoded independently.
        raw = _read_rgb(SUIM_RAW / "train_val" / "masks" / f"{stem}.bmp")[: image_size[1], : image_size[0]]
        ids = _read_ids(report.out_dir / "train" / "true_masks" / f"{stem}.png")
        assert _histogram(ids) == _reference_histogram(raw, classes)
    assert all("crop" in line for line in report.problems), report.problems


def test_suim_sample_histogram_matches_independent_decoding(suim_converted: tuple[str, PrepareReport]) -> None:
    classes, report = suim_converted
    stem = "w_r_198_"  # several classes and many off-colour border pixels
    rgb = _read_rgb(SUIM_RAW / "train_val" / "masks" / f"{stem}.bmp")
    off = np.argwhere(((rgb > 0) & (rgb < 255)).any(axis=-1))
    assert len(off) > 1000, "expected off colours in this sample mask"
    ids = _read_ids(report.out_dir / "train" / "true_masks" / f"{stem}.png")
    assert _histogram(ids) == _reference_histogram(rgb, classes)
    # Pixel by pixel on a small window around an off-colour pixel.
    row, col = (int(v) for v in off[len(off) // 2])
    top, left = max(row - 8, 0), max(col - 8, 0)
    for y in range(top, min(top + 16, rgb.shape[0])):
        for x in range(left, min(left + 16, rgb.shape[1])):
            assert ids[y, x] == _reference_id(rgb[y, x], classes), (y, x, rgb[y, x])


def test_camvid_sample_maps_unlabelled_to_ignore(camvid_converted: PrepareReport) -> None:
    report = camvid_converted
    frames = sorted((CAMVID_RAW / "train").iterdir())
    assert report.converted == len(frames) == 24
    assert report.problems == []
    seen_unlabelled = False
    for frame in frames:
        out_frame = report.out_dir / "train" / "images" / frame.name
        assert out_frame.read_bytes() == frame.read_bytes()
        with Image.open(CAMVID_RAW / "trainannot" / frame.name) as annotation:
            raw = np.asarray(annotation)
        ids = _read_ids(report.out_dir / "train" / "true_masks" / f"{frame.stem}.png")
        assert (ids.shape[1], ids.shape[0]) == _size(frame)
        assert np.array_equal(ids[raw == 11], np.full(int((raw == 11).sum()), 255, np.uint8))
        assert np.array_equal(ids[raw != 11], raw[raw != 11])
        seen_unlabelled |= bool((raw == 11).any())
    assert seen_unlabelled
    meta = json.loads((report.out_dir / "classes.json").read_text())
    assert meta["classes"][0] == "Sky" and meta["classes"][10] == "Bicyclist" and len(meta["classes"]) == 11
    assert meta["ignore_index"] == 255 and meta["source"] == str(CAMVID_RAW)


# ----------------------------------------------------------------------------- generated data


def _save_image(path: Path, size: tuple[int, int], exif_orientation: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if exif_orientation is None:
        image.save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(path, exif=exif)


def _save_mask(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb.astype(np.uint8), mode="RGB").save(path)


def _flat_mask(size: tuple[int, int], colour: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (size[1], size[0], 3)).copy()


# 2 x 4 grid covering all eight codes with colours off 0/255, and the expected ids.
OFF_COLOURS = np.array(
    [
        [(250, 3, 240), (127, 128, 0), (128, 128, 127), (0, 0, 128)],
        [(255, 127, 127), (5, 200, 130), (129, 255, 254), (127, 127, 127)],
    ],
    dtype=np.uint8,
)
OFF_EXPECTED = {
    "all": np.array([[5, 2, 6, 1], [4, 3, 7, 0]]),
    "coarse": np.array([[3, 5, 2, 0], [1, 4, 5, 5]]),
}


@pytest.mark.parametrize("classes", ["all", "coarse"])
def test_suim_thresholds_off_colours(tmp_path: Path, classes: str) -> None:
    raw = tmp_path / "raw"
    _save_image(raw / "train_val" / "images" / "a.jpg", (4, 2))
    _save_mask(raw / "train_val" / "masks" / "a.bmp", OFF_COLOURS)
    report = prepare_suim(raw, tmp_path / "out", classes=classes)
    assert report.converted == 1 and report.problems == []
    assert np.array_equal(_read_ids(tmp_path / "out" / "train" / "true_masks" / "a.png"), OFF_EXPECTED[classes])
    assert np.array_equal(decode_suim_mask(OFF_COLOURS, classes), OFF_EXPECTED[classes])


def test_suim_test_split_is_converted(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    for split in ("train_val", "TEST"):
        _save_image(raw / split / "images" / f"{split}.jpg", (4, 2))
        _save_mask(raw / split / "masks" / f"{split}.bmp", OFF_COLOURS)
    report = prepare_suim(raw, tmp_path / "out")
    assert report.converted == 2
    assert (tmp_path / "out" / "train" / "true_masks" / "train_val.png").is_file()
    assert (tmp_path / "out" / "test" / "true_masks" / "TEST.png").is_file()


def test_suim_crops_a_taller_mask_to_its_top_rows(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _save_image(raw / "train_val" / "images" / "tall.jpg", (6, 4))
    mask = _flat_mask((6, 7), (0, 0, 255))  # HD
    mask[4:] = (255, 0, 0)  # RO in the rows below the image
    _save_mask(raw / "train_val" / "masks" / "tall.bmp", mask)
    report = prepare_suim(raw, tmp_path / "out", classes="coarse")
    ids = _read_ids(tmp_path / "out" / "train" / "true_masks" / "tall.png")
    assert ids.shape == (4, 6) and (ids == 0).all()
    assert len(report.problems) == 1
    assert "tall.bmp" in report.problems[0] and "6x7" in report.problems[0] and "6x4" in report.problems[0]


def test_suim_taller_mask_with_error_policy_raises(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _save_image(raw / "train_val" / "images" / "tall.jpg", (6, 4))
    _save_mask(raw / "train_val" / "masks" / "tall.bmp", _flat_mask((6, 7), (0, 0, 255)))
    with pytest.raises(ValueError, match=r"tall\.bmp.*6x7.*6x4.*size_mismatch='crop'"):
        prepare_suim(raw, tmp_path / "out", size_mismatch="error")
    assert not (tmp_path / "out").exists(), "a refused conversion must write nothing"


@pytest.mark.parametrize("mask_size", [(6, 3), (5, 4), (8, 3)], ids=["shorter", "narrower", "wider-but-shorter"])
def test_suim_mask_smaller_than_image_raises(tmp_path: Path, mask_size: tuple[int, int]) -> None:
    raw = tmp_path / "raw"
    _save_image(raw / "train_val" / "images" / "ok.jpg", (6, 4))
    _save_mask(raw / "train_val" / "masks" / "ok.bmp", _flat_mask((6, 4), (0, 0, 0)))
    _save_image(raw / "train_val" / "images" / "small.jpg", (6, 4))
    _save_mask(raw / "train_val" / "masks" / "small.bmp", _flat_mask(mask_size, (0, 0, 0)))
    size_text = "x".join(map(str, mask_size))
    with pytest.raises(ValueError, match=rf"small\.bmp.*{size_text}.*6x4.*never resized"):
        prepare_suim(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_suim_reports_missing_masks_orphans_and_stray_files(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _save_image(raw / "train_val" / "images" / "paired.jpg", (4, 2))
    _save_mask(raw / "train_val" / "masks" / "paired.bmp", OFF_COLOURS)
    _save_image(raw / "train_val" / "images" / "lonely.jpg", (4, 2))
    _save_mask(raw / "train_val" / "masks" / "orphan.bmp", OFF_COLOURS)
    (raw / "train_val" / "images" / "notes.txt").write_text("not an image")
    report = prepare_suim(raw, tmp_path / "out")
    assert report.converted == 1
    out = tmp_path / "out" / "train"
    assert sorted(path.name for path in (out / "images").iterdir()) == ["lonely.jpg", "paired.jpg"]
    assert sorted(path.name for path in (out / "true_masks").iterdir()) == ["paired.png"]
    problems = "\n".join(report.problems)
    assert len(report.problems) == 3
    assert "lonely.jpg" in problems and "no mask" in problems
    assert "orphan.bmp" in problems and "no matching image" in problems
    assert "notes.txt" in problems and "skipped" in problems
    summary = format_report(report)
    assert "suim" in summary and "1 image/mask pairs" in summary and "lonely.jpg" in summary


def test_suim_duplicate_stems_raise(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _save_image(raw / "train_val" / "images" / "a.jpg", (4, 2))
    _save_image(raw / "train_val" / "images" / "a.png", (4, 2))
    _save_mask(raw / "train_val" / "masks" / "a.bmp", OFF_COLOURS)
    with pytest.raises(ValueError, match="same output"):
        prepare_suim(raw, tmp_path / "out")


def test_suim_mask_must_match_the_exif_oriented_image(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _save_image(raw / "train_val" / "images" / "upright.jpg", (4, 2), exif_orientation=6)
    _save_mask(raw / "train_val" / "masks" / "upright.bmp", _flat_mask((2, 4), (0, 0, 255)))
    _save_image(raw / "train_val" / "images" / "stored.jpg", (4, 2), exif_orientation=6)
    _save_mask(raw / "train_val" / "masks" / "stored.bmp", _flat_mask((4, 2), (0, 0, 255)))
    with pytest.raises(ValueError, match=r"stored\.bmp.*EXIF orientation 6"):
        prepare_suim(raw, tmp_path / "out")
    (raw / "train_val" / "masks" / "stored.bmp").unlink()
    (raw / "train_val" / "images" / "stored.jpg").unlink()
    assert prepare_suim(raw, tmp_path / "out").problems == []


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path below ``root`` (hidden ones included) with its bytes; None for folders."""
    return {
        path.relative_to(root).as_posix(): (None if path.is_dir() else path.read_bytes())
        for path in sorted(root.rglob("*"))
    }


def test_rerun_is_refused_without_overwrite_and_replaces_with_it(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _save_image(raw / "train_val" / "images" / "a.jpg", (4, 2))
    _save_mask(raw / "train_val" / "masks" / "a.bmp", OFF_COLOURS)
    out = tmp_path / "out"
    first = prepare_suim(raw, out)
    snapshot = _tree(tmp_path)
    with pytest.raises(ConfigurationError, match=r"out.*already exists and is not empty.*--overwrite"):
        prepare_suim(raw, out)
    assert _tree(tmp_path) == snapshot
    assert prepare_suim(raw, out, overwrite=True) == first
    assert _tree(tmp_path) == snapshot, "a replaced conversion must equal the first and leave nothing beside it"
    # --overwrite never deletes what the earlier conversion did not write: a file added to its
    # own folders (its recorded counts tell), or a folder beside them.
    (out / "train" / "images" / "mine.jpg").write_bytes(b"the user's")
    with pytest.raises(ConfigurationError, match=r"train/images \(2 files, the earlier conversion wrote 1\)"):
        prepare_suim(raw, out, overwrite=True)
    assert (out / "train" / "images" / "mine.jpg").read_bytes() == b"the user's"
    (out / "train" / "images" / "mine.jpg").unlink()
    (out / "runs").mkdir()
    (out / "runs" / "metrics.json").write_text("{}")
    snapshot = _tree(tmp_path)
    with pytest.raises(ConfigurationError, match=r"holds runs.*will not delete"):
        prepare_suim(raw, out, overwrite=True)
    assert _tree(tmp_path) == snapshot


def test_empty_out_dir_is_used_and_a_file_is_refused(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _save_image(raw / "train_val" / "images" / "a.jpg", (4, 2))
    _save_mask(raw / "train_val" / "masks" / "a.bmp", OFF_COLOURS)
    (tmp_path / "empty").mkdir()
    assert prepare_suim(raw, tmp_path / "empty").converted == 1
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigurationError, match="is a file"):
        prepare_suim(raw, tmp_path / "file")


def test_unrecognised_layouts_raise_helpful_errors(tmp_path: Path) -> None:
    # Pointed at the split folder itself instead of its parent.
    split_dir = tmp_path / "train_val"
    _save_image(split_dir / "images" / "a.jpg", (4, 2))
    _save_mask(split_dir / "masks" / "a.bmp", OFF_COLOURS)
    with pytest.raises(FileNotFoundError, match=r"train_val.*expected train_val/images.*found images/, masks/"):
        prepare_suim(split_dir, tmp_path / "out")
    # A split with images but no masks folder.
    partial = tmp_path / "partial"
    _save_image(partial / "train_val" / "images" / "a.jpg", (4, 2))
    with pytest.raises(FileNotFoundError, match=r"train_val/masks"):
        prepare_suim(partial, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_suim(tmp_path / "missing", tmp_path / "out")
    odd = tmp_path / "odd"
    (odd / "frames").mkdir(parents=True)
    (odd / "labels").mkdir()
    with pytest.raises(FileNotFoundError, match=r"odd.*train \+ trainannot.*found frames/, labels/"):
        prepare_camvid(odd, tmp_path / "out")


def test_bad_arguments_raise(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _save_image(raw / "train_val" / "images" / "a.jpg", (4, 2))
    _save_mask(raw / "train_val" / "masks" / "a.bmp", OFF_COLOURS)
    with pytest.raises(ValueError, match="classes"):
        prepare_suim(raw, tmp_path / "out", classes="fine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size_mismatch"):
        prepare_suim(raw, tmp_path / "out", size_mismatch="resize")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out_dir"):
        prepare_suim(raw, raw)


def _save_annotation(path: Path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids.astype(np.uint8), mode="L").save(path)


def test_camvid_generated_values_above_11_become_ignore_and_are_reported(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    ids = np.array([[0, 10, 11], [12, 200, 3]], dtype=np.uint8)
    _save_image(raw / "train" / "f.png", (3, 2))
    _save_annotation(raw / "trainannot" / "f.png", ids)
    _save_image(raw / "val" / "g.png", (3, 2))
    _save_annotation(raw / "valannot" / "g.png", np.full((2, 3), 11, np.uint8))
    report = prepare_camvid(raw, tmp_path / "out")
    assert report.converted == 2
    out = _read_ids(tmp_path / "out" / "train" / "true_masks" / "f.png")
    assert np.array_equal(out, [[0, 10, 255], [255, 255, 3]])
    assert (_read_ids(tmp_path / "out" / "val" / "true_masks" / "g.png") == 255).all()
    assert len(report.problems) == 1
    assert "trainannot/f.png" in report.problems[0] and "2 pixels" in report.problems[0]


def test_camvid_rejects_colour_annotations_and_size_mismatch(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _save_image(raw / "train" / "f.png", (3, 2))
    _save_mask(raw / "trainannot" / "f.png", np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(ValueError, match=r"f\.png.*single-channel.*'RGB'"):
        prepare_camvid(raw, tmp_path / "out")
    _save_annotation(raw / "trainannot" / "f.png", np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError, match=r"f\.png.*3x3.*3x2"):
        prepare_camvid(raw, tmp_path / "out")


def test_format_report_is_short_and_points_to_the_full_list(tmp_path: Path) -> None:
    report = PrepareReport("suim", tmp_path, 5, [f"file{i}.bmp: odd; skipped" for i in range(30)])
    summary = format_report(report)
    assert summary.splitlines()[0] == f"suim: wrote 5 image/mask pairs to {tmp_path}"
    assert "file0.bmp" in summary and "file29.bmp" not in summary
    assert "18 more" in summary and "classes.json" in summary
    assert "no problems" in format_report(PrepareReport("camvid", tmp_path, 1, []))


# ----------------------------------------------------------------------------- all or nothing


def _suim_raw(raw: Path, stems: tuple[str, ...] = ("a", "b", "c"), size: tuple[int, int] = (64, 48)) -> None:
    for stem in stems:
        _save_image(raw / "train_val" / "images" / f"{stem}.jpg", size)
        _save_mask(raw / "train_val" / "masks" / f"{stem}.bmp", _flat_mask(size, (0, 0, 255)))


def _cut(path: Path, keep: float) -> None:
    """Truncate a file to a fraction of its bytes, as an interrupted download would."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGE = {
    "truncated-mask": ("masks", "b.bmp", 0.5, "truncated"),  # header fine: found while writing
    "empty-mask": ("masks", "b.bmp", 0.0, "not a readable image"),  # found before writing
    "truncated-image": ("images", "b.jpg", 0.5, "truncated"),
}


@pytest.mark.parametrize("out_state", ["missing", "missing-parents", "empty", "earlier-conversion"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_file_refuses_and_leaves_out_exactly_as_before(tmp_path: Path, damage: str, out_state: str) -> None:
    raw = tmp_path / "raw"
    _suim_raw(raw)
    out = tmp_path / "new" / "deeper" / "out" if out_state == "missing-parents" else tmp_path / "out"
    if out_state == "empty":
        out.mkdir()
    elif out_state == "earlier-conversion":
        prepare_suim(raw, out, classes="all")  # other ids than this run's: a partial rewrite would show
    folder, name, keep, reason = DAMAGE[damage]
    _cut(raw / "train_val" / folder / name, keep)
    before = _tree(tmp_path)
    pattern = rf"(?i)1 damaged file\(s\).*train_val/{folder}/{name}: .*{reason}.*--skip_damaged"
    with pytest.raises(ConfigurationError, match=pattern) as error:
        prepare_suim(raw, out, overwrite=True, workers=2)
    assert "\n" not in str(error.value)
    assert _tree(tmp_path) == before


def test_skip_damaged_leaves_the_pair_out_and_lists_it(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _suim_raw(raw, stems=("a", "b", "c", "d"))
    _cut(raw / "train_val" / "masks" / "b.bmp", 0.5)
    _cut(raw / "train_val" / "images" / "d.jpg", 0.5)
    report = prepare_suim(raw, tmp_path / "out", skip_damaged=True)
    assert report.converted == 2
    assert sorted(path.name for path in (tmp_path / "out" / "train" / "images").iterdir()) == ["a.jpg", "c.jpg"]
    assert sorted(path.name for path in (tmp_path / "out" / "train" / "true_masks").iterdir()) == ["a.png", "c.png"]
    assert len(report.problems) == 2
    assert all("truncated" in line and "skipped" in line for line in report.problems), report.problems
    assert {line.split(":")[0] for line in report.problems} == {"train_val/masks/b.bmp", "train_val/images/d.jpg"}


def test_leftovers_of_a_killed_conversion_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    raw = tmp_path / "raw"
    _suim_raw(raw, stems=("a",))
    leftover = tmp_path / ".out.partial-0badf00d"  # what kill -9 during a conversion leaves
    (leftover / "train" / "images").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="datus.commands.prepare"):
        prepare_suim(raw, tmp_path / "out")
    assert [record.getMessage() for record in caplog.records if str(leftover) in record.getMessage()] != []
    assert leftover.is_dir(), "another conversion might still be writing it"


def test_a_crash_midway_leaves_out_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datus.commands.prepare.core

    raw = tmp_path / "raw"
    _suim_raw(raw)
    real_write_png = datus.commands.prepare.core.write_png
    written: list[Path] = []

    def fail_on_second(destination: Path, array: np.ndarray) -> None:
        written.append(destination)
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        real_write_png(destination, array)

    monkeypatch.setattr(datus.commands.prepare.core, "write_png", fail_on_second)
    before = _tree(tmp_path)
    with pytest.raises(OSError, match="No space"):
        prepare_suim(raw, tmp_path / "out", workers=1)
    assert len(written) == 2 and _tree(tmp_path) == before


# ----------------------------------------------------------------------------- COCO-Stuff-27


def _save_ids(path: Path, ids: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(ids.astype(np.uint8), mode="L")
    (image.convert(mode) if mode != "L" else image).save(path)


def _coco_pair(raw: Path, split: str, stem: str, fine: np.ndarray) -> None:
    _save_image(raw / "images" / split / f"{stem}.jpg", (fine.shape[1], fine.shape[0]))
    _save_ids(raw / "stuffthingmaps_trainval2017" / split / f"{stem}.png", fine)


# fine id -> name of its coarse class, stated from COCO-Stuff's category list (not the table).
COCO_FINE_FACTS = {
    0: "person",  # person
    2: "vehicle",  # car
    16: "animal",  # cat
    61: "furniture-things",  # chair
    93: "plant",  # branch
    119: "water",  # fog
    148: "ground",  # road
    156: "sky",  # sky-other
    171: "wall",  # wall-concrete
    181: "solid",  # wood
}


def test_cocostuff27_table_covers_every_fine_id_once() -> None:
    fine_ids = sorted(fine for _, group in COCOSTUFF27_CLASSES for fine in group)
    assert fine_ids == list(range(182))
    assert len(COCOSTUFF27_CLASSES) == 27 and len({name for name, _ in COCOSTUFF27_CLASSES}) == 27
    names = [name for name, _ in COCOSTUFF27_CLASSES]
    coarse = cocostuff27_from_fine(np.arange(256, dtype=np.uint8))
    for fine, name in COCO_FINE_FACTS.items():
        assert names[coarse[fine]] == name, fine
    assert coarse[0] == 9 and coarse[93] == 22 and coarse[255] == 255
    assert (coarse[182:] == 255).all()
    assert cocostuff27_from_fine(np.array([[-1, 0, 300]])).tolist() == [[255, 9, 255]]


def test_cocostuff27_converts_both_splits_with_the_coarse_ids(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    fine = np.array([[0, 93, 255, 181], [91, 182, 200, 156]])
    _coco_pair(raw, "val2017", "000000000139", fine)
    _coco_pair(raw, "train2017", "000000000009", np.zeros((3, 5), np.uint8))
    report = prepare_cocostuff27(raw, out)
    assert report.converted == 2
    mask = _read_ids(out / "val" / "true_masks" / "000000000139.png")
    assert mask.tolist() == [[9, 22, 255, 24], [17, 255, 255, 23]]
    assert (_read_ids(out / "train" / "true_masks" / "000000000009.png") == 9).all()
    raw_image = raw / "images" / "val2017" / "000000000139.jpg"
    assert (out / "val" / "images" / "000000000139.jpg").read_bytes() == raw_image.read_bytes()
    assert len(report.problems) == 1
    assert "val2017/000000000139.png" in report.problems[0] and "2 pixels" in report.problems[0]
    meta = json.loads((out / "classes.json").read_text())
    assert meta["dataset"] == "cocostuff27" and meta["ignore_index"] == 255 and len(meta["classes"]) == 27
    assert meta["classes"][9] == "person" and meta["classes"][22] == "plant"
    assert meta["splits"] == {"train": {"images": 1, "masks": 1}, "val": {"images": 1, "masks": 1}}


def test_cocostuff27_image_list_filters_and_reports_missing_ids(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    for stem in ("000000000139", "000000000285", "000000000632"):
        _coco_pair(raw, "val2017", stem, np.full((2, 3), 93))
    _coco_pair(raw, "train2017", "000000000009", np.full((2, 3), 0))
    image_list = tmp_path / "Coco164kFull_Stuff_Coarse.txt"
    # Padded as in the IIC/STEGO files, and also with an extension, unpadded, a comment, a blank line.
    image_list.write_text("000000000139\n285.jpg\n\n# curated\n000000999999\n9\n")
    report = prepare_cocostuff27(raw, out, image_list=image_list)
    assert report.converted == 3
    assert sorted(path.name for path in (out / "val" / "images").iterdir()) == ["000000000139.jpg", "000000000285.jpg"]
    assert [path.name for path in (out / "train" / "true_masks").iterdir()] == ["000000000009.png"]
    assert len(report.problems) == 1
    assert "1 of 4 listed ids" in report.problems[0] and "000000999999" in report.problems[0]
    assert json.loads((out / "classes.json").read_text())["image_list"]["missing"] == ["000000999999"]

    unrelated = tmp_path / "other.txt"
    unrelated.write_text("000000777777\n")
    with pytest.raises(ConfigurationError, match=r"other\.txt: none of its 1 ids"):
        prepare_cocostuff27(raw, tmp_path / "out2", image_list=unrelated)
    with pytest.raises(ConfigurationError, match=r"--image_list .*missing\.txt does not exist"):
        prepare_cocostuff27(raw, tmp_path / "out2", image_list=tmp_path / "missing.txt")
    assert not (tmp_path / "out2").exists()


def test_cocostuff27_refuses_a_mask_of_another_size(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _coco_pair(raw, "val2017", "000000000139", np.zeros((4, 6), np.uint8))
    _save_ids(raw / "stuffthingmaps_trainval2017" / "val2017" / "000000000139.png", np.zeros((4, 5), np.uint8))
    with pytest.raises(ConfigurationError, match=r"val2017/000000000139\.png: mask 5x4 vs image 6x4.*never resized"):
        prepare_cocostuff27(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cocostuff27_mask_follows_the_exif_orientation_of_its_image(tmp_path: Path) -> None:
    """COCO annotations are drawn on the stored pixels; datus reads images upright."""
    from PIL import ImageOps

    raw, out = tmp_path / "raw", tmp_path / "out"
    fine = np.array([[0, 2, 16, 61], [93, 119, 148, 156]])  # 4 wide, 2 tall, all distinct classes
    coarse = cocostuff27_from_fine(fine)
    exif = Image.Exif()
    exif[0x0112] = 6
    image_path = raw / "images" / "val2017" / "000000000139.png"  # lossless, so pixels can be compared
    image_path.parent.mkdir(parents=True)
    Image.fromarray(coarse, mode="L").convert("RGB").save(image_path, exif=exif)
    _save_ids(raw / "stuffthingmaps_trainval2017" / "val2017" / "000000000139.png", fine)
    report = prepare_cocostuff27(raw, out)
    with Image.open(out / "val" / "images" / "000000000139.png") as image:
        upright = np.asarray(ImageOps.exif_transpose(image))[..., 0]
    mask = _read_ids(out / "val" / "true_masks" / "000000000139.png")
    assert mask.shape == (4, 2) and np.array_equal(mask, upright)
    assert len(report.problems) == 1 and "EXIF orientation 6" in report.problems[0]


# ----------------------------------------------------------------------------- Cityscapes


def _cityscapes_pair(raw: Path, split: str, city: str, frame: str, label_ids: np.ndarray) -> None:
    size = (label_ids.shape[1], label_ids.shape[0])
    prefix = f"{city}_000000_{frame}"
    _save_image(raw / "leftImg8bit" / split / city / f"{prefix}_leftImg8bit.png", size)
    gt = raw / "gtFine" / split / city
    _save_ids(gt / f"{prefix}_gtFine_labelIds.png", label_ids)
    _save_ids(gt / f"{prefix}_gtFine_instanceIds.png", label_ids)  # published beside it, not used
    _save_mask(gt / f"{prefix}_gtFine_color.png", np.zeros((*label_ids.shape, 3)))
    (gt / f"{prefix}_gtFine_polygons.json").write_text("{}")


def test_cityscapes27_mapping() -> None:
    label_ids = np.array([6, 7, 8, 33, 34, 0, 255])
    assert cityscapes27_from_label_ids(label_ids).tolist() == [255, 0, 1, 26, 255, 255, 255]
    assert len(CITYSCAPES_CLASSES) == 27
    assert CITYSCAPES_CLASSES[:4] == ("road", "sidewalk", "parking", "rail track")
    assert CITYSCAPES_CLASSES[4] == "building" and CITYSCAPES_CLASSES[26] == "bicycle"


def test_cityscapes_keeps_city_folders_and_maps_label_ids(tmp_path: Path) -> None:
    from datus.datamodules.images import list_images

    raw, out = tmp_path / "raw", tmp_path / "out"
    label_ids = np.array([[7, 33, 6], [8, 0, 35]])
    _cityscapes_pair(raw, "train", "aachen", "000019", label_ids)
    _cityscapes_pair(raw, "train", "bochum", "000019", np.full((2, 3), 26))
    _cityscapes_pair(raw, "val", "lindau", "000042", np.full((2, 3), 23))
    (raw / "leftImg8bit" / "train" / "aachen" / "README.txt").write_text("stray")
    report = prepare_cityscapes(raw, out)
    assert report.converted == 3
    assert len(report.problems) == 2, report.problems
    assert "aachen/README.txt" in report.problems[0] and "skipped" in report.problems[0]
    assert "aachen_000000_000019_gtFine_labelIds.png" in report.problems[1] and "1 pixels" in report.problems[1]
    mask = _read_ids(out / "train" / "true_masks" / "aachen" / "aachen_000000_000019.png")
    assert mask.tolist() == [[0, 26, 255], [1, 255, 255]]
    assert (_read_ids(out / "val" / "true_masks" / "lindau" / "lindau_000000_000042.png") == 16).all()
    raw_image = raw / "leftImg8bit" / "train" / "bochum" / "bochum_000000_000019_leftImg8bit.png"
    assert (out / "train" / "images" / "bochum" / "bochum_000000_000019.png").read_bytes() == raw_image.read_bytes()
    # The data modules pair the nested images with their masks.
    entries = list_images(out / "train" / "images", out / "train" / "true_masks")
    assert [entry.image_id for entry in entries] == ["aachen/aachen_000000_000019", "bochum/bochum_000000_000019"]
    assert all(entry.mask_path is not None for entry in entries)
    meta = json.loads((out / "classes.json").read_text())
    assert meta["dataset"] == "cityscapes" and meta["classes"][0] == "road" and len(meta["classes"]) == 27


def test_cityscapes_refuses_colour_label_maps_and_size_mismatch(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _cityscapes_pair(raw, "val", "lindau", "000042", np.full((2, 3), 7))
    label_path = raw / "gtFine" / "val" / "lindau" / "lindau_000000_000042_gtFine_labelIds.png"
    _save_ids(label_path, np.full((2, 3), 7), mode="RGB")
    with pytest.raises(ConfigurationError, match=r"lindau_000000_000042_gtFine_labelIds\.png: expected a single-channel"):
        prepare_cityscapes(raw, tmp_path / "out")
    _save_ids(label_path, np.full((3, 3), 7))
    with pytest.raises(ConfigurationError, match=r"labelIds\.png: annotation 3x3 vs image 3x2.*never resized"):
        prepare_cityscapes(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- console


def _console(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """Run the ``datus`` console script in-process; returns (exit status, stdout, stderr)."""
    from datus.commands.cli import console_main

    monkeypatch.setattr(sys, "argv", ["datus", *map(str, args)])
    monkeypatch.setattr("datus.commands.cli._show_own_logs", lambda: None)  # no handler bound to this test's stderr
    try:
        console_main()
        status = 0
    except SystemExit as exit_info:
        status = int(exit_info.code or 0)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_console_prepare_cocostuff27_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tmp_path / "raw"
    _coco_pair(raw, "val2017", "000000000139", np.full((2, 3), 93))
    status, out, err = _console(monkeypatch, capsys, "prepare", "cocostuff27", raw, tmp_path / "out", "--workers", 1)
    assert status == 0 and err == ""
    assert out.splitlines()[0] == f"cocostuff27: wrote 1 image/mask pairs to {tmp_path / 'out'}"


def _console_refusals(tmp_path: Path) -> dict[str, tuple[list[object], str]]:
    suim, coco, city = tmp_path / "suim", tmp_path / "coco", tmp_path / "city"
    _suim_raw(suim)
    _cut(suim / "train_val" / "masks" / "b.bmp", 0.5)
    _coco_pair(coco, "val2017", "000000000139", np.zeros((4, 6), np.uint8))
    _save_ids(coco / "stuffthingmaps_trainval2017" / "val2017" / "000000000139.png", np.zeros((4, 5), np.uint8))
    _cityscapes_pair(city, "val", "lindau", "000042", np.full((2, 3), 7))
    _save_ids(city / "gtFine" / "val" / "lindau" / "lindau_000000_000042_gtFine_labelIds.png", np.zeros((2, 3)), "RGB")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    out = tmp_path / "out"
    return {
        "truncated-mask": (["suim", suim, out], "1 damaged file(s) in"),
        "out-not-empty": (["suim", suim, tmp_path / "full", "--skip_damaged"], "already exists and is not empty"),
        "size-mismatch": (["cocostuff27", coco, out], "000000000139.png: mask 5x4 vs image 6x4"),
        "missing-list": (["cocostuff27", coco, out, "--image_list", tmp_path / "nope.txt"], "--image_list"),
        "list-for-suim": (["suim", suim, out, "--image_list", tmp_path / "nope.txt"], "--image_list applies to cocostuff27 only"),
        "colour-labels": (["cityscapes", city, out], "labelIds.png: expected a single-channel"),
        "missing-raw": (["cityscapes", tmp_path / "nowhere", out], "Cityscapes raw folder"),
    }


@pytest.mark.parametrize(
    "case", ["truncated-mask", "out-not-empty", "size-mismatch", "missing-list", "list-for-suim", "colour-labels", "missing-raw"]
)
def test_console_prepare_refusals_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    args, expected = _console_refusals(tmp_path)[case]
    before = _tree(tmp_path)
    status, out, err = _console(monkeypatch, capsys, "prepare", *args)
    assert status == 2, (out, err)
    assert err.startswith("datus: error: ") and err.count("\n") == 1, err
    assert expected in err and "Traceback" not in err
    assert _tree(tmp_path) == before
