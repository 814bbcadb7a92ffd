"""``datus predict``: the LightningCLI application (model, data, writer, post-processing).

A predict-only CLI: its help shows datus's own options first and only the Trainer flags that
matter for inference; every option is declared once (the module's and data module's
``__init__`` signatures, the settings dataclasses) and checked before any weights are read.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import lightning as L
from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from datus.callbacks.estimate import CostEstimate
from datus.callbacks.pipeline import ClusterPaintEvaluate
from datus.callbacks.progress import ImagesProgressBar
from datus.callbacks.writer import SegmentShardWriter
from datus.datamodules.images import ImageFolderDataModule, check_loader_options
from datus.stages.crf import CRFParams, require_densecrf
from datus.core.errors import ConfigurationError
from datus.stages.fit import applied_model
from datus.core.io import locate_images, write_text
from datus.discovery.module import DatusModule, quiet_lightning
from datus.runfolder.run import CONFIG_FILE, Run
from datus.core.settings import ClusterSettings, EvaluationSettings

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
        locate_images(self.config.data.root, self.config.data.split, self.config.data.mask_dir, announce=False)
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
            CostEstimate(),
        ]
        given = [*callbacks, *(config.get("callbacks") or [])]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            ours.append(ImagesProgressBar())
        config = {**config, **TRAINER_SETTINGS}
        return super()._instantiate_trainer(config, [*callbacks, *ours])


TRAINER_HELP = {
    "accelerator": "cpu, gpu, mps or auto (a GPU when there is one).",
    "strategy": "auto, or ddp for several devices (one process per device).",
    "devices": "how many devices (or which: 0,1), or auto.",
    "num_nodes": "machines taking part, for a multi-node DDP job.",
    "precision": "32-true (default), bf16-mixed or 16-mixed: half-precision backbone passes.",
    "callbacks": "extra Lightning callbacks (class_path and init_args).",
    "limit_predict_batches": "predict only this many batches per device (an int), or this fraction.",
    "enable_progress_bar": "false hides the progress bars (logs and batch jobs).",
}
"""datus's words for the Trainer options it offers (Lightning's own describe training)."""

_OPEN_TYPES = ("model.backbone_kwargs", "trainer.callbacks", "trainer.strategy", "trainer.accelerator", "trainer.devices")
"""Options whose values are structures: their sub-keys (``--trainer.callbacks+=...``) are Lightning's to check."""


def option_table() -> dict[str, Any]:
    """Every ``datus predict`` option as data, read from the parser that LightningCLI builds.

    Written to ``predict_options.json`` (:func:`write_option_table`) so that help
    and most mistakes are answered without importing Lightning or timm; a test keeps the file
    equal to this.
    """
    import types
    import typing

    class _Built(Exception):
        pass

    class _ParserOnly(DatusCLI):
        def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
            raise _Built(parser)

    try:
        _ParserOnly(DatusModule, ImageFolderDataModule, run=False, args=[], parser_kwargs={"exit_on_error": False},
                    seed_everything_default=0, auto_configure_optimizers=False)  # fmt: skip
    except _Built as built:
        parser = built.args[0]
    options = []
    for action in parser._actions:
        flags = [flag for flag in action.option_strings if flag.startswith("--") and not flag.endswith("+")]
        hint = getattr(action, "_typehint", None)
        if not flags or hint is None or action.dest == "seed_everything" or action.dest.endswith(".help"):
            continue
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        arguments = [arg for arg in typing.get_args(hint) if arg is not type(None)] if union else [hint]
        nullable = union and len(arguments) < len(typing.get_args(hint))
        choices = None
        kind = "any"
        if len(arguments) == 1 and typing.get_origin(arguments[0]) is typing.Literal:
            choices = [str(value) for value in typing.get_args(arguments[0])]
        elif arguments == [bool]:
            choices = ["true", "false"]
        elif len(arguments) == 1 and arguments[0] in (int, float, str):
            kind = arguments[0].__name__
        group = action.dest.split(".")[0]
        name = action.dest.split(".", 1)[-1]
        text = TRAINER_HELP[name] if group == "trainer" else action.help or ""
        options.append({
            "flag": flags[0], "group": group if "." in action.dest else "", "kind": kind, "choices": choices,
            "nullable": nullable, "required": bool(action.required), "open": action.dest in _OPEN_TYPES,
            "default": _json_default(action.default), "help": _plain(text),
        })  # fmt: skip
    groups = {name: group.title for name, group in parser.groups.items() if name in {o["group"] for o in options}}
    return {"groups": groups, "options": options}


def write_option_table() -> None:
    """Regenerate ``predict_options.json`` after changing a signature or a docstring of an option."""
    import json

    from datus.core.options import TABLE_FILE

    TABLE_FILE.write_text(json.dumps(option_table(), indent=1) + "\n", encoding="utf-8")


def _json_default(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _plain(text: str) -> str:
    """Docstring markup as a user reads it: ``x`` and :func:`x` become x, one line."""
    text = re.sub(r":\w+:`([^`]*)`", r"\1", text)
    text = text.replace("``", "")
    return " ".join(text.split())


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
