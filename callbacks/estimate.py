"""Say what the prediction loop will cost, once it has measured this machine, before it costs it."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from datus.runfolder.records import PredictionBatch

log = logging.getLogger(__name__)

MEASURED_BATCHES = 2
"""Batches timed before the estimate: the first one pays for warm-up (and the module runs one batch behind)."""
WORTH_SAYING_SECONDS = 60.0
"""Shorter remaining work is not announced: the progress bar says enough."""


class CostEstimate(Callback):
    """One log line on rank 0: seconds per image here, and how long the images left will take.

    Measured between the end of the first and of the :data:`MEASURED_BATCHES`-th batch, from
    this rank's own share (under DDP every rank has about the same), so warm-up is not counted.
    """

    def __init__(self, clock: Any = time.perf_counter) -> None:
        self._clock = clock
        self._total = 0
        self._done = 0
        self._batches = 0
        self._started: tuple[float, int] | None = None
        self.said: str | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loaders = trainer.predict_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        self._total = sum(len(loader.sampler) if hasattr(loader, "sampler") and hasattr(loader.sampler, "__len__")
                          else len(loader.dataset) for loader in loaders if hasattr(loader, "dataset"))  # fmt: skip
        self._done, self._batches, self._started, self.said = 0, 0, None, None

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        if not isinstance(outputs, PredictionBatch) or self.said is not None:
            return
        self._done += len(outputs.records) + len(outputs.skipped)
        self._batches += 1
        if self._batches == 1:
            self._started = (self._clock(), self._done)
        elif self._batches >= MEASURED_BATCHES and self._started is not None:
            self.said = estimate_line(self._clock() - self._started[0], self._done - self._started[1],
                                      self._total - self._done, pl_module)  # fmt: skip
            if self.said and trainer.is_global_zero:
                log.info(self.said)


def estimate_line(seconds: float, images: int, remaining: int, pl_module: Any) -> str:
    """The estimate in words, with the cheaper options when they would help; "" when not worth saying."""
    if images <= 0 or remaining <= 0:
        return ""
    per_image = seconds / images
    left = per_image * remaining
    if left < WORTH_SAYING_SECONDS:
        return ""
    text = f"about {per_image:.2f} s an image here: the {remaining} images left take about {duration_text(left)}"
    if getattr(pl_module, "embedding", None) == "crop":
        text += " (--model.embedding packed is about twice as fast on a CPU; more --trainer.devices share it)"
    return text


def duration_text(seconds: float) -> str:
    """A wait in the unit a person reads it in: seconds, minutes or hours."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
