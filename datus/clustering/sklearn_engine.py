"""The ``sklearn`` engine: scikit-learn's PCA and (MiniBatch)KMeans in one process.

It is the reference the paper used; the caller gathers every embedding into this process first.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from datus.clustering.checks import check_data
from datus.clustering.kernels import as_tensor, count_nonfinite, exact_float32, project
from datus.clustering.model import ClusterModel, Iterations
from datus.settings import ClusterSettings


def fit_sklearn(embeddings: np.ndarray | Tensor, settings: ClusterSettings, iterations: Iterations) -> ClusterModel:
    """PCA then (MiniBatch)KMeans from scikit-learn, in this process."""
    num_clusters, init, pca_components, seed = settings.num_clusters, settings.init, settings.pca_components, settings.seed
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from sklearn.decomposition import PCA

    tensor, _ = as_tensor(embeddings)
    if tensor.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D (num_segments x dim) array, got shape {tuple(tensor.shape)}")
    tensor = tensor.detach().to("cpu", torch.float32)
    check_data(tensor.shape[0], tensor.shape[1], count_nonfinite(tensor), num_clusters, pca_components)
    data = tensor.numpy()
    pca_mean = components = None
    if pca_components is not None:
        # covariance_eigh is exact and deterministic, and for N >> D it costs one D x D
        # covariance instead of an SVD of the whole N x D matrix.
        pca = PCA(n_components=pca_components, whiten=False, svd_solver="covariance_eigh", random_state=seed)
        pca.fit(data)
        pca_mean = pca.mean_.astype(np.float32)
        components = pca.components_.astype(np.float32)
        with torch.no_grad(), exact_float32(torch.device("cpu")):
            data = project(torch.from_numpy(data), torch.from_numpy(pca_mean), torch.from_numpy(components)).numpy()
    if settings.minibatch:
        estimator: KMeans | MiniBatchKMeans = MiniBatchKMeans(
            n_clusters=num_clusters,
            init=init,
            n_init=iterations.n_init,
            max_iter=iterations.max_iter,
            tol=iterations.tol,
            batch_size=iterations.batch_size,
            random_state=seed,
        )
    else:
        estimator = KMeans(
            n_clusters=num_clusters,
            init=init,
            n_init=iterations.n_init,
            max_iter=iterations.max_iter,
            tol=iterations.tol,
            random_state=seed,
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

