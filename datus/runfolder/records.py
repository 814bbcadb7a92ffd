"""What prediction hands to the rest of the pipeline: one small record per image.

Records are plain numpy data, light to import (the offline commands read them without loading
Lightning or timm) and small enough to stream to disk per batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np


UNKNOWN_MARK = (-1, -1)
"""The ``image_mark`` of a record whose input file was not stat-ed (shards of earlier versions, synthetic runs)."""


@dataclass
class ImageRecord:
    """Everything the dataset-level stages need about one image.

    Segments are the 8-connected pieces of the Louvain communities, valid or noise. Only valid
    segments are embedded; every noise segment borrows the label of a *donor*: the valid
    segment of the same image whose mean key is most similar to its own (the keys that built
    the patch graph). An image without any valid segment is labelled as a whole through its
    own CLS embedding from the discovery pass.

    Attributes:
        image_id: relative path of the image without extension; names every output file.
        image_path: the input file (kept as found, for the manifest and overlays).
        mask_path: its ground-truth label map, or "" when it has none.
        orig_size: (height, width) of the image after EXIF rotation.
        segment_map: h x w int32 segment ids 0..S-1, numbered by first appearance in raster order.
        sizes: S patch counts.
        is_noise: S flags; a segment of at most ``min_patches`` patches is noise.
        donors: S int32, for each segment the index (0..V-1, in segment-id order of the valid
            segments) of the valid segment whose label it takes (its own for a valid segment);
            -1 everywhere when the image has no valid segment.
        embeddings: V x D float16, L2-normalised embeddings of the valid segments.
        image_embedding: D float16, L2-normalised embedding of the whole image in the segments' space (the
            discovery pass's CLS token, or the separate segment embedder's embedding of the image).
        cls_attention: h x w float16, last-block CLS attention (for pictures).
        modularity: modularity of the image's Louvain communities on its patch graph (a
            label-free diagnostic); NaN when not recorded (shards of earlier datus versions).
        image_mark: (size, modification time in ns) of the input file when it was read: a rerun
            predicts the image again when they differ; :data:`UNKNOWN_MARK` when not recorded.
    """

    image_id: str
    image_path: str
    mask_path: str
    orig_size: tuple[int, int]
    segment_map: np.ndarray
    sizes: np.ndarray
    is_noise: np.ndarray
    donors: np.ndarray
    embeddings: np.ndarray
    image_embedding: np.ndarray
    cls_attention: np.ndarray
    modularity: float = float("nan")
    image_mark: tuple[int, int] = UNKNOWN_MARK

    @property
    def num_valid(self) -> int:
        return int(len(self.embeddings))

    def visible_segment_map(self) -> np.ndarray:
        """The user-facing segment map: 0 = noise, valid segments numbered 1..V in raster order."""
        visible = np.where(self.is_noise, 0, np.cumsum(~self.is_noise))
        return visible[self.segment_map]

    def segment_labels(self, valid_labels: np.ndarray, image_label: int) -> np.ndarray:
        """A label per segment from the labels of the valid segments (or the image's, when it has none)."""
        if self.num_valid == 0:
            return np.full(len(self.sizes), image_label, dtype=np.int64)
        return np.asarray(valid_labels, dtype=np.int64)[self.donors]


@dataclass
class PredictionBatch:
    """What ``predict_step`` hands the writer: records plus the files the loader could not read."""

    records: list[ImageRecord]
    skipped: list[dict[str, str]]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    backbone_passes: int = 0
    """Images and crops through the ViT: the benchmark's yardstick count."""


def segment_keys(seed: int, image_id: str, segments: np.ndarray) -> np.ndarray:
    """A pseudo-random uint64 per segment, from the seed, the image id and the segment id only.

    Samples drawn by smallest key (gallery members, the k-means initialisation sample) are then
    the same however images were spread over ranks and shards.
    """
    digest = hashlib.blake2b(f"{seed}/{image_id}".encode("utf-8", "surrogateescape"), digest_size=8).digest()
    with np.errstate(over="ignore"):
        return splitmix64(np.uint64(int.from_bytes(digest, "little")) + np.asarray(segments, dtype=np.uint64))


def splitmix64(values: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: well-mixed uint64 keys from any uint64 values (wrapping arithmetic)."""
    value = np.asarray(values, dtype=np.uint64)
    with np.errstate(over="ignore"):
        value = (value ^ (value >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        value = (value ^ (value >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return value ^ (value >> np.uint64(31))
