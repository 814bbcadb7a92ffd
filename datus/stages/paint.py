"""Stage 7: segment labels to full-size masks, segment maps, colour masks and overlays.

Every file goes through :class:`datus.runfolder.run.Results`, which checks that its path stays inside the
results folder. The functions here work on one image; :mod:`datus.stages.shard_pass` runs them shard by
shard in worker processes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from datus.outputs.drawing import colourise, overlay, palette_picture, segment_outlines
from datus.core.io import (
    DECODE_ERRORS,
    PICTURE_COMPRESSION,
    PNG_NOTE,
    UnreadableFile,
    load_rgb,
    open_regular,
    write_image,
    write_jpeg,
    write_png,
)
from datus.runfolder.records import ImageRecord
from datus.runfolder.run import COLOUR, MASKS, OVERLAY, Results

log = logging.getLogger(__name__)

MAX_PICTURE_SIDE = 4096
"""Colour masks and overlays are for looking at: larger images get proportionally reduced ones."""


def upsample_nearest(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of an h x w label grid to ``size`` = (H, W), in the grid's dtype.

    Each output pixel takes the label of the grid cell its centre falls in. Never interpolate
    labels linearly: that invents ids between neighbouring labels. Give a small-dtype grid
    (uint8 labels): the output of a 250 MP image is then 250 MB.
    """
    height, width = size
    grid_height, grid_width = grid.shape
    rows = np.minimum(((np.arange(height) + 0.5) * grid_height / height).astype(np.int64), grid_height - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * grid_width / width).astype(np.int64), grid_width - 1)
    return grid[rows][:, cols]


def label_dtype(num_labels: int) -> type[np.unsignedinteger]:
    """uint8 PNGs hold ids up to 254 (255 is the ignore index); beyond that use uint16."""
    return np.uint8 if num_labels <= 255 else np.uint16


def segment_picture_map(record: ImageRecord) -> np.ndarray:
    """``segments/<id>.png``: the visible segment map (0 = noise, 1..V) at the image's size."""
    visible = record.visible_segment_map()
    return upsample_nearest(visible.astype(label_dtype(int(visible.max()) + 1)), record.orig_size)


def mask_of(record: ImageRecord, labels: np.ndarray, num_clusters: int) -> np.ndarray:
    """The pseudo mask of one image: each segment's cluster id, at the image's size, in a PNG-ready dtype."""
    return upsample_nearest(labels.astype(label_dtype(num_clusters))[record.segment_map], record.orig_size)


def noise_of(record: ImageRecord) -> np.ndarray:
    """Which pixels of the image belong to noise segments (what the paper protocol leaves out)."""
    return upsample_nearest(record.is_noise[record.segment_map], record.orig_size)


def is_mask_of(path: Path, record: ImageRecord, note: str | None = None) -> bool:
    """Whether ``path`` holds a label map of ``record``'s size, as painting writes them.

    A rerun reuses a mask only then, and, given ``note``, only when the mask's text chunk names
    the same painting (:data:`datus.core.io.PNG_NOTE`): anything else at its place (a damaged,
    truncated or replaced file, a mask copied from another clustering) is painted again rather
    than read by the colour pass. Only the header is read.
    """
    try:
        with open_regular(path) as stream, Image.open(stream) as stored:
            painted_here = note is None or stored.info.get(PNG_NOTE) == note
            return painted_here and stored.mode in ("L", "I;16") and (stored.height, stored.width) == record.orig_size
    except DECODE_ERRORS:
        return False


def picture_size(size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of colour masks and overlays: the image's, reduced to at most MAX_PICTURE_SIDE."""
    scale = min(1.0, MAX_PICTURE_SIDE / max(size))
    return max(1, round(size[1] * scale)), max(1, round(size[0] * scale))


def write_colour_files(results: Results, image_id: str, image_path: str, table: np.ndarray) -> None:
    """Colour mask of the mask as written, and the overlay on the input image when it can still be read.

    Both are pictures for people, so images larger than :data:`MAX_PICTURE_SIDE` get
    proportionally smaller ones (nearest neighbour for the labels); the label mask itself is
    always full size.
    """
    with open_regular(results.image_file(MASKS, image_id)) as stream, Image.open(stream) as stored:
        full = (stored.height, stored.width)
        target = picture_size(full)
        labels = np.asarray(stored.resize(target, Image.Resampling.NEAREST) if stored.size != target else stored)
    if labels.dtype == np.uint8:  # a palette PNG: the labels themselves, shown in the legend's colours
        colour_picture = palette_picture(labels, table, ignore_index=-1)
        write_image(results.image_file(COLOUR, image_id), colour_picture)
        colours = np.asarray(colour_picture.convert("RGB"))
    else:
        colours = colourise(labels, table, ignore_index=-1)
        write_png(results.image_file(COLOUR, image_id), colours, PICTURE_COMPRESSION)
    try:
        picture, size = load_rgb(image_path, min_side=MAX_PICTURE_SIDE)
    except UnreadableFile as error:  # the input may have moved since prediction: no overlay, no crash
        log.warning("no overlay for %s: %s", image_path, error)
        return
    if size != full:
        log.warning("no overlay for %s: the image changed size since prediction", image_path)
        return
    if picture.size != target:
        picture = picture.resize(target, Image.Resampling.BILINEAR)
    blended = overlay(np.asarray(picture), colours)
    write_jpeg(results.image_file(OVERLAY, image_id), blended)


def outline_picture(record: ImageRecord, picture: np.ndarray) -> np.ndarray:
    """Segments drawn on the image (for the report), at the picture's size."""
    visible = upsample_nearest(record.visible_segment_map(), picture.shape[:2])
    return segment_outlines(picture, visible)
