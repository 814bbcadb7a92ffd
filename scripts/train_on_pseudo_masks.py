"""Example: train a small segmentation network on the pseudo masks of a ``datus predict`` run.

The point is the recipe, not the network: the run folder is the dataset
(``PseudoMaskDataModule``), the loss is cross-entropy over the K pseudo classes, and
validation reports mIoU against the held-out pseudo masks. Swap ``TinySegmenter.net`` for a
real backbone and decoder to train a model worth deploying.

    python scripts/train_on_pseudo_masks.py --run runs/suim --steps 2000 --image_size 224
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torchmetrics.classification import MulticlassJaccardIndex

from datus.callbacks.estimate import duration_text
from datus.datamodules.pseudo import PseudoMaskDataModule
from datus.discovery.module import quiet_lightning

TIMED_STEPS = 5
"""Steps measured (after the first, which pays for warm-up) before the training time is announced."""


class StepEstimate(L.Callback):
    """Print once how long the remaining steps will take, measured on this machine."""

    def __init__(self) -> None:
        self._started: tuple[float, int] | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object, batch_idx: int) -> None:
        step = trainer.global_step
        if self._started is None:
            self._started = (time.perf_counter(), step)
        elif step - self._started[1] == TIMED_STEPS:
            per_step = (time.perf_counter() - self._started[0]) / TIMED_STEPS
            left = int(trainer.max_steps) - step
            print(f"about {per_step:.2f} s a step here: the {left} steps left take about {duration_text(per_step * left)}", flush=True)


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class TinySegmenter(L.LightningModule):
    """A few strided conv blocks and a 1x1 classifier, logits upsampled to the input size.

    Args:
        num_classes: K, from the run's ``classes.json``.
        ignore_index: mask value skipped by the loss and the metric.
        width: channels of the first block (doubled once); small so that it trains on a CPU.
        lr: AdamW learning rate.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, width: int = 32, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            conv_bn_relu(3, width, stride=2),
            conv_bn_relu(width, 2 * width, stride=2),
            conv_bn_relu(2 * width, 2 * width),
            nn.Conv2d(2 * width, num_classes, 1),
        )
        self.val_miou = MulticlassJaccardIndex(num_classes, ignore_index=ignore_index)

    def forward(self, images: Tensor) -> Tensor:
        # Bilinear is right here: these are logits, not label ids.
        return F.interpolate(self.net(images), size=images.shape[-2:], mode="bilinear", align_corners=False)

    def training_step(self, batch: dict[str, Tensor], batch_index: int) -> Tensor:
        loss = F.cross_entropy(self(batch["image"]), batch["mask"], ignore_index=self.hparams.ignore_index)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_index: int) -> None:
        self.val_miou(self(batch["image"]).argmax(dim=1), batch["mask"])
        self.log("val/miou", self.val_miou, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a small segmentation net on a datus run's pseudo masks.")
    parser.add_argument("--run", type=Path, required=True, help="the --output_dir of a finished `datus predict`")
    parser.add_argument("--steps", type=int, default=1000, help="optimiser steps")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu, auto, ...")
    parser.add_argument("--output_dir", type=Path, default=None, help="logs and checkpoints (default: RUN/training)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Fit for ``--steps`` steps, then validate once; returns the last train loss and the val mIoU."""
    args = parse_args(argv)
    if args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    quiet_lightning()
    L.seed_everything(0)
    data = PseudoMaskDataModule(
        args.run, image_size=args.image_size, batch_size=args.batch_size, num_workers=args.num_workers
    )
    model = TinySegmenter(data.num_classes, ignore_index=data.ignore_index)
    output_dir = args.output_dir or args.run / "training"
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator=args.accelerator,
        devices=1,
        default_root_dir=output_dir,
        logger=CSVLogger(output_dir),
        log_every_n_steps=1,
        enable_model_summary=False,
        callbacks=[StepEstimate()],
    )
    print(f"training {args.steps} steps; logs and checkpoints go to {output_dir}", flush=True)
    trainer.fit(model, datamodule=data)
    train_loss = float(trainer.callback_metrics["train/loss"])
    (validated,) = trainer.validate(model, datamodule=data, verbose=False)
    results = {"train_loss": train_loss, "val_miou": validated.get("val/miou", float("nan"))}
    print(f"train loss {results['train_loss']:.4f}, val mIoU {results['val_miou']:.4f} ({data.num_classes} classes)")
    checkpoint = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    print(f"checkpoint: {checkpoint or 'none written'}; training log: {trainer.logger.log_dir if trainer.logger else output_dir}")
    return results


if __name__ == "__main__":
    main()
