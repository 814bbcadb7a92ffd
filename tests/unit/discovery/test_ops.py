"""Pure stages on hand-made inputs whose right answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from datus.discovery import communities
from datus.discovery.communities import (
    CommunityPool,
    canonical_labels,
    discover_segments,
    louvain_communities,
    partition_from_communities,
    split_into_components,
    worker_started_early,
)
from datus.outputs.drawing import colourise, palette, palette_picture
from datus.discovery.ops import (
    crop_regions,
    donor_segments,
    key_adjacency,
    mask_boxes,
    masked_crops,
    pack_adjacency,
    segment_masks,
    valid_segment_maps,
)
from datus.stages.paint import label_dtype, upsample_nearest


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to relabelling: a bijection between labels maps one onto the other."""
    pairs = set(zip(a.ravel().tolist(), b.ravel().tolist()))
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def test_adjacency_is_sign_of_key_products_with_self_loops() -> None:
    keys = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0], [0.0, 0.0]]])
    adjacency = key_adjacency(keys)[0]
    expected = torch.tensor(
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool
    )  # a zero key has a zero product with everything, itself included
    assert torch.equal(adjacency, expected)


def test_adjacency_stays_fp32_under_bf16_autocast() -> None:
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 50, 16, generator=generator)
    reference = (keys.double() @ keys.double().transpose(1, 2)) > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        adjacency = key_adjacency(keys)
    assert torch.equal(adjacency, reference)


def test_packed_adjacency_round_trips() -> None:
    adjacency = torch.rand(3, 13, 13) > 0.5
    packed = pack_adjacency(adjacency)
    assert packed.shape == (3, 13, 2)
    assert np.array_equal(np.unpackbits(packed, axis=-1, count=13).astype(bool), adjacency.numpy())


def test_louvain_separates_two_blocks_of_mutually_positive_keys() -> None:
    rng = np.random.default_rng(0)
    keys = rng.normal(3, 0.5, (50, 8))
    keys[:20, 4:] *= -1  # block A points along (+,-), block B along (-,+): products are
    keys[20:, :4] *= -1  # positive inside a block and negative across
    adjacency = keys @ keys.T > 0
    labels = louvain_communities(adjacency)
    assert same_partition(labels, np.repeat([0, 1], [20, 30]))


def test_components_join_diagonal_neighbours_and_split_distant_pieces() -> None:
    communities = np.array(
        [
            [0, 1, 1, 1],
            [1, 0, 1, 0],
            [1, 1, 1, 1],
            [0, 1, 1, 0],
        ]
    )
    components = split_into_components(communities)
    reference = np.zeros_like(communities)
    next_id = 0
    for community in np.unique(communities):
        labelled, count = ndimage.label(communities == community, structure=np.ones((3, 3)))
        reference[labelled > 0] = labelled[labelled > 0] + next_id
        next_id += count
    assert same_partition(components, reference)
    # (0,0) and (1,1) touch diagonally: one segment; (1,3) is alone; the bottom corners are apart
    assert components[0, 0] == components[1, 1]
    assert len({components[1, 3], components[3, 0], components[3, 3], components[0, 0]}) == 4


def test_canonical_labels_number_by_first_appearance() -> None:
    assert canonical_labels(np.array([[7, 7, 3], [9, 3, 3]])).tolist() == [[0, 0, 1], [2, 1, 1]]


@pytest.mark.parametrize(("size", "noise"), [(5, True), (6, False)])
def test_noise_threshold_is_at_most_min_patches(size: int, noise: bool) -> None:
    grid = np.zeros((4, 6), dtype=int)
    grid.ravel()[:size] = 1  # a segment of exactly `size` patches in raster order
    partition = partition_from_communities(grid, min_patches=5)
    segment = partition.segment_map.ravel()[0]
    assert partition.sizes[segment] == size
    assert bool(partition.is_noise[segment]) is noise


@pytest.mark.parametrize("engine", ["fast", "sknetwork"])
def test_discover_segments_on_a_two_region_image(engine: str) -> None:
    """Keys of the left and right halves of a 6x6 grid point in opposite directions."""
    grid = np.zeros((6, 6), dtype=int)
    grid[:, 3:] = 1
    keys = np.where(grid.ravel()[:, None] == 0, 1.0, -1.0) * np.ones((36, 4))
    packed = np.packbits(keys @ keys.T > 0, axis=-1)
    partition = discover_segments(packed, (6, 6), resolution=1.0, min_patches=5, engine=engine)
    assert same_partition(partition.segment_map, grid)
    assert partition.sizes.tolist() == [18, 18] and not partition.is_noise.any()


def test_pool_with_workers_matches_inline_scikit_network() -> None:
    """The fast engine in two worker processes finds scikit-network's partitions, computed inline."""
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(3, 64, 8))
    packed = [np.packbits(k @ k.T > 0, axis=-1) for k in keys]
    inline_pool, worker_pool = CommunityPool(0, 1.0, 5, "sknetwork"), CommunityPool(2, 1.0, 5, "fast")
    try:
        inline = [f.result() for f in inline_pool.submit(packed, (8, 8))]
        workers = [f.result() for f in worker_pool.submit(packed, (8, 8))]
    finally:
        worker_pool.close()
    for a, b in zip(inline, workers):
        assert np.array_equal(a.segment_map, b.segment_map) and np.array_equal(a.is_noise, b.is_noise)




def test_a_worker_started_early_serves_the_first_one_worker_pool_and_a_resized_pool_finishes_its_work() -> None:
    rng = np.random.default_rng(2)
    keys = rng.normal(size=(4, 64, 8))
    packed = [np.packbits(k @ k.T > 0, axis=-1) for k in keys]
    expected = [discover_segments(p, (8, 8), 1.0, 5, "sknetwork") for p in packed]
    with worker_started_early():
        early = communities._early_worker
        larger = CommunityPool(2, 1.0, 5, "fast")  # another size cannot use it
        assert larger._executor is not early
        larger.close()
        pool = CommunityPool(1, 1.0, 5, "fast")
        assert pool._executor is early and communities._early_worker is None
    futures = pool.submit(packed, (8, 8))
    pool.close(cancel_pending=False)  # as when the pool is resized: submitted work still completes
    for future, reference in zip(futures, expected):
        assert np.array_equal(future.result().segment_map, reference.segment_map)


def test_an_early_worker_nobody_adopts_is_stopped() -> None:
    with worker_started_early():
        unused = communities._early_worker
        CommunityPool(0, 1.0, 5, "fast").close()
    assert communities._early_worker is None
    assert unused is not None and unused._shutdown_thread
def test_valid_segments_are_renumbered_and_noise_is_minus_one() -> None:
    segment_map = np.array([[0, 0, 1], [2, 2, 3]])
    valid = valid_segment_maps(segment_map, np.array([False, True, False, True]))
    assert valid.tolist() == [[0, 0, -1], [1, 1, -1]]


def test_noise_segments_take_the_valid_segment_with_the_most_similar_mean_key() -> None:
    """Image 0: two valid segments with opposite keys and two noise patches nearer one or the other.

    Image 1 has no valid segment: every donor is -1 (the image's own embedding labels it).
    """
    keys = torch.zeros(2, 6, 2)
    keys[0] = torch.tensor([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0], [-1.0, 0.1], [-0.2, 1.0], [0.3, 1.0]])
    segment_ids = torch.tensor([[0, 0, 1, 1, 2, 3], [0, 0, 0, 1, 1, 1]])
    is_noise = [torch.tensor([False, False, True, True]), torch.tensor([True, True])]
    donors = donor_segments(keys, segment_ids, is_noise)
    # segment 2's key (-0.2, 1) is closer to segment 1's mean (-1, 0.05); segment 3's to segment 0's
    assert donors[0].tolist() == [0, 1, 1, 0]
    assert donors[1].tolist() == [-1, -1]
    means = np.array([[1.0, 0.05], [-1.0, 0.05]])
    expected = [int(np.argmax(means @ k)) for k in keys[0, 4:].numpy()]
    assert donors[0][2:].tolist() == expected


def test_segment_masks_and_boxes_for_a_batch() -> None:
    maps = torch.tensor([[[0, 0, 1], [2, 2, 1]], [[0, 1, 1], [0, 0, 0]]])
    masks, image_index = segment_masks(maps, torch.tensor([3, 2]))
    assert image_index.tolist() == [0, 0, 0, 1, 1]
    assert masks[2].tolist() == [[False, False, False], [True, True, False]]
    assert mask_boxes(masks).tolist() == [[0, 0, 2, 1], [2, 0, 3, 2], [0, 1, 2, 2], [0, 0, 3, 2], [1, 0, 3, 1]]


def test_crop_regions_paper_and_fit() -> None:
    boxes = torch.tensor([[0, 0, 64, 32]])  # 64 wide, 32 high, centre (32, 16)
    paper = crop_regions(boxes, "paper")
    side = 32 * 224 / 256  # shorter side to 256, centre 224: a square of 87.5% of the short side
    assert torch.allclose(paper, torch.tensor([[32 - side / 2, 16 - side / 2, 32 + side / 2, 16 + side / 2]]))
    fit = crop_regions(boxes, "fit")
    assert torch.allclose(fit, torch.tensor([[0.0, -16.0, 64.0, 48.0]]))


def test_masked_crop_keeps_only_the_segment_and_fills_the_frame() -> None:
    """A 2x2-patch segment in the corner of a white image becomes a white square on black."""
    images = torch.ones(1, 3, 32, 32)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True  # patches of 8 px: the top-left 16x16 pixels
    crops = masked_crops(images, mask, torch.tensor([0]), patch_size=8, recipe="fit", output_size=16)
    assert crops.shape == (1, 3, 16, 16)
    assert torch.allclose(crops, torch.ones_like(crops), atol=1e-5)
    mask[0, 0, 2] = True  # an L shape: its box is 3x2 patches, the fit square 3x3, padding black
    crops = masked_crops(images, mask, torch.tensor([0]), patch_size=8, recipe="fit", output_size=24)
    assert crops[0, :, 20:, :].abs().max() < 1e-5  # below the box: padding
    assert crops[0, :, 12, 20].abs().max() < 1e-5  # patch (1, 2) is outside the segment
    assert crops[0, :, 2, :].abs().max() < 1e-5  # the square starts 4 px above the box: padding
    assert torch.allclose(crops[0, :, 8, 2], torch.ones(3))  # inside patch (0, 0)


def test_upsample_nearest_never_invents_labels() -> None:
    grid = np.array([[0, 5], [7, 9]])
    mask = upsample_nearest(grid, (5, 7))
    assert set(np.unique(mask)) <= {0, 5, 7, 9}
    assert mask[0, 0] == 0 and mask[0, -1] == 5 and mask[-1, 0] == 7 and mask[-1, -1] == 9
    rows = (np.arange(5) + 0.5) * 2 / 5  # pixel centres in grid coordinates
    cols = (np.arange(7) + 0.5) * 2 / 7
    assert np.array_equal(mask, grid[rows.astype(int)[:, None], cols.astype(int)[None, :]])


def test_label_dtype_and_colours() -> None:
    assert label_dtype(255) is np.uint8 and label_dtype(256) is np.uint16
    colours = palette(20)
    assert len({tuple(c) for c in colours}) == 20
    painted = colourise(np.array([[0, 1], [255, 3]]), colours[:2])
    assert painted[0, 0].tolist() == colours[0].tolist() and painted[1, 0].tolist() == [0, 0, 0]
    assert painted[1, 1].tolist() == [0, 0, 0]  # id 3 is beyond the table: black, not a wrap-around


def test_uint16_label_png_round_trips(tmp_path) -> None:
    """K > 255 masks are written as 16-bit PNGs with their values intact."""
    from datus.core.io import read_label_png, write_png

    labels = np.array([[0, 255, 256], [299, 65534, 7]], dtype=np.uint16)
    write_png(tmp_path / "m.png", labels)
    assert np.array_equal(read_label_png(tmp_path / "m.png"), labels)


def test_outputs_get_ordinary_file_permissions(tmp_path) -> None:
    """Atomic writes go through mkstemp (mode 0600); results must be readable like any file."""
    import os

    from datus.core.io import FILE_MODE, write_json

    write_json(tmp_path / "a.json", {"x": 1})
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == FILE_MODE
    open(tmp_path / "plain", "w").close()
    assert (tmp_path / "plain").stat().st_mode & 0o777 == FILE_MODE
    assert os.access(tmp_path / "a.json", os.R_OK)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_colour_lookup_equals_masking_and_the_palette_picture_shows_it(dtype: type) -> None:
    """Unsigned maps take the lookup table; signed ones the masks; both black out ignored and unknown ids."""
    labels = np.array([[0, 1, 2], [5, 255, 3]], dtype=dtype)
    colours = palette(4)
    expected = colourise(labels.astype(np.int64), colours, ignore_index=255)
    assert expected[1, 0].tolist() == [0, 0, 0] and expected[1, 1].tolist() == [0, 0, 0]
    assert np.array_equal(colourise(labels, colours, ignore_index=255), expected)
    if dtype == np.uint8:
        picture = palette_picture(labels, colours, ignore_index=255)
        assert np.array_equal(np.asarray(picture), labels) and np.array_equal(np.asarray(picture.convert("RGB")), expected)
