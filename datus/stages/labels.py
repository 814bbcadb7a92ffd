"""A cluster id for every segment of a record, from a fitted model: what painting, scoring,
diagnostics and the CRF agree on.

Valid segments are labelled by their own embeddings; every noise segment takes its donor's
label; an image without valid segments is labelled as a whole through its own embedding.
"""

from __future__ import annotations

import numpy as np

from datus.stages.clustering import ClusterModel
from datus.runfolder.records import ImageRecord


def segment_labels(model: ClusterModel, records: list[ImageRecord]) -> list[np.ndarray]:
    """A cluster id for every segment of every record, valid segments by their own embeddings."""
    valid = np.concatenate([record.embeddings for record in records]).astype(np.float32)
    images = np.stack([record.image_embedding for record in records]).astype(np.float32)
    valid_labels = model.assign(valid) if len(valid) else np.zeros(0, dtype=np.int64)
    image_labels = model.assign(images)
    labels, offset = [], 0
    for record, image_label in zip(records, image_labels):
        labels.append(record.segment_labels(valid_labels[offset : offset + record.num_valid], int(image_label)))
        offset += record.num_valid
    return labels


def segment_probabilities_of(model: ClusterModel, record: ImageRecord, temperature: float) -> np.ndarray:
    """Soft cluster membership of every segment (S x K), the input of the CRF.

    Valid segments use their own distances to the centroids, noise segments their donor's,
    and an image without valid segments its own CLS embedding's.
    """
    from datus.stages.crf import segment_probabilities

    stacked = np.concatenate([record.embeddings, record.image_embedding[None]]).astype(np.float32)
    probabilities = segment_probabilities(model.distances(stacked), temperature)
    rows = np.where(record.donors >= 0, record.donors, record.num_valid)
    return probabilities[rows]
