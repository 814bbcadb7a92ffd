"""Stages 6-8 on a finished run's shards: clustering, painting, evaluation.

One function serves both the end of ``datus predict`` (as a callback, possibly on several DDP
ranks) and ``datus cluster`` (a single process re-clustering saved shards with another K,
engine or PCA, without running the ViT again).

Under DDP every rank paints and scores its own share of the shards; only the metric's
confusion matrix (and, with the torch engine, k-means sums and counts) cross ranks.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from datus.clustering import ClusterModel, fit_clusters
from datamodules.images import load_rgb
from datus.io import (
    CLASSES_FILE,
    MANIFEST_FILE,
    read_label_png,
    remove_stale_temporaries,
    write_json,
    write_npz,
    write_png,
    write_text,
)
from datus.metrics import MatchedSegmentationMetric, format_table, save_confusion_png
from datus.module import ImageRecord
from datus.report import make_report
from datus.painting import colour_table, colourise, label_dtype, overlay, upsample_nearest
from datus.shards import find_class_file, list_shards, read_image_paths, read_records, read_segment_table

log = logging.getLogger(__name__)

IGNORE_INDEX = 255


@dataclass
class ClusterSettings:
    """What stage 6 needs; saved beside the centroids so a rerun can tell if they still apply."""

    num_clusters: int = 6
    engine: Literal["sklearn", "torch"] = "sklearn"
    init: Literal["k-means++", "random"] = "k-means++"
    pca_components: int | None = None
    minibatch: bool = False
    seed: int = 0

    def validate(self) -> None:
        if self.num_clusters < 1:
            raise ValueError(
                f"--cluster.num_clusters must be >= 1, got {self.num_clusters}; pass the number of pseudo classes, e.g. 6"
            )
        if self.pca_components is not None and self.pca_components < 1:
            raise ValueError(f"--cluster.pca_components must be >= 1 or null, got {self.pca_components}")


@dataclass
class EvaluationSettings:
    """Ground-truth details; ``num_classes`` None means: read ``classes.json`` or skip scoring."""

    num_classes: int | None = None
    ignore_index: int = IGNORE_INDEX
    class_names: list[str] | None = None


@dataclass
class PostprocessResult:
    num_images: int
    num_segments: int
    num_noise_segments: int
    results_dir: Path
    metrics: dict[str, Any] | None
    skipped: list[dict[str, str]] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def model_dir(run_dir: Path, num_clusters: int) -> Path:
    return run_dir / "clusters" / f"k{num_clusters}"


def fit_or_load(run_dir: Path, settings: ClusterSettings, shards: Sequence[Path], device: torch.device) -> ClusterModel:
    """Fit stage 6 on the valid segments of all shards, or reuse a fit of the same settings and shards.

    sklearn engine: global rank 0 reads every shard's embeddings and fits; the others wait and
    load the result. torch engine: each rank reads only its own shards and the k-means sums
    are all-reduced, so no process ever holds every embedding.
    """
    rank, world = _rank_and_world()
    directory = model_dir(run_dir, settings.num_clusters)
    settings_file = directory / "settings.json"
    identity = {"settings": asdict(settings), "shards": [[p.name, p.stat().st_size] for p in shards]}
    if settings_file.is_file() and json.loads(settings_file.read_text()) == identity:
        return ClusterModel.load(directory)
    if settings.engine == "torch":
        table = read_segment_table(shards[rank::world])
        valid = torch.from_numpy(table.embeddings[~table.is_noise]).to(device)
        model = fit_clusters(valid, **_fit_arguments(settings))
    else:
        if rank == 0:
            table = read_segment_table(shards)
            model = fit_clusters(table.embeddings[~table.is_noise].astype(np.float32), **_fit_arguments(settings))
            model.save(directory)
            write_json(settings_file, identity)
        _barrier()
        return ClusterModel.load(directory)
    if rank == 0:
        model.save(directory)
        write_json(settings_file, identity)
    _barrier()
    return model


def _fit_arguments(settings: ClusterSettings) -> dict[str, Any]:
    return {
        "num_clusters": settings.num_clusters,
        "engine": settings.engine,
        "init": settings.init,
        "pca_components": settings.pca_components,
        "seed": settings.seed,
        "minibatch": settings.minibatch,
    }


def _ground_truth(record: ImageRecord, num_classes: int, ignore_index: int) -> tuple[np.ndarray | None, str | None]:
    """The record's mask, or why it cannot be scored (a wrong size is never silently resized)."""
    if not record.mask_path:
        return None, None
    try:
        target = read_label_png(Path(record.mask_path))
    except Exception as error:
        return None, f"unreadable mask: {error}"
    if target.shape != record.orig_size:
        return None, (
            f"mask is {target.shape[1]}x{target.shape[0]}, image is {record.orig_size[1]}x{record.orig_size[0]}; "
            "fix the mask (datus prepare crops SUIM's tall masks) so that sizes match"
        )
    invalid = np.unique(target[(target >= num_classes) & (target != ignore_index)])
    if invalid.size:
        return None, (
            f"mask has values {invalid[:10].tolist()} >= num_classes {num_classes} that are not the ignore index "
            f"{ignore_index}; map them to {ignore_index} or raise --cluster.num_classes"
        )
    return target, None


def postprocess_run(
    run_dir: Path,
    settings: ClusterSettings,
    evaluation: EvaluationSettings,
    results_dir: Path | None = None,
    device: torch.device | None = None,
    write_colour: bool = True,
) -> PostprocessResult:
    """Cluster, paint and evaluate a run folder's shards.

    Args:
        run_dir: folder of a ``datus predict`` run (holds ``shards/``).
        settings: stage 6 settings.
        evaluation: ground-truth settings.
        results_dir: where masks, colours and metrics go (default: ``run_dir``).
        device: where the torch engine computes.
        write_colour: also write colour masks and overlays.
    """
    settings.validate()
    rank, world = _rank_and_world()
    device = device or torch.device("cpu")
    results_dir = results_dir or run_dir
    shards = list_shards(run_dir)
    if not shards:
        raise FileNotFoundError(f"{run_dir}: no shards found; run `datus predict` into this folder first.")
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    model = fit_or_load(run_dir, settings, shards, device)
    seconds["clustering"] = time.perf_counter() - started

    own_shards = shards[rank::world]
    first_records = read_records(own_shards[0]) if own_shards else []
    num_classes, class_names = evaluation.num_classes, evaluation.class_names
    class_file = find_class_file(first_records)
    if class_file is not None and num_classes is None:
        described = json.loads(class_file.read_text())
        num_classes, class_names = len(described["classes"]), class_names or described["classes"]
    metric = (
        MatchedSegmentationMetric(settings.num_clusters, num_classes, evaluation.ignore_index).to(device)
        if num_classes
        else None
    )

    started = time.perf_counter()
    skipped: list[dict[str, str]] = []
    counts = np.zeros(3, dtype=np.int64)  # images, segments, noise segments
    assignments_dir = model_dir(run_dir, settings.num_clusters) / "assignments"
    writes = FileWriterPool()
    progress = images_progress(f"painting and scoring, K={settings.num_clusters}", rank)
    for shard in own_shards:
        records = read_records(shard)
        progress.update(len(records))
        all_embeddings = np.concatenate([r.embeddings for r in records]).astype(np.float32)
        labels = np.asarray(model.assign(all_embeddings), dtype=np.int64)
        write_npz(assignments_dir / f"{shard.stem}.npz", {"labels": labels})
        offset = 0
        for record in records:
            segment_labels = labels[offset : offset + len(record.sizes)]
            offset += len(record.sizes)
            cluster_grid = segment_labels[record.segment_map]
            mask = upsample_nearest(cluster_grid, record.orig_size)
            writes.submit(write_png, results_dir / "masks" / f"{record.image_id}.png", mask.astype(label_dtype(settings.num_clusters)))
            counts += (1, len(record.sizes), int(record.is_noise.sum()))
            if metric is None:
                continue
            target, problem = _ground_truth(record, num_classes, evaluation.ignore_index)  # type: ignore[arg-type]
            if problem:
                skipped.append({"path": record.mask_path, "reason": problem})
                log.warning("not scored: %s: %s", record.mask_path, problem)
            elif target is not None:
                noise = upsample_nearest(record.is_noise[record.segment_map], record.orig_size)
                metric.update(
                    torch.from_numpy(mask).to(device), torch.from_numpy(target).to(device), torch.from_numpy(noise).to(device)
                )
    writes.wait()
    progress.close()
    seconds["painting"] = time.perf_counter() - started
    num_images, num_segments, num_noise = (_all_sum(int(value), device) for value in counts)  # every rank joins

    started = time.perf_counter()
    metrics = None
    if metric is not None:
        metrics = metric.compute()
        if rank == 0:
            metrics["num_images"] = num_images
            metrics["mapping"] = metrics["protocols"]["dense"]["mapping"]
            write_json(results_dir / "metrics.json", metrics)
            dense = metrics["protocols"]["dense"]
            save_confusion_png(
                np.asarray(dense["confusion"]), dense["mapping"], results_dir / "confusion.png", class_names
            )
            write_text(results_dir / "metrics.txt", format_table(metrics, class_names))
    seconds["evaluation"] = time.perf_counter() - started

    if rank == 0:
        write_dataset_description(shards, results_dir, settings.num_clusters, metrics, class_names)

    if write_colour:
        started = time.perf_counter()
        mapping = metrics["protocols"]["dense"]["mapping"] if metrics else None
        _paint_colours(own_shards, assignments_dir, results_dir, mapping, settings.num_clusters, num_classes or 0)
        seconds["colour"] = time.perf_counter() - started
    _barrier()
    if rank == 0:
        started = time.perf_counter()
        make_report(run_dir, results_dir)
        seconds["report"] = time.perf_counter() - started
    return PostprocessResult(
        num_images=num_images,
        num_segments=num_segments,
        num_noise_segments=num_noise,
        results_dir=results_dir,
        metrics=metrics,
        skipped=skipped,
        stage_seconds=seconds,
    )


def write_dataset_description(
    shards: Sequence[Path],
    results_dir: Path,
    num_clusters: int,
    metrics: dict[str, Any] | None,
    class_names: Sequence[str] | None,
) -> None:
    """Make the results folder a dataset: ``classes.json`` and a manifest of (image, mask) pairs.

    The manifest has one JSON object per line: ``image`` (absolute path of the input image, which
    stays where it is), ``mask`` (path relative to ``results_dir``) and ``image_id``. Masks are
    dense, so the ignore value never occurs in them; it is declared outside the cluster ids
    (255 for uint8 masks, 65535 for uint16) for training code that pads or augments.
    """
    mapping = metrics["protocols"]["dense"]["mapping"] if metrics else None
    names = []
    for cluster in range(num_clusters):
        matched = mapping.get(str(cluster)) if mapping else None
        names.append(class_names[matched] if matched is not None and class_names else f"cluster {cluster}")
    write_json(
        results_dir / CLASSES_FILE,
        {
            "num_clusters": num_clusters,
            "classes": names,
            "class_ids": list(range(num_clusters)),
            "matched_class": [mapping.get(str(c)) if mapping else None for c in range(num_clusters)],
            "ignore_index": 255 if num_clusters <= 255 else 65535,
        },
    )
    lines = [
        json.dumps({"image_id": image_id, "image": str(Path(path).resolve()), "mask": f"masks/{image_id}.png"}, ensure_ascii=False)
        for image_id, path in read_image_paths(shards)
    ]
    write_text(results_dir / MANIFEST_FILE, "\n".join(sorted(lines)) + "\n")


def images_progress(description: str, rank: int) -> tqdm:
    """A progress bar in images (and images/s) on rank 0, shown only on a terminal."""
    return tqdm(desc=description, unit="image", disable=None if rank == 0 else True, leave=False)


class FileWriterPool:
    """Runs file encoding and writing in threads (PIL and zlib release the GIL) and re-raises errors.

    The number of pending tasks is bounded so memory stays flat however many images there are.
    """

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


def _all_sum(value: int, device: torch.device) -> int:
    """Sum over ranks (NCCL needs the tensor on the rank's GPU, gloo on the CPU)."""
    if dist.is_available() and dist.is_initialized():
        tensor = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(tensor)
        return int(tensor.item())
    return int(value)


def _paint_colours(
    shards: Sequence[Path],
    labels_dir: Path,
    results_dir: Path,
    mapping: dict[str, int | None] | None,
    num_clusters: int,
    num_classes: int,
) -> None:
    """Colour masks and overlays for a person to look at."""
    table = colour_table(num_clusters, num_classes, mapping)
    writes = FileWriterPool()
    progress = images_progress("colour masks and overlays", _rank_and_world()[0])
    for shard in shards:
        with np.load(labels_dir / f"{shard.stem}.npz") as stored:
            labels = stored["labels"]
        offset = 0
        for record in read_records(shard):
            segment_labels = labels[offset : offset + len(record.sizes)]
            offset += len(record.sizes)
            writes.submit(_paint_one, record, segment_labels, table, results_dir)
            progress.update(1)
    writes.wait()
    progress.close()


def _paint_one(record: ImageRecord, segment_labels: np.ndarray, table: np.ndarray, results_dir: Path) -> None:
    mask = upsample_nearest(segment_labels[record.segment_map], record.orig_size)
    colours = colourise(mask, table, ignore_index=-1)
    write_png(results_dir / "color" / f"{record.image_id}.png", colours)
    try:
        picture = np.asarray(load_rgb(Path(record.image_path)))
    except Exception as error:  # the input may have moved since prediction: no overlay, no crash
        log.warning("no overlay for %s: %s", record.image_path, error)
        return
    if picture.shape[:2] == mask.shape:
        write_png(results_dir / "overlay" / f"{record.image_id}.png", overlay(picture, colours), compress_level=1)


def summarise_run(run_dir: Path, result: PostprocessResult, settings: ClusterSettings) -> dict[str, Any]:
    """Merge every rank's prediction log with the post-processing result into ``summary.json``."""
    predicted, resumed, passes = 0, 0, 0
    stage_seconds: dict[str, float] = {}
    skipped: list[dict[str, str]] = []
    for log_file in sorted((run_dir / "logs").glob("predict-rank*.json")):
        entry = json.loads(log_file.read_text())
        predicted += entry["images_written"]
        resumed = max(resumed, entry["images_resumed"])
        passes += entry["backbone_passes"]
        skipped.extend(entry["skipped"])
        for stage, value in entry["stage_seconds"].items():
            stage_seconds[stage] = stage_seconds.get(stage, 0.0) + value
    skipped.extend(result.skipped)
    stage_seconds.update(result.stage_seconds)
    summary: dict[str, Any] = {
        "images_in_run": result.num_images,
        "images_predicted_now": predicted,
        "images_from_earlier_runs": resumed,
        "skipped": skipped,
        "segments": result.num_segments,
        "noise_segments": result.num_noise_segments,
        "num_clusters": settings.num_clusters,
        "stage_seconds": stage_seconds,
        "backbone_passes": passes,
        "results_dir": str(result.results_dir),
    }
    if result.metrics:
        summary["miou"] = {name: p["miou"] for name, p in result.metrics["protocols"].items()}
    write_json(run_dir / "skipped.json", skipped)
    write_json(result.results_dir / "summary.json", summary)
    return summary


def format_summary(summary: dict[str, Any], metrics: dict[str, Any] | None, class_names: list[str] | None = None) -> str:
    lines = [
        f"datus: {summary['images_in_run']} images ({summary['images_predicted_now']} predicted now, "
        f"{summary['images_from_earlier_runs']} from an earlier run), {len(summary['skipped'])} skipped",
        f"segments: {summary['segments']} ({summary['noise_segments']} noise), K = {summary['num_clusters']}",
        "seconds per stage: " + ", ".join(f"{k} {v:.2f}" for k, v in summary["stage_seconds"].items()),
        f"outputs: {summary['results_dir']}",
    ]
    for skip in summary["skipped"]:
        lines.append(f"  skipped {skip['path']}: {skip['reason']}")
    if metrics:
        lines.append(format_table(metrics, class_names))
    return "\n".join(lines)


def _cluster_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="datus cluster",
        description="Re-cluster a finished run's segment embeddings, repaint and re-evaluate, without the ViT.",
    )
    parser.add_argument("--run", type=Path, required=True, help="output folder of a datus predict run")
    parser.add_argument("--k", type=int, nargs="+", required=True, help="one or more cluster counts (a sweep)")
    parser.add_argument("--engine", choices=["sklearn", "torch"], default="sklearn")
    parser.add_argument("--init", choices=["k-means++", "random"], default="k-means++")
    parser.add_argument("--pca_components", type=int, default=None)
    parser.add_argument("--minibatch", action="store_true", help="MiniBatchKMeans (the paper's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_classes", type=int, default=None, help="default: from the dataset's classes.json")
    parser.add_argument("--ignore_index", type=int, default=IGNORE_INDEX)
    parser.add_argument("--no_colour", action="store_true", help="skip colour masks and overlays")
    return parser


def run_cluster_command(args: Sequence[str]) -> list[dict[str, Any]]:
    """``datus cluster``: one result folder per K under ``RUN/clusters/k<K>/`` and a summary table."""
    options = _cluster_parser().parse_args(list(args))
    if not (options.run / "shards").is_dir():
        raise SystemExit(f"datus cluster: --run {options.run} has no shards/; give the --output_dir of a predict run.")
    rows = []
    for num_clusters in options.k:
        remove_stale_temporaries(model_dir(options.run, num_clusters))
        settings = ClusterSettings(
            num_clusters=num_clusters,
            engine=options.engine,
            init=options.init,
            pca_components=options.pca_components,
            minibatch=options.minibatch,
            seed=options.seed,
        )
        result = postprocess_run(
            options.run,
            settings,
            EvaluationSettings(num_classes=options.num_classes, ignore_index=options.ignore_index),
            results_dir=model_dir(options.run, num_clusters),
            write_colour=not options.no_colour,
        )
        summary = summarise_run(options.run, result, settings)
        row: dict[str, Any] = {"k": num_clusters, "segments": result.num_segments, "results_dir": str(result.results_dir)}
        if result.metrics:
            for name, protocol in result.metrics["protocols"].items():
                row[f"{name}_miou"] = protocol["miou"]
                row[f"{name}_pixel_accuracy"] = protocol["pixel_accuracy"]
        rows.append(row)
        print(format_summary(summary, result.metrics))
    write_json(options.run / "clusters" / "summary.json", rows)
    table = format_sweep(rows)
    write_text(options.run / "clusters" / "summary.txt", table + "\n")
    print(table)
    return rows


def format_sweep(rows: Sequence[dict[str, Any]]) -> str:
    """One line per K: mIoU and pixel accuracy of both protocols, as percentages."""
    columns = ["dense_miou", "dense_pixel_accuracy", "paper_miou", "paper_pixel_accuracy"]
    lines = ["    K " + "".join(f"{c:>22}" for c in columns)]
    for row in rows:
        cells = "".join(f"{100 * row[c]:>21.2f}%" if row.get(c) is not None else f"{'-':>22}" for c in columns)
        lines.append(f"{row['k']:>5} {cells}")
    return "\n".join(lines)
