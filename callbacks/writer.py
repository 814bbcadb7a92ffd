"""Streams prediction records to per-rank shards as batches finish (memory stays flat).

The writer also starts the run in its folder (through :class:`datus.runfolder.run.Run`): it takes the
folder's lock, refuses a folder of other settings or data, and tells the data module which
images earlier runs already finished, so a rerun resumes where the last one stopped.
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from datus.core.errors import ConfigurationError
from datus.core.io import write_json
from datus.runfolder.records import PredictionBatch
from datus.runfolder.run import Run
from datus.runfolder.shards import drop_stale_records, finished_images, write_shard

log = logging.getLogger(__name__)


@runtime_checkable
class FinishesPendingBatch(Protocol):
    """A module that returns each batch's records one step late and can flush the last one."""

    def describe(self) -> dict[str, Any]: ...

    def finish_pending(self) -> PredictionBatch | None: ...


@runtime_checkable
class ResumableData(Protocol):
    """A data module that can say what it reads and leave out images already done."""

    def describe(self) -> dict[str, Any]: ...

    def exclude_recorded(self, recorded: Mapping[str, str]) -> None: ...


class SegmentShardWriter(BasePredictionWriter):
    """Writes one shard per batch per rank under ``output_dir/shards``.

    Args:
        output_dir: the run folder (linked from the top-level ``--output_dir``).
    """

    def __init__(self, output_dir: Path) -> None:
        super().__init__(write_interval="batch")
        self.run = Run(output_dir)
        self.skipped: list[dict[str, str]] = []
        self.stage_seconds: dict[str, float] = defaultdict(float)
        self.images_written = 0
        self.images_resumed = 0
        self.backbone_passes = 0
        self._sequence = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, FinishesPendingBatch):
            raise TypeError("SegmentShardWriter needs a module with describe() and finish_pending(), e.g. DatusModule")
        data = trainer.datamodule
        resumable = isinstance(data, ResumableData)
        if trainer.is_global_zero:
            self.run.acquire()
            self.run.check_writable()
            if removed := self.run.remove_temporaries():
                log.info("removed %d half-written files left by an interrupted run", removed)
            inputs = getattr(data, "inputs", None) if resumable else None
            self.run.claim(
                {"model": pl_module.describe(), "data": data.describe() if resumable else None},
                inputs() if callable(inputs) else None,
            )
            for stale in self.run.log_files():
                stale.unlink()  # logs describe this invocation only; earlier work is counted as resumed
            changed, vanished = drop_stale_records(self.run.shards())
            if changed:
                log.info("predicting again %d image(s) changed since they were predicted, e.g. %s", len(changed), changed[0])
            for image_id, path in vanished:
                self.run.remove_image_outputs(image_id)
                self.skipped.append({"path": path, "reason": "vanished since it was predicted: left out of the run"})
        trainer.strategy.barrier("datus-writer-setup")
        finished = finished_images(self.run.shards())
        self.images_resumed = len(finished)
        if finished:
            if not resumable:
                raise ConfigurationError(
                    f"--output_dir {self.run.root} holds {len(finished)} finished images, but this data module cannot "
                    "leave them out; use a new output folder"
                )
            data.exclude_recorded(finished)
            pending = len(getattr(data, "pending_entries", ()))
            log.info("resuming %s: %d images done earlier, %d to predict", self.run.root, len(finished), pending)
            if pending == 0:  # an expected state here, not the user mistake Lightning warns about
                warnings.filterwarnings("ignore", message="Total length of .* across ranks is zero")
        self._sequence = self.run.next_sequence(trainer.global_rank)
        self._write_log(trainer.global_rank)

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: PredictionBatch,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        self._write(trainer, prediction)

    def _write(self, trainer: L.Trainer, prediction: PredictionBatch) -> None:
        self.skipped.extend(prediction.skipped)
        for skip in prediction.skipped:
            log.warning("skipped %s: %s", skip["path"], skip["reason"])
        for stage, seconds in prediction.stage_seconds.items():
            self.stage_seconds[stage] += seconds
        self.backbone_passes += prediction.backbone_passes
        if not prediction.records:
            return
        write_shard(self.run.shard_path(trainer.global_rank, self._sequence), prediction.records)
        self._sequence += 1
        self.images_written += len(prediction.records)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(pl_module, FinishesPendingBatch)
        last = pl_module.finish_pending()  # the module runs one batch behind (Louvain overlap)
        if last is not None:
            self._write(trainer, last)
        self._write_log(trainer.global_rank)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.run.release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.run.release()

    def _write_log(self, rank: int) -> None:
        write_json(
            self.run.log_file(rank),
            {
                "images_written": self.images_written,
                "images_resumed": self.images_resumed,
                "backbone_passes": self.backbone_passes,
                "skipped": self.skipped,
                "stage_seconds": dict(self.stage_seconds),
            },
        )
