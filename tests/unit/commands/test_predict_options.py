"""predict's early checks (datus.commands.predict_options): they refuse mistakes, never a valid invocation."""

from __future__ import annotations

from pathlib import Path

import pytest

from datus.core.errors import ConfigurationError
from datus.core.io import locate_images
from datus.commands.predict_options import check_arguments, help_text
from tests.generated import REPO, write_photos

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[path.name for path in CONFIGS])
def test_every_shipped_config_passes_the_early_checks(config: Path, tmp_path: Path) -> None:
    write_photos(tmp_path / "photos", 1)
    check_arguments(["--config", str(config), "--data.root", str(tmp_path / "photos"), "--output_dir", str(tmp_path / "out")])


@pytest.mark.parametrize(
    "arguments",
    [["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.precision", "bf16-mixed"],
     ["--trainer.callbacks+=lightning.pytorch.callbacks.Timer", "--model.backbone_kwargs", "{depth: 2}"],
     ["--cluster.pca_components=null", "--data.pin_memory", "False", "--cluster.crf", "both", "--print_config"],
     ["--model.louvain_workers", "auto", "--data.num_workers", "0", "--trainer.limit_predict_batches", "0.5"]],
)  # fmt: skip
def test_valid_flags_pass(arguments: list[str], tmp_path: Path) -> None:
    write_photos(tmp_path, 1)
    check_arguments(["--data.root", str(tmp_path), "--output_dir", str(tmp_path / "out"), *arguments])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [(["--cluster.num_cluster", "3"], r"unknown option --cluster\.num_cluster; did you mean --cluster\.num_clusters\?"),
     (["--cluster.init", "kmeans"], "expected one of k-means.., random"),
     (["--crf.gaussian_sxy", "wide"], "expected a number"),
     (["--data.batch_size"], "needs a value"),
     (["--output_dir", "null"], "--output_dir is required")],
)  # fmt: skip
def test_mistakes_are_refused_in_one_line(arguments: list[str], message: str, tmp_path: Path) -> None:
    write_photos(tmp_path, 1)
    with pytest.raises(ConfigurationError, match=message):
        check_arguments(["--data.root", str(tmp_path), "--output_dir", str(tmp_path / "out"), *arguments])


def test_a_layout_config_on_a_plain_folder_reads_the_folder(tmp_path: Path) -> None:
    """configs/demo.yaml says --data.split train; pointed at a folder of photos it reads them, with a warning."""
    photos = write_photos(tmp_path / "photos", 2)
    assert locate_images(photos, "train", None) == (photos, None)


def test_help_wraps_to_the_terminal_and_describes_every_option() -> None:
    from datus.core.options import table

    text = help_text(width=100)
    assert max(len(line) for line in text.splitlines()) <= 100 + 20  # the example line may overrun
    for option in table()["options"]:
        assert f"  {option['flag']} " in text


def test_a_stray_argument_is_refused_and_an_unquoted_brace_pattern_named(tmp_path: Path) -> None:
    write_photos(tmp_path, 1)
    flags = ["--data.root", str(tmp_path / "a-0000.tar"), str(tmp_path / "a-0001.tar"), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ConfigurationError, match="a brace pattern such as .* must be quoted"):
        check_arguments(flags)
    check_arguments(["--seed_everything", "3", "--config", str(REPO / "configs" / "tiny.yaml"), "--data.root", str(tmp_path),
                     "--output_dir", str(tmp_path / "out"), "--trainer.callbacks.init_args.verbose", "true"])  # fmt: skip


def test_what_lightningcli_accepts_passes_the_early_check(tmp_path: Path) -> None:
    """Found by a hostile test: -cFILE, a --data group file holding the root, --print_config alone, yes for a boolean."""
    write_photos(tmp_path / "photos", 1)
    (tmp_path / "data.yaml").write_text(f"root: {tmp_path / 'photos'}\nbatch_size: 2\n")
    check_arguments([f"-c{REPO / 'configs' / 'tiny.yaml'}", "--data", str(tmp_path / "data.yaml"), "--output_dir", str(tmp_path / "o")])
    check_arguments(["--print_config", "--config", str(REPO / "configs" / "tiny.yaml")])
    check_arguments(["--data.root", str(tmp_path / "photos"), "--output_dir", str(tmp_path / "o"), "--data.pin_memory", "yes"])
    with pytest.raises(ConfigurationError, match="expected one of crop, packed"):  # LightningCLI refuses PACKED too
        check_arguments(["--data.root", str(tmp_path / "photos"), "--output_dir", str(tmp_path / "o"), "--model.embedding", "PACKED"])


def test_a_seed_lightning_refuses_is_one_line(tmp_path: Path) -> None:
    write_photos(tmp_path, 1)
    with pytest.raises(ConfigurationError, match="--seed_everything -1: give a whole number"):
        check_arguments(["--data.root", str(tmp_path), "--output_dir", str(tmp_path / "o"), "--seed_everything", "-1"])
