"""Stage 6 for a run: fit the clusters on the run's valid segments, reuse a fit, or apply another run's.

A fit is saved under ``clusters/k<K>/`` with ``settings.json`` saying what it was fitted on (the
cluster settings and a digest of the shards); a rerun with the same settings and shards reuses it.
The fit streams the run's segment table (:func:`datus.shards.segment_table`), memory-mapped
from ``cache/``, so its memory does not grow with the run.
``--cluster.centroids`` applies a fitted model of another run instead, after checking that the
two runs embed segments the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datus.clustering import ClusterModel, Rows, fit_rows
from datus.collective import Collective
from datus.errors import ConfigurationError
from datus.io import UnreadableFile, read_json, write_json
from datus.records import ImageRecord
from datus.run import RUN_FILE, Run
from datus.settings import ClusterSettings
from datus.shards import embedding_width_of, segment_table, shards_digest

log = logging.getLogger(__name__)

FIT_FILE = "settings.json"

EMBEDDING_IDENTITY = (
    "backbone", "weights", "embedder", "embedder_weights", "image_size", "patch_size", "embedding", "crop_recipe",
    "embedding_dim",
)
"""Model settings two runs must share for one run's centroids to label the other's segments."""


def fit_identity(run: Run, settings: ClusterSettings) -> dict[str, Any]:
    """What a fit depends on: the settings and the exact shards (a digest of names, sizes, modification times)."""
    shards = run.shards()
    return {"settings": settings.fit_identity(), "shards": {"count": len(shards), "digest": shards_digest(shards)}}


def fit_or_load(run: Run, settings: ClusterSettings, collective: Collective, identity: dict[str, Any]) -> ClusterModel:
    """The cluster model for ``settings`` on every rank (fitted once, saved by rank 0).

    Args:
        run: the run whose shards are clustered.
        settings: the cluster settings.
        collective: the ranks taking part.
        identity: :func:`fit_identity` of the run and settings; a saved fit is reused when it matches.
    """
    directory = run.cluster_dir(settings.num_clusters)
    width = embedding_width(run)
    if _saved_identity(directory) == identity:
        try:  # a damaged or mismatched cache is refitted, not trusted
            cached = ClusterModel.load(directory)
            if (cached.num_clusters, cached.input_dim) == (settings.num_clusters, width):
                return cached
            log.warning("fitting again: %s does not fit K = %d and %d dimensions", directory, settings.num_clusters, width)
        except ValueError as error:
            log.warning("fitting again: %s", error)
    if settings.centroids is not None:
        model = applied_model(Path(settings.centroids), _model_identity(run), settings.num_clusters, width)
    elif settings.engine == "torch":  # every rank streams its own rows on its device
        own = run.shards()[collective.rank :: collective.world_size]
        table = segment_table(own, run.cache_dir, f"rank{collective.rank:03d}")
        _check_enough_segments(run, settings, collective.sum_counts([len(table.keys)])[0])
        model = _fit_or_refuse(lambda: fit_rows(Rows(table.embeddings, table.keys, collective.device), settings))
    else:  # scikit-learn's engine is one process: rank 0 streams every row
        model, error = None, None
        if collective.is_main:
            try:
                table = segment_table(run.shards(), run.cache_dir, "all")
                _check_enough_segments(run, settings, len(table.keys))
                model = _fit_or_refuse(lambda: fit_rows(Rows(table.embeddings, table.keys, torch.device("cpu")), settings))
            except ConfigurationError as refused:
                error = refused
        if collective.agree(error is not None):
            raise error or ConfigurationError("clustering failed on rank 0; see its message")
    if collective.is_main:
        assert model is not None
        model.save(directory)
        write_json(directory / FIT_FILE, identity)
    collective.barrier()
    return model if model is not None else ClusterModel.load(directory)


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
        source: a ``clusters/k<K>`` folder of another run.
        model_identity: this run's model settings (``DatusModule.describe()``, as in run.json).
        num_clusters: the K asked for.
        width: this run's embedding dimension, when known.
    """
    try:
        model = ClusterModel.load(source)
        theirs = Run(source.parent.parent).recorded_identity()
    except (FileNotFoundError, ValueError) as error:
        raise ConfigurationError(f"--cluster.centroids {source}: {error}") from error
    if theirs is None:
        raise ConfigurationError(
            f"--cluster.centroids {source}: {source.parent.parent / RUN_FILE} is missing; give a clusters/k<K> "
            "folder inside a datus run folder"
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


def segment_labels(model: ClusterModel, records: list[ImageRecord]) -> list[np.ndarray]:
    """A cluster id for every segment of every record, valid segments by their own embeddings."""
    valid = np.concatenate([record.embeddings for record in records]).astype(np.float32)
    images = np.stack([record.image_embedding for record in records]).astype(np.float32)
    valid_labels = model.assign(valid) if len(valid) else np.zeros(0, dtype=np.int64)
    image_labels = model.assign(images)
    labels, offset = [], 0
    for record, image_label in zip(records, image_labels):
        labels.append(record.segment_labels(valid_labels[offset : offset + record.num_valid], int(image_label)))
        offset += record.num_valid
    return labels


def segment_probabilities_of(model: ClusterModel, record: ImageRecord, temperature: float) -> np.ndarray:
    """Soft cluster membership of every segment (S x K), the input of the CRF.

    Valid segments use their own distances to the centroids, noise segments their donor's,
    and an image without valid segments its own CLS embedding's.
    """
    from datus.crf import segment_probabilities

    stacked = np.concatenate([record.embeddings, record.image_embedding[None]]).astype(np.float32)
    probabilities = segment_probabilities(model.distances(stacked), temperature)
    rows = np.where(record.donors >= 0, record.donors, record.num_valid)
    return probabilities[rows]
