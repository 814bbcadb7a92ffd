"""Stages 6-8 on a run's shards, in order: fit, paint and score, colour, describe.

One function serves the end of ``datus predict`` (the :class:`callbacks.pipeline.ClusterPaintEvaluate`
callback, on every DDP rank) and ``datus cluster`` (one process re-clustering saved shards with
other settings, without the ViT). Under DDP each rank paints and scores its own share of the
shards; only the metric's counts, k-means statistics and a few counts cross ranks, through
:class:`datus.collective.Collective`.

A rerun whose fit, settings and outputs are unchanged repaints nothing: ``painted.json`` records
what the files in the results folder were painted from, and each image's files are checked to
exist before they are skipped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from datus.clustering import ClusterModel
from datus.collective import Collective
from datus.describe import PredictionLog, format_summary, write_dataset_files, write_summary
from datus.drawing import colour_table, legend_picture
from datus.errors import ConfigurationError
from datus.fit import fit_identity, fit_or_load, segment_labels
from datus.io import UnreadableFile, read_json, write_image, write_json
from datus.paint import FileWriterPool, upsample_nearest, write_colour_files, write_label_files
from datus.report import make_report
from datus.run import COLOUR, LEGEND_FILE, MASKS, METRICS_FILE, OVERLAY, PAINTED_FILE, SEGMENTS, SKIPPED_FILE, Results, Run
from datus.score import Scorer, class_info
from datus.settings import ClusterSettings, EvaluationSettings
from datus.shards import first_mask_path, read_records

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What the dataset stages did, for the summary and the console."""

    summary: dict[str, Any]
    metrics: dict[str, Any] | None
    class_names: list[str] | None
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def console_text(self) -> str:
        return format_summary(self.summary, self.metrics, self.class_names)


def postprocess(
    run: Run,
    results: Results,
    cluster: ClusterSettings,
    evaluation: EvaluationSettings,
    collective: Collective,
    prediction: PredictionLog | None = None,
) -> Outcome:
    """Cluster, paint, score and describe ``run``'s shards into ``results`` (every rank calls it).

    Args:
        run: the run folder (shards, fits).
        results: where masks, colours and metrics go (the run folder, or ``clusters/k<K>``).
        cluster: stage 6 and painting settings.
        evaluation: scoring settings.
        collective: the ranks taking part.
        prediction: what this invocation's prediction loop did (None for ``datus cluster``).
    """
    shards = run.shards()
    if not shards:
        skipped = (prediction or PredictionLog()).skipped
        if collective.is_main:
            write_json(run.file(SKIPPED_FILE), skipped)
        raise ConfigurationError(
            f"no image of the input could be used ({len(skipped)} skipped, reasons in {run.file(SKIPPED_FILE)}); "
            "point --data.root at readable images"
        )
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    model = fit_or_load(run, cluster, collective)
    seconds["clustering"] = time.perf_counter() - started
    identity = {"fit": fit_identity(run, cluster), "evaluation": [evaluation.num_classes, evaluation.ignore_index]}
    previous = _read_painted(results)
    classes = class_info(evaluation, first_mask_path(shards))
    own = shards[collective.rank :: collective.world_size]

    started = time.perf_counter()
    reuse = previous.get("masks") == identity
    scorer = None
    metrics = _read_metrics(results) if reuse and classes is not None else None
    if classes is not None and metrics is None:
        scorer = Scorer(classes, cluster.num_clusters, evaluation, collective.device)
    counts = np.zeros(3, dtype=np.int64)  # images, valid segments, noise segments
    writes = FileWriterPool()
    progress = _progress(f"masks, K={cluster.num_clusters}", collective)
    for shard in own:
        records = read_records(shard)
        for record, labels in zip(records, segment_labels(model, records)):
            counts += (1, record.num_valid, len(record.sizes) - record.num_valid)
            need_mask = not (reuse and results.image_file(MASKS, record.image_id).is_file())
            need_segments = not results.image_file(SEGMENTS, record.image_id).is_file()
            if need_mask or need_segments or scorer is not None:
                mask = upsample_nearest(labels[record.segment_map], record.orig_size)
                writes.submit(write_label_files, results, record, mask if need_mask else None, cluster.num_clusters)
                if scorer is not None:
                    scorer.update(record, mask, upsample_nearest(record.is_noise[record.segment_map], record.orig_size))
        progress.update(len(records))
    writes.wait()
    progress.close()
    num_images, num_valid, num_noise = collective.sum_counts(counts.tolist())
    seconds["painting"] = time.perf_counter() - started

    started = time.perf_counter()
    if scorer is not None:
        metrics = scorer.compute()
        if collective.is_main:
            scorer.write(results, metrics, num_images)
    seconds["evaluation"] = time.perf_counter() - started
    mapping = metrics["protocols"]["dense"]["mapping"] if metrics else None
    class_names = classes.names if classes is not None else None
    if collective.is_main:
        write_dataset_files(run, results, cluster.num_clusters, mapping, class_names)

    if cluster.colour:
        started = time.perf_counter()
        table = colour_table(cluster.num_clusters, classes.num_classes if classes else 0, mapping)
        colour_identity = {**identity, "mapping": mapping}
        _paint_colours(own, model, results, table, previous.get("colour") == colour_identity, collective)
        if collective.is_main:
            write_image(results.file(LEGEND_FILE), _legend(results, table, cluster.num_clusters, mapping, class_names))
        seconds["colour"] = time.perf_counter() - started
    collective.barrier()

    skipped = (prediction.skipped if prediction else []) + (scorer.skipped if scorer else [])
    facts: dict[str, Any] = {"images_in_run": num_images}
    if prediction is not None:
        facts |= {
            "images_predicted_now": prediction.images_written,
            "images_from_earlier_runs": prediction.images_resumed,
            "backbone_passes": prediction.backbone_passes,
        }
    facts |= {"segments": num_valid, "noise_segments": num_noise, "num_clusters": cluster.num_clusters}
    if metrics:
        facts["miou"] = {name: protocol["miou"] for name, protocol in metrics["protocols"].items()}
    summary: dict[str, Any] = {}
    if collective.is_main:
        started = time.perf_counter()
        make_report(run, results)
        seconds["report"] = time.perf_counter() - started
        prediction_seconds = prediction.stage_seconds if prediction else {}
        facts["stage_seconds"] = {**prediction_seconds, **seconds}
        summary = write_summary(run, results, facts, skipped)
        write_json(results.file(PAINTED_FILE), {"masks": identity, "colour": {**identity, "mapping": mapping} if cluster.colour else None})
    return Outcome(summary, metrics, class_names, seconds)


def _read_painted(results: Results) -> dict[str, Any]:
    try:
        content = read_json(results.file(PAINTED_FILE)) if results.file(PAINTED_FILE).is_file() else {}
    except UnreadableFile:
        content = {}
    return content if isinstance(content, dict) else {}


def _read_metrics(results: Results) -> dict[str, Any] | None:
    """The metrics of an unchanged earlier scoring, or None to score again."""
    try:
        metrics = read_json(results.file(METRICS_FILE)) if results.file(METRICS_FILE).is_file() else None
    except UnreadableFile:
        return None
    return metrics if isinstance(metrics, dict) and "protocols" in metrics else None


def _progress(description: str, collective: Collective) -> tqdm:
    """A progress bar in images on rank 0, shown only on a terminal."""
    return tqdm(desc=description, unit="image", disable=None if collective.is_main else True, leave=False)


def _paint_colours(
    shards: list, model: ClusterModel, results: Results, table: np.ndarray, reuse: bool, collective: Collective
) -> None:
    """Colour masks and overlays for people to look at, in the matched classes' colours."""
    writes = FileWriterPool()
    progress = _progress("colour masks and overlays", collective)
    for shard in shards:
        records = read_records(shard)
        for record, labels in zip(records, segment_labels(model, records)):
            if reuse and all(results.image_file(kind, record.image_id).is_file() for kind in (COLOUR, OVERLAY)):
                continue
            mask = upsample_nearest(labels[record.segment_map], record.orig_size)
            writes.submit(write_colour_files, results, record, mask, table)
        progress.update(len(records))
    writes.wait()
    progress.close()


def _legend(
    results: Results, table: np.ndarray, num_clusters: int, mapping: dict[str, int | None] | None, names: list[str] | None
) -> Any:
    """``legend.png``: which colour is which cluster (and its matched class) in color/ and overlay/."""
    entries = []
    for cluster in range(num_clusters):
        matched = mapping.get(str(cluster)) if mapping else None
        label = f"cluster {cluster}"
        if matched is not None:
            label += f" = class {matched}" + (f" ({names[matched]})" if names else "")
        entries.append(((int(table[cluster][0]), int(table[cluster][1]), int(table[cluster][2])), label))
    columns = 1 if num_clusters <= 20 else 3
    return legend_picture(entries, f"{results.root.name}: colours of color/ and overlay/", columns)

