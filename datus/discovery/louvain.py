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
  symmetrised matrix ``A + A^T`` is multiplied by ``1 / sum`` (how scipy divides by a scalar); the
  core then works on float32 copies;
- the local-moving core in float32 with the exact operation order of ``louvain_core.pyx``
  (neighbour weights summed in CSR column order, candidate clusters visited in increasing label
  order as a ``std::set`` does, ties kept by the first, strict ``>`` against 0);
- ``tol_optimization`` compared in float32, ``tol_aggregation`` in float64;
- aggregation ``M^T (A M)`` in float64 with the summation order *and* the column order of
  scipy's ``csr_matmat`` (columns come out in reverse order of first appearance), because the next
  level sums those weights in float32 in that order;
- the final renumbering by decreasing cluster size through the same ``np.argsort`` call.

Where the time goes instead: patch graphs are symmetric (``k k^T``), so every edge weighs the
same and each float32 sum above is a function of an edge count, read from a table of running
sums. The first level therefore counts edges per cluster: with bit-packed rows and cluster
bitsets (popcounts) once few clusters are left, by walking the set bits of sparse rows, or by a
byte scan of dense ones. Directed inputs and the (small) aggregate levels run the literal
algorithm on an emulated scipy CSR. Everything is one numba call without the GIL; the one-off
compile (~10 s) is cached next to this file, where spawned workers find it.

How it is checked: ``tests/unit/discovery/test_louvain.py`` compares partitions and labels with
scikit-network on graphs from real images through random ViTs, on synthetic sparse and
block-structured key graphs and on hand-made corner cases; ``scripts/benchmark_louvain.py``
measures agreement and CPU time side by side.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.extending import intrinsic

TOL_OPTIMIZATION = 1e-3
"""scikit-network's default: minimum float32 gain of a local-moving pass to run another pass."""

TOL_AGGREGATION = 1e-3
"""scikit-network's default: minimum gain of a level (compared in float64) to aggregate again."""

_ONE = np.uint64(1)

_BIT_STEP = 2
"""Walking a row's set bits costs about this many steps of a scan of its bytes (measured): rows
with fewer than nodes / this edges are walked bit by bit, others scanned byte by byte."""

_BITSET_COST = 4
"""A popcount of a row word against a cluster word costs about 1 / this of a scan step (measured):
edge counts per cluster come from cluster bitsets when clusters x words < this x scan steps."""


@intrinsic
def _popcount(typingctx, value):  # type: ignore[no-untyped-def]
    """LLVM's ``ctpop`` on a uint64 (numba has no popcount of its own)."""
    signature = types.uint64(types.uint64)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        function = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
        return builder.call(function, args)

    return signature, codegen


@njit(cache=True, nogil=True)
def _pack_rows(adjacency: np.ndarray) -> np.ndarray:
    """Rows as bitsets: bit ``j % 64`` of word ``j // 64`` of row ``i`` is ``A[i, j]``.

    The array has ``64 * words`` rows (the padding rows are zero) so that it transposes by
    whole 64 x 64 blocks.
    """
    n = adjacency.shape[0]
    words = (n + 63) >> 6
    packed = np.zeros((words << 6, words), dtype=np.uint64)
    for i in range(n):
        for word in range(words):
            base = word << 6
            value = np.uint64(0)
            for bit in range(min(64, n - base)):
                value |= np.uint64(adjacency[i, base + bit]) << np.uint64(bit)
            packed[i, word] = value
    return packed


@njit(cache=True, nogil=True)
def _transpose_bits(packed: np.ndarray) -> np.ndarray:
    """Transpose of a bit matrix from :func:`_pack_rows`, by 64 x 64 blocks (recursive block swaps)."""
    words = packed.shape[1]
    transposed = np.empty_like(packed)
    block = np.empty(64, dtype=np.uint64)
    for block_row in range(words):
        for block_col in range(words):
            for r in range(64):
                block[r] = packed[(block_row << 6) + r, block_col]
            width = 32
            mask = np.uint64(0x00000000FFFFFFFF)
            while width != 0:
                shift = np.uint64(width)
                for k in range(64):
                    if k & width == 0:
                        swap = ((block[k] >> shift) ^ block[k + width]) & mask
                        block[k] ^= swap << shift
                        block[k + width] ^= swap
                width >>= 1
                mask ^= mask << np.uint64(width)
            for r in range(64):
                transposed[(block_col << 6) + r, block_row] = block[r]
    return transposed


@njit(cache=True, nogil=True)
def _running_sums(step: float, length: int) -> tuple[np.ndarray, np.ndarray]:
    """``table[m]``: ``step`` added ``m`` times, one addition after the other (float32, float64).

    Why: on a symmetric unweighted graph every edge has the same weight, so the weight a node
    sees in a cluster, summed edge by edge in scikit-network (float32 in its core, float64 in the
    aggregation), depends only on the number of edges.
    """
    single = np.zeros(length + 1, dtype=np.float32)
    double = np.zeros(length + 1, dtype=np.float64)
    step32 = np.float32(step)
    for m in range(1, length + 1):
        single[m] = single[m - 1] + step32
        double[m] = double[m - 1] + step
    return single, double


@njit(cache=True, nogil=True)
def _to_float32(values: np.ndarray) -> np.ndarray:
    """Round float64 to float32, as scikit-network does before its core."""
    rounded = np.empty(values.shape[0], dtype=np.float32)
    for i in range(values.shape[0]):
        rounded[i] = np.float32(values[i])
    return rounded


@njit(cache=True, nogil=True)
def _gain(
    weight: np.float32,
    cluster_in: np.float32,
    cluster_out: np.float32,
    out_weight: np.float32,
    in_weight: np.float32,
    resolution: np.float32,
    delta: np.float32,
) -> np.float32:
    """Modularity gain of a move to a cluster, ``delta_local`` of ``louvain_core.pyx`` (float32, same order)."""
    gain = np.float32(2.0) * weight
    gain = gain - resolution * out_weight * cluster_in
    gain = gain - resolution * in_weight * cluster_out
    return gain - delta


@njit(cache=True, nogil=True)
def _compact(
    size: int,
    cluster_label: np.ndarray,
    cluster_in: np.ndarray,
    cluster_out: np.ndarray,
    cluster_size: np.ndarray,
    members: np.ndarray,
    position: np.ndarray,
) -> int:
    """Drop emptied clusters from the compact cluster arrays (order kept); return the new count."""
    remap = np.empty(size, dtype=np.int64)
    kept = 0
    for k in range(size):
        if cluster_size[k] > 0:
            cluster_label[kept] = cluster_label[k]
            cluster_in[kept] = cluster_in[k]
            cluster_out[kept] = cluster_out[k]
            cluster_size[kept] = cluster_size[k]
            for word in range(members.shape[1]):
                members[kept, word] = members[k, word]
            remap[k] = kept
            kept += 1
    for j in range(position.shape[0]):
        position[j] = remap[position[j]]
    return kept


@njit(cache=True, nogil=True)
def _optimize_symmetric(
    adjacency: np.ndarray,
    packed: np.ndarray,
    degree: np.ndarray,
    count_weight: np.ndarray,
    out_weights: np.ndarray,
    in_weights: np.ndarray,
    self_loops: np.ndarray,
    resolution: np.float32,
    tol: np.float32,
) -> tuple[np.ndarray, np.float32]:
    """First-level local moving on a symmetric 0/1 graph, from edge counts instead of weight sums.

    Same decisions as ``louvain_core.pyx``: the float32 weight towards a cluster is
    ``count_weight[edges into it]`` (see :func:`_running_sums`), candidates are visited in
    increasing label order. Clusters live in compact arrays (emptied ones are dropped now and
    then, which keeps the order). A node's edge counts per cluster come from whichever is
    cheapest: popcounts of its row against cluster bitsets (few clusters left), a walk over the
    set bits of its row (few edges; a bitset then lists the clusters met, in order), or a scan of
    its row's bytes.
    """
    n = degree.shape[0]
    words = packed.shape[1]
    two = np.float32(2.0)
    labels = np.arange(n)
    size = n
    cluster_label = np.arange(n)
    cluster_in = in_weights.copy()
    cluster_out = out_weights.copy()
    cluster_size = np.ones(n, dtype=np.int64)
    members = np.zeros((n, words), dtype=np.uint64)
    for i in range(n):
        members[i, i >> 6] = _ONE << np.uint64(i & 63)
    position = np.arange(n)
    counts = np.zeros(n, dtype=np.int64)
    seen = np.zeros((n + 63) >> 6, dtype=np.uint64)
    emptied = 0
    increase = np.float32(0.0)
    while True:
        increase_pass = np.float32(0.0)
        for i in range(n):
            own = position[i]
            bits = packed[i]
            sparse_row = _BIT_STEP * degree[i] < n
            few_clusters = size * words < _BITSET_COST * (_BIT_STEP * degree[i] if sparse_row else n)
            if few_clusters:
                for k in range(size):
                    total = np.uint64(0)
                    for word in range(words):
                        total += _popcount(bits[word] & members[k, word])
                    counts[k] = total
            elif sparse_row:
                for word in range(words):
                    value = bits[word]
                    while value != 0:
                        k = position[(word << 6) + np.int64(trailing_zeros(value))]
                        value &= value - _ONE
                        counts[k] += 1
                        seen[k >> 6] |= _ONE << np.uint64(k & 63)
            else:
                row = adjacency[i]
                for j in range(n):
                    counts[position[j]] += row[j]
            own_count = counts[own]
            counts[own] = 0
            out_weight = out_weights[i]
            in_weight = in_weights[i]
            delta = two * (count_weight[own_count] - self_loops[i])
            delta = delta - resolution * out_weight * (cluster_in[own] - in_weight)
            delta = delta - resolution * in_weight * (cluster_out[own] - out_weight)
            best_gain = np.float32(0.0)
            best = own
            if sparse_row and not few_clusters:
                seen[own >> 6] &= ~(_ONE << np.uint64(own & 63))
                for word in range((size + 63) >> 6):
                    value = seen[word]
                    seen[word] = 0
                    while value != 0:
                        k = (word << 6) + np.int64(trailing_zeros(value))
                        value &= value - _ONE
                        weight = count_weight[counts[k]]
                        gain = _gain(weight, cluster_in[k], cluster_out[k], out_weight, in_weight, resolution, delta)
                        counts[k] = 0
                        if gain > best_gain:
                            best_gain = gain
                            best = k
            else:
                for k in range(size):
                    if counts[k] != 0:
                        weight = count_weight[counts[k]]
                        gain = _gain(weight, cluster_in[k], cluster_out[k], out_weight, in_weight, resolution, delta)
                        counts[k] = 0
                        if gain > best_gain:
                            best_gain = gain
                            best = k
            if best != own:
                increase_pass += best_gain
                labels[i] = cluster_label[best]
                position[i] = best
                cluster_out[own] -= out_weight
                cluster_in[own] -= in_weight
                cluster_out[best] += out_weight
                cluster_in[best] += in_weight
                bit = _ONE << np.uint64(i & 63)
                members[own, i >> 6] &= ~bit
                members[best, i >> 6] |= bit
                cluster_size[own] -= 1
                cluster_size[best] += 1
                if cluster_size[own] == 0:
                    emptied += 1
                    if 4 * emptied > size:
                        size = _compact(
                            size, cluster_label, cluster_in, cluster_out, cluster_size, members, position
                        )
                        emptied = 0
        increase += increase_pass
        if increase_pass <= tol:
            break
    return labels, increase


@njit(cache=True, nogil=True)
def _to_clusters_symmetric(
    packed: np.ndarray, count_weight: np.ndarray, labels: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``B = A M``, first half of the first aggregation of a symmetric 0/1 graph, from edge counts.

    Row ``i`` of ``B`` lists the clusters in reverse order of their first neighbour of ``i``
    (``csr_matmat``'s linked list), each with weight ``count_weight[edges]`` (float64). With few
    clusters the counts and first neighbours come from cluster bitsets (then sorted by insertion,
    hence the ``count**2`` in the cost), else from a walk over the row's set bits.
    """
    n = labels.shape[0]
    words = packed.shape[1]
    counts = np.zeros(count, dtype=np.int64)
    first = np.empty(count, dtype=np.int64)
    order = np.empty(count, dtype=np.int64)
    b_indptr = np.zeros(n + 1, dtype=np.int64)
    b_indices = np.empty(n * count, dtype=np.int64)
    b_data = np.empty(n * count, dtype=np.float64)
    members = np.zeros((count, words), dtype=np.uint64)
    for i in range(n):
        members[labels[i], i >> 6] |= _ONE << np.uint64(i & 63)
    nnz = 0
    for i in range(n):
        length = 0
        bits = packed[i]
        edges = 0
        for word in range(words):
            edges += _popcount(bits[word])
        if count * (words + count) < _BITSET_COST * _BIT_STEP * edges:
            for k in range(count):
                total = np.uint64(0)
                for word in range(words):
                    total += _popcount(bits[word] & members[k, word])
                if total != 0:
                    counts[k] = total
                    hit = 0
                    while bits[hit] & members[k, hit] == 0:
                        hit += 1
                    where = (hit << 6) + np.int64(trailing_zeros(bits[hit] & members[k, hit]))
                    slot = length
                    while slot > 0 and first[slot - 1] > where:
                        first[slot] = first[slot - 1]
                        order[slot] = order[slot - 1]
                        slot -= 1
                    first[slot] = where
                    order[slot] = k
                    length += 1
        else:
            for word in range(words):
                value = bits[word]
                while value != 0:
                    k = labels[(word << 6) + np.int64(trailing_zeros(value))]
                    value &= value - _ONE
                    if counts[k] == 0:
                        order[length] = k
                        length += 1
                    counts[k] += 1
        for slot in range(length - 1, -1, -1):
            k = order[slot]
            b_indices[nnz] = k
            b_data[nnz] = count_weight[counts[k]]
            counts[k] = 0
            nnz += 1
        b_indptr[i + 1] = nnz
    return b_indptr, b_indices[:nnz], b_data[:nnz]


@njit(cache=True, nogil=True)
def _directed_csr(
    packed: np.ndarray, transposed: np.ndarray, n: int, scale: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-network's first-level graph of a directed input: ``(A + A^T) * scale`` as sorted CSR.

    Row ``i`` of ``A + A^T`` is row ``i`` of ``A`` plus row ``i`` of the transposed bit matrix, so
    no column is ever read. Edges weigh ``scale`` one way and ``2 * scale`` both ways.
    """
    words = packed.shape[1]
    indptr = np.zeros(n + 1, dtype=np.int64)
    for i in range(n):
        total = 0
        for word in range(words):
            total += _popcount(packed[i, word] | transposed[i, word])
        indptr[i + 1] = indptr[i] + total
    indices = np.empty(indptr[n], dtype=np.int64)
    data = np.empty(indptr[n], dtype=np.float64)
    position = 0
    for i in range(n):
        for word in range(words):
            outgoing = packed[i, word]
            incoming = transposed[i, word]
            bits = outgoing | incoming
            while bits != 0:
                bit = trailing_zeros(bits)
                bits &= bits - _ONE
                indices[position] = (word << 6) + np.int64(bit)
                data[position] = np.float64(((outgoing >> bit) & _ONE) + ((incoming >> bit) & _ONE)) * scale
                position += 1
    return indptr, indices, data


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
    """``louvain_core.pyx`` line for line on a CSR graph (float32 data): aggregate levels, directed inputs.

    The neighbouring clusters, a ``std::set`` there, are a bitset here: walking its set bits
    visits them in the same increasing label order, which decides ties.
    """
    n = indptr.shape[0] - 1
    two = np.float32(2.0)
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
            seen[label >> 6] &= ~(_ONE << np.uint64(label & 63))
            out_weight = out_weights[i]
            in_weight = in_weights[i]
            delta = two * (cluster_weights[label] - self_loops[i])
            delta = delta - resolution * out_weight * (in_cluster_weights[label] - in_weight)
            delta = delta - resolution * in_weight * (out_cluster_weights[label] - out_weight)
            best_gain = np.float32(0.0)
            best = label
            for word in range(seen.shape[0]):
                bits = seen[word]
                seen[word] = 0
                while bits != 0:
                    target = (word << 6) + np.int64(trailing_zeros(bits))
                    bits &= bits - _ONE
                    gain = _gain(
                        cluster_weights[target], in_cluster_weights[target], out_cluster_weights[target],
                        out_weight, in_weight, resolution, delta,
                    )
                    if gain > best_gain:
                        best_gain = gain
                        best = target
                    cluster_weights[target] = 0
            cluster_weights[label] = 0
            if best != label:
                increase_pass += best_gain
                labels[i] = best
                out_cluster_weights[label] -= out_weight
                in_cluster_weights[label] -= in_weight
                out_cluster_weights[best] += out_weight
                in_cluster_weights[best] += in_weight
        increase += increase_pass
        if increase_pass <= tol:
            break
    return labels, increase


@njit(cache=True, nogil=True)
def _add_to_row(
    column: int, value: float, nxt: np.ndarray, sums: np.ndarray, head: int, length: int
) -> tuple[int, int]:
    """Add ``value`` to one row being accumulated the way ``csr_matmat`` does; the new (head, length).

    A column seen for the first time joins the front of the row's linked list, which
    :func:`_flush_row` then writes out in that order.
    """
    sums[column] += value
    if nxt[column] == -1:
        nxt[column] = head
        return column, length + 1
    return head, length


@njit(cache=True, nogil=True)
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
    """``M^T B`` with scipy's ``csr_matmat`` order: the aggregate graph between clusters.

    ``M^T`` in CSR form lists the nodes of each cluster in increasing order.
    """
    nodes_in = np.zeros(count + 1, dtype=np.int64)
    for i in range(labels.shape[0]):
        nodes_in[labels[i] + 1] += 1
    for c in range(count):
        nodes_in[c + 1] += nodes_in[c]
    fill = nodes_in[:-1].copy()
    nodes = np.empty(labels.shape[0], dtype=np.int64)
    for i in range(labels.shape[0]):
        nodes[fill[labels[i]]] = i
        fill[labels[i]] += 1
    nxt = np.full(count, -1, dtype=np.int64)
    sums = np.zeros(count, dtype=np.float64)
    indptr = np.zeros(count + 1, dtype=np.int64)
    capacity = min(count * count, b_indices.shape[0])
    indices = np.empty(capacity, dtype=np.int64)
    data = np.empty(capacity, dtype=np.float64)
    nnz = 0
    for c in range(count):
        head = -2
        length = 0
        for member in range(nodes_in[c], nodes_in[c + 1]):
            i = nodes[member]
            for position in range(b_indptr[i], b_indptr[i + 1]):
                head, length = _add_to_row(b_indices[position], b_data[position], nxt, sums, head, length)
        nnz = _flush_row(head, length, nxt, sums, indices, data, nnz)
        indptr[c + 1] = nnz
    return indptr, indices[:nnz], data[:nnz]


@njit(cache=True, nogil=True)
def _to_clusters(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, labels: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``B = A M`` for a CSR level graph, as scipy's ``csr_matmat`` computes and orders it (float64)."""
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
            head, length = _add_to_row(labels[indices[position]], data[position], nxt, sums, head, length)
        nnz = _flush_row(head, length, nxt, sums, b_indices, b_data, nnz)
        b_indptr[i + 1] = nnz
    return b_indptr, b_indices[:nnz], b_data[:nnz]


@njit(cache=True, nogil=True)
def _diagonal(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> np.ndarray:
    """``adjacency.diagonal()`` of a CSR level graph: the self-loop weights."""
    n = indptr.shape[0] - 1
    diagonal = np.zeros(n, dtype=np.float64)
    for i in range(n):
        for position in range(indptr[i], indptr[i + 1]):
            if indices[position] == i:
                diagonal[i] += data[position]
    return diagonal


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
def _sizes(labels: np.ndarray, count: int) -> np.ndarray:
    """Number of nodes per cluster."""
    sizes = np.zeros(count, dtype=np.int64)
    for i in range(labels.shape[0]):
        sizes[labels[i]] += 1
    return sizes


@njit(cache=True, nogil=True)
def _louvain_core(
    adjacency: np.ndarray, resolution: float, tol_optimization: float, tol_aggregation: float
) -> tuple[np.ndarray, np.ndarray]:
    """All levels of scikit-network's ``Louvain.fit`` on a dense 0/1 uint8 matrix.

    Returns the cluster of every node (numbered like scikit-network's last-level ``np.unique``)
    and the cluster sizes; both empty when the graph has no edge.
    """
    n = adjacency.shape[0]
    resolution32 = np.float32(resolution)
    tol32 = np.float32(tol_optimization)
    packed = _pack_rows(adjacency)
    transposed = _transpose_bits(packed)
    symmetric = True
    out_degree = np.zeros(n, dtype=np.int64)
    in_degree = np.zeros(n, dtype=np.int64)
    edges = 0
    for i in range(n):
        for word in range(packed.shape[1]):
            symmetric &= packed[i, word] == transposed[i, word]
            out_degree[i] += _popcount(packed[i, word])
            in_degree[i] += _popcount(transposed[i, word])
        edges += out_degree[i]
    if edges == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    scale = 1.0 / (2.0 * edges)
    out_weights = np.empty(n, dtype=np.float64)
    in_weights = np.empty(n, dtype=np.float64)
    for i in range(n):
        out_weights[i] = out_degree[i] / np.float64(edges)
        in_weights[i] = in_degree[i] / np.float64(edges)

    node_cluster = np.arange(n)
    if symmetric:
        count_weight32, count_weight64 = _running_sums(2.0 * scale, n)
        self_loops = np.zeros(n, dtype=np.float32)
        for i in range(n):
            self_loops[i] = count_weight32[adjacency[i, i]]
        labels, increase = _optimize_symmetric(
            adjacency, packed, out_degree, count_weight32, _to_float32(out_weights), _to_float32(in_weights),
            self_loops, resolution32, tol32,
        )
        node_cluster, count = _renumber(labels)
        if count == 1 or np.float64(increase) <= tol_aggregation:
            return node_cluster, _sizes(node_cluster, count)
        indptr, indices, data = _aggregate_rows(
            *_to_clusters_symmetric(packed, count_weight64, node_cluster, count), node_cluster, count
        )
        out_weights = _sum_by_cluster(out_weights, node_cluster, count)
        in_weights = _sum_by_cluster(in_weights, node_cluster, count)
    else:
        indptr, indices, data = _directed_csr(packed, transposed, n, scale)
    while True:
        labels, increase = _optimize_sparse(
            indptr, indices, _to_float32(data), _to_float32(out_weights), _to_float32(in_weights),
            _to_float32(_diagonal(indptr, indices, data)), resolution32, tol32,
        )
        labels, count = _renumber(labels)
        for i in range(n):
            node_cluster[i] = labels[node_cluster[i]]
        if count == 1 or np.float64(increase) <= tol_aggregation:
            return node_cluster, _sizes(node_cluster, count)
        indptr, indices, data = _aggregate_rows(*_to_clusters(indptr, indices, data, labels, count), labels, count)
        out_weights = _sum_by_cluster(out_weights, labels, count)
        in_weights = _sum_by_cluster(in_weights, labels, count)


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
