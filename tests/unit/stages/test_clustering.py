"""Stage 6 (``datus.stages.clustering``): both engines, PCA, determinism, persistence and DDP.

Blob data is generated here: six well-separated Gaussian blobs in 32-D, L2-normalised like
segment embeddings, so that every correct k-means run finds exactly the generating partition.

scikit-learn is imported inside the tests that use it, not at module level: the DDP test's
spawned workers import this module, and scikit-learn (with scipy) would add seconds to the
start of each.
"""

from __future__ import annotations

import datetime
import math
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from threadpoolctl import threadpool_limits

from datus.stages.clustering import ClusterModel, fit_clusters, fit_rows
from datus.stages.clustering.streamed import Rows, lloyd
from datus.runfolder.records import splitmix64
from datus.core.collective import Collective
from datus.core.errors import ConfigurationError
from datus.core.settings import ClusterSettings

NUM_BLOBS = 6
DIM = 32
NUM_POINTS = 600
RANK0_ROWS = 230
"""Rows held by rank 0 in the DDP test (rank 1 holds the other 370): deliberately unequal."""

RANDOM_INIT_RUNS = 30
"""Random init picks one row per blob with probability 6!/6^6 (1.5 %) and Lloyd cannot leave
the other configurations (two centroids share a blob), so random-init runs keep the best of
many initialisations, as any user of random init must."""


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Run the tiny problems on one thread: OpenMP spin-waiting on a loaded 2-core machine
    makes each small kernel ~30x slower with two threads than with one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(previous)


def adjusted_rand_score(labels: np.ndarray, other: np.ndarray) -> float:
    """scikit-learn's ARI (1.0 exactly when two partitions are equal up to renaming)."""
    from sklearn.metrics import adjusted_rand_score as score

    return float(score(labels, other))


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_blobs

    points, labels = make_blobs(
        n_samples=NUM_POINTS, centers=NUM_BLOBS, n_features=DIM, cluster_std=1.0, center_box=(-10, 10), random_state=0
    )
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32), labels


@pytest.fixture(scope="module")
def anisotropic() -> np.ndarray:
    """Rotated Gaussian data with a distinct spectrum and a large mean, for PCA comparisons."""
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
    scales = np.geomspace(3.0, 0.05, DIM)
    return ((rng.normal(size=(500, DIM)) * scales) @ rotation + 5.0).astype(np.float32)


def _runs(init: str) -> int:
    return RANDOM_INIT_RUNS if init == "random" else 1


def _label_map(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """For partitions known to be equal: the ``target`` label of every ``source`` label."""
    return np.array([target[source == label][0] for label in range(source.max() + 1)])


@pytest.mark.parametrize("engine", ["sklearn", "torch"])
@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_recovers_blobs(blobs: tuple[np.ndarray, np.ndarray], engine: str, init: str) -> None:
    points, truth = blobs
    model = fit_clusters(points, ClusterSettings(num_clusters=NUM_BLOBS, engine=engine, init=init, seed=0), n_init=_runs(init))
    assert adjusted_rand_score(truth, model.assign(points)) == 1.0
    assert model.centroids.shape == (NUM_BLOBS, DIM) and model.centroids.dtype == np.float32
    assert (model.engine, model.init, model.pca_mean, model.pca_components) == (engine, init, None, None)
    assert model.n_iter >= 1 and model.inertia > 0


def test_minibatch_recovers_blobs(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    points, truth = blobs
    model = fit_clusters(points, ClusterSettings(num_clusters=NUM_BLOBS, engine="sklearn", minibatch=True, seed=0), batch_size=256)
    assert adjusted_rand_score(truth, model.assign(points)) == 1.0


@pytest.fixture(scope="module")
def realistic() -> np.ndarray:
    """4,000 overlapping 64-d fp16 'segment embeddings' around 12 centres: k-means has local optima here."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(12, 64))
    points = centres[rng.integers(0, 12, 4000)] + 0.9 * rng.normal(size=(4000, 64))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float16)


@pytest.mark.parametrize("engine", ["sklearn", "torch"])
@pytest.mark.parametrize("pca_components", [None, 16])
def test_streamed_fit_is_as_good_as_in_memory_scikit_learn(realistic: np.ndarray, engine: str, pca_components: int | None) -> None:
    """The streamed fit (sample-initialised, chunked Lloyd) reaches scikit-learn's in-memory KMeans
    inertia within 0.5 %, measured in the same space. The data has several local optima that
    single k-means++ draws of either implementation land in a third of the time, so both keep the
    best of ten initialisations."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    data = realistic.astype(np.float32)
    space = data if pca_components is None else PCA(pca_components, svd_solver="covariance_eigh").fit_transform(data)
    settings = ClusterSettings(num_clusters=12, engine=engine, pca_components=pca_components, seed=0)
    ours = fit_clusters(realistic, settings, n_init=10).inertia
    assert ours <= 1.005 * KMeans(n_clusters=12, n_init=10, random_state=0).fit(space).inertia_


def test_streamed_minibatch_is_as_good_as_in_memory_minibatch(realistic: np.ndarray) -> None:
    from sklearn.cluster import MiniBatchKMeans

    ours = [fit_clusters(realistic, ClusterSettings(num_clusters=12, minibatch=True, seed=seed), batch_size=256).inertia for seed in range(3)]
    theirs = [
        MiniBatchKMeans(n_clusters=12, batch_size=256, n_init=1, random_state=seed).fit(realistic.astype(np.float32)).inertia_
        for seed in range(3)
    ]
    assert np.mean(ours) <= 1.005 * np.mean(theirs)


@pytest.mark.parametrize("engine", ["sklearn", "torch"])
def test_row_order_does_not_change_the_model(realistic: np.ndarray, engine: str) -> None:
    """Rows carry their keys: shuffled rows give the very same centroids (exact float64 sums of fp16)."""
    keys = splitmix64(np.arange(len(realistic), dtype=np.uint64))
    order = np.random.default_rng(5).permutation(len(realistic))
    settings = ClusterSettings(num_clusters=12, engine=engine, seed=0)
    straight = fit_rows(Rows(realistic, keys, torch.device("cpu")), settings)
    shuffled = fit_rows(Rows(realistic[order], keys[order], torch.device("cpu")), settings)
    np.testing.assert_array_equal(straight.centroids, shuffled.centroids)
    assert straight.inertia == pytest.approx(shuffled.inertia, rel=1e-9)


def test_memory_mapped_table_is_read_in_place(realistic: np.ndarray, tmp_path: Path) -> None:
    """A table on disk is fitted through its memory map and gives the in-memory model."""
    np.save(tmp_path / "table.npy", realistic)
    mapped = np.load(tmp_path / "table.npy", mmap_mode="r")
    settings = ClusterSettings(num_clusters=12, engine="torch", seed=0)
    np.testing.assert_array_equal(fit_clusters(mapped, settings).centroids, fit_clusters(realistic, settings).centroids)


def test_torch_matches_sklearn_kmeans(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    from sklearn.cluster import KMeans

    points, _ = blobs
    model = fit_clusters(points, ClusterSettings(num_clusters=NUM_BLOBS, engine="torch", seed=0))
    reference = KMeans(n_clusters=NUM_BLOBS, n_init=1, random_state=0).fit(points)
    labels = model.assign(points)
    assert adjusted_rand_score(reference.labels_, labels) == 1.0
    order = _label_map(labels, reference.labels_)
    np.testing.assert_allclose(model.centroids, reference.cluster_centers_[order], atol=1e-4)
    assert math.isclose(model.inertia, reference.inertia_, rel_tol=1e-4)


def test_torch_pca_spans_sklearn_subspace(anisotropic: np.ndarray) -> None:
    from sklearn.decomposition import PCA

    model = fit_clusters(anisotropic, ClusterSettings(num_clusters=4, engine="torch", pca_components=8, seed=0))
    pca = PCA(n_components=8).fit(anisotropic)
    assert model.pca_components is not None and model.pca_mean is not None
    np.testing.assert_allclose(model.pca_mean, pca.mean_, atol=1e-4)
    projector = model.pca_components.T @ model.pca_components
    np.testing.assert_allclose(projector, pca.components_.T @ pca.components_, atol=1e-4)


@pytest.mark.parametrize("engine", ["sklearn", "torch"])
def test_distances_are_squared_distances_to_centroids_after_pca(anisotropic: np.ndarray, engine: str) -> None:
    model = fit_clusters(anisotropic, ClusterSettings(num_clusters=3, engine=engine, pca_components=5, seed=0))
    assert model.pca_components is not None and model.pca_components.shape == (5, DIM)
    assert model.centroids.shape == (3, 5) and (model.input_dim, model.output_dim) == (DIM, 5)
    assert model.pca_mean is not None
    projected = (anisotropic[:20] - model.pca_mean) @ model.pca_components.T
    expected = ((projected[:, None, :] - model.centroids[None]) ** 2).sum(-1)
    distances = model.distances(anisotropic[:20])
    np.testing.assert_allclose(distances, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(distances.argmin(1), model.assign(anisotropic[:20]))


@pytest.mark.parametrize("engine", ["sklearn", "torch"])
@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_same_seed_same_model(blobs: tuple[np.ndarray, np.ndarray], engine: str, init: str) -> None:
    points, _ = blobs
    first, second = (
        fit_clusters(points, ClusterSettings(num_clusters=NUM_BLOBS, engine=engine, init=init, pca_components=8, seed=7), n_init=3) for _ in range(2)
    )
    np.testing.assert_array_equal(first.centroids, second.centroids)
    np.testing.assert_array_equal(first.pca_components, second.pca_components)
    np.testing.assert_array_equal(first.assign(points), second.assign(points))
    assert (first.inertia, first.n_iter) == (second.inertia, second.n_iter)


@pytest.mark.parametrize("pca_components", [None, 8])
def test_save_load_round_trip(blobs: tuple[np.ndarray, np.ndarray], tmp_path: Path, pca_components: int | None) -> None:
    points, _ = blobs
    model = fit_clusters(points, ClusterSettings(num_clusters=NUM_BLOBS, engine="torch", pca_components=pca_components, seed=0))
    model.save(tmp_path / "k6")
    loaded = ClusterModel.load(tmp_path / "k6")
    np.testing.assert_array_equal(loaded.centroids, model.centroids)
    for name in ("pca_mean", "pca_components"):
        expected = getattr(model, name)
        assert (getattr(loaded, name) is None) if expected is None else np.array_equal(getattr(loaded, name), expected)
    assert (loaded.engine, loaded.init, loaded.seed, loaded.inertia, loaded.n_iter) == (
        model.engine,
        model.init,
        model.seed,
        model.inertia,
        model.n_iter,
    )
    np.testing.assert_array_equal(loaded.assign(points), model.assign(points))


def test_save_without_pca_removes_stale_pca_files(blobs: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    points, _ = blobs
    fit_clusters(points, ClusterSettings(num_clusters=NUM_BLOBS, engine="torch", pca_components=8)).save(tmp_path)
    fit_clusters(points, ClusterSettings(num_clusters=NUM_BLOBS, engine="torch")).save(tmp_path)
    assert ClusterModel.load(tmp_path).pca_mean is None
    assert sorted(path.name for path in tmp_path.iterdir()) == ["centroids.npy", "model.json"]


def test_load_without_model_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no model\.json"):
        ClusterModel.load(tmp_path)


@pytest.mark.parametrize("pca_components", [None, 8])
def test_assign_float16(blobs: tuple[np.ndarray, np.ndarray], pca_components: int | None) -> None:
    points, truth = blobs
    model = fit_clusters(points, ClusterSettings(num_clusters=NUM_BLOBS, engine="torch", pca_components=pca_components, seed=0))
    labels = model.assign(points)
    half = model.assign(points.astype(np.float16))
    assert half.dtype == np.int64
    np.testing.assert_array_equal(half, labels)
    half_tensor = model.assign(torch.from_numpy(points).half())
    assert isinstance(half_tensor, torch.Tensor) and half_tensor.dtype == torch.int64
    np.testing.assert_array_equal(half_tensor.numpy(), labels)
    fitted_on_half = fit_clusters(torch.from_numpy(points).half(), ClusterSettings(num_clusters=NUM_BLOBS, engine="torch", seed=0))
    assert adjusted_rand_score(truth, fitted_on_half.assign(points)) == 1.0


def test_empty_cluster_is_reseeded_with_farthest_point(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    """Five centroids on five blobs and one far away: the far one attracts nothing, is moved to
    the point farthest from its centroid (in the sixth blob), and the blobs are recovered."""
    points, truth = blobs
    start = np.stack([points[truth == blob].mean(0) for blob in range(NUM_BLOBS - 1)] + [np.full(DIM, 10.0)])
    start_tensor = torch.from_numpy(start.astype(np.float32))
    rows = Rows(torch.from_numpy(points), splitmix64(np.arange(len(points), dtype=np.uint64)), torch.device("cpu"))
    centroids, inertia, _ = lloyd(rows, start_tensor, 50, 0.0, Collective.current())
    assert torch.isfinite(centroids).all() and math.isfinite(inertia)
    nearest = torch.cdist(torch.from_numpy(points), centroids).argmin(1).numpy()
    assert adjusted_rand_score(truth, nearest) == 1.0


@pytest.mark.filterwarnings("ignore:Number of distinct clusters")
@pytest.mark.parametrize("engine", ["sklearn", "torch"])
def test_more_clusters_than_distinct_points_stays_finite(engine: str) -> None:
    points = np.repeat(np.eye(3, DIM, dtype=np.float32), 4, axis=0)
    model = fit_clusters(points, ClusterSettings(num_clusters=5, engine=engine, seed=0))
    assert np.isfinite(model.centroids).all()
    assert model.inertia == pytest.approx(0.0, abs=1e-6)


def _with_nan(points: np.ndarray) -> np.ndarray:
    broken = points.copy()
    broken[3, 5] = np.nan
    return broken


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_clusters": 0}, "--cluster.num_clusters must be >= 1, got 0"),
        ({"pca_components": 0}, "--cluster.pca_components must be >= 1 or null"),
        ({"init": "kmeans"}, "--cluster.init must be one of"),
        ({"engine": "faiss"}, "--cluster.engine must be one of"),
        ({"seed": -1}, "--cluster.seed must be in"),
        ({"engine": "torch", "minibatch": True}, "--cluster.minibatch true needs --cluster.engine sklearn"),
    ],
)
def test_invalid_settings_name_the_option(change: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ClusterSettings(**{"num_clusters": NUM_BLOBS, **change})  # type: ignore[arg-type]


@pytest.mark.parametrize("engine", ["sklearn", "torch"])
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_clusters": NUM_POINTS + 1}, f"num_clusters={NUM_POINTS + 1} exceeds the number of embeddings"),
        ({"pca_components": DIM + 1}, f"pca_components={DIM + 1} exceeds the embedding dimension {DIM}"),
        ({"embeddings": np.zeros((0, DIM), np.float32)}, "embeddings is empty"),
        ({"embeddings": "nan"}, "1 NaN or inf values"),
        ({"embeddings": np.zeros((4, 2, 2), np.float32)}, "2-D"),
        ({"embeddings": np.zeros((10, DIM), np.int64)}, "floating point"),
    ],
)
def test_invalid_input_raises(
    blobs: tuple[np.ndarray, np.ndarray], engine: str, change: dict[str, object], message: str
) -> None:
    points, _ = blobs
    change = dict(change)
    embeddings = change.pop("embeddings", points)
    if isinstance(embeddings, str):
        embeddings = _with_nan(points)
    settings = ClusterSettings(**{"num_clusters": NUM_BLOBS, "engine": engine, **change})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        fit_clusters(embeddings, settings)


def test_assign_rejects_bad_input(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    points, _ = blobs
    model = fit_clusters(points, ClusterSettings(num_clusters=NUM_BLOBS, engine="torch", seed=0))
    with pytest.raises(ValueError, match=rf"shape \(N, {DIM}\)"):
        model.assign(points[:, :8])
    with pytest.raises(ValueError, match="NaN or inf"):
        model.assign(_with_nan(points))
    assert model.assign(points[:0]).shape == (0,)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _ddp_worker(rank: int, port: int, points: np.ndarray, out_dir: Path) -> None:
    """One of two gloo ranks: three fits, each rank passing only its own rows."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        own = points[:RANK0_ROWS] if rank == 0 else points[RANK0_ROWS:]
        fit_clusters(torch.from_numpy(own), ClusterSettings(num_clusters=NUM_BLOBS, engine="torch", pca_components=8, seed=0)).save(
            out_dir / f"split_rank{rank}"
        )
        lonely = np.zeros((0, 0), np.float32) if rank == 0 else points
        fit_clusters(lonely, ClusterSettings(num_clusters=NUM_BLOBS, engine="torch", seed=0)).save(out_dir / f"lonely_rank{rank}")
        broken = _with_nan(own) if rank == 0 else own
        try:
            fit_clusters(torch.from_numpy(broken), ClusterSettings(num_clusters=NUM_BLOBS, engine="torch", seed=0))
        except ValueError as error:
            (out_dir / f"error_rank{rank}.txt").write_text(str(error))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="this torch build has no torch.distributed")
def test_ddp_ranks_agree_with_single_process(blobs: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    """Two gloo ranks with 230 and 370 rows: identical models on both, the single-process
    partition, the single-process PCA subspace, and the same error on both ranks when only one
    rank holds a NaN (instead of one rank raising while the other waits in a collective)."""
    points, truth = blobs
    mp.spawn(_ddp_worker, args=(_free_port(), points, tmp_path), nprocs=2, join=True)

    single = fit_clusters(points, ClusterSettings(num_clusters=NUM_BLOBS, engine="torch", pca_components=8, seed=0))
    split = [ClusterModel.load(tmp_path / f"split_rank{rank}") for rank in range(2)]
    np.testing.assert_array_equal(split[0].centroids, split[1].centroids)
    np.testing.assert_array_equal(split[0].pca_components, split[1].pca_components)
    assert split[0].inertia == split[1].inertia
    assert adjusted_rand_score(single.assign(points), split[0].assign(points)) == 1.0
    assert adjusted_rand_score(truth, split[0].assign(points)) == 1.0
    assert single.pca_components is not None and split[0].pca_components is not None
    np.testing.assert_allclose(
        split[0].pca_components.T @ split[0].pca_components, single.pca_components.T @ single.pca_components, atol=1e-4
    )
    assert math.isclose(split[0].inertia, single.inertia, rel_tol=1e-4)

    lonely = [ClusterModel.load(tmp_path / f"lonely_rank{rank}") for rank in range(2)]
    np.testing.assert_array_equal(lonely[0].centroids, lonely[1].centroids)
    assert adjusted_rand_score(truth, lonely[0].assign(points)) == 1.0

    errors = [(tmp_path / f"error_rank{rank}.txt").read_text() for rank in range(2)]
    assert errors[0] == errors[1] and "NaN or inf" in errors[0]
