"""datus.discovery.louvain gives scikit-network's Louvain partitions (and labels) on every family of graphs.

The reference is ``sknetwork.clustering.Louvain(resolution=r).fit_predict(csr_matrix(A))``, as
datus called it. The bar is the same partition on at least 99 % of the graphs of each family,
i.e. on every graph of these small families; the label numbering is checked too. Families:
real images (SUIM and CamVid samples in ``../shared/data``, skipped when absent) through seeded
random ViTs at patch 8 and 16, sparser synthetic key graphs, directed graphs, and hand-made
corner cases.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import sparse
from sknetwork.clustering import Louvain

from datus.discovery.louvain import louvain

REPO = Path(__file__).resolve().parents[3]
DATA = REPO.parent / "shared" / "data"
SOURCES = {
    "suim": (DATA / "suim-sample" / "train_val" / "images", "*.jpg"),
    "camvid": (DATA / "camvid-sample" / "train", "*.png"),
}
IMAGES_PER_SOURCE = 5
DEPTH = 2
"""Blocks of the random test ViTs: a shallow network keeps the fixture fast, and its graphs are as
dense as the full network's (60-100 % of pairs connected)."""

_spec = importlib.util.spec_from_file_location("benchmark_louvain", REPO / "scripts" / "benchmark_louvain.py")
assert _spec is not None and _spec.loader is not None
benchmark_louvain = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark_louvain)
same_partition = benchmark_louvain.same_partition


def reference(adjacency: np.ndarray, resolution: float = 1.0) -> np.ndarray:
    return Louvain(resolution=resolution).fit_predict(sparse.csr_matrix(adjacency, dtype=np.float64))


def assert_agreement(graphs: list[np.ndarray], resolution: float = 1.0) -> list[np.ndarray]:
    """Same partition on >= 99 % of ``graphs`` (all of them below 100 graphs); same labels when so.

    Returns scikit-network's labels, for checks that the family is not trivial.
    """
    assert graphs
    results = [(reference(graph, resolution), louvain(graph, resolution)) for graph in graphs]
    different = [i for i, (expected, labels) in enumerate(results) if not same_partition(expected, labels)]
    assert len(different) <= math.floor(0.01 * len(graphs)), f"partitions differ on graphs {different}"
    renumbered = [
        i
        for i, (expected, labels) in enumerate(results)
        if i not in different and not np.array_equal(expected, labels)
    ]
    assert not renumbered, f"same partitions, other label numbers on graphs {renumbered}"
    return [expected for expected, _ in results]


def communities(labels: list[np.ndarray]) -> list[int]:
    return [int(np.unique(one).size) for one in labels]


def _images(source: str) -> list[Path]:
    folder, pattern = SOURCES[source]
    if not folder.is_dir():
        pytest.skip(f"{folder} not present (shared {source} sample)")
    return sorted(folder.glob(pattern))[:IMAGES_PER_SOURCE]


@pytest.fixture(scope="module", params=["suim", "camvid"])
def image_graphs(request: pytest.FixtureRequest) -> dict[int, list[np.ndarray]]:
    """Patch graphs of a few real images through a seeded random ViT-S, per patch size."""
    paths = _images(request.param)
    return {
        patch: benchmark_louvain.patch_graphs(paths, f"vit_small_patch{patch}_224", seed=0, depth=DEPTH)
        for patch in (8, 16)
    }


@pytest.mark.parametrize("patch", [8, 16])
def test_real_image_graphs(image_graphs: dict[int, list[np.ndarray]], patch: int) -> None:
    graphs = image_graphs[patch]
    nodes = (224 // patch) ** 2
    assert graphs[0].shape == (nodes, nodes)
    counts = communities(assert_agreement(graphs))
    assert any(1 < count < nodes for count in counts), counts


def low_rank_graph(rng: np.random.Generator, nodes: int, rank: int, density: float) -> np.ndarray:
    """``k k^T > offset`` for random rank-``rank`` keys, the offset set so ``density`` of pairs connect."""
    keys = rng.standard_normal((nodes, rank)).astype(np.float32)
    products = keys @ keys.T
    offset = np.quantile(products, 1.0 - density)
    adjacency = products > offset
    np.fill_diagonal(adjacency, True)
    return adjacency


def block_graph(rng: np.random.Generator, nodes: int, blocks: int, noise: float) -> np.ndarray:
    """``k k^T > 0`` for keys around ``blocks`` centred (hence mutually obtuse) centres."""
    centres = rng.standard_normal((blocks, 32)).astype(np.float32)
    centres -= centres.mean(axis=0)
    keys = centres[rng.integers(0, blocks, nodes)] + noise * rng.standard_normal((nodes, 32)).astype(np.float32)
    return (keys @ keys.T) > 0


def test_sparse_low_rank_key_graphs() -> None:
    rng = np.random.default_rng(0)
    graphs = [
        low_rank_graph(rng, int(rng.choice([196, 400, 784])), int(rng.integers(3, 24)), float(rng.uniform(0.05, 0.5)))
        for _ in range(12)
    ]
    assert all(0.04 < graph.mean() < 0.52 for graph in graphs)
    assert min(communities(assert_agreement(graphs))) > 1


def test_block_structured_key_graphs() -> None:
    rng = np.random.default_rng(1)
    graphs = [
        block_graph(rng, int(rng.choice([196, 784])), int(rng.integers(2, 12)), float(rng.uniform(0.3, 1.5)))
        for _ in range(12)
    ]
    assert min(communities(assert_agreement(graphs))) > 1


def small_cliques_graph(rng: np.random.Generator, nodes: int, link_probability: float) -> np.ndarray:
    """Cliques of 2-3 nodes plus random links: hundreds of clusters after the first level, then more levels."""
    sizes = rng.integers(2, 4, nodes)
    starts = np.cumsum(sizes)
    starts = np.concatenate([[0], starts[starts < nodes], [nodes]])
    adjacency = np.zeros((nodes, nodes), dtype=bool)
    for start, stop in zip(starts[:-1], starts[1:]):
        adjacency[start:stop, start:stop] = True
    links = rng.random((nodes, nodes)) < link_probability
    return adjacency | links | links.T


def test_many_small_clique_graphs() -> None:
    """Hundreds of clusters at the first aggregation (its bit-walk branch), and up to four levels."""
    rng = np.random.default_rng(4)
    graphs = [small_cliques_graph(rng, 784, p) for p in (0.0, 0.002, 0.003, 0.005, 0.01)]
    assert_agreement(graphs)


@pytest.mark.parametrize("resolution", [0.5, 1.5, 3.0])
def test_resolution(resolution: float) -> None:
    rng = np.random.default_rng(2)
    graphs = [low_rank_graph(rng, 196, 6, 0.3) for _ in range(3)] + [block_graph(rng, 196, 5, 0.8) for _ in range(3)]
    assert_agreement(graphs, resolution)


def test_directed_graphs() -> None:
    """Asymmetric input: scikit-network keeps out- and in-degrees apart and weighs A + A^T."""
    rng = np.random.default_rng(3)
    graphs = [rng.random((n, n)) < p for n, p in [(60, 0.05), (196, 0.1), (196, 0.3), (300, 0.02)]]
    graphs += [block_graph(rng, 196, 4, 0.8) & (rng.random((196, 196)) < 0.8) for _ in range(3)]
    assert not any(np.array_equal(graph, graph.T) for graph in graphs)
    assert_agreement(graphs)


def cliques(sizes: list[int], ring: bool = False, self_loops: bool = True) -> np.ndarray:
    """Cliques joined in a chain (or a ring) by one edge between their first nodes."""
    starts = np.cumsum([0] + sizes)
    adjacency = np.zeros((starts[-1], starts[-1]), dtype=bool)
    for start, stop in zip(starts[:-1], starts[1:]):
        adjacency[start:stop, start:stop] = True
    links = len(sizes) if ring else len(sizes) - 1
    for a in range(links):
        b = (a + 1) % len(sizes)
        adjacency[starts[a], starts[b]] = adjacency[starts[b], starts[a]] = True
    if not self_loops:
        np.fill_diagonal(adjacency, False)
    return adjacency


TINY_GRAPHS = {
    "two cliques": cliques([5, 5]),
    "ring of cliques": cliques([4] * 8, ring=True),
    "ring of uneven cliques": cliques([3, 5, 4, 6, 3], ring=True),
    "ring without self-loops": cliques([4] * 8, ring=True, self_loops=False),
    "single node": np.ones((1, 1), dtype=bool),
    "only self-loops": np.eye(7, dtype=bool),
    "isolated nodes": np.pad(cliques([4, 4]), ((0, 3), (0, 3))),
    "path": np.eye(10, k=1, dtype=bool) | np.eye(10, k=-1, dtype=bool),
    "complete": np.ones((20, 20), dtype=bool),
    "directed chain": np.eye(6, k=1, dtype=bool),
}


@pytest.mark.parametrize("resolution", [1.0, 0.5, 2.0, 0.0])
@pytest.mark.parametrize("name", list(TINY_GRAPHS))
def test_tiny_graphs(name: str, resolution: float) -> None:
    assert_agreement([TINY_GRAPHS[name]], resolution)


def test_known_partition() -> None:
    """Two cliques joined by one edge: one community each, the larger first."""
    labels = louvain(cliques([6, 4]))
    assert labels.dtype == np.int64
    assert labels.tolist() == [0] * 6 + [1] * 4


def test_inputs() -> None:
    """0/1 integers equal booleans; non-square or edgeless matrices are refused like scikit-network."""
    graph = cliques([4] * 5, ring=True)
    assert np.array_equal(louvain(graph.astype(np.uint8)), louvain(graph))
    assert np.array_equal(louvain(graph.astype(np.float32)), louvain(graph))
    assert np.array_equal(louvain(np.asfortranarray(graph)), louvain(graph))
    with pytest.raises(ValueError, match="square"):
        louvain(np.ones((3, 4), dtype=bool))
    with pytest.raises(ValueError, match="empty"):
        louvain(np.zeros((5, 5), dtype=bool))
    with pytest.raises(ValueError, match="empty"):
        reference(np.zeros((5, 5), dtype=bool))


def test_new_process_loads_compiled_code_from_cache() -> None:
    """A fresh process (as a spawned worker is) finds the compiled engine in numba's cache."""
    louvain(cliques([3, 3]))
    probe = (
        "import numpy as np; from datus.discovery.louvain import louvain, _louvain_core; "
        "louvain(np.eye(3, dtype=bool)); "
        "print(sum(_louvain_core.stats.cache_hits.values()), sum(_louvain_core.stats.cache_misses.values()))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    hits, misses = map(int, result.stdout.split())
    assert (hits, misses) == (1, 0)
