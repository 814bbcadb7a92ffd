"""Colours and pictures for people: palettes, colour masks, overlays, heat maps, text, legends.

One palette serves every picture, so that a class has the same colour in colour masks,
overlays, the legend, the report and the ground-truth column. Only PIL and numpy draw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from datus.core.io import write_image

INK = (0, 0, 0)
BACKGROUND = (255, 255, 255)
PAD = 8
"""Gap in pixels around a picture and between its cells (report, galleries)."""
LINE_HEIGHT = 18
"""Height of one line of small text: a legend line, a column header, a caption."""
MISSING_GREY = (128, 128, 128)
"""Fill of a tile whose file is missing or unreadable (an input image moved since the run)."""
IGNORE_BLACK = (0, 0, 0)
"""Colour of ignored ground-truth pixels (255) and of labels beyond a colour table."""
OUTLINE_YELLOW = (255, 221, 0)
"""Segment outlines: a colour no class palette entry is drawn in, on a grey picture."""
NOISE_SHADE = 0.35
"""Brightness factor of noise patches in the segments picture."""


def font_of(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """PIL's bundled font at ``size`` pixels (no system fonts needed)."""
    return ImageFont.load_default(size=size)


def text_size(text: str, font: Any) -> tuple[int, int]:
    """(width, height) in pixels of ``text`` drawn in ``font``."""
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    return int(right - left), int(bottom - top)


def text_width(text: str, font: Any) -> int:
    return text_size(text, font)[0]


def fit_text(text: str, font: Any, width: int) -> str:
    """``text``, cut with ``...`` so that it fits ``width`` pixels (long image ids, many classes)."""
    if text_width(text, font) <= width:
        return text
    fits, too_long = 0, len(text)  # prefixes only grow wider: bisect, so a long id costs log n measurements
    while too_long - fits > 1:
        middle = (fits + too_long) // 2
        if text_width(text[:middle] + "...", font) <= width:
            fits = middle
        else:
            too_long = middle
    return text[:fits] + "..."


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


def colour_lookup(colours: np.ndarray, ignore_index: int, size: int) -> np.ndarray:
    """``size`` x 3 uint8 table from label to colour: the ignore index and labels beyond ``colours`` black."""
    lookup = np.zeros((size, 3), dtype=np.uint8)
    count = min(len(colours), size)
    lookup[:count] = colours[:count]
    if 0 <= ignore_index < size:
        lookup[ignore_index] = 0
    return lookup


def colourise(labels: np.ndarray, colours: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """H x W labels to H x W x 3 colours; the ignore index and ids beyond the table are black.

    Unsigned label maps (what masks are) go through a lookup table: one gather, several times
    faster than masking, which other dtypes still need.
    """
    if labels.dtype in (np.uint8, np.uint16):
        return np.take(colour_lookup(colours, ignore_index, np.iinfo(labels.dtype).max + 1), labels, axis=0)
    table = np.concatenate([colours, np.zeros((1, 3), dtype=np.uint8)])
    index = np.where((labels >= 0) & (labels < len(colours)) & (labels != ignore_index), labels, len(colours))
    return table[index]


def palette_picture(labels: np.ndarray, colours: np.ndarray, ignore_index: int = 255) -> Image.Image:
    """A uint8 label map as a palette image: its pixels are the labels, its palette :func:`colourise`'s colours.

    It looks like the colourised map in any viewer and encodes several times faster than RGB.
    """
    picture = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8))
    picture.putpalette(colour_lookup(colours, ignore_index, 256).tobytes(), rawmode="RGB")
    return picture


def overlay(image: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a colour mask over an RGB image in 16-bit integers (a 100 MP image stays < 1 GB)."""
    weight = int(round(alpha * 256))
    blended = image.astype(np.uint16)
    blended *= 256 - weight
    coloured = colours.astype(np.uint16)
    coloured *= weight
    blended += coloured
    blended += 128
    blended >>= 8
    return blended.astype(np.uint8)


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


def mapping_array(mapping: Mapping[str, int | None] | Sequence[int] | np.ndarray, num_clusters: int) -> np.ndarray:
    """Normalise a mapping given as the JSON dict or as an array to a length-K array (-1 = unmatched)."""
    if isinstance(mapping, Mapping):
        array = np.full(num_clusters, -1, dtype=np.int64)
        for cluster, c in mapping.items():
            array[int(cluster)] = -1 if c is None else int(c)
        return array
    array = np.asarray(mapping, dtype=np.int64)
    if array.shape != (num_clusters,):
        raise ValueError(f"mapping must have one entry per cluster ({num_clusters}), got shape {array.shape}")
    return array


# Anchors of the viridis colour map: perceptually ordered and readable in greyscale print.
VIRIDIS = np.array(
    [
        [68, 1, 84],
        [72, 40, 120],
        [62, 74, 137],
        [49, 104, 142],
        [38, 130, 142],
        [31, 158, 137],
        [53, 183, 121],
        [109, 205, 89],
        [180, 222, 44],
        [253, 231, 37],
    ],
    dtype=np.float64,
)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 colours (viridis, linearly interpolated)."""
    positions = np.linspace(0.0, 1.0, len(VIRIDIS))
    flat = np.clip(values, 0.0, 1.0).reshape(-1)
    channels = [np.interp(flat, positions, VIRIDIS[:, i]) for i in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8).reshape(*values.shape, 3)


def save_confusion_png(
    confusion: np.ndarray,
    mapping: Mapping[str, int | None] | Sequence[int] | np.ndarray,
    path: Path,
    class_names: Sequence[str] | None = None,
    cell_size: int = 28,
) -> None:
    """Draw a cluster x class confusion matrix as a PNG heat map.

    Rows are reordered so that the cluster matched to class c sits in row c (the matched cells form
    the diagonal and are outlined); unmatched clusters follow, marked with ``*``. Each row is
    normalised to sum to 1, because clusters differ in size by orders of magnitude and raw counts
    would show only the biggest ones. Cells show the row percentage when it is at least 1.

    Args:
        confusion: K x C pixel counts (rows = clusters, columns = classes).
        mapping: class per cluster (-1/None = unmatched), as an array or the ``metrics.json`` dict.
        path: destination PNG, written atomically.
        class_names: optional names for the column labels; class ids are used otherwise.
        cell_size: side of one cell in pixels (at least 24 so that labels stay legible).
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    if confusion.ndim != 2:
        raise ValueError(f"confusion must be a K x C matrix, got shape {confusion.shape}")
    num_clusters, num_classes = confusion.shape
    matched = mapping_array(mapping, num_clusters)
    names = [str(name) for name in class_names] if class_names is not None else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} entries but the matrix has {num_classes} columns")
    cell = max(24, int(cell_size))

    by_class = {int(c): k for k, c in enumerate(matched.tolist()) if c >= 0}
    order = [by_class[c] for c in range(num_classes) if c in by_class]
    order += [k for k in range(num_clusters) if matched[k] < 0]
    rows = confusion[order].astype(np.float64)
    totals = rows.sum(axis=1, keepdims=True)
    normalised = np.divide(rows, totals, out=np.zeros_like(rows), where=totals > 0)

    font = font_of(11)
    row_labels = [f"cluster {k}" + ("" if matched[k] >= 0 else " *") for k in order]
    label_width = max(text_size(text, font)[0] for text in [*row_labels, "clusters"]) + 12
    column_label_height = max(text_size(name, font)[0] for name in [*names, "classes"]) + 12
    title = "rows: clusters (row-normalised %), columns: classes; outlined = matched, * = unmatched"
    title_height = text_size(title, font)[1] + 12
    legend_height = cell + 16
    grid_width, grid_height = num_classes * cell, num_clusters * cell
    width = max(label_width + grid_width + 8, text_size(title, font)[0] + 16, label_width + 200)
    height = title_height + column_label_height + grid_height + legend_height + 8
    origin_x, origin_y = label_width, title_height + column_label_height

    image = Image.new("RGB", (width, height), (255, 255, 255))
    colours = heat_colours(normalised)
    cells = np.repeat(np.repeat(colours, cell, axis=0), cell, axis=1)
    image.paste(Image.fromarray(cells), (origin_x, origin_y))
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), title, fill=(0, 0, 0), font=font)

    for c, name in enumerate(names):
        text_width, text_height = text_size(name, font)
        label = Image.new("RGB", (text_width + 4, text_height + 6), (255, 255, 255))
        ImageDraw.Draw(label).text((2, 1), name, fill=(0, 0, 0), font=font)
        label = label.rotate(90, expand=True)
        x = origin_x + c * cell + (cell - label.width) // 2
        image.paste(label, (x, origin_y - label.height - 4))
    for r, text in enumerate(row_labels):
        text_width, text_height = text_size(text, font)
        position = (label_width - text_width - 6, origin_y + r * cell + (cell - text_height) // 2 - 1)
        draw.text(position, text, fill=(0, 0, 0), font=font)

    for r in range(num_clusters):
        for c in range(num_classes):
            share = normalised[r, c]
            x, y = origin_x + c * cell, origin_y + r * cell
            if share >= 0.01:
                text = f"{100 * share:.0f}"
                text_width, text_height = text_size(text, font)
                ink = (0, 0, 0) if share > 0.6 else (255, 255, 255)
                draw.text((x + (cell - text_width) // 2, y + (cell - text_height) // 2 - 1), text, fill=ink, font=font)
            if matched[order[r]] == c:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], outline=(230, 30, 30), width=2)
    draw.rectangle([origin_x - 1, origin_y - 1, origin_x + grid_width, origin_y + grid_height], outline=(0, 0, 0))

    bar_y = origin_y + grid_height + 8
    bar_width = 160
    gradient = heat_colours(np.linspace(0.0, 1.0, bar_width)[None, :].repeat(cell // 2, axis=0))
    image.paste(Image.fromarray(gradient), (origin_x + 28, bar_y))
    draw.text((origin_x, bar_y), "0%", fill=(0, 0, 0), font=font)
    draw.text((origin_x + 32 + bar_width, bar_y), "100%", fill=(0, 0, 0), font=font)

    write_image(Path(path), image)


def segment_outlines(picture: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """The picture in grey with the borders of valid segments in yellow and noise darkened.

    Drawn this way the segments column cannot be mistaken for the class colours of the masks.

    Args:
        picture: H x W x 3 uint8 image.
        segments: H x W visible segment map (0 = noise, 1..V valid segments).
    """
    grey = picture.astype(np.float32).mean(axis=-1)
    grey = np.where(segments == 0, grey * NOISE_SHADE, grey * 0.8 + 25)
    out = np.repeat(grey.round().clip(0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    border = np.zeros(segments.shape, dtype=bool)
    border[:-1] |= segments[:-1] != segments[1:]
    border[1:] |= segments[:-1] != segments[1:]
    border[:, :-1] |= segments[:, :-1] != segments[:, 1:]
    border[:, 1:] |= segments[:, :-1] != segments[:, 1:]
    out[border] = OUTLINE_YELLOW
    return out


def legend_picture(entries: Sequence[tuple[tuple[int, int, int], str]], title: str, columns: int = 1) -> Image.Image:
    """A swatch-and-name list, one entry per row (in ``columns`` columns), under a title."""
    font, title_font = font_of(13), font_of(15)
    rows = -(-len(entries) // columns) if entries else 0
    column_width = max([text_width(name, font) for _, name in entries] + [60]) + 40
    width = max(columns * column_width + 16, text_width(title, title_font) + 16)
    height = 34 + rows * 20 + 8
    picture = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(picture)
    draw.text((8, 8), title, fill=INK, font=title_font)
    for index, (colour, name) in enumerate(entries):
        x, y = 8 + (index // rows) * column_width, 34 + (index % rows) * 20
        draw.rectangle([x, y + 2, x + 14, y + 16], fill=colour, outline=(120, 120, 120))
        draw.text((x + 22, y + 2), name, fill=INK, font=font)
    return picture
