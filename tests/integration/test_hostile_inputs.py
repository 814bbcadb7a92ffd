"""Hostile inputs that used to block, hang or be dropped in silence (issue: reliability).

Each test builds the case and fails on the code before the fix: an image between PIL's limit
and twice it, a path that became a FIFO, a symbolically linked sub-folder, a thousand-character
image id in captions, a manifest pointing outside its run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datus.commands.cli import main
from datus.outputs.drawing import fit_text, font_of, text_width
from tests.generated import REPO, TINY, write_photos

pytestmark = pytest.mark.integration


def _predict(images: Path, output_dir: Path) -> None:
    main(["predict", "--config", TINY, "--data.root", str(images), "--output_dir", str(output_dir),
          "--trainer.enable_progress_bar", "false", "--cluster.num_clusters", "2"])  # fmt: skip


def test_an_image_above_the_pixel_limit_is_skipped_and_the_run_stays_usable(tmp_path: Path) -> None:
    """16000 x 16000 (256 MP) lies between PIL's limit and twice it, where PIL only warns: it was
    predicted, then every later predict and cluster refused the shard that held it."""
    images = write_photos(tmp_path / "images", 3)
    Image.new("1", (16000, 16000)).save(images / "huge.png")
    run = tmp_path / "run"
    _predict(images, run)
    skipped = json.loads((run / "skipped.json").read_text())
    assert [Path(entry["path"]).name for entry in skipped] == ["huge.png"]
    assert "above 250000000 pixels" in skipped[0]["reason"]
    _predict(images, run)  # a rerun reads every shard again
    main(["cluster", "--run", str(run), "--cluster.num_clusters", "2"])
    assert len((run / "manifest.jsonl").read_text().splitlines()) == 3


def test_a_fifo_never_hangs_a_run(tmp_path: Path) -> None:
    """A recorded image replaced by a FIFO (and a FIFO named like an image from the start): the run
    and its rerun finish, and the FIFO is listed as skipped with a reason."""
    images = write_photos(tmp_path / "images", 3)
    os.mkfifo(images / "pipe.jpg")
    run = tmp_path / "run"
    command = [sys.executable, "-m", "datus", "predict", "--config", TINY, "--data.root", str(images),
               "--output_dir", str(run), "--trainer.enable_progress_bar", "false", "--cluster.num_clusters", "2"]  # fmt: skip
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    finished = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-2000:]
    skipped = json.loads((run / "skipped.json").read_text())
    assert [Path(entry["path"]).name for entry in skipped] == ["pipe.jpg"] and "not a regular file" in skipped[0]["reason"]
    (images / "photo1.png").unlink()
    os.mkfifo(images / "photo1.png")  # the overlay of a recorded image now opens a FIFO
    shutil.rmtree(run / "overlay")
    finished = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert not (run / "overlay" / "photo1.jpg").exists() and (run / "overlay" / "photo0.jpg").is_file()


def test_symlinked_sub_folders_are_read_once_and_loops_end(tmp_path: Path) -> None:
    outside = write_photos(tmp_path / "elsewhere", 2)
    images = write_photos(tmp_path / "images", 1)
    (images / "linked").symlink_to(outside, target_is_directory=True)
    (images / "linked_again").symlink_to(outside, target_is_directory=True)
    (images / "loop").symlink_to(images, target_is_directory=True)
    run = tmp_path / "run"
    _predict(images, run)
    ids = sorted(json.loads(line)["image_id"] for line in (run / "manifest.jsonl").read_text().splitlines())
    assert ids == ["linked/photo0", "linked/photo1", "photo0"]


def test_captions_of_long_ids_cost_time_linear_in_the_name() -> None:
    font = font_of(10)
    name = "x" * 4000
    started = time.perf_counter()
    cut = fit_text(name, font, 120)
    assert time.perf_counter() - started < 1.0  # was ~60 s for one 4000-character id
    assert cut.endswith("...") and text_width(cut, font) <= 120
    assert text_width(cut[:-3] + "x...", font) > 120  # the longest prefix that fits


def test_a_manifest_pointing_outside_its_run_is_refused(tmp_path: Path) -> None:
    from datus.datamodules.pseudo import read_manifest

    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.jsonl").write_text(json.dumps({"image_id": "a", "image": "/x/a.jpg", "mask": "../../etc/passwd"}) + "\n")
    with pytest.raises(ValueError, match="lies outside"):
        read_manifest(run)


def test_skips_are_listed_when_k_is_too_high_and_by_the_cluster_command_that_finishes(tmp_path: Path) -> None:
    from datus.core.errors import ConfigurationError

    images = write_photos(tmp_path / "images", 3)
    (images / "broken.jpg").write_text("not an image")
    run = tmp_path / "run"
    with pytest.raises(ConfigurationError, match="more than the"):
        main(["predict", "--config", TINY, "--data.root", str(images), "--output_dir", str(run),
              "--trainer.enable_progress_bar", "false", "--cluster.num_clusters", "500"])  # fmt: skip
    assert [Path(entry["path"]).name for entry in json.loads((run / "skipped.json").read_text())] == ["broken.jpg"]
    main(["cluster", "--run", str(run), "--cluster.num_clusters", "2"])
    summary = json.loads((run / "clusters" / "k2" / "summary.json").read_text())
    assert [Path(entry["path"]).name for entry in summary["skipped"]] == ["broken.jpg"]


def test_pca_wider_than_the_embeddings_is_refused_before_any_image_is_predicted(tmp_path: Path) -> None:
    from datus.core.errors import ConfigurationError

    images = write_photos(tmp_path / "images", 2)
    with pytest.raises(ConfigurationError, match="--cluster.pca_components 4096 is more than the 48 dimensions"):
        main(["predict", "--config", TINY, "--data.root", str(images), "--output_dir", str(tmp_path / "run"),
              "--cluster.pca_components", "4096"])  # fmt: skip
    assert not (tmp_path / "run" / "shards").exists()


def test_an_input_tree_deeper_than_path_max_allows_for_outputs_is_painted(tmp_path: Path) -> None:
    """A 3,800-byte relative path fits the input side of PATH_MAX but not the run's outputs: the
    id is shortened (leading folders, then a hash), painting and its rerun finish."""
    images = write_photos(tmp_path / "images", 1)
    deep = images
    for level in range(19):
        deep = deep / (f"{level:02d}" + "d" * 190)
    deep.mkdir(parents=True)
    Image.fromarray(np.full((64, 80, 3), 90, np.uint8)).save(deep / "leaf.png")
    run = tmp_path / ("r" * 200) / "run"
    _predict(images, run)
    _predict(images, run)
    entries = [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]
    deep_entry = next(entry for entry in entries if entry["image"].endswith("leaf.png"))
    assert len(deep_entry["image_id"].encode()) <= 1024 and (run / deep_entry["mask"]).is_file()


def test_evaluate_refuses_a_confusion_matrix_that_cannot_fit_in_one_line(tmp_path: Path) -> None:
    """K x C near 65535^2 allocated 68 GB and crashed."""
    from datus.core.errors import ConfigurationError

    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    Image.fromarray(np.full((4, 4), 65000, np.uint16)).save(tmp_path / "pred" / "a.png")
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(tmp_path / "gt" / "a.png")
    with pytest.raises(ConfigurationError, match="65001 clusters x 60000 classes .* need .* counts"):
        main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--num_classes", "60000",
              "--ignore_index", "65535", "--output_dir", str(tmp_path / "out")])  # fmt: skip


@pytest.mark.parametrize(("code", "fix"), [(13, "make it writable"), (30, "make it writable"), (28, "free some space")])
def test_a_write_error_is_one_line_naming_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], code: int, fix: str) -> None:
    """EACCES, EROFS, ENOSPC while painting: one line, exit 1, no traceback (tests run as root, where
    permissions never refuse, so the error is injected where a real one would come from)."""
    from datus.commands.cli import console_main

    images = write_photos(tmp_path / "images", 2)
    run = tmp_path / "run"
    _predict(images, run)
    masks = run / "clusters" / "k3" / "masks"

    def refuse(path: Path, *args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code), str(masks / ".datus-tmp-0123456789abcdef"))

    monkeypatch.setattr("datus.stages.shard_pass.write_png", refuse)
    monkeypatch.setattr(sys, "argv", ["datus", "cluster", "--run", str(run), "--cluster.num_clusters", "3"])
    with pytest.raises(SystemExit) as stopped:
        console_main()
    assert stopped.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == f"datus: error: cannot write in {masks}: {os.strerror(code)}; {fix}, then rerun the same command to resume"


def test_prepare_never_replaces_a_symlinked_output_folder(tmp_path: Path) -> None:
    from datus.core.errors import ConfigurationError

    target = tmp_path / "real"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    link = tmp_path / "out"
    link.symlink_to(target, target_is_directory=True)
    for folder in ("images", "masks"):
        (tmp_path / "raw" / "train_val" / folder).mkdir(parents=True)
    with pytest.raises(ConfigurationError, match="is a symbolic link"):
        main(["prepare", "suim", str(tmp_path / "raw"), str(link), "--overwrite"])
    assert link.is_symlink() and (target / "notes.txt").read_text() == "mine"


def test_a_run_labelled_with_another_runs_centroids_follows_when_those_change(tmp_path: Path) -> None:
    """Run B labelled with RUN_A's clusters kept A's old centroids after A was re-clustered: the
    fit is now keyed on the content of the applied model, so B's rerun equals a fresh run."""
    from datus.stages.clustering import ClusterModel
    from datus.core.io import read_label_png

    source = tmp_path / "a"
    _predict(write_photos(tmp_path / "images_a", 3), source)
    images_b = write_photos(tmp_path / "images_b", 2)
    centroids = source / "fit"

    def label(output_dir: Path) -> None:
        main(["predict", "--config", TINY, "--data.root", str(images_b), "--output_dir", str(output_dir),
              "--trainer.enable_progress_bar", "false", "--cluster.num_clusters", "2", "--cluster.centroids", str(centroids)])  # fmt: skip

    label(tmp_path / "b")
    before = read_label_png(tmp_path / "b" / "masks" / "photo0.png")
    model = ClusterModel.load(centroids)
    model.centroids = model.centroids[::-1].copy()  # A re-clustered: same clusters, other ids
    model.save(centroids)
    label(tmp_path / "b")
    label(tmp_path / "fresh")
    after = read_label_png(tmp_path / "b" / "masks" / "photo0.png")
    assert np.array_equal(after, read_label_png(tmp_path / "fresh" / "masks" / "photo0.png"))
    assert np.array_equal(after, 1 - before)


def test_each_results_folder_keeps_the_fit_it_was_painted_with(tmp_path: Path) -> None:
    """`predict` and `datus cluster` shared clusters/k<K>/: after both ran for one K with different
    settings, its centroids no longer matched its masks. Each folder now keeps its own fit/; labelling
    the same images with a folder's fit reproduces that folder's masks, in either order."""
    from datus.core.io import read_label_png

    images = write_photos(tmp_path / "images", 4)
    run = tmp_path / "run"
    _predict(images, run)
    main(["cluster", "--run", str(run), "--cluster.num_clusters", "2", "--cluster.seed", "7", "--cluster.init", "random"])
    _predict(images, run)  # a rerun after the sweep: its own fit, not the sweep's
    for results in (run, run / "clusters" / "k2"):
        relabelled = tmp_path / f"relabelled-{results.name}"
        main(["predict", "--config", TINY, "--data.root", str(images), "--output_dir", str(relabelled),
              "--trainer.enable_progress_bar", "false", "--cluster.num_clusters", "2", "--cluster.centroids", str(results)])  # fmt: skip
        for mask in sorted((results / "masks").glob("*.png")):
            assert np.array_equal(read_label_png(mask), read_label_png(relabelled / "masks" / mask.name)), (results, mask.name)
    assert json.loads((run / "fit" / "settings.json").read_text())["settings"]["seed"] != 7
    assert json.loads((run / "clusters" / "k2" / "fit" / "settings.json").read_text())["settings"]["seed"] == 7


def test_edited_ground_truth_is_scored_again(tmp_path: Path) -> None:
    """A rerun reused metrics.json although masks were edited (dense mIoU 15.60 where
    `datus evaluate` on the same files gave 21.75): metrics are keyed on the mask folder's files."""
    from tests.generated import write_datus_layout

    dataset = write_datus_layout(tmp_path / "data", 5, ["blue", "red"])
    run = tmp_path / "run"
    flags = ["predict", "--config", TINY, "--data.root", str(dataset), "--data.split", "train", "--output_dir", str(run),
             "--trainer.enable_progress_bar", "false"]  # fmt: skip
    main(flags)
    before = json.loads((run / "metrics.json").read_text())["protocols"]["dense"]["confusion"]
    for mask in sorted((dataset / "train" / "true_masks").rglob("*.png")):
        labels = np.asarray(Image.open(mask))
        Image.fromarray(np.where(labels == 255, 255, 1 - labels).astype(np.uint8)).save(mask)  # classes swapped
    main(flags)
    after = json.loads((run / "metrics.json").read_text())
    main(["evaluate", "--pred", str(run / "masks"), "--gt", str(dataset / "train" / "true_masks"), "--output_dir", str(tmp_path / "eval")])
    reference = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert after["protocols"]["dense"]["confusion"] == reference["protocols"]["dense"]["confusion"] != before


def test_a_mask_added_after_prediction_is_scored(tmp_path: Path) -> None:
    """Masks are paired when scoring, not frozen at prediction: `datus cluster` and a rerun count it."""
    from tests.generated import write_datus_layout

    dataset = write_datus_layout(tmp_path / "data", 5, ["blue", "red"])
    masks = dataset / "train" / "true_masks"
    late = sorted(masks.rglob("*.png"))[0]
    kept = tmp_path / "late.png"
    shutil.move(late, kept)
    run = tmp_path / "run"
    main(["predict", "--config", TINY, "--data.root", str(dataset), "--data.split", "train", "--output_dir", str(run),
          "--trainer.enable_progress_bar", "false"])  # fmt: skip
    before = json.loads((run / "metrics.json").read_text())["protocols"]["dense"]["num_pixels"]
    shutil.move(kept, late)
    main(["cluster", "--run", str(run), "--cluster.num_clusters", "3"])
    after = json.loads((run / "clusters" / "k3" / "metrics.json").read_text())["protocols"]["dense"]["num_pixels"]
    labels = np.asarray(Image.open(late))
    assert after == before + int((labels != 255).sum())


def test_an_abbreviated_or_misspelled_option_is_refused_with_the_nearest_name(tmp_path: Path) -> None:
    """`--cluster.num_cluster 3` was silently taken as num_clusters; now a mistake, answered in one line."""
    from datus.core.errors import ConfigurationError

    run = tmp_path / "run"
    _predict(write_photos(tmp_path / "images", 2), run)
    with pytest.raises(ConfigurationError, match=r"--cluster\.num_cluster 3; did you mean --cluster\.num_clusters\?"):
        main(["cluster", "--run", str(run), "--cluster.num_cluster", "3"])


def test_a_replaced_image_is_predicted_again_and_a_deleted_one_leaves_the_run(tmp_path: Path) -> None:
    """Resume was keyed by path only: a re-exported image kept its old mask (even of another size)
    and a deleted one stayed in k-means and the manifest. The rerun now equals a fresh run."""
    from datus.core.io import read_label_png

    images = write_photos(tmp_path / "images", 4)
    run = tmp_path / "run"
    _predict(images, run)
    replacement = np.random.default_rng(9).integers(0, 255, (72, 96, 3), dtype=np.uint8)
    Image.fromarray(replacement).save(images / "photo1.png")  # re-exported under the same name, other size
    (images / "photo2.png").unlink()
    _predict(images, run)
    _predict(images, tmp_path / "fresh")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["images_predicted_now"] == 1 and summary["images_in_run"] == 3
    assert any(entry["path"].endswith("photo2.png") and "vanished" in entry["reason"] for entry in summary["skipped"])
    for name in ("photo0", "photo1", "photo3"):
        assert np.array_equal(read_label_png(run / "masks" / f"{name}.png"), read_label_png(tmp_path / "fresh" / "masks" / f"{name}.png")), name
    assert read_label_png(run / "masks" / "photo1.png").shape == (72, 96)
    ids = sorted(json.loads(line)["image_id"] for line in (run / "manifest.jsonl").read_text().splitlines())
    assert ids == ["photo0", "photo1", "photo3"]
    assert not any((run / folder / f"photo2{suffix}").exists() for folder, suffix in (("masks", ".png"), ("overlay", ".jpg")))


def test_a_rerun_with_another_k_says_it_replaces_the_masks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    images = write_photos(tmp_path / "images", 3)
    run = tmp_path / "run"
    _predict(images, run)
    caplog.clear()
    main(["predict", "--config", TINY, "--data.root", str(images), "--output_dir", str(run),
          "--trainer.enable_progress_bar", "false", "--cluster.num_clusters", "3"])  # fmt: skip
    warned = [record.getMessage() for record in caplog.records if "repainting the masks" in record.getMessage()]
    assert len(warned) == 1 and "num_clusters 2 -> 3" in warned[0] and "datus cluster --run" in warned[0]
    caplog.clear()
    main(["predict", "--config", TINY, "--data.root", str(images), "--output_dir", str(run),
          "--trainer.enable_progress_bar", "false", "--cluster.num_clusters", "3"])  # fmt: skip
    assert not any("repainting the masks" in record.getMessage() for record in caplog.records)
