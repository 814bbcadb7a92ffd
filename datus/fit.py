"""Stage 6 for a run: fit the clusters on the run's valid segments, reuse a fit, or apply another run's.

A fit is saved under ``clusters/k<K>/`` with ``settings.json`` saying what it was fitted on (the
cluster settings and the list of shards); a rerun with the same settings and shards reuses it.
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

from datus.clustering import ClusterModel, fit_clusters
from datus.collective import Collective
from datus.errors import ConfigurationError
from datus.io import UnreadableFile, read_json, write_json
from datus.records import ImageRecord
from datus.run import RUN_FILE, Run
from datus.settings import ClusterSettings
from datus.shards import read_segment_table

log = logging.getLogger(__name__)

FIT_FILE = "settings.json"

EMBEDDING_IDENTITY = (
    "backbone", "weights", "embedder", "embedder_weights", "image_size", "patch_size", "embedding", "crop_recipe",
    "embedding_dim",
)
"""Model settings two runs must share for one run's centroids to label the other's segments."""


def fit_identity(run: Run, settings: ClusterSettings) -> dict[str, Any]:
    """What a fit depends on: the settings and the exact shards (names and sizes)."""
    return {"settings": settings.fit_identity(), "shards": [[p.name, p.stat().st_size] for p in run.shards()]}


def fit_or_load(run: Run, settings: ClusterSettings, collective: Collective) -> ClusterModel:
    """The cluster model for ``settings`` on every rank (fitted once, saved by rank 0)."""
    directory = run.cluster_dir(settings.num_clusters)
    identity = fit_identity(run, settings)
    if _saved_identity(directory) == identity:
        try:
            return ClusterModel.load(directory)
        except ValueError as error:  # a damaged cache is refitted, not trusted
            log.warning("fitting again: %s", error)
    if settings.centroids is not None:
        model = applied_model(run, Path(settings.centroids), settings.num_clusters)
    else:
        own = read_segment_table(run.shards()[collective.rank :: collective.world_size]).embeddings
        _check_enough_segments(run, settings, collective.sum_counts([len(own)])[0])
        if settings.engine == "torch":
            model = _fit_or_refuse(lambda: fit_clusters(torch.from_numpy(own).to(collective.device), settings))
        else:
            model, error = None, None
            if collective.is_main:
                try:
                    everything = read_segment_table(run.shards()).embeddings.astype(np.float32)
                    model = _fit_or_refuse(lambda: fit_clusters(everything, settings))
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
    """K above the number of valid segments: say how to finish without predicting again."""
    if settings.num_clusters <= count:
        return
    hint = f"datus cluster --run {run.root} --cluster.num_clusters {max(count, 1)}"
    raise ConfigurationError(
        f"--cluster.num_clusters {settings.num_clusters} is more than the {count} valid segments the run found; "
        f"the predictions are saved, so finish with `{hint}`, or predict more images into the same --output_dir"
    )


def applied_model(run: Run, source: Path, num_clusters: int) -> ClusterModel:
    """Another run's fitted model, refused unless that run embedded segments like this one."""
    model = ClusterModel.load(source)
    source_run = Run(source.parent.parent)
    theirs, ours = source_run.recorded_identity(), run.recorded_identity()
    if theirs is None or ours is None:
        raise ConfigurationError(
            f"--cluster.centroids {source}: {source.parent.parent / RUN_FILE} is missing; give a clusters/k<K> "
            "folder inside a datus run folder"
        )
    differences = [
        f"{key}: {theirs['model'].get(key)!r} there, {ours['model'].get(key)!r} here"
        for key in EMBEDDING_IDENTITY
        if theirs["model"].get(key) != ours["model"].get(key)
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
