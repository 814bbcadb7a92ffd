"""Tensor kernels that both k-means engines and the fitted model share.

Distances are computed in true float32 (TF32 and autocast off) and in chunks of rows, so
memory stays bounded for millions of embeddings and both engines agree.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

CHUNK_ROWS = 65536
"""Most rows whose distances to the centroids are computed at once."""

CHUNK_ELEMENTS = 1 << 25
"""Most elements (128 MiB of float32) in one chunk's rows x K or rows x D temporary."""


def nearest(points: Tensor, centroids: Tensor, centroid_norms: Tensor) -> Tensor:
    """Index of the nearest centroid (squared Euclidean) of float32 ``points``; ties go to the lowest.

    Only ``|c|^2 - 2 x.c`` is compared: ``|x|^2`` is the same for every centroid.
    """
    return torch.addmm(centroid_norms[None], points, centroids.T, alpha=-2).argmin(1)


def nearest_squared_distances(points: Tensor, centroids: Tensor, centroid_norms: Tensor) -> Tensor:
    """Squared distance of each float32 point to its nearest centroid, clamped at 0 against rounding."""
    partial = torch.addmm(centroid_norms[None], points, centroids.T, alpha=-2).amin(1)
    return (partial + squared_norms(points)).clamp_min(0)


def squared_distances(points: Tensor, others: Tensor, other_norms: Tensor) -> Tensor:
    """Squared Euclidean distances, len(points) x len(others), clamped at 0 against rounding."""
    partial = torch.addmm(other_norms[None], points, others.T, alpha=-2)
    return (partial + squared_norms(points)[:, None]).clamp_min(0)


def squared_norms(points: Tensor) -> Tensor:
    """Row-wise ``|x|^2`` without a full-size squared temporary."""
    return torch.einsum("ij,ij->i", points, points)


def project(tensor: Tensor, mean: Tensor, components: Tensor) -> Tensor:
    """``(x - mean) @ components^T`` in float32, chunk by chunk so that casts stay small."""
    projected = torch.empty((tensor.shape[0], components.shape[0]), dtype=torch.float32, device=tensor.device)
    rows = chunk_rows(max(tensor.shape[1], components.shape[0]))
    for start, chunk in zip(range(0, tensor.shape[0], rows), chunks(tensor, rows), strict=True):
        projected[start : start + rows] = (chunk - mean) @ components.T
    return projected


def chunks(tensor: Tensor, rows: int) -> Iterator[Tensor]:
    """Consecutive float32 blocks of ``rows`` rows (float16/bfloat16 inputs are cast per block)."""
    for start in range(0, tensor.shape[0], rows):
        yield tensor[start : start + rows].to(torch.float32)


def chunk_rows(width: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Rows per chunk so that a rows x ``width`` float32 temporary stays under ``elements`` (128 MiB)."""
    return max(1, min(CHUNK_ROWS, elements // max(width, 1)))


def count_nonfinite(tensor: Tensor) -> int:
    """Number of NaN/inf entries, counted per chunk to avoid a full-size boolean temporary."""
    if not tensor.is_floating_point():
        return 0
    flat = tensor.reshape(-1)
    return sum(
        int((~torch.isfinite(flat[start : start + CHUNK_ELEMENTS])).sum())
        for start in range(0, len(flat), CHUNK_ELEMENTS)
    )



def as_tensor(embeddings: np.ndarray | Tensor) -> tuple[Tensor, bool]:
    """``(tensor, was_numpy)``; numpy arrays are wrapped without a copy."""
    if isinstance(embeddings, Tensor):
        tensor, was_numpy = embeddings, False
    elif isinstance(embeddings, np.ndarray):
        with warnings.catch_warnings():
            # Read-only arrays (np.load with mmap) are only ever read here.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensor, was_numpy = torch.as_tensor(embeddings), True
    else:
        raise TypeError(f"embeddings must be a numpy array or a torch tensor, got {type(embeddings).__name__}")
    if not tensor.is_floating_point():
        raise ValueError(
            f"embeddings must be floating point, got dtype {tensor.dtype}; pass the float embeddings of the shards"
        )
    return tensor, was_numpy


@contextmanager
def exact_float32(device: torch.device) -> Iterator[None]:
    """Compute matrix products in true float32, whatever the caller configured.

    TF32 (``set_float32_matmul_precision("high")``, which Lightning users often set) and
    autocast round products to about 10 bits of mantissa, enough to flip nearest-centroid
    decisions between close clusters and to make the engines disagree. The matmul precision
    is a process-wide setting; the caller's value is restored on exit.
    """
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)

