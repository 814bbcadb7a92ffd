"""Dense-CRF refinement of soft cluster masks (optional, needs the ``crf`` extra).

DatUS paints every segment with its cluster id, so mask borders follow the ViT's patch grid
(8 or 16 px steps). A fully connected CRF (Krähenbühl & Koltun 2011, via ``pydensecrf2``) moves
those borders onto colour edges of the image, as STEGO does for its cluster probes.

The building blocks here are pure functions on numpy arrays:

- :func:`segment_probabilities`: S x K squared distances to centroids -> S x K soft labels;
- :func:`pixel_probabilities`: those, painted through the h x w segment map -> K x H x W;
- :func:`refine`: image + K x H x W probabilities -> H x W labels;
- :func:`refine_segments`: image + segment inputs -> H x W labels, building the probabilities
  directly at the size the CRF runs at (the memory-lean path);
- :func:`refine_many`: :func:`refine_segments` over many images in worker processes.

This module imports only numpy and PIL at import time; ``pydensecrf`` is imported when a CRF
runs.
"""

from __future__ import annotations

import math
import multiprocessing
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from datus.core.errors import ConfigurationError
from datus.core.io import UnreadableFile, load_rgb
from datus.stages.paint import label_dtype, upsample_nearest

MISSING_EXTRA = "--cluster.crf needs the 'crf' extra: pip install 'datus[crf]' (pydensecrf2)"

UNARY_CLIP = 1e-5
"""Probabilities are clipped to at least this before ``-log``, as ``pydensecrf.utils.unary_from_softmax``."""

DEFAULT_MAX_PIXELS = 4_000_000
"""Images above this many pixels are refined on a downscaled copy.

Measured with ``scripts/benchmark_crf.py --memory`` (one process, synthetic image refined at
full size, peak RSS including the interpreter): about 50 MB + (210 + 34 K) bytes per pixel for
K labels. K = 6: 0.49 GB at 1 MP, 1.66 GB at 4 MP, 3.27 GB at 8 MP, 4.74 GB at 12 MP (4000 x
3000); K = 27: 1.13 GB at 1 MP, 4.29 GB at 4 MP. CPU time grows the same way, ~4-7 CPU s per MP
at K = 6. With 4 MP a worker stays under ~1.7 GB at K = 6 whatever the input size, while common
photo sizes up to 2560 x 1440 (3.7 MP) still run at full resolution; lower it for large K.
"""


@dataclass(frozen=True)
class CRFParams:
    """Dense-CRF settings. Each field is the command-line option ``--crf.<field>``.

    Defaults are STEGO's (Hamilton et al. 2022, ``crf.py``): 10 mean-field iterations, a
    Gaussian (smoothness) kernel of spatial std 1 px and weight 3, and a bilateral (appearance)
    kernel of spatial std 67 px, colour std 3 and weight 4.

    Attributes:
        iterations: mean-field iterations.
        gaussian_sxy: spatial standard deviation (pixels) of the smoothness kernel.
        gaussian_compat: weight of the smoothness kernel (Potts compatibility).
        bilateral_sxy: spatial standard deviation (pixels) of the appearance kernel.
        bilateral_srgb: colour standard deviation (0..255 units) of the appearance kernel.
        bilateral_compat: weight of the appearance kernel (Potts compatibility).
        temperature: softmax temperature over squared centroid distances (see
            :func:`segment_probabilities`); not a CRF setting proper, but part of its input.
        max_pixels: pixel budget; larger images are refined on a downscaled copy
            (see :func:`refine`).
    """

    iterations: int = 10
    gaussian_sxy: float = 1.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0
    temperature: float = 1.0
    max_pixels: int = DEFAULT_MAX_PIXELS

    OPTION_PREFIX: ClassVar[str] = "--crf."

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            option = f"{self.OPTION_PREFIX}{spec.name}"
            if spec.name in ("iterations", "max_pixels"):
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                    raise ConfigurationError(f"{option} must be a positive whole number, got {value!r}")
            elif (
                isinstance(value, bool)
                or not isinstance(value, (int, float, np.integer, np.floating))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ConfigurationError(f"{option} must be a positive number, got {value!r}")


def segment_probabilities(distances: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Soft cluster membership of each segment: ``softmax(-d^2 / temperature)`` over centroids.

    For unit-norm embeddings and centroids ``d^2 = 2 - 2 cos``, so with temperature 1 this is
    exactly STEGO's ``softmax(2 * cosine)`` cluster probabilities (the constant cancels).
    DatUS embeddings are unit-norm, but k-means centroids are means (shorter than 1), and with
    PCA the distances are measured in the projected space: there the equality is approximate,
    and ``temperature`` is the knob for how soft the CRF's input is.

    Args:
        distances: S x K squared distances of S segment embeddings to K centroids.
        temperature: positive; larger gives softer probabilities.

    Returns:
        S x K float32, rows summing to 1.
    """
    distances = np.asarray(distances)
    if distances.ndim != 2 or distances.shape[1] < 1:
        raise ValueError(f"distances must be S x K with K >= 1, got shape {distances.shape}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if not np.isfinite(distances).all():
        raise ValueError("distances contain NaN or inf")
    logits = distances.astype(np.float64) / -temperature
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    weights /= weights.sum(axis=1, keepdims=True)
    return weights.astype(np.float32)


def pixel_probabilities(segment_probs: np.ndarray, segment_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Paint per-segment probabilities through a patch-grid segment map, at pixel size ``size``.

    The h x w map is upsampled with nearest neighbour (each pixel takes the grid cell its
    centre falls in, as :func:`datus.stages.paint.upsample_nearest` does for the masks), so the
    argmax of the result is exactly the unrefined DatUS mask.

    Args:
        segment_probs: S x K probabilities of the S segments.
        segment_map: h x w integer segment ids in [0, S).
        size: (H, W) of the output.

    Returns:
        K x H x W float32, C-contiguous.
    """
    segment_probs = np.asarray(segment_probs)
    segment_map = np.asarray(segment_map)
    if segment_probs.ndim != 2 or segment_probs.shape[1] < 1:
        raise ValueError(f"segment probabilities must be S x K with K >= 1, got shape {segment_probs.shape}")
    if segment_map.ndim != 2 or segment_map.size == 0 or not np.issubdtype(segment_map.dtype, np.integer):
        raise ValueError(f"segment map must be a non-empty h x w integer array, got {segment_map.dtype} {segment_map.shape}")
    if segment_map.min() < 0 or segment_map.max() >= len(segment_probs):
        raise ValueError(
            f"segment map ids must lie in [0, {len(segment_probs)}), got {segment_map.min()}..{segment_map.max()}"
        )
    grid = np.ascontiguousarray(segment_probs.astype(np.float32, copy=False).T[:, segment_map])  # K x h x w
    probabilities = np.empty((len(grid), *size), dtype=np.float32)
    for label, plane in enumerate(grid):  # a loop over K labels; pixels are gathered by numpy
        probabilities[label] = upsample_nearest(plane, size)
    return probabilities


def working_size(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """(H, W) scaled down with its aspect ratio kept so that H * W <= ``max_pixels``; unchanged if it fits."""
    height, width = size
    if height * width <= max_pixels:
        return height, width
    scale = math.sqrt(max_pixels / (height * width))
    small_height, small_width = max(1, math.floor(height * scale)), max(1, math.floor(width * scale))
    while small_height * small_width > max_pixels:  # rounding at tiny budgets
        if small_height >= small_width:
            small_height -= 1
        else:
            small_width -= 1
    return small_height, small_width


def refine(image: np.ndarray, probabilities: np.ndarray, params: CRFParams | None = None) -> np.ndarray:
    """Dense-CRF labels for one image: unary ``-log p``, Gaussian + bilateral pairwise, argmax.

    Above ``params.max_pixels`` the CRF runs on a downscaled copy: the image is resized with
    PIL's bilinear filter (which averages over the whole footprint when shrinking, i.e. area-like),
    each probability plane bilinearly, and the labels come back to H x W with nearest neighbour.
    Memory then stays bounded by the budget (plus the K x H x W input the caller already holds);
    borders are placed at the reduced resolution. Callers that start from segments should use
    :func:`refine_segments`, which never builds the full-size probabilities.

    Args:
        image: H x W x 3 uint8 RGB. (Channel order does not matter: the colour kernel is isotropic.)
        probabilities: K x H x W non-negative, normally summing to 1 over K. A per-pixel scale
            does not change the result (it shifts every label's unary equally).
        params: CRF settings; :class:`CRFParams` defaults when None.

    Returns:
        H x W labels in [0, K) (uint8 up to 255 labels): every pixel has one.

    Raises:
        ConfigurationError: ``pydensecrf`` (the ``crf`` extra) is not installed.
        ValueError: shapes disagree, or probabilities are negative or not finite.
    """
    params = params or CRFParams()
    image = np.asarray(image)
    probabilities = np.asarray(probabilities)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be H x W x 3 uint8, got {image.dtype} {image.shape}")
    if probabilities.ndim != 3 or probabilities.shape[1:] != image.shape[:2] or probabilities.shape[0] < 1:
        raise ValueError(f"probabilities must be K x H x W with H x W = {image.shape[:2]}, got {probabilities.shape}")
    size = image.shape[:2]
    small = working_size(size, params.max_pixels)
    if small != size:
        image = _resize_image(image, small)
        probabilities = _resize_planes(probabilities, small)
    return _full_size(_crf(image, probabilities, params), size)


def _full_size(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """CRF labels in a PNG-ready dtype, upsampled (nearest) to ``size`` when refined smaller."""
    labels = labels.astype(label_dtype(int(labels.max(initial=0)) + 1))
    return labels if labels.shape == size else upsample_nearest(labels, size)


def refine_segments(
    image: np.ndarray, segment_probs: np.ndarray, segment_map: np.ndarray, params: CRFParams | None = None
) -> np.ndarray:
    """:func:`refine` from segment inputs, building K x H' x W' probabilities at the CRF's size only.

    Same result as ``refine(image, pixel_probabilities(segment_probs, segment_map, (H, W)))``
    when the image fits the pixel budget; above it, the probabilities are painted straight at
    the downscaled size (nearest neighbour from the grid, instead of bilinear from full size),
    so no full-size K x H x W array ever exists.

    Args:
        image: H x W x 3 uint8 RGB.
        segment_probs: S x K probabilities (e.g. from :func:`segment_probabilities`).
        segment_map: h x w segment ids in [0, S).
        params: CRF settings.

    Returns:
        H x W labels in [0, K), uint8 (uint16 beyond 255 labels).
    """
    params = params or CRFParams()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be H x W x 3 uint8, got {image.dtype} {image.shape}")
    return _refine_segments_at(image, image.shape[:2], segment_probs, segment_map, params)


def _refine_segments_at(
    image: np.ndarray, size: tuple[int, int], segment_probs: np.ndarray, segment_map: np.ndarray, params: CRFParams
) -> np.ndarray:
    """Refine at the working size of an image of ``size`` (``image`` may already be smaller)."""
    small = working_size(size, params.max_pixels)
    if image.shape[:2] != small:
        image = _resize_image(image, small)
    return _full_size(_crf(image, pixel_probabilities(segment_probs, segment_map, small), params), size)


@dataclass(frozen=True)
class CRFJob:
    """One image for :func:`refine_many`: small inputs, so pixels are decoded in the worker.

    Attributes:
        image: path of the image file (decoded with :func:`datus.core.io.load_rgb`, EXIF
            orientation applied), or an H x W x 3 uint8 array (pickled to the worker).
        segment_probs: S x K segment probabilities.
        segment_map: h x w segment ids in [0, S).
    """

    image: Path | str | np.ndarray
    segment_probs: np.ndarray
    segment_map: np.ndarray


def refine_job(job: CRFJob, params: CRFParams | None = None) -> np.ndarray | None:
    """Run one :class:`CRFJob` in this process: decode, refine, H x W labels.

    Returns None when the image file cannot be read any more (moved or damaged since the
    prediction), so that the caller keeps the unrefined mask instead of stopping the run.
    """
    params = params or CRFParams()
    if isinstance(job.image, np.ndarray):
        return refine_segments(job.image, job.segment_probs, job.segment_map, params)
    try:  # decoded at a reduced scale when the CRF will run smaller anyway
        picture, size = load_rgb(Path(job.image), min_side=math.isqrt(params.max_pixels))
    except UnreadableFile:
        return None
    return _refine_segments_at(np.asarray(picture), size, job.segment_probs, job.segment_map, params)


def refine_many(
    jobs: Iterable[CRFJob], params: CRFParams | None = None, workers: int = 1, max_pending: int | None = None
) -> Iterator[np.ndarray | None]:
    """Labels for each job, in the order of ``jobs``, refined in ``workers`` processes.

    Workers are started with ``spawn`` (safe next to CUDA and threads). At most ``max_pending``
    jobs (default ``2 * workers``) are submitted and not yet yielded, so memory stays flat however
    long ``jobs`` is: each pending job holds its inputs and, once done, its H x W labels.
    ``workers <= 1`` runs in this process, with no pool. A failing job raises here, at its
    place in the order; closing the iterator early cancels what has not started.

    Each worker's peak memory is about that of one :func:`refine` at up to ``params.max_pixels``
    pixels (see :data:`DEFAULT_MAX_PIXELS`); workers import only numpy, PIL and pydensecrf.
    """
    params = params or CRFParams()
    if workers <= 1:
        for job in jobs:
            yield refine_job(job, params)
        return
    max_pending = max(1, max_pending or 2 * workers)
    pending: deque[Future[np.ndarray | None]] = deque()
    executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        for job in jobs:
            if len(pending) >= max_pending:
                yield pending.popleft().result()
            pending.append(executor.submit(refine_job, job, params))
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        executor.shutdown(wait=True, cancel_futures=True)


def require_densecrf() -> Any:
    try:
        import pydensecrf.densecrf as densecrf
    except ImportError as error:
        raise ConfigurationError(MISSING_EXTRA) from error
    return densecrf


def _crf(image: np.ndarray, probabilities: np.ndarray, params: CRFParams) -> np.ndarray:
    """The CRF proper, at the size given: H x W int64 labels."""
    num_labels, height, width = probabilities.shape
    if num_labels == 1:  # nothing to choose between; pydensecrf would agree, at a cost
        return np.zeros((height, width), dtype=np.int64)
    if not np.isfinite(probabilities).all() or probabilities.min() < 0:
        raise ValueError("probabilities must be finite and non-negative")
    densecrf = require_densecrf()
    unary = np.array(probabilities, dtype=np.float32, order="C").reshape(num_labels, -1)  # one copy, worked in place
    np.clip(unary, UNARY_CLIP, None, out=unary)
    np.log(unary, out=unary)
    np.negative(unary, out=unary)
    crf = densecrf.DenseCRF2D(width, height, num_labels)
    crf.setUnaryEnergy(unary)  # copied into the CRF's own matrix
    del unary
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    if not (image.flags.c_contiguous and image.flags.writeable):  # pydensecrf's buffer type wants both
        image = np.array(image, order="C")
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=image, compat=params.bilateral_compat
    )
    marginals = np.asarray(crf.inference(params.iterations))  # K x N, a view of the CRF's Eigen matrix
    labels = marginals.argmax(axis=0).reshape(height, width).astype(np.int64, copy=False)
    del marginals, crf
    return labels


def _resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def _resize_planes(planes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of each K x H x W plane (PIL float images), renormalised over K."""
    height, width = size
    resized = np.empty((len(planes), height, width), dtype=np.float32)
    for index, plane in enumerate(planes):  # a loop over K labels, not pixels
        resized[index] = np.asarray(
            Image.fromarray(np.asarray(plane, dtype=np.float32)).resize((width, height), Image.Resampling.BILINEAR)
        )
    np.clip(resized, 0, None, out=resized)
    total = resized.sum(axis=0, keepdims=True)
    np.divide(resized, total, out=resized, where=total > 0)
    return resized
