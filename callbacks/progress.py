"""A prediction progress bar in images, counting an image when its record is finished."""

from __future__ import annotations

import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from tqdm.auto import tqdm

from datus.runfolder.records import PredictionBatch


class ImagesProgressBar(ProgressBar):
    """Images whose segments and embeddings are done (tqdm shows images/s), and skipped files.

    The module finishes each batch one step late (Louvain overlaps the device), so the bar
    counts the records it returns and reaches 100% only after the last batch is flushed at the
    end of the epoch; place it after the writer in the callback list.
    """

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._bar: tqdm | None = None
        self._skipped = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loaders = trainer.predict_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        total = sum(len(loader.dataset) for loader in loaders if hasattr(loader, "dataset"))
        self._skipped = 0
        if self._enabled and trainer.is_global_zero and total > 0:  # nothing left to predict: no empty bar
            self._bar = tqdm(total=total, desc="predict", unit="image", file=sys.stderr, dynamic_ncols=True)

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if isinstance(outputs, PredictionBatch):
            self._advance(len(outputs.records) + len(outputs.skipped), len(outputs.skipped))

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bar is not None:
            self._advance(self._bar.total - self._bar.n, 0)
            self._bar.close()
            self._bar = None

    def _advance(self, images: int, skipped: int) -> None:
        if self._bar is None:
            return
        self._skipped += skipped
        self._bar.update(images)
        if self._skipped:
            self._bar.set_postfix({"skipped": self._skipped}, refresh=False)
