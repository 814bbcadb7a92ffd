"""The torchmetrics face of :mod:`datus.stages.metrics`: pooled counts, synced across processes.

Kept apart from the maths so that processes that only count pixels (the painting workers) do not
import torchmetrics (about 130 MB of memory per process).
"""

from __future__ import annotations

from typing import Any

import torch
import torchmetrics
from torch import Tensor

from datus.stages.metrics import metrics_from_confusion

_MAX_LISTED_VALUES = 10
"""Out-of-range values named in an error message, at most."""


class MatchedSegmentationMetric(torchmetrics.Metric):
    """Unsupervised segmentation quality: one pooled confusion matrix, Hungarian matching, two protocols.

    The only state is a (2, K + 1, C) int64 count tensor summed across processes, so DDP ranks that
    saw different numbers of images still combine exactly, and the matching runs once on the
    pooled counts (matching per rank or per batch would give different, wrong mappings).

    Args:
        num_clusters: K, the number of predicted cluster ids (values in [0, K)).
        num_classes: C, the number of ground-truth classes (values in [0, C)).
        ignore_index: in targets, pixels to leave out; in predictions, "no prediction". It must lie
            outside both [0, K) and [0, C) so that it cannot be mistaken for an id.
        **kwargs: forwarded to :class:`torchmetrics.Metric` (e.g. ``sync_on_compute``).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    confusion: Tensor

    def __init__(self, num_clusters: int, num_classes: int, ignore_index: int = 255, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if int(num_clusters) < 1:
            raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= int(ignore_index) < max(int(num_clusters), int(num_classes)):
            raise ValueError(
                f"ignore_index={ignore_index} collides with the ids in [0, "
                f"{max(num_clusters, num_classes)}) (num_clusters={num_clusters}, "
                f"num_classes={num_classes}); pick an ignore_index outside that range, e.g. -1 or 65535."
            )
        self.num_clusters = int(num_clusters)
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.add_state(
            "confusion",
            default=torch.zeros(2, self.num_clusters + 1, self.num_classes, dtype=torch.int64),
            dist_reduce_fx="sum",
        )

    def update(
        self,
        preds: Tensor | None = None,
        target: Tensor | None = None,
        noise: Tensor | None = None,
        counts: Tensor | None = None,
    ) -> None:
        """Add one batch of pixels to the pooled counts.

        Args:
            preds: integer cluster ids in [0, K), or ``ignore_index`` for "no prediction".
            target: integer class ids in [0, C), or ``ignore_index`` for pixels to leave out.
            noise: optional boolean mask of pixels that belong to noise segments (excluded by the
                paper protocol only).
            counts: instead of pixels, their (2, K + 1, C) counts from :func:`pixel_counts`
                (numpy counting on the CPU is several times faster than these tensor ops).

        Raises:
            ValueError: on mismatched shapes or ids out of range (silently clipping or dropping
                them would hide a wrong ``num_classes``/``num_clusters`` or an unmapped label).
            TypeError: on non-integer ``preds``/``target``.
        """
        if counts is not None:
            if tuple(counts.shape) != tuple(self.confusion.shape):
                raise ValueError(f"counts must have shape {tuple(self.confusion.shape)}, got {tuple(counts.shape)}")
            self.confusion += counts.to(device=self.confusion.device, dtype=torch.int64)
            return
        if preds is None or target is None:
            raise ValueError("update needs preds and target, or counts")
        if preds.shape != target.shape:
            raise ValueError(
                f"preds and target must have the same shape, got preds {tuple(preds.shape)} and "
                f"target {tuple(target.shape)}"
            )
        if noise is not None and noise.shape != target.shape:
            raise ValueError(
                f"noise must have the shape of target, got noise {tuple(noise.shape)} and target "
                f"{tuple(target.shape)}"
            )
        for name, tensor in (("preds", preds), ("target", target)):
            if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
                raise TypeError(f"{name} must hold integer ids, got dtype {tensor.dtype}")

        device = self.confusion.device
        preds = preds.reshape(-1).to(device=device, dtype=torch.int64)
        target = target.reshape(-1).to(device=device, dtype=torch.int64)
        self._check_range("target", target, self.num_classes, "num_classes")
        self._check_range("preds", preds, self.num_clusters, "num_clusters")

        keep = target != self.ignore_index
        target = target[keep]
        rows = preds[keep]
        rows = torch.where(rows == self.ignore_index, torch.full_like(rows, self.num_clusters), rows)
        index = rows * self.num_classes + target
        if noise is not None:
            is_noise = noise.reshape(-1).to(device=device)[keep] != 0
            index = index + is_noise.to(torch.int64) * ((self.num_clusters + 1) * self.num_classes)
        counts = torch.bincount(index, minlength=self.confusion.numel())
        self.confusion += counts.reshape(self.confusion.shape)

    def _check_range(self, name: str, values: Tensor, upper: int, argument: str) -> None:
        """Raise if ``values`` holds ids outside [0, upper) other than the ignore index."""
        bad = ((values < 0) | (values >= upper)) & (values != self.ignore_index)
        if bool(bad.any()):
            found = torch.unique(values[bad]).tolist()
            shown = ", ".join(str(value) for value in found[:_MAX_LISTED_VALUES])
            more = f" and {len(found) - _MAX_LISTED_VALUES} more" if len(found) > _MAX_LISTED_VALUES else ""
            raise ValueError(
                f"{name} holds values {shown}{more} outside [0, {upper}) ({argument}={upper}); "
                f"map them to the ignore index ({self.ignore_index}) or raise {argument}."
            )

    def compute(self) -> dict[str, Any]:
        """Match and score both protocols on the pooled counts.

        Returns:
            See :func:`metrics_from_confusion`.
        """
        return metrics_from_confusion(self.confusion.detach().cpu().numpy())

    def expanded(self, num_clusters: int) -> MatchedSegmentationMetric:
        """A copy with room for more clusters that keeps the counts accumulated so far.

        This lets a single streaming pass over prediction files discover K as it goes instead of
        reading every file twice.
        """
        if num_clusters < self.num_clusters:
            raise ValueError(f"cannot shrink from {self.num_clusters} to {num_clusters} clusters")
        grown = MatchedSegmentationMetric(num_clusters, self.num_classes, self.ignore_index)
        grown = grown.to(self.confusion.device)
        grown.confusion[:, : self.num_clusters] = self.confusion[:, : self.num_clusters]
        grown.confusion[:, num_clusters] = self.confusion[:, self.num_clusters]
        return grown
