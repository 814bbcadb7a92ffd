"""Stage 6: optional PCA, then k-means over segment embeddings, deterministic given a seed.

Two engines produce the same kind of :class:`ClusterModel`:

- ``sklearn``: scikit-learn's PCA and (MiniBatch)KMeans in one process. It is the reference
  the paper used; the caller must gather every embedding into that process first.
- ``torch``: Lloyd's algorithm written with tensors, on the embeddings' device. Under
  ``torch.distributed`` every rank passes only its own embeddings and only small things cross
  ranks (D x D covariance, K x D' sums, K counts, a few scalars and an initialisation sample),
  so no process ever holds the whole dataset and all ranks return the same model.

Both engines compute distances in true float32 (TF32 and autocast off) and in chunks of rows,
so memory stays bounded for millions of embeddings, and both derive every random draw from
``seed``, so a rerun reproduces the same clusters.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from datus.io import atomic_path, write_json

Engine = Literal["sklearn", "torch"]
Init = Literal["k-means++", "random"]
ENGINES: tuple[str, ...] = ("sklearn", "torch")
INITS: tuple[str, ...] = ("k-means++", "random")

CHUNK_ROWS = 65536
"""Most rows whose distances to the centroids are computed at once."""

_CHUNK_ELEMENTS = 1 << 25
"""Most elements (128 MiB of float32) in one chunk's rows x K or rows x D temporary."""

_INIT_SAMPLE_MIN = 10_000
_INIT_SAMPLE_PER_CLUSTER = 10
_MAX_SEED = 2**32 - 1
_FORMAT_VERSION = 1

_STREAM_SAMPLE = 0
_STREAM_INIT = 1

_MODEL_FILE = "model.json"
_CENTROIDS_FILE = "centroids.npy"
_PCA_MEAN_FILE = "pca_mean.npy"
_PCA_COMPONENTS_FILE = "pca_components.npy"


@dataclass(eq=False)
class ClusterModel:
    """A fitted clustering: centroids, the PCA that precedes them, and how they were made.

    Attributes:
        centroids: K x D' float32 centroids, in the PCA space when PCA is used (D' = D without).
        pca_mean: D float32 mean subtracted before projecting, or None without PCA.
        pca_components: D' x D float32 projection (rows are components), or None without PCA.
        engine: ``"sklearn"`` or ``"torch"``.
        init: ``"k-means++"`` or ``"random"``.
        seed: the seed the fit used.
        inertia: sum of squared distances of the fitted embeddings to their nearest centroid.
        n_iter: iterations run by the kept initialisation.
    """

    centroids: np.ndarray
    pca_mean: np.ndarray | None
    pca_components: np.ndarray | None
    engine: str
    init: str
    seed: int
    inertia: float
    n_iter: int

    def __post_init__(self) -> None:
        """Store arrays as float32 and refuse inconsistent shapes, so a bad load fails here."""
        self.centroids = np.ascontiguousarray(self.centroids, dtype=np.float32)
        if self.centroids.ndim != 2 or self.centroids.shape[0] < 1:
            raise ValueError(f"centroids must be a K x D' array with K >= 1, got shape {self.centroids.shape}")
        if (self.pca_mean is None) != (self.pca_components is None):
            raise ValueError("pca_mean and pca_components must both be given (PCA) or both be None (no PCA)")
        if self.pca_mean is not None and self.pca_components is not None:
            self.pca_mean = np.ascontiguousarray(self.pca_mean, dtype=np.float32)
            self.pca_components = np.ascontiguousarray(self.pca_components, dtype=np.float32)
            mean_ok = self.pca_mean.ndim == 1
            if not mean_ok or self.pca_components.shape != (self.centroids.shape[1], self.pca_mean.shape[0]):
                raise ValueError(
                    f"PCA shapes do not fit together: pca_mean {self.pca_mean.shape}, pca_components "
                    f"{self.pca_components.shape}, centroids {self.centroids.shape}; expected pca_mean (D,), "
                    "pca_components (D', D) and centroids (K, D')"
                )
        self.inertia = float(self.inertia)
        self.n_iter = int(self.n_iter)

    @property
    def num_clusters(self) -> int:
        """K, the number of centroids."""
        return int(self.centroids.shape[0])

    @property
    def input_dim(self) -> int:
        """D, the embedding dimension that :meth:`transform` and :meth:`assign` accept."""
        return int(self.pca_mean.shape[0] if self.pca_mean is not None else self.centroids.shape[1])

    @property
    def output_dim(self) -> int:
        """D', the dimension of the space the centroids live in."""
        return int(self.centroids.shape[1])

    @overload
    def transform(self, embeddings: np.ndarray) -> np.ndarray: ...

    @overload
    def transform(self, embeddings: Tensor) -> Tensor: ...

    def transform(self, embeddings: np.ndarray | Tensor) -> np.ndarray | Tensor:
        """Project embeddings into the centroids' space (PCA, or a float32 cast without PCA).

        Args:
            embeddings: N x D array or tensor, any floating dtype.

        Returns:
            N x D' float32, of the input's kind (numpy array, or tensor on the input's device).
            Without PCA a float32 input may be returned as is.
        """
        tensor, was_numpy = _as_tensor(embeddings)
        self._check_input(tensor)
        with torch.no_grad(), _exact_float32(tensor.device):
            if self.pca_mean is None or self.pca_components is None:
                projected = tensor.to(torch.float32)
            else:
                mean = torch.from_numpy(self.pca_mean).to(tensor.device)
                components = torch.from_numpy(self.pca_components).to(tensor.device)
                projected = _project(tensor, mean, components)
        return projected.numpy() if was_numpy else projected

    @overload
    def assign(self, embeddings: np.ndarray) -> np.ndarray: ...

    @overload
    def assign(self, embeddings: Tensor) -> Tensor: ...

    def assign(self, embeddings: np.ndarray | Tensor) -> np.ndarray | Tensor:
        """Label every embedding with its nearest centroid (squared Euclidean, after PCA).

        Works chunk by chunk, so float16 inputs are cast and projected a few thousand rows at
        a time and memory stays bounded. Ties go to the lowest centroid index.

        Args:
            embeddings: N x D array or tensor, any floating dtype.

        Returns:
            N int64 labels in ``[0, K)``: a numpy array for numpy input, else a tensor on the
            input's device.

        Raises:
            ValueError: wrong shape, or NaN/inf values (which have no nearest centroid).
        """
        tensor, was_numpy = _as_tensor(embeddings)
        self._check_input(tensor)
        device = tensor.device
        centroids = torch.from_numpy(self.centroids).to(device)
        mean = components = None
        if self.pca_mean is not None and self.pca_components is not None:
            mean = torch.from_numpy(self.pca_mean).to(device)
            components = torch.from_numpy(self.pca_components).to(device)
        labels = torch.empty(tensor.shape[0], dtype=torch.int64, device=device)
        rows = _chunk_rows(max(self.num_clusters, self.input_dim))
        with torch.no_grad(), _exact_float32(device):
            centroid_norms = _squared_norms(centroids)
            for start in range(0, tensor.shape[0], rows):
                chunk = tensor[start : start + rows].to(torch.float32)
                if not bool(torch.isfinite(chunk).all()):
                    raise ValueError(
                        f"embeddings rows {start}..{start + len(chunk) - 1} contain NaN or inf values, which have no "
                        "nearest centroid; drop or recompute those rows before assigning"
                    )
                if mean is not None and components is not None:
                    chunk = (chunk - mean) @ components.T
                labels[start : start + rows] = _nearest(chunk, centroids, centroid_norms)
        return labels.cpu().numpy() if was_numpy else labels

    def save(self, directory: Path) -> None:
        """Write the model to ``directory``: arrays as ``.npy`` and a ``model.json`` that describes them.

        Every file is written atomically and ``model.json`` last, so a reader never sees a torn
        file and a ``model.json`` always belongs to complete arrays. PCA files left by an earlier
        save of a PCA model are removed after ``model.json`` says there is no PCA.
        """
        directory = Path(directory)
        _write_npy(directory / _CENTROIDS_FILE, self.centroids)
        has_pca = self.pca_mean is not None and self.pca_components is not None
        if self.pca_mean is not None and self.pca_components is not None:
            _write_npy(directory / _PCA_MEAN_FILE, self.pca_mean)
            _write_npy(directory / _PCA_COMPONENTS_FILE, self.pca_components)
        write_json(
            directory / _MODEL_FILE,
            {
                "format_version": _FORMAT_VERSION,
                "engine": self.engine,
                "init": self.init,
                "seed": self.seed,
                "inertia": self.inertia,
                "n_iter": self.n_iter,
                "num_clusters": self.num_clusters,
                "input_dim": self.input_dim,
                "pca_components": self.output_dim if has_pca else None,
            },
        )
        if not has_pca:
            (directory / _PCA_MEAN_FILE).unlink(missing_ok=True)
            (directory / _PCA_COMPONENTS_FILE).unlink(missing_ok=True)

    @classmethod
    def load(cls, directory: Path) -> ClusterModel:
        """Read a model written by :meth:`save`.

        Raises:
            FileNotFoundError: ``directory`` holds no saved model.
            ValueError: the files disagree with ``model.json`` (e.g. mixed from two saves).
        """
        directory = Path(directory)
        meta_path = directory / _MODEL_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{directory}: no {_MODEL_FILE}, so no saved cluster model here; fit one with "
                "fit_clusters(...) and save it with model.save(directory) first"
            )
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format_version") != _FORMAT_VERSION:
            raise ValueError(
                f"{meta_path}: format_version {meta.get('format_version')!r} is not {_FORMAT_VERSION}; "
                "refit the clusters with this version of datus"
            )
        pca_mean = pca_components = None
        if meta["pca_components"] is not None:
            pca_mean = np.load(directory / _PCA_MEAN_FILE, allow_pickle=False)
            pca_components = np.load(directory / _PCA_COMPONENTS_FILE, allow_pickle=False)
        model = cls(
            centroids=np.load(directory / _CENTROIDS_FILE, allow_pickle=False),
            pca_mean=pca_mean,
            pca_components=pca_components,
            engine=meta["engine"],
            init=meta["init"],
            seed=meta["seed"],
            inertia=meta["inertia"],
            n_iter=meta["n_iter"],
        )
        found = (model.num_clusters, model.input_dim, model.output_dim if pca_mean is not None else None)
        expected = (meta["num_clusters"], meta["input_dim"], meta["pca_components"])
        if found != expected:
            raise ValueError(
                f"{directory}: arrays have (num_clusters, input_dim, pca_components) = {found} but {_MODEL_FILE} "
                f"says {expected}; the folder mixes files of different saves, fit and save again"
            )
        return model

    def _check_input(self, tensor: Tensor) -> None:
        if tensor.ndim != 2 or tensor.shape[1] != self.input_dim:
            raise ValueError(
                f"embeddings must have shape (N, {self.input_dim}) to match this model, got {tuple(tensor.shape)}; "
                "use embeddings from the same backbone the clusters were fitted on"
            )


def fit_clusters(
    embeddings: np.ndarray | Tensor,
    num_clusters: int,
    engine: Engine = "sklearn",
    init: Init = "k-means++",
    pca_components: int | None = None,
    seed: int = 0,
    max_iter: int = 300,
    tol: float = 1e-4,
    n_init: int = 1,
    minibatch: bool = False,
    batch_size: int = 4096,
) -> ClusterModel:
    """Cluster L2-normalised segment embeddings into ``num_clusters`` groups.

    Args:
        embeddings: N x D array or tensor, any floating dtype (computed in float32). With the
            torch engine under ``torch.distributed``, each rank passes only its own rows (a rank
            may pass none) on its own device (CUDA with NCCL).
        num_clusters: K, at most the total number of embeddings.
        engine: ``"sklearn"`` (single process, the paper's tools) or ``"torch"`` (any device,
            multi-rank aware).
        init: ``"k-means++"`` (more stable, per the paper's own ablation) or ``"random"`` (the
            paper's setting).
        pca_components: project onto this many principal components before k-means; None
            skips PCA.
        seed: every random draw derives from it, so the same seed gives the same model.
        max_iter: most Lloyd iterations (epochs with ``minibatch``) per initialisation.
        tol: stop once the summed squared centroid shift is at most ``tol`` times the mean
            per-feature variance of the clustered data (scikit-learn's convention, used by both
            engines so that ``tol`` means the same thing).
        n_init: initialisations to run; the one with the lowest inertia is kept.
        minibatch: use scikit-learn's MiniBatchKMeans (the paper's choice); sklearn engine only.
        batch_size: mini-batch size; only with ``minibatch=True``.

    Returns:
        The fitted model; under ``torch.distributed`` every rank gets the same one.

    Raises:
        ValueError: invalid arguments, empty input, non-finite values, K larger than the
            number of embeddings, or more PCA components than features or samples.
    """
    _check_arguments(num_clusters, engine, init, pca_components, seed, max_iter, tol, n_init, minibatch, batch_size)
    if engine == "sklearn":
        return _fit_sklearn(
            embeddings, num_clusters, init, pca_components, seed, max_iter, tol, n_init, minibatch, batch_size
        )
    return _fit_torch(embeddings, num_clusters, init, pca_components, seed, max_iter, tol, n_init)


def _check_arguments(
    num_clusters: int,
    engine: str,
    init: str,
    pca_components: int | None,
    seed: int,
    max_iter: int,
    tol: float,
    n_init: int,
    minibatch: bool,
    batch_size: int,
) -> None:
    """Refuse bad settings before touching the data (and before any collective)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}; pass the number of clusters wanted, e.g. 6")
    if pca_components is not None and pca_components < 1:
        raise ValueError(f"pca_components must be >= 1 or None (no PCA), got {pca_components}")
    if not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed must be in [0, {_MAX_SEED}] (scikit-learn's random_state range), got {seed}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number >= 0, got {tol}")
    if n_init < 1:
        raise ValueError(f"n_init must be >= 1, got {n_init}")
    if minibatch and engine != "sklearn":
        raise ValueError(
            f"minibatch=True needs engine='sklearn' (MiniBatchKMeans), got engine={engine!r}; the torch engine runs "
            "full-batch Lloyd iterations, so pass minibatch=False with it"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _check_data(num_samples: int, dim: int, num_nonfinite: int, num_clusters: int, pca_components: int | None) -> None:
    """Refuse data that cannot be clustered as asked; under DDP the counts are global."""
    if num_samples == 0:
        raise ValueError(
            f"embeddings is empty (0 rows of dimension {dim}): there is nothing to cluster; check that the "
            "prediction run produced valid segments"
        )
    if num_nonfinite:
        raise ValueError(
            f"embeddings contain {num_nonfinite} NaN or inf values; drop or recompute the rows holding them "
            "(typically an fp16 overflow) before clustering"
        )
    if num_clusters > num_samples:
        raise ValueError(
            f"num_clusters={num_clusters} exceeds the number of embeddings ({num_samples}); k-means needs at least "
            "one embedding per cluster, so lower num_clusters or cluster more images"
        )
    if pca_components is not None and pca_components > dim:
        raise ValueError(
            f"pca_components={pca_components} exceeds the embedding dimension {dim}; PCA cannot produce more "
            f"components than features, so pass pca_components <= {dim} or None"
        )
    if pca_components is not None and pca_components > num_samples:
        raise ValueError(
            f"pca_components={pca_components} exceeds the number of embeddings ({num_samples}); PCA of "
            f"{num_samples} samples has at most {num_samples} components, so lower pca_components or pass None"
        )


def _fit_sklearn(
    embeddings: np.ndarray | Tensor,
    num_clusters: int,
    init: str,
    pca_components: int | None,
    seed: int,
    max_iter: int,
    tol: float,
    n_init: int,
    minibatch: bool,
    batch_size: int,
) -> ClusterModel:
    """PCA then (MiniBatch)KMeans from scikit-learn, in this process."""
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from sklearn.decomposition import PCA

    tensor, _ = _as_tensor(embeddings)
    if tensor.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D (num_segments x dim) array, got shape {tuple(tensor.shape)}")
    tensor = tensor.detach().to("cpu", torch.float32)
    _check_data(tensor.shape[0], tensor.shape[1], _count_nonfinite(tensor), num_clusters, pca_components)
    data = tensor.numpy()
    pca_mean = components = None
    if pca_components is not None:
        # covariance_eigh is exact and deterministic, and for N >> D it costs one D x D
        # covariance instead of an SVD of the whole N x D matrix.
        pca = PCA(n_components=pca_components, whiten=False, svd_solver="covariance_eigh", random_state=seed)
        pca.fit(data)
        pca_mean = pca.mean_.astype(np.float32)
        components = pca.components_.astype(np.float32)
        with torch.no_grad(), _exact_float32(torch.device("cpu")):
            data = _project(torch.from_numpy(data), torch.from_numpy(pca_mean), torch.from_numpy(components)).numpy()
    if minibatch:
        estimator: KMeans | MiniBatchKMeans = MiniBatchKMeans(
            n_clusters=num_clusters,
            init=init,
            n_init=n_init,
            max_iter=max_iter,
            tol=tol,
            batch_size=batch_size,
            random_state=seed,
        )
    else:
        estimator = KMeans(
            n_clusters=num_clusters, init=init, n_init=n_init, max_iter=max_iter, tol=tol, random_state=seed
        )
    estimator.fit(data)
    return ClusterModel(
        centroids=estimator.cluster_centers_,
        pca_mean=pca_mean,
        pca_components=components,
        engine="sklearn",
        init=init,
        seed=seed,
        inertia=float(estimator.inertia_),
        n_iter=int(estimator.n_iter_),
    )


def _fit_torch(
    embeddings: np.ndarray | Tensor,
    num_clusters: int,
    init: str,
    pca_components: int | None,
    seed: int,
    max_iter: int,
    tol: float,
    n_init: int,
) -> ClusterModel:
    """PCA and Lloyd's k-means with tensors, reducing only small statistics across ranks."""
    group = _Group.current()
    tensor, _ = _as_tensor(embeddings)
    tensor = tensor.detach()
    device = tensor.device
    if group.world_size > 1 and dist.get_backend() == "nccl" and device.type != "cuda":
        raise ValueError(
            f"embeddings are on {device}, but the NCCL process group only moves CUDA tensors; pass them on this "
            "rank's GPU, e.g. embeddings.to(torch.device('cuda', local_rank))"
        )
    with torch.no_grad(), _exact_float32(device):
        counts, dim = _global_counts(tensor, num_clusters, pca_components, group)
        if tensor.shape[0] == 0:
            tensor = tensor.new_zeros((0, dim))
        num_samples = sum(counts)
        pca_mean = components = None
        data = tensor
        if pca_components is not None:
            pca_mean, components = _torch_pca(tensor, pca_components, num_samples, group)
            data = _project(tensor, pca_mean, components)
        tolerance = tol * _mean_variance(data, num_samples, group)
        sample = _gather_init_sample(data, counts, num_clusters, seed, group)
        best: tuple[Tensor, float, int] | None = None
        for run in range(n_init):
            centroids = _initial_centroids(sample, num_clusters, init, _generator(seed, _STREAM_INIT, run))
            # Every rank computed the same thing; the broadcast makes it bit-identical even if
            # kernels differ between devices, so that all ranks run the same iterations.
            centroids = group.broadcast(centroids)
            fitted = _lloyd(data, centroids, max_iter, tolerance, group)
            if best is None or fitted[1] < best[1]:
                best = fitted
    assert best is not None
    return ClusterModel(
        centroids=best[0].cpu().numpy(),
        pca_mean=None if pca_mean is None else pca_mean.cpu().numpy(),
        pca_components=None if components is None else components.cpu().numpy(),
        engine="torch",
        init=init,
        seed=seed,
        inertia=best[1],
        n_iter=best[2],
    )


@dataclass(frozen=True)
class _Group:
    """The ranks taking part in a torch fit; collectives are no-ops for a single process."""

    rank: int
    world_size: int

    @classmethod
    def current(cls) -> _Group:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls(0, 1)

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over ranks, in place."""
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor`` (same shape on all ranks), in rank order."""
        if self.world_size == 1:
            return [tensor]
        gathered = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(gathered, tensor.contiguous())
        return gathered

    def broadcast(self, tensor: Tensor) -> Tensor:
        """Rank 0's ``tensor``, on every rank."""
        if self.world_size > 1:
            tensor = tensor.contiguous()
            dist.broadcast(tensor, src=0)
        return tensor


def _global_counts(
    tensor: Tensor, num_clusters: int, pca_components: int | None, group: _Group
) -> tuple[list[int], int]:
    """Validate the data of all ranks together and return rows per rank and the dimension.

    Every rank raises the same error from the same gathered numbers, so a bad input on one
    rank stops all of them instead of leaving the others blocked in a collective.
    """
    is_matrix = tensor.ndim == 2
    rows = tensor.shape[0] if is_matrix else 0
    dim = tensor.shape[1] if is_matrix else 0
    local = torch.tensor([int(is_matrix), rows, dim, _count_nonfinite(tensor)], dtype=torch.int64)
    stats = torch.stack(group.all_gather(local.to(tensor.device))).cpu()
    not_matrix = [rank for rank in range(group.world_size) if not stats[rank, 0]]
    if not_matrix:
        where = f"; rank(s) {not_matrix} passed another shape" if group.world_size > 1 else ""
        raise ValueError(f"embeddings must be a 2-D (num_segments x dim) array, got shape {tuple(tensor.shape)}{where}")
    counts = stats[:, 1].tolist()
    dims = sorted({int(stats[rank, 2]) for rank in range(group.world_size) if counts[rank] > 0})
    if len(dims) > 1:
        raise ValueError(
            f"ranks hold embeddings of different dimensions {dims}; every rank must pass embeddings of the same "
            "backbone"
        )
    dim = dims[0] if dims else int(stats[:, 2].max())
    _check_data(sum(counts), dim, int(stats[:, 3].sum()), num_clusters, pca_components)
    return counts, dim


def _torch_pca(tensor: Tensor, num_components: int, num_samples: int, group: _Group) -> tuple[Tensor, Tensor]:
    """Principal components from all-reduced first and second moments.

    Two passes (mean, then the centred D x D scatter) instead of one raw ``sum x x^T``: the
    embeddings share a large mean direction, and subtracting ``mean mean^T`` afterwards
    would cancel most of the float precision. Chunks are multiplied in float32 and summed
    in float64. Components come in descending eigenvalue order with the sign that makes each
    component's largest-magnitude entry positive (scikit-learn's rule), so that the result
    does not depend on the eigen solver.

    Returns:
        ``(mean, components)``: D and D' x D float32, identical on every rank.
    """
    dim = tensor.shape[1]
    rows = _chunk_rows(dim)
    total = torch.zeros(dim, dtype=torch.float64, device=tensor.device)
    for chunk in _chunks(tensor, rows):
        total += chunk.sum(0, dtype=torch.float64)
    mean = (group.all_reduce(total) / num_samples).to(torch.float32)
    scatter = torch.zeros(dim, dim, dtype=torch.float64, device=tensor.device)
    for chunk in _chunks(tensor, rows):
        centred = chunk - mean
        scatter += (centred.T @ centred).to(torch.float64)
    covariance = group.all_reduce(scatter) / num_samples
    _, eigenvectors = torch.linalg.eigh(covariance)
    components = eigenvectors.flip(-1)[:, :num_components].T
    largest = components.abs().argmax(1)
    signs = torch.sign(components[torch.arange(num_components, device=tensor.device), largest])
    components = (components * signs[:, None]).to(torch.float32)
    # eigh of a nearly degenerate spectrum is sensitive to the last bit; take rank 0's.
    packed = group.broadcast(torch.cat([mean[None], components]))
    return packed[0], packed[1:]


def _mean_variance(data: Tensor, num_samples: int, group: _Group) -> float:
    """Mean per-feature variance of all ranks' data: the scale ``tol`` is relative to."""
    width = data.shape[1]
    moments = torch.zeros(2, width, dtype=torch.float64, device=data.device)
    for chunk in _chunks(data, _chunk_rows(width)):
        moments[0] += chunk.sum(0, dtype=torch.float64)
        moments[1] += chunk.square().sum(0, dtype=torch.float64)
    moments = group.all_reduce(moments) / num_samples
    return float((moments[1] - moments[0].square()).clamp_min(0).mean())


def _gather_init_sample(data: Tensor, counts: list[int], num_clusters: int, seed: int, group: _Group) -> Tensor:
    """A seeded uniform sample of all ranks' rows, the same on every rank, to initialise from.

    The sample has ``min(N, max(10 K, 10000))`` rows, split between ranks in proportion to
    their row counts so that it stays uniform over the whole dataset when ranks hold unequal
    shares. Each rank draws its share with its own seeded stream; shares are padded to one
    length for ``all_gather`` and trimmed again.
    """
    num_samples = sum(counts)
    budget = min(num_samples, max(_INIT_SAMPLE_PER_CLUSTER * num_clusters, _INIT_SAMPLE_MIN))
    quotas = _proportional_quotas(counts, budget)
    quota = quotas[group.rank]
    order = torch.randperm(data.shape[0], generator=_generator(seed, _STREAM_SAMPLE, group.rank))[:quota]
    local = data[order.to(data.device)].to(torch.float32)
    if group.world_size == 1:
        return local
    padded = local.new_zeros((max(quotas), data.shape[1]))
    padded[:quota] = local
    shares = group.all_gather(padded)
    return torch.cat([share[:size] for share, size in zip(shares, quotas, strict=True)])


def _proportional_quotas(counts: list[int], budget: int) -> list[int]:
    """Split ``budget`` rows between ranks proportionally to ``counts`` (largest remainders).

    No rank is asked for more rows than it has: only ranks with a non-zero remainder get one
    of the leftover rows, and for those the exact share is already above its floor.
    """
    total = sum(counts)
    quotas = [budget * count // total for count in counts]
    remainders = [budget * count % total for count in counts]
    leftover = budget - sum(quotas)
    for rank in sorted(range(len(counts)), key=lambda r: (-remainders[r], r))[:leftover]:
        quotas[rank] += 1
    return quotas


def _initial_centroids(sample: Tensor, num_clusters: int, init: str, generator: torch.Generator) -> Tensor:
    """K starting centroids drawn from ``sample`` (random rows, or greedy k-means++)."""
    if init == "random":
        return sample[torch.randperm(sample.shape[0], generator=generator)[:num_clusters].to(sample.device)].clone()
    return _kmeans_plusplus(sample, num_clusters, generator)


def _kmeans_plusplus(sample: Tensor, num_clusters: int, generator: torch.Generator) -> Tensor:
    """Greedy k-means++ as in scikit-learn: ``2 + log K`` candidates per step, keep the best.

    Random numbers come from a CPU generator so that the draws do not depend on the device.
    """
    device = sample.device
    num_rows = sample.shape[0]
    trials = 2 + int(math.log(num_clusters))
    sample_norms = _squared_norms(sample)
    centroids = sample.new_empty((num_clusters, sample.shape[1]))
    first = int(torch.randint(num_rows, (1,), generator=generator))
    centroids[0] = sample[first]
    closest = _squared_distances(sample[first : first + 1], sample, sample_norms)[0]
    for index in range(1, num_clusters):
        cumulative = closest.to(torch.float64).cumsum(0)
        targets = torch.rand(trials, generator=generator, dtype=torch.float64).to(device) * cumulative[-1]
        candidates = torch.searchsorted(cumulative, targets).clamp_max(num_rows - 1)
        distances = torch.minimum(closest[None], _squared_distances(sample[candidates], sample, sample_norms))
        best = distances.to(torch.float64).sum(1).argmin()
        closest = distances[best]
        centroids[index] = sample[candidates[best]]
    return centroids


def _lloyd(
    data: Tensor, centroids: Tensor, max_iter: int, tolerance: float, group: _Group
) -> tuple[Tensor, float, int]:
    """Lloyd iterations with per-cluster sums and counts all-reduced in one float64 tensor.

    Sums are formed with a one-hot matrix product rather than ``index_add_``, whose CUDA
    atomics would make them non-deterministic. A cluster that ends up empty is re-seeded with
    the point farthest from its centroid (see :func:`_farthest_points`), never left as NaN.

    Returns:
        ``(centroids, inertia, iterations)``; the inertia is measured against the returned
        centroids.
    """
    num_clusters, width = centroids.shape
    rows = _chunk_rows(max(num_clusters, width))
    cluster_ids = torch.arange(num_clusters, device=data.device)
    iteration = 0
    for iteration in range(1, max_iter + 1):
        centroid_norms = _squared_norms(centroids)
        packed = torch.zeros(num_clusters * (width + 1), dtype=torch.float64, device=data.device)
        sums = packed[: num_clusters * width].view(num_clusters, width)
        sizes = packed[num_clusters * width :]
        for chunk in _chunks(data, rows):
            labels = _nearest(chunk, centroids, centroid_norms)
            sums += ((cluster_ids[:, None] == labels[None]).to(torch.float32) @ chunk).to(torch.float64)
            sizes += torch.bincount(labels, minlength=num_clusters).to(torch.float64)
        group.all_reduce(packed)
        updated = torch.where(sizes[:, None] > 0, sums / sizes.clamp_min(1)[:, None], centroids.to(torch.float64))
        updated = updated.to(torch.float32)
        empty = torch.nonzero(sizes == 0).flatten()
        if len(empty):
            updated[empty] = _farthest_points(data, centroids, len(empty), rows, group)
        shift = float((updated - centroids).to(torch.float64).square().sum())
        centroids = updated
        if shift <= tolerance:
            break
    return centroids, _inertia(data, centroids, rows, group), iteration


def _farthest_points(data: Tensor, centroids: Tensor, count: int, rows: int, group: _Group) -> Tensor:
    """The ``count`` points farthest from their nearest centroid over all ranks, to re-seed empty clusters.

    Distances are recomputed here rather than kept from the assignment pass: empty clusters
    are rare, and the common pass then needs neither ``|x|^2`` nor an N-sized buffer. Each
    rank offers its own ``count`` farthest points (padded with -inf distances when it has
    fewer); after gathering them, every rank keeps the same ``count`` largest distances,
    ties going to the lower rank, then to the lower row.
    """
    centroid_norms = _squared_norms(centroids)
    local_distances = torch.empty(data.shape[0], dtype=torch.float32, device=data.device)
    for start, chunk in zip(range(0, data.shape[0], rows), _chunks(data, rows), strict=True):
        local_distances[start : start + rows] = _nearest_squared_distances(chunk, centroids, centroid_norms)
    local = min(count, data.shape[0])
    distances = torch.full((count,), -math.inf, dtype=torch.float32, device=data.device)
    points = torch.zeros((count, data.shape[1]), dtype=torch.float32, device=data.device)
    if local:
        order = torch.sort(local_distances, descending=True, stable=True).indices[:local]
        distances[:local] = local_distances[order]
        points[:local] = data[order].to(torch.float32)
    all_distances = torch.cat(group.all_gather(distances))
    all_points = torch.cat(group.all_gather(points))
    chosen = torch.sort(all_distances, descending=True, stable=True).indices[:count]
    return all_points[chosen]


def _inertia(data: Tensor, centroids: Tensor, rows: int, group: _Group) -> float:
    """Sum over all ranks of squared distances to the nearest centroid."""
    centroid_norms = _squared_norms(centroids)
    total = torch.zeros(1, dtype=torch.float64, device=data.device)
    for chunk in _chunks(data, rows):
        total += _nearest_squared_distances(chunk, centroids, centroid_norms).sum(dtype=torch.float64)
    return float(group.all_reduce(total))


def _nearest(points: Tensor, centroids: Tensor, centroid_norms: Tensor) -> Tensor:
    """Index of the nearest centroid (squared Euclidean) of float32 ``points``; ties go to the lowest.

    Only ``|c|^2 - 2 x.c`` is compared: ``|x|^2`` is the same for every centroid.
    """
    return torch.addmm(centroid_norms[None], points, centroids.T, alpha=-2).argmin(1)


def _nearest_squared_distances(points: Tensor, centroids: Tensor, centroid_norms: Tensor) -> Tensor:
    """Squared distance of each float32 point to its nearest centroid, clamped at 0 against rounding."""
    partial = torch.addmm(centroid_norms[None], points, centroids.T, alpha=-2).amin(1)
    return (partial + _squared_norms(points)).clamp_min(0)


def _squared_distances(points: Tensor, others: Tensor, other_norms: Tensor) -> Tensor:
    """Squared Euclidean distances, len(points) x len(others), clamped at 0 against rounding."""
    partial = torch.addmm(other_norms[None], points, others.T, alpha=-2)
    return (partial + _squared_norms(points)[:, None]).clamp_min(0)


def _squared_norms(points: Tensor) -> Tensor:
    """Row-wise ``|x|^2`` without a full-size squared temporary."""
    return torch.einsum("ij,ij->i", points, points)


def _project(tensor: Tensor, mean: Tensor, components: Tensor) -> Tensor:
    """``(x - mean) @ components^T`` in float32, chunk by chunk so that casts stay small."""
    projected = torch.empty((tensor.shape[0], components.shape[0]), dtype=torch.float32, device=tensor.device)
    rows = _chunk_rows(max(tensor.shape[1], components.shape[0]))
    for start, chunk in zip(range(0, tensor.shape[0], rows), _chunks(tensor, rows), strict=True):
        projected[start : start + rows] = (chunk - mean) @ components.T
    return projected


def _chunks(tensor: Tensor, rows: int) -> Iterator[Tensor]:
    """Consecutive float32 blocks of ``rows`` rows (float16/bfloat16 inputs are cast per block)."""
    for start in range(0, tensor.shape[0], rows):
        yield tensor[start : start + rows].to(torch.float32)


def _chunk_rows(width: int) -> int:
    """Rows per chunk so that a rows x ``width`` float32 temporary stays under 128 MiB."""
    return max(1, min(CHUNK_ROWS, _CHUNK_ELEMENTS // max(width, 1)))


def _count_nonfinite(tensor: Tensor) -> int:
    """Number of NaN/inf entries, counted per chunk to avoid a full-size boolean temporary."""
    if not tensor.is_floating_point():
        return 0
    flat = tensor.reshape(-1)
    return sum(
        int((~torch.isfinite(flat[start : start + _CHUNK_ELEMENTS])).sum())
        for start in range(0, len(flat), _CHUNK_ELEMENTS)
    )


def _generator(seed: int, stream: int, index: int) -> torch.Generator:
    """A CPU generator for one independent random stream derived from ``seed``.

    ``SeedSequence`` mixes (seed, stream, index) so that, e.g., rank 1 of seed 0 and rank 0 of
    seed 1 do not draw the same numbers, as they would with ``seed + rank``.
    """
    state = np.random.SeedSequence([seed, stream, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _as_tensor(embeddings: np.ndarray | Tensor) -> tuple[Tensor, bool]:
    """``(tensor, was_numpy)``; numpy arrays are wrapped without a copy."""
    if isinstance(embeddings, Tensor):
        tensor, was_numpy = embeddings, False
    elif isinstance(embeddings, np.ndarray):
        with warnings.catch_warnings():
            # Read-only arrays (np.load with mmap) are only ever read here.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensor, was_numpy = torch.as_tensor(embeddings), True
    else:
        raise TypeError(f"embeddings must be a numpy array or a torch tensor, got {type(embeddings).__name__}")
    if not tensor.is_floating_point():
        raise ValueError(
            f"embeddings must be floating point, got dtype {tensor.dtype}; pass the float embeddings of the shards"
        )
    return tensor, was_numpy


@contextmanager
def _exact_float32(device: torch.device) -> Iterator[None]:
    """Compute matrix products in true float32, whatever the caller configured.

    TF32 (``set_float32_matmul_precision("high")``, which Lightning users often set) and
    autocast round products to about 10 bits of mantissa, enough to flip nearest-centroid
    decisions between close clusters and to make the engines disagree. The matmul precision
    is a process-wide setting; the caller's value is restored on exit.
    """
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _write_npy(destination: Path, array: np.ndarray) -> None:
    """Write one ``.npy`` atomically and durably (no pickled objects)."""
    with atomic_path(destination) as temporary, open(temporary, "wb") as stream:
        np.save(stream, array, allow_pickle=False)
        stream.flush()
        os.fsync(stream.fileno())
