"""Cluster galleries: which segments are shown, that crops come from their regions, files and flags."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datus.outputs.gallery
from datus.commands.cli import main
from datus.stages.clustering import ClusterModel
from datus.stages.diagnostics import ClusterSizes
from datus.outputs.drawing import OUTLINE_YELLOW
from datus.outputs.gallery import (
    DIM,
    MISSING_GREY,
    RANDOM,
    TILE,
    TYPICAL,
    cut_tiles,
    matched_names,
    segment_tile,
    select_members,
    sheet_size,
    tile_origin,
    write_galleries,
)
from datus.runfolder.records import ImageRecord
from datus.runfolder.run import Results
from tests.generated import TINY, write_datus_layout

COLOURS = np.array([[220, 30, 30], [30, 200, 30], [30, 30, 220], [240, 240, 240]], dtype=np.uint8)
"""Quadrant colours: top-left, top-right, bottom-left, bottom-right (segments 0, 1, 2, 3)."""

QUADRANTS = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]], dtype=np.int32)
"""A 4 x 4 patch grid split into quadrants, numbered in raster order of first appearance."""

MODEL = ClusterModel(np.array([[1.0, 0.0], [0.0, 1.0]]), None, None, "sklearn", "k-means++", 0, 0.0, 1)


def quadrant_picture(width: int = 64, height: int = 48) -> Image.Image:
    """An image whose four quadrants have the four distinct :data:`COLOURS`."""
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    top, left = np.arange(height)[:, None] < height // 2, np.arange(width)[None, :] < width // 2
    for index, region in enumerate([top & left, top & ~left, ~top & left, ~top & ~left]):
        pixels[region] = COLOURS[index]
    return Image.fromarray(pixels)


def quadrant_record(image_id: str, path: Path, embeddings: np.ndarray, size: tuple[int, int] = (48, 64)) -> ImageRecord:
    """Four valid quadrant segments with the given 4 x 2 embeddings."""
    return ImageRecord(
        image_id=image_id,
        image_path=str(path),
        mask_path="",
        orig_size=size,
        segment_map=QUADRANTS,
        sizes=np.full(4, 4, dtype=np.int32),
        is_noise=np.zeros(4, dtype=bool),
        donors=np.arange(4, dtype=np.int32),
        embeddings=np.asarray(embeddings, dtype=np.float16),
        image_embedding=np.array([1, 0], dtype=np.float16),
        cls_attention=np.zeros((4, 4), dtype=np.float16),
    )


def quadrant_run(folder: Path, count: int, seed: int = 0) -> list[ImageRecord]:
    """``count`` quadrant images on disk; top segments lean to cluster 0, bottom ones to cluster 1."""
    rng = np.random.default_rng(seed)
    records = []
    for index in range(count):
        path = folder / f"image {index}.png"
        quadrant_picture().save(path)
        embeddings = np.array([[1, 0], [1, 0], [0, 1], [0, 1]]) + rng.normal(0, 0.2, (4, 2))
        records.append(quadrant_record(f"image {index}", path, embeddings))
    return records


def test_typical_members_are_the_nearest_to_the_centroid_nearest_first(tmp_path: Path) -> None:
    records = quadrant_run(tmp_path, 12)
    members = select_members([records[:5], records[5:]], MODEL, seed=0)
    embeddings = np.concatenate([r.embeddings for r in records]).astype(np.float32)
    labels = MODEL.assign(embeddings)
    distances = MODEL.distances(embeddings)[np.arange(len(labels)), labels]
    names = [(r.image_id, s) for r in records for s in range(4)]
    for cluster in (0, 1):
        rows = np.flatnonzero(labels == cluster)
        nearest = [names[row] for row in rows[np.argsort(distances[rows])][:TYPICAL]]
        assert [m.identity for m in members[cluster].typical] == nearest
        shown = [m.distance for m in members[cluster].typical]
        assert shown == sorted(shown) and max(shown) <= np.sort(distances[rows])[TYPICAL]


def test_random_members_are_seeded_other_than_typical_and_independent_of_shards(tmp_path: Path) -> None:
    records = quadrant_run(tmp_path, 12)
    one_way = select_members([records[:5], records[5:]], MODEL, seed=0)
    other_way = select_members([records[::-1]], MODEL, seed=0)
    reseeded = select_members([records], MODEL, seed=1)
    for cluster in (0, 1):
        typical = {m.identity for m in one_way[cluster].typical}
        drawn = [m.identity for m in one_way[cluster].random]
        assert len(drawn) == RANDOM and typical.isdisjoint(drawn)
        assert drawn == [m.identity for m in other_way[cluster].random]
        assert [m.identity for m in one_way[cluster].typical] == [m.identity for m in other_way[cluster].typical]
    assert [m.identity for m in reseeded[0].random] != [m.identity for m in one_way[0].random]


def test_a_small_cluster_shows_what_it_has() -> None:
    record = quadrant_record("only", Path("/nowhere.png"), [[1, 0], [1, 0], [1, 0], [0, 1]])
    members = select_members([[record]], MODEL, seed=0)
    assert len(members[0].typical) == 3 and members[0].random == []
    assert [m.identity for m in members[1].typical] == [("only", 3)] and members[1].random == []


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_tile_is_cut_from_the_segment_region_with_the_rest_dimmed(scale: float) -> None:
    picture = quadrant_picture(128, 96).resize((round(128 * scale), round(96 * scale)), Image.Resampling.NEAREST)
    tile = np.asarray(segment_tile(picture, QUADRANTS == 1))  # the top-right quadrant
    assert tile.shape == (TILE, TILE, 3)
    # Box: x 64..128 and y 0..48 plus 25% margins -> x 48..128, y 0..60 (clipped), 80 x 60 scaled to 128 x 96.
    top = (TILE - 96) // 2
    assert tile[top + 20, 80].tolist() == COLOURS[1].tolist()  # inside the segment: the image's own colour
    assert tile[top + 20, 8].tolist() == (COLOURS[0] * DIM).round().astype(int).tolist()  # left of it: dimmed
    assert tile[top + 90, 80].tolist() == (COLOURS[3] * DIM).round().astype(int).tolist()  # below it: dimmed
    assert (tile == OUTLINE_YELLOW).all(axis=-1).sum() > 100
    inside = (tile == COLOURS[1]).all(axis=-1)
    assert not inside[: top].any() and not inside[:, :20].any()  # nothing of the segment outside its place


def test_each_shown_image_is_decoded_once_and_a_missing_one_is_grey(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = quadrant_run(tmp_path, 3)
    records.append(quadrant_record("gone", tmp_path / "gone.png", np.array([[1, 0], [1, 0], [0, 1], [0, 1]])))
    decoded: list[str] = []
    load = datus.outputs.gallery.load_rgb

    def counted(path: Path, min_side: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
        decoded.append(str(path))
        return load(path, min_side)

    monkeypatch.setattr(datus.outputs.gallery, "load_rgb", counted)
    members = select_members([records], MODEL, seed=0)
    tiles = cut_tiles(members)
    assert sorted(decoded) == sorted({r.image_path for r in records})
    missing = [tile for (image_id, _), tile in tiles.items() if image_id == "gone"]
    assert missing and all(np.asarray(tile)[TILE // 2, 2].tolist() == list(MISSING_GREY) for tile in missing)


def test_galleries_one_sheet_per_cluster_of_fixed_size_with_crops_of_their_regions(tmp_path: Path) -> None:
    records = quadrant_run(tmp_path, 6)
    results = Results(tmp_path / "results")
    stale = results.gallery_sheet(7)
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"from an earlier K")
    sizes = ClusterSizes(np.array([12, 12]), np.array([1500.0, 1500.0]))
    write_galleries(select_members([records], MODEL, seed=0), results, sizes, matched_names(2, {"0": 1, "1": None}, ["sky", "sea"]), seed=0)
    assert sorted(p.name for p in (results.root / "gallery").iterdir()) == ["cluster_0.png", "cluster_1.png", "index.png"]
    members = select_members([records], MODEL, seed=0)
    for cluster in (0, 1):
        with Image.open(results.gallery_sheet(cluster)) as sheet:
            assert sheet.size == sheet_size()
            pixels = np.asarray(sheet.convert("RGB"))
        for section, shown in enumerate((members[cluster].typical, members[cluster].random)):
            for column, member in enumerate(shown):
                x, y = tile_origin(section, column)
                expected = np.asarray(segment_tile(quadrant_picture(), member.mask))
                assert (pixels[y : y + TILE, x : x + TILE] == expected).all()
                region_colours = {tuple(COLOURS[s]) for s in ((0, 1) if cluster == 0 else (2, 3))}
                centre = tuple(pixels[y + TILE // 2, x + TILE // 2].tolist())
                assert centre in region_colours  # the segment's own region, not another quadrant
    with Image.open(results.gallery_index()) as index:
        assert index.height > 2 * datus.outputs.gallery.INDEX_TILE


def test_matched_names_follow_the_mapping() -> None:
    assert matched_names(3, {"0": 2, "1": None, "2": 0}, ["sky", "sea", "sand"]) == ["class 2 (sand)", None, "class 0 (sky)"]
    assert matched_names(2, None, None) == [None, None]
    assert matched_names(1, {"0": 1}, None) == ["class 1"]


@pytest.mark.integration
def test_cli_writes_diagnostics_and_galleries_unless_turned_off(tmp_path: Path) -> None:
    dataset = write_datus_layout(tmp_path / "data", 5, ["blue", "red"])
    run = tmp_path / "run"
    flags = ["--config", TINY, "--data.root", str(dataset), "--data.split", "train", "--trainer.enable_progress_bar", "false"]
    main(["predict", *flags, "--output_dir", str(run)])
    summary = json.loads((run / "summary.json").read_text())
    diagnostics = summary["diagnostics"]
    assert set(diagnostics) >= {"segments_per_image", "noise_pixel_fraction", "clusters", "modularity", "stability"}
    assert sum(diagnostics["segments_per_image"]["valid"]["histogram"]["counts"]) == 5
    assert diagnostics["modularity"]["images"] == 5 and diagnostics["stability"]["ari"] is not None
    assert len(diagnostics["clusters"]["segments"]) == 3
    assert "gallery" in summary["stage_seconds"]
    sheets = sorted(p.name for p in (run / "gallery").iterdir())
    assert sheets == ["cluster_0.png", "cluster_1.png", "cluster_2.png", "index.png"]

    main(["cluster", "--run", str(run), "--cluster.num_clusters", "2"])
    sheets = sorted(p.name for p in (run / "clusters" / "k2" / "gallery").iterdir())
    assert sheets == ["cluster_0.png", "cluster_1.png", "index.png"]
    main(["cluster", "--run", str(run), "--cluster.num_clusters", "4", "--cluster.gallery", "false"])
    assert not (run / "clusters" / "k4" / "gallery").exists()
    assert "diagnostics" in json.loads((run / "clusters" / "k4" / "summary.json").read_text())

    plain = tmp_path / "plain"
    main(["predict", *flags, "--output_dir", str(plain), "--cluster.gallery", "false"])
    assert not (plain / "gallery").exists() and (plain / "report.png").is_file()
