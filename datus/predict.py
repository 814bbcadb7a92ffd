"""``datus predict``: the LightningCLI application (model, data, writer, post-processing)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from callbacks.pipeline import ClusterPaintEvaluate
from callbacks.progress import ImagesPerSecondBar
from callbacks.writer import SegmentShardWriter
from datamodules.images import ImageFolderDataModule, locate_images
from datus.backbones import WeightsError
from datus.errors import ConfigurationError
from datus.io import write_text
from datus.module import DatusModule


class ConfigInOutputDir(SaveConfigCallback):
    """Saves the fully resolved config as ``OUTPUT_DIR/config.yaml`` (global rank 0 only)."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        output_dir = Path(self.config["output_dir"])
        write_text(output_dir / "config.yaml", self.parser.dump(self.config, skip_none=False))


class DatusCLI(LightningCLI):
    """LightningCLI for predict-only runs: model, data, writer and post-processing in one config.

    Values are said once: the backbone name, input size and patch size flow from ``--model``
    to ``--data``; ``--output_dir`` flows to the callbacks.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--output_dir", type=Path, required=True, help="Folder for every output of the run.")
        parser.add_lightning_class_args(SegmentShardWriter, "writer")
        parser.add_lightning_class_args(ClusterPaintEvaluate, "cluster")
        parser.link_arguments("output_dir", "writer.output_dir")
        parser.link_arguments("output_dir", "cluster.output_dir")
        parser.link_arguments("model.backbone", "data.backbone")
        parser.link_arguments("model.image_size", "data.image_size", apply_on="instantiate")
        parser.link_arguments("model.patch_size", "data.patch_size", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """Check the data folder and the clustering options before the backbone is built.

        Lightning builds the model first (its patch size is linked to the data), and building
        it may mean reading or downloading weights: a typo in a folder name must not wait for that.
        """
        locate_images(self.config.data.root, self.config.data.split, self.config.data.mask_dir)
        ClusterPaintEvaluate(**self.config.cluster.as_dict())  # validates; the CLI builds the one used

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> L.Trainer:
        """Show images/s in the progress bar, unless it is disabled or the user brought their own."""
        wanted = config.get("enable_progress_bar") is not False
        given = [*callbacks, *(config.get("callbacks") or [])]
        if wanted and not any(isinstance(c, ProgressBar) for c in given):
            callbacks = [*callbacks, ImagesPerSecondBar()]
        return super()._instantiate_trainer(config, callbacks)


def run_predict(args: Sequence[str]) -> DatusCLI:
    """``datus predict``: one LightningCLI predict run (stages 1-8).

    The arguments are passed explicitly while ``sys.argv`` stays as it is, because Lightning's
    DDP launcher re-executes ``sys.argv`` in its child processes; the warning LightningCLI
    gives for that combination is expected here.
    """
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    try:
        cli = DatusCLI(
            DatusModule,
            ImageFolderDataModule,
            run=False,
            args=list(args),
            save_config_callback=ConfigInOutputDir,
            save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
            trainer_defaults={"logger": False, "enable_checkpointing": False, "enable_model_summary": False},
            parser_kwargs={"prog": "datus predict", "default_env": False},
            seed_everything_default=0,
        )
    except (ValueError, FileNotFoundError, WeightsError) as error:  # raised by our checks of the options
        raise ConfigurationError(str(error)) from error
    cli.trainer.predict(cli.model, datamodule=cli.datamodule, return_predictions=False)
    pipeline = next(c for c in cli.trainer.callbacks if isinstance(c, ClusterPaintEvaluate))
    if not pipeline.finished and cli.trainer.is_global_zero:
        # Nothing was left to predict (a finished run again): Lightning skips the loop and its
        # hooks, but clustering settings may have changed, so post-process here.
        pipeline.run(torch.device("cpu"))
    return cli
