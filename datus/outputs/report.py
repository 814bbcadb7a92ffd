"""One picture per run: ``report.png``, to judge a run at a glance without opening folders.

Numbers alone hide the failures that matter in unsupervised segmentation: masks that follow
the attention blob instead of objects, segments that are all noise, a cluster that swallows
the background. The report puts, for a small deterministic sample of images, the image next to
its discovered segments, its pseudo mask, its ground truth and the ViT's CLS attention, under
a title with the run's settings and scores and above the confusion matrix and the label-free
diagnostics.

Colours match the files on disk: pseudo masks use :func:`datus.outputs.drawing.colour_table` (after
evaluation a matched cluster has its class's colour) and ground truth uses the same class
palette, so a correct pixel has the same colour in both columns. Segments are drawn as yellow
outlines on the grey image, so they cannot be mistaken for classes.

Only PIL and numpy draw; only the shards that hold the sampled images are read.
"""

from __future__ import annotations

import heapq
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from datus.outputs.drawing import (
    BACKGROUND,
    IGNORE_BLACK,
    INK,
    LINE_HEIGHT,
    MISSING_GREY,
    PAD,
    colour_table,
    colourise,
    fit_text,
    font_of,
    heat_colours,
    palette,
    text_width,
)
from datus.core.errors import ConfigurationError
from datus.stages.classes import find_classes_file, read_classes_file
from datus.core.io import UnreadableFile, load_rgb, open_regular, read_json, read_label_png, write_image
from datus.stages.paint import outline_picture
from datus.runfolder.records import ImageRecord, segment_keys
from datus.runfolder.run import CLASSES_FILE, CONFUSION_FILE, MANIFEST_FILE, MASKS, METRICS_FILE, REPORT_FILE, Results, Run
from datus.stages.score import read_metrics
from datus.runfolder.shards import read_image_ids, read_records

log = logging.getLogger(__name__)

TITLE_HEIGHT = 26
"""Height of the title line (run, backbone, K, images, mIoU)."""
BANNER_HEIGHT = 26
"""Height of the red ``RANDOM WEIGHTS`` banner, present only for runs with an untrained ViT."""
MAX_ASPECT = 4.0
"""Widest thumbnail, as a multiple of its height; a panorama is shrunk to fit, not stretched."""
MAX_CONFUSION_SCALE = 3
"""The confusion matrix is enlarged by up to this integer factor to span the grid."""

BANNER_RED = (200, 16, 16)
"""Fill of the random-weights banner (tests look for it)."""
NO_DATA_GREY = (215, 215, 215)
"""Fill of a ground-truth tile for an image that has no mask."""


@dataclass
class _RunFacts:
    """What the title, legend and colours need, gathered once from the run's JSON files."""

    name: str
    backbone: str
    random_weights: bool
    num_clusters: int | None
    num_classes: int
    mapping: dict[str, int | None] | None
    cluster_names: list[str] | None
    class_names: list[str] | None
    miou: dict[str, float | None] | None


_Entry = tuple[tuple[int, int, int], str]
"""A legend entry: swatch colour and name."""


def make_report(
    run: Run,
    results: Results | None = None,
    num_samples: int = 8,
    seed: int = 0,
    thumb_height: int = 160,
    diagnostics: Image.Image | None = None,
) -> Path:
    """Draw ``report.png`` in the results folder of a finished run and return its path.

    Layout, top to bottom: a title line (run folder, backbone, K, number of images, dense and
    paper mIoU when the run was scored); a red ``RANDOM WEIGHTS`` banner when the ViT was
    untrained; the colour legend (wrapped onto as many lines as it needs); then one row per
    sampled image with the columns image, segments, pseudo mask, ground truth (only when some
    sampled image has a mask) and last-block CLS attention; finally the confusion matrix
    (enlarged) and the label-free diagnostics, when given.

    The sample is ``num_samples`` ids drawn with ``seed`` from the sorted ids of the manifest
    (or of the shards), shown in sorted order, so the same run always gives the same picture
    and two runs on the same data show the same images side by side.

    Args:
        run: a ``datus predict`` run (``run.json``, ``shards/``).
        results: folder with masks, colours and metrics (the run folder by default; a
            ``clusters/k<K>`` folder of ``datus cluster`` also works).
        num_samples: images to show (fewer if the run has fewer).
        seed: seed of the sample.
        thumb_height: height in pixels of every thumbnail; widths keep the image's aspect.
        diagnostics: a picture of the label-free diagnostics to place at the bottom.

    Raises:
        FileNotFoundError: the run holds no shards.
        ValueError: ``num_samples`` is below 1 or ``thumb_height`` below 8 pixels.
    """
    results = results or run.results
    if num_samples < 1:
        raise ValueError(f"make_report: num_samples must be >= 1, got {num_samples}")
    if thumb_height < 8:
        raise ValueError(f"make_report: thumb_height must be >= 8 pixels, got {thumb_height}")
    shards = run.shards()
    if not shards:
        raise FileNotFoundError(f"{run.root}: no shards found; run `datus predict` into this folder first.")

    ids = _listed_ids(results)
    if ids is None:
        ids = (image_id for shard in shards for image_id in read_image_ids([shard]))
    sampled, num_images = _sample_ids(ids, num_samples, seed)
    records = _find_records(shards, sampled)
    facts = _run_facts(run, results, records)
    with_ground_truth = any(record.mask_path for record in records)
    class_count = _class_count(facts, records) if with_ground_truth else facts.num_classes

    columns = ["image", "segments (outlined; dark: noise)", "pseudo mask"]
    if with_ground_truth:
        columns.append("ground truth")
    columns.append("CLS attention")
    rows = [_row_tiles(record, results, facts, class_count, with_ground_truth, thumb_height) for record in records]
    picture = _compose(
        title=_title(facts, num_images, results, run),
        random_weights=facts.random_weights,
        legend=_legend_groups(facts, class_count, with_ground_truth),
        columns=columns,
        records=records,
        rows=rows,
        bottom=[part for part in (_open_rgb(results.file(CONFUSION_FILE)), diagnostics) if part is not None],
    )
    target = results.file(REPORT_FILE)
    write_image(target, picture)
    return target


def _listed_ids(results: Results) -> Iterator[str] | None:
    """Image ids of the results folder's manifest, line by line: the images that really got masks.

    None when the manifest is missing or not sound (its first line is checked here; a bad later
    line ends the listing).
    """
    path = results.file(MANIFEST_FILE)
    try:
        with open_regular(path) as stream:
            json.loads(stream.readline().decode("utf-8"))["image_id"]
    except (ValueError, KeyError, TypeError, OSError, RecursionError):
        return None

    def lines() -> Iterator[str]:
        try:
            with open_regular(path) as stream:
                for line in stream:
                    if line.strip():
                        yield str(json.loads(line)["image_id"])
        except (ValueError, KeyError, TypeError, OSError, RecursionError):
            return

    return lines()


def _sample_ids(ids: Iterable[str], num_samples: int, seed: int) -> tuple[list[str], int]:
    """A seeded sample of the ids, sorted, and how many ids there were.

    Each id gets a key from the seed and the id alone and the smallest keys win, so the sample
    does not depend on the order the ids come in; memory holds ``num_samples`` ids, whatever
    the size of the run.
    """
    kept: list[tuple[int, str]] = []  # a max-heap of (-key, id)
    seen = 0
    for image_id in ids:
        key = int(segment_keys(seed, image_id, np.zeros(1, dtype=np.uint64))[0])
        seen += 1
        if len(kept) < num_samples:
            heapq.heappush(kept, (-key, image_id))
        elif -key > kept[0][0]:
            heapq.heapreplace(kept, (-key, image_id))
    return sorted(image_id for _, image_id in kept), seen


def _find_records(shards: Sequence[Path], wanted: Sequence[str]) -> list[ImageRecord]:
    """Records of ``wanted`` ids in their given order; shards without one of them are never loaded."""
    remaining = set(wanted)
    found: dict[str, ImageRecord] = {}
    for shard in shards:
        if not remaining:
            break
        if remaining.isdisjoint(read_image_ids([shard])):
            continue
        for record in read_records(shard):
            if record.image_id in remaining:
                found[record.image_id] = record
                remaining.discard(record.image_id)
    if remaining:
        missing = sorted(remaining)
        log.warning("report: %d sampled ids are not in the shards (stale manifest?): %s", len(missing), missing[:5])
    return [found[image_id] for image_id in wanted if image_id in found]


def _optional_json(path: Path) -> Any:
    try:
        return read_json(path) if path.is_file() else None
    except UnreadableFile:
        return None


def _run_facts(run: Run, results: Results, records: Sequence[ImageRecord]) -> _RunFacts:
    identity = run.recorded_identity() or {}
    model = identity.get("model") or {}
    metrics = read_metrics(results.file(METRICS_FILE))
    described = _optional_json(results.file(CLASSES_FILE))
    num_clusters = int(metrics["num_clusters"]) if metrics else int(described["num_clusters"]) if described else None
    miou = None
    if metrics:
        protocols = metrics["protocols"]
        miou = {name: protocol.get("miou") for name, protocol in protocols.items()}
    class_names = metrics.get("class_names") if metrics else None
    if class_names is None:
        class_names = _dataset_class_names(records)
    return _RunFacts(
        name=run.root.resolve().name,
        backbone=str(model.get("backbone", "?")),
        random_weights=model.get("weights") == "random",
        num_clusters=num_clusters,
        num_classes=int(metrics["num_classes"]) if metrics else 0,
        mapping=metrics["protocols"]["dense"]["mapping"] if metrics else None,
        cluster_names=list(described["classes"]) if described else None,
        class_names=class_names,
        miou=miou,
    )


def _dataset_class_names(records: Sequence[ImageRecord]) -> list[str] | None:
    with_mask = next((record for record in records if record.mask_path), None)
    class_file = find_classes_file(Path(with_mask.mask_path).parent) if with_mask else None
    try:
        return read_classes_file(class_file)[0] if class_file is not None else None
    except ConfigurationError:
        return None


def _class_count(facts: _RunFacts, records: Sequence[ImageRecord]) -> int:
    """C for the ground-truth palette: the scored C, else the dataset's ``classes.json``, else the largest id seen."""
    if facts.num_classes:
        return facts.num_classes
    if facts.class_names:
        return len(facts.class_names)
    largest = 0
    for record in records:
        try:
            labels = read_label_png(Path(record.mask_path)) if record.mask_path else None
        except UnreadableFile:
            labels = None
        if labels is not None and (labels != 255).any():
            largest = max(largest, int(labels[labels != 255].max()) + 1)
    return largest


def _tile_size(orig_size: tuple[int, int], thumb_height: int) -> tuple[int, int]:
    """(width, height) of a thumbnail that keeps the image's aspect; very wide images get less height."""
    height, width = orig_size
    tile_width = max(1, round(width * thumb_height / max(height, 1)))
    if tile_width <= MAX_ASPECT * thumb_height:
        return tile_width, thumb_height
    tile_width = int(MAX_ASPECT * thumb_height)
    return tile_width, max(1, round(height * tile_width / max(width, 1)))


def _placeholder(size: tuple[int, int], fill: tuple[int, int, int], text: str) -> Image.Image:
    """A flat tile with a centred word, so a gap in the grid says why it is there."""
    tile = Image.new("RGB", size, fill)
    draw = ImageDraw.Draw(tile)
    font = font_of(12)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    ink = (255, 255, 255) if sum(fill) < 450 else INK
    position = ((size[0] - (right - left)) // 2 - left, (size[1] - (bottom - top)) // 2 - top)
    draw.text(position, text, fill=ink, font=font)
    return tile


def _heat_tile(attention: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """CLS attention, min-max normalised per image (only its shape matters), bilinear, viridis."""
    values = attention.astype(np.float32)
    low, high = float(values.min()), float(values.max())
    values = (values - low) / (high - low) if high > low else np.zeros_like(values)
    smooth = np.asarray(Image.fromarray(values, mode="F").resize(size, Image.Resampling.BILINEAR), dtype=np.float64)
    return Image.fromarray(heat_colours(smooth))


def _photo(record: ImageRecord, size: tuple[int, int]) -> Image.Image:
    image, _ = load_rgb(Path(record.image_path), min_side=max(size))
    return image.resize(size, Image.Resampling.BILINEAR)


def _segments_tile(record: ImageRecord, size: tuple[int, int]) -> Image.Image:
    """Segments as outlines on the grey photo (noise darkened), drawn from the record."""
    try:
        picture = np.asarray(_photo(record, size))
    except UnreadableFile:
        picture = np.full((size[1], size[0], 3), 160, dtype=np.uint8)
    return Image.fromarray(outline_picture(record, picture))


def _mask_tile(record: ImageRecord, results: Results, facts: _RunFacts, size: tuple[int, int]) -> Image.Image:
    """The label mask coloured exactly as the colour pass colours it.

    Read from the label mask, not from ``color/``, so that the report can be drawn while the
    colour pass is still writing (or has not been asked to write) those files.
    """
    mask = _label_thumbnail(results.image_file(MASKS, record.image_id), size)
    num_clusters = facts.num_clusters or int(mask.max()) + 1
    table = colour_table(num_clusters, facts.num_classes, facts.mapping)
    return Image.fromarray(colourise(mask, table, ignore_index=-1))


def _ground_truth_tile(record: ImageRecord, facts: _RunFacts, class_count: int, size: tuple[int, int]) -> Image.Image:
    """Ground truth in the class palette of the colour masks (``palette(K + C)[class]``); 255 black."""
    if not record.mask_path:
        return _placeholder(size, NO_DATA_GREY, "no mask")
    labels = _label_thumbnail(Path(record.mask_path), size)
    colours = palette((facts.num_clusters or 0) + class_count)[:class_count]
    return Image.fromarray(colourise(labels, colours, ignore_index=255))


def _label_thumbnail(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A label map shrunk by PIL with nearest neighbour before it becomes an array (huge maps stay cheap)."""
    with open_regular(path) as stream, Image.open(stream) as stored:
        if stored.mode not in ("L", "P", "I;16", "I", "1"):
            raise ValueError(f"{path}: not a single-channel label map (mode {stored.mode})")
        return np.asarray(stored.resize(size, Image.Resampling.NEAREST))


def _photo_tile(record: ImageRecord, size: tuple[int, int]) -> Image.Image:
    try:
        return _photo(record, size)
    except UnreadableFile as error:
        log.warning("report: cannot read %s (moved since the run?): %s", record.image_path, error)
        return _placeholder(size, MISSING_GREY, "missing")


def _guarded(draw: Callable[[], Image.Image], size: tuple[int, int], what: str) -> Image.Image:
    """Run one tile's drawing; a missing or broken file becomes a grey tile, never a crashed report."""
    try:
        return draw()
    except FileNotFoundError as error:
        log.warning("report: %s file missing: %s", what, error)
        return _placeholder(size, MISSING_GREY, "missing")
    except (OSError, ValueError) as error:
        log.warning("report: %s unreadable: %s", what, error)
        return _placeholder(size, MISSING_GREY, "unreadable")


def _row_tiles(
    record: ImageRecord,
    results: Results,
    facts: _RunFacts,
    class_count: int,
    with_ground_truth: bool,
    thumb_height: int,
) -> list[Image.Image]:
    size = _tile_size(record.orig_size, thumb_height)
    tiles = [
        _photo_tile(record, size),
        _guarded(lambda: _segments_tile(record, size), size, "segments"),
        _guarded(lambda: _mask_tile(record, results, facts, size), size, "pseudo mask"),
    ]
    if with_ground_truth:
        what = f"ground truth {record.mask_path}" if record.mask_path else "ground truth"  # name the file (PIL may not)
        tiles.append(_guarded(lambda: _ground_truth_tile(record, facts, class_count, size), size, what))
    tiles.append(_heat_tile(record.cls_attention, size))
    return tiles


def _open_rgb(path: Path) -> Image.Image | None:
    if not path.is_file():
        return None
    with open_regular(path) as stream, Image.open(stream) as stored:
        return stored.convert("RGB")


def _title(facts: _RunFacts, num_images: int, results: Results, run: Run) -> str:
    parts = [facts.name]
    if results.root.resolve() != run.root.resolve():
        try:
            parts[0] += f" ({results.root.resolve().relative_to(run.root.resolve())})"
        except ValueError:
            parts[0] += f" (results: {results.root.resolve().name})"
    parts += [f"backbone {facts.backbone}", f"K {facts.num_clusters or '?'}", f"{num_images} images"]
    if facts.miou is not None:
        shown = (f"{name} {100 * value:.1f}" if value is not None else f"{name} n/a" for name, value in facts.miou.items())
        parts.append("mIoU " + " / ".join(shown))
    else:
        parts.append("no ground truth: not scored")
    return "   |   ".join(parts)


def _legend_groups(facts: _RunFacts, class_count: int, with_ground_truth: bool) -> list[tuple[str, list[_Entry]]]:
    """(heading, entries) for the pseudo-mask colours and for the ground-truth classes."""
    groups = []
    if facts.num_clusters:
        table = colour_table(facts.num_clusters, facts.num_classes, facts.mapping)
        names = facts.cluster_names or [f"cluster {k}" for k in range(facts.num_clusters)]
        entries = [(_rgb(table[k]), f"{k}: {names[k]}" if k < len(names) else str(k)) for k in range(facts.num_clusters)]
        groups.append(("pseudo mask:", entries))
    if with_ground_truth and class_count:
        colours = palette((facts.num_clusters or 0) + class_count)
        names = facts.class_names
        if not names or len(names) != class_count:
            names = [str(c) for c in range(class_count)]
        entries = [(_rgb(colours[c]), f"{c}: {names[c]}") for c in range(class_count)]
        groups.append(("ground truth:", [*entries, (IGNORE_BLACK, "255: ignored")]))
    return groups


def _rgb(colour: np.ndarray) -> tuple[int, int, int]:
    return int(colour[0]), int(colour[1]), int(colour[2])


def _wrap_legend(groups: list[tuple[str, list[_Entry]]], width: int, font: Any) -> list[tuple[str, list[_Entry]]]:
    """Lines of (heading, entries) that fit ``width``; a group continues on further lines, never cut."""
    heading_width = max((text_width(heading, font) for heading, _ in groups), default=0)
    lines = []
    for heading, entries in groups:
        line: list[_Entry] = []
        x = PAD + heading_width + PAD
        for entry in entries:
            needed = 16 + text_width(entry[1], font) + 2 * PAD
            if line and x + needed > width - PAD:
                lines.append((heading, line))
                heading, line, x = "", [], PAD + heading_width + PAD
            line.append(entry)
            x += needed
        lines.append((heading, line))
    return lines


def _compose(
    title: str,
    random_weights: bool,
    legend: list[tuple[str, list[_Entry]]],
    columns: list[str],
    records: Sequence[ImageRecord],
    rows: list[list[Image.Image]],
    bottom: list[Image.Image],
) -> Image.Image:
    """Place title, banner, legend, column headers, rows and the bottom pictures on one canvas.

    The canvas is as wide as the widest of grid, title and banner, and exactly as tall as its
    parts (tests recompute it from the layout constants above). Bottom pictures (confusion
    matrix, diagnostics) are each enlarged by an integer factor, at most
    :data:`MAX_CONFUSION_SCALE`, to fill about their share of the grid's width.
    """
    title_font, small_font, banner_font = font_of(16), font_of(12), font_of(15)
    banner = "RANDOM WEIGHTS: the ViT is untrained; segments and masks only show the pipeline working"
    cell_width = max((row[0].width for row in rows), default=PAD)
    grid_width = PAD + len(columns) * (cell_width + PAD)
    width = max(grid_width, text_width(title, title_font) + 2 * PAD)
    if random_weights:
        width = max(width, text_width(banner, banner_font) + 2 * PAD)
    share = width // max(len(bottom), 1)  # each bottom picture is enlarged to about its share of the width
    bottom = [
        part.resize((part.width * scale, part.height * scale), Image.Resampling.NEAREST)
        for part in bottom
        if (scale := max(1, min(MAX_CONFUSION_SCALE, share // (part.width + 2 * PAD))))
    ]
    width = max(width, sum(part.width for part in bottom) + PAD * (len(bottom) + 1))
    lines = _wrap_legend(legend, width, small_font)
    rows_height = sum(LINE_HEIGHT + row[0].height + PAD for row in rows)
    header_height = TITLE_HEIGHT + (BANNER_HEIGHT if random_weights else 0) + LINE_HEIGHT * (len(lines) + 1)
    height = PAD + header_height + rows_height
    if bottom:
        height += max(part.height for part in bottom) + PAD

    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = PAD
    draw.text((PAD, y + 3), title, fill=INK, font=title_font)
    y += TITLE_HEIGHT
    if random_weights:
        draw.rectangle([0, y, width - 1, y + BANNER_HEIGHT - 3], fill=BANNER_RED)
        draw.text((PAD, y + 4), banner, fill=(255, 255, 255), font=banner_font)
        y += BANNER_HEIGHT
    heading_width = max((text_width(heading, small_font) for heading, _ in legend), default=0)
    for heading, entries in lines:
        draw.text((PAD, y + 2), heading, fill=INK, font=small_font)
        x = PAD + heading_width + PAD
        for colour, name in entries:
            draw.rectangle([x, y + 3, x + 11, y + 14], fill=colour, outline=(120, 120, 120))
            draw.text((x + 16, y + 2), name, fill=INK, font=small_font)
            x += 16 + text_width(name, small_font) + 2 * PAD
        y += LINE_HEIGHT
    for index, name in enumerate(columns):
        x = PAD + index * (cell_width + PAD)
        if text_width(name, small_font) > cell_width:
            name = name.split(" (")[0]  # small thumbnails: drop the note rather than cut the name
        label = fit_text(name, small_font, cell_width)
        draw.text((x + (cell_width - text_width(label, small_font)) // 2, y + 2), label, fill=INK, font=small_font)
    y += LINE_HEIGHT
    for record, tiles in zip(records, rows):
        valid = record.num_valid
        caption = (
            f"{record.image_id}   {record.orig_size[1]}x{record.orig_size[0]} px   "
            f"{valid} segments + {len(record.is_noise) - valid} noise"
        )
        draw.text((PAD, y + 2), fit_text(caption, small_font, width - 2 * PAD), fill=(70, 70, 70), font=small_font)
        y += LINE_HEIGHT
        for index, tile in enumerate(tiles):
            canvas.paste(tile, (PAD + index * (cell_width + PAD) + (cell_width - tile.width) // 2, y))
        y += tiles[0].height + PAD
    x = PAD
    for part in bottom:
        canvas.paste(part, (x, y))
        x += part.width + PAD
    return canvas
