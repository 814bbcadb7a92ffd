"""Packed segment embedding equals embedding each segment's tokens on their own."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datus.discovery.communities import SegmentPartition
from datus.discovery.module import DatusModule
from datus.discovery.ops import packed_attention_mask

TINY_VIT = {"depth": 2, "embed_dim": 48, "num_heads": 2, "patch_size": 8}


def test_mask_is_block_diagonal_with_own_cls_and_padding_to_itself() -> None:
    segment_ids = torch.tensor([[0, 1, 1, 0]])
    mask = packed_attention_mask(segment_ids, torch.tensor([2]), slots=3)[0, 0]
    # tokens: cls0 cls1 pad | p0(s0) p1(s1) p2(s1) p3(s0)
    expected = torch.tensor(
        [
            [1, 0, 0, 1, 0, 0, 1],
            [0, 1, 0, 0, 1, 1, 0],
            [0, 0, 1, 0, 0, 0, 0],
            [1, 0, 0, 1, 0, 0, 1],
            [0, 1, 0, 0, 1, 1, 0],
            [0, 1, 0, 0, 1, 1, 0],
            [1, 0, 0, 1, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def partition(segment_map: np.ndarray) -> SegmentPartition:
    sizes = np.bincount(segment_map.ravel()).astype(np.int32)
    return SegmentPartition(segment_map.astype(np.int32), sizes, sizes <= 1)


@pytest.fixture(scope="module")
def module() -> DatusModule:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DatusModule(
            backbone="vit_tiny_patch16_224",
            weights="random",
            image_size=32,
            embedding="packed",
            louvain_workers=0,
            backbone_kwargs=TINY_VIT,
        )


def alone(module: DatusModule, image: torch.Tensor, patch_mask: np.ndarray) -> torch.Tensor:
    """The reference: CLS plus only this segment's patch tokens, no attention mask at all."""
    model = module.backbone
    tokens = model._pos_embed(model.patch_embed(image[None]))
    keep = torch.cat([torch.tensor([True]), torch.from_numpy(patch_mask.ravel())])
    x = model.norm_pre(tokens[:, keep])
    for block in model.blocks:
        x = block(x)
    return F.normalize(model.norm(x)[0, 0], dim=-1)


def test_packed_embeddings_equal_valid_segments_alone(module: DatusModule) -> None:
    """Valid segments only (segment 4 of image 0 is a one-patch noise segment: no slot, no influence)."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 32, 32, generator=generator)
    maps = [
        np.array([[0, 0, 1, 1], [0, 2, 2, 1], [3, 3, 2, 1], [3, 3, 1, 4]]),
        np.array([[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]]),
    ]
    partitions = [partition(m) for m in maps]
    assert partitions[0].is_noise.tolist() == [False, False, False, False, True]
    with torch.no_grad():
        packed = module.embed_segments(images, partitions)
        reference = torch.stack(
            [
                alone(module, images[b], maps[b] == s)
                for b in range(2)
                for s in range(int(maps[b].max()) + 1)
                if not partitions[b].is_noise[s]
            ]
        )
    assert packed.shape == (6, 48)
    assert torch.allclose(packed, reference, atol=1e-5)


def test_packed_mode_is_recorded_in_the_run_identity(module: DatusModule) -> None:
    described = module.describe()
    assert described["embedding"] == "packed" and described["crop_recipe"] is None
