"""Stages 6-8 on a run's shards, in order: fit, one pass over the shards, colour, galleries, describe.

One function serves the end of ``datus predict`` (the :class:`datus.callbacks.pipeline.ClusterPaintEvaluate`
callback, on every DDP rank) and ``datus cluster`` (one process re-clustering saved shards with
other settings, without the ViT). The order, and what each stage reads and writes:

1. fit (:mod:`datus.stages.fit`): reads the memory-mapped segment table (``cache/``), writes
   the results folder's ``fit/`` (centroids, PCA, stability, the identity it was fitted on);
2. the shard pass (:mod:`datus.stages.shard_pass`): reads each shard once, on every core; writes masks,
   segment maps (and colour masks and overlays when the colours are already known); returns the
   scoring counts, the diagnostics' sums and the gallery candidates;
3. scoring (:mod:`datus.stages.score`): Hungarian matching on the pooled counts; ``metrics.*``;
4. colour (when it depends on this run's matching): colour masks and overlays from the masks;
5. report, galleries (threads beside the colour pass), ``classes.json``, ``manifest.jsonl``,
   ``summary.json``, the HTML view (``index.html``, ``view/``, :mod:`datus.outputs.html_view`), then
   ``painted.json``, which says what the folder was painted from.

Under DDP each rank works on its own shards; only counts, k-means statistics and the gallery
candidates cross ranks, through :class:`datus.core.collective.Collective`.

A rerun with nothing changed (same fit, settings and results, every file in place) reads no
shard body and opens no image or mask: ``painted.json`` records what was painted and a
fingerprint of each per-image folder (names, sizes, times: listed and stat-ed, not opened).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from datus.core.collective import Collective
from datus.stages.crf import CRFParams
from datus.outputs.describe import PredictionLog, format_summary, run_verdict, write_dataset_files, write_summary
from datus.stages.diagnostics import Counts, diagnostics_panel
from datus.outputs.drawing import colour_table, legend_picture
from datus.core.errors import ConfigurationError
from datus.stages.fit import fit_identity, fit_or_load, has_fit
from datus.outputs.gallery import Candidates, matched_names, write_galleries
from datus.outputs.html_view import write_html_view
from datus.core.io import UnreadableFile, json_text, read_json, write_image, write_json
from datus.outputs.report import make_report
from datus.runfolder.run import (
    CLASSES_FILE,
    COLOUR,
    GALLERY_DIR,
    LEGEND_FILE,
    DATASET_FILE,
    MANIFEST_FILE,
    MASKS,
    METRICS_FILE,
    OVERLAY,
    PAINTED_FILE,
    REPORT_FILE,
    SEGMENTS,
    SKIPPED_FILE,
    SUMMARY_FILE,
    Results,
    Run,
)
from datus.stages.score import Scorer, class_info, read_metrics
from datus.core.settings import ClusterSettings, EvaluationSettings
from datus.stages.shard_pass import ShardPool, ShardWork, colour_shard, paint_shard
from datus.runfolder.shards import check_unique_ids, first_mask_path
from datus.core.workers import available_cores, spawns_by_default

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
    write_files: bool = True,
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
        write_files: False scores and describes without writing per-image files (a quick sweep).
    """
    crf = crf or CRFParams()
    shards = run.shards()
    input_skipped = (prediction or PredictionLog.read(run)).skipped  # datus cluster: the last prediction's
    if collective.is_main:  # written first: a stage that refuses (K too high...) still leaves the list
        write_json(run.file(SKIPPED_FILE), input_skipped)
    if not shards:
        raise ConfigurationError(
            f"no image of the input could be used ({len(input_skipped)} skipped, reasons in {run.file(SKIPPED_FILE)}); "
            "point --data.root at readable images"
        )
    own = shards[collective.rank :: collective.world_size]
    fitted_on = fit_identity(run, cluster)
    with ShardPool(cluster.workers or auto_workers(len(own), collective.world_size)) as pool:
        seconds: dict[str, float] = {}
        if not has_fit(run, fitted_on):
            pool.start()  # the workers import while the fit runs
        started = time.perf_counter()
        fit = fit_or_load(run, results, cluster, collective, fitted_on)
        model = fit.model
        seconds["clustering"] = time.perf_counter() - started
        mask_folders = _mask_folders(run)
        classes = class_info(evaluation, str(Path(mask_folders[1]) / "_") if mask_folders else first_mask_path(shards))
        identity = {
            "fit": fitted_on,
            "evaluation": [evaluation.num_classes, evaluation.ignore_index],
            "classes": [classes.num_classes, classes.names] if classes else None,  # an edited classes.json
            "crf": [cluster.crf, asdict(crf) if cluster.crf else None],
            "gallery": cluster.gallery,
            "write_files": write_files,
        }
        previous = _read_painted(results)
        ground_truth = _fingerprint(Path(mask_folders[1])) if classes is not None and mask_folders else None
        scored_on_it = previous.get("ground_truth") == ground_truth  # edited masks make earlier metrics stale
        earlier = read_metrics(results.file(METRICS_FILE), cluster.num_clusters) if classes is not None and scored_on_it else None
        unchanged = (
            _unchanged(run, results, cluster, previous, identity, earlier, classes is not None, ground_truth)
            if collective.is_main
            else None
        )
        if collective.agree(unchanged is not None):
            return _describe_again(
                run, results, unchanged, earlier, classes.names if classes else None, prediction, input_skipped, seconds
            )

        duplicated = None
        if collective.is_main:  # before any mask is written: one id twice would paint one image over another
            try:
                check_unique_ids(shards)
            except ConfigurationError as error:
                duplicated = error
        if collective.agree(duplicated is not None):
            raise duplicated or ConfigurationError("an image id is recorded twice in the shards; see rank 0's message")
        reuse = previous.get("masks") == identity
        if collective.is_main:  # a pass killed midway must not pass for a finished one
            _warn_when_replacing(run, results, previous, identity)
            write_json(results.file(PAINTED_FILE), {"masks": None, "colour": None})
        collective.barrier()
        earlier = earlier if reuse else None
        scoring = classes is not None and earlier is None
        known_mapping = earlier["protocols"]["dense"]["mapping"] if earlier else None
        colour_now = cluster.colour and write_files and not scoring
        table = colour_table(cluster.num_clusters, classes.num_classes if classes else 0, known_mapping)
        work = ShardWork(
            results=results,
            run_results=run.results,
            model=model,
            write_masks=write_files,
            reuse_masks=reuse,
            classes=classes if scoring else None,
            evaluation=evaluation,
            crf=crf if cluster.crf else None,
            score_unrefined=cluster.crf == "both",
            colour_table=table if colour_now else None,
            reuse_colour=previous.get("colour") == {**identity, "mapping": known_mapping},
            gallery_seed=cluster.seed if cluster.gallery and write_files else None,
            mask_note=hashlib.sha256(json_text(identity, indent=None).encode()).hexdigest()[:16],
            mask_folders=mask_folders,
        )

        started = time.perf_counter()
        counts = Counts(cluster.num_clusters)
        candidates = Candidates(cluster.num_clusters, cluster.seed)
        totals = np.zeros(3, dtype=np.int64)  # images, valid segments, noise segments
        scorer = Scorer(classes, cluster.num_clusters, evaluation, collective.device) if scoring and classes else None
        unrefined = Scorer(classes, cluster.num_clusters, evaluation, collective.device) if scorer and cluster.crf == "both" else None
        progress = _progress(f"masks, K={cluster.num_clusters}" + (" (CRF)" if cluster.crf else ""), len(own), collective)
        for outcome in pool.map(paint_shard, work, own):
            totals += (outcome.images, outcome.valid, outcome.noise)
            counts.merge(outcome.counts)
            if outcome.candidates is not None:
                candidates.merge(outcome.candidates)
            if scorer is not None and outcome.scored is not None:
                scorer.add_counts(outcome.scored)
            if unrefined is not None and outcome.unrefined is not None:
                unrefined.add_counts(outcome.unrefined)
            progress.update(1)
        progress.close()
        num_images, num_valid, num_noise = collective.sum_counts(totals.tolist())
        if scorer is not None and not collective.sum_counts([int(scorer.metric.confusion.sum())])[0]:
            scorer = unrefined = None  # classes.json but no mask of any image: nothing was scored
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
        table = colour_table(cluster.num_clusters, classes.num_classes if classes else 0, mapping)
        gathered = collective.gather_to_main((counts, candidates))
        skipped = input_skipped + (scorer.skipped if scorer else [])
        summary: dict[str, Any] = {}
        drawings: dict[str, Future[float]] = {}
        with ThreadPoolExecutor(2) as beside_colour:  # their decoding and encoding leave the GIL to the colour pass
            if gathered is not None:
                counts, candidates = _merged(gathered, cluster)
                if write_files:
                    write_dataset_files(run, results, cluster.num_clusters, mapping, class_names)
                diagnostics = counts.diagnostics(fit.stability)
                measured = diagnostics.summary()
                judged = run_verdict(run, measured, num_images)
                panel = diagnostics_panel(diagnostics, table, cluster.gallery and write_files, judged)
                if write_files:
                    drawings["report"] = beside_colour.submit(_timed, make_report, run, results, diagnostics=panel)
                if cluster.gallery and write_files:
                    names = matched_names(cluster.num_clusters, mapping, class_names)
                    drawings["gallery"] = beside_colour.submit(
                        _timed, write_galleries, candidates.members(), results, diagnostics.clusters, names, cluster.seed
                    )
            if cluster.colour and write_files:
                started = time.perf_counter()
                if not colour_now:
                    colours = replace(work, colour_table=table, reuse_colour=previous.get("colour") == {**identity, "mapping": mapping})
                    progress = _progress("colour masks and overlays", len(own), collective)
                    for _ in pool.map(colour_shard, colours, own):
                        progress.update(1)
                    progress.close()
                if collective.is_main:
                    write_image(results.file(LEGEND_FILE), _legend(results, table, cluster.num_clusters, mapping, class_names))
                seconds["colour"] = time.perf_counter() - started
            collective.barrier()
            if collective.is_main:
                seconds |= {stage: drawing.result() for stage, drawing in drawings.items()}
                facts = _facts(prediction, num_images, num_valid, num_noise, cluster.num_clusters, metrics)
                facts["diagnostics"], facts["verdict"] = measured, judged
                facts["stage_seconds"] = {**(prediction.stage_seconds if prediction else {}), **seconds}
                summary = write_summary(run, results, facts, skipped)
                if write_files:
                    write_html_view(results, summary)
                painted = {
                    "masks": identity,
                    "colour": {**identity, "mapping": mapping} if cluster.colour and write_files else None,
                    "files": _fingerprints(run, results, cluster) if write_files else None,
                    "ground_truth": ground_truth,
                }
                write_json(results.file(PAINTED_FILE), painted)
        return Outcome(summary, metrics, class_names, seconds)


SHARDS_PER_WORKER = 8
"""Fewest shards per worker process when their number is chosen: a worker costs about two seconds
to start (it imports torch), which a few shards of painting (~0.7 s each) would not repay."""


def auto_workers(shards: int, world_size: int) -> int:
    """Worker processes for ``shards`` shards: one per core (shared between ranks), fewer for short runs.

    In-process (the Python API) none unless asked for (``ClusterSettings(workers=N)``): spawned
    workers import the caller's main script again, which only the ``datus`` command's is safe for.
    """
    if not spawns_by_default():
        return 1
    return max(1, min(available_cores() // world_size, shards // SHARDS_PER_WORKER))


def _merged(gathered: list[tuple[Counts, Candidates]], cluster: ClusterSettings) -> tuple[Counts, Candidates]:
    """Every rank's diagnostics sums and gallery candidates, merged in rank order (rank 0 only)."""
    counts, candidates = Counts(cluster.num_clusters), Candidates(cluster.num_clusters, cluster.seed)
    for rank_counts, rank_candidates in gathered:
        counts.merge(rank_counts)
        candidates.merge(rank_candidates)
    return counts, candidates


def _facts(
    prediction: PredictionLog | None, images: int, valid: int, noise: int, num_clusters: int, metrics: dict[str, Any] | None
) -> dict[str, Any]:
    """The summary's counts: what this invocation predicted, and what the results hold."""
    facts: dict[str, Any] = {"images_in_run": images}
    if prediction is not None:
        facts |= {
            "images_predicted_now": prediction.images_written,
            "images_from_earlier_runs": prediction.images_resumed,
            "backbone_passes": prediction.backbone_passes,
        }
    facts |= {"segments": valid, "noise_segments": noise, "num_clusters": num_clusters}
    if metrics:
        facts["miou"] = {name: protocol["miou"] for name, protocol in metrics["protocols"].items()}
    return facts


def _fingerprints(run: Run, results: Results, cluster: ClusterSettings) -> dict[str, list[Any]]:
    """Per per-image folder: how many files, and a digest of their names, sizes and modification times.

    Listing and one ``stat`` per file, no file opened: a deleted, added, rewritten or replaced
    file changes it (one copied in with its old time and the same size does not; the pass that
    a change starts checks each mask's own note, :func:`datus.stages.paint.is_mask_of`).
    """
    folders = {MASKS: results.root / MASKS, SEGMENTS: run.results.root / SEGMENTS}
    if cluster.colour:
        folders |= {COLOUR: results.root / COLOUR, OVERLAY: results.root / OVERLAY}
    return {name: _fingerprint(folder) for name, folder in folders.items()}


def _mask_folders(run: Run) -> tuple[str, str] | None:
    """(images, masks) folders that ``run.json`` records, when both are there: scoring pairs ground
    truth through them, and metrics are reused only while the mask folder's fingerprint holds."""
    data = (run.recorded_identity() or {}).get("data")
    images, masks = (data.get("images"), data.get("masks")) if isinstance(data, dict) else (None, None)
    if isinstance(images, str) and isinstance(masks, str) and Path(masks).is_dir():
        return images, masks
    return None


def _fingerprint(folder: Path) -> list[Any]:
    count, hasher = 0, hashlib.sha256()
    skip = len(str(folder)) + 1  # names relative to the folder: a moved run folder keeps its fingerprints
    for here, subfolders, _ in os.walk(folder):
        subfolders.sort()
        with os.scandir(here) as entries:
            lines = []
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    status = entry.stat(follow_symlinks=False)
                    lines.append(f"{entry.path[skip:]}\0{status.st_size}\0{status.st_mtime_ns}\n")
        lines.sort()
        count += len(lines)
        hasher.update("".join(lines).encode("utf-8", "surrogateescape"))
    return [count, hasher.hexdigest()[:16]]


def _unchanged(
    run: Run,
    results: Results,
    cluster: ClusterSettings,
    previous: dict[str, Any],
    identity: dict[str, Any],
    metrics: dict[str, Any] | None,
    scored: bool,
    ground_truth: list[Any] | None,
) -> dict[str, Any] | None:
    """The earlier ``summary.json`` when nothing needs doing again, else None.

    Nothing needs doing when ``painted.json`` says the folder was painted from this very fit,
    settings and matching, the dataset-level files are present and sound, and every per-image
    folder holds the very files it held when it was painted (:func:`_fingerprints`; a deleted or
    replaced file makes the pass run again, which then checks every file it keeps).
    """
    if scored and metrics is None:
        return None
    if not identity["write_files"]:
        return None
    mapping = metrics["protocols"]["dense"]["mapping"] if metrics else None
    expected = {
        "masks": identity,
        "colour": {**identity, "mapping": mapping} if cluster.colour else None,
        "files": previous.get("files"),
        "ground_truth": ground_truth,
    }
    if previous != expected or not isinstance(previous.get("files"), dict):
        return None
    needed = [CLASSES_FILE, DATASET_FILE, MANIFEST_FILE, REPORT_FILE] + ([LEGEND_FILE] if cluster.colour else [])
    if not all(results.file(name).is_file() for name in needed):
        return None
    if cluster.gallery and not (results.root / GALLERY_DIR).is_dir():
        return None
    if _fingerprints(run, results, cluster) != previous["files"]:
        return None
    try:
        summary = read_json(results.file(SUMMARY_FILE))
    except UnreadableFile:
        return None
    keys = ("images_in_run", "segments", "noise_segments", "num_clusters", "diagnostics")
    if not isinstance(summary, dict) or not all(key in summary for key in keys) or summary["num_clusters"] != cluster.num_clusters:
        return None
    return summary


def _describe_again(
    run: Run,
    results: Results,
    earlier: dict[str, Any] | None,
    metrics: dict[str, Any] | None,
    class_names: list[str] | None,
    prediction: PredictionLog | None,
    input_skipped: list[dict[str, str]],
    seconds: dict[str, float],
) -> Outcome:
    """A rerun with nothing to do: the earlier results, with this invocation's facts (rank 0 writes them)."""
    if earlier is None:  # a rank other than 0
        return Outcome({}, metrics, class_names, seconds)
    facts = _facts(prediction, earlier["images_in_run"], earlier["segments"], earlier["noise_segments"], earlier["num_clusters"], metrics)
    facts["diagnostics"] = earlier["diagnostics"]
    facts["verdict"] = run_verdict(run, earlier["diagnostics"], earlier["images_in_run"])
    facts["stage_seconds"] = {**(prediction.stage_seconds if prediction else {}), **seconds}
    scoring_skips = [  # masks that scoring left out stay left out: scoring is not redone
        {"path": entry["path"], "reason": entry["reason"]}
        for entry in earlier.get("skipped", [])
        if isinstance(entry, dict) and isinstance(entry.get("path"), str) and str(entry.get("reason")).startswith("not scored")
    ]
    summary = write_summary(run, results, facts, input_skipped + scoring_skips)
    write_html_view(results, summary, images_changed=False)  # pages only when missing: no manifest read
    return Outcome(summary, metrics, class_names, seconds)


def _warn_when_replacing(run: Run, results: Results, previous: dict[str, Any], identity: dict[str, Any]) -> None:
    """Say so when the masks of another clustering (K, seed, engine...) are about to be repainted, and how to get them back."""
    earlier = previous.get("masks")
    if not isinstance(earlier, dict) or not isinstance(earlier.get("fit"), dict):
        return
    before, now = earlier["fit"].get("settings"), identity["fit"]["settings"]
    if not isinstance(before, dict) or before == now:
        return
    changed = ", ".join(f"{key} {before.get(key)!r} -> {now.get(key)!r}" for key in now if before.get(key) != now.get(key))
    log.warning(
        "repainting the masks, report and metrics in %s with other cluster settings (%s); to keep both, "
        "`datus cluster --run %s` with the earlier settings paints them into clusters/k<K>/",
        results.root, changed, run.root,
    )


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


def _progress(description: str, shards: int, collective: Collective) -> tqdm:
    """A progress bar in shards, with a total and an ETA, on rank 0, shown only on a terminal."""
    return tqdm(desc=description, total=shards, unit="shard", disable=None if collective.is_main else True, leave=False)


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
