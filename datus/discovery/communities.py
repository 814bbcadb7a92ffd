"""CPU side of segment discovery: Louvain communities and their 8-connected components.

Louvain is sequential CPU code, so beside an accelerator it runs in a pool of worker processes
while the device carries on. Two engines give the same partitions: ``fast`` (:mod:`datus.discovery.louvain`)
and ``sknetwork`` (scikit-network's ``Louvain``, the reference it is tested against). This module
imports only numpy and scipy (and the engine), so workers start quickly, and everything crossing
the process boundary is a small numpy array (the adjacency travels bit-packed: N*N/8 bytes per
image).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from datus.core.workers import exit_with_parent

LouvainEngine = Literal["fast", "sknetwork"]


@dataclass(frozen=True)
class SegmentPartition:
    """Every patch of one image assigned to exactly one segment.

    Attributes:
        segment_map: h x w int32, segment ids 0..S-1 numbered by first appearance in raster order.
        sizes: S patch counts.
        is_noise: S flags; a segment of at most ``min_patches`` patches is noise.
        cpu_seconds: (Louvain, components and modularity) seconds spent in the worker, for benchmarks.
        modularity: modularity of the Louvain communities (before the split into segments) on
            the patch graph, a label-free measure of how clearly the graph has communities;
            NaN when not measured.
    """

    segment_map: np.ndarray
    sizes: np.ndarray
    is_noise: np.ndarray
    cpu_seconds: tuple[float, float] = (0.0, 0.0)
    modularity: float = float("nan")


def louvain_communities(adjacency: np.ndarray, resolution: float = 1.0, engine: LouvainEngine = "fast") -> np.ndarray:
    """Community label per node by Louvain modularity maximisation (deterministic: no shuffling).

    Args:
        adjacency: N x N boolean adjacency (self-loops included).
        resolution: modularity resolution.
        engine: ``fast`` or ``sknetwork``; both give the same partition.
    """
    if engine == "fast":
        from datus.discovery.louvain import louvain

        return louvain(adjacency, resolution)
    from sknetwork.clustering import Louvain

    graph = sparse.csr_matrix(adjacency, dtype=np.float64)
    return np.asarray(Louvain(resolution=resolution).fit_predict(graph), dtype=np.int64)


_MODULARITY_ROWS = 512
"""Adjacency rows per block when modularity counts the edge weight inside communities."""


def modularity(adjacency: np.ndarray, labels: np.ndarray, resolution: float = 1.0) -> float:
    """Newman modularity of a partition, computed as ``sknetwork.clustering.get_modularity`` does.

    ``Q = fit - resolution * diversity``: ``fit`` is the share of the total edge weight ``w``
    (every entry of A, a self-loop counted once) that lies inside communities, ``diversity`` is
    ``sum_c (out-weight of c / w) (in-weight of c / w)``. Louvain maximises exactly this, so it
    says how much community structure the patch graph had: near 0 means none.

    Args:
        adjacency: N x N adjacency, boolean or weighted (self-loops included).
        labels: N community labels 0..C-1.
        resolution: the resolution Louvain ran with.

    Returns:
        Q; 0.0 for a graph without edges (no structure to measure).
    """
    labels = np.asarray(labels).ravel()
    total = float(adjacency.sum(dtype=np.float64))
    if total == 0:
        return 0.0
    inside = 0.0
    for start in range(0, len(labels), _MODULARITY_ROWS):  # rows in blocks: no N x N temporary
        rows = slice(start, start + _MODULARITY_ROWS)
        inside += float((adjacency[rows] * (labels[rows, None] == labels[None, :])).sum(dtype=np.float64))
    out_share = np.bincount(labels, weights=adjacency.sum(axis=1, dtype=np.float64)) / total
    in_share = np.bincount(labels, weights=adjacency.sum(axis=0, dtype=np.float64)) / total
    return inside / total - resolution * float(out_share @ in_share)


def _grid_neighbour_pairs(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs of 8-connected neighbours on an h x w grid (each pair once)."""
    index = np.arange(height * width).reshape(height, width)
    pairs = [
        (index[:, :-1], index[:, 1:]),  # right
        (index[:-1, :], index[1:, :]),  # down
        (index[:-1, :-1], index[1:, 1:]),  # down-right
        (index[:-1, 1:], index[1:, :-1]),  # down-left
    ]
    sources = np.concatenate([a.ravel() for a, _ in pairs])
    targets = np.concatenate([b.ravel() for _, b in pairs])
    return sources, targets


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Renumber labels 0..S-1 by first appearance in raster order, so partitions compare directly."""
    flat = labels.ravel()
    _, first_index, inverse = np.unique(flat, return_index=True, return_inverse=True)
    rank = np.empty(len(first_index), dtype=np.int64)
    rank[np.argsort(first_index, kind="stable")] = np.arange(len(first_index))
    return rank[inverse].reshape(labels.shape).astype(np.int32)


def split_into_components(community_grid: np.ndarray) -> np.ndarray:
    """Split every community into its 8-connected pieces on the patch grid.

    Two neighbouring patches (diagonals included) join when they share a community; the
    connected components of that graph are the segments. Returns canonical segment ids.
    """
    height, width = community_grid.shape
    sources, targets = _grid_neighbour_pairs(height, width)
    flat = community_grid.ravel()
    same = flat[sources] == flat[targets]
    size = height * width
    graph = sparse.coo_matrix(
        (np.ones(int(same.sum()), dtype=np.int8), (sources[same], targets[same])), shape=(size, size)
    )
    _, components = connected_components(graph, directed=False)
    return canonical_labels(components.reshape(height, width))


def partition_from_communities(community_grid: np.ndarray, min_patches: int) -> SegmentPartition:
    segment_map = split_into_components(community_grid)
    sizes = np.bincount(segment_map.ravel()).astype(np.int32)
    return SegmentPartition(segment_map=segment_map, sizes=sizes, is_noise=sizes <= min_patches)


def unpack_adjacency(packed: np.ndarray, num_nodes: int) -> np.ndarray:
    return np.unpackbits(packed, axis=-1, count=num_nodes).astype(bool)


def discover_segments(
    packed_adjacency: np.ndarray, grid: tuple[int, int], resolution: float, min_patches: int, engine: LouvainEngine
) -> SegmentPartition:
    """Stages 3-4 for one image: Louvain on the patch graph (and its modularity), then 8-connected components.

    Args:
        packed_adjacency: N x ceil(N/8) uint8, ``np.packbits`` of the boolean adjacency rows.
        grid: (h, w) patch grid, h*w = N.
        resolution: Louvain resolution (1.0 in the paper).
        min_patches: components of at most this many patches are noise (tau = 5 in the paper).
        engine: the Louvain engine.
    """
    height, width = grid
    started = time.perf_counter()
    adjacency = unpack_adjacency(packed_adjacency, height * width)
    communities = louvain_communities(adjacency, resolution, engine).reshape(height, width)
    louvain_done = time.perf_counter()
    partition = partition_from_communities(communities, min_patches)
    quality = modularity(adjacency, communities, resolution)
    seconds = (louvain_done - started, time.perf_counter() - louvain_done)
    return SegmentPartition(partition.segment_map, partition.sizes, partition.is_noise, seconds, quality)


def warm_up(engine: LouvainEngine) -> None:
    """Load (or, the very first time, compile and cache) the engine on a two-node graph.

    Every worker runs it as its first task, so that its start-up overlaps other work rather
    than the first batch. numba writes its cache atomically, so workers compiling at once on
    a fresh installation waste CPU but never corrupt it.
    """
    louvain_communities(np.ones((2, 2), dtype=bool), 1.0, engine)


def _start_workers(count: int, engine: LouvainEngine) -> ProcessPoolExecutor:
    """``count`` worker processes, each warming the engine up as soon as it runs.

    ``spawn`` is used because the parent holds CUDA and OpenMP state that must not be forked.
    """
    executor = ProcessPoolExecutor(
        count, mp_context=multiprocessing.get_context("spawn"), initializer=exit_with_parent, initargs=(os.getpid(),)
    )
    for _ in range(count):
        executor.submit(warm_up, engine)
    return executor


_early_worker: ProcessPoolExecutor | None = None
"""The worker :func:`worker_started_early` started, until a :class:`CommunityPool` adopts it."""


@contextmanager
def worker_started_early(engine: LouvainEngine = "fast") -> Iterator[None]:
    """Start one Louvain worker now, for the first one-worker :class:`CommunityPool` to adopt.

    ``datus predict`` enters this before it imports Lightning and timm (seconds): the worker's
    own start (interpreter, numpy, numba and its compiled code, 0.5-1 s of CPU) then runs on
    another core during those imports instead of before the first batch, and the main process
    never loads numba. Only a process started for the command does this: a spawned worker
    imports the parent's main script, which is light for ``python -m datus`` but may be anything
    for a script using the Python API. A worker nobody adopted is stopped on the way out.
    """
    global _early_worker
    _early_worker = _start_workers(1, engine)
    try:
        yield
    finally:
        unused, _early_worker = _early_worker, None
        if unused is not None:  # warmed up long ago: the command's own imports took seconds
            unused.shutdown(wait=True, cancel_futures=True)


def early_worker_waiting() -> bool:
    """Whether a worker started by :func:`worker_started_early` waits for a pool to adopt it."""
    return _early_worker is not None


def _adopt_early_worker(count: int) -> ProcessPoolExecutor | None:
    global _early_worker
    if count != 1:
        return None
    adopted, _early_worker = _early_worker, None
    return adopted


class CommunityPool:
    """Runs :func:`discover_segments` for many images, in worker processes or inline.

    With ``num_workers=0`` everything runs in the calling process (debugging, tiny inputs).
    """

    def __init__(self, num_workers: int, resolution: float, min_patches: int, engine: LouvainEngine) -> None:
        if num_workers < 0:
            raise ValueError(f"--model.louvain_workers must be >= 0, got {num_workers}")
        self.settings = (resolution, min_patches, engine)
        self.num_workers = num_workers
        self._executor: ProcessPoolExecutor | None = None
        if num_workers == 0:
            warm_up(engine)
        else:
            self._executor = _adopt_early_worker(num_workers) or _start_workers(num_workers, engine)

    def submit(self, packed: Sequence[np.ndarray], grid: tuple[int, int]) -> list[Future[SegmentPartition]]:
        """Start the work for a batch; results come back in order through the futures."""
        futures: list[Future[SegmentPartition]] = []
        for adjacency in packed:
            if self._executor is None:
                future: Future[SegmentPartition] = Future()
                future.set_result(discover_segments(adjacency, grid, *self.settings))
            else:
                future = self._executor.submit(discover_segments, adjacency, grid, *self.settings)
            futures.append(future)
        return futures

    def close(self, cancel_pending: bool = True) -> None:
        """Stop the workers; ``cancel_pending=False`` lets submitted work finish first (resizing)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=cancel_pending)
            self._executor = None
