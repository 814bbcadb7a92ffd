"""``datus predict``: the LightningCLI application (model, data, writer, post-processing).

A predict-only CLI: its help shows datus's own options first and only the Trainer flags that
matter for inference; every option is declared once (the module's and data module's
``__init__`` signatures, the settings dataclasses) and checked before any weights are read.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import lightning as L
from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from callbacks.pipeline import ClusterPaintEvaluate
from callbacks.progress import ImagesProgressBar
from callbacks.writer import SegmentShardWriter
from datamodules.images import ImageFolderDataModule, check_loader_options, locate_images
from datus.crf import CRFParams, require_densecrf
from datus.errors import ConfigurationError
from datus.fit import applied_model
from datus.io import write_text
from datus.module import DatusModule
from datus.run import CONFIG_FILE, Run
from datus.settings import ClusterSettings, EvaluationSettings

INFERENCE_TRAINER_FLAGS = frozenset(
    {"accelerator", "strategy", "devices", "num_nodes", "precision", "callbacks", "limit_predict_batches", "enable_progress_bar"}
)
"""The Trainer options that mean something for a predict-only run; the others are not offered."""

TRAINER_SETTINGS: dict[str, Any] = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False}
"""Fixed Trainer settings of every run (no training: no logger, no checkpoints)."""


class ConfigInOutputDir(SaveConfigCallback):
    """Saves the fully resolved config as ``OUTPUT_DIR/config.yaml`` (global rank 0 only)."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        run = Run(Path(self.config["output_dir"]))
        write_text(run.file(CONFIG_FILE), self.parser.dump(self.config, skip_none=False))


class DatusCLI(LightningCLI):
    """LightningCLI for predict-only runs: model, data, writer and post-processing in one config.

    Values are said once: the input size and patch size flow from ``--model`` to ``--data``,
    ``--output_dir`` flows to the callbacks and keeps the data module from reading the run's
    own outputs.
    """

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--output_dir", type=Optional[str], default=None, help="Folder for every output of the run (created if missing)."
        )
        parser.add_lightning_class_args(self._model_class, "model")
        parser.add_lightning_class_args(self._datamodule_class, "data")
        parser.add_class_arguments(ClusterSettings, "cluster", instantiate=False)
        parser.add_class_arguments(EvaluationSettings, "eval", instantiate=False)
        parser.add_class_arguments(CRFParams, "crf", instantiate=False)
        skipped = {name for name in _trainer_parameters() if name not in INFERENCE_TRAINER_FLAGS}
        parser.add_class_arguments(self.trainer_class, "trainer", instantiate=False, sub_configs=True, skip=skipped)
        parser.groups["trainer"].title = "Lightning Trainer options for inference (devices, precision, ...)"
        parser.groups["trainer"].description = None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("output_dir", "data.exclude")
        parser.link_arguments("model.image_size", "data.image_size", apply_on="instantiate")
        parser.link_arguments("model.patch_size", "data.patch_size", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """Check folders and dataset-level settings before the backbone is built and its weights read."""
        if not self.config.get("output_dir"):
            raise ConfigurationError("--output_dir is required: the folder where datus writes its results")
        Run(Path(self.config.output_dir)).check_writable()
        locate_images(self.config.data.root, self.config.data.split, self.config.data.mask_dir)
        self.cluster_settings = ClusterSettings(**self.config.cluster.as_dict())
        self.evaluation_settings = EvaluationSettings(**self.config.eval.as_dict())
        self.crf_params = CRFParams(**self.config.crf.as_dict())
        if self.cluster_settings.crf:
            require_densecrf()
        check_loader_options(self.config.data.batch_size, self.config.data.num_workers)

    def after_instantiate_classes(self) -> None:
        """Refuse cluster settings that cannot fit this model's embeddings before predicting any image."""
        pca = self.cluster_settings.pca_components
        if pca is not None and pca > self.model.embedding_dim:
            raise ConfigurationError(
                f"--cluster.pca_components {pca} is more than the {self.model.embedding_dim} dimensions of "
                f"{self.model.describe()['backbone']}'s segment embeddings; pass at most {self.model.embedding_dim} or null"
            )
        if self.cluster_settings.centroids is not None:
            applied_model(
                Path(self.cluster_settings.centroids),
                self.model.describe(),
                self.cluster_settings.num_clusters,
                self.model.embedding_dim,
            )

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> L.Trainer:
        """Add the writer, the dataset stages and the image progress bar (last, after the writer)."""
        output_dir = Path(self.config.output_dir)
        ours: list[Callback] = [
            SegmentShardWriter(output_dir),
            ClusterPaintEvaluate(output_dir, self.cluster_settings, self.evaluation_settings, self.crf_params),
        ]
        given = [*callbacks, *(config.get("callbacks") or [])]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            ours.append(ImagesProgressBar())
        config = {**config, **TRAINER_SETTINGS}
        return super()._instantiate_trainer(config, [*callbacks, *ours])


def quiet_lightning() -> None:
    """Keep Lightning's start-up chatter (accelerator inventory, seeding, tips) off the console.

    datus states the facts that matter itself, once (device and precision, weights, resume).
    """
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def _trainer_parameters() -> list[str]:
    import inspect

    return [name for name in inspect.signature(L.Trainer.__init__).parameters if name != "self"]


def build_cli(args: Sequence[str]) -> DatusCLI:
    """Parse and check ``datus predict`` arguments and build model, data and trainer.

    The arguments are passed explicitly while ``sys.argv`` stays as it is, because Lightning's
    DDP launcher re-executes ``sys.argv`` in its child processes; the warning LightningCLI
    gives for that combination is expected here.
    """
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    quiet_lightning()
    try:
        return DatusCLI(
            DatusModule,
            ImageFolderDataModule,
            run=False,
            args=list(args),
            save_config_callback=ConfigInOutputDir,
            save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
            parser_kwargs={
                "prog": "datus predict",
                "description": "Pseudo masks for a folder of images: segments from a frozen ViT, embedded, clustered, "
                "painted and, with ground truth, scored. Options of the run first, then Trainer options for inference.",
                "default_env": False,
                "exit_on_error": False,
            },
            seed_everything_default=0,
            auto_configure_optimizers=False,
        )
    except ArgumentError as error:
        raise ConfigurationError(f"{_first_line(error)} (see datus predict --help)") from error


def _first_line(error: Exception) -> str:
    """jsonargparse's message as one line that names the flag: ``--model.image_size: expected int, got 'abc'``."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines else type(error).__name__
    match = re.match(r'Parser key "([^"]+)":\s*(.*)', text)
    if match:
        key, rest = match.groups()
        rest = re.sub(r"Expected a <class '(\w+)'>", r"expected \1", rest)
        rest = re.sub(r"Expected a typing\.Literal\[(.*?)\]", r"expected one of \1", rest)
        text = f"--{key}: {rest.replace('. Got value:', ', got')}"
    return text


def run_predict(args: Sequence[str]) -> DatusCLI:
    """``datus predict``: one LightningCLI predict run (stages 1-8)."""
    cli = build_cli(args)
    cli.trainer.predict(cli.model, datamodule=cli.datamodule, return_predictions=False)
    return cli
