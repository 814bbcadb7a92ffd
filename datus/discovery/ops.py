"""Device-side maths of segment discovery and segment embedding, as pure tensor functions.

Everything here is batched over images and segments: no Python loops over patches or pixels.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

CropRecipe = Literal["fit", "paper"]


def key_adjacency(keys: Tensor) -> Tensor:
    """Binary patch graph from last-block keys: ``(k k^T) > 0``, self-loops included.

    The product is taken in float32 with autocast off: the sign threshold flips on rounding
    errors of bf16/fp16, which would change the graph and therefore the segments.

    Args:
        keys: B x N x D patch keys.

    Returns:
        B x N x N boolean adjacency.
    """
    with torch.autocast(device_type=keys.device.type, enabled=False):
        keys = keys.float()
        return torch.bmm(keys, keys.transpose(1, 2)) > 0


def pack_adjacency(adjacency: Tensor) -> np.ndarray:
    """Bit-pack a B x N x N boolean adjacency to B x N x ceil(N/8) uint8 for cheap IPC."""
    return np.packbits(adjacency.cpu().numpy(), axis=-1)


def valid_segment_maps(segment_map: np.ndarray, is_noise: np.ndarray) -> np.ndarray:
    """Renumber the valid segments of one image 0..V-1 (segment-id order); noise patches become -1."""
    valid_ids = np.where(is_noise, -1, np.cumsum(~is_noise) - 1)
    return valid_ids[segment_map].astype(np.int64)


def donor_segments(keys: Tensor, segment_ids: Tensor, is_noise: list[Tensor]) -> list[np.ndarray]:
    """For every segment of every image, the valid segment whose label it takes.

    A valid segment is its own donor. A noise segment's donor is the valid segment of the same
    image with the largest product of mean keys, ``mean(k_noise) . mean(k_valid)``, which is
    also the mean over its patches of their key products with that segment's mean key: the
    quantity whose sign built the patch graph. Ties go to the lowest segment id. Computed for
    the whole batch at once, in float32.

    Args:
        keys: B x N x D patch keys.
        segment_ids: B x N segment id of every patch (0..S_b-1).
        is_noise: per image, S_b noise flags.

    Returns:
        Per image, S_b int32 donors as indices into its valid segments (0..V_b-1), all -1 when
        the image has no valid segment.
    """
    slots = max(len(flags) for flags in is_noise)
    with torch.autocast(device_type=keys.device.type, enabled=False):
        one_hot = F.one_hot(segment_ids.long(), slots).to(torch.float32)  # B x N x S
        sums = one_hot.transpose(1, 2) @ keys.float()
        means = sums / one_hot.sum(1).clamp_min(1)[..., None]
        similarity = means @ means.transpose(1, 2)  # B x S x S
    valid = torch.zeros((len(is_noise), slots), dtype=torch.bool, device=keys.device)
    for index, flags in enumerate(is_noise):
        valid[index, : len(flags)] = ~flags
    similarity = similarity.masked_fill(~valid[:, None, :], float("-inf"))
    donor = similarity.argmax(-1)
    own = torch.arange(slots, device=keys.device)[None].expand_as(donor)
    donor = torch.where(valid, own, donor)
    rank = (torch.cumsum(valid.to(torch.int64), 1) - 1).gather(1, donor)
    result = []
    for index, flags in enumerate(is_noise):
        count = len(flags)
        local = rank[index, :count] if bool(valid[index].any()) else torch.full((count,), -1, device=keys.device)
        result.append(local.to(torch.int32).cpu().numpy())
    return result


def segment_masks(segment_maps: Tensor, num_segments: Tensor) -> tuple[Tensor, Tensor]:
    """One boolean patch mask per segment, for all images of a batch at once.

    Args:
        segment_maps: B x h x w segment ids, 0..S_b-1 per image (other values, such as -1
            for noise, belong to no mask).
        num_segments: B segment counts S_b.

    Returns:
        ``(masks, image_index)``: sum(S_b) x h x w masks, in image order then segment id, and
        the image each mask belongs to.
    """
    image_index = torch.repeat_interleave(torch.arange(len(num_segments), device=segment_maps.device), num_segments)
    offsets = torch.cumsum(num_segments, 0) - num_segments
    local_id = torch.arange(len(image_index), device=segment_maps.device) - offsets[image_index]
    masks = segment_maps[image_index] == local_id[:, None, None]
    return masks, image_index


def mask_boxes(masks: Tensor) -> Tensor:
    """Tight bounding boxes (x0, y0, x1, y1), end-exclusive, of S x h x w non-empty masks."""
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    height, width = masks.shape[1:]
    y0 = rows.float().argmax(dim=1)
    y1 = height - rows.flip(1).float().argmax(dim=1)
    x0 = cols.float().argmax(dim=1)
    x1 = width - cols.flip(1).float().argmax(dim=1)
    return torch.stack([x0, y0, x1, y1], dim=1)


PAPER_CENTRE_FRACTION = 224 / 256
"""The paper's crops resize the box's shorter side to 256 and keep the centred 224 square."""


def crop_regions(boxes: Tensor, recipe: CropRecipe) -> Tensor:
    """The image region each segment's crop samples, in pixels, as float (x0, y0, x1, y1).

    ``paper``: the original recipe, resize the box's shorter side to 256 then take a centred
    224 square: a centred square of side ``short * 224 / 256``, whatever size the crop is then
    sampled at. It cuts off the ends of elongated segments.
    ``fit``: the smallest centred square that holds the whole box (zero padding where it leaves
    the image), so nothing of the segment is lost and its aspect ratio is kept.
    """
    boxes = boxes.float()
    centre_x, centre_y = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    box_width, box_height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    if recipe == "paper":
        side = torch.minimum(box_width, box_height) * PAPER_CENTRE_FRACTION
    elif recipe == "fit":
        side = torch.maximum(box_width, box_height)
    else:
        raise ValueError(f"--model.crop_recipe must be 'fit' or 'paper', got {recipe!r}")
    half = side / 2
    return torch.stack([centre_x - half, centre_y - half, centre_x + half, centre_y + half], dim=1)


def masked_crops(
    images: Tensor,
    masks: Tensor,
    image_index: Tensor,
    patch_size: int,
    recipe: CropRecipe,
    output_size: int,
) -> Tensor:
    """Stage 5 crops: each segment alone on black, cropped around it and resized.

    Args:
        images: B x 3 x H x W images in [0, 1] (not normalised, so black is 0 and the zero
            padding of ``roi_align`` outside the image is black too).
        masks: S x h x w patch masks.
        image_index: S image indices into ``images``.
        patch_size: pixels per patch side.
        recipe: see :func:`crop_regions`.
        output_size: side of the square crops.

    Returns:
        S x 3 x output_size x output_size crops in [0, 1].
    """
    pixel_masks = masks.repeat_interleave(patch_size, dim=1).repeat_interleave(patch_size, dim=2)
    segments_alone = images[image_index] * pixel_masks[:, None].to(images.dtype)
    regions = crop_regions(mask_boxes(masks) * patch_size, recipe)
    rois = torch.cat([torch.arange(len(regions), device=regions.device, dtype=regions.dtype)[:, None], regions], 1)
    return roi_align(
        segments_alone, rois.to(segments_alone.dtype), output_size=output_size, sampling_ratio=-1, aligned=True
    )


def packed_attention_mask(segment_ids: Tensor, num_segments: Tensor, slots: int) -> Tensor:
    """Block-diagonal attention for packed segment embedding.

    The packed sequence of image b is ``slots`` CLS tokens (one per segment, unused slots are
    padding) followed by its N patch tokens. A token may attend to a token of its own segment
    only, so every segment's CLS sees exactly what it would see if the segment were alone.
    Padding slots attend to themselves (a row with no allowed entry would give NaN).

    Args:
        segment_ids: B x N segment id of every patch.
        num_segments: B segment counts.
        slots: CLS slots per image (>= max segment count).

    Returns:
        B x 1 x T x T boolean mask (True = may attend), T = slots + N.
    """
    batch = segment_ids.shape[0]
    slot_ids = torch.arange(slots, device=segment_ids.device).expand(batch, slots)
    slot_ids = torch.where(slot_ids < num_segments[:, None], slot_ids, -1)
    token_ids = torch.cat([slot_ids, segment_ids], dim=1)
    allowed = (token_ids[:, :, None] == token_ids[:, None, :]) & (token_ids[:, :, None] >= 0)
    allowed |= torch.eye(token_ids.shape[1], dtype=torch.bool, device=segment_ids.device)
    return allowed[:, None]
