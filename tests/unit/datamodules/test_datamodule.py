"""Tests of datus.datamodules.images: listing, ids, decoding of every image mode, skips, the DataModule.

All images are generated in ``tmp_path`` (40 x 30 unless said otherwise); the real SUIM and
CamVid samples in ``../shared/data`` are used when present.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from datus.datamodules.images import ImageDataset, ImageFolderDataModule, collate_with_skips, list_images
from datus.discovery.backbones import normalization_of
from datus.core.errors import ConfigurationError
from datus.core.io import load_rgb
from datus.runfolder.run import image_id_for
from tests.generated import SHARED_DATA

BACKBONE = "vit_small_patch8_224.dino"

MakeImage = Callable[..., Path]


def make_dataset(entries: list[Any], image_size: int = 16, min_side: int = 8) -> ImageDataset:
    return ImageDataset(entries, image_size, min_side)


def rgb(path: Path) -> np.ndarray:
    """``load_rgb`` as an H x W x 3 uint8 array (and a check that the mode really is RGB)."""
    image, size = load_rgb(path)
    assert image.mode == "RGB" and size == (image.height, image.width)
    return np.asarray(image)


@pytest.fixture
def mixed_folder(tmp_path: Path, make_image: MakeImage) -> Path:
    """A folder tree with one image of every supported mode and format, plus non-images and bad files."""
    root = tmp_path / "mixed"
    make_image(root / "rgb.jpg", "RGB")
    make_image(root / "grey.png", "L")
    make_image(root / "grey_alpha.png", "LA")
    make_image(root / "palette.png", "P")
    make_image(root / "palette_transparent.png", "P+transparency")
    make_image(root / "rgba.png", "RGBA")
    make_image(root / "deep16.png", "I;16")
    make_image(root / "cmyk.jpg", "CMYK")
    make_image(root / "scan.tif", "RGB")
    make_image(root / "web.webp", "RGB", lossless=True)
    make_image(root / "old.bmp", "RGB")
    make_image(root / "CAMERA.JPG", "RGB", format="JPEG")
    make_image(root / "sub" / "dir" / "nested.png", "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    make_image(root / "sub" / "rotated.jpg", "RGB", exif=exif)
    make_image(root / "tiny.png", "RGB", size=(5, 5))
    (root / "notes.txt").write_text("not an image")
    (root / "broken.png").write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    (root / "empty.jpg").write_bytes(b"")
    return root


MIXED_IDS = [
    "CAMERA",
    "broken",
    "cmyk",
    "deep16",
    "empty",
    "grey",
    "grey_alpha",
    "old",
    "palette",
    "palette_transparent",
    "rgb",
    "rgba",
    "scan",
    "sub/dir/nested",
    "sub/rotated",
    "tiny",
    "web",
]


# ----------------------------------------------------------------------------- listing and ids


def test_list_images_finds_every_image_sorted(mixed_folder: Path) -> None:
    """All image files are listed recursively, sorted, with relative-path ids; notes.txt is not."""
    entries = list_images(mixed_folder)
    assert sorted(entry.image_id for entry in entries) == MIXED_IDS
    paths = [entry.path for entry in entries]
    assert paths == sorted(paths)
    assert all(entry.mask_path is None for entry in entries)
    assert mixed_folder / "notes.txt" not in paths
    assert {entry.image_id: entry.path for entry in entries}["CAMERA"] == mixed_folder / "CAMERA.JPG"


def test_list_images_is_stable_across_calls_and_creation_order(tmp_path: Path, make_image: MakeImage) -> None:
    """The listing does not depend on the order files were created in (file system order)."""
    names = ["b/2.png", "a.png", "c.png", "b/1.png", "a/z.png", "B.png"]
    for position, order in enumerate((names, names[::-1])):
        for name in order:
            make_image(tmp_path / str(position) / name, "RGB", size=(8, 8))
    first = [entry.image_id for entry in list_images(tmp_path / "0")]
    second = [entry.image_id for entry in list_images(tmp_path / "1")]
    assert first == second == [entry.image_id for entry in list_images(tmp_path / "0")]
    assert first == ["B", "a/z", "a", "b/1", "b/2", "c"]  # sorted by path components


def test_same_stem_different_extension_gets_distinct_ids(tmp_path: Path, make_image: MakeImage) -> None:
    """``a.jpg`` and ``a.png`` in one folder keep their extension in the id; ``b.png`` stays ``b``."""
    for name in ("a.jpg", "a.png", "b.png"):
        make_image(tmp_path / name, "RGB", size=(8, 8))
    ids = {entry.path.name: entry.image_id for entry in list_images(tmp_path)}
    assert ids == {"a.jpg": "a_jpg", "a.png": "a_png", "b.png": "b"}


def test_ids_are_unique_even_when_extension_suffixes_collide(tmp_path: Path, make_image: MakeImage) -> None:
    """``a.jpg``, ``a.JPG`` and ``a_jpg.png`` (all 'a_jpg' after disambiguation) still get unique ids."""
    for name in ("a.jpg", "a.JPG", "a_jpg.png", "x:y.png", "x_y.png"):
        make_image(tmp_path / name, "RGB", size=(8, 8), format="PNG")
    ids = [entry.image_id for entry in list_images(tmp_path)]
    assert len(ids) == 5
    assert len(set(ids)) == 5, ids


def test_unicode_and_spaces_in_names(tmp_path: Path, make_image: MakeImage) -> None:
    """Names with spaces and non-ASCII characters list, keep their id, and decode."""
    path = make_image(tmp_path / "my photos" / "plongée été 水中 01.jpg", "RGB")
    (entry,) = list_images(tmp_path)
    assert entry.image_id == "my photos/plongée été 水中 01"
    item = make_dataset([entry])[0]
    assert "error" not in item
    assert item["image_path"] == str(path)


def test_ids_are_safe_relative_paths(tmp_path: Path, make_image: MakeImage) -> None:
    """Ids never hold '..', absolute paths, backslashes or control characters, whatever the names."""
    for name in ("..jpg", "...jpg", "sub/..png", "back\\slash.png", "tab\there.png", "col:on.png", "sub/ok.png"):
        make_image(tmp_path / name, "RGB", size=(8, 8), format="PNG")
    ids = [entry.image_id for entry in list_images(tmp_path)]
    assert len(ids) == 7 and len(set(ids)) == 7
    for image_id in ids:
        assert image_id and not image_id.startswith("/")
        assert ".." not in image_id.split("/")
        assert "\\" not in image_id and "\t" not in image_id and ":" not in image_id
    assert image_id_for(Path("a/../b.png")) == "a/_/b"


def test_datus_layout_pairs_masks_by_stem(tmp_path: Path, make_image: MakeImage) -> None:
    """``root/train/images`` + ``root/train/true_masks/<stem>.png``; an image without mask gets ''."""
    images, masks = tmp_path / "train" / "images", tmp_path / "train" / "true_masks"
    make_image(images / "d_r_1.jpg", "RGB")
    make_image(images / "d_r_2.jpg", "RGB")
    make_image(images / "n_l_3.bmp", "RGB")
    make_image(masks / "d_r_1.png", "L")
    make_image(masks / "n_l_3.png", "L")
    make_image(masks / "d_r_2.bmp", "L")  # not a .png mask: not paired
    module = ImageFolderDataModule(tmp_path, split="train", num_workers=0)
    pairs = {entry.image_id: entry.mask_path for entry in module.entries}
    assert pairs == {"d_r_1": masks / "d_r_1.png", "d_r_2": None, "n_l_3": masks / "n_l_3.png"}
    items = {item["image_id"]: item["mask_path"] for item in module.predict_dataloader().dataset}
    assert items == {"d_r_1": str(masks / "d_r_1.png"), "d_r_2": "", "n_l_3": str(masks / "n_l_3.png")}


# ----------------------------------------------------------------------------- decoding


def test_every_mode_decodes_to_rgb(mixed_folder: Path) -> None:
    """Each mode/format decodes to an RGB image of the file's size; no readable file is skipped."""
    for name in ("rgb.jpg", "grey.png", "grey_alpha.png", "palette.png", "palette_transparent.png", "rgba.png",
                 "deep16.png", "cmyk.jpg", "scan.tif", "web.webp", "old.bmp", "CAMERA.JPG", "sub/dir/nested.png"):
        assert rgb(mixed_folder / name).shape == (30, 40, 3), name


def test_lossless_formats_keep_colours(mixed_folder: Path) -> None:
    """RGB from png/tif/bmp/webp(lossless) is bit exact; greyscale fills all three channels."""
    reference = np.asarray(Image.open(mixed_folder / "sub" / "dir" / "nested.png").convert("RGB"))
    for name in ("scan.tif", "old.bmp", "web.webp"):
        np.testing.assert_array_equal(rgb(mixed_folder / name), reference, err_msg=name)
    grey = rgb(mixed_folder / "grey.png")
    np.testing.assert_array_equal(grey[..., 0], reference[..., 0])
    assert (grey == grey[..., :1]).all()


def test_palette_without_transparency(mixed_folder: Path) -> None:
    """A palette image maps indices through its palette."""
    image = rgb(mixed_folder / "palette.png")
    assert tuple(image[25, 5]) == (10, 20, 30)
    assert tuple(image[25, 35]) == (200, 100, 50)
    assert tuple(image[5, 35]) == (0, 255, 0)


@pytest.mark.parametrize("name", ["rgba.png", "grey_alpha.png", "palette_transparent.png"])
def test_transparent_pixels_are_flattened_uniformly(mixed_folder: Path, name: str) -> None:
    """Opaque pixels keep their colour; fully transparent ones become one colour (hidden RGB never leaks)."""
    with Image.open(mixed_folder / name) as original:
        rgba = np.asarray(original.convert("RGBA"))
    visible = rgba[..., 3] == 255
    assert visible[:, 20:].all() and not visible[:, :20].any()  # the fixture's layout
    image = rgb(mixed_folder / name)
    np.testing.assert_array_equal(image[visible], rgba[..., :3][visible])
    transparent = image[:, :20].reshape(-1, 3)
    assert (transparent == transparent[0]).all()


def test_sixteen_bit_gradient_keeps_its_range(mixed_folder: Path) -> None:
    """I;16 0..65535 maps to 0..255, increasing, not clipped to white as PIL's plain convert does."""
    with Image.open(mixed_folder / "deep16.png") as original:
        assert original.mode == "I;16"
    image = rgb(mixed_folder / "deep16.png")
    row = image[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert (np.diff(row) >= 0).all() and len(np.unique(row)) > 30
    np.testing.assert_allclose(row, np.linspace(0, 255, 40), atol=1)
    assert (image == image[..., :1]).all()


def test_cmyk_jpeg_converts(mixed_folder: Path) -> None:
    """CMYK JPEGs come out as RGB close to the colours they were made from."""
    reference = np.asarray(Image.open(mixed_folder / "sub" / "dir" / "nested.png").convert("RGB")).astype(int)
    assert np.abs(rgb(mixed_folder / "cmyk.jpg").astype(int) - reference).mean() < 10


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """EXIF orientation 6 rotates the 40x30 file to 30x40: orig_size is the rotated (H, W)."""
    image = Image.new("RGB", (40, 30), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 30))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    decoded = rgb(tmp_path / "rotated.jpg")
    assert decoded.shape == (40, 30, 3)
    assert decoded[5, 15, 0] > 200 and decoded[5, 15, 2] < 50  # stored left column is now the top
    assert decoded[35, 15, 2] > 200 and decoded[35, 15, 0] < 50
    (entry,) = list_images(tmp_path)
    assert make_dataset([entry])[0]["orig_size"].tolist() == [40, 30]


# ----------------------------------------------------------------------------- skips and batches


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("broken.png", "not a readable image"),
        ("empty.jpg", "not a readable image"),
        ("tiny.png", "smaller than one patch"),
    ],
)
def test_unreadable_files_become_skips(mixed_folder: Path, name: str, reason: str) -> None:
    """Corrupt, empty and too-small files yield an error item (path + reason), never an exception."""
    entries = {entry.path.name: entry for entry in list_images(mixed_folder)}
    dataset = make_dataset([entries[name]])
    item = dataset[0]
    assert set(item) == {"error", "image_path", "index"}
    assert reason in item["error"]
    assert item["image_path"] == str(mixed_folder / name)


def test_collate_carries_skips_beside_a_working_batch(mixed_folder: Path) -> None:
    """A batch with bad files stacks the good images and lists each bad one with its path and reason."""
    entries = {entry.path.name: entry for entry in list_images(mixed_folder)}
    dataset = make_dataset([entries[name] for name in ("broken.png", "rgb.jpg", "empty.jpg", "grey.png", "tiny.png")])
    batch = collate_with_skips([dataset[index] for index in range(len(dataset))])
    assert batch["image"].shape == (2, 3, 16, 16)
    assert batch["image_id"] == ["rgb", "grey"]
    assert batch["index"].tolist() == [1, 3]
    assert batch["orig_size"].tolist() == [[30, 40], [30, 40]]
    skipped = {Path(skip["path"]).name: skip["reason"] for skip in batch["skipped"]}
    assert set(skipped) == {"broken.png", "empty.jpg", "tiny.png"}
    assert all(reason for reason in skipped.values())


def test_collate_of_only_skips_has_no_images(mixed_folder: Path) -> None:
    """A batch in which every file is bad holds only the skips (the module must not crash on it)."""
    entries = {entry.path.name: entry for entry in list_images(mixed_folder)}
    dataset = make_dataset([entries["broken.png"], entries["empty.jpg"]])
    batch = collate_with_skips([dataset[0], dataset[1]])
    assert set(batch) == {"skipped"} and len(batch["skipped"]) == 2


def test_predict_dataloader_iterates_everything(mixed_folder: Path) -> None:
    """A full pass (batch 3, no workers) sees every file once: good ones as uint8 S x S tensors."""
    module = ImageFolderDataModule(mixed_folder, image_size=24, patch_size=8, batch_size=3,
                                   num_workers=0)
    seen, skipped = [], []
    for batch in module.predict_dataloader():
        skipped += [Path(skip["path"]).name for skip in batch["skipped"]]
        if "image" in batch:
            assert batch["image"].dtype == torch.uint8
            assert batch["image"].shape == (len(batch["image_id"]), 3, 24, 24)
            assert batch["image"].shape[0] + len(batch["skipped"]) <= 3
            seen += batch["image_id"]
    assert sorted(skipped) == ["broken.png", "empty.jpg", "tiny.png"]
    assert sorted(seen) == sorted(set(MIXED_IDS) - {"broken", "empty", "tiny"})


def test_batches_are_uint8_and_the_module_normalises_with_the_backbone_mean_and_std(tmp_path: Path) -> None:
    """The loader ships pixel values untouched; the module turns them into (value / 255 - mean) / std."""
    from datus.discovery.module import DatusModule

    mean, std = normalization_of(BACKBONE)
    Image.new("RGB", (40, 30), (200, 100, 30)).save(tmp_path / "flat.png")
    pixels = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "noise.png")
    module = ImageFolderDataModule(tmp_path, image_size=16, batch_size=2, num_workers=0)
    (batch,) = list(module.predict_dataloader())
    images = dict(zip(batch["image_id"], batch["image"]))
    assert torch.equal(images["noise"], torch.from_numpy(pixels).permute(2, 0, 1))  # 16x16 at size 16: no resampling
    model = DatusModule(BACKBONE, weights="random", image_size=16, backbone_kwargs={"depth": 1})
    normalised = model.normalise(batch["image"])
    for channel, value in enumerate((200, 100, 30)):
        expected = (value / 255 - mean[channel]) / std[channel]
        flat = normalised[batch["image_id"].index("flat"), channel]
        torch.testing.assert_close(flat, torch.full((16, 16), expected), atol=1e-5, rtol=0)


def test_recorded_images_are_left_out_and_new_ones_never_take_their_ids(mixed_folder: Path) -> None:
    """Resume: recorded paths are left out; a new file whose id a recorded file holds gets a numbered id."""
    module = ImageFolderDataModule(mixed_folder, batch_size=4, num_workers=0)
    by_id = {entry.image_id: entry for entry in module.entries}
    recorded = {os.path.abspath(by_id[i].path): i for i in ("rgb", "sub/dir/nested", "broken")}
    recorded["/elsewhere/gone.jpg"] = "grey"  # an image recorded earlier under the id 'grey', now gone
    module.exclude_recorded(recorded)
    pending = {entry.image_id: entry.path.name for entry in module.pending_entries}
    assert set(pending) == set(MIXED_IDS) - {"rgb", "sub/dir/nested", "broken", "grey"} | {"grey_2"}
    assert pending["grey_2"] == "grey.png"
    dataset = module.predict_dataloader().dataset
    assert [entry.image_id for entry in dataset.entries] == [entry.image_id for entry in module.pending_entries]


# ----------------------------------------------------------------------------- DataModule errors


def test_missing_root_names_the_flag(tmp_path: Path) -> None:
    """A root that does not exist is refused naming --data.root and the folder."""
    with pytest.raises(ConfigurationError, match=r"--data\.root.*nowhere"):
        ImageFolderDataModule(tmp_path / "nowhere")


def test_missing_split_folder_explains_the_layout(tmp_path: Path) -> None:
    """With split=train but no ROOT/train/images, the error says where images must be."""
    (tmp_path / "train").mkdir()
    with pytest.raises(ConfigurationError, match=r"--data\.root.*ROOT/train/images"):
        ImageFolderDataModule(tmp_path, split="train")


def test_folder_without_images_is_an_error(tmp_path: Path) -> None:
    """A folder with no image files (only notes) is refused naming --data.root."""
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ConfigurationError, match=r"--data\.root: no images"):
        ImageFolderDataModule(tmp_path)


@pytest.mark.parametrize(("option", "value"), [("batch_size", 0), ("batch_size", -2), ("num_workers", -1)])
def test_bad_loader_options_name_the_flag(tmp_path: Path, make_image: MakeImage, option: str, value: int) -> None:
    """Non-positive batch sizes and negative worker counts raise ValueError naming the flag."""
    make_image(tmp_path / "a.png", "RGB")
    with pytest.raises(ValueError, match=rf"--data\.{option}.*{value}"):
        ImageFolderDataModule(tmp_path, **{option: value})


def test_missing_mask_dir_names_the_flag(tmp_path: Path, make_image: MakeImage) -> None:
    """A plain folder with a mask_dir that does not exist is refused naming --data.mask_dir."""
    make_image(tmp_path / "images" / "a.png", "RGB")
    with pytest.raises(ConfigurationError, match=r"--data\.mask_dir"):
        ImageFolderDataModule(tmp_path / "images", mask_dir=tmp_path / "masks")


# ----------------------------------------------------------------------------- real samples


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="no ../shared/data sample")
@pytest.mark.parametrize(
    ("folder", "count", "size"),
    [("suim-sample/train_val/images", 42, None), ("camvid-sample/train", 24, (360, 480))],
)
def test_real_samples_list_and_load(folder: str, count: int, size: tuple[int, int] | None) -> None:
    """The SUIM and CamVid samples list completely and two of their images load at model size."""
    root = SHARED_DATA / folder
    module = ImageFolderDataModule(root, image_size=32, batch_size=2, num_workers=0)
    assert len(module.entries) == count
    assert len(set(entry.image_id for entry in module.entries)) == count
    assert all("/" not in entry.image_id for entry in module.entries)
    dataset = module.predict_dataloader().dataset
    for index in (0, count - 1):
        item = dataset[index]
        assert "error" not in item, item.get("error")
        assert item["image"].shape == (3, 32, 32)
        with Image.open(item["image_path"]) as original:
            assert item["orig_size"].tolist() == [original.height, original.width]
        if size is not None:
            assert item["orig_size"].tolist() == list(size)
    assert os.path.commonpath([dataset.entries[0].path, root]) == str(root)


# ----------------------------------------------------------------------------- hostile folders


def test_the_run_folder_and_other_datus_runs_below_the_root_are_never_read(tmp_path: Path, make_image: MakeImage) -> None:
    """An --output_dir inside --data.root, and an older run folder there, hold masks and pictures, not data."""
    make_image(tmp_path / "photo.jpg")
    for run in ("out", "old/run"):
        make_image(tmp_path / run / "masks" / "photo.png", "L")
        make_image(tmp_path / run / "report.png")
    (tmp_path / "old" / "run" / "run.json").write_text('{"datus_version": "0.1.0", "identity": {}}')
    (tmp_path / "not-a-run").mkdir()
    make_image(tmp_path / "not-a-run" / "kept.png")
    ids = [entry.image_id for entry in list_images(tmp_path, exclude=tmp_path / "out")]
    assert ids == ["not-a-run/kept", "photo"]


def test_any_legal_file_name_gets_a_short_unique_writable_id(tmp_path: Path, make_image: MakeImage) -> None:
    """240-byte stems (with a sibling that differs only at the end) and undecodable bytes."""
    stem = "x" * 236
    make_image(tmp_path / f"{stem}aaaa.png")
    make_image(tmp_path / f"{stem}bbbb.png")
    make_image(Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9 \xff.png")))
    entries = list_images(tmp_path)
    ids = [entry.image_id for entry in entries]
    assert len(set(ids)) == 3
    for image_id in ids:
        assert len(image_id.encode("utf-8")) <= 200 and image_id.isprintable()
        out = tmp_path / "out" / "masks" / f"{image_id}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (2, 2)).save(out, format="PNG")  # fits the file system, with room for a suffix
    dataset = make_dataset(entries)
    assert all("error" not in dataset[index] for index in range(3))


def test_a_huge_image_is_decoded_reduced_but_keeps_its_true_size(tmp_path: Path) -> None:
    """A 24 MP JPEG is decoded at a fraction of its size for a 16 px input; its mask size stays the full size."""
    pixels = np.random.default_rng(0).integers(0, 256, (3000, 8000, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "huge.jpg", quality=70)
    image, size = load_rgb(tmp_path / "huge.jpg", min_side=16)
    assert size == (3000, 8000)
    assert 1024 <= min(image.size) < 3000
    item = make_dataset(list_images(tmp_path))[0]
    assert item["orig_size"].tolist() == [3000, 8000] and item["image"].shape == (3, 16, 16)


def test_worker_counts_above_the_cores_are_lowered(tmp_path: Path, make_image: MakeImage, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    make_image(tmp_path / "a.png")
    monkeypatch.setattr("datamodules.images.available_cores", lambda: 2)
    assert ImageFolderDataModule(tmp_path, num_workers=8).num_workers == 2
    assert "more than the 2 cores" in caplog.text
    assert ImageFolderDataModule(tmp_path).num_workers == 1
