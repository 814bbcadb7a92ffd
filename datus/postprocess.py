"""Stages 6-8 on a run's shards, in order: fit, paint and score, colour, galleries, describe.

One function serves the end of ``datus predict`` (the :class:`callbacks.pipeline.ClusterPaintEvaluate`
callback, on every DDP rank) and ``datus cluster`` (one process re-clustering saved shards with
other settings, without the ViT). Under DDP each rank paints and scores its own share of the
shards; only the metric's counts, k-means statistics and a few counts cross ranks, through
:class:`datus.collective.Collective`.

A rerun whose fit, settings and outputs are unchanged repaints nothing: ``painted.json`` records
what the files in the results folder were painted from, and each image's files are checked to
exist (a mask also to be a label map of the image's size) before they are skipped.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from datus.clustering import ClusterModel
from datus.collective import Collective
from datus.crf import CRFJob, CRFParams, refine_many
from datus.describe import PredictionLog, format_summary, write_dataset_files, write_summary
from datus.diagnostics import diagnostics_panel, measure, records_by_shard
from datus.drawing import colour_table, legend_picture
from datus.errors import ConfigurationError
from datus.fit import fit_identity, fit_or_load, segment_labels, segment_probabilities_of
from datus.gallery import matched_names, write_galleries
from datus.io import UnreadableFile, read_json, write_image, write_json
from datus.paint import FileWriterPool, is_mask_of, mask_of, noise_of, write_colour_files, write_label_files
from datus.records import ImageRecord
from datus.report import make_report
from datus.run import COLOUR, LEGEND_FILE, MASKS, METRICS_FILE, OVERLAY, PAINTED_FILE, SEGMENTS, SKIPPED_FILE, Results, Run
from datus.score import Scorer, class_info, read_metrics
from datus.settings import ClusterSettings, EvaluationSettings
from datus.shards import first_mask_path, read_image_paths, read_records
from datus.workers import available_cores

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
    crf: CRFParams | None = None,
) -> Outcome:
    """Cluster, paint, score and describe ``run``'s shards into ``results`` (every rank calls it).

    Args:
        run: the run folder (shards, fits).
        results: where masks, colours and metrics go (the run folder, or ``clusters/k<K>``).
        cluster: stage 6 and painting settings.
        evaluation: scoring settings.
        collective: the ranks taking part.
        prediction: what this invocation's prediction loop did (None for ``datus cluster``).
        crf: dense-CRF settings, used when ``cluster.crf`` asks for refinement.
    """
    crf = crf or CRFParams()
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
    fitted_on = fit_identity(run, cluster)
    model = fit_or_load(run, cluster, collective, fitted_on)
    seconds["clustering"] = time.perf_counter() - started
    identity = {
        "fit": fitted_on,
        "evaluation": [evaluation.num_classes, evaluation.ignore_index],
        "crf": [cluster.crf, asdict(crf) if cluster.crf else None],
    }
    previous = _read_painted(results)
    classes = class_info(evaluation, first_mask_path(shards))
    own = shards[collective.rank :: collective.world_size]

    started = time.perf_counter()
    reuse = previous.get("masks") == identity
    if not reuse and collective.is_main:  # a pass killed midway must not pass for a finished one
        write_json(results.file(PAINTED_FILE), {"masks": None, "colour": None})
    collective.barrier()
    earlier = read_metrics(results.file(METRICS_FILE), cluster.num_clusters) if classes is not None and reuse else None
    scored = classes is not None and earlier is None
    scorer = Scorer(classes, cluster.num_clusters, evaluation, collective.device) if scored and classes else None
    unrefined = Scorer(classes, cluster.num_clusters, evaluation, collective.device) if scorer and cluster.crf == "both" else None
    counts = np.zeros(3, dtype=np.int64)  # images, valid segments, noise segments
    writes = FileWriterPool()
    progress = _progress(f"masks, K={cluster.num_clusters}" + (" (CRF)" if cluster.crf else ""), collective)
    for item in _masks(own, model, results, reuse, scorer is not None, cluster, crf, collective):
        record = item.record
        counts += (1, record.num_valid, len(record.sizes) - record.num_valid)
        if item.write or not results.image_file(SEGMENTS, record.image_id).is_file():
            writes.submit(write_label_files, results, record, item.mask if item.write else None, cluster.num_clusters)
        target = scorer.ground_truth(record) if scorer is not None and item.mask is not None else None
        if scorer is not None and target is not None:
            noise = noise_of(record)
            scorer.add(item.mask, target, noise)
            if unrefined is not None and item.unrefined is not None:
                unrefined.add(item.unrefined, target, noise)
        progress.update(1)
    writes.wait()
    progress.close()
    num_images, num_valid, num_noise = collective.sum_counts(counts.tolist())
    seconds["painting"] = time.perf_counter() - started

    started = time.perf_counter()
    metrics = earlier
    if scorer is not None:
        metrics = scorer.compute()
        metrics["crf"] = {"applied": bool(cluster.crf), "settings": asdict(crf) if cluster.crf else None}
        if unrefined is not None:
            metrics["without_crf"] = unrefined.compute()["protocols"]
        if collective.is_main:
            scorer.write(results, metrics, num_images)
    seconds["evaluation"] = time.perf_counter() - started
    mapping = metrics["protocols"]["dense"]["mapping"] if metrics else None
    class_names = classes.names if classes is not None else None
    if collective.is_main:
        write_dataset_files(run, results, cluster.num_clusters, mapping, class_names)

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

    table = colour_table(cluster.num_clusters, classes.num_classes if classes else 0, mapping)
    summary: dict[str, Any] = {}
    drawings: dict[str, Future[float]] = {}
    with ThreadPoolExecutor(2) as beside_colour:  # their decoding, resizing and encoding leave the GIL to the colour pass
        if collective.is_main:
            started = time.perf_counter()
            diagnostics = measure(records_by_shard(shards), model, cluster)
            seconds["diagnostics"] = time.perf_counter() - started
            panel = diagnostics_panel(diagnostics, table, cluster.gallery)
            drawings["report"] = beside_colour.submit(_timed, make_report, run, results, diagnostics=panel)
            if cluster.gallery:
                names = matched_names(cluster.num_clusters, mapping, class_names)
                drawings["gallery"] = beside_colour.submit(
                    _timed, write_galleries, records_by_shard(shards), results, model, diagnostics.clusters, names, cluster.seed
                )
        if cluster.colour:
            started = time.perf_counter()
            colour_identity = {**identity, "mapping": mapping}
            _paint_colours(own, results, table, previous.get("colour") == colour_identity, collective)
            if collective.is_main:
                write_image(results.file(LEGEND_FILE), _legend(results, table, cluster.num_clusters, mapping, class_names))
            seconds["colour"] = time.perf_counter() - started
        collective.barrier()
        if collective.is_main:
            facts["diagnostics"] = diagnostics.summary()
            seconds |= {stage: drawing.result() for stage, drawing in drawings.items()}
            prediction_seconds = prediction.stage_seconds if prediction else {}
            facts["stage_seconds"] = {**prediction_seconds, **seconds}
            summary = write_summary(run, results, facts, skipped)
            painted = {"masks": identity, "colour": {**identity, "mapping": mapping} if cluster.colour else None}
            write_json(results.file(PAINTED_FILE), painted)
    return Outcome(summary, metrics, class_names, seconds)


def _timed(function: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    """Seconds ``function(*args, **kwargs)`` took (for work that runs in a thread beside other stages)."""
    started = time.perf_counter()
    function(*args, **kwargs)
    return time.perf_counter() - started


def _read_painted(results: Results) -> dict[str, Any]:
    try:
        content = read_json(results.file(PAINTED_FILE)) if results.file(PAINTED_FILE).is_file() else {}
    except UnreadableFile:
        content = {}
    return content if isinstance(content, dict) else {}


def _progress(description: str, collective: Collective) -> tqdm:
    """A progress bar in images on rank 0, shown only on a terminal."""
    return tqdm(desc=description, unit="image", disable=None if collective.is_main else True, leave=False)


@dataclass
class _Painting:
    """One image's masks in the painting pass; ``write`` says whether its mask file must be (re)written."""

    record: ImageRecord
    write: bool
    mask: np.ndarray | None = None
    unrefined: np.ndarray | None = None


def _masks(
    shards: list[Path],
    model: ClusterModel,
    results: Results,
    reuse: bool,
    scoring: bool,
    cluster: ClusterSettings,
    crf: CRFParams,
    collective: Collective,
) -> Iterator[_Painting]:
    """The painting work of every image of ``shards``, in order.

    A mask is only computed when something needs it (a missing or outdated file, scoring);
    CRF refinement runs in worker processes, a bounded number of images ahead.
    """

    def planned() -> Iterator[tuple[_Painting, np.ndarray]]:
        for shard in shards:
            records = read_records(shard)
            for record, labels in zip(records, segment_labels(model, records)):
                write = not (reuse and is_mask_of(results.image_file(MASKS, record.image_id), record))
                yield _Painting(record, write), labels

    def unrefined(item: _Painting, labels: np.ndarray) -> np.ndarray:
        return mask_of(item.record, labels, cluster.num_clusters)

    if not cluster.crf:
        for item, labels in planned():
            if item.write or scoring:
                item.mask = item.unrefined = unrefined(item, labels)
            yield item
        return
    for_jobs, for_results = itertools.tee(planned())
    jobs = (
        CRFJob(item.record.image_path, segment_probabilities_of(model, item.record, crf.temperature), item.record.segment_map)
        for item, _ in for_jobs
        if item.write or scoring
    )
    refined = refine_many(jobs, crf, max(1, available_cores() // collective.world_size))
    for item, labels in for_results:
        if item.write or scoring:
            item.unrefined = unrefined(item, labels)
            item.mask = next(refined)
            if item.mask is None:
                log.warning("no CRF for %s: the image cannot be read any more; its mask is unrefined", item.record.image_path)
                item.mask = item.unrefined
        yield item


def _paint_colours(shards: list[Path], results: Results, table: np.ndarray, reuse: bool, collective: Collective) -> None:
    """Colour masks and overlays of the masks as written, in the matched classes' colours."""
    writes = FileWriterPool()
    progress = _progress("colour masks and overlays", collective)
    for image_id, image_path in read_image_paths(shards):
        progress.update(1)
        if reuse and all(results.image_file(kind, image_id).is_file() for kind in (COLOUR, OVERLAY)):
            continue
        writes.submit(write_colour_files, results, image_id, image_path, table)
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

