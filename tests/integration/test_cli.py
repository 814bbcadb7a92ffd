"""The real ``datus`` CLI, in-process, on configs/tiny.yaml and generated images with masks."""

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
from datus.outputs.drawing import colour_table, colourise
from datus.core.errors import ConfigurationError
from datus.core.io import read_label_png
from tests.conftest import NUM_IMAGES, image_ids, predict
from tests.generated import REPO, TINY, write_photos

pytestmark = pytest.mark.integration


def test_predict_writes_every_output(dataset: Path, finished_run: Path) -> None:
    ids = image_ids(dataset)
    assert len(ids) == NUM_IMAGES
    assert (finished_run / "config.yaml").is_file() and (finished_run / "run.json").is_file()
    identity = json.loads((finished_run / "run.json").read_text())["identity"]
    assert identity["model"]["weights"] == "random" and identity["model"]["patch_size"] == 8
    assert identity["data"]["images"] == str((dataset / "train" / "images").resolve())
    for image_id in ids:
        image = Image.open(dataset / "train" / "images" / f"{image_id}.jpg")
        segments = read_label_png(finished_run / "segments" / f"{image_id}.png")
        assert segments.shape == (image.height, image.width)  # the 8 x 8 patch grid, shown at the image's size
        mask = read_label_png(finished_run / "masks" / f"{image_id}.png")
        assert mask.shape == (image.height, image.width) and mask.max() < 3
        with Image.open(finished_run / "color" / f"{image_id}.png") as colour:  # the labels, with a palette
            assert colour.mode == "P" and np.array_equal(np.asarray(colour), mask)
            shown = np.asarray(colour.convert("RGB"))
        assert (finished_run / "overlay" / f"{image_id}.jpg").is_file()
        metrics = json.loads((finished_run / "metrics.json").read_text())
        table = colour_table(3, 2, metrics["mapping"])
        assert np.array_equal(shown, colourise(mask, table, ignore_index=-1))  # the legend's colours
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert metrics["num_clusters"] == 3 and metrics["num_classes"] == 2 and metrics["num_images"] == NUM_IMAGES
    assert set(metrics["protocols"]) == {"dense", "paper", "stego"}
    for protocol in metrics["protocols"].values():
        assert 0 <= protocol["miou"] <= 1 and len(protocol["per_class_iou"]) == 2
    assert set(metrics["mapping"]) == {"0", "1", "2"}
    assert (finished_run / "confusion.png").is_file()
    assert json.loads((finished_run / "skipped.json").read_text()) == []
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["images_in_run"] == NUM_IMAGES and summary["images_predicted_now"] == NUM_IMAGES


def test_interrupted_then_resumed_run_equals_uninterrupted(dataset: Path, finished_run: Path, tmp_path: Path) -> None:
    predict(dataset, tmp_path, "--trainer.limit_predict_batches", "0.5")  # 1 of 2 batches: 4 of 7 images
    assert len(list((tmp_path / "segments").rglob("*.png"))) == 4
    predict(dataset, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["images_predicted_now"] == NUM_IMAGES - 4 and summary["images_from_earlier_runs"] == 4
    for image_id in image_ids(dataset):
        for folder in ("segments", "masks"):
            resumed = read_label_png(tmp_path / folder / f"{image_id}.png")
            assert np.array_equal(resumed, read_label_png(finished_run / folder / f"{image_id}.png")), image_id
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads((finished_run / "metrics.json").read_text())


def test_rerun_of_a_finished_run_predicts_nothing_and_keeps_results(dataset: Path, finished_run: Path) -> None:
    before = json.loads((finished_run / "metrics.json").read_text())
    predict(dataset, finished_run)
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["images_predicted_now"] == 0 and summary["images_in_run"] == NUM_IMAGES
    assert json.loads((finished_run / "metrics.json").read_text()) == before


def test_rerun_with_other_settings_is_refused(dataset: Path, finished_run: Path) -> None:
    with pytest.raises(ValueError, match="other settings"):
        predict(dataset, finished_run, "--model.min_patches", "2")


def test_cluster_sweep_and_evaluate_agree_with_the_run(dataset: Path, finished_run: Path, tmp_path: Path) -> None:
    main(["cluster", "--run", str(finished_run), "--cluster.num_clusters", "2", "3", "--cluster.colour", "false"])
    for k in (2, 3):
        metrics = json.loads((finished_run / "clusters" / f"k{k}" / "metrics.json").read_text())
        assert metrics["num_clusters"] == k
        assert (finished_run / "clusters" / f"k{k}" / "fit" / "centroids.npy").is_file()
    sweep = json.loads((finished_run / "clusters" / "summary.json").read_text())
    assert [row["k"] for row in sweep["rows"]] == [2, 3] and sweep["suggested_k"] in (2, 3)
    assert all(0 <= row["stability_ari"] <= 1 and row["largest_pixel_share"] > 0 for row in sweep["rows"])
    run_metrics = json.loads((finished_run / "metrics.json").read_text())
    k3 = json.loads((finished_run / "clusters" / "k3" / "metrics.json").read_text())
    assert k3["protocols"]["dense"]["miou"] == pytest.approx(run_metrics["protocols"]["dense"]["miou"])

    main(
        [
            "evaluate",
            "--pred",
            str(finished_run / "masks"),
            "--gt",
            str(dataset / "train" / "true_masks"),
            "--num_classes",
            "2",
            "--num_clusters",
            "3",
            "--output_dir",
            str(tmp_path),
        ]
    )
    scored = json.loads((tmp_path / "metrics.json").read_text())
    assert scored["num_images"] == NUM_IMAGES
    # the masks are dense, so the evaluate command's dense protocol must equal the run's
    assert scored["protocols"]["dense"]["miou"] == pytest.approx(run_metrics["protocols"]["dense"]["miou"])
    assert scored["protocols"]["dense"]["pixel_accuracy"] == pytest.approx(
        run_metrics["protocols"]["dense"]["pixel_accuracy"]
    )


def refuse(stage: str) -> object:
    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{stage} before the configuration was checked")

    return refused


@pytest.mark.parametrize(
    ("flags", "message", "first_model_work"),
    [
        (["--cluster.num_clusters", "0"], "--cluster.num_clusters must be >= 1", "build_backbone"),
        (["--data.split", "nope"], "--data.split nope: no .*; the splits of .* are train", "build_backbone"),
        (["--data.root", "{empty}", "--data.split", "null"], "--data.root: no images", "build_backbone"),
        (["--model.backbone", "no_such_vit"], "--model.backbone: unknown timm model", "load_frozen_weights"),
        (["--model.image_size", "60"], "not a multiple of the patch size", "load_frozen_weights"),
    ],
)
def test_configuration_mistakes_fail_before_model_work(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: list[str], message: str, first_model_work: str
) -> None:
    """Data and clustering options are checked before the backbone is built, model options before weights load."""
    monkeypatch.setattr(f"datus.discovery.module.{first_model_work}", refuse(first_model_work))
    empty = tmp_path / "empty"
    (empty / "nested").mkdir(parents=True)
    (empty / "nested" / "notes.txt").write_text("not an image")
    output_dir = tmp_path / "run"
    with pytest.raises(ConfigurationError, match=message):
        predict(dataset, output_dir, *(flag.format(empty=empty) for flag in flags))
    assert not output_dir.exists()


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["predict", "--config", TINY, "--data.root", "{missing}", "--output_dir", "{out}"], "--data.root: no folder"),
        (["evaluate", "--pred", "{missing}", "--gt", "{missing}", "--num_classes", "3", "--output_dir", "{out}"],
         "pred_dir={missing} does not exist"),
        (["prepare", "suim", "{missing}", "{out}"], "SUIM raw folder {missing} does not exist"),
    ],
)  # fmt: skip
def test_console_prints_a_configuration_mistake_as_one_line(tmp_path: Path, command: list[str], expected: str) -> None:
    names = {"missing": tmp_path / "missing", "out": tmp_path / "out"}
    completed = subprocess.run(
        [sys.executable, "-m", "datus", *(part.format(**names) for part in command)],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 2
    assert f"datus: error: {expected.format(**names)}" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    main([])
    assert "predict" in capsys.readouterr().out


def test_recluster_with_the_torch_engine(finished_run: Path) -> None:
    main(["cluster", "--run", str(finished_run), "--cluster.num_clusters", "4", "--cluster.engine", "torch"])
    metrics = json.loads((finished_run / "clusters" / "k4" / "metrics.json").read_text())
    assert metrics["num_clusters"] == 4 and metrics["num_images"] == NUM_IMAGES
    assert json.loads((finished_run / "clusters" / "k4" / "fit" / "settings.json").read_text())["settings"]["engine"] == "torch"


def run_console(*arguments: str) -> subprocess.CompletedProcess[str]:
    """The ``datus`` console script in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "datus", *arguments], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_predict_help_shows_datus_options_first_and_only_inference_trainer_flags() -> None:
    completed = run_console("predict", "--help")
    text = completed.stdout
    assert completed.returncode == 0 and len(text.splitlines()) <= 125  # two screens
    assert "--model.backbone" in "\n".join(text.splitlines()[:30])  # datus's own options come first
    options = text[text.index("\noutput:") :]
    assert options.index("--model.backbone") < options.index("--data.root") < options.index("--cluster.num_clusters")
    assert options.index("--cluster.num_clusters") < options.index("--trainer.devices")
    for flag in ("--trainer.accelerator", "--trainer.precision", "--trainer.strategy", "--crf.iterations", "--eval.num_classes"):
        assert text.count(flag + " ") == 1  # every option described once
    for absent in ("max_epochs", "gradient_clip_val", "--optimizer", "--lr_scheduler", "Customize every aspect",
                   "``", ":func:", "Optional[", "Union[", "typing", "None"):  # fmt: skip
        assert absent not in text


PROMPT_ANSWER_SECONDS = 3.0
"""Help and configuration mistakes of every command: about 0.4 s here; 5.5-15 s when predict imported Lightning first."""


@pytest.mark.parametrize(
    "arguments",
    [["predict", "--help"], ["predict", "--data.root", ".", "--output_dir", "{out}", "--cluster.num_cluster", "3"],
     ["predict", "--data.root", ".", "--output_dir", "{out}", "--model.embedding", "crops"],
     ["predict", "--config", "{missing}", "--data.root", "."], ["predict", "--data.root", "{missing}", "--output_dir", "{out}"]],
)  # fmt: skip
def test_predict_answers_help_and_mistakes_at_once(tmp_path: Path, arguments: list[str]) -> None:
    started = time.perf_counter()
    completed = run_console(*(part.format(out=tmp_path / "out", missing=tmp_path / "missing") for part in arguments))
    assert time.perf_counter() - started < PROMPT_ANSWER_SECONDS, completed.stderr
    assert completed.returncode == (0 if "--help" in arguments else 2)
    assert completed.returncode == 0 or completed.stderr.startswith("datus: error: ") and completed.stderr.count("\n") == 1


def test_predict_option_table_is_the_parsers() -> None:
    """predict_options.json (help and early checks without Lightning) says what LightningCLI's parser says."""
    from datus.commands.predict import option_table
    from datus.core.options import table

    assert option_table() == table(), "regenerate: python -c 'from datus.commands.predict import write_option_table; write_option_table()'"


def test_a_misspelt_option_value_or_pretrained_tag_names_the_nearest(tmp_path: Path) -> None:
    flags = ["predict", "--config", TINY, "--data.root", str(tmp_path), "--output_dir", str(tmp_path / "out")]
    write_photos(tmp_path, 1)
    with pytest.raises(ConfigurationError, match=r"did you mean --cluster\.num_clusters\?"):
        main([*flags, "--cluster.num_cluster", "3"])
    with pytest.raises(ConfigurationError, match="did you mean crop"):
        main([*flags, "--model.embedding", "crops"])
    with pytest.raises(ConfigurationError, match=r"unknown key cluster\.num_cluster; did you mean cluster\.num_clusters"):
        (tmp_path / "typo.yaml").write_text("cluster:\n  num_cluster: 3\n")
        main([*flags, "--config", str(tmp_path / "typo.yaml")])
    with pytest.raises(ConfigurationError, match=r"no pretrained tag 'dion' for vit_small_patch16_224; did you mean 'vit_small_patch16_224\.dino'"):
        main([*flags, "--model.backbone", "vit_small_patch16_224.dion", "--model.weights", "pretrained"])


def test_a_typo_is_one_line_and_the_version_is_there(tmp_path: Path) -> None:
    typo = run_console("predict", "--config", TINY, "--modle.backbone", "x", "--output_dir", str(tmp_path / "out"))
    assert typo.returncode == 2 and typo.stderr.strip().count("\n") == 0
    assert typo.stderr.startswith("datus: error: unknown option --modle.backbone; did you mean --model.backbone?")
    missing = run_console("predict", "--config", TINY, "--data.root", str(tmp_path))
    assert missing.returncode == 2 and "datus: error: --output_dir is required" in missing.stderr
    wrong_type = run_console("cluster", "--run", str(tmp_path), "--cluster.crf", "maybe")
    assert wrong_type.returncode == 2 and wrong_type.stderr.count("\n") == 1 and "--cluster.crf" in wrong_type.stderr
    version = run_console("--version")
    assert version.returncode == 0 and version.stdout.startswith("datus ")


def test_the_console_states_each_fact_once(dataset: Path, tmp_path: Path) -> None:
    """One RANDOM WEIGHTS line, no Lightning chatter, the summary on lines of its own; a resume likewise."""
    arguments = ("predict", "--config", TINY, "--data.root", str(dataset), "--data.split", "train",
                 "--output_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false")  # fmt: skip
    for attempt in ("first", "resumed"):
        completed = run_console(*arguments)
        assert completed.returncode == 0, completed.stderr[-2000:]
        both = completed.stdout + completed.stderr
        assert both.count("RANDOM WEIGHTS") == 1, attempt
        for noise in ("Tip", "litlogger", "LeafSpec", "Total length of", "GPU available", "Seed set", "Warning:", "warnings.warn"):
            assert noise not in both, (attempt, noise)
        assert completed.stdout.startswith("datus: 7 images"), completed.stdout[:200]
    assert "0 predicted now, 7 from an earlier run" in completed.stdout
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "optimizer" not in config and "lr_scheduler" not in config


def test_a_file_name_cannot_break_a_console_line(dataset: Path, tmp_path: Path) -> None:
    """A skipped image named with a newline and a terminal escape is reported on one line, escaped."""
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    (data / "train" / "images" / "broken\nskipped fake.jpg\x1b[31m.jpg").write_bytes(b"not a jpeg")
    completed = run_console("predict", "--config", TINY, "--data.root", str(data), "--data.split", "train",
                            "--output_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false")  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]
    both = completed.stdout + completed.stderr
    assert "\x1b" not in both and "\nskipped fake" not in both
    lines = [line for line in both.splitlines() if "broken" in line]
    assert len(lines) == 2, lines  # the warning and the summary's skip line
    assert all("broken\\nskipped fake.jpg\\x1b[31m.jpg" in line for line in lines)
    assert not any(line.lstrip().startswith("skipped fake") for line in both.splitlines())


def test_cluster_reports_only_what_it_did(finished_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["cluster", "--run", str(finished_run), "--cluster.num_clusters", "2"])
    out = capsys.readouterr().out
    assert "predicted now" not in out and "backbone_forward" not in out
    assert "verdict: suspicious: random weights" in out and "K = 2" in out and "seconds" not in out.split("outputs:")[0]


def test_fitted_centroids_label_new_images_and_reproduce_the_fitting_run(dataset: Path, finished_run: Path, tmp_path: Path) -> None:
    """--cluster.centroids: the fitting run's own images get exactly its labels; other settings are refused."""
    centroids = finished_run
    applied = tmp_path / "applied"
    predict(dataset, applied, "--cluster.centroids", str(centroids))
    for image_id in image_ids(dataset):
        assert np.array_equal(
            read_label_png(applied / "masks" / f"{image_id}.png"), read_label_png(finished_run / "masks" / f"{image_id}.png")
        ), image_id
    assert np.array_equal(np.load(applied / "fit" / "centroids.npy"), np.load(centroids / "fit" / "centroids.npy"))
    with pytest.raises(ConfigurationError, match=r"embedded differently \(image_size: 64 there, 80 here"):
        predict(dataset, tmp_path / "other", "--cluster.centroids", str(centroids), "--model.image_size", "80")
    with pytest.raises(ConfigurationError, match="has K = 3; set --cluster.num_clusters 3"):
        predict(dataset, tmp_path / "k4", "--cluster.centroids", str(centroids), "--cluster.num_clusters", "4")
    with pytest.raises(ConfigurationError, match="holds no fitted clusters"):
        predict(dataset, tmp_path / "none", "--cluster.centroids", str(tmp_path))


@pytest.mark.parametrize(
    "arguments",
    [["cluster", "--help"], ["evaluate", "--help"], ["prepare", "--help"], ["cluster", "--run", "{run}", "--cluster.num_clusters", "2"],
     ["predict", "--help"], ["predict", "--data.root", "{run}", "--output_dir", "{run}/x", "--cluster.num_cluster", "2"],
     ["export", "--help"], ["export", "{run}", "{run}-export", "--format", "webdataset"]],
)  # fmt: skip
def test_offline_commands_load_neither_lightning_nor_timm(finished_run: Path, arguments: list[str]) -> None:
    probe = (
        "import sys\nfrom datus.commands.cli import main\nfrom datus.core.errors import ConfigurationError\n"
        "try:\n    main(sys.argv[1:])\nexcept (SystemExit, ConfigurationError):\n    pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning', 'timm'}))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe, *(part.format(run=finished_run) for part in arguments)],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip().splitlines()[-1] == "[]"


ALLOCATION_CHURN = """
import resource, sys
import numpy as np
from datus.commands.cli import keep_freed_memory
if sys.argv[1] == "tuned":
    keep_freed_memory()
def churn():  # buffers of a few megabytes, allocated together and freed, as a forward pass does
    for _ in range(40):
        buffers = [np.ones(megabytes * 2**17) for megabytes in (3, 9, 5, 12, 7, 30)]
        del buffers
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"), reason="tunes glibc's allocator")
def test_started_process_reuses_freed_buffers_instead_of_faulting_pages_in_again() -> None:
    """``datus`` processes keep freed activations in the heap: page faults per churn go from ~10^5 to ~0."""
    faults = {}
    for mode in ("default", "tuned"):
        completed = subprocess.run(
            [sys.executable, "-c", ALLOCATION_CHURN, mode], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr[-2000:]
        faults[mode] = int(completed.stdout.split()[-1])
    assert faults["default"] > 10_000 and faults["tuned"] < 1_000, faults


def test_every_option_of_cluster_and_evaluate_has_a_description() -> None:
    for command in ("cluster", "evaluate", "prepare"):
        text = run_console(command, "--help").stdout
        options = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
        lines = text.splitlines()
        for index, line in enumerate(lines):
            if line.startswith("  --") and line.split()[0] != "--help":
                described = len(line.split("  ")) > 2 or (index + 1 < len(lines) and lines[index + 1].startswith(" " * 20))
                assert described, (command, line)
        assert options and "default: None" not in text and "``" not in text
