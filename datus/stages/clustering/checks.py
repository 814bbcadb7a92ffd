"""Checks of the data to cluster, shared by both engines (under DDP the counts are global)."""

from __future__ import annotations


def check_data(num_samples: int, dim: int, num_nonfinite: int, num_clusters: int, pca_components: int | None) -> None:
    """Refuse data that cannot be clustered as asked; under DDP the counts are global."""
    if num_samples == 0:
        raise ValueError(
            f"embeddings is empty (0 rows of dimension {dim}): there is nothing to cluster; check that the "
            "prediction run produced valid segments"
        )
    if num_nonfinite:
        raise ValueError(
            f"embeddings contain {num_nonfinite} NaN or inf values; drop or recompute the rows holding them "
            "(typically an fp16 overflow) before clustering"
        )
    if num_clusters > num_samples:
        raise ValueError(
            f"num_clusters={num_clusters} exceeds the number of embeddings ({num_samples}); k-means needs at least "
            "one embedding per cluster, so lower num_clusters or cluster more images"
        )
    if pca_components is not None and pca_components > dim:
        raise ValueError(
            f"pca_components={pca_components} exceeds the embedding dimension {dim}; PCA cannot produce more "
            f"components than features, so pass pca_components <= {dim} or null (None in Python)"
        )
    if pca_components is not None and pca_components > num_samples:
        raise ValueError(
            f"pca_components={pca_components} exceeds the number of embeddings ({num_samples}); PCA of "
            f"{num_samples} samples has at most {num_samples} components, so lower pca_components or pass null (None in Python)"
        )

