"""Stages 7-8 shard by shard, on every core: one read of each shard does all per-image work.

For each shard a worker process labels the segments, writes the masks (and the run's segment
maps when missing), refines them with the CRF when asked, counts the scoring confusion matrix,
the diagnostics' sums and the gallery candidates, and, when the colours are already known,
writes the colour masks and overlays. It returns only small things (:class:`ShardOutcome`),
which the main process merges in shard order, so every number and every file is the same with
one worker or many (and the same as painting in this process, ``workers = 1``).

Memory per worker is one shard's records and one image's pictures; shards are handed out a
bounded number ahead, so the main process never holds more than a few outcomes. The shared
work (:class:`ShardWork`, with the K x D centroids) travels with each shard: tens of kB against
a shard's seconds of painting.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datus.stages.clustering import ClusterModel
from datus.stages.crf import CRFJob, CRFParams, refine_job
from datus.stages.diagnostics import Counts
from datus.outputs.gallery import Candidates
from datus.core.io import paired_mask, write_png
from datus.stages.labels import segment_labels, segment_probabilities_of
from datus.runfolder.records import ImageRecord
from datus.stages.paint import is_mask_of, mask_of, noise_of, segment_picture_map, write_colour_files
from datus.runfolder.run import COLOUR, MASKS, OVERLAY, SEGMENTS, Results
from datus.stages.score import ClassInfo, PixelCounter
from datus.core.settings import EvaluationSettings
from datus.runfolder.shards import read_image_paths, read_records
from datus.core.workers import exit_with_parent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardWork:
    """What the work on every shard shares; sent to each worker once.

    Attributes:
        results: where masks, colours and overlays go.
        run_results: the run folder's own results: ``segments/`` lives there (it does not depend on K).
        model: the fitted clusters.
        write_masks: write mask files (False for a sweep that only scores).
        reuse_masks: masks painted from the same fit and settings may be kept (checked one by one).
        classes: the ground truth's classes when scoring now, else None.
        evaluation: scoring settings.
        crf: refine masks with these CRF settings, or None.
        score_unrefined: also count the masks before refinement (``--cluster.crf both``).
        colour_table: K x 3 colours when colour files are written in this pass, else None.
        reuse_colour: colour files painted with the same colours may be kept when present.
        gallery_seed: collect gallery candidates with this seed, or None.
        mask_note: what the masks are painted from (a digest), written into each mask and required
            of a mask that is kept.
        mask_folders: (images, masks) folders of the run (run.json): ground truth is paired when
            scoring, so a mask added after prediction counts; None pairs as recorded at prediction.
    """

    results: Results
    run_results: Results
    model: ClusterModel
    write_masks: bool
    reuse_masks: bool
    classes: ClassInfo | None
    evaluation: EvaluationSettings
    crf: CRFParams | None
    score_unrefined: bool
    colour_table: np.ndarray | None
    reuse_colour: bool
    gallery_seed: int | None
    mask_note: str
    mask_folders: tuple[str, str] | None = None


@dataclass
class ShardOutcome:
    """What one shard's work found: counts to merge, never pictures."""

    images: int
    valid: int
    noise: int
    counts: Counts
    scored: PixelCounter | None = None
    unrefined: PixelCounter | None = None
    candidates: Candidates | None = None


def paint_shard(work: ShardWork, shard: Path) -> ShardOutcome:
    """All per-image work of stages 7-8 for one shard (see the module docstring)."""
    records = read_records(shard)
    labels = segment_labels(work.model, records)
    num_clusters = work.model.num_clusters
    counts = Counts(num_clusters)
    counts.add(records, labels)
    outcome = ShardOutcome(len(records), sum(r.num_valid for r in records), sum(len(r.sizes) - r.num_valid for r in records), counts)
    if work.gallery_seed is not None:
        outcome.candidates = Candidates(num_clusters, work.gallery_seed)
        outcome.candidates.add(records, work.model)
    scorer = PixelCounter(work.classes, num_clusters, work.evaluation) if work.classes is not None else None
    unrefined_scorer = PixelCounter(work.classes, num_clusters, work.evaluation) if work.classes and work.score_unrefined else None
    for record, record_labels in zip(records, labels):
        mask_path = work.results.image_file(MASKS, record.image_id)
        write = work.write_masks and not (work.reuse_masks and is_mask_of(mask_path, record, work.mask_note))
        if write or scorer is not None:
            unrefined = mask = mask_of(record, record_labels, num_clusters)
            if work.crf is not None:
                probabilities = segment_probabilities_of(work.model, record, work.crf.temperature)
                refined = refine_job(CRFJob(record.image_path, probabilities, record.segment_map), work.crf)
                if refined is None:
                    log.warning("no CRF for %s: the image cannot be read any more; its mask is unrefined", record.image_path)
                mask = unrefined if refined is None else refined.astype(unrefined.dtype, copy=False)
            if write:
                write_png(mask_path, mask, note=work.mask_note)
            if scorer is not None:
                target = scorer.ground_truth(record, ground_truth_of(record, work.mask_folders))
                if target is not None:
                    noise = noise_of(record)
                    scorer.add(mask, target, noise)
                    if unrefined_scorer is not None:
                        unrefined_scorer.add(unrefined, target, noise)
        segments_path = work.run_results.image_file(SEGMENTS, record.image_id)
        if work.write_masks and not is_mask_of(segments_path, record):
            write_png(segments_path, segment_picture_map(record))
        if work.colour_table is not None:
            _colour(work, record.image_id, record.image_path, fresh=write)
    outcome.scored, outcome.unrefined = scorer, unrefined_scorer
    return outcome


def ground_truth_of(record: ImageRecord, mask_folders: tuple[str, str] | None) -> Path | None:
    """The record's ground-truth file: paired now from the run's folders, or as recorded at prediction."""
    if mask_folders is not None:
        return paired_mask(Path(record.image_path), Path(mask_folders[0]), Path(mask_folders[1]))
    return Path(record.mask_path) if record.mask_path else None


def colour_shard(work: ShardWork, shard: Path) -> int:
    """Colour masks and overlays of one shard's masks as written (a pass of its own when the
    colours depend on this run's matching); reads only the shard's ids and paths. Returns images."""
    pairs = read_image_paths([shard])
    for image_id, image_path in pairs:
        _colour(work, image_id, image_path, fresh=False)
    return len(pairs)


def _colour(work: ShardWork, image_id: str, image_path: str, fresh: bool) -> None:
    """Colour files of one image, unless the same colours were painted on the same mask before."""
    assert work.colour_table is not None
    present = all(work.results.image_file(kind, image_id).is_file() for kind in (COLOUR, OVERLAY))
    if fresh or not (work.reuse_colour and present):
        write_colour_files(work.results, image_id, image_path, work.colour_table)


def _start_worker(parent: int) -> None:
    """Pool initialiser: end with the parent (a parent killed outright cannot stop its pool), one thread."""
    exit_with_parent(parent)
    torch.set_num_threads(1)  # one worker per core: threads inside a worker would fight the others


class ShardPool:
    """Worker processes for the per-shard passes, started before they are needed and used for all of them.

    Starting is cheap for the caller (spawned workers import torch in the background, about two
    seconds, while the caller fits), and one pool serves the painting and the colour pass.
    ``workers <= 1`` runs everything in this process, with no pool. Workers start at :meth:`start`
    or at the first :meth:`map`, whichever comes first.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None

    def start(self) -> None:
        """Start the workers now (they import in the background); no-op when started or in-process."""
        if self.workers > 1 and self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(os.getpid(),),
            )
            for _ in range(self.workers):
                self._executor.submit(int)  # start every worker now, not at the first shard

    def map(self, function: Callable[[ShardWork, Path], Any], work: ShardWork, shards: Sequence[Path]) -> Iterator[Any]:
        """``function(work, shard)`` for every shard, results in shard order.

        At most ``2 * workers`` shards are in flight, so memory stays flat however many shards
        there are. An error in a worker is raised here, in order; closing the iterator early (an
        error, Ctrl-C) cancels what has not started.
        """
        self.start()
        if self._executor is None:
            for shard in shards:
                yield function(work, shard)
            return
        pending: deque[Future[Any]] = deque()
        try:
            for shard in shards:
                if len(pending) >= 2 * self.workers:
                    yield pending.popleft().result()
                pending.append(self._executor.submit(function, work, shard))
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> ShardPool:
        return self

    def __exit__(self, *exception: object) -> None:
        self.close()
