"""Dataset-level stages after the prediction loop: clustering, painting, evaluation."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from datus.postprocess import ClusterSettings, EvaluationSettings, format_summary, postprocess_run, summarise_run

log = logging.getLogger(__name__)


class ClusterPaintEvaluate(Callback):
    """Runs stages 6-8 once every rank has written its shards.

    Args:
        output_dir: the run folder (linked from the top-level ``--output_dir``).
        num_clusters: K, the number of pseudo classes.
        engine: ``sklearn`` (rank 0 fits on everything) or ``torch`` (on the device; under DDP
            each rank keeps its own embeddings and only sums and counts are reduced).
        init: ``k-means++`` (better and more stable per the paper's own ablation) or ``random``
            (the paper's setting).
        pca_components: reduce embeddings to this many dimensions first (None: no PCA).
        minibatch: MiniBatchKMeans, as the paper (sklearn engine).
        seed: clustering seed.
        num_classes: ground-truth classes for scoring; None reads the dataset's
            ``classes.json`` (written by ``datus prepare``), and without one scoring is skipped.
        ignore_index: ground-truth value that is never scored.
        write_colour: write colour masks and overlays too.
    """

    def __init__(
        self,
        output_dir: Path | None = None,
        num_clusters: int = 6,
        engine: Literal["sklearn", "torch"] = "sklearn",
        init: Literal["k-means++", "random"] = "k-means++",
        pca_components: int | None = None,
        minibatch: bool = False,
        seed: int = 0,
        num_classes: int | None = None,
        ignore_index: int = 255,
        write_colour: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.settings = ClusterSettings(num_clusters, engine, init, pca_components, minibatch, seed)
        self.settings.validate()
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"--cluster.num_classes must be >= 1 or null, got {num_classes}")
        self.evaluation = EvaluationSettings(num_classes=num_classes, ignore_index=ignore_index)
        self.write_colour = write_colour
        self.summary: dict | None = None
        self.metrics: dict | None = None
        self.finished = False

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.barrier("datus-shards-written")
        self.run(pl_module.device, is_global_zero=trainer.is_global_zero)
        trainer.strategy.barrier("datus-postprocessed")

    def run(self, device: torch.device, is_global_zero: bool = True) -> None:
        """Cluster, paint and evaluate the shards under ``output_dir`` (all ranks call this)."""
        assert self.output_dir is not None
        result = postprocess_run(self.output_dir, self.settings, self.evaluation, device=device, write_colour=self.write_colour)
        self.metrics = result.metrics
        self.finished = True
        if is_global_zero:
            self.summary = summarise_run(self.output_dir, result, self.settings)
            print(format_summary(self.summary, result.metrics))
