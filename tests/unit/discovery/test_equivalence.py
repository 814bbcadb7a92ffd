"""The batched, multi-process pipeline finds exactly the segments of a plain reference.

The reference is written here independently: keys computed from the last block's weights by
hand, one image at a time, numpy products, scikit-network Louvain and scipy's labelling of each
community, and the noise donors as numpy mean-key products. The pipeline runs datus's own
Louvain engine, so this also checks it against scikit-network end to end. Real SUIM images, a
fixed random-weight ViT saved to a file.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from scipy import ndimage, sparse
from sknetwork.clustering import Louvain

from datus.callbacks.writer import SegmentShardWriter
from datus.datamodules.images import ImageFolderDataModule
from datus.discovery.backbones import normalization_of
from datus.discovery.module import DatusModule
from datus.runfolder.records import ImageRecord
from datus.runfolder.run import Run
from datus.runfolder.shards import read_records
from tests.generated import SHARED_DATA

SUIM_IMAGES = SHARED_DATA / "suim-sample" / "train_val" / "images"
TINY_VIT = {"depth": 2, "embed_dim": 48, "num_heads": 2, "patch_size": 8}
IMAGE_SIZE = 96
MIN_PATCHES = 5

pytestmark = pytest.mark.skipif(not SUIM_IMAGES.is_dir(), reason="shared SUIM sample not present")


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1234)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY_VIT)
    path = tmp_path_factory.mktemp("weights") / "tiny_vit.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("suim5")
    for path in sorted(SUIM_IMAGES.iterdir())[:5]:
        (folder / path.name).symlink_to(path)
    return folder


def reference_partition(model: torch.nn.Module, image: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image: hand-computed keys, k k^T > 0, Louvain, 8-connected pieces, tau filter.

    Returns the segment map, the per-patch noise flags and the keys.
    """
    captured: dict[str, torch.Tensor] = {}
    last = model.blocks[-1]
    handle = last.norm1.register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    with torch.no_grad():
        model.forward_features(image[None])
        qkv = F.linear(captured["x"], last.attn.qkv.weight, last.attn.qkv.bias)[0]
    handle.remove()
    tokens = qkv.shape[0]
    keys = qkv.reshape(tokens, 3, -1)[:, 1][1:].numpy()  # heads are contiguous in the key third
    grid = IMAGE_SIZE // TINY_VIT["patch_size"]
    adjacency = (keys.astype(np.float32) @ keys.T.astype(np.float32)) > 0
    communities = Louvain().fit_predict(sparse.csr_matrix(adjacency.astype(float))).reshape(grid, grid)
    segments = np.zeros((grid, grid), dtype=int)
    next_id = 0
    for community in np.unique(communities):
        pieces, count = ndimage.label(communities == community, structure=np.ones((3, 3)))
        segments[pieces > 0] = pieces[pieces > 0] + next_id
        next_id += count
    sizes = np.bincount(segments.ravel())
    return segments, sizes[segments] <= MIN_PATCHES, keys


def canonical(labels: np.ndarray) -> np.ndarray:
    _, first, inverse = np.unique(labels.ravel(), return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    return order[inverse].reshape(labels.shape)


@pytest.mark.parametrize(("batch_size", "workers"), [(1, 0), (3, 2)])
def test_batched_pipeline_matches_plain_reference(
    weights_file: Path, image_dir: Path, tmp_path: Path, batch_size: int, workers: int
) -> None:
    module = DatusModule(
        backbone="vit_tiny_patch16_224",
        weights=str(weights_file),
        image_size=IMAGE_SIZE,
        min_patches=MIN_PATCHES,
        louvain_workers=workers,
        backbone_kwargs=TINY_VIT,
    )
    data = ImageFolderDataModule(image_dir, image_size=IMAGE_SIZE, patch_size=8, batch_size=batch_size, num_workers=0)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[SegmentShardWriter(tmp_path)]
    )
    trainer.predict(module, datamodule=data, return_predictions=False)
    records = {r.image_id: r for shard in Run(tmp_path).shards() for r in read_records(shard)}
    assert len(records) == 5

    reference_model = timm.create_model("vit_tiny_patch16_224", num_classes=0, dynamic_img_size=True, **TINY_VIT)
    reference_model.load_state_dict(torch.load(weights_file, weights_only=True))
    reference_model.eval()
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in normalization_of("vit_tiny_patch16_224"))
    dataset = data.predict_dataloader().dataset
    for index in range(len(dataset)):
        item = dataset[index]
        segments, noise, keys = reference_partition(reference_model, (item["image"] / 255 - mean) / std)
        record = records[item["image_id"]]
        assert np.array_equal(canonical(record.segment_map), canonical(segments)), item["image_id"]
        assert np.array_equal(record.is_noise[record.segment_map], noise), item["image_id"]
        assert record.embeddings.shape == (record.num_valid, 48)
        assert np.allclose(np.linalg.norm(record.embeddings.astype(np.float32), axis=1), 1, atol=1e-2)
        check_donors(record, keys)


def check_donors(record: ImageRecord, keys: np.ndarray) -> None:
    """Each noise segment's donor is the valid segment with the largest mean-key product (numpy, per segment)."""
    flat = record.segment_map.ravel()
    means = np.stack([keys[flat == segment].mean(0) for segment in range(len(record.sizes))])
    valid = np.flatnonzero(~record.is_noise)
    for segment in range(len(record.sizes)):
        if not len(valid):
            assert record.donors[segment] == -1
            continue
        products = means[valid] @ means[segment]
        expected = segment if not record.is_noise[segment] else valid[int(np.argmax(products))]
        donor = valid[record.donors[segment]]
        assert donor == expected or np.isclose(products[record.donors[segment]], products.max(), rtol=1e-4)
