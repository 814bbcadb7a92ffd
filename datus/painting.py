"""Stage 7: patch-grid labels to full-size masks, colours and overlays."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def upsample_nearest(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of an h x w label grid to ``size`` = (H, W).

    Each output pixel takes the label of the grid cell its centre falls in. Never interpolate
    labels linearly: that invents ids between neighbouring labels.
    """
    height, width = size
    grid_height, grid_width = grid.shape
    rows = np.minimum(((np.arange(height) + 0.5) * grid_height / height).astype(np.int64), grid_height - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * grid_width / width).astype(np.int64), grid_width - 1)
    return grid[rows[:, None], cols[None, :]]


def label_dtype(num_labels: int) -> type[np.unsignedinteger]:
    """uint8 PNGs hold ids up to 254 (255 is the ignore index); beyond that use uint16."""
    return np.uint8 if num_labels <= 255 else np.uint16


def palette(num_colours: int) -> np.ndarray:
    """A fixed, well-separated colour per id (golden-angle hues), identical across runs."""
    ids = np.arange(num_colours)
    hue = (ids * 0.618033988749895) % 1.0
    saturation = 0.55 + 0.35 * ((ids // 7) % 2)
    value = 0.95 - 0.25 * ((ids // 3) % 2)
    sector = (hue * 6).astype(int) % 6
    fraction = hue * 6 - np.floor(hue * 6)
    p, q, t = value * (1 - saturation), value * (1 - fraction * saturation), value * (1 - (1 - fraction) * saturation)
    table = np.stack(
        [
            np.choose(sector, [value, q, p, p, t, value]),
            np.choose(sector, [t, value, value, q, p, p]),
            np.choose(sector, [p, p, t, value, value, q]),
        ],
        axis=1,
    )
    return (table * 255).round().astype(np.uint8)


def colourise(labels: np.ndarray, colours: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """H x W labels to H x W x 3 colours; the ignore index and ids beyond the table are black."""
    table = np.concatenate([colours, np.zeros((1, 3), dtype=np.uint8)])
    index = np.where((labels >= 0) & (labels < len(colours)) & (labels != ignore_index), labels, len(colours))
    return table[index]


def overlay(image: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a colour mask over an RGB image in 16-bit integers (a 100 MP image stays < 1 GB)."""
    weight = int(round(alpha * 256))
    blended = image.astype(np.uint16) * (256 - weight) + colours.astype(np.uint16) * weight
    return ((blended + 128) >> 8).astype(np.uint8)


def colour_table(num_clusters: int, num_classes: int, mapping: Mapping[str, int | None] | None) -> np.ndarray:
    """Colour per cluster: the matched class's colour after evaluation, else the cluster's own.

    Matched clusters share the class palette (so the same class has the same colour in every
    image and every run); unmatched clusters take colours beyond the class range.
    """
    colours = palette(num_clusters + num_classes)
    if mapping is None:
        return colours[:num_clusters]
    table = np.empty((num_clusters, 3), dtype=np.uint8)
    for cluster in range(num_clusters):
        matched = mapping.get(str(cluster))
        table[cluster] = colours[matched] if matched is not None else colours[num_classes + cluster]
    return table
