"""Stage 6 for a run: fit the clusters on the run's valid segments, reuse a fit, or apply another run's.

A fit is saved in the ``fit/`` folder of the results it paints (the run folder for ``datus
predict``, ``clusters/k<K>/`` for ``datus cluster``), so a folder's centroids always match its
masks, with ``settings.json`` saying what it was fitted on (the cluster settings and a digest of
the shards); a rerun with the same settings and shards reuses it, and so does another results
folder of the same run asking for the same fit.
The fit streams the run's segment table (:func:`datus.runfolder.shards.segment_table`), memory-mapped
from ``cache/``, so its memory does not grow with the run.
``--cluster.centroids`` applies a fitted model of another run instead, after checking that the
two runs embed segments the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from datus.stages.clustering import ClusterModel, Rows, fit_rows
from datus.stages.clustering.model import model_digest
from datus.core.collective import Collective
from datus.stages.diagnostics import Stability, sampled_stability
from datus.core.errors import ConfigurationError
from datus.core.io import UnreadableFile, read_json, write_json
from datus.runfolder.run import RUN_FILE, Results, Run, fit_folder
from datus.core.settings import ClusterSettings
from datus.runfolder.shards import embedding_width_of, segment_table, shards_digest

log = logging.getLogger(__name__)

FIT_FILE = "settings.json"
STABILITY_FILE = "stability.json"

EMBEDDING_IDENTITY = (
    "backbone", "weights", "embedder", "embedder_weights", "image_size", "patch_size", "embedding", "crop_recipe",
    "embedding_dim",
)
"""Model settings two runs must share for one run's centroids to label the other's segments."""


def fit_identity(run: Run, settings: ClusterSettings) -> dict[str, Any]:
    """What a fit depends on: the settings, the exact shards (a digest of names, sizes, modification
    times) and, for ``--cluster.centroids``, the content of the applied model's files (the source run
    may be re-clustered since)."""
    shards = run.shards()
    identity = {"settings": settings.fit_identity(), "shards": {"count": len(shards), "digest": shards_digest(shards)}}
    if settings.centroids is not None:
        identity["applied_model"] = model_digest(fit_folder(Path(settings.centroids)))
    return identity


def has_fit(run: Run, identity: dict[str, Any]) -> bool:
    """Whether a fit of ``identity`` is saved in any results folder of ``run`` (:func:`fit_or_load` will then load it, if sound)."""
    return any(_saved_identity(results.fit_dir) == identity for results in run.all_results())


@dataclass(frozen=True)
class Fit:
    """The cluster model (every rank) and its stability diagnostic (rank 0; None elsewhere)."""

    model: ClusterModel
    stability: Stability | None


def fit_or_load(run: Run, results: Results, settings: ClusterSettings, collective: Collective, identity: dict[str, Any]) -> Fit:
    """The cluster model for ``settings`` on every rank (fitted once, saved by rank 0), and its stability.

    The stability (:func:`datus.stages.diagnostics.sampled_stability`) is measured once per fit and kept
    beside it, so a rerun with an unchanged fit refits nothing.

    Args:
        run: the run whose shards are clustered.
        results: the results folder the fit paints; the fit is saved in its ``fit/``.
        settings: the cluster settings.
        collective: the ranks taking part.
        identity: :func:`fit_identity` of the run and settings; a fit of the run saved with this
            identity (here or in another results folder) is reused.
    """
    directory = results.fit_dir
    width = embedding_width(run)
    found = next((other.fit_dir for other in [results, *run.all_results()] if _saved_identity(other.fit_dir) == identity), None)
    model = cached = _cached_model(found, settings, width) if found is not None else None
    if model is None and settings.centroids is not None:
        model = applied_model(Path(settings.centroids), _model_identity(run), settings.num_clusters, width)
    elif model is None and settings.engine == "torch":
        rows, _ = _rows(run, settings, collective)
        assert rows is not None
        _check_enough_segments(run, settings, collective.sum_counts([len(rows)])[0])
        model = _fit_or_refuse(lambda: fit_rows(rows, settings))
    elif model is None:  # scikit-learn's engine is one process: rank 0 streams every row
        error = None
        if collective.is_main:
            try:
                rows, _ = _rows(run, settings, collective)
                assert rows is not None
                _check_enough_segments(run, settings, len(rows))
                model = _fit_or_refuse(lambda: fit_rows(rows, settings))
            except Exception as refused:  # any failure: the other ranks must not wait for a model for ever
                error = refused
        if collective.agree(error is not None):
            raise error or ConfigurationError("clustering failed on rank 0; see its message")
    stability = _saved_stability(found) if found is not None and cached is not None and collective.is_main else None
    if collective.agree(collective.is_main and stability is None):
        rows, group = _rows(run, settings, collective)
        if rows is not None and group is not None and model is not None:
            stability = sampled_stability(rows, model, settings, group)
    if collective.is_main:
        assert model is not None and stability is not None
        if found != directory or cached is None:
            (directory / FIT_FILE).unlink(missing_ok=True)  # a save cut short must not pass for the old fit
            model.save(directory)
        write_json(directory / STABILITY_FILE, stability.to_json())
        write_json(directory / FIT_FILE, identity)  # last: an identity always belongs to complete files
    collective.barrier()
    return Fit(model if model is not None else ClusterModel.load(directory), stability)


def _cached_model(directory: Path, settings: ClusterSettings, width: int) -> ClusterModel | None:
    """The saved fit in ``directory`` when it is sound; None to fit again."""
    try:  # a damaged or mismatched cache is refitted, not trusted
        cached = ClusterModel.load(directory)
    except ValueError as error:
        log.warning("fitting again: %s", error)
        return None
    if (cached.num_clusters, cached.input_dim) != (settings.num_clusters, width):
        log.warning("fitting again: %s does not fit K = %d and %d dimensions", directory, settings.num_clusters, width)
        return None
    return cached


def _rows(run: Run, settings: ClusterSettings, collective: Collective) -> tuple[Rows | None, Collective | None]:
    """The segment table this rank streams, and the ranks streaming with it.

    The torch engine: every rank its own shards' table, on its device. Otherwise (scikit-learn's
    engine, applied centroids): rank 0 alone, every shard; other ranks get ``(None, None)``.
    """
    if settings.engine == "torch" and settings.centroids is None:
        table = segment_table(run.shards()[collective.rank :: collective.world_size], run.cache_dir, f"rank{collective.rank:03d}")
        return Rows(table.embeddings, table.keys, collective.device), collective
    if not collective.is_main:
        return None, None
    table = segment_table(run.shards(), run.cache_dir, "all")
    cpu = torch.device("cpu")
    return Rows(table.embeddings, table.keys, cpu), Collective(0, 1, cpu)


def _saved_stability(directory: Path) -> Stability | None:
    try:
        return Stability.from_json(read_json(directory / STABILITY_FILE)) if (directory / STABILITY_FILE).is_file() else None
    except UnreadableFile:
        return None


def _fit_or_refuse(fit: Callable[[], ClusterModel]) -> ClusterModel:
    """A fit whose data cannot be clustered as asked (too few samples for the PCA...) is the user's to fix."""
    try:
        return fit()
    except ValueError as error:
        raise ConfigurationError(f"clustering: {error}") from error


def _saved_identity(directory: Path) -> Any:
    try:
        return read_json(directory / FIT_FILE) if (directory / FIT_FILE).is_file() else None
    except UnreadableFile:
        return None


def _check_enough_segments(run: Run, settings: ClusterSettings, count: int) -> None:
    """K above the number of valid segments: say how to finish, without predicting again where that can work."""
    if settings.num_clusters <= count:
        return
    if count == 0:  # no K can be fitted: re-clustering the saved predictions cannot help
        raise ConfigurationError(
            f"the run in {run.root} found no valid segment: every segment has at most --model.min_patches patches "
            "(with random weights or a backbone that does not match its weights nearly every patch is a segment of "
            "its own); predict into a new --output_dir with trained weights, a smaller --model.min_patches or a "
            "larger --model.image_size"
        )
    hint = f"datus cluster --run {run.root} --cluster.num_clusters {count}"
    raise ConfigurationError(
        f"--cluster.num_clusters {settings.num_clusters} is more than the {count} valid segments the run found; "
        f"the predictions are saved, so finish with `{hint}`, or predict more images into the same --output_dir"
    )


def embedding_width(run: Run) -> int:
    """The dimension of the run's segment embeddings (from its first shard's small per-image array)."""
    return embedding_width_of(run.shards())


def _model_identity(run: Run) -> dict[str, Any]:
    identity = run.recorded_identity()
    if identity is None:
        raise ConfigurationError(f"{run.root / RUN_FILE} is missing; run `datus predict` into {run.root} first")
    return identity["model"]


def applied_model(source: Path, model_identity: dict[str, Any], num_clusters: int, width: int | None = None) -> ClusterModel:
    """Another run's fitted model, refused unless that run embedded segments like this one.

    Args:
        source: a results folder of another run (the run folder, or its ``clusters/k<K>``), or its ``fit/``.
        model_identity: this run's model settings (``DatusModule.describe()``, as in run.json).
        num_clusters: the K asked for.
        width: this run's embedding dimension, when known.
    """
    folder = fit_folder(source)
    results = folder.parent
    owner = Run(results) if Run(results).is_datus_run() else Run(results.parent.parent)
    try:
        model = ClusterModel.load(folder)
        theirs = owner.recorded_identity()
    except (FileNotFoundError, ValueError) as error:
        raise ConfigurationError(f"--cluster.centroids {source}: {error}; give a run folder or its clusters/k<K> folder") from error
    if theirs is None:
        raise ConfigurationError(
            f"--cluster.centroids {source}: {owner.root / RUN_FILE} is missing; give a run folder or its clusters/k<K> folder"
        )
    differences = [
        f"{key}: {theirs['model'].get(key)!r} there, {model_identity.get(key)!r} here"
        for key in EMBEDDING_IDENTITY
        if theirs["model"].get(key) != model_identity.get(key)
    ]
    if differences:
        raise ConfigurationError(
            f"--cluster.centroids {source} were fitted on segments embedded differently ({'; '.join(differences)}); "
            "predict with the same --model settings as that run"
        )
    if model.num_clusters != num_clusters:
        raise ConfigurationError(
            f"--cluster.centroids {source} has K = {model.num_clusters}; set --cluster.num_clusters {model.num_clusters}"
        )
    if width is not None and model.input_dim != width:
        raise ConfigurationError(
            f"--cluster.centroids {source} take {model.input_dim}-dimensional embeddings, this run's have {width}"
        )
    return model
