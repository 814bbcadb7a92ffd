"""Stage 7: segment labels to full-size masks, segment maps, colour masks and overlays.

Every file goes through :class:`datus.run.Results`, which checks that its path stays inside the
results folder. Encoding runs in a few threads (PIL and zlib release the GIL) with a bounded
queue, so memory stays flat however many images there are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from datus.drawing import colourise, overlay, segment_outlines
from datus.io import UnreadableFile, load_rgb, read_label_png, write_png
from datus.records import ImageRecord
from datus.run import COLOUR, MASKS, OVERLAY, SEGMENTS, Results

log = logging.getLogger(__name__)

MAX_OVERLAY_SIDE = 4096
"""Overlays are for looking at: larger images get a proportionally reduced overlay."""


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


def segment_picture_map(record: ImageRecord) -> np.ndarray:
    """``segments/<id>.png``: the visible segment map (0 = noise, 1..V) at the image's size."""
    visible = record.visible_segment_map()
    return upsample_nearest(visible, record.orig_size).astype(label_dtype(int(visible.max()) + 1))


class FileWriterPool:
    """Runs file encoding and writing in threads and re-raises their errors; bounded backlog."""

    def __init__(self, threads: int = 4, max_pending: int = 64) -> None:
        self._executor = ThreadPoolExecutor(threads)
        self._pending: list[Future[Any]] = []
        self._max_pending = max_pending

    def submit(self, function: Callable[..., Any], *args: Any) -> None:
        self._pending.append(self._executor.submit(function, *args))
        if len(self._pending) >= self._max_pending:
            self._pending.pop(0).result()

    def wait(self) -> None:
        try:
            for future in self._pending:
                future.result()
        finally:
            self._pending = []
            self._executor.shutdown(wait=True)


def write_label_files(results: Results, record: ImageRecord, mask: np.ndarray | None, num_clusters: int) -> None:
    """The pseudo mask (when given) and the segment map of one image."""
    if mask is not None:
        write_png(results.image_file(MASKS, record.image_id), mask.astype(label_dtype(num_clusters)))
    write_png(results.image_file(SEGMENTS, record.image_id), segment_picture_map(record))


def write_colour_files(results: Results, image_id: str, image_path: str, table: np.ndarray) -> None:
    """Colour mask of the mask as written, and the overlay on the input image when it can still be read."""
    mask = read_label_png(results.image_file(MASKS, image_id))
    colours = colourise(mask, table, ignore_index=-1)
    write_png(results.image_file(COLOUR, image_id), colours)
    try:
        picture, size = load_rgb(image_path, min_side=MAX_OVERLAY_SIDE)
    except UnreadableFile as error:  # the input may have moved since prediction: no overlay, no crash
        log.warning("no overlay for %s: %s", image_path, error)
        return
    if size != mask.shape:
        log.warning("no overlay for %s: the image changed size since prediction", image_path)
        return
    scale = min(1.0, MAX_OVERLAY_SIDE / max(size))
    target = (max(1, round(size[1] * scale)), max(1, round(size[0] * scale)))
    if picture.size != target:
        picture = picture.resize(target, Image.Resampling.BILINEAR)
    if colours.shape[:2] != (target[1], target[0]):
        colours = np.asarray(Image.fromarray(colours).resize(target, Image.Resampling.NEAREST))
    blended = overlay(np.asarray(picture), colours)
    write_png(results.image_file(OVERLAY, image_id), blended, compress_level=1)


def outline_picture(record: ImageRecord, picture: np.ndarray) -> np.ndarray:
    """Segments drawn on the image (for the report), at the picture's size."""
    visible = upsample_nearest(record.visible_segment_map(), picture.shape[:2])
    return segment_outlines(picture, visible)
