"""Streams prediction records to per-rank shards as batches finish (memory stays flat).

Also owns the run's identity: ``run.json`` records the settings that decide the records, and a
rerun into the same folder resumes (skipping finished images) only if they match.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter

from datus import __version__
from datus.errors import ConfigurationError
from datus.io import remove_stale_temporaries, write_json, write_png
from datus.module import DatusModule, ImageRecord, PredictionBatch
from datus.painting import label_dtype
from datus.shards import list_shards, next_sequence, read_image_ids, shard_path, write_shard

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
SEGMENTS_DIR = "segments"
LOG_DIR = "logs"


def visible_segment_map(record: ImageRecord) -> np.ndarray:
    """The user-facing segment map: 0 = noise, valid segments numbered 1..V in raster order."""
    valid_ids = np.where(record.is_noise, 0, np.cumsum(~record.is_noise))
    return valid_ids[record.segment_map]


def check_run_identity(output_dir: Path, identity: dict[str, Any]) -> None:
    """Refuse to mix records from different settings in one folder."""
    path = output_dir / RUN_FILE
    if not path.is_file():
        return
    recorded = json.loads(path.read_text())["settings"]
    differences = {key: (recorded.get(key), value) for key, value in identity.items() if recorded.get(key) != value}
    if differences:
        listed = "; ".join(f"{key}: was {old!r}, now {new!r}" for key, (old, new) in differences.items())
        raise ConfigurationError(
            f"--output_dir {output_dir} holds a run made with other settings ({listed}). Resuming would mix "
            "them. Use a new --output_dir, or delete the old one to start over."
        )


class SegmentShardWriter(BasePredictionWriter):
    """Writes ``segments/<id>.png`` and one shard per batch per rank under ``output_dir``.

    Args:
        output_dir: the run folder (linked from the top-level ``--output_dir``).
    """

    def __init__(self, output_dir: Path | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.skipped: list[dict[str, str]] = []
        self.stage_seconds: dict[str, float] = defaultdict(float)
        self.images_written = 0
        self.images_resumed = 0
        self.backbone_passes = 0
        self._sequence = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.output_dir is None:
            raise ValueError("--output_dir is required: the folder where datus writes its results.")
        if not isinstance(pl_module, DatusModule):
            raise TypeError("SegmentShardWriter works with datus.module.DatusModule")
        identity = pl_module.describe()
        check_run_identity(self.output_dir, identity)
        finished = set(read_image_ids(list_shards(self.output_dir)))
        self.images_resumed = len(finished)
        datamodule = trainer.datamodule
        if finished and datamodule is not None and hasattr(datamodule, "exclude_image_ids"):
            datamodule.exclude_image_ids(finished)
            log.info("resuming: %d images already done in %s", len(finished), self.output_dir)
        if trainer.is_global_zero:
            if self.output_dir.is_dir() and (removed := remove_stale_temporaries(self.output_dir)):
                log.info("removed %d half-written files left by an interrupted run", removed)
            write_json(self.output_dir / RUN_FILE, {"datus_version": __version__, "settings": identity})
            for stale in (self.output_dir / LOG_DIR).glob("predict-rank*.json"):
                stale.unlink()  # logs describe this invocation only; earlier work is counted as resumed
        trainer.strategy.barrier("datus-writer-setup")
        self._sequence = next_sequence(self.output_dir, trainer.global_rank)
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
        assert self.output_dir is not None
        self.skipped.extend(prediction.skipped)
        for skip in prediction.skipped:
            log.warning("skipped %s: %s", skip["path"], skip["reason"])
        for stage, seconds in prediction.stage_seconds.items():
            self.stage_seconds[stage] += seconds
        self.backbone_passes += prediction.backbone_passes
        if not prediction.records:
            return
        for record in prediction.records:
            visible = visible_segment_map(record)
            write_png(
                self.output_dir / SEGMENTS_DIR / f"{record.image_id}.png",
                visible.astype(label_dtype(int(visible.max()) + 1)),
            )
        write_shard(shard_path(self.output_dir, trainer.global_rank, self._sequence), prediction.records)
        self._sequence += 1
        self.images_written += len(prediction.records)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(pl_module, DatusModule)
        last = pl_module.finish_pending()  # the module runs one batch behind (Louvain overlap)
        if last is not None:
            self._write(trainer, last)
        self._write_log(trainer.global_rank)

    def _write_log(self, rank: int) -> None:
        assert self.output_dir is not None
        write_json(
            self.output_dir / LOG_DIR / f"predict-rank{rank:03d}.json",
            {
                "images_written": self.images_written,
                "images_resumed": self.images_resumed,
                "backbone_passes": self.backbone_passes,
                "skipped": self.skipped,
                "stage_seconds": dict(self.stage_seconds),
            },
        )
