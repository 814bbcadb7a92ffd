"""Tar shard listing: brace patterns, ids, masks, repeated names, reading members by path."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from datus.datamodules.images import ImageDataset, list_tar_images
from datus.core.errors import ConfigurationError
from datus.core.io import input_mark, load_rgb, locate_images, paired_mask, read_label_png
from datus.core.tars import expand_braces, is_tar_source, iter_samples, list_shards


def _png(size: tuple[int, int] = (24, 16), mode: str = "RGB") -> bytes:
    stream = io.BytesIO()
    Image.new(mode, size, 1 if mode == "L" else (10, 200, 30)).save(stream, format="PNG")
    return stream.getvalue()


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_brace_patterns_expand_with_padding_lists_and_nesting() -> None:
    assert expand_braces("train-{0000..0002}.tar") == ["train-0000.tar", "train-0001.tar", "train-0002.tar"]
    assert expand_braces("{a,b}/x-{1..2}.tar") == ["a/x-1.tar", "a/x-2.tar", "b/x-1.tar", "b/x-2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_ids_are_shard_and_key_and_masks_pair_from_seg_png(tmp_path: Path) -> None:
    for shard in ("s-0", "s-1"):
        _tar(tmp_path / "tars" / f"{shard}.tar", {"./a.jpg": _png(), "a.seg.png": _png(mode="L"), "b.png": _png(), "b.json": b"{}",
                                                  "dir/img.001.png": _png()})  # fmt: skip
    assert is_tar_source(tmp_path / "tars") and is_tar_source(tmp_path)
    (tmp_path / "photo.jpg").write_bytes(_png())
    assert not is_tar_source(tmp_path)  # a folder with images is read as one (its tars are not images)
    base, shards = list_shards(str(tmp_path / "tars" / "s-{0..1}.tar"))
    assert base == tmp_path / "tars" and [shard.name for shard in shards] == ["s-0.tar", "s-1.tar"]
    entries = list_tar_images(*list_shards(tmp_path / "tars"))
    assert [entry.image_id for entry in entries] == ["s-0/a", "s-0/b", "s-0/dir/img.001", "s-1/a", "s-1/b", "s-1/dir/img.001"]
    first = entries[0]
    assert str(first.path) == f"{tmp_path}/tars/s-0.tar/a.jpg" and str(first.mask_path) == f"{tmp_path}/tars/s-0.tar/a.seg.png"
    assert entries[1].mask_path is None
    assert read_label_png(first.mask_path).shape == (16, 24)  # read by its path through the tar
    assert load_rgb(first.path)[1] == (16, 24)
    assert input_mark(first.path) == first.mark
    item = ImageDataset(entries, 32, 8)[0]
    assert item["image"].shape == (3, 32, 32) and item["image_mark"].tolist() == list(first.mark)
    with pytest.raises(FileNotFoundError):
        input_mark(tmp_path / "tars" / "s-0.tar" / "missing.jpg")
    masks = tmp_path / "masks" / "s-1"
    masks.mkdir(parents=True)
    (masks / "b.png").write_bytes(_png(mode="L"))
    assert paired_mask(entries[4].path, tmp_path / "tars", tmp_path / "masks") == masks / "b.png"  # <mask_dir>/<shard>/<key>.png


def test_a_key_with_two_images_keeps_extensions_and_a_repeated_name_keeps_the_last(tmp_path: Path) -> None:
    tar = _tar(tmp_path / "x.tar", {"a.jpg": _png(), "a.png": _png(), "c.png": b"old"})
    with tarfile.open(tar, "a") as archive:  # appended again: tar semantics, the last member wins
        info = tarfile.TarInfo("c.png")
        data = _png((8, 8))
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    entries = list_tar_images(*list_shards(tar))
    readable = [entry for entry in entries if not entry.member.refused]
    assert [entry.image_id for entry in readable] == ["x/a_jpg", "x/a_png", "x/c"]
    assert load_rgb(readable[2].member)[1] == (8, 8)
    assert [entry.member.refused for entry in entries if entry.member.refused] == ["superseded by a later member of the same name"]


def test_missing_shards_of_a_pattern_are_refused_before_the_model(tmp_path: Path) -> None:
    _tar(tmp_path / "t-0.tar", {"a.png": _png()})
    assert locate_images(tmp_path / "t-0.tar", "train", None, announce=False)[0] == tmp_path / "t-0.tar"
    with pytest.raises(ConfigurationError, match="no tar shard .*t-1.tar"):
        locate_images(Path(f"{tmp_path}/t-{{0..2}}.tar"), None, None)


def test_ids_stay_apart_across_shards_whose_paths_meet(tmp_path: Path) -> None:
    """a.tar's b/x.png and a/b.tar's x.png both read a/b/x: the run refused its own shards after predicting."""
    _tar(tmp_path / "a.tar", {"b/x.png": _png()})
    _tar(tmp_path / "a" / "b.tar", {"x.png": _png()})
    ids = [entry.image_id for entry in list_tar_images(*list_shards(tmp_path))]
    assert len(ids) == 2 and len(set(ids)) == 2, ids


def test_a_shard_rewritten_in_place_is_read_anew(tmp_path: Path) -> None:
    """The process kept its old descriptor: a member of the new file was read at the old file's offset."""
    from datus.core.tars import index_shard, read_member

    shard = _tar(tmp_path / "s.tar", {"a.png": _png((8, 8)), "b.png": _png((9, 9))})
    first = {member.name: member for member, _ in iter_samples(index_shard(shard))}
    assert Image.open(read_member(first["b.png"])).size == (9, 9)
    replacement = _tar(tmp_path / "new.tar", {"b.png": _png((12, 12)), "a.png": _png((8, 8))})
    replacement.replace(shard)
    second = {member.name: member for member, _ in iter_samples(index_shard(shard))}
    assert Image.open(read_member(second["b.png"])).size == (12, 12)


def test_datus_outputs_below_a_folder_of_shards_are_not_input(tmp_path: Path) -> None:
    """A run folder inside the data root (its masks are PNGs) turned the tar folder into an image folder, so
    the rerun was refused as other data; an export's tars below it would have been read as input."""
    _tar(tmp_path / "data" / "s.tar", {"a.png": _png()})
    run = tmp_path / "data" / "run"
    (run / "masks").mkdir(parents=True)
    (run / "masks" / "a.png").write_bytes(_png())
    (run / "run.json").write_text("{}")
    _tar(tmp_path / "data" / "export" / "train-000000.tar", {"k.png": _png(), "k.seg.png": _png(mode="L")})
    (tmp_path / "data" / "export" / "export.json").write_text('{"datus_export": "0"}')
    assert is_tar_source(tmp_path / "data")
    assert [shard.name for shard in list_shards(tmp_path / "data")[1]] == ["s.tar"]


def test_shards_beside_images_are_named_as_not_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from datus.datamodules.images import ImageFolderDataModule

    _tar(tmp_path / "s.tar", {"a.png": _png()})
    (tmp_path / "loose.png").write_bytes(_png())
    assert not is_tar_source(tmp_path)
    data = ImageFolderDataModule(tmp_path, num_workers=0)
    assert [entry.image_id for entry in data.entries] == ["loose"]
    assert any("1 tar shard(s) below" in record.getMessage() and "s.tar" in record.getMessage() for record in caplog.records)


def test_a_folder_named_like_a_tar_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "photos.tar").mkdir()
    (tmp_path / "photos.tar" / "a.png").write_bytes(_png())
    assert not is_tar_source(tmp_path / "photos.tar")


def test_an_export_inside_an_image_folder_is_not_read_back_as_input(tmp_path: Path) -> None:
    from datus.datamodules.images import list_images

    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "export" / "images").mkdir(parents=True)
    (tmp_path / "export" / "images" / "a.png").write_bytes(_png())
    (tmp_path / "export" / "export.json").write_text('{"datus_export": "0.2.0"}')
    assert [entry.image_id for entry in list_images(tmp_path)] == ["a"]


def test_a_runaway_range_is_refused_at_once() -> None:
    with pytest.raises(ConfigurationError, match="names more than 1000000 shards"):
        expand_braces("part-{0..99999999}.tar")
