"""Stage 6: optional PCA, then k-means over segment embeddings, deterministic given a seed.

Two engines produce the same kind of :class:`ClusterModel`:

- ``sklearn`` (:mod:`datus.clustering.sklearn_engine`): scikit-learn in one process, the
  paper's tools.
- ``torch`` (:mod:`datus.clustering.torch_engine`): Lloyd's algorithm with tensors on any
  device, reducing only sums and counts across ``torch.distributed`` ranks.

Both compute distances in true float32 and in chunks (:mod:`datus.clustering.kernels`), and
derive every random draw from the seed.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from datus.clustering.model import ClusterModel, Iterations
from datus.settings import ClusterSettings

__all__ = ["ClusterModel", "Iterations", "fit_clusters"]


def fit_clusters(
    embeddings: np.ndarray | Tensor,
    settings: ClusterSettings,
    *,
    max_iter: int = 300,
    tol: float = 1e-4,
    n_init: int = 1,
    batch_size: int = 4096,
) -> ClusterModel:
    """Cluster L2-normalised segment embeddings as ``settings`` say.

    Args:
        embeddings: N x D array or tensor, any floating dtype (computed in float32). With the
            torch engine under ``torch.distributed``, each rank passes only its own rows (a rank
            may pass none) on its own device (CUDA with NCCL).
        settings: K, engine, initialisation, PCA, mini-batches and seed (validated on creation).
        max_iter: most Lloyd iterations (epochs with mini-batches) per initialisation.
        tol: stop once the summed squared centroid shift is at most ``tol`` times the mean
            per-feature variance of the clustered data (scikit-learn's convention, used by both
            engines so that ``tol`` means the same thing).
        n_init: initialisations to run; the one with the lowest inertia is kept.
        batch_size: mini-batch size of MiniBatchKMeans.

    Returns:
        The fitted model; under ``torch.distributed`` every rank gets the same one.

    Raises:
        ValueError: empty input, non-finite values, K larger than the number of embeddings,
            more PCA components than features or samples, or bad iteration settings.
    """
    iterations = Iterations(max_iter, tol, n_init, batch_size)
    if settings.engine == "sklearn":
        from datus.clustering.sklearn_engine import fit_sklearn

        return fit_sklearn(embeddings, settings, iterations)
    from datus.clustering.torch_engine import fit_torch

    return fit_torch(embeddings, settings, iterations)
