"""``datus export``: each format read back by the library that reads it, pixel for pixel and byte for byte.

One tiny ``datus predict`` run over images with hostile names (dots, spaces, non-ASCII, nested
folders) feeds every test; the 100k streaming figures come from scripts/benchmark_export.py.
"""

from __future__ import annotations

import io
import json
import shutil
from typing import Any
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from datus.datamodules.pseudo import PseudoMaskDataModule
from datus.commands.cli import main
from datus.core.errors import ConfigurationError
from datus.outputs.export import encode_key
from datus.core.io import read_label_png
from datus.outputs.manifest import read_manifest_entries
from tests.generated import predict, write_two_region_dataset

HOSTILE = {"nested/img 0": "nested/img 0", "img 1": "v1.2 final", "img 2": "ünï cödé", "nested/img 3": "dir.x/y z.tar"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    images = tmp_path_factory.mktemp("data") / "images"
    write_two_region_dataset(images, 5, nested_every=3)
    for old, new in HOSTILE.items():
        if old != new:
            (images / new).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(images / f"{old}.jpg", images / f"{new}.jpg")
    output = tmp_path_factory.mktemp("run")
    predict(output, "--data.root", str(images))
    return output


def expected(run: Path, ignore: int | None = None) -> dict[str, tuple[bytes, np.ndarray]]:
    """id -> (original image bytes, mask as exported)."""
    found = {}
    for entry in read_manifest_entries(run):
        mask = read_label_png(entry.mask).astype(np.int64)
        if ignore is not None:
            mask[read_label_png(run / "segments" / f"{entry.image_id}.png") == 0] = ignore
        found[entry.image_id] = (entry.image.read_bytes(), mask)
    return found


def export(run: Path, out: Path, *flags: str) -> dict:
    main(["export", str(run), str(out), *flags])
    return json.loads((out / "export.json").read_text())


def val_ids(run: Path, fraction: float, seed: int) -> set[str]:
    module = PseudoMaskDataModule(run, val_fraction=fraction, seed=seed, num_workers=0)
    return {pair.image_id for pair in module.val_pairs}


def test_run_ids_are_hostile_and_the_manifest_is_relative(run: Path) -> None:
    entries = list(read_manifest_entries(run))
    assert {entry.image_id for entry in entries} >= {"v1.2 final", "ünï cödé", "dir.x/y z.tar", "nested/img 0"}
    assert all(not Path(entry.image_path).is_absolute() and entry.image.is_file() for entry in entries)


@pytest.mark.parametrize("ignore", [None, 255])
def test_hf_parquet_loads_with_datasets_as_images_and_masks(run: Path, tmp_path: Path, ignore: int | None) -> None:
    datasets = pytest.importorskip("datasets")

    flags = ["--format", "hf", "--val_fraction", "0.4", "--seed", "3", "--shard_size", "3000"]
    report = export(run, tmp_path / "hf", *flags, *(["--ignore_noise"] if ignore is not None else []))
    assert report["skipped"] == [] and len(report["files"]) > 2  # small shards: several files per split
    loaded = datasets.load_dataset("parquet", data_dir=str(tmp_path / "hf"))
    assert set(loaded) == {"train", "validation"}
    assert isinstance(loaded["train"].features["image"], datasets.Image)
    want = expected(run, ignore)
    seen = {}
    for split in loaded:
        for row in loaded[split]:
            assert isinstance(row["image"], Image.Image) and isinstance(row["label"], Image.Image)
            seen[row["image_id"]] = split
            image_bytes, mask = want[row["image_id"]]
            assert np.array_equal(np.asarray(row["label"]).astype(np.int64), mask)
            assert row["image"].size == (mask.shape[1], mask.shape[0])
    table = datasets.load_dataset("parquet", data_dir=str(tmp_path / "hf")).cast_column("image", datasets.Image(decode=False))
    for split in table:
        for row in table[split]:
            assert row["image"]["bytes"] == want[row["image_id"]][0]
    assert set(seen) == set(want)
    assert {i for i, split in seen.items() if split == "validation"} == val_ids(run, 0.4, 3)
    assert json.loads((tmp_path / "hf" / "id2label.json").read_text()) == {str(c): f"cluster {c}" for c in range(report["num_clusters"])}
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "backbone" in card and "dtype: image" in card


@pytest.mark.parametrize("ignore", [None, 250])
def test_webdataset_tars_read_back_with_webdataset(run: Path, tmp_path: Path, ignore: int | None) -> None:
    wds = pytest.importorskip("webdataset")

    flags = ["--format", "webdataset", "--val_fraction", "0.4", "--seed", "3"]
    flags += ["--ignore_noise", "--ignore_value", str(ignore)] if ignore is not None else []
    report = export(run, tmp_path / "wds", *flags)
    want = expected(run, ignore)
    seen = {}
    for tar in sorted((tmp_path / "wds").glob("*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False):
            meta = json.loads(sample["json"])
            assert unquote(sample["__key__"]) == meta["image_id"] and "." not in sample["__key__"]
            image_bytes, mask = want[meta["image_id"]]
            assert sample["jpg"] == image_bytes
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["seg.png"]))).astype(np.int64), mask)
            assert (meta["width"], meta["height"]) == (mask.shape[1], mask.shape[0])
            seen[meta["image_id"]] = tar.name.split("-")[0]
    assert set(seen) == set(want) and report["images"] == {"train": 3, "val": 2}
    assert {i for i, split in seen.items() if split == "val"} == val_ids(run, 0.4, 3)


def test_folders_follow_mmseg_and_detectron2_conventions(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "folders"
    report = export(run, out, "--format", "folders", "--val_fraction", "0.4", "--seed", "3")
    want = expected(run)
    # mmsegmentation: img_dir/<name><img_suffix>, ann_dir/<name><seg_map_suffix>, ann_file lists names
    names = {split: (out / "splits" / f"{split}.txt").read_text().split("\n")[:-1] for split in ("train", "val")}
    assert {unquote(n) for n in names["val"]} == val_ids(run, 0.4, 3)
    for name in names["train"] + names["val"]:
        image_bytes, mask = want[unquote(name)]
        assert (out / "images" / f"{name}.jpg").read_bytes() == image_bytes
        assert np.array_equal(np.asarray(Image.open(out / "masks" / f"{name}.png")).astype(np.int64), mask)
    # detectron2 load_sem_seg: a flat listing of each folder, paired by stem
    images = sorted(p.stem for p in (out / "images").iterdir())
    masks = sorted(p.stem for p in (out / "masks").iterdir())
    assert images == masks and len(images) == len(want) and all(p.is_file() for p in (out / "images").iterdir())
    assert report["linked"] == 2 * len(want) and report["copied"] == 0  # hard links on one file system


def test_ignore_noise_in_folders_writes_new_masks_and_ids_map_back(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "folders"
    report = export(run, out, "--format", "folders", "--ignore_noise", "--link", "copy")
    want = expected(run, 255)
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    for row in index:
        assert np.array_equal(np.asarray(Image.open(out / row["mask"])).astype(np.int64), want[row["image_id"]][1])
        assert row["name"] == encode_key(row["image_id"])
    assert report["noise_pixels_ignored"] == sum(int((m == 255).sum()) for _, m in want.values()) and report["linked"] == 0


def test_a_foreign_or_other_format_output_is_refused_and_an_earlier_export_replaced(run: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(ConfigurationError, match="not a datus export"):
        main(["export", str(run), str(foreign), "--format", "hf"])
    assert (foreign / "notes.txt").read_text() == "keep" and len(list(foreign.iterdir())) == 1
    out = tmp_path / "out"
    export(run, out, "--format", "webdataset")
    with pytest.raises(ConfigurationError, match="format 'webdataset'"):
        main(["export", str(run), str(out), "--format", "hf"])
    export(run, out, "--format", "webdataset", "--val_fraction", "0")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "export.json", "id2label.json", "train-000000.tar"]
    (out / "extra.txt").write_text("mine")
    with pytest.raises(ConfigurationError, match="extra.txt"):
        main(["export", str(run), str(out), "--format", "webdataset"])
    with pytest.raises(ConfigurationError, match="inside the run"):
        main(["export", str(run), str(run / "exported"), "--format", "hf"])
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(ConfigurationError, match="symbolic link"):
        main(["export", str(run), str(link), "--format", "hf"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--format", "zip"], "invalid choice"),
        (["--format", "hf", "--val_fraction", "1"], "val_fraction"),
        (["--format", "hf", "--ignore_noise", "--ignore_value", "1"], "is a cluster id"),
        (["--format", "hf", "--results", "/tmp"], "--results"),
        (["--format", "hf", "--shard_size", "nan"], "--shard_size nan: give a number of bytes"),
        (["--format", "webdataset", "--shard_size", "inf"], "--shard_size inf: give a number of bytes"),
    ],
)
def test_bad_options_are_one_line_errors(run: Path, tmp_path: Path, flags: list[str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        main(["export", str(run), str(tmp_path / "o"), *flags])


def test_a_missing_or_damaged_file_is_a_listed_skip(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    (copy / "masks" / "v1.2 final.png").write_bytes(b"\x89PNG broken")
    (copy / "masks" / "ünï cödé.png").unlink()
    report = export(copy, tmp_path / "out", "--format", "webdataset")
    assert sorted(s["image"] for s in report["skipped"]) == ["v1.2 final", "ünï cödé"]
    assert sum(report["images"].values()) == 3


def test_clusters_results_are_exported_from_their_folder(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    main(["cluster", "--run", str(copy), "--cluster.num_clusters", "2"])
    report = export(copy, tmp_path / "out", "--format", "folders", "--results", str(copy / "clusters" / "k2"))
    assert report["num_clusters"] == 2 and report["skipped"] == []
    for row in map(json.loads, (tmp_path / "out" / "index.jsonl").read_text().splitlines()):
        exported = np.asarray(Image.open(tmp_path / "out" / row["mask"]))
        assert np.array_equal(exported, read_label_png(copy / "clusters" / "k2" / "masks" / f"{row['image_id']}.png"))


def test_a_run_moved_with_its_images_reads_them_from_the_edited_root(run: Path, tmp_path: Path) -> None:
    """Manifest paths are relative: move the run and the images, edit dataset.json's image_root once."""
    dataset = json.loads((run / "dataset.json").read_text())
    moved_images = shutil.copytree(dataset["image_root"], tmp_path / "images")
    moved_run = shutil.copytree(run, tmp_path / "run", symlinks=True)
    (moved_run / "dataset.json").write_text(json.dumps({**dataset, "image_root": "../images"}))
    entries = list(read_manifest_entries(moved_run))
    assert all(entry.image.is_relative_to(moved_images) and entry.image.is_file() for entry in entries)
    module = PseudoMaskDataModule(moved_run, val_fraction=0.4, seed=3, num_workers=0)
    assert all(pair.image.is_relative_to(moved_images) for pair in module.pairs)
    assert {pair.image_id for pair in module.val_pairs} == val_ids(run, 0.4, 3)


def test_a_run_read_from_tar_shards_exports_in_every_format(tmp_path: Path) -> None:
    """Images inside a tar have no file to link: folders copies their bytes (it crashed on the hard link)."""
    import tarfile

    photos = tmp_path / "photos"
    write_two_region_dataset(photos, 3)
    with tarfile.open(tmp_path / "part-0000.tar", "w") as tar:
        for path in sorted(photos.rglob("*.jpg")):
            tar.add(path, arcname=path.relative_to(photos).as_posix())
    run = tmp_path / "run"
    predict(run, "--data.root", str(tmp_path / "part-0000.tar"))
    for format_ in ("folders", "hf", "webdataset"):
        report = export(run, tmp_path / format_, "--format", format_)
        assert report["complete"] and sum(report["images"].values()) == 3 and not report["skipped"], (format_, report)
        assert len(report["entries"]) == len(set(report["entries"]))
    stored = [path.read_bytes() for path in photos.rglob("*.jpg")]
    copied = sorted((tmp_path / "folders" / "images").iterdir())
    assert len(copied) == 3 and all(path.read_bytes() in stored for path in copied)


def test_folders_warn_when_images_have_several_suffixes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photos = tmp_path / "photos"
    write_two_region_dataset(photos, 3)
    first = sorted(photos.rglob("*.jpg"))[0]
    Image.open(first).save(first.with_suffix(".png"))
    first.unlink()
    run = tmp_path / "run"
    predict(run, "--data.root", str(photos))
    export(run, tmp_path / "folders", "--format", "folders")
    assert "several suffixes (2 .jpg, 1 .png)" in capsys.readouterr().err


@pytest.mark.parametrize("format_", ["folders", "hf"])
def test_replacing_an_export_never_deletes_what_the_user_put_there(run: Path, tmp_path: Path, format_: str) -> None:
    out = tmp_path / "out"
    export(run, out, "--format", format_)
    folder = "images" if format_ == "folders" else "data"
    (out / folder / "MY_NOTES.txt").write_text("mine")
    with pytest.raises(ConfigurationError, match=f"holds '{folder}/MY_NOTES.txt'"):
        export(run, out, "--format", format_)
    assert (out / folder / "MY_NOTES.txt").read_text() == "mine"
    forged = tmp_path / "forged"
    (forged / "photos").mkdir(parents=True)
    (forged / "export.json").write_text(json.dumps({"datus_export": "0", "format": "hf", "entries": ["photos", "export.json"]}))
    with pytest.raises(ConfigurationError, match="holds 'photos'"):
        export(run, forged, "--format", "hf")
    assert (forged / "photos").is_dir()


@pytest.mark.parametrize("format_", ["hf", "webdataset", "folders"])
def test_a_failed_export_leaves_nothing_a_loader_would_read(run: Path, tmp_path: Path, format_: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import datus.outputs.export as exporting

    real = exporting._Writer.add
    calls = []

    def fail_on_third(self: Any, sample: Any) -> None:
        calls.append(sample)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a stop signal unwinds
        real(self, sample)

    monkeypatch.setattr(exporting._Writer, "add", fail_on_third)
    monkeypatch.setattr(exporting, "DEFAULT_SHARD_BYTES", {"hf": 1, "webdataset": 1})  # a shard per sample: two committed
    with pytest.raises(KeyboardInterrupt):
        export(run, tmp_path / "out", "--format", format_)
    left = sorted(path.relative_to(tmp_path / "out").as_posix() for path in (tmp_path / "out").rglob("*") if path.is_file())
    assert left == ["export.json"], left
    assert json.loads((tmp_path / "out" / "export.json").read_text())["complete"] is False


def test_a_manifest_line_repeated_is_exported_once_and_listed(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    manifest = copy / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([*lines, lines[0]]) + "\n")
    report = export(copy, tmp_path / "out", "--format", "webdataset")
    assert sum(report["images"].values()) == len(lines)
    assert [entry["reason"] for entry in report["skipped"]] == [f"{json.loads(lines[0])['image_id']!r} is listed again in {manifest}"]
