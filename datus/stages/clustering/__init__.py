"""Stage 6: optional PCA, then k-means over segment embeddings, deterministic given a seed.

Both engines stream their data in chunks (:mod:`datus.stages.clustering.streamed`), so memory is
bounded by a chunk and a bounded initialisation sample, whatever the number of segments:

- ``sklearn``: one process on the CPU, scikit-learn's initialisation and ``MiniBatchKMeans``.
- ``torch``: Lloyd's algorithm with tensors on any device, reducing only sums and counts
  across ``torch.distributed`` ranks.

Both compute distances in true float32 (:mod:`datus.stages.clustering.kernels`) and derive every
random draw from the seed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from datus.stages.clustering.kernels import as_tensor
from datus.stages.clustering.model import ClusterModel, Iterations
from datus.stages.clustering.streamed import Rows, check_backend, fit_streamed
from datus.core.collective import Collective
from datus.runfolder.records import splitmix64
from datus.core.settings import ClusterSettings

__all__ = ["ClusterModel", "Iterations", "Rows", "fit_clusters", "fit_rows"]


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
        embeddings: N x D array or tensor, any floating dtype (computed in float32, a chunk at a
            time: a memory-mapped array stays on disk). With the torch engine under
            ``torch.distributed``, each rank passes only its own rows (a rank may pass none) on
            its own device (CUDA with NCCL).
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
    tensor, _ = as_tensor(embeddings)
    tensor = tensor.detach()
    group = _group_of(settings, tensor.device)
    check_backend(tensor.device, group)
    rows = tensor.shape[0] if tensor.ndim == 2 else 0
    counts = [int(count) for count in group.all_gather(torch.tensor([rows], device=group.device))]
    offset = sum(counts[: group.rank])  # a row's key is its index in the ranks' rows laid end to end
    keys = splitmix64(np.arange(offset, offset + rows, dtype=np.uint64))
    device = tensor.device if settings.engine == "torch" else torch.device("cpu")
    return fit_rows(Rows(tensor, keys, device), settings, Iterations(max_iter, tol, n_init, batch_size))


def fit_rows(rows: Rows, settings: ClusterSettings, iterations: Iterations | None = None) -> ClusterModel:
    """:func:`fit_clusters` on a :class:`Rows` table (e.g. a run's segment table mapped from disk)."""
    return fit_streamed(rows, settings, iterations or Iterations(), _group_of(settings, rows.device))


def _group_of(settings: ClusterSettings, device: torch.device) -> Collective:
    """The ranks that fit together: all of them for ``torch``, this process alone for ``sklearn``."""
    return Collective.current(device) if settings.engine == "torch" else Collective(0, 1, torch.device("cpu"))
