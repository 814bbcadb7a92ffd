"""Settings of the dataset-level stages, each declared once as a frozen dataclass that checks itself.

``datus predict`` exposes them as ``--cluster.*`` and ``--eval.*`` (LightningCLI reads the
dataclasses' signatures); ``datus cluster`` builds the same flags from the same dataclasses
(:func:`add_options`), with the run's saved ``config.yaml`` as defaults. The settings of the
ViT stages are the ``__init__`` arguments of :class:`datus.discovery.module.DatusModule`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from datus.core.errors import ConfigurationError
from datus.runfolder.run import fit_folder

RANDOM_WEIGHTS = "random"
"""Value of ``--model.weights`` that asks for an untrained network (tests, smoke runs)."""

IGNORE_INDEX = 255
"""Ground-truth value that scoring ignores: the default of ``--eval.ignore_index`` and what ``datus prepare`` writes."""


@dataclass(frozen=True)
class ClusterSettings:
    """Stage 6 (k-means over segment embeddings) and what the painting stage writes.

    Args:
        num_clusters: K, the number of pseudo classes.
        engine: ``sklearn`` (one process streams every segment: scikit-learn's initialisation and
            MiniBatchKMeans) or ``torch`` (on the device; under DDP each rank streams its own
            segments and only sums, counts and the initialisation sample cross ranks). Both read
            the run's segment table a chunk at a time (:mod:`datus.stages.clustering.streamed`).
        init: ``k-means++`` (better and more stable per the paper's own ablation) or ``random``
            (the paper's setting).
        pca_components: reduce embeddings to this many dimensions first (None: no PCA).
        minibatch: MiniBatchKMeans, as the paper (sklearn engine only).
        seed: clustering seed.
        centroids: another run's folder, or its ``clusters/k<K>`` folder: label this run's
            segments with the centroids (and PCA) fitted there instead of fitting, e.g. fit on
            train, label val.
        colour: also write colour masks, overlays and a legend for people to look at.
        crf: refine the masks with a dense CRF on the image (``--crf.*`` sets it up); ``both``
            writes refined masks and scores them with and without refinement.
        gallery: also draw ``gallery/cluster_<k>.png`` (each cluster's most typical and some
            random segments, cut from their images) and ``gallery/index.png``, to see what a
            cluster means without labels; costs a few image decodes per cluster.
        workers: processes for the per-shard work of painting, scoring and colouring (None: one
            per core, shared between the ranks of this machine, fewer for short runs; 1: in the
            main process).
    """

    num_clusters: int = 6
    engine: Literal["sklearn", "torch"] = "sklearn"
    init: Literal["k-means++", "random"] = "k-means++"
    pca_components: int | None = None
    minibatch: bool = False
    seed: int = 0
    centroids: Path | None = None
    colour: bool = True
    crf: bool | Literal["both"] = False
    gallery: bool = True
    workers: int | None = None

    def __post_init__(self) -> None:
        _check_choices(self, "cluster")
        if self.workers is not None and self.workers < 1:
            raise ConfigurationError(f"--cluster.workers must be >= 1 or null (one per core), got {self.workers}")
        if self.num_clusters < 1:
            raise ConfigurationError(
                f"--cluster.num_clusters must be >= 1, got {self.num_clusters}; give the number of pseudo classes, e.g. 6"
            )
        if self.pca_components is not None and self.pca_components < 1:
            raise ConfigurationError(f"--cluster.pca_components must be >= 1 or null, got {self.pca_components}")
        if self.minibatch and self.engine != "sklearn":
            raise ConfigurationError("--cluster.minibatch true needs --cluster.engine sklearn (MiniBatchKMeans)")
        if self.crf not in (True, False, "both"):
            raise ConfigurationError(f"--cluster.crf must be true, false or both, got {self.crf!r}")
        if not 0 <= self.seed < 2**32:
            raise ConfigurationError(f"--cluster.seed must be in [0, 2**32), got {self.seed}")
        if self.centroids is not None and not (fit_folder(Path(self.centroids)) / "model.json").is_file():
            raise ConfigurationError(
                f"--cluster.centroids {self.centroids} holds no fitted clusters (fit/model.json); give the "
                "folder of a finished run, or its clusters/k<K> folder"
            )

    def fit_identity(self) -> dict[str, Any]:
        """The settings that decide the fitted centroids (a fit is reused while they match)."""
        return {
            "num_clusters": self.num_clusters,
            "engine": self.engine,
            "init": self.init,
            "pca_components": self.pca_components,
            "minibatch": self.minibatch,
            "seed": self.seed,
            "centroids": str(Path(self.centroids).resolve()) if self.centroids is not None else None,
        }


@dataclass(frozen=True)
class EvaluationSettings:
    """Stage 8 (scoring against ground truth, when the data has masks).

    Args:
        num_classes: ground-truth classes; None reads the dataset's ``classes.json`` (written
            by ``datus prepare``), and without one scoring is skipped.
        ignore_index: ground-truth value that is never scored.
    """

    num_classes: int | None = None
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigurationError(f"--eval.num_classes must be >= 1 or null, got {self.num_classes}")


def _check_choices(settings: Any, group: str) -> None:
    """Refuse a value outside a ``Literal`` field's choices (Python callers have no parser to stop them)."""
    hints = typing.get_type_hints(type(settings))
    for item in dataclasses.fields(settings):
        if typing.get_origin(hints[item.name]) is Literal:
            choices = typing.get_args(hints[item.name])
            if getattr(settings, item.name) not in choices:
                raise ConfigurationError(
                    f"--{group}.{item.name} must be one of {', '.join(map(str, choices))}, got {getattr(settings, item.name)!r}"
                )


def add_options(
    parser: argparse.ArgumentParser,
    settings: type[Any],
    group: str,
    defaults: dict[str, Any],
    many: frozenset[str] = frozenset(),
) -> None:
    """Add ``--<group>.<field>`` flags for every field of a settings dataclass to an argparse parser.

    Types come from the annotations (int, float, bool, Path, Literal, ``X | None``), so a
    field is declared once for ``datus predict`` and ``datus cluster`` alike.

    Args:
        parser: the parser to extend.
        settings: the dataclass.
        group: flag prefix (``cluster``, ``eval``).
        defaults: values that replace the dataclass defaults (e.g. from a run's config.yaml).
        many: fields that take one or more values (a sweep).
    """
    from datus.core.options import option_help, table

    hints = typing.get_type_hints(settings)
    section = parser.add_argument_group(table()["groups"].get(group, group).split(". ")[0])
    for item in dataclasses.fields(settings):
        convert, choices = _converter(hints[item.name], f"--{group}.{item.name}")
        default = defaults.get(item.name, item.default)
        source = "the run's" if item.name in defaults else "the run's, else"
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else default
        section.add_argument(
            f"--{group}.{item.name}",
            dest=f"{group}.{item.name}",
            type=convert,
            choices=choices,
            nargs="+" if item.name in many else None,
            default=[default] if item.name in many else default,
            metavar=item.name.upper() if choices is None else None,
            help=f"{option_help(f'--{group}.{item.name}')} (default: {source} {shown})",
        )


def from_options(options: argparse.Namespace, settings: type[Any], group: str) -> dict[str, Any]:
    """The values of one group's flags, by field name."""
    return {item.name: getattr(options, f"{group}.{item.name}") for item in dataclasses.fields(settings)}


def _converter(hint: Any, flag: str) -> tuple[Any, list[Any] | None]:
    """(type callable, choices) for an annotation: int, float, bool, Path, Literal, or a union of them.

    ``null``/``none`` give None for optional fields; a union tries its members in order.
    """
    if typing.get_origin(hint) is Literal:
        return str, [str(choice) for choice in typing.get_args(hint)]
    members = list(typing.get_args(hint)) if typing.get_origin(hint) in (Union, types.UnionType) else [hint]

    def convert(text: str) -> Any:
        if type(None) in members and text.lower() in ("null", "none"):
            return None
        for member in members:
            if member is type(None):
                continue
            if typing.get_origin(member) is Literal:
                if text in typing.get_args(member):
                    return text
            elif member is bool:
                if text.lower() in ("true", "false"):
                    return text.lower() == "true"
            else:
                try:
                    return member(text)
                except ValueError:
                    continue
        raise argparse.ArgumentTypeError(f"{flag} does not take {text!r}")

    convert.__name__ = "value"
    return convert, None
