"""Tar shards (WebDataset layout) as --data.root: the same masks as the same images as files."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datus.core.io import read_label_png
from datus.runfolder.run import Run
from tests.generated import SHARED_DATA, TINY, predict, records_of, run_ddp_predict, write_two_region_dataset

pytestmark = pytest.mark.integration

SHARDS = 2
PER_SHARD = 4


def add_member(archive: tarfile.TarFile, name: str, data: bytes, **fields: object) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    for key, value in fields.items():
        setattr(info, key, value)
    archive.addfile(info, io.BytesIO(data) if info.isreg() else None)


def write_shard(tar: Path, files: Iterable[tuple[str, Path]]) -> Path:
    """A WebDataset shard: each (member name, file on disk) in the given order."""
    with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT) as archive:
        for name, path in files:
            add_member(archive, name, path.read_bytes())
    return tar


def mask_ids(run: Path) -> list[str]:
    return sorted(str(path.relative_to(run / "masks").with_suffix("")) for path in (run / "masks").rglob("*.png"))


def assert_same_masks(run: Path, reference: Path) -> None:
    ids = mask_ids(reference)
    assert ids and mask_ids(run) == ids
    for image_id in ids:
        assert np.array_equal(read_label_png(run / "masks" / f"{image_id}.png"), read_label_png(reference / "masks" / f"{image_id}.png")), image_id


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """files/shard-000<s>/img <i>.jpg with masks/shard-000<s>/img <i>.png, and the same as
    tars/shard-000<s>.tar holding img <i>.jpg and img <i>.seg.png (ids equal either way)."""
    root = tmp_path_factory.mktemp("tar-samples")
    flat, flat_masks = root / "flat", root / "flat_masks"
    write_two_region_dataset(flat, SHARDS * PER_SHARD, flat_masks, nested_every=10**6)
    (root / "tars").mkdir()
    for shard in range(SHARDS):
        stems = [f"img {index}" for index in range(shard * PER_SHARD, (shard + 1) * PER_SHARD)]
        for stem in stems:
            for source, target, suffix in ((flat, root / "files", ".jpg"), (flat_masks, root / "masks", ".png")):
                (target / f"shard-{shard:04d}").mkdir(parents=True, exist_ok=True)
                os.link(next(source.rglob(f"{stem}{suffix}")), target / f"shard-{shard:04d}" / f"{stem}{suffix}")
        members = []
        for stem in sorted(stems):  # the files' listing order, so both runs see the same batches
            members += [(f"{stem}.jpg", next(flat.rglob(f"{stem}.jpg"))), (f"{stem}.seg.png", next(flat_masks.rglob(f"{stem}.png")))]
        write_shard(root / "tars" / f"shard-{shard:04d}.tar", members)
    return root


@pytest.fixture(scope="module")
def files_run(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("files-run")
    predict(run, "--data.root", str(samples / "files"), "--data.mask_dir", str(samples / "masks"), "--eval.num_classes", "2",
            "--data.batch_size", "2")  # fmt: skip
    return run


def test_brace_pattern_of_tars_with_masks_inside_gives_the_masks_and_scores_of_the_files(samples: Path, files_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    predict(run, "--data.root", str(samples / "tars" / "shard-{0000..0001}.tar"), "--eval.num_classes", "2",
            "--data.batch_size", "2")  # fmt: skip
    assert_same_masks(run, files_run)
    assert mask_ids(run)[0] == "shard-0000/img 0"  # <shard>/<key>
    scored = json.loads((run / "metrics.json").read_text())
    reference = json.loads((files_run / "metrics.json").read_text())
    assert scored["num_classes"] == 2 and scored == reference  # ground truth read from <key>.seg.png in the tars
    records = records_of(run)
    assert all(".tar/img " in record.image_path and record.mask_path.endswith(".seg.png") for record in records)
    described = json.loads((run / "run.json").read_text())
    assert described["identity"]["data"]["input"] == "tar shards"
    assert described["inputs"]["tar_shards"]["names"] == ["shard-0000.tar", "shard-0001.tar"]
    assert json.loads((run / "skipped.json").read_text()) == []


def test_two_ddp_processes_over_a_folder_of_tars_predict_every_image_once(samples: Path, files_run: Path, tmp_path: Path) -> None:
    """Lightning's unrepeated sampler deals the (shard, member) list out; masks paired from --data.mask_dir."""
    run_ddp_predict(
        "--config", TINY, "--data.root", str(samples / "tars"), "--data.mask_dir", str(samples / "masks"),
        "--eval.num_classes", "2", "--data.batch_size", "2", "--output_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
    )  # fmt: skip
    assert {path.name[:7] for path in Run(tmp_path).shards()} == {"rank000", "rank001"}
    ids = [record.image_id for record in records_of(tmp_path)]
    assert sorted(ids) == mask_ids(files_run)  # every image exactly once
    assert_same_masks(tmp_path, files_run)
    assert (tmp_path / "metrics.json").read_text() == (files_run / "metrics.json").read_text()


def test_interrupted_run_over_tars_resumes_by_id_and_follows_changed_shards(samples: Path, files_run: Path, tmp_path: Path) -> None:
    tars = tmp_path / "tars"
    tars.mkdir()
    for shard in (samples / "tars").iterdir():
        (tars / shard.name).write_bytes(shard.read_bytes())
    run = tmp_path / "run"
    flags = ("--data.root", str(tars), "--data.batch_size", "2", "--eval.num_classes", "2")
    predict(run, *flags)
    shards = Run(run).shards()
    kept = {shard: shard.stat().st_mtime_ns for shard in shards[:2]}
    for shard in shards[2:]:  # as if killed after two batches
        shard.unlink()
    (run / "summary.json").unlink()
    predict(run, *flags)
    assert {shard: shard.stat().st_mtime_ns for shard in Run(run).shards()[:2]} == kept  # recorded images not predicted again
    assert sorted(record.image_id for record in records_of(run)) == mask_ids(files_run)
    assert_same_masks(run, files_run)

    os.utime(tars / "shard-0001.tar", ns=(1, 1))  # a rewritten shard: its images are predicted again
    (tars / "shard-0000.tar").unlink()  # a vanished shard: its images leave the run
    predict(run, *flags)
    ids = sorted(record.image_id for record in records_of(run))
    assert ids == [image_id for image_id in mask_ids(files_run) if image_id.startswith("shard-0001/")]
    assert mask_ids(run) == ids
    skipped = json.loads((run / "skipped.json").read_text())
    assert sum("vanished" in entry["reason"] for entry in skipped) == PER_SHARD


def test_hostile_tar_members_are_skipped_with_their_reasons(samples: Path, tmp_path: Path) -> None:
    good = samples / "files" / "shard-0000" / "img 0.jpg"
    tar = tmp_path / "hostile.tar"
    with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT) as archive:
        add_member(archive, "good.jpg", good.read_bytes())
        add_member(archive, "../escape.jpg", good.read_bytes())
        add_member(archive, "/etc/absolute.jpg", good.read_bytes())
        add_member(archive, "link.jpg", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add_member(archive, "hard.jpg", b"", type=tarfile.LNKTYPE, linkname="good.jpg")
        add_member(archive, "device.jpg", b"", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        add_member(archive, "corrupt.jpg", b"\xff\xd8\xff\xe0 not really a jpeg" * 10)
        add_member(archive, "notes.txt", b"sidecar fields are ignored")
        add_member(archive, "zz-good.png", _png(good))
    with tarfile.open(tar) as archive:
        last = archive.getmembers()[-1]
        end = last.offset_data + -(-last.size // 512) * 512  # where the end-of-archive blocks start
    header = tarfile.TarInfo("huge.jpg")
    header.size = 8 << 30  # declares 8 GiB; the file ends 1 KiB after its header
    tar.write_bytes(tar.read_bytes()[:end] + header.tobuf(format=tarfile.GNU_FORMAT) + good.read_bytes()[:1024])
    run = tmp_path / "run"
    predict(run, "--data.root", str(tar), "--cluster.num_clusters", "2")
    assert sorted(record.image_id for record in records_of(run)) == ["hostile/good", "hostile/zz-good"]
    reasons = {Path(entry["path"]).name: entry["reason"] for entry in json.loads((run / "skipped.json").read_text())}
    assert set(reasons) == {"escape.jpg", "absolute.jpg", "link.jpg", "hard.jpg", "device.jpg", "corrupt.jpg", "huge.jpg", "hostile.tar"}
    assert "leaves the shard" in reasons["escape.jpg"] and "absolute" in reasons["absolute.jpg"]
    assert "symbolic link" in reasons["link.jpg"] and "hard link" in reasons["hard.jpg"] and "device" in reasons["device.jpg"]
    assert "Truncated" in reasons["corrupt.jpg"]
    assert "declares 8589934592 bytes but the shard ends 1024 bytes" in reasons["huge.jpg"]
    assert "damaged tar after 10 member(s)" in reasons["hostile.tar"]  # the cut-short shard itself, once
    assert not (tmp_path / "escape.png").exists() and not list(run.rglob("*escape*"))


def _png(path: Path) -> bytes:
    stream = io.BytesIO()
    Image.open(path).save(stream, format="PNG")
    return stream.getvalue()


SUIM = SHARED_DATA / "suim-sample" / "train_val" / "images"


@pytest.mark.skipif(not SUIM.is_dir(), reason=f"the SUIM sample is not at {SUIM} (see ../shared/data/README.md)")
def test_suim_sample_as_tars_gives_the_masks_of_the_files(tmp_path: Path) -> None:
    images = sorted(SUIM.glob("*.jpg"))[:12]
    files = tmp_path / "files" / "suim-0000"
    files.mkdir(parents=True)
    for image in images:
        os.symlink(image, files / image.name)
    write_shard(tmp_path / "suim-0000.tar", [(image.name, image) for image in images])
    by_files, by_tars = tmp_path / "by-files", tmp_path / "by-tars"
    predict(by_files, "--data.root", str(tmp_path / "files"), "--data.batch_size", "4")
    predict(by_tars, "--data.root", str(tmp_path / "suim-0000.tar"), "--data.batch_size", "4")
    assert len(mask_ids(by_files)) == len(images)
    assert_same_masks(by_tars, by_files)


def test_masks_in_a_tar_as_links_or_in_capitals_are_scored_or_listed_never_dropped(tmp_path: Path) -> None:
    """A `.seg.png` link member left its image unscored with no reason; `.SEG.PNG` was neither image nor mask."""
    ids = write_two_region_dataset(tmp_path / "images", 3, tmp_path / "masks")
    with tarfile.open(tmp_path / "s.tar", "w", format=tarfile.GNU_FORMAT) as archive:
        for index, image_id in enumerate(ids):
            add_member(archive, f"img{index}.jpg", (tmp_path / "images" / f"{image_id}.jpg").read_bytes())
        add_member(archive, "img0.seg.png", (tmp_path / "masks" / f"{ids[0]}.png").read_bytes())
        add_member(archive, "img1.SEG.PNG", (tmp_path / "masks" / f"{ids[1]}.png").read_bytes())
        add_member(archive, "img2.seg.png", b"", type=tarfile.SYMTYPE, linkname="img0.seg.png")
    run = tmp_path / "run"
    predict(run, "--data.root", str(tmp_path / "s.tar"), "--eval.num_classes", "2", "--cluster.num_clusters", "2")
    skipped = json.loads((run / "skipped.json").read_text())
    assert [Path(entry["path"]).name for entry in skipped] == ["img2.seg.png"], skipped
    assert skipped[0]["reason"].startswith("not scored")
    scored = json.loads((run / "metrics.json").read_text())["protocols"]["dense"]["num_pixels"]
    labelled = sum(int((np.asarray(Image.open(tmp_path / "masks" / f"{image_id}.png")) != 255).sum()) for image_id in ids[:2])
    assert scored == labelled  # img0 (seg.png) and img1 (SEG.PNG) scored
