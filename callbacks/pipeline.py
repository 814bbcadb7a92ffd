"""Dataset-level stages after the prediction loop: clustering, painting, evaluation, description."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from datus.core.collective import Collective
from datus.stages.crf import CRFParams
from datus.outputs.describe import PredictionLog
from datus.stages.postprocess import Outcome, postprocess
from datus.runfolder.run import Run
from datus.core.settings import ClusterSettings, EvaluationSettings

log = logging.getLogger(__name__)


class ClusterPaintEvaluate(Callback):
    """Runs stages 6-8 on every rank once all shards are written (also when nothing was left to predict).

    It works in ``teardown``, which Lightning calls after a successful predict whether or not
    the loop ran (a finished run rerun with other cluster settings has nothing to predict), and
    on every rank, so ranks that had no batch still join the collectives.

    Args:
        output_dir: the run folder (linked from the top-level ``--output_dir``).
        cluster: clustering and painting settings.
        evaluation: scoring settings.
        crf: dense-CRF settings, used when ``cluster.crf`` asks for refinement.
    """

    def __init__(
        self,
        output_dir: Path,
        cluster: ClusterSettings | None = None,
        evaluation: EvaluationSettings | None = None,
        crf: CRFParams | None = None,
    ) -> None:
        self.run = Run(output_dir)
        self.cluster = cluster or ClusterSettings()
        self.evaluation = evaluation or EvaluationSettings()
        self.crf = crf or CRFParams()
        self.outcome: Outcome | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            self.run.acquire()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        try:
            collective = Collective.current(trainer.strategy.root_device)
            collective.barrier()
            self.outcome = postprocess(
                self.run, self.run.results, self.cluster, self.evaluation, collective, PredictionLog.read(self.run), self.crf
            )
            if trainer.is_global_zero:
                print(self.outcome.console_text(), flush=True)
        finally:
            self.run.release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.run.release()
