"""A prediction progress bar that shows images per second (Lightning's shows batches per second)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class ImagesPerSecondBar(TQDMProgressBar):
    """Lightning's progress bar plus ``images/s`` and ``skipped`` counts in its postfix."""

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._images = 0
        self._skipped = 0
        self._started = time.perf_counter()

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_predict_start(trainer, pl_module)
        self._images, self._skipped, self._started = 0, 0, time.perf_counter()

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._images += len(batch.get("image_id", ()))
        self._skipped += len(batch.get("skipped", ()))
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if self.predict_progress_bar is not None:
            elapsed = max(time.perf_counter() - self._started, 1e-9)
            self.predict_progress_bar.set_postfix(
                {"images/s": f"{self._images / elapsed:.2f}", "skipped": self._skipped}, refresh=False
            )
