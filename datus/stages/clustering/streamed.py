"""Stage 6 out of core: PCA and k-means that read their data in chunks, for both engines.

The data is a :class:`Rows` table (an in-memory array, or the run's fp16 segment table mapped
from disk), read a chunk at a time in float32 and projected by the PCA on the fly, so host
memory is bounded by a chunk and a bounded sample, never by the number of segments. Every
pass is a sum: under ``torch.distributed`` each rank streams only its own rows and only small
things cross ranks (D x D scatter, K x D' sums, K counts, a few scalars and the sample).

The engines differ only where they should:

- ``sklearn``: one process on the CPU; initialisation by scikit-learn (``kmeans_plusplus`` or
  random rows) on the sample, then Lloyd's iterations over the stream, or scikit-learn's
  ``MiniBatchKMeans.partial_fit`` over seeded mini-batches of the stream (``--cluster.minibatch``).
- ``torch``: every rank, on the device; greedy k-means++ (scikit-learn's rule) on the sample.

Determinism: the initialisation sample is the rows with the smallest seeded keys (a hash of
each segment's image id and segment number), sorted by key, so it is the same whatever the
order of the rows and however they are spread over ranks. Cluster sums are accumulated in
float64, in which sums of fp16 embeddings are exact, so without PCA the iterations, and the
model, do not depend on the order or the split either, short of two limits of floating point:
a point equidistant to two centroids to the last bit may be assigned differently by matrix
products of other shapes, and the stopping threshold (a variance) is not an exact sum.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from datus.stages.clustering.checks import check_data
from datus.stages.clustering.kernels import (
    as_tensor,
    chunk_rows,
    count_nonfinite,
    exact_float32,
    nearest,
    nearest_squared_distances,
    squared_distances,
    squared_norms,
)
from datus.stages.clustering.model import ClusterModel, Iterations
from datus.core.collective import Collective
from datus.runfolder.records import splitmix64
from datus.core.workers import available_cores
from datus.core.settings import ClusterSettings

SAMPLE_MIN = 10_000
"""Fewest rows of the initialisation (and stability) sample, when the data has that many."""
SAMPLE_PER_CLUSTER = 50
"""Sample rows per cluster beyond :data:`SAMPLE_MIN` (faiss subsamples to 256 per centroid to *fit*;
50 are plenty to initialise from)."""
STREAM_CHUNK_ELEMENTS = 1 << 23
"""Most float32 elements (32 MiB) of one chunk of a streamed table."""
STREAM_INIT = 1
STREAM_MINIBATCH = 2


def seeded_keys(keys: np.ndarray, seed: int) -> np.ndarray:
    """Per-row sampling keys for ``seed``: another seed draws an independent sample."""
    salt = splitmix64(np.array([(seed + 0x9E3779B97F4A7C15) % 2**64], dtype=np.uint64))[0]
    return splitmix64(np.asarray(keys, dtype=np.uint64) ^ salt)


class Rows:
    """An N x D table read in float32 chunks on a device, optionally through a PCA projection.

    Args:
        table: the rows (CPU tensor or numpy array, any float dtype; a memory map stays on disk).
        keys: N uint64 identities of the rows (same row, same key, wherever it is stored).
        device: where chunks are computed.
    """

    def __init__(self, table: np.ndarray | Tensor, keys: np.ndarray, device: torch.device) -> None:
        self.table, _ = as_tensor(table)  # a memory map is wrapped, not copied
        self.keys = keys
        self.device = device
        self.mean: Tensor | None = None
        self.components: Tensor | None = None

    def projected(self, mean: Tensor, components: Tensor) -> Rows:
        """The same rows seen through ``(x - mean) @ components^T``."""
        view = Rows(self.table, self.keys, self.device)
        view.mean, view.components = mean, components
        return view

    def __len__(self) -> int:
        return int(self.table.shape[0])

    @property
    def width(self) -> int:
        return int(self.components.shape[0] if self.components is not None else self.table.shape[1])

    def chunk_size(self, extra_width: int = 0) -> int:
        """Rows per chunk, so that a chunk and an ``extra_width``-wide temporary stay under 32 MiB each
        (several threads each hold one)."""
        return chunk_rows(max(self.width, int(self.table.shape[1]), extra_width), STREAM_CHUNK_ELEMENTS)

    def chunks(self, extra_width: int = 0) -> Iterator[Tensor]:
        """Consecutive float32 chunks of :meth:`chunk_size` rows."""
        rows = self.chunk_size(extra_width)
        for start in range(0, len(self), rows):
            yield self.block(start, start + rows)

    def block(self, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` in float32 on the device."""
        return self._float32(self.table[start:stop])

    def take(self, index: np.ndarray) -> Tensor:
        """Rows ``index`` (sorted or not), in float32 on the device."""
        return self._float32(self.table[torch.as_tensor(index, dtype=torch.int64)])

    def _float32(self, block: Tensor) -> Tensor:
        block = block.to(self.device, torch.float32)
        if self.mean is not None and self.components is not None:
            block = (block - self.mean) @ self.components.T
        return block


def fit_streamed(rows: Rows, settings: ClusterSettings, iterations: Iterations, group: Collective) -> ClusterModel:
    """PCA then k-means over ``rows`` (this rank's share), as ``settings.engine`` says.

    Returns:
        The fitted model, the same on every rank.
    """
    num_clusters, pca_components, seed = settings.num_clusters, settings.pca_components, settings.seed
    with torch.no_grad(), exact_float32(rows.device):
        counts, dim = _global_counts(rows, num_clusters, pca_components, group)
        if not len(rows):  # a rank without rows still takes part in every sum, with D-wide zeros
            rows = Rows(rows.table.new_zeros((0, dim)), rows.keys[:0], rows.device)
        num_samples = sum(counts)
        pca_mean = components = None
        data = rows
        if pca_components is not None:
            pca_mean, components = _pca(rows, pca_components, num_samples, group)
            data = rows.projected(pca_mean, components)
        tolerance = iterations.tol * _mean_variance(data, num_samples, group)
        sample = draw_sample(data, sample_size(num_samples, num_clusters), seed, group)
        best: tuple[Tensor, float, int] | None = None
        state = np.random.RandomState(seed)  # scikit-learn draws every initialisation from one state
        for run in range(iterations.n_init):
            if settings.engine == "sklearn":
                centroids = _sklearn_initial_centroids(sample, num_clusters, settings.init, state)
            else:
                centroids = _initial_centroids(sample, num_clusters, settings.init, _generator(seed, STREAM_INIT, run))
            # Every rank computed the same thing; the broadcast makes it bit-identical even if
            # kernels differ between devices, so that all ranks run the same iterations.
            centroids = group.broadcast(centroids)
            if settings.minibatch:
                fitted = minibatch(data, centroids, sample, iterations, tolerance, _generator(seed, STREAM_MINIBATCH, run))
            else:
                fitted = lloyd(data, centroids, iterations.max_iter, tolerance, group)
            if best is None or fitted[1] < best[1]:
                best = fitted
    assert best is not None
    return ClusterModel(
        centroids=best[0].cpu().numpy(),
        pca_mean=None if pca_mean is None else pca_mean.cpu().numpy(),
        pca_components=None if components is None else components.cpu().numpy(),
        engine=settings.engine,
        init=settings.init,
        seed=seed,
        inertia=best[1],
        n_iter=best[2],
    )


def sample_size(num_samples: int, num_clusters: int) -> int:
    """Rows of the initialisation sample: all rows up to :data:`SAMPLE_MIN`, then a bounded share."""
    return min(num_samples, max(SAMPLE_PER_CLUSTER * num_clusters, SAMPLE_MIN))


def _global_counts(
    rows: Rows, num_clusters: int, pca_components: int | None, group: Collective
) -> tuple[list[int], int]:
    """Validate the data of all ranks together; rows per rank and the dimension.

    Every rank raises the same error from the same gathered numbers, so a bad input on one
    rank stops all of them instead of leaving the others blocked in a collective.
    """
    table = rows.table
    is_matrix = table.ndim == 2
    local_rows = table.shape[0] if is_matrix else 0
    dim = table.shape[1] if is_matrix else 0
    nonfinite = sum(count_nonfinite(chunk) for chunk in rows.chunks()) if is_matrix and local_rows else 0
    local = torch.tensor([int(is_matrix), local_rows, dim, nonfinite], dtype=torch.int64)
    stats = torch.stack(group.all_gather(local.to(group.device))).cpu()
    not_matrix = [rank for rank in range(group.world_size) if not stats[rank, 0]]
    if not_matrix:
        where = f"; rank(s) {not_matrix} passed another shape" if group.world_size > 1 else ""
        raise ValueError(f"embeddings must be a 2-D (num_segments x dim) array, got shape {tuple(table.shape)}{where}")
    counts = stats[:, 1].tolist()
    dims = sorted({int(stats[rank, 2]) for rank in range(group.world_size) if counts[rank] > 0})
    if len(dims) > 1:
        raise ValueError(
            f"ranks hold embeddings of different dimensions {dims}; every rank must pass embeddings of the same backbone"
        )
    dim = dims[0] if dims else int(stats[:, 2].max())
    check_data(sum(counts), dim, int(stats[:, 3].sum()), num_clusters, pca_components)
    return counts, dim


def _pca(rows: Rows, num_components: int, num_samples: int, group: Collective) -> tuple[Tensor, Tensor]:
    """Principal components from all-reduced first and second moments (scikit-learn's ``covariance_eigh``).

    Two passes (mean, then the centred D x D scatter) instead of one raw ``sum x x^T``: the
    embeddings share a large mean direction, and subtracting ``mean mean^T`` afterwards
    would cancel most of the float precision. Chunks are multiplied in float32 and summed
    in float64. Components come in descending eigenvalue order with the sign that makes each
    component's largest-magnitude entry positive (scikit-learn's rule), so that the result
    does not depend on the eigen solver.

    Returns:
        ``(mean, components)``: D and D' x D float32, identical on every rank.
    """
    dim = rows.width
    total = stream_sum(rows, lambda chunk: chunk.sum(0, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64, device=rows.device))
    mean = (group.all_reduce(total.to(rows.device)) / num_samples).to(torch.float32)

    def scatter_of(chunk: Tensor) -> Tensor:
        centred = chunk - mean
        return (centred.T @ centred).to(torch.float64)

    scatter = stream_sum(rows, scatter_of, torch.zeros(dim, dim, dtype=torch.float64, device=rows.device))
    covariance = group.all_reduce(scatter.to(rows.device)) / num_samples
    _, eigenvectors = torch.linalg.eigh(covariance)
    components = eigenvectors.flip(-1)[:, :num_components].T
    largest = components.abs().argmax(1)
    signs = torch.sign(components[torch.arange(num_components, device=rows.device), largest])
    components = (components * signs[:, None]).to(torch.float32)
    # eigh of a nearly degenerate spectrum is sensitive to the last bit; take rank 0's.
    packed = group.broadcast(torch.cat([mean[None], components]))
    return packed[0], packed[1:]


def _mean_variance(rows: Rows, num_samples: int, group: Collective) -> float:
    """Mean per-feature variance of all ranks' data: the scale ``tol`` is relative to."""
    def moments_of(chunk: Tensor) -> Tensor:
        return torch.stack([chunk.sum(0, dtype=torch.float64), chunk.square().sum(0, dtype=torch.float64)])

    moments = stream_sum(rows, moments_of, torch.zeros(2, rows.width, dtype=torch.float64, device=rows.device))
    moments = group.all_reduce(moments.to(rows.device)) / num_samples
    return float((moments[1] - moments[0].square()).clamp_min(0).mean())


def draw_sample(rows: Rows, size: int, seed: int, group: Collective) -> Tensor:
    """The ``size`` rows of all ranks with the smallest seeded keys, sorted by key, on every rank.

    The choice and the order depend only on the rows' keys and the seed, not on where rows are
    stored, so a 1-rank and an N-rank fit start from the same sample. Memory: ``size`` keys
    and rows per rank.
    """
    local_keys = _smallest_keys(rows.keys, size, seed)
    padded = np.full(size, np.iinfo(np.uint64).max, dtype=np.uint64)
    padded[: len(local_keys)] = np.sort(local_keys)
    gathered = group.all_gather(torch.from_numpy(padded.view(np.int64)).to(group.device))
    every = np.sort(np.concatenate([key.cpu().numpy().view(np.uint64) for key in gathered]))
    threshold = every[size - 1] if size else np.uint64(0)
    mine = _rows_at_most(rows.keys, seed, threshold) if size else np.zeros(0, np.int64)
    chosen_keys = seeded_keys(rows.keys[mine], seed)
    most = max(int(count) for count in group.all_gather(torch.tensor([len(mine)], device=group.device)))
    block = torch.zeros((most, rows.width), dtype=torch.float32, device=rows.device)
    block[: len(mine)] = rows.take(mine) if len(mine) else block[:0]
    key_block = np.full(most, np.iinfo(np.uint64).max, dtype=np.uint64)
    key_block[: len(mine)] = chosen_keys
    blocks = group.all_gather(block)
    key_blocks = [key.cpu().numpy().view(np.uint64) for key in group.all_gather(torch.from_numpy(key_block.view(np.int64)).to(group.device))]
    sample = torch.cat(blocks)
    keys = np.concatenate(key_blocks)
    order = np.argsort(keys, kind="stable")[:size]
    return sample[torch.as_tensor(order, device=sample.device)]


def _rows_at_most(keys: np.ndarray, seed: int, threshold: np.uint64) -> np.ndarray:
    """Indices of the rows whose seeded key is at most ``threshold``, read in blocks."""
    block = 1 << 20
    found = [start + np.flatnonzero(seeded_keys(keys[start : start + block], seed) <= threshold) for start in range(0, len(keys), block)]
    return np.concatenate(found) if found else np.zeros(0, np.int64)


def _smallest_keys(keys: np.ndarray, size: int, seed: int) -> np.ndarray:
    """The ``size`` smallest seeded keys of ``keys``, read in blocks (a memory map stays on disk)."""
    best = np.zeros(0, dtype=np.uint64)
    block = 1 << 20
    for start in range(0, len(keys), block):
        merged = np.concatenate([best, seeded_keys(keys[start : start + block], seed)])
        best = merged if len(merged) <= size else np.partition(merged, size - 1)[:size]
    return best


def _sklearn_initial_centroids(sample: Tensor, num_clusters: int, init: str, state: np.random.RandomState) -> Tensor:
    """scikit-learn's initialisation on the sample: its ``kmeans_plusplus``, or random distinct rows."""
    points = sample.cpu().numpy()
    if init == "random":
        chosen = points[state.permutation(len(points))[:num_clusters]]
    else:
        from sklearn.cluster import kmeans_plusplus

        chosen, _ = kmeans_plusplus(points, num_clusters, random_state=state)
    return torch.from_numpy(np.ascontiguousarray(chosen, dtype=np.float32)).to(sample.device)


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


def lloyd(data: Rows, centroids: Tensor, max_iter: int, tolerance: float, group: Collective) -> tuple[Tensor, float, int]:
    """Lloyd iterations over the stream, per-cluster sums and counts all-reduced in one float64 tensor.

    A cluster that ends up empty is re-seeded with the point farthest from its centroid (see
    :func:`_farthest_points`), never left as NaN.

    Returns:
        ``(centroids, inertia, iterations)``; the inertia is measured against the returned centroids.
    """
    num_clusters, width = centroids.shape
    iteration = 0
    for iteration in range(1, max_iter + 1):
        centroid_norms = squared_norms(centroids)

        def sums_of(chunk: Tensor) -> Tensor:
            packed = torch.zeros(num_clusters * (width + 1), dtype=torch.float64, device=centroids.device)
            labels = nearest(chunk, centroids, centroid_norms)
            add_cluster_sums(packed[: num_clusters * width].view(num_clusters, width), labels, chunk)
            packed[num_clusters * width :] += torch.bincount(labels, minlength=num_clusters).to(torch.float64)
            return packed

        zero = torch.zeros(num_clusters * (width + 1), dtype=torch.float64, device=centroids.device)
        packed = group.all_reduce(stream_sum(data, sums_of, zero, num_clusters))
        sums = packed[: num_clusters * width].view(num_clusters, width)
        sizes = packed[num_clusters * width :]
        updated = torch.where(sizes[:, None] > 0, sums / sizes.clamp_min(1)[:, None], centroids.to(torch.float64))
        updated = updated.to(torch.float32)
        empty = torch.nonzero(sizes == 0).flatten()
        if len(empty):
            updated[empty] = _farthest_points(data, centroids, len(empty), group)
        shift = float((updated - centroids).to(torch.float64).square().sum())
        centroids = updated
        if shift <= tolerance:
            break
    return centroids, inertia(data, centroids, group), iteration


def stream_sum(data: Rows, function: Callable[[Tensor], Tensor], zero: Tensor, extra_width: int = 0) -> Tensor:
    """``zero + sum of function(chunk)`` over every chunk of ``data``, on all CPU threads.

    On the CPU, thread ``t`` of ``T`` (one per core) takes chunks ``t, t + T, ...``
    with torch's own threading off, and the partial sums are added in thread order: the result
    is deterministic for a given ``T``, and, for the exact float64 sums of fp16 rows, the same for
    every ``T``. On an accelerator one thread feeds the device.
    """
    rows = data.chunk_size(extra_width)
    starts = list(range(0, len(data), rows))
    threads = max(1, min(available_cores() if data.device.type == "cpu" else 1, len(starts)))

    stop = threading.Event()  # set when the caller stops (an error, a signal): threads end after their chunk

    def part(first: int) -> Tensor:
        total = zero.clone()
        for start in starts[first::threads]:
            if stop.is_set():
                break
            total += function(data.block(start, start + rows))
        return total

    if threads == 1:
        return part(0)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's own pool would fight these threads for the same cores
    try:
        with ThreadPoolExecutor(threads) as pool:
            futures = [pool.submit(part, first) for first in range(threads)]
            try:
                partials = [future.result() for future in futures]
            except BaseException:
                stop.set()
                raise
    finally:
        torch.set_num_threads(previous)
    return functools.reduce(torch.add, partials)


def add_cluster_sums(sums: Tensor, labels: Tensor, chunk: Tensor) -> None:
    """Add each row of ``chunk`` to its cluster's float64 sum, deterministically.

    On the CPU the rows are grouped by cluster and each group summed with float64 accumulation
    (3x faster than ``index_add_`` on a float64 copy); on an accelerator a one-hot product, since
    ``index_add_``'s atomics would make the sums depend on thread timing.
    """
    if chunk.device.type == "cpu":
        sizes = torch.bincount(labels, minlength=sums.shape[0])
        grouped = chunk[torch.argsort(labels, stable=True)]
        for cluster, members in zip(torch.nonzero(sizes).flatten().tolist(), torch.split(grouped, sizes[sizes > 0].tolist())):
            sums[cluster] += members.sum(0, dtype=torch.float64)
        return
    one_hot = torch.arange(sums.shape[0], device=chunk.device)[:, None] == labels[None]
    sums += one_hot.to(torch.float64) @ chunk.to(torch.float64)


def minibatch(
    data: Rows, centroids: Tensor, sample: Tensor, iterations: Iterations, tolerance: float, generator: torch.Generator
) -> tuple[Tensor, float, int]:
    """scikit-learn's ``MiniBatchKMeans.partial_fit`` over seeded mini-batches of the stream (one process).

    The first batch is the initialisation sample (scikit-learn's first ``partial_fit`` needs at
    least K rows, which a short last chunk or K above the batch size would not give). Then each
    epoch visits the chunks in a seeded order and each chunk's rows in a seeded order,
    ``iterations.batch_size`` at a time; it stops once an epoch moves the centroids by at most
    ``tolerance`` (Lloyd's rule) or after ``iterations.max_iter`` epochs.
    """
    from sklearn.cluster import MiniBatchKMeans

    estimator = MiniBatchKMeans(
        n_clusters=centroids.shape[0], init=centroids.cpu().numpy(), n_init=1, batch_size=iterations.batch_size,
        random_state=int(torch.randint(2**31 - 1, (1,), generator=generator)),
    )  # fmt: skip
    estimator.partial_fit(sample.cpu().numpy())
    current = estimator.cluster_centers_.astype(np.float64)
    rows = data.chunk_size(centroids.shape[0])
    starts = torch.arange(0, len(data), rows)
    epoch = 0
    for epoch in range(1, iterations.max_iter + 1):
        for start in starts[torch.randperm(len(starts), generator=generator)].tolist():
            block = data.block(start, start + rows)
            order = torch.randperm(block.shape[0], generator=generator)
            for first in range(0, block.shape[0], iterations.batch_size):
                estimator.partial_fit(block[order[first : first + iterations.batch_size]].cpu().numpy())
        updated = estimator.cluster_centers_.astype(np.float64)
        shift = float(np.square(updated - current).sum())
        current = updated
        if shift <= tolerance:
            break
    fitted = torch.from_numpy(estimator.cluster_centers_.astype(np.float32)).to(centroids.device)
    return fitted, inertia(data, fitted, Collective(0, 1, centroids.device)), epoch


def _farthest_points(data: Rows, centroids: Tensor, count: int, group: Collective) -> Tensor:
    """The ``count`` points farthest from their nearest centroid over all ranks, to re-seed empty clusters.

    Each rank offers its own ``count`` farthest points (padded with -inf distances when it has
    fewer); after gathering them, every rank keeps the same ``count`` largest distances, ties
    going to the lower rank, then to the lower row.
    """
    centroid_norms = squared_norms(centroids)
    best = torch.zeros(0, dtype=torch.float32)
    best_rows = torch.zeros(0, dtype=torch.int64)
    rows = data.chunk_size(centroids.shape[0])
    for start in range(0, len(data), rows):  # a running top-count: memory does not grow with the rows
        found = nearest_squared_distances(data.block(start, start + rows), centroids, centroid_norms).cpu()
        merged = torch.cat([best, found])
        merged_rows = torch.cat([best_rows, torch.arange(start, start + len(found))])
        order = torch.sort(merged, descending=True, stable=True).indices[:count]
        best, best_rows = merged[order], merged_rows[order]
    local = len(best)
    distances = torch.full((count,), -math.inf, dtype=torch.float32, device=centroids.device)
    points = torch.zeros((count, data.width), dtype=torch.float32, device=centroids.device)
    if local:
        distances[:local] = best.to(centroids.device)
        points[:local] = data.take(best_rows.numpy())
    all_distances = torch.cat(group.all_gather(distances))
    all_points = torch.cat(group.all_gather(points))
    chosen = torch.sort(all_distances, descending=True, stable=True).indices[:count]
    return all_points[chosen]


def inertia(data: Rows, centroids: Tensor, group: Collective) -> float:
    """Sum over all ranks of squared distances to the nearest centroid."""
    centroid_norms = squared_norms(centroids)
    total = stream_sum(
        data,
        lambda chunk: nearest_squared_distances(chunk, centroids, centroid_norms).sum(dtype=torch.float64)[None],
        torch.zeros(1, dtype=torch.float64, device=centroids.device),
        centroids.shape[0],
    )
    return float(group.all_reduce(total))


def _generator(seed: int, stream: int, index: int) -> torch.Generator:
    """A CPU generator for one independent random stream derived from ``seed``.

    ``SeedSequence`` mixes (seed, stream, index) so that, e.g., run 1 of seed 0 and run 0 of
    seed 1 do not draw the same numbers, as they would with ``seed + run``.
    """
    state = np.random.SeedSequence([seed, stream, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def check_backend(device: torch.device, group: Collective) -> None:
    """NCCL moves only CUDA tensors: refuse CPU data under it with the fix."""
    if group.world_size > 1 and dist.get_backend() == "nccl" and device.type != "cuda":
        raise ValueError(
            f"embeddings are on {device}, but the NCCL process group only moves CUDA tensors; pass them on this "
            "rank's GPU, e.g. embeddings.to(torch.device('cuda', local_rank))"
        )
