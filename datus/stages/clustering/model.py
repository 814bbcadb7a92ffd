"""A fitted clustering (centroids and the PCA before them) and how it is saved and loaded.

Both k-means engines produce a :class:`ClusterModel`; painting, ``datus cluster`` and labelling
new images with another run's centroids (``--cluster.centroids``) use it through
:meth:`ClusterModel.assign` and :meth:`ClusterModel.load`. Loaded files are checked against
each other, since a run folder is untrusted input.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np
import torch
from torch import Tensor

from datus.stages.clustering.kernels import (
    as_tensor,
    chunk_rows,
    exact_float32,
    nearest,
    project,
    squared_distances,
    squared_norms,
)
from datus.core.io import open_regular, read_json, write_json, write_npy

FORMAT_VERSION = 1
MODEL_FILE = "model.json"
CENTROIDS_FILE = "centroids.npy"
PCA_MEAN_FILE = "pca_mean.npy"
PCA_COMPONENTS_FILE = "pca_components.npy"


@dataclass(frozen=True)
class Iterations:
    """How long k-means runs: settings of the algorithm, not of the run (both engines read them).

    Attributes:
        max_iter: most Lloyd iterations (epochs with mini-batches) per initialisation.
        tol: stop once the summed squared centroid shift is at most ``tol`` times the mean
            per-feature variance of the data (scikit-learn's convention).
        n_init: initialisations; the one with the lowest inertia is kept.
        batch_size: mini-batch size of MiniBatchKMeans.
    """

    max_iter: int = 300
    tol: float = 1e-4
    n_init: int = 1
    batch_size: int = 4096

    def __post_init__(self) -> None:
        if self.max_iter < 1 or self.n_init < 1 or self.batch_size < 1 or not 0 <= self.tol < float("inf"):
            raise ValueError(
                f"max_iter, n_init and batch_size must be >= 1 and tol a finite number >= 0, got {self}"
            )


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
        """D, the embedding dimension that :meth:`assign` accepts."""
        return int(self.pca_mean.shape[0] if self.pca_mean is not None else self.centroids.shape[1])

    @property
    def output_dim(self) -> int:
        """D', the dimension of the space the centroids live in."""
        return int(self.centroids.shape[1])

    def distances(self, embeddings: np.ndarray) -> np.ndarray:
        """Squared Euclidean distances (after PCA) of a few embeddings to every centroid, N x K float32.

        The soft input of the CRF; labels of many embeddings come from :meth:`assign`.
        """
        tensor, _ = as_tensor(embeddings)
        self._check_input(tensor)
        with torch.no_grad(), exact_float32(tensor.device):
            data = tensor.to(torch.float32)
            if self.pca_mean is not None and self.pca_components is not None:
                data = project(data, torch.from_numpy(self.pca_mean), torch.from_numpy(self.pca_components))
            centroids = torch.from_numpy(self.centroids)
            return squared_distances(data, centroids, squared_norms(centroids)).numpy()

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
        tensor, was_numpy = as_tensor(embeddings)
        self._check_input(tensor)
        device = tensor.device
        centroids = torch.from_numpy(self.centroids).to(device)
        mean = components = None
        if self.pca_mean is not None and self.pca_components is not None:
            mean = torch.from_numpy(self.pca_mean).to(device)
            components = torch.from_numpy(self.pca_components).to(device)
        labels = torch.empty(tensor.shape[0], dtype=torch.int64, device=device)
        rows = chunk_rows(max(self.num_clusters, self.input_dim))
        with torch.no_grad(), exact_float32(device):
            centroid_norms = squared_norms(centroids)
            for start in range(0, tensor.shape[0], rows):
                chunk = tensor[start : start + rows].to(torch.float32)
                if not bool(torch.isfinite(chunk).all()):
                    raise ValueError(
                        f"embeddings rows {start}..{start + len(chunk) - 1} contain NaN or inf values, which have no "
                        "nearest centroid; drop or recompute those rows before assigning"
                    )
                if mean is not None and components is not None:
                    chunk = (chunk - mean) @ components.T
                labels[start : start + rows] = nearest(chunk, centroids, centroid_norms)
        return labels.cpu().numpy() if was_numpy else labels

    def save(self, directory: Path) -> None:
        """Write the model to ``directory``: arrays as ``.npy`` and a ``model.json`` that describes them.

        Every file is written atomically and ``model.json`` last, so a reader never sees a torn
        file and a ``model.json`` always belongs to complete arrays. PCA files left by an earlier
        save of a PCA model are removed after ``model.json`` says there is no PCA.
        """
        directory = Path(directory)
        write_npy(directory / CENTROIDS_FILE, self.centroids)
        has_pca = self.pca_mean is not None and self.pca_components is not None
        if self.pca_mean is not None and self.pca_components is not None:
            write_npy(directory / PCA_MEAN_FILE, self.pca_mean)
            write_npy(directory / PCA_COMPONENTS_FILE, self.pca_components)
        write_json(
            directory / MODEL_FILE,
            {
                "format_version": FORMAT_VERSION,
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
            (directory / PCA_MEAN_FILE).unlink(missing_ok=True)
            (directory / PCA_COMPONENTS_FILE).unlink(missing_ok=True)

    @classmethod
    def load(cls, directory: Path) -> ClusterModel:
        """Read a model written by :meth:`save`.

        Raises:
            FileNotFoundError: ``directory`` holds no saved model.
            ValueError: the files disagree with ``model.json`` (e.g. mixed from two saves).
        """
        directory = Path(directory)
        meta_path = directory / MODEL_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{directory}: no {MODEL_FILE}, so no saved cluster model here; fit one with "
                "fit_clusters(...) and save it with model.save(directory) first"
            )
        try:
            meta = read_json(meta_path)
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version {meta.get('format_version')!r} is not {FORMAT_VERSION}")
            pca_mean = pca_components = None
            if meta["pca_components"] is not None:
                pca_mean = _read_npy(directory / PCA_MEAN_FILE)
                pca_components = _read_npy(directory / PCA_COMPONENTS_FILE)
            model = cls(
                centroids=_read_npy(directory / CENTROIDS_FILE),
                pca_mean=pca_mean,
                pca_components=pca_components,
                engine=str(meta["engine"]),
                init=str(meta["init"]),
                seed=int(meta["seed"]),
                inertia=meta["inertia"],
                n_iter=meta["n_iter"],
            )
            arrays = [model.centroids] + ([model.pca_mean, model.pca_components] if pca_mean is not None else [])
            if not all(np.isfinite(array).all() for array in arrays):
                raise ValueError("arrays hold NaN or inf values")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError) as error:  # "seed": Infinity
            raise ValueError(
                f"{directory}: not a readable cluster model ({error}); delete the folder and cluster again"
            ) from error
        found = (model.num_clusters, model.input_dim, model.output_dim if pca_mean is not None else None)
        expected = (meta["num_clusters"], meta["input_dim"], meta["pca_components"])
        if found != expected:
            raise ValueError(
                f"{directory}: arrays have (num_clusters, input_dim, pca_components) = {found} but {MODEL_FILE} "
                f"says {expected}; the folder mixes files of different saves, fit and save again"
            )
        return model

    def _check_input(self, tensor: Tensor) -> None:
        if tensor.ndim != 2 or tensor.shape[1] != self.input_dim:
            raise ValueError(
                f"embeddings must have shape (N, {self.input_dim}) to match this model, got {tuple(tensor.shape)}; "
                "use embeddings from the same backbone the clusters were fitted on"
            )



def model_digest(directory: Path) -> str:
    """A digest of the saved model's files (what they hold, not when they were written); "" when absent."""
    hasher = hashlib.sha256()
    for name in (MODEL_FILE, CENTROIDS_FILE, PCA_MEAN_FILE, PCA_COMPONENTS_FILE):
        try:
            with open_regular(Path(directory) / name) as stream:
                hasher.update(name.encode() + b"\0" + stream.read())
        except OSError:
            hasher.update(name.encode() + b"\0missing")
    return hasher.hexdigest()[:16]


def _read_npy(path: Path) -> np.ndarray:
    with open_regular(path) as stream:
        return np.load(stream, allow_pickle=False)
