"""Label-free diagnostics on hand-made records, modularity against scikit-network, shards carrying it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import sparse
from sknetwork.clustering import Louvain, get_modularity

from datus.stages.clustering import ClusterModel, fit_clusters
from datus.discovery.communities import discover_segments, modularity
from datus.stages.diagnostics import (
    PANEL_WIDTH,
    console_line,
    count_histogram,
    diagnostics_panel,
    measure,
    second_settings,
    stability,
)
from datus.core.io import write_npz
from datus.runfolder.records import ImageRecord
from datus.core.settings import ClusterSettings
from datus.runfolder.shards import ShardError, read_records, write_shard


def record(
    image_id: str,
    segment_map: np.ndarray,
    is_noise: list[bool],
    embeddings: np.ndarray,
    orig_size: tuple[int, int],
    modularity: float = 0.5,
    image_embedding: np.ndarray | None = None,
) -> ImageRecord:
    """A record whose noise segments all borrow the label of the first valid segment."""
    noise = np.array(is_noise, dtype=bool)
    valid = int((~noise).sum())
    donors = np.where(noise, 0, np.cumsum(~noise) - 1) if valid else np.full(len(noise), -1)
    return ImageRecord(
        image_id=image_id,
        image_path=f"/nowhere/{image_id}.png",
        mask_path="",
        orig_size=orig_size,
        segment_map=segment_map.astype(np.int32),
        sizes=np.bincount(segment_map.ravel(), minlength=len(noise)).astype(np.int32),
        is_noise=noise,
        donors=donors.astype(np.int32),
        embeddings=np.asarray(embeddings, dtype=np.float16).reshape(valid, 2),
        image_embedding=np.asarray(image_embedding if image_embedding is not None else [1, 0], dtype=np.float16),
        cls_attention=np.zeros(segment_map.shape, dtype=np.float16),
        modularity=modularity,
    )


LEFT, RIGHT = [1.0, 0.0], [0.0, 1.0]
MODEL = ClusterModel(np.array([LEFT, RIGHT]), None, None, "sklearn", "k-means++", 0, 0.0, 1)
"""Two clusters: 0 around (1, 0), 1 around (0, 1)."""


def hand_made_run() -> list[list[ImageRecord]]:
    """Three images in two shards, with counts and areas worked out by hand below.

    a: 4x4 grid, 40x40 px (100 px per patch). Segment 0 (8 patches, valid, cluster 0), segment 1
       (4 patches, valid, cluster 1), segment 2 (4 patches, noise, donor segment 0 -> cluster 0).
    b: 2x2 grid, 10x20 px (50 px per patch). Segment 0 (3 patches, valid, cluster 1), segment 1
       (1 patch, noise, donor -> cluster 1).
    c: 2x2 grid, 20x20 px (100 px per patch). One noise segment of 4 patches, no valid segment:
       the image embedding labels it, cluster 1.
    """
    a_map = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 2, 2]])
    a = record("a", a_map, [False, False, True], [LEFT, RIGHT], (40, 40), modularity=0.2)
    b = record("b", np.array([[0, 0], [0, 1]]), [False, True], [RIGHT], (10, 20), modularity=0.4)
    c_map = np.zeros((2, 2), dtype=int)
    c = record("c", c_map, [True], np.zeros((0, 2)), (20, 20), modularity=float("nan"), image_embedding=RIGHT)
    return [[b, a], [c]]


def test_counts_noise_pixels_and_cluster_sizes_match_hand_counts() -> None:
    diagnostics = measure(hand_made_run(), MODEL, None)
    assert sorted(diagnostics.valid_per_image.tolist()) == [0, 1, 2]  # one per image, in shard order
    assert diagnostics.noise_per_image.tolist() == [1, 1, 1]
    assert diagnostics.images_without_valid_segments == 1
    assert diagnostics.total_pixels == 1600 + 200 + 400
    assert diagnostics.noise_pixels == 400 + 50 + 400
    assert diagnostics.noise_pixel_fraction == pytest.approx(850 / 2200)
    assert diagnostics.clusters.segments.tolist() == [1, 2]
    assert diagnostics.clusters.pixels.tolist() == pytest.approx([800 + 400, 400 + 200 + 400])
    assert diagnostics.clusters.pixel_share.sum() == pytest.approx(1.0)
    summary = diagnostics.summary()
    assert summary["segments_per_image"]["valid"]["histogram"] == {"bin_edges": [0, 1, 2, 3], "counts": [1, 1, 1]}
    assert summary["segments_per_image"]["noise"]["histogram"] == {"bin_edges": [0, 1, 2], "counts": [0, 3]}
    assert summary["clusters"]["pixels"] == [1200, 1000]
    assert summary["clusters"]["largest_pixel_share"] == pytest.approx(1200 / 2200)
    assert summary["modularity"] == {"mean": pytest.approx(0.3), "min": 0.2, "max": 0.4, "images": 2}


def test_shard_order_does_not_change_the_numbers() -> None:
    batches = hand_made_run()
    shuffled = [[record for batch in batches for record in batch][::-1]]
    assert measure(batches, MODEL, None).summary() == measure(shuffled, MODEL, None).summary()


def test_histogram_bins_are_one_per_count_then_wider() -> None:
    edges, counts = count_histogram(np.array([0, 3, 3, 19]))
    assert edges.tolist() == list(range(21)) and counts.sum() == 4 and counts[3] == 2
    edges, counts = count_histogram(np.array([0, 20, 45]))
    assert edges.tolist() == list(range(0, 51, 3)) and counts.sum() == 3
    assert len(counts) <= 20


def blobs(centres: np.ndarray, per_blob: int, spread: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([centre + spread * rng.normal(size=(per_blob, centres.shape[1])) for centre in centres])


def test_stability_is_one_for_well_separated_blobs() -> None:
    data = blobs(np.eye(3) * 10, 40, 0.1).astype(np.float32)
    labels = np.repeat(np.arange(3), 40)[::-1].copy()  # any numbering: ARI ignores it
    assert stability(data, labels, second_settings(ClusterSettings(num_clusters=3))) == pytest.approx(1.0)


def test_stability_drops_when_the_clusters_are_forced() -> None:
    data = np.random.default_rng(1).uniform(size=(400, 2)).astype(np.float32)  # no clusters at all
    settings = ClusterSettings(num_clusters=12)
    labels = fit_clusters(data, settings).assign(data)
    assert stability(data, labels, second_settings(settings)) < 0.95
    shuffled = np.random.default_rng(2).permutation(labels)
    assert stability(data, shuffled, second_settings(settings)) < 0.1


def test_stability_needs_two_segments_and_uses_the_next_seed_in_sklearn() -> None:
    assert stability(np.zeros((1, 2), np.float32), np.zeros(1, np.int64), second_settings(ClusterSettings())) is None
    second = second_settings(ClusterSettings(num_clusters=4, engine="torch", seed=2**32 - 1, pca_components=3))
    assert (second.seed, second.engine, second.num_clusters, second.pca_components) == (0, "sklearn", 4, 3)


def test_stability_of_an_impossible_second_fit_is_none() -> None:
    data = np.eye(3, dtype=np.float32)
    assert stability(data, np.arange(3), second_settings(ClusterSettings(num_clusters=5))) is None


def graphs() -> list[tuple[str, np.ndarray]]:
    """Graphs with self-loops: two cliques and a bridge, a ring, key graphs as in datus, a directed one."""
    cliques = np.zeros((8, 8), dtype=bool)
    cliques[:4, :4] = cliques[4:, 4:] = True
    cliques[3, 4] = cliques[4, 3] = True
    loops = np.eye(9, dtype=bool)
    ring = loops | np.roll(loops, 1, axis=1) | np.roll(loops, -1, axis=1)
    rng = np.random.default_rng(3)
    keys = rng.normal(size=(64, 6))
    similar = keys @ keys.T > 0
    directed = rng.uniform(size=(12, 12)) < 0.3
    np.fill_diagonal(directed, True)
    many = rng.normal(size=(1100, 6))  # more rows than one block of datus.discovery.communities.modularity
    return [("cliques", cliques), ("ring", ring), ("keys", similar), ("directed", directed), ("many keys", many @ many.T > 0)]


@pytest.mark.parametrize("resolution", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("name, adjacency", graphs())
def test_modularity_equals_scikit_network(name: str, adjacency: np.ndarray, resolution: float) -> None:
    weights = sparse.csr_matrix(adjacency, dtype=np.float64)
    louvain = Louvain(resolution=resolution).fit_predict(weights)
    arbitrary = np.arange(len(adjacency)) % 3
    for labels in (louvain, arbitrary, np.zeros(len(adjacency), dtype=int)):
        expected = get_modularity(weights, labels, resolution=resolution)
        assert modularity(adjacency, labels, resolution) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_two_cliques_have_the_modularity_worked_out_by_hand() -> None:
    adjacency = graphs()[0][1]
    # w = 2 x 16 + 2 = 34; inside = 32; each half has weight 17: Q = 32/34 - 2 x (17/34)^2
    assert modularity(adjacency, np.repeat([0, 1], 4)) == pytest.approx(32 / 34 - 0.5)
    assert modularity(np.zeros((3, 3), dtype=bool), np.zeros(3, dtype=int)) == 0.0


def test_discovered_segments_carry_their_louvain_modularity() -> None:
    adjacency = graphs()[2][1]
    partition = discover_segments(np.packbits(adjacency, axis=-1), (8, 8), 1.0, 1, "sknetwork")
    weights = sparse.csr_matrix(adjacency, dtype=np.float64)
    expected = get_modularity(weights, Louvain().fit_predict(weights))
    assert partition.modularity == pytest.approx(expected, rel=1e-12)


def test_shards_carry_modularity_and_old_shards_read_as_not_recorded(tmp_path: Path) -> None:
    grid = np.array([[0, 0], [0, 1]])
    records = [record(name, grid, [False, True], [LEFT], (10, 10), value) for name, value in (("x", 0.4), ("y", 0.2))]
    records.append(record("z", grid, [False, True], [RIGHT], (10, 10), float("nan")))
    write_shard(tmp_path / "rank000-0000000.npz", records)
    read = read_records(tmp_path / "rank000-0000000.npz")
    assert [r.modularity for r in read[:2]] == [0.4, 0.2] and np.isnan(read[2].modularity)

    with np.load(tmp_path / "rank000-0000000.npz") as data:
        arrays = {key: data[key] for key in data.files}
    write_npz(tmp_path / "old.npz", {key: value for key, value in arrays.items() if key != "modularity"})
    assert all(np.isnan(r.modularity) for r in read_records(tmp_path / "old.npz"))

    write_npz(tmp_path / "short.npz", {**arrays, "modularity": arrays["modularity"][:2]})
    with pytest.raises(ShardError, match="modularity"):
        read_records(tmp_path / "short.npz")
    write_npz(tmp_path / "text.npz", {**arrays, "modularity": np.array(["a", "b", "c"])})
    with pytest.raises(ShardError, match="modularity"):
        read_records(tmp_path / "text.npz")


def test_panel_and_console_line_show_the_numbers() -> None:
    diagnostics = measure(hand_made_run(), MODEL, None)
    colours = np.array([[255, 0, 0], [0, 0, 255]], dtype=np.uint8)
    healthy = {"status": "healthy", "reasons": []}
    with_gallery = diagnostics_panel(diagnostics, colours, gallery=True, judged=healthy)
    without = diagnostics_panel(diagnostics, colours, gallery=False, judged=healthy)
    assert with_gallery.width == without.width == PANEL_WIDTH
    assert with_gallery.height > without.height  # the line saying where the galleries are
    pixels = np.asarray(with_gallery)
    assert (pixels == [255, 0, 0]).all(axis=-1).any() and (pixels == [0, 0, 255]).all(axis=-1).any()
    line = console_line(diagnostics.summary())
    assert "38.6% of pixels in noise" in line and "modularity 0.300" in line


def _diagnostics_summary(**changes: Any) -> dict[str, Any]:
    """A healthy run's diagnostics object, with ``changes`` applied."""
    summary = {
        "noise_pixel_fraction": 0.04, "images_without_valid_segments": 0, "modularity": {"mean": 0.45},
        "clusters": {"largest_pixel_share": 0.3, "pixels": [30, 25, 25, 20], "empty": []}, "stability": {"ari": 0.93},
    }  # fmt: skip
    for key, value in changes.items():
        if isinstance(value, dict):
            summary[key] = {**summary[key], **value}
        else:
            summary[key] = value
    return summary


@pytest.mark.parametrize(
    ("changes", "random_weights", "reason"),
    [({}, True, "random weights"), ({"noise_pixel_fraction": 0.47}, False, "47% of pixels in noise"),
     ({"images_without_valid_segments": 3}, False, "3 of 10 images without a valid segment"),
     ({"modularity": {"mean": 0.03}}, False, "mean modularity 0.03"),
     ({"clusters": {"largest_pixel_share": 0.9}}, False, "one cluster holds 90%"),
     ({"clusters": {"empty": [2]}}, False, "1 clusters without a valid segment"),
     ({"stability": {"ari": 0.51}}, False, "stability ARI 0.51")],
)  # fmt: skip
def test_the_verdict_names_each_broken_number(changes: dict[str, Any], random_weights: bool, reason: str) -> None:
    from datus.stages.diagnostics import verdict

    assert verdict(_diagnostics_summary(), 10, False) == {"status": "healthy", "reasons": []}
    judged = verdict(_diagnostics_summary(**changes), 10, random_weights)
    assert judged["status"] == "suspicious" and len(judged["reasons"]) == 1 and reason in judged["reasons"][0]


@pytest.mark.parametrize(
    ("stabilities", "empty", "expected"),
    [({2: 0.99, 3: 0.95, 4: 0.9, 6: 0.62, 8: 0.51}, {}, 4),  # the largest K still agreed on
     ({3: 1.0, 4: 0.8, 5: 0.75}, {5: 1}, 4),  # an empty cluster disqualifies
     ({5: 0.4, 6: 0.55, 7: 0.5}, {}, 6),  # none agreed on: the most stable
     ({3: None}, {}, None)],
)  # fmt: skip
def test_the_suggested_k_follows_its_rule(stabilities: dict[int, float | None], empty: dict[int, int], expected: int | None) -> None:
    from datus.outputs.describe import format_sweep, suggested_k

    rows = [{"k": k, "stability_ari": ari, "largest_pixel_share": 0.3, "empty_clusters": empty.get(k, 0)} for k, ari in stabilities.items()]
    assert suggested_k(rows) == expected
    text = format_sweep(rows)
    agreed = any(ari is not None and ari >= 0.7 and not empty.get(k) for k, ari in stabilities.items())
    assert (f"suggested K (label-free): {expected}," in text) == (expected is not None and agreed)
    assert (f"K = {expected} is only the most stable" in text) == (expected is not None and not agreed)
