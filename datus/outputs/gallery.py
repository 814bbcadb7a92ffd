"""Cluster galleries: what each pseudo class looks like, as segments cut from their images.

Without labels, a cluster id means nothing until someone sees its members. For every cluster
``gallery/cluster_<k>.png`` shows its most typical valid segments (nearest to the centroid, by
:meth:`ClusterModel.distances`) and a seeded random sample of the others, each cut from its
image (the segment's box with a margin, the rest dimmed, the outline in yellow) and captioned
with its image id; ``gallery/index.png`` shows a few typical segments of every cluster on one
page.

The cost is bounded whatever the size of the run: one pass over the shards keeps at most
:data:`TYPICAL` + 2 x :data:`RANDOM` candidates per cluster, and only the images of the chosen
segments are decoded, each once (large ones at reduced size).

The random sample does not depend on how images were spread over ranks and shards: each
segment gets a pseudo-random key from the seed, its image id and its segment id, and the
smallest keys win.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from datus.stages.clustering import ClusterModel
from datus.stages.diagnostics import ClusterSizes
from datus.outputs.drawing import BACKGROUND, INK, LINE_HEIGHT, MISSING_GREY, OUTLINE_YELLOW, PAD, fit_text, font_of
from datus.core.io import UnreadableFile, load_rgb, write_image
from datus.runfolder.records import ImageRecord, segment_keys
from datus.runfolder.run import Results

log = logging.getLogger(__name__)

TYPICAL = 8
"""Segments nearest to the centroid shown per cluster."""
RANDOM = 8
"""Other members shown per cluster, drawn at random (seeded)."""
INDEX_TYPICAL = 4
"""Typical segments per cluster on ``gallery/index.png``."""

TILE = 128
"""Side of a crop on a cluster sheet; crops keep their aspect and are centred on grey."""
INDEX_TILE = 80
"""Side of a crop on the index."""
MARGIN = 0.25
"""Context kept around a segment's box, as a fraction of the box's height and width on each side."""
DIM = 0.45
"""Brightness of the pixels around the segment, so that the segment stands out."""
OUTLINE_WIDTH = 2
"""Pixels of yellow drawn just outside the segment."""

HEADER_HEIGHT = 50
"""Cluster title and its sizes, at the top of a sheet."""
CAPTION_HEIGHT = 16
"""The image id under a crop."""
INDEX_LABEL_WIDTH = 250
"""Text column of the index (cluster, matched class, sizes)."""
INDEX_TITLE_HEIGHT = 30

TILE_GREY = (200, 200, 200)
"""Background around a crop that is not square."""


@dataclass(frozen=True, eq=False)
class Member:
    """One valid segment chosen for a gallery, with what it takes to cut it from its image.

    Attributes:
        image_id: the image's id (the caption).
        image_path: the input file.
        segment: the segment's id in the image's record.
        mask: h x w bool, the segment's patches.
        distance: squared distance of its embedding to its cluster's centroid.
        key: its pseudo-random sampling key.
    """

    image_id: str
    image_path: str
    segment: int
    mask: np.ndarray = field(repr=False)
    distance: float
    key: int

    @property
    def identity(self) -> tuple[str, int]:
        return self.image_id, self.segment


@dataclass
class ClusterMembers:
    """The segments of one cluster's sheet: typical first (nearest first), then random ones."""

    typical: list[Member] = field(default_factory=list)
    random: list[Member] = field(default_factory=list)


class Candidates:
    """Gallery candidates of the records seen so far, at most ``typical`` + ``typical + random`` per cluster.

    Mergeable: worker processes each scan their shards, and merging their candidates in any order
    gives the same choice as one scan of everything (ties in distance go to the sampling key).
    """

    def __init__(self, num_clusters: int, seed: int, typical: int = TYPICAL, random: int = RANDOM) -> None:
        self.seed, self.typical, self.random = seed, typical, random
        self.near: list[list[Member]] = [[] for _ in range(num_clusters)]
        self.drawn: list[list[Member]] = [[] for _ in range(num_clusters)]

    def add(self, records: Sequence[ImageRecord], model: ClusterModel) -> None:
        """Scan one shard's records (their valid segments, labelled by :meth:`ClusterModel.assign`)."""
        valid = [record for record in records if record.num_valid]
        if not valid:
            return
        embeddings = np.concatenate([record.embeddings for record in valid]).astype(np.float32)
        labels = model.assign(embeddings)
        distances = model.distances(embeddings)[np.arange(len(labels)), labels]
        owners = np.repeat(np.arange(len(valid)), [record.num_valid for record in valid])
        segments = np.concatenate([np.flatnonzero(~record.is_noise) for record in valid])
        keys = np.concatenate([segment_keys(self.seed, r.image_id, np.flatnonzero(~r.is_noise)) for r in valid])
        scanned = Candidates(len(self.near), self.seed, self.typical, self.random)
        for k in np.unique(labels).tolist():
            rows = np.flatnonzero(labels == k)
            nearest = rows[np.lexsort((keys[rows], distances[rows]))[: self.typical]]
            sampled = rows[np.argsort(keys[rows], kind="stable")[: self.typical + self.random]]
            found = {row: _member(valid[owners[row]], row, segments, distances, keys) for row in {*nearest, *sampled}}
            scanned.near[k] = [found[row] for row in nearest]
            scanned.drawn[k] = [found[row] for row in sampled]
        self.merge(scanned)

    def merge(self, other: Candidates) -> None:
        """Keep the best of both: nearest by (distance, key), random by key."""
        for k, (near, drawn) in enumerate(zip(other.near, other.drawn)):
            self.near[k] = sorted(self.near[k] + near, key=lambda m: (m.distance, m.key))[: self.typical]
            self.drawn[k] = sorted(self.drawn[k] + drawn, key=lambda m: m.key)[: self.typical + self.random]

    def members(self) -> list[ClusterMembers]:
        """Per cluster, its sheet: the typical members, then random members not already shown."""
        chosen = []
        for nearest, sampled in zip(self.near, self.drawn):
            shown = {m.identity for m in nearest}
            chosen.append(ClusterMembers(nearest, [m for m in sampled if m.identity not in shown][: self.random]))
        return chosen


def select_members(
    batches: Iterable[Sequence[ImageRecord]],
    model: ClusterModel,
    seed: int,
    typical: int = TYPICAL,
    random: int = RANDOM,
) -> list[ClusterMembers]:
    """Per cluster, the ``typical`` valid segments nearest to its centroid and ``random`` others.

    A segment's cluster is :meth:`ClusterModel.assign`'s, as in the masks. Ties in distance are
    broken by the sampling key, so the choice never depends on the order of the shards.

    Args:
        batches: the run's records, one list per shard.
        model: the fitted clusters.
        seed: seed of the random sample.
        typical: nearest segments per cluster.
        random: random other segments per cluster.
    """
    candidates = Candidates(model.num_clusters, seed, typical, random)
    for records in batches:
        candidates.add(records, model)
    return candidates.members()


def _member(record: ImageRecord, row: int, segments: np.ndarray, distances: np.ndarray, keys: np.ndarray) -> Member:
    """Row ``row`` of a scanned shard's valid segments, as a gallery member."""
    segment = int(segments[row])
    mask = record.segment_map == segment
    return Member(record.image_id, record.image_path, segment, mask, float(distances[row]), int(keys[row]))


def segment_tile(picture: Image.Image, mask: np.ndarray, size: int = TILE) -> Image.Image:
    """The segment cut from its image: its box plus :data:`MARGIN`, fitted into ``size`` x ``size``.

    The patch mask is mapped onto the picture as painting maps it (each pixel takes the patch
    its centre falls in), so the outline is where the mask's borders are; pixels of the
    segment keep their colours, the rest is dimmed, and the outline lies just outside.

    Args:
        picture: the image (possibly decoded at a reduced size: only proportions matter).
        mask: h x w bool, the segment's patches (not empty).
        size: side of the square tile.
    """
    width, height = picture.size
    grid_height, grid_width = mask.shape
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    top, bottom = rows[0] * height / grid_height, (rows[-1] + 1) * height / grid_height
    left, right = columns[0] * width / grid_width, (columns[-1] + 1) * width / grid_width
    margin_y, margin_x = MARGIN * (bottom - top), MARGIN * (right - left)
    box = (
        max(0, int(np.floor(left - margin_x))),
        max(0, int(np.floor(top - margin_y))),
        min(width, int(np.ceil(right + margin_x))),
        min(height, int(np.ceil(bottom + margin_y))),
    )
    box_width, box_height = box[2] - box[0], box[3] - box[1]
    scale = size / max(box_width, box_height)
    target = (max(1, min(size, round(box_width * scale))), max(1, min(size, round(box_height * scale))))
    crop = np.asarray(picture.crop(box).resize(target, Image.Resampling.BILINEAR), dtype=np.float32)
    ys = box[1] + (np.arange(target[1]) + 0.5) * box_height / target[1]
    xs = box[0] + (np.arange(target[0]) + 0.5) * box_width / target[0]
    cell_rows = np.minimum((ys * grid_height / height).astype(np.int64), grid_height - 1)
    cell_columns = np.minimum((xs * grid_width / width).astype(np.int64), grid_width - 1)
    inside = mask[cell_rows[:, None], cell_columns[None, :]]
    crop[~inside] *= DIM
    pixels = crop.round().clip(0, 255).astype(np.uint8)
    pixels[_grown(inside, OUTLINE_WIDTH) & ~inside] = OUTLINE_YELLOW
    tile = Image.new("RGB", (size, size), TILE_GREY)
    tile.paste(Image.fromarray(pixels), ((size - target[0]) // 2, (size - target[1]) // 2))
    return tile


def _grown(mask: np.ndarray, steps: int) -> np.ndarray:
    """``mask`` dilated by ``steps`` pixels (4-neighbourhood)."""
    grown = mask.copy()
    for _ in range(steps):
        previous = grown.copy()
        grown[1:] |= previous[:-1]
        grown[:-1] |= previous[1:]
        grown[:, 1:] |= previous[:, :-1]
        grown[:, :-1] |= previous[:, 1:]
    return grown


def _placeholder(size: int, text: str) -> Image.Image:
    tile = Image.new("RGB", (size, size), MISSING_GREY)
    ImageDraw.Draw(tile).text((6, size // 2 - 6), text, fill=(255, 255, 255), font=font_of(12))
    return tile


def cut_tiles(members: Sequence[ClusterMembers]) -> dict[tuple[str, int], Image.Image]:
    """A tile per chosen segment; each image is decoded once, however many of its segments are shown."""
    by_image: dict[str, list[Member]] = defaultdict(list)
    for cluster in members:
        for member in (*cluster.typical, *cluster.random):
            by_image[member.image_path].append(member)
    tiles: dict[tuple[str, int], Image.Image] = {}
    for path, chosen in sorted(by_image.items()):
        try:
            picture, _ = load_rgb(Path(path), min_side=TILE)
        except UnreadableFile as error:
            log.warning("gallery: cannot read %s (moved since the run?): %s", path, error)
            picture = None
        for member in chosen:
            tile = _placeholder(TILE, "missing") if picture is None else segment_tile(picture, member.mask)
            tiles[member.identity] = tile
    return tiles


def matched_names(
    num_clusters: int, mapping: Mapping[str, int | None] | None, class_names: Sequence[str] | None
) -> list[str | None]:
    """Per cluster, the class evaluation matched it to (``class 2 (fish)``), or None."""
    names: list[str | None] = []
    for cluster in range(num_clusters):
        matched = mapping.get(str(cluster)) if mapping else None
        if matched is None:
            names.append(None)
        else:
            names.append(f"class {matched}" + (f" ({class_names[matched]})" if class_names else ""))
    return names


def percent(share: float) -> str:
    """A share as a percentage with three significant digits, so that small clusters do not read 0.0%."""
    return f"{100 * float(share):.3g}%"


def sheet_size(typical: int = TYPICAL, random: int = RANDOM) -> tuple[int, int]:
    """(width, height) of every cluster sheet: the same for all clusters, full or not."""
    width = PAD + max(typical, random, 1) * (TILE + PAD)
    return width, PAD + HEADER_HEIGHT + 2 * (LINE_HEIGHT + TILE + CAPTION_HEIGHT + PAD)


def tile_origin(section: int, column: int) -> tuple[int, int]:
    """Top-left corner of a crop on a sheet: section 0 = typical, 1 = random."""
    y = PAD + HEADER_HEIGHT + section * (LINE_HEIGHT + TILE + CAPTION_HEIGHT + PAD) + LINE_HEIGHT
    return PAD + column * (TILE + PAD), y


def draw_sheet(
    cluster: int,
    members: ClusterMembers,
    tiles: Mapping[tuple[str, int], Image.Image],
    sizes: ClusterSizes,
    name: str | None,
    seed: int,
) -> Image.Image:
    """One cluster's sheet: header (id, matched class, sizes), typical row, random row."""
    width, height = sheet_size()
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    title_font, font, caption_font = font_of(16), font_of(12), font_of(11)
    title = f"cluster {cluster}" + (f" = {name}" if name else "")
    draw.text((PAD, PAD), fit_text(title, title_font, width - 2 * PAD), fill=INK, font=title_font)
    count = int(sizes.segments[cluster])
    counts = (
        f"{count} valid segment{'' if count == 1 else 's'} ({percent(sizes.segment_share[cluster])} of all), "
        f"{percent(sizes.pixel_share[cluster])} of pixels (noise segments counted in their donor's cluster)"
    )
    draw.text((PAD, PAD + 24), fit_text(counts, font, width - 2 * PAD), fill=(60, 60, 60), font=font)
    sections = (
        ("most typical: nearest to the centroid first", members.typical),
        (f"random members (seed {seed}), other than those above", members.random),
    )
    for index, (heading, shown) in enumerate(sections):
        x, y = tile_origin(index, 0)
        if not shown:
            heading += ": none" if index else ": no valid segment in this cluster"
        draw.text((PAD, y - LINE_HEIGHT + 2), heading, fill=INK, font=font)
        for column, member in enumerate(shown):
            x, y = tile_origin(index, column)
            sheet.paste(tiles[member.identity], (x, y))
            caption = fit_text(member.image_id, caption_font, TILE)
            draw.text((x, y + TILE + 2), caption, fill=(70, 70, 70), font=caption_font)
    return sheet


def draw_index(
    members: Sequence[ClusterMembers],
    tiles: Mapping[tuple[str, int], Image.Image],
    sizes: ClusterSizes,
    names: Sequence[str | None],
    title: str,
) -> Image.Image:
    """Every cluster on one page: a row with its id, class, sizes and its most typical crops."""
    width = INDEX_LABEL_WIDTH + INDEX_TYPICAL * (INDEX_TILE + PAD) + PAD
    height = INDEX_TITLE_HEIGHT + len(members) * (INDEX_TILE + PAD) + PAD
    index = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(index)
    title_font, font = font_of(15), font_of(12)
    draw.text((PAD, PAD), fit_text(title, title_font, width - 2 * PAD), fill=INK, font=title_font)
    for cluster, chosen in enumerate(members):
        y = INDEX_TITLE_HEIGHT + cluster * (INDEX_TILE + PAD)
        label_width = INDEX_LABEL_WIDTH - 2 * PAD
        lines = [
            f"cluster {cluster}",
            names[cluster] or "",
            f"{int(sizes.segments[cluster])} valid segments",
            f"{percent(sizes.pixel_share[cluster])} of pixels",
        ]
        for number, line in enumerate(line for line in lines if line):
            draw.text((PAD, y + 4 + 17 * number), fit_text(line, font, label_width), fill=INK, font=font)
        for column, member in enumerate(chosen.typical[:INDEX_TYPICAL]):
            thumbnail = tiles[member.identity].resize((INDEX_TILE, INDEX_TILE), Image.Resampling.BILINEAR)
            index.paste(thumbnail, (INDEX_LABEL_WIDTH + column * (INDEX_TILE + PAD), y))
        draw.line([PAD, y + INDEX_TILE + PAD // 2, width - PAD, y + INDEX_TILE + PAD // 2], fill=(225, 225, 225))
    return index


def write_galleries(
    members: Sequence[ClusterMembers],
    results: Results,
    sizes: ClusterSizes,
    names: Sequence[str | None],
    seed: int,
) -> None:
    """``gallery/cluster_<k>.png`` for every cluster and ``gallery/index.png`` (rank 0 only).

    Sheets of clusters beyond this K, left by an earlier clustering with a larger K in the same
    results folder, are removed: they would describe masks that no longer exist.

    Args:
        members: per cluster, its chosen segments (:meth:`Candidates.members`, :func:`select_members`).
        results: the results folder of this clustering.
        sizes: cluster sizes (from the diagnostics) for the headers.
        names: per cluster, its matched class or None (:func:`matched_names`).
        seed: seed of the random members.
    """
    tiles = cut_tiles(members)
    for cluster, chosen in enumerate(members):
        sheet = draw_sheet(cluster, chosen, tiles, sizes, names[cluster], seed)
        write_image(results.gallery_sheet(cluster), sheet)
    title = f"{results.root.resolve().name}: {len(members)} clusters, typical segments (cluster_<k>.png: more)"
    write_image(results.gallery_index(), draw_index(members, tiles, sizes, names, title))
    for cluster, path in results.gallery_sheets().items():
        if cluster >= len(members):
            path.unlink(missing_ok=True)
