"""One picture per run: ``report.png``, to judge a run at a glance without opening folders.

Numbers alone hide the failures that matter in unsupervised segmentation: masks that follow
the attention blob instead of objects, segments that are all noise, a cluster that swallows
the background. The report puts, for a small deterministic sample of images, the image next to
its discovered segments, its pseudo mask, its ground truth and the ViT's CLS attention, under
a title with the run's settings and scores and above the confusion matrix.

Colours match the files on disk: pseudo masks use :func:`datus.painting.colour_table` (after
evaluation a matched cluster has its class's colour) and ground truth uses the same class
palette, so a correct pixel has the same colour in both columns.

Only PIL and numpy draw; only the shards that hold the sampled images are read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from datamodules.images import load_rgb
from datus.io import CLASSES_FILE, MANIFEST_FILE, atomic_path, read_label_png
from datus.module import ImageRecord
from datus.painting import colour_table, colourise, palette
from datus.shards import find_class_file, list_shards, read_image_ids, read_records

log = logging.getLogger(__name__)

REPORT_FILE = "report.png"

PAD = 8
"""Gap in pixels around the picture and between grid cells."""
TITLE_HEIGHT = 26
"""Height of the title line (run, backbone, K, images, mIoU)."""
BANNER_HEIGHT = 26
"""Height of the red ``RANDOM WEIGHTS`` banner, present only for runs with an untrained ViT."""
LINE_HEIGHT = 18
"""Height of one line of small text: a legend line, the column headers, a row caption."""
MAX_ASPECT = 4.0
"""Widest thumbnail, as a multiple of its height; a panorama is shrunk to fit, not stretched."""

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
BANNER_RED = (200, 16, 16)
"""Fill of the random-weights banner (tests look for it)."""
MISSING_GREY = (128, 128, 128)
"""Fill of a tile whose file is missing or unreadable (an input image moved since the run)."""
NO_DATA_GREY = (215, 215, 215)
"""Fill of a ground-truth tile for an image that has no mask."""
NOISE_GREY = (56, 56, 56)
"""Colour of noise patches (segment id 0) in the segments column."""
IGNORE_BLACK = (0, 0, 0)

_HEAT_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_HEAT_COLOURS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)
"""Anchors of an inferno-like ramp: dark to bright is monotonic in lightness, so it reads in grey too."""


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
    miou: tuple[float | None, float | None] | None


_LegendLine = list[tuple[tuple[int, int, int], str]]
"""A heading (its colour unused) followed by (swatch colour, name) entries."""


def make_report(
    run_dir: Path,
    results_dir: Path | None = None,
    num_samples: int = 8,
    seed: int = 0,
    thumb_height: int = 160,
) -> Path:
    """Draw ``results_dir/report.png`` for a finished run and return its path.

    Layout, top to bottom: a title line (run folder, backbone, K, number of images, dense and
    paper mIoU when the run was scored); a red ``RANDOM WEIGHTS`` banner when the ViT was
    untrained; a colour legend; then one row per sampled image with the columns image,
    segments (noise dark grey), pseudo mask, ground truth (only when some sampled image has a
    mask) and last-block CLS attention; finally ``confusion.png`` when it exists.

    The sample is ``num_samples`` ids drawn with ``seed`` from the sorted ids of the manifest
    (or of the shards), shown in sorted order, so the same run always gives the same picture
    and two runs on the same data show the same images side by side.

    Args:
        run_dir: folder of a ``datus predict`` run (holds ``run.json``, ``shards/``, ``segments/``).
        results_dir: folder with masks, colours and metrics (``run_dir`` by default; a
            ``clusters/k<K>`` folder of ``datus cluster`` also works).
        num_samples: images to show (fewer if the run has fewer).
        seed: seed of the sample.
        thumb_height: height in pixels of every thumbnail; widths keep the image's aspect.

    Returns:
        The path of the written ``report.png``.

    Raises:
        FileNotFoundError: ``run_dir`` holds no shards.
        ValueError: ``num_samples`` is below 1 or ``thumb_height`` below 8 pixels.
    """
    run_dir = Path(run_dir)
    results_dir = Path(results_dir) if results_dir is not None else run_dir
    if num_samples < 1:
        raise ValueError(f"make_report: num_samples must be >= 1, got {num_samples}")
    if thumb_height < 8:
        raise ValueError(f"make_report: thumb_height must be >= 8 pixels, got {thumb_height}")
    shards = list_shards(run_dir)
    if not shards:
        raise FileNotFoundError(f"{run_dir}: no shards found; run `datus predict` into this folder first.")

    all_ids = _listed_ids(results_dir) or read_image_ids(shards)
    sample = _sample_ids(all_ids, num_samples, seed)
    records = _find_records(shards, sample)
    facts = _run_facts(run_dir, results_dir)
    with_ground_truth = any(record.mask_path for record in records)
    class_count = _class_count(facts, records) if with_ground_truth else facts.num_classes

    columns = ["image", "segments (grey: noise)", "pseudo mask"]
    if with_ground_truth:
        columns.append("ground truth")
    columns.append("CLS attention")
    rows = [
        _row_tiles(record, run_dir, results_dir, facts, class_count, with_ground_truth, thumb_height)
        for record in records
    ]
    class_names = _dataset_class_names(records) if with_ground_truth else None
    picture = _compose(
        title=_title(facts, len(all_ids), results_dir, run_dir),
        random_weights=facts.random_weights,
        legend=_legend_lines(facts, class_count, with_ground_truth, class_names),
        columns=columns,
        records=records,
        rows=rows,
        confusion=_open_rgb(results_dir / "confusion.png"),
    )

    target = results_dir / REPORT_FILE
    with atomic_path(target) as temporary:
        picture.save(temporary, format="PNG")
    return target


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _listed_ids(results_dir: Path) -> list[str]:
    """Image ids of the results folder's manifest: the images that really got masks."""
    path = results_dir / MANIFEST_FILE
    if not path.is_file():
        return []
    return [json.loads(line)["image_id"] for line in path.read_text().splitlines() if line.strip()]


def _sample_ids(ids: Sequence[str], num_samples: int, seed: int) -> list[str]:
    """A seeded sample, independent of the order the ids were listed in, returned sorted."""
    unique = sorted(set(ids))
    if len(unique) <= num_samples:
        return unique
    chosen = np.random.default_rng(seed).choice(len(unique), size=num_samples, replace=False)
    return sorted(unique[i] for i in chosen)


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


def _run_facts(run_dir: Path, results_dir: Path) -> _RunFacts:
    settings = (_read_json(run_dir / "run.json") or {}).get("settings", {})
    metrics = _read_json(results_dir / "metrics.json")
    described = _read_json(results_dir / CLASSES_FILE)
    num_clusters = None
    if metrics:
        num_clusters = int(metrics["num_clusters"])
    elif described:
        num_clusters = int(described["num_clusters"])
    miou = None
    if metrics:
        protocols = metrics["protocols"]
        miou = (protocols["dense"].get("miou"), protocols["paper"].get("miou"))
    return _RunFacts(
        name=run_dir.resolve().name,
        backbone=str(settings.get("backbone", "?")),
        random_weights=settings.get("weights") == "random",
        num_clusters=num_clusters,
        num_classes=int(metrics["num_classes"]) if metrics else 0,
        mapping=metrics["protocols"]["dense"]["mapping"] if metrics else None,
        cluster_names=list(described["classes"]) if described else None,
        miou=miou,
    )


def _class_count(facts: _RunFacts, records: Sequence[ImageRecord]) -> int:
    """C for the ground-truth palette: the scored C, else the dataset's ``classes.json``, else the largest id seen."""
    if facts.num_classes:
        return facts.num_classes
    class_file = find_class_file(records)
    if class_file is not None:
        return len(json.loads(class_file.read_text())["classes"])
    largest = 0
    for record in records:
        try:
            labels = read_label_png(Path(record.mask_path)) if record.mask_path else None
        except (OSError, ValueError):
            labels = None
        if labels is not None and (labels != 255).any():
            largest = max(largest, int(labels[labels != 255].max()) + 1)
    return largest


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _text_width(text: str, font: Any) -> int:
    left, _, right, _ = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    return int(right - left)


def _fit_text(text: str, font: Any, width: int) -> str:
    """``text``, cut with ``...`` so that it fits ``width`` pixels (long image ids, many classes)."""
    if _text_width(text, font) <= width:
        return text
    while text and _text_width(text + "...", font) > width:
        text = text[:-1]
    return text + "..."


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
    font = _font(12)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    ink = (255, 255, 255) if sum(fill) < 450 else INK
    position = ((size[0] - (right - left)) // 2 - left, (size[1] - (bottom - top)) // 2 - top)
    draw.text(position, text, fill=ink, font=font)
    return tile


def _labels_tile(colours: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """Label colours resized with nearest neighbour: interpolation would invent colours between labels."""
    return Image.fromarray(np.ascontiguousarray(colours.astype(np.uint8))).resize(size, Image.Resampling.NEAREST)


def _heat_tile(attention: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """CLS attention, min-max normalised per image (only its shape matters), bilinear, inferno-like."""
    values = attention.astype(np.float32)
    low, high = float(values.min()), float(values.max())
    values = (values - low) / (high - low) if high > low else np.zeros_like(values)
    smooth = np.asarray(Image.fromarray(values, mode="F").resize(size, Image.Resampling.BILINEAR), dtype=np.float64)
    smooth = np.clip(smooth, 0.0, 1.0)
    rgb = np.stack([np.interp(smooth, _HEAT_STOPS, _HEAT_COLOURS[:, c]) for c in range(3)], axis=-1)
    return Image.fromarray(rgb.round().astype(np.uint8))


def _segments_tile(record: ImageRecord, run_dir: Path, size: tuple[int, int]) -> Image.Image:
    """The segments PNG (0 = noise, 1..S valid); rebuilt from the record if the PNG is gone."""
    path = run_dir / "segments" / f"{record.image_id}.png"
    if path.is_file():
        segments = read_label_png(path)
    else:
        segments = np.where(record.is_noise, 0, np.cumsum(~record.is_noise))[record.segment_map]
    colours = palette(int(segments.max()) + 1)
    colours[0] = NOISE_GREY
    return _labels_tile(colours[segments], size)


def _mask_tile(record: ImageRecord, results_dir: Path, facts: _RunFacts, size: tuple[int, int]) -> Image.Image:
    """The colour mask as written, or the label mask coloured exactly as postprocess would."""
    colour_path = results_dir / "color" / f"{record.image_id}.png"
    if colour_path.is_file():
        with Image.open(colour_path) as stored:
            return stored.convert("RGB").resize(size, Image.Resampling.NEAREST)
    mask = read_label_png(results_dir / "masks" / f"{record.image_id}.png")
    num_clusters = facts.num_clusters or int(mask.max()) + 1
    table = colour_table(num_clusters, facts.num_classes, facts.mapping)
    return _labels_tile(colourise(mask, table, ignore_index=-1), size)


def _ground_truth_tile(record: ImageRecord, facts: _RunFacts, class_count: int, size: tuple[int, int]) -> Image.Image:
    """Ground truth in the class palette of the colour masks (``palette(K + C)[class]``); 255 black."""
    if not record.mask_path:
        return _placeholder(size, NO_DATA_GREY, "no mask")
    labels = read_label_png(Path(record.mask_path))
    colours = palette((facts.num_clusters or 0) + class_count)[:class_count]
    return _labels_tile(colourise(labels, colours, ignore_index=255), size)


def _photo_tile(record: ImageRecord, size: tuple[int, int]) -> Image.Image:
    try:
        return load_rgb(Path(record.image_path)).resize(size, Image.Resampling.BILINEAR)
    except FileNotFoundError:
        log.warning("report: input image %s is missing (moved since the run?)", record.image_path)
        return _placeholder(size, MISSING_GREY, "missing")
    except OSError as error:
        log.warning("report: cannot read %s: %s", record.image_path, error)
        return _placeholder(size, MISSING_GREY, "unreadable")


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
    run_dir: Path,
    results_dir: Path,
    facts: _RunFacts,
    class_count: int,
    with_ground_truth: bool,
    thumb_height: int,
) -> list[Image.Image]:
    size = _tile_size(record.orig_size, thumb_height)
    tiles = [
        _photo_tile(record, size),
        _guarded(lambda: _segments_tile(record, run_dir, size), size, "segments"),
        _guarded(lambda: _mask_tile(record, results_dir, facts, size), size, "pseudo mask"),
    ]
    if with_ground_truth:
        tiles.append(_guarded(lambda: _ground_truth_tile(record, facts, class_count, size), size, "ground truth"))
    tiles.append(_heat_tile(record.cls_attention, size))
    return tiles


def _open_rgb(path: Path) -> Image.Image | None:
    if not path.is_file():
        return None
    with Image.open(path) as stored:
        return stored.convert("RGB")


def _title(facts: _RunFacts, num_images: int, results_dir: Path, run_dir: Path) -> str:
    parts = [facts.name]
    if results_dir.resolve() != run_dir.resolve():
        try:
            parts[0] += f" ({results_dir.resolve().relative_to(run_dir.resolve())})"
        except ValueError:
            parts[0] += f" (results: {results_dir.resolve().name})"
    parts += [f"backbone {facts.backbone}", f"K {facts.num_clusters or '?'}", f"{num_images} images"]
    if facts.miou is not None:
        dense, paper = (f"{100 * value:.1f}" if value is not None else "n/a" for value in facts.miou)
        parts.append(f"mIoU dense {dense} / paper {paper}")
    return "   |   ".join(parts)


def _legend_lines(
    facts: _RunFacts, class_count: int, with_ground_truth: bool, class_names: list[str] | None
) -> list[_LegendLine]:
    """Swatch-and-name entries: one line for the pseudo-mask colours, one for the ground-truth classes."""
    lines = []
    if facts.num_clusters:
        table = colour_table(facts.num_clusters, facts.num_classes, facts.mapping)
        names = facts.cluster_names or [f"cluster {k}" for k in range(facts.num_clusters)]
        entries = [
            (_rgb(table[k]), f"{k}: {names[k]}" if k < len(names) else str(k)) for k in range(facts.num_clusters)
        ]
        lines.append([((255, 255, 255), "pseudo mask:"), *entries])
    if with_ground_truth and class_count:
        colours = palette((facts.num_clusters or 0) + class_count)
        names = class_names if class_names and len(class_names) == class_count else [str(c) for c in range(class_count)]
        entries = [(_rgb(colours[c]), f"{c}: {names[c]}") for c in range(class_count)]
        lines.append([((255, 255, 255), "ground truth:"), *entries, (IGNORE_BLACK, "255: ignored")])
    return lines


def _rgb(colour: np.ndarray) -> tuple[int, int, int]:
    return int(colour[0]), int(colour[1]), int(colour[2])


def _dataset_class_names(records: Sequence[ImageRecord]) -> list[str] | None:
    class_file = find_class_file(records)
    return list(json.loads(class_file.read_text())["classes"]) if class_file is not None else None


def _compose(
    title: str,
    random_weights: bool,
    legend: list[_LegendLine],
    columns: list[str],
    records: Sequence[ImageRecord],
    rows: list[list[Image.Image]],
    confusion: Image.Image | None,
) -> Image.Image:
    """Place title, banner, legend, column headers, rows and the confusion matrix on one canvas.

    The canvas is as wide as the widest of grid, title, banner and confusion matrix, and exactly
    as tall as its parts (tests recompute it from the layout constants above).
    """
    title_font, small_font, banner_font = _font(16), _font(12), _font(15)
    banner = "RANDOM WEIGHTS: the ViT is untrained; segments and masks only show the pipeline working"
    cell_width = max((row[0].width for row in rows), default=PAD)
    grid_width = PAD + len(columns) * (cell_width + PAD)
    width = max(grid_width, _text_width(title, title_font) + 2 * PAD)
    if random_weights:
        width = max(width, _text_width(banner, banner_font) + 2 * PAD)
    if confusion is not None:
        width = max(width, confusion.width + 2 * PAD)
    rows_height = sum(LINE_HEIGHT + row[0].height + PAD for row in rows)
    header_height = TITLE_HEIGHT + (BANNER_HEIGHT if random_weights else 0) + LINE_HEIGHT * (len(legend) + 1)
    height = PAD + header_height + rows_height
    if confusion is not None:
        height += confusion.height + PAD

    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = PAD
    draw.text((PAD, y + 3), title, fill=INK, font=title_font)
    y += TITLE_HEIGHT
    if random_weights:
        draw.rectangle([0, y, width - 1, y + BANNER_HEIGHT - 3], fill=BANNER_RED)
        draw.text((PAD, y + 4), banner, fill=(255, 255, 255), font=banner_font)
        y += BANNER_HEIGHT
    heading_width = max((_text_width(line[0][1], small_font) for line in legend), default=0)
    for line in legend:
        _draw_legend_line(draw, line, y, width, heading_width, small_font)
        y += LINE_HEIGHT
    for index, name in enumerate(columns):
        x = PAD + index * (cell_width + PAD)
        if _text_width(name, small_font) > cell_width:
            name = name.split(" (")[0]  # small thumbnails: drop the note rather than cut the name
        label = _fit_text(name, small_font, cell_width)
        draw.text((x + (cell_width - _text_width(label, small_font)) // 2, y + 2), label, fill=INK, font=small_font)
    y += LINE_HEIGHT
    for record, tiles in zip(records, rows):
        valid = int((~record.is_noise).sum())
        caption = (
            f"{record.image_id}   {record.orig_size[1]}x{record.orig_size[0]} px   "
            f"{valid} segments + {len(record.is_noise) - valid} noise"
        )
        draw.text((PAD, y + 2), _fit_text(caption, small_font, width - 2 * PAD), fill=(70, 70, 70), font=small_font)
        y += LINE_HEIGHT
        for index, tile in enumerate(tiles):
            canvas.paste(tile, (PAD + index * (cell_width + PAD) + (cell_width - tile.width) // 2, y))
        y += tiles[0].height + PAD
    if confusion is not None:
        canvas.paste(confusion, (PAD, y))
    return canvas


def _draw_legend_line(
    draw: ImageDraw.ImageDraw,
    entries: _LegendLine,
    y: int,
    width: int,
    heading_width: int,
    font: Any,
) -> None:
    """A heading, then swatches with names; entries that do not fit end in ``...`` (K in the hundreds)."""
    x = PAD
    (_, heading), *swatches = entries
    draw.text((x, y + 2), heading, fill=INK, font=font)
    x += heading_width + PAD
    for colour, name in swatches:
        needed = 12 + 4 + _text_width(name, font) + 2 * PAD
        if x + needed > width - PAD:
            draw.text((x, y + 2), "...", fill=INK, font=font)
            return
        draw.rectangle([x, y + 3, x + 11, y + 14], fill=colour, outline=(120, 120, 120))
        draw.text((x + 16, y + 2), name, fill=INK, font=font)
        x += needed
