"""Stage 5 as pure functions: one embedding per valid segment, packed or from masked crops.

:class:`datus.discovery.module.DatusModule` calls them with its networks and settings; they hold no state,
so a test (or another module) can embed segments without building the whole module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datus.discovery.backbones import embed, has_plain_last_block, last_block_head
from datus.discovery.ops import CropRecipe, masked_crops, packed_attention_mask


@dataclass(frozen=True)
class CropSettings:
    """How crops are cut and batched: the patch grid they come from, the recipe, their size, how many per pass."""

    patch_size: int
    recipe: CropRecipe
    size: int
    batch_size: int


def embed_packed(model: nn.Module, images: Tensor, segment_ids: Tensor, counts: Tensor) -> Tensor:
    """One backbone pass per image; each segment's CLS token sees only its own patches.

    Tokens are one copy of the (position-embedded) CLS token per valid segment, followed by
    the patch tokens of valid segments only (with their positional embeddings already
    added, so dropping noise patches changes nothing for the others), padded per batch.
    Images without a valid segment are left out of the pass.

    Args:
        model: the discovery ViT (one CLS token, no registers).
        images: B x 3 x H x W normalised images.
        segment_ids: B x N valid-segment id per patch, -1 for noise patches.
        counts: B valid-segment counts.

    Returns:
        sum(counts) x D L2-normalised embeddings, in image order then segment id.
    """
    has_segments = counts > 0  # images whose segments are all noise need no pass at all
    images, segment_ids, counts = images[has_segments], segment_ids[has_segments], counts[has_segments]
    tokens = model._pos_embed(model.patch_embed(images))
    cls, patches = tokens[:, :1], tokens[:, 1:]
    keep = segment_ids >= 0
    length = int(keep.sum(1).max())
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :length]
    kept = patches.gather(1, order[..., None].expand(-1, -1, patches.shape[-1]))
    kept_ids = torch.where(keep.gather(1, order), segment_ids.gather(1, order), -1)
    slots = int(counts.max())
    packed = torch.cat([cls.expand(-1, slots, -1), kept], dim=1)
    mask = packed_attention_mask(kept_ids, counts, slots)
    packed = model.norm_pre(packed)
    head_only = has_plain_last_block(model)
    for block in model.blocks[:-1] if head_only else model.blocks:
        packed = block(packed, attn_mask=mask)
    if head_only:
        packed = last_block_head(model.blocks[-1], packed, slots, attn_mask=mask)
    cls_out = model.norm(packed)[:, :slots]
    valid = torch.arange(slots, device=images.device)[None, :] < counts[:, None]
    return F.normalize(cls_out[valid].float(), dim=-1)


def embed_crops(
    embedder: nn.Module,
    pixels: Tensor,
    masks: Tensor,
    image_index: Tensor,
    crops: CropSettings,
    normalisation: tuple[Tensor, Tensor],
    lap: Callable[[str], None] | None = None,
) -> Tensor:
    """The L2-normalised embedding of each masked crop, in chunks of ``crops.batch_size`` (bounds device memory).

    Args:
        embedder: the segment embedder; its CLS token, or its pooled feature when it has none (a CNN).
        pixels: B x 3 x H x W images in [0, 1].
        masks: S x h x w patch masks, one per segment.
        image_index: S, the image of each mask.
        crops: how crops are cut (:func:`datus.discovery.ops.masked_crops`) and batched.
        normalisation: the embedder's (mean, std), each 1 x 3 x 1 x 1.
        lap: called with ``"crops"`` and ``"crop_embeddings"`` after each step (a stage timer).

    Returns:
        S x D embeddings, in the order of ``masks``.
    """
    mean, std = normalisation
    embeddings = []
    for start in range(0, len(masks), crops.batch_size):
        chunk = slice(start, start + crops.batch_size)
        cut = masked_crops(pixels, masks[chunk], image_index[chunk], crops.patch_size, crops.recipe, crops.size)
        if lap is not None:
            lap("crops")
        embeddings.append(embed(embedder, (cut - mean) / std))
        if lap is not None:
            lap("crop_embeddings")
    return torch.cat(embeddings)
