"""Louvain communities on dense patch graphs, bit-for-bit like scikit-network, at a fraction of its cost.

Why it exists: ``sknetwork.clustering.Louvain().fit_predict`` spends most of its time outside the
algorithm (dense -> CSR, ``A + A^T``, node probabilities, sparse products, Python per level), and
its local moving pays for a ``std::set`` per node. On the 784-node graphs of a patch-8 ViT that
is 36-100 ms per image, the main CPU cost of segment discovery. This module runs the same
algorithm, compiled with numba, straight from the dense boolean rows.

What "the same" means: the partition (and the label numbering) of
``Louvain(resolution=r).fit_predict(csr_matrix(adjacency, dtype=float64))`` with every other
option at its default (Dugué modularity, tolerances 1e-3, no shuffling, clusters sorted by size).
To get there the port reproduces scikit-network's arithmetic, not just its maths:

- pre-processing in float64: out/in weights are row/column degrees over the edge count, the
  symmetrised matrix ``A + A^T`` is scaled by ``1 / sum``; the core then works on float32 copies;
- the local-moving core in float32 with the exact operation order of ``louvain_core.pyx``
  (neighbour weights summed in CSR column order, candidate clusters visited in increasing label
  order as a ``std::set`` does, ties kept by the first, strict ``>`` against 0);
- ``tol_optimization`` compared in float32, ``tol_aggregation`` in float64;
- aggregation ``M^T (A M)`` in float64 with the summation order *and* the column order of
  scipy's ``csr_matmat`` (columns come out in reverse order of first appearance), because the next
  level sums those weights in float32 in that order;
- the final renumbering by decreasing cluster size through the same ``np.argsort`` call.

How it is checked: ``tests/unit/test_louvain.py`` compares partitions and labels with
scikit-network on graphs from real images through random ViTs, on synthetic sparse and
block-structured key graphs and on hand-made corner cases; ``scripts/benchmark_louvain.py``
measures agreement and CPU time side by side.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.cpython.unsafe.numbers import trailing_zeros

TOL_OPTIMIZATION = 1e-3
"""scikit-network's default: minimum float32 gain of a local-moving pass to run another pass."""

TOL_AGGREGATION = 1e-3
"""scikit-network's default: minimum gain of a level (compared in float64) to aggregate again."""

_ONE = np.uint64(1)
_SIX = np.uint64(6)
_LOW6 = np.uint64(63)


@njit(cache=True, nogil=True)
def _symmetrise(adjacency: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``A + A^T`` as uint8 (0, 1, 2), out- and in-degrees, and the number of edges of ``A``.

    Why: the core needs the symmetrised weights row by row; building them once with cache-sized
    tiles avoids the strided column reads a per-node lookup of ``A[j, i]`` would cost.
    """
    n = adjacency.shape[0]
    out_degree = np.zeros(n, dtype=np.int64)
    in_degree = np.zeros(n, dtype=np.int64)
    for i in range(n):
        row_sum = 0
        for j in range(n):
            value = adjacency[i, j]
            row_sum += value
            in_degree[j] += value
        out_degree[i] = row_sum
    edges = 0
    for i in range(n):
        edges += out_degree[i]
    both = np.empty((n, n), dtype=np.uint8)
    tile = 64
    for i0 in range(0, n, tile):
        for j0 in range(0, n, tile):
            for i in range(i0, min(i0 + tile, n)):
                for j in range(j0, min(j0 + tile, n)):
                    both[i, j] = adjacency[i, j] + adjacency[j, i]
    return both, out_degree, in_degree, edges


@njit(cache=True, nogil=True, inline="always")
def _best_move(
    i: int,
    label: int,
    labels: np.ndarray,
    seen: np.ndarray,
    cluster_weights: np.ndarray,
    out_weights: np.ndarray,
    in_weights: np.ndarray,
    out_cluster_weights: np.ndarray,
    in_cluster_weights: np.ndarray,
    self_loops: np.ndarray,
    resolution: np.float32,
) -> np.float32:
    """Move node ``i`` to its best neighbouring cluster, as ``louvain_core.pyx`` does; return the gain.

    Why a bitset: ``seen`` marks the neighbouring clusters, and walking its set bits visits them
    in increasing label order, the iteration order of the ``std::set`` that decides ties.
    Clears ``seen`` and the visited ``cluster_weights`` on the way.
    """
    two = np.float32(2.0)
    seen[label >> 6] &= ~(_ONE << np.uint64(label & 63))
    nonempty = False
    for word in range(seen.shape[0]):
        if seen[word] != 0:
            nonempty = True
            break
    best_gain = np.float32(0.0)
    if nonempty:
        out_weight = out_weights[i]
        in_weight = in_weights[i]
        delta = two * (cluster_weights[label] - self_loops[i])
        delta = delta - resolution * out_weight * (in_cluster_weights[label] - in_weight)
        delta = delta - resolution * in_weight * (out_cluster_weights[label] - out_weight)
        best = label
        for word in range(seen.shape[0]):
            bits = seen[word]
            seen[word] = 0
            while bits != 0:
                target = (word << 6) + np.int64(trailing_zeros(bits))
                bits &= bits - _ONE
                gain = two * cluster_weights[target]
                gain = gain - resolution * out_weight * in_cluster_weights[target]
                gain = gain - resolution * in_weight * out_cluster_weights[target]
                gain = gain - delta
                if gain > best_gain:
                    best_gain = gain
                    best = target
                cluster_weights[target] = 0
        if best != label:
            labels[i] = best
            out_cluster_weights[label] -= out_weight
            in_cluster_weights[label] -= in_weight
            out_cluster_weights[best] += out_weight
            in_cluster_weights[best] += in_weight
        else:
            best_gain = np.float32(0.0)
    cluster_weights[label] = 0
    return best_gain


@njit(cache=True, nogil=True)
def _optimize_dense(
    both: np.ndarray,
    weight_of: np.ndarray,
    out_weights: np.ndarray,
    in_weights: np.ndarray,
    self_loops: np.ndarray,
    resolution: np.float32,
    tol: np.float32,
) -> tuple[np.ndarray, np.float32]:
    """Local moving on the first level, reading ``A + A^T`` rows directly (weight ``weight_of[a_ij]``).

    Why dense: at the first level the CSR rows of scikit-network list columns in increasing
    order, which is exactly a scan of the dense row, so no CSR is ever built.
    """
    n = both.shape[0]
    labels = np.arange(n)
    out_cluster_weights = out_weights.copy()
    in_cluster_weights = in_weights.copy()
    cluster_weights = np.zeros(n, dtype=np.float32)
    seen = np.zeros((n + 63) >> 6, dtype=np.uint64)
    increase = np.float32(0.0)
    while True:
        increase_pass = np.float32(0.0)
        for i in range(n):
            label = labels[i]
            row = both[i]
            for j in range(n):
                value = row[j]
                if value != 0:
                    target = labels[j]
                    cluster_weights[target] += weight_of[value]
                    seen[target >> 6] |= _ONE << np.uint64(target & 63)
            increase_pass += _best_move(
                i, label, labels, seen, cluster_weights, out_weights, in_weights,
                out_cluster_weights, in_cluster_weights, self_loops, resolution,
            )
        increase += increase_pass
        if increase_pass <= tol:
            break
    return labels, increase


@njit(cache=True, nogil=True)
def _optimize_sparse(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    out_weights: np.ndarray,
    in_weights: np.ndarray,
    self_loops: np.ndarray,
    resolution: np.float32,
    tol: np.float32,
) -> tuple[np.ndarray, np.float32]:
    """Local moving on an aggregate level, a CSR graph whose column order is scipy's (float32 data)."""
    n = indptr.shape[0] - 1
    labels = np.arange(n)
    out_cluster_weights = out_weights.copy()
    in_cluster_weights = in_weights.copy()
    cluster_weights = np.zeros(n, dtype=np.float32)
    seen = np.zeros((n + 63) >> 6, dtype=np.uint64)
    increase = np.float32(0.0)
    while True:
        increase_pass = np.float32(0.0)
        for i in range(n):
            label = labels[i]
            for position in range(indptr[i], indptr[i + 1]):
                target = labels[indices[position]]
                cluster_weights[target] += data[position]
                seen[target >> 6] |= _ONE << np.uint64(target & 63)
            increase_pass += _best_move(
                i, label, labels, seen, cluster_weights, out_weights, in_weights,
                out_cluster_weights, in_cluster_weights, self_loops, resolution,
            )
        increase += increase_pass
        if increase_pass <= tol:
            break
    return labels, increase


@njit(cache=True, nogil=True)
def _renumber(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels 0..C-1 in increasing order of the old label (``np.unique(..., return_inverse=True)``)."""
    n = labels.shape[0]
    rank = np.zeros(n + 1, dtype=np.int64)
    for i in range(n):
        rank[labels[i]] = 1
    count = 0
    for label in range(n + 1):
        used = rank[label]
        rank[label] = count
        count += used
    renumbered = np.empty(n, dtype=np.int64)
    for i in range(n):
        renumbered[i] = rank[labels[i]]
    return renumbered, count


@njit(cache=True, nogil=True)
def _sum_by_cluster(values: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """``membership.T.dot(values)`` in float64, summed in node order like scipy's ``csc_matvec``."""
    sums = np.zeros(count, dtype=np.float64)
    for i in range(values.shape[0]):
        sums[labels[i]] += values[i]
    return sums


@njit(cache=True, nogil=True)
def _members(labels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes of each cluster in increasing order: the CSR form of ``membership.T``."""
    start = np.zeros(count + 1, dtype=np.int64)
    for i in range(labels.shape[0]):
        start[labels[i] + 1] += 1
    for c in range(count):
        start[c + 1] += start[c]
    fill = start[:-1].copy()
    nodes = np.empty(labels.shape[0], dtype=np.int64)
    for i in range(labels.shape[0]):
        nodes[fill[labels[i]]] = i
        fill[labels[i]] += 1
    return start, nodes


@njit(cache=True, nogil=True, inline="always")
def _flush_row(
    head: int, length: int, nxt: np.ndarray, sums: np.ndarray, indices: np.ndarray, data: np.ndarray, nnz: int
) -> int:
    """Write one accumulated row the way ``csr_matmat`` does (linked-list order, zeros dropped)."""
    for _ in range(length):
        if sums[head] != 0:
            indices[nnz] = head
            data[nnz] = sums[head]
            nnz += 1
        previous = head
        head = nxt[head]
        nxt[previous] = -1
        sums[previous] = 0
    return nnz


@njit(cache=True, nogil=True)
def _aggregate_rows(
    b_indptr: np.ndarray, b_indices: np.ndarray, b_data: np.ndarray, labels: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``membership.T @ B`` with scipy's ``csr_matmat`` order: the aggregate graph between clusters."""
    start, nodes = _members(labels, count)
    width = count
    nxt = np.full(width, -1, dtype=np.int64)
    sums = np.zeros(width, dtype=np.float64)
    indptr = np.zeros(count + 1, dtype=np.int64)
    capacity = min(count * width, b_indices.shape[0])
    indices = np.empty(capacity, dtype=np.int64)
    data = np.empty(capacity, dtype=np.float64)
    nnz = 0
    for c in range(count):
        head = -2
        length = 0
        for member in range(start[c], start[c + 1]):
            i = nodes[member]
            for position in range(b_indptr[i], b_indptr[i + 1]):
                k = b_indices[position]
                sums[k] += b_data[position]
                if nxt[k] == -1:
                    nxt[k] = head
                    head = k
                    length += 1
        nnz = _flush_row(head, length, nxt, sums, indices, data, nnz)
        indptr[c + 1] = nnz
    return indptr, indices[:nnz], data[:nnz]


@njit(cache=True, nogil=True)
def _aggregate_dense(
    both: np.ndarray, weight_of: np.ndarray, labels: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First aggregation, ``M^T ((A + A^T) / total) M``, from the dense rows (float64, scipy's order)."""
    n = both.shape[0]
    nxt = np.full(count, -1, dtype=np.int64)
    sums = np.zeros(count, dtype=np.float64)
    b_indptr = np.zeros(n + 1, dtype=np.int64)
    b_indices = np.empty(n * count, dtype=np.int64)
    b_data = np.empty(n * count, dtype=np.float64)
    nnz = 0
    for i in range(n):
        head = -2
        length = 0
        row = both[i]
        for j in range(n):
            value = row[j]
            if value != 0:
                k = labels[j]
                sums[k] += weight_of[value]
                if nxt[k] == -1:
                    nxt[k] = head
                    head = k
                    length += 1
        nnz = _flush_row(head, length, nxt, sums, b_indices, b_data, nnz)
        b_indptr[i + 1] = nnz
    return _aggregate_rows(b_indptr, b_indices[:nnz], b_data[:nnz], labels, count)


@njit(cache=True, nogil=True)
def _aggregate_sparse(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, labels: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Later aggregations, ``M^T (A M)`` on a CSR level graph (float64, scipy's order)."""
    n = indptr.shape[0] - 1
    nxt = np.full(count, -1, dtype=np.int64)
    sums = np.zeros(count, dtype=np.float64)
    b_indptr = np.zeros(n + 1, dtype=np.int64)
    b_indices = np.empty(indices.shape[0], dtype=np.int64)
    b_data = np.empty(indices.shape[0], dtype=np.float64)
    nnz = 0
    for i in range(n):
        head = -2
        length = 0
        for position in range(indptr[i], indptr[i + 1]):
            k = labels[indices[position]]
            sums[k] += data[position]
            if nxt[k] == -1:
                nxt[k] = head
                head = k
                length += 1
        nnz = _flush_row(head, length, nxt, sums, b_indices, b_data, nnz)
        b_indptr[i + 1] = nnz
    return _aggregate_rows(b_indptr, b_indices[:nnz], b_data[:nnz], labels, count)


@njit(cache=True, nogil=True)
def _diagonal(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> np.ndarray:
    """``adjacency.diagonal()`` of a CSR level graph, cast to float32 as the core's self-loops."""
    n = indptr.shape[0] - 1
    diagonal = np.zeros(n, dtype=np.float64)
    for i in range(n):
        for position in range(indptr[i], indptr[i + 1]):
            if indices[position] == i:
                diagonal[i] += data[position]
    return diagonal.astype(np.float32)


@njit(cache=True, nogil=True)
def _louvain_core(
    adjacency: np.ndarray, resolution: float, tol_optimization: float, tol_aggregation: float
) -> tuple[np.ndarray, np.ndarray]:
    """All levels of scikit-network's ``Louvain.fit`` on a dense 0/1 uint8 matrix.

    Returns the cluster of every node (numbered like scikit-network's last-level ``np.unique``)
    and the cluster sizes; both empty when the graph has no edge.
    """
    n = adjacency.shape[0]
    both, out_degree, in_degree, edges = _symmetrise(adjacency)
    if edges == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    resolution32 = np.float32(resolution)
    tol32 = np.float32(tol_optimization)
    scale = 1.0 / (2.0 * edges)
    weight64 = np.array([0.0, scale, 2.0 * scale])
    weight32 = weight64.astype(np.float32)
    out_weights = out_degree / np.float64(edges)
    in_weights = in_degree / np.float64(edges)
    self_loops = np.empty(n, dtype=np.float32)
    for i in range(n):
        self_loops[i] = weight32[both[i, i]]

    labels, increase = _optimize_dense(
        both, weight32, out_weights.astype(np.float32), in_weights.astype(np.float32), self_loops,
        resolution32, tol32,
    )
    labels, count = _renumber(labels)
    node_cluster = labels
    if count > 1 and np.float64(increase) > tol_aggregation:
        indptr, indices, data = _aggregate_dense(both, weight64, labels, count)
        out_weights = _sum_by_cluster(out_weights, labels, count)
        in_weights = _sum_by_cluster(in_weights, labels, count)
        while True:
            labels, increase = _optimize_sparse(
                indptr, indices, data.astype(np.float32), out_weights.astype(np.float32),
                in_weights.astype(np.float32), _diagonal(indptr, indices, data), resolution32, tol32,
            )
            labels, count = _renumber(labels)
            for i in range(n):
                node_cluster[i] = labels[node_cluster[i]]
            if count == 1 or np.float64(increase) <= tol_aggregation:
                break
            indptr, indices, data = _aggregate_sparse(indptr, indices, data, labels, count)
            out_weights = _sum_by_cluster(out_weights, labels, count)
            in_weights = _sum_by_cluster(in_weights, labels, count)
    sizes = np.zeros(count, dtype=np.int64)
    for i in range(n):
        sizes[node_cluster[i]] += 1
    return node_cluster, sizes


def louvain(adjacency: np.ndarray, resolution: float = 1.0) -> np.ndarray:
    """Community label per node, identical to scikit-network's Louvain with default options.

    Equals ``sknetwork.clustering.Louvain(resolution=resolution).fit_predict(
    scipy.sparse.csr_matrix(adjacency, dtype=np.float64))``, label numbering included (labels by
    decreasing community size), for an unweighted graph given as a dense matrix.

    Args:
        adjacency: N x N boolean (or 0/1) adjacency; any nonzero entry is an edge. It may be
            directed (Dugué modularity, as scikit-network) and may hold self-loops.
        resolution: modularity resolution (1.0 in the paper); higher gives more communities.

    Returns:
        N int64 labels, 0 for the largest community.

    Raises:
        ValueError: the matrix is not square or has no edge (scikit-network refuses it too).
    """
    matrix = np.asarray(adjacency)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"adjacency must be a square matrix, got shape {matrix.shape}")
    if matrix.dtype != np.bool_:
        matrix = matrix != 0
    nodes, sizes = _louvain_core(
        np.ascontiguousarray(matrix).view(np.uint8), float(resolution), TOL_OPTIMIZATION, TOL_AGGREGATION
    )
    if sizes.size == 0:
        raise ValueError("The input matrix is empty: the graph has no edge.")
    rank = np.empty(sizes.size, dtype=np.int64)
    rank[np.argsort(-sizes)] = np.arange(sizes.size)
    return rank[nodes]
