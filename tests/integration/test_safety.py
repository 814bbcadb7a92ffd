"""Hostile and careless input: datus never deletes, escapes, mixes or crashes (issue 11).

Each test builds the folder a careless user or an attacker would, runs the real CLI in-process
on configs/tiny.yaml, and checks what is left on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datus.commands.cli import main
from datus.core.errors import ConfigurationError
from datus.core.io import read_label_png
from datus.runfolder.run import Run
from datus.runfolder.shards import finished_images
from tests.conftest import NUM_IMAGES, image_ids, predict
from tests.generated import REPO, write_two_region_dataset

pytestmark = pytest.mark.integration


def tree(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` with its content."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    """A private copy of a finished run (its shards still point at the module's dataset)."""
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def test_a_folder_that_is_not_a_run_is_refused_and_nothing_in_it_is_touched(dataset: Path, tmp_path: Path) -> None:
    """--output_dir pointing at a home-like folder that holds the data and temp-looking user files."""
    home = tmp_path / "home"
    shutil.copytree(dataset, home / "photos")
    (home / ".photo.tmp1.jpg").write_bytes(b"a user's half-finished download")
    (home / "photos" / ".scan.tmp2.png").write_bytes(b"user data")
    (home / "masks").mkdir()
    (home / "masks" / "img 1.png").write_bytes(b"the user's own masks folder")
    before = tree(home)
    with pytest.raises(ConfigurationError, match="not empty and is not a datus run folder"):
        predict(home / "photos", home)
    assert tree(home) == before


def test_only_datus_temporaries_in_its_own_folders_are_removed(dataset: Path, run_copy: Path) -> None:
    stale = run_copy / "masks" / ".datus-tmp-0123456789abcdef"
    stale.write_bytes(b"left by a killed run")
    lookalikes = [
        run_copy / "masks" / ".user.tmp1.png",
        run_copy / "masks" / ".datus-tmp-0123456789abcdef.png",
        run_copy / "notes" / ".datus-tmp-0123456789abcdef",
    ]
    for path in lookalikes:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"not datus's")
    predict(dataset, run_copy)
    assert not stale.exists()
    assert all(path.read_bytes() == b"not datus's" for path in lookalikes)


def crafted_shard(run: Path, ids: list[str]) -> Path:
    """A copy of the run's first shard whose image ids are replaced by ``ids``."""
    first = Run(run).shards()[0]
    with np.load(first) as data:
        arrays = {key: data[key] for key in data.files}
    count = len(arrays["image_ids"])
    arrays["image_ids"] = np.array((ids * count)[:count], dtype=str)
    path = first.with_name("rank000-0000099.npz")
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("bad_id", ["../../escaped", "/tmp/datus-escaped-absolute", "a/../../escaped", "x\x00y"])
def test_crafted_shard_ids_are_refused_and_nothing_is_written_outside(run_copy: Path, bad_id: str) -> None:
    shard = crafted_shard(run_copy, [bad_id])
    outside_before = sorted(p.name for p in run_copy.parent.iterdir())
    with pytest.raises(ConfigurationError, match=f"{shard.name}.*not a safe relative name"):
        main(["cluster", "--run", str(run_copy), "--cluster.num_clusters", "2"])
    assert sorted(p.name for p in run_copy.parent.iterdir()) == outside_before
    assert not Path("/tmp/datus-escaped-absolute.png").exists()


@pytest.mark.parametrize("linked", ["clusters", "clusters/k2/masks", "gallery", "logs", "masks/nested", "run.lock", "view"])
@pytest.mark.parametrize("command", ["cluster", "predict"])
def test_a_symbolic_link_in_the_run_cannot_redirect_writes_or_deletions(
    dataset: Path, run_copy: Path, tmp_path: Path, linked: str, command: str
) -> None:
    """Links planted where datus writes (a folder, a nested image folder, the lock file) are refused."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / "victim.txt"
    victim.write_text("precious")
    (elsewhere / "predict-rank000.json").write_text("the user's")
    target = run_copy / linked
    if target.exists() and not target.is_symlink():
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(victim if linked == "run.lock" else elsewhere)
    if command == "cluster" and linked == "masks/nested":  # datus cluster writes into clusters/k2, not there
        main(["cluster", "--run", str(run_copy), "--cluster.num_clusters", "2"])
    else:
        with pytest.raises(ConfigurationError, match="is a symbolic link|resolves outside"):
            if command == "cluster":
                main(["cluster", "--run", str(run_copy), "--cluster.num_clusters", "2"])
            else:
                predict(dataset, run_copy)
    assert victim.read_text() == "precious" and (elsewhere / "predict-rank000.json").read_text() == "the user's"
    assert sorted(p.name for p in elsewhere.iterdir()) == ["predict-rank000.json", "victim.txt"]


def test_a_run_inside_another_run_or_under_a_file_is_refused(dataset: Path, run_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="lies inside the datus run"):
        predict(dataset, run_copy / "clusters" / "k5")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigurationError, match="is a file"):
        predict(dataset, tmp_path / "afile" / "sub")


def test_another_data_folder_is_refused_naming_both(run_copy: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    write_two_region_dataset(other, 3)
    with pytest.raises(ConfigurationError, match=r"data images: was .*train/images', now .*other'"):
        main(["predict", "--config", str(REPO / "configs" / "tiny.yaml"), "--data.root", str(other),
              "--output_dir", str(run_copy), "--trainer.enable_progress_bar", "false"])  # fmt: skip


def test_an_output_folder_inside_the_data_is_never_read_as_data(dataset: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(dataset, root)
    images = root / "train" / "images"
    predict(root, images / "run")  # --output_dir inside the image folder
    predict(root, images / "run")
    summary = json.loads((images / "run" / "summary.json").read_text())
    assert summary["images_in_run"] == NUM_IMAGES and summary["images_predicted_now"] == 0


def test_temporary_looking_names_keep_their_outputs_and_lost_outputs_are_rebuilt(tmp_path: Path) -> None:
    images = tmp_path / "images"
    write_two_region_dataset(images, 2)
    for name in (".scan.tmp2", ".datus-tmp-0123456789abcdef"):
        shutil.copy(images / "img 1.jpg", images / f"{name}.jpg")
    run = tmp_path / "run"
    main(["predict", "--config", str(REPO / "configs" / "tiny.yaml"), "--data.root", str(images),
          "--output_dir", str(run), "--trainer.enable_progress_bar", "false"])  # fmt: skip
    outputs = sorted(str(p.relative_to(run)) for p in (run / "masks").rglob("*.png"))
    assert "masks/.scan.tmp2.png" in outputs and "masks/.datus-tmp-0123456789abcdef.png" in outputs
    (run / "segments" / ".scan.tmp2.png").unlink()
    (run / "masks" / "img 1.png").unlink()
    main(["predict", "--config", str(REPO / "configs" / "tiny.yaml"), "--data.root", str(images),
          "--output_dir", str(run), "--trainer.enable_progress_bar", "false"])  # fmt: skip
    assert sorted(str(p.relative_to(run)) for p in (run / "masks").rglob("*.png")) == outputs
    assert (run / "segments" / ".scan.tmp2.png").is_file() and (run / "masks" / "img 1.png").is_file()


def test_names_no_file_system_could_take_as_outputs_still_finish(tmp_path: Path) -> None:
    """A 240-byte stem (its mask name would exceed 255 bytes) and a name that is not UTF-8."""
    images = tmp_path / "images"
    write_two_region_dataset(images, 1, nested_every=2)  # image 0 goes into nested/
    shutil.move(images / "nested" / "img 0.jpg", images / "img 0.jpg")
    long_name = images / ("y" * 236 + ".jpg")
    undecodable = Path(os.fsdecode(bytes(images) + b"/caf\xe9.jpg"))
    for path in (long_name, undecodable):
        shutil.copy(images / "img 0.jpg", path)
    run = tmp_path / "run"
    main(["predict", "--config", str(REPO / "configs" / "tiny.yaml"), "--data.root", str(images),
          "--output_dir", str(run), "--trainer.enable_progress_bar", "false"])  # fmt: skip
    manifest = [json.loads(line) for line in (run / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    assert json.loads((run / "dataset.json").read_text())["image_root"] == str(images.resolve())
    assert sorted(images / entry["image"] for entry in manifest) == sorted([images / "img 0.jpg", long_name, undecodable])
    for entry in manifest:
        assert not Path(entry["image"]).is_absolute() and (run / entry["mask"]).is_file()


def test_a_folder_of_only_unreadable_files_is_one_error_pointing_at_skipped_json(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "empty.jpg").write_bytes(b"")
    (images / "text.png").write_text("not an image")
    run = tmp_path / "run"
    completed = subprocess.run(
        [sys.executable, "-m", "datus", "predict", "--config", str(REPO / "configs" / "tiny.yaml"),
         "--data.root", str(images), "--output_dir", str(run), "--trainer.enable_progress_bar", "false"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert "Traceback" not in completed.stderr
    errors = [line for line in completed.stderr.splitlines() if line.startswith("datus: error:")]
    assert len(errors) == 1 and "2 skipped" in errors[0] and "skipped.json" in errors[0]
    skipped = json.loads((run / "skipped.json").read_text())
    assert sorted(Path(entry["path"]).name for entry in skipped) == ["empty.jpg", "text.png"]


def test_k_above_the_valid_segments_says_how_to_finish_without_predicting_again(dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(ConfigurationError, match=r"--cluster.num_clusters 5000 is more than the (\d+) valid segments.*datus cluster --run"):
        predict(dataset, run, "--cluster.num_clusters", "5000")
    assert len(finished_images(Run(run).shards()).values()) == NUM_IMAGES  # the predictions are kept
    main(["cluster", "--run", str(run), "--cluster.num_clusters", "2"])
    assert (run / "clusters" / "k2" / "metrics.json").is_file()


def test_a_run_without_valid_segments_does_not_suggest_reclustering_it(dataset: Path, tmp_path: Path) -> None:
    """With every segment noise no K fits: the advice is to predict again, not a `datus cluster` that fails too."""
    run = tmp_path / "run"
    with pytest.raises(ConfigurationError, match=r"found no valid segment.*--model\.min_patches") as raised:
        predict(dataset, run, "--model.min_patches", "1000")
    assert "datus cluster" not in str(raised.value)
    with pytest.raises(ConfigurationError, match="found no valid segment"):
        main(["cluster", "--run", str(run), "--cluster.num_clusters", "1"])


def test_a_damaged_shard_names_itself_and_is_recovered_by_predicting_again(dataset: Path, run_copy: Path) -> None:
    shard = Run(run_copy).shards()[-1]
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(ConfigurationError, match=f"{shard.name} is damaged.*delete it and run `datus predict` again"):
        main(["cluster", "--run", str(run_copy), "--cluster.num_clusters", "2"])
    shard.unlink()
    predict(dataset, run_copy)
    summary = json.loads((run_copy / "summary.json").read_text())
    assert summary["images_in_run"] == NUM_IMAGES and summary["images_predicted_now"] > 0
    assert sorted(finished_images(Run(run_copy).shards()).values()) == image_ids(dataset)


def test_a_damaged_run_file_is_one_error(dataset: Path, run_copy: Path) -> None:
    (run_copy / "run.json").write_text("{ not json")
    with pytest.raises(ConfigurationError, match=r"run.json is damaged"):
        predict(dataset, run_copy)


def test_a_second_process_is_refused_and_a_dead_one_leaves_no_lock(dataset: Path, run_copy: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from datus.runfolder.run import Run; Run(sys.argv[1]).acquire(); print('held', flush=True);"
         " import time; time.sleep(60)", str(run_copy)],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigurationError, match="is in use by datus process"):
            predict(dataset, run_copy)
        with pytest.raises(ConfigurationError, match="is in use by datus process"):
            main(["cluster", "--run", str(run_copy), "--cluster.num_clusters", "2"])
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    predict(dataset, run_copy)  # the kernel released the dead process's lock
    masks = read_label_png(run_copy / "masks" / f"{image_ids(dataset)[0]}.png")
    with Image.open(dataset / "train" / "images" / f"{image_ids(dataset)[0]}.jpg") as image:
        assert masks.shape == (image.height, image.width)


def test_a_file_added_beside_a_recorded_one_gets_its_own_id(tmp_path: Path) -> None:
    """a.png added next to a recorded a.jpg: a.jpg keeps its id and is not predicted again."""
    images = tmp_path / "images"
    write_two_region_dataset(images, 3)  # nested/img 0, img 1, img 2
    run = tmp_path / "run"
    arguments = ["predict", "--config", str(REPO / "configs" / "tiny.yaml"), "--data.root", str(images),
                 "--output_dir", str(run), "--trainer.enable_progress_bar", "false"]  # fmt: skip
    main(arguments)
    Image.open(images / "img 1.jpg").save(images / "img 1.png")
    main(arguments)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["images_in_run"] == 4 and summary["images_predicted_now"] == 1
    manifest = [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]
    assert sorted((entry["image_id"], Path(entry["image"]).name) for entry in manifest) == [
        ("img 1", "img 1.jpg"), ("img 1_png", "img 1.png"), ("img 2", "img 2.jpg"), ("nested/img 0", "img 0.jpg")
    ]


def test_a_duplicated_id_in_the_shards_is_refused(run_copy: Path) -> None:
    first = Run(run_copy).shards()[0]
    with np.load(first) as data:
        arrays = {key: data[key] for key in data.files}
    arrays["image_ids"][1] = arrays["image_ids"][0]
    np.savez(first, **arrays)
    with pytest.raises(ConfigurationError, match="is also recorded in"):
        main(["cluster", "--run", str(run_copy), "--cluster.num_clusters", "2"])


def test_long_names_that_differ_by_extension_and_folders_named_like_outputs_finish(tmp_path: Path) -> None:
    images = tmp_path / "images"
    write_two_region_dataset(images, 2)  # nested/img 0, img 1
    source = images / "img 1.jpg"
    shutil.copy(source, images / ("M" * 200 + ".jpg"))
    Image.open(source).save(images / ("M" * 200 + ".png"))
    (images / "img 1.png").mkdir()  # a folder named like the output file of img 1.jpg
    shutil.copy(source, images / "img 1.png" / "inner.jpg")
    run = tmp_path / "run"
    arguments = ["predict", "--config", str(REPO / "configs" / "tiny.yaml"), "--data.root", str(images),
                 "--output_dir", str(run), "--trainer.enable_progress_bar", "false"]  # fmt: skip
    main(arguments)
    main(arguments)  # and a rerun reads its own shards back
    manifest = [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 5 and all((run / entry["mask"]).is_file() for entry in manifest)


def rewrite_first_shard(run: Path, change: str) -> None:
    """Damage the run's first shard the way a crafted file would (values, not layout)."""
    first = Run(run).shards()[0]
    with np.load(first) as data:
        arrays = {key: data[key] for key in data.files}
    if change == "nan":
        arrays["embeddings"][0, 0] = np.nan
    elif change == "float_map":
        arrays["segment_maps"] = arrays["segment_maps"].astype(np.float32)
    elif change == "negative_size":
        arrays["sizes"][0] = -arrays["sizes"][0]
    elif change == "huge_image":
        arrays["orig_sizes"][0] = (200000, 200000)
    elif change == "other_width":
        arrays["embeddings"] = arrays["embeddings"][:, :10]
        arrays["image_embeddings"] = arrays["image_embeddings"][:, :10]
    np.savez(first, **arrays)


@pytest.mark.parametrize("change", ["nan", "float_map", "negative_size", "huge_image", "other_width"])
def test_crafted_shard_values_are_one_error_naming_the_shard(run_copy: Path, change: str) -> None:
    rewrite_first_shard(run_copy, change)
    with pytest.raises(ConfigurationError, match=r"rank000-000000[01]\.npz is damaged"):
        main(["cluster", "--run", str(run_copy), "--cluster.num_clusters", "3"])


def test_crafted_cache_is_refitted(run_copy: Path) -> None:
    """A cached fit of another shape is refitted, not trusted."""
    fit = run_copy / "fit"  # predict's fit, which `datus cluster` reuses for the same settings
    model = json.loads((fit / "model.json").read_text())
    np.save(fit / "centroids.npy", np.zeros((3, 5), np.float32))
    (fit / "model.json").write_text(json.dumps({**model, "input_dim": 5}))
    main(["cluster", "--run", str(run_copy), "--cluster.num_clusters", "3"])
    assert np.load(run_copy / "clusters" / "k3" / "fit" / "centroids.npy").shape[1] != 5


def _bad_mapping(metrics: dict) -> None:
    metrics["protocols"]["dense"]["mapping"] = {"0": 99, "1": "x"}


def _no_miou_and_an_extra_protocol(metrics: dict) -> None:
    del metrics["protocols"]["dense"]["miou"]
    metrics["protocols"]["extra"] = [1, 2]


def _short_per_class_list(metrics: dict) -> None:
    metrics["protocols"]["paper"]["per_class_iou"] = [0.5]


def _text_score_and_names(metrics: dict) -> None:
    metrics["protocols"]["paper"]["pixel_accuracy"] = "high"
    metrics["class_names"] = 7


@pytest.mark.parametrize("craft", [_bad_mapping, _no_miou_and_an_extra_protocol, _short_per_class_list, _text_score_and_names])
def test_crafted_metrics_are_scored_again(run_copy: Path, finished_run: Path, craft: Callable[[dict], None]) -> None:
    """A metrics.json that is not sound is scored again on a rerun that would otherwise reuse it."""
    results = run_copy / "clusters" / "k3"
    main(["cluster", "--run", str(run_copy), "--cluster.num_clusters", "3"])
    metrics = json.loads((results / "metrics.json").read_text())
    craft(metrics)
    (results / "metrics.json").write_text(json.dumps(metrics))
    main(["cluster", "--run", str(run_copy), "--cluster.num_clusters", "3"])
    assert json.loads((results / "metrics.json").read_text())["protocols"]["dense"]["mapping"] == json.loads(
        (finished_run / "metrics.json").read_text()
    )["protocols"]["dense"]["mapping"]


def test_a_damaged_dataset_classes_file_is_ignored_by_scoring_and_report(run_copy: Path, dataset: Path, tmp_path: Path) -> None:
    """A dataset classes.json without a list of names neither names classes nor stops the report."""
    crafted = tmp_path / "data"
    shutil.copytree(dataset, crafted)
    (crafted / "classes.json").write_text(json.dumps({"classes": 5}))
    output = tmp_path / "crafted-run"
    predict(crafted, output)
    assert (output / "report.png").is_file()
    assert not (output / "metrics.json").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda run: (run / "run.json").write_text('{"datus_version": "0", "identity": {"model": "x"}}'), "not a run file"),
        (lambda run: (run / "config.yaml").write_text("cluster:\n  seed: {a: 1}\n"), "config.yaml"),
    ],
)
def test_crafted_run_and_config_files_are_one_error(run_copy: Path, edit: object, message: str) -> None:
    edit(run_copy)  # type: ignore[operator]
    with pytest.raises(ConfigurationError, match=message):
        main(["cluster", "--run", str(run_copy)])


def test_unusable_centroids_are_refused_before_any_image_is_predicted(dataset: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    (junk / "fit").mkdir(parents=True)
    (junk / "fit" / "model.json").write_text("{")
    run = tmp_path / "run"
    with pytest.raises(ConfigurationError, match="--cluster.centroids .*junk"):
        predict(dataset, run, "--cluster.centroids", str(junk))
    assert not Run(run).shards()


def test_impossible_settings_are_one_error(dataset: Path, run_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match="--eval.ignore_index"):
        main(["cluster", "--run", str(run_copy), "--cluster.num_clusters", "2", "--eval.ignore_index", "1"])
    gt = dataset / "train" / "true_masks"
    with pytest.raises(ConfigurationError, match="at most 65535"):
        main(["evaluate", "--pred", str(run_copy / "masks"), "--gt", str(gt), "--num_classes", "2",
              "--num_clusters", "1000000000", "--output_dir", str(tmp_path / "eval")])  # fmt: skip
    monkeypatch.setattr("datus.discovery.module.build_backbone", lambda *args, **kwargs: pytest.fail("model built first"))
    with pytest.raises(ConfigurationError, match="--data.batch_size must be >= 1"):
        predict(dataset, tmp_path / "run0", "--data.batch_size", "0")


def test_a_replaced_or_damaged_mask_is_painted_again_on_a_rerun(dataset: Path, run_copy: Path, finished_run: Path) -> None:
    """A rerun reuses only masks that are label maps of the image's size; the colour pass never reads anything else."""
    first, second = image_ids(dataset)[:2]
    height, width = read_label_png(finished_run / "masks" / f"{first}.png").shape
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(run_copy / "masks" / f"{first}.png")  # a photo
    damaged = run_copy / "masks" / f"{second}.png"
    damaged.write_bytes(damaged.read_bytes()[:40])  # truncated
    for image_id in (first, second):
        (run_copy / "color" / f"{image_id}.png").unlink()
    predict(dataset, run_copy)
    for image_id in image_ids(dataset):
        assert np.array_equal(
            read_label_png(run_copy / "masks" / f"{image_id}.png"), read_label_png(finished_run / "masks" / f"{image_id}.png")
        ), image_id
    for image_id in (first, second):
        mask = read_label_png(run_copy / "masks" / f"{image_id}.png")
        with Image.open(run_copy / "color" / f"{image_id}.png") as colour:
            assert colour.mode == "P" and np.array_equal(np.asarray(colour), mask)
