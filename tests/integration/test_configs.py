"""Every shipped config parses and validates (without building models or reading data)."""

from __future__ import annotations

from pathlib import Path

import pytest

from datus.datamodules.images import ImageFolderDataModule
from datus.discovery.module import DatusModule
from datus.commands.predict import DatusCLI
from tests.generated import REPO

pytestmark = pytest.mark.integration


class ParseOnly(DatusCLI):
    """Parses and validates a config but reads no data and builds nothing."""

    def before_instantiate_classes(self) -> None:
        return None

    def instantiate_classes(self) -> None:
        return None

    def after_instantiate_classes(self) -> None:
        return None


CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_config_parses(config: Path, tmp_path: Path) -> None:
    cli = ParseOnly(
        DatusModule,
        ImageFolderDataModule,
        run=False,
        args=["--config", str(config), "--output_dir", str(tmp_path), "--data.root", str(tmp_path)],
        parser_kwargs={"default_env": False},
    )
    assert cli.config["output_dir"] == str(tmp_path)
    assert cli.config["cluster"]["num_clusters"] >= 1


def test_five_presets_are_shipped() -> None:
    assert {c.name for c in CONFIGS} >= {"tiny.yaml", "demo.yaml", "suim.yaml", "camvid.yaml", "paper.yaml"}
