"""The ``torch`` engine: PCA and Lloyd's k-means with tensors, on the embeddings' device.

Under ``torch.distributed`` every rank passes only its own embeddings and only small things
cross ranks (D x D covariance, K x D' sums, K counts, a few scalars and an initialisation
sample), so no process ever holds the whole dataset and all ranks return the same model.
Every random draw derives from the seed, so a rerun reproduces the same clusters.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from datus.clustering.checks import check_data
from datus.clustering.kernels import (
    as_tensor,
    chunk_rows,
    chunks,
    count_nonfinite,
    exact_float32,
    nearest,
    nearest_squared_distances,
    project,
    squared_distances,
    squared_norms,
)
from datus.clustering.model import ClusterModel, Iterations
from datus.collective import Collective
from datus.settings import ClusterSettings

INIT_SAMPLE_MIN = 10_000
INIT_SAMPLE_PER_CLUSTER = 10
STREAM_SAMPLE = 0
STREAM_INIT = 1


def fit_torch(embeddings: np.ndarray | Tensor, settings: ClusterSettings, iterations: Iterations) -> ClusterModel:
    """PCA and Lloyd's k-means with tensors, reducing only small statistics across ranks."""
    num_clusters, init, pca_components, seed = settings.num_clusters, settings.init, settings.pca_components, settings.seed
    tensor, _ = as_tensor(embeddings)
    tensor = tensor.detach()
    device = tensor.device
    group = Collective.current(device)
    if group.world_size > 1 and dist.get_backend() == "nccl" and device.type != "cuda":
        raise ValueError(
            f"embeddings are on {device}, but the NCCL process group only moves CUDA tensors; pass them on this "
            "rank's GPU, e.g. embeddings.to(torch.device('cuda', local_rank))"
        )
    with torch.no_grad(), exact_float32(device):
        counts, dim = _global_counts(tensor, num_clusters, pca_components, group)
        if tensor.shape[0] == 0:
            tensor = tensor.new_zeros((0, dim))
        num_samples = sum(counts)
        pca_mean = components = None
        data = tensor
        if pca_components is not None:
            pca_mean, components = _torch_pca(tensor, pca_components, num_samples, group)
            data = project(tensor, pca_mean, components)
        tolerance = iterations.tol * _mean_variance(data, num_samples, group)
        sample = _gather_init_sample(data, counts, num_clusters, seed, group)
        best: tuple[Tensor, float, int] | None = None
        for run in range(iterations.n_init):
            centroids = _initial_centroids(sample, num_clusters, init, _generator(seed, STREAM_INIT, run))
            # Every rank computed the same thing; the broadcast makes it bit-identical even if
            # kernels differ between devices, so that all ranks run the same iterations.
            centroids = group.broadcast(centroids)
            fitted = lloyd(data, centroids, iterations.max_iter, tolerance, group)
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


def _global_counts(
    tensor: Tensor, num_clusters: int, pca_components: int | None, group: Collective
) -> tuple[list[int], int]:
    """Validate the data of all ranks together and return rows per rank and the dimension.

    Every rank raises the same error from the same gathered numbers, so a bad input on one
    rank stops all of them instead of leaving the others blocked in a collective.
    """
    is_matrix = tensor.ndim == 2
    rows = tensor.shape[0] if is_matrix else 0
    dim = tensor.shape[1] if is_matrix else 0
    local = torch.tensor([int(is_matrix), rows, dim, count_nonfinite(tensor)], dtype=torch.int64)
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
    check_data(sum(counts), dim, int(stats[:, 3].sum()), num_clusters, pca_components)
    return counts, dim


def _torch_pca(tensor: Tensor, num_components: int, num_samples: int, group: Collective) -> tuple[Tensor, Tensor]:
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
    rows = chunk_rows(dim)
    total = torch.zeros(dim, dtype=torch.float64, device=tensor.device)
    for chunk in chunks(tensor, rows):
        total += chunk.sum(0, dtype=torch.float64)
    mean = (group.all_reduce(total) / num_samples).to(torch.float32)
    scatter = torch.zeros(dim, dim, dtype=torch.float64, device=tensor.device)
    for chunk in chunks(tensor, rows):
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


def _mean_variance(data: Tensor, num_samples: int, group: Collective) -> float:
    """Mean per-feature variance of all ranks' data: the scale ``tol`` is relative to."""
    width = data.shape[1]
    moments = torch.zeros(2, width, dtype=torch.float64, device=data.device)
    for chunk in chunks(data, chunk_rows(width)):
        moments[0] += chunk.sum(0, dtype=torch.float64)
        moments[1] += chunk.square().sum(0, dtype=torch.float64)
    moments = group.all_reduce(moments) / num_samples
    return float((moments[1] - moments[0].square()).clamp_min(0).mean())


def _gather_init_sample(data: Tensor, counts: list[int], num_clusters: int, seed: int, group: Collective) -> Tensor:
    """A seeded uniform sample of all ranks' rows, the same on every rank, to initialise from.

    The sample has ``min(N, max(10 K, 10000))`` rows, split between ranks in proportion to
    their row counts so that it stays uniform over the whole dataset when ranks hold unequal
    shares. Each rank draws its share with its own seeded stream; shares are padded to one
    length for ``all_gather`` and trimmed again.
    """
    num_samples = sum(counts)
    budget = min(num_samples, max(INIT_SAMPLE_PER_CLUSTER * num_clusters, INIT_SAMPLE_MIN))
    quotas = _proportional_quotas(counts, budget)
    quota = quotas[group.rank]
    order = torch.randperm(data.shape[0], generator=_generator(seed, STREAM_SAMPLE, group.rank))[:quota]
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
    sample_norms = squared_norms(sample)
    centroids = sample.new_empty((num_clusters, sample.shape[1]))
    first = int(torch.randint(num_rows, (1,), generator=generator))
    centroids[0] = sample[first]
    closest = squared_distances(sample[first : first + 1], sample, sample_norms)[0]
    for index in range(1, num_clusters):
        cumulative = closest.to(torch.float64).cumsum(0)
        targets = torch.rand(trials, generator=generator, dtype=torch.float64).to(device) * cumulative[-1]
        candidates = torch.searchsorted(cumulative, targets).clamp_max(num_rows - 1)
        distances = torch.minimum(closest[None], squared_distances(sample[candidates], sample, sample_norms))
        best = distances.to(torch.float64).sum(1).argmin()
        closest = distances[best]
        centroids[index] = sample[candidates[best]]
    return centroids


def lloyd(
    data: Tensor, centroids: Tensor, max_iter: int, tolerance: float, group: Collective
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
    rows = chunk_rows(max(num_clusters, width))
    cluster_ids = torch.arange(num_clusters, device=data.device)
    iteration = 0
    for iteration in range(1, max_iter + 1):
        centroid_norms = squared_norms(centroids)
        packed = torch.zeros(num_clusters * (width + 1), dtype=torch.float64, device=data.device)
        sums = packed[: num_clusters * width].view(num_clusters, width)
        sizes = packed[num_clusters * width :]
        for chunk in chunks(data, rows):
            labels = nearest(chunk, centroids, centroid_norms)
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


def _farthest_points(data: Tensor, centroids: Tensor, count: int, rows: int, group: Collective) -> Tensor:
    """The ``count`` points farthest from their nearest centroid over all ranks, to re-seed empty clusters.

    Distances are recomputed here rather than kept from the assignment pass: empty clusters
    are rare, and the common pass then needs neither ``|x|^2`` nor an N-sized buffer. Each
    rank offers its own ``count`` farthest points (padded with -inf distances when it has
    fewer); after gathering them, every rank keeps the same ``count`` largest distances,
    ties going to the lower rank, then to the lower row.
    """
    centroid_norms = squared_norms(centroids)
    local_distances = torch.empty(data.shape[0], dtype=torch.float32, device=data.device)
    for start, chunk in zip(range(0, data.shape[0], rows), chunks(data, rows), strict=True):
        local_distances[start : start + rows] = nearest_squared_distances(chunk, centroids, centroid_norms)
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


def _inertia(data: Tensor, centroids: Tensor, rows: int, group: Collective) -> float:
    """Sum over all ranks of squared distances to the nearest centroid."""
    centroid_norms = squared_norms(centroids)
    total = torch.zeros(1, dtype=torch.float64, device=data.device)
    for chunk in chunks(data, rows):
        total += nearest_squared_distances(chunk, centroids, centroid_norms).sum(dtype=torch.float64)
    return float(group.all_reduce(total))



def _generator(seed: int, stream: int, index: int) -> torch.Generator:
    """A CPU generator for one independent random stream derived from ``seed``.

    ``SeedSequence`` mixes (seed, stream, index) so that, e.g., rank 1 of seed 0 and rank 0 of
    seed 1 do not draw the same numbers, as they would with ``seed + rank``.
    """
    state = np.random.SeedSequence([seed, stream, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))

