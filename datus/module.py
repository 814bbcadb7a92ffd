"""The predict-only LightningModule: stages 1-5 of DatUS on batches of images.

``predict_step`` computes and returns compact per-image records; it writes nothing (the
prediction writer does file I/O) and runs no collective (DDP ranks may see different numbers
of batches in predict).
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from datus.backbones import (
    DEFAULT_WEIGHTS,
    LastBlockKeys,
    build_backbone,
    load_frozen_weights,
    normalization_of,
    patch_size_of,
)
from datus.communities import CommunityPool, SegmentPartition
from datus.ops import CropRecipe, key_adjacency, masked_crops, pack_adjacency, packed_attention_mask, segment_masks

log = logging.getLogger(__name__)

def _available_cores() -> int:
    """Cores this process may run on (the affinity mask, which container limits also set)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


PAPER_PRESET: dict[str, Any] = {"image_size": 224, "min_patches": 5, "crop_recipe": "paper", "resolution": 1.0}
"""The original DatUS choices; the paper also used patch size 8 (checked, not overridden)."""


@dataclass
class ImageRecord:
    """Everything later stages need about one image; small enough to stream to disk."""

    image_id: str
    image_path: str
    mask_path: str
    orig_size: tuple[int, int]
    segment_map: np.ndarray  # h x w int32 segment ids
    sizes: np.ndarray  # S int32 patch counts
    is_noise: np.ndarray  # S bool
    embeddings: np.ndarray  # S x D float16, L2-normalised segment CLS tokens (crop or packed)
    cls_attention: np.ndarray  # h x w float16, last-block CLS attention (for pictures)


@dataclass
class PredictionBatch:
    """What ``predict_step`` hands the writer: records plus the files the loader could not read."""

    records: list[ImageRecord]
    skipped: list[dict[str, str]]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    backbone_passes: int = 0  # images (+ crops) through the ViT: the benchmark's yardstick count


class StageTimer:
    """Wall-clock seconds per pipeline stage, synchronising the device so numbers are honest."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self._last = time.perf_counter()

    def restart(self) -> None:
        """Start timing afresh: what happened since the last lap belongs to no stage."""
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[stage] += now - self._last
        self._last = now


@dataclass
class PendingBatch:
    """A batch whose keys are computed and whose Louvain jobs are running in the workers."""

    batch: dict[str, Any]
    timer: StageTimer
    cls_attention: Tensor | None = None
    futures: list[Future[SegmentPartition]] = field(default_factory=list)


class DatusModule(L.LightningModule):
    """Frozen ViT segment discovery and segment embedding (DatUS stages 1-5).

    Args:
        backbone: timm ViT name (``vit_small_patch8_224.dino``, ``vit_base_patch8_224.dino``,
            ``vit_small_patch14_dinov2.lvd142m``, ...).
        weights: ``pretrained`` (official DINO file, else timm's source), a local checkpoint
            path, or ``random`` (untrained; smoke tests only, announced loudly).
        image_size: side of the square model input; must be a multiple of the patch size.
        min_patches: segments of at most this many patches are noise (tau; paper: 5).
        resolution: Louvain resolution (paper: 1.0; higher gives more, smaller segments).
        embedding: ``crop`` (the paper: one backbone pass per segment crop) or ``packed``
            (one pass per image: each segment's own CLS token attends only to its patch
            tokens, through a block-diagonal attention mask; far faster, no resizing).
        crop_recipe: ``fit`` keeps the whole segment (square around its box, padded) or
            ``paper`` (shorter side to 256, centre crop 224: cuts elongated segments).
        crop_batch_size: segment crops per backbone forward pass (bounds device memory).
        louvain_workers: CPU processes for Louvain; 0 runs it in the main process. ``auto``:
            none when the backbone runs on the CPU (workers would only take cores from its
            threads: 1.8x slower end to end on 2 cores, measured), else half the cores
            available to this rank.
        preset: ``paper`` sets image size 224, tau 5, paper crops, resolution 1 (and requires
            a patch-8 backbone), overriding the values above.
        backbone_kwargs: extra ``timm.create_model`` arguments (e.g. ``depth`` for tiny test
            networks).
    """

    def __init__(
        self,
        backbone: str = "vit_small_patch8_224.dino",
        weights: str = DEFAULT_WEIGHTS,
        image_size: int = 224,
        min_patches: int = 5,
        resolution: float = 1.0,
        embedding: Literal["crop", "packed"] = "crop",
        crop_recipe: CropRecipe = "fit",
        crop_batch_size: int = 64,
        louvain_workers: int | Literal["auto"] = "auto",
        preset: Literal["paper"] | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if preset == "paper":
            image_size, min_patches = PAPER_PRESET["image_size"], PAPER_PRESET["min_patches"]
            crop_recipe, resolution = PAPER_PRESET["crop_recipe"], PAPER_PRESET["resolution"]
        if min_patches < 0:
            raise ValueError(f"--model.min_patches must be >= 0, got {min_patches}")
        if resolution <= 0:
            raise ValueError(f"--model.resolution must be > 0, got {resolution}")
        if crop_batch_size < 1:
            raise ValueError(f"--model.crop_batch_size must be >= 1, got {crop_batch_size}")
        if louvain_workers != "auto" and louvain_workers < 0:
            raise ValueError(f"--model.louvain_workers must be 'auto' or >= 0, got {louvain_workers}")
        self.save_hyperparameters()
        self.backbone_name = backbone
        self.weights = weights
        self.image_size = image_size
        self.min_patches = min_patches
        self.resolution = resolution
        self.embedding = embedding
        self.crop_recipe: CropRecipe = crop_recipe
        self.crop_batch_size = crop_batch_size
        self.louvain_workers = louvain_workers
        self.backbone = build_backbone(backbone, **(backbone_kwargs or {}))  # weights last, after every check
        self.patch_size = patch_size_of(self.backbone)
        if preset == "paper" and self.patch_size != 8:
            raise ValueError(
                f"--model.preset paper uses patch size 8; {backbone} has patch size {self.patch_size}. "
                "Use a patch-8 backbone (e.g. vit_base_patch8_224.dino) or drop the preset."
            )
        if image_size % self.patch_size:
            raise ValueError(
                f"--model.image_size {image_size} is not a multiple of the patch size {self.patch_size} of "
                f"{backbone}; use e.g. {image_size // self.patch_size * self.patch_size or self.patch_size}."
            )
        self.grid = (image_size // self.patch_size, image_size // self.patch_size)
        mean, std = normalization_of(backbone)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        if embedding == "packed" and getattr(self.backbone, "num_prefix_tokens", 1) != 1:
            raise ValueError(
                f"--model.embedding packed needs a backbone with a CLS token and no register tokens; {backbone} "
                f"has {self.backbone.num_prefix_tokens} prefix tokens. Use --model.embedding crop."
            )
        self.weights_source = load_frozen_weights(self.backbone, backbone, weights)
        self.keys = LastBlockKeys(self.backbone)
        self._pool: CommunityPool | None = None
        self._pending: PendingBatch | None = None

    @property
    def embedding_dim(self) -> int:
        return int(self.backbone.num_features)

    def describe(self) -> dict[str, Any]:
        """Settings that decide the records: a resumed run must match them exactly."""
        return {
            "backbone": self.backbone_name,
            "weights": self.weights_source,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "min_patches": self.min_patches,
            "resolution": self.resolution,
            "embedding": self.embedding,
            "crop_recipe": self.crop_recipe if self.embedding == "crop" else None,
            "embedding_dim": self.embedding_dim,
        }

    def louvain_worker_count(self) -> int:
        """Resolve ``louvain_workers``; ``auto`` depends on where the backbone runs."""
        if self.louvain_workers != "auto":
            return self.louvain_workers
        device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        if device.type == "cpu":
            return 0
        processes_on_node = self.trainer.num_devices if self._trainer is not None else 1
        return max(1, _available_cores() // processes_on_node // 2)

    def setup(self, stage: str) -> None:
        """Start the Louvain workers early: their start-up overlaps the data loader's."""
        if self._pool is None:
            workers = self.louvain_worker_count()
            log.info("Louvain runs in %s", f"{workers} worker processes" if workers else "the main process")
            self._pool = CommunityPool(workers, self.resolution, self.min_patches)

    def on_predict_end(self) -> None:
        self._pending = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def teardown(self, stage: str) -> None:
        self.on_predict_end()

    def embed_segments(self, images: Tensor, partitions: list[SegmentPartition], timer: StageTimer | None = None) -> Tensor:
        """Stage 5 with the configured embedding mode; sum(S_b) x D, image order then segment id."""
        if self.embedding == "packed":
            embeddings = self.embed_segments_packed(images, partitions)
            if timer is not None:
                timer.lap("packed_embeddings")
            return embeddings
        return self.embed_segments_cropped(images, partitions, timer)

    def embed_segments_packed(self, images: Tensor, partitions: list[SegmentPartition]) -> Tensor:
        """One backbone pass per image; each segment's CLS token sees only its own patches.

        Tokens are the image's patch embeddings with their positional embeddings, preceded by
        one copy of the (position-embedded) CLS token per segment.
        """
        model = self.backbone
        counts = torch.tensor([len(p.sizes) for p in partitions], device=images.device)
        segment_ids = torch.from_numpy(np.stack([p.segment_map.ravel() for p in partitions])).to(images.device)
        slots = int(counts.max())
        tokens = model._pos_embed(model.patch_embed(images))
        cls, patches = tokens[:, :1], tokens[:, 1:]
        packed = torch.cat([cls.expand(-1, slots, -1), patches], dim=1)
        mask = packed_attention_mask(segment_ids.long(), counts, slots)
        packed = model.norm_pre(packed)
        for block in model.blocks:
            packed = block(packed, attn_mask=mask)
        cls_out = model.norm(packed)[:, :slots]
        valid = torch.arange(slots, device=images.device)[None, :] < counts[:, None]
        return F.normalize(cls_out[valid].float(), dim=-1)

    def embed_segments_cropped(
        self, images: Tensor, partitions: list[SegmentPartition], timer: StageTimer | None = None
    ) -> Tensor:
        """Stage 5 as in the paper: L2-normalised CLS embedding of every segment's masked crop.

        Args:
            images: B x 3 x H x W normalised images.
            partitions: one per image.

        Returns:
            sum(S_b) x D embeddings, in image order then segment id.
        """
        segment_maps = torch.from_numpy(np.stack([p.segment_map for p in partitions])).to(images.device)
        counts = torch.tensor([len(p.sizes) for p in partitions], device=images.device)
        masks, image_index = segment_masks(segment_maps, counts)
        pixels = images * self.std + self.mean
        embeddings = []
        for start in range(0, len(masks), self.crop_batch_size):
            chunk = slice(start, start + self.crop_batch_size)
            crops = masked_crops(
                pixels, masks[chunk], image_index[chunk], self.patch_size, self.crop_recipe, self.image_size
            )
            if timer is not None:
                timer.lap("crops")
            features = self.backbone.forward_features((crops - self.mean) / self.std)
            embeddings.append(F.normalize(features[:, 0].float(), dim=-1))
            if timer is not None:
                timer.lap("crop_embeddings")
        return torch.cat(embeddings)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> PredictionBatch:
        """Start this batch (stages 1-2, Louvain submitted) and finish the previous one (3-5).

        The one-batch lag lets the CPU workers run Louvain on batch i while the device embeds
        the segments of batch i-1. The last batch is finished by :meth:`finish_pending`, which
        the writer calls at the end of the epoch.
        """
        if self._pool is None:
            self.setup("predict")
        started = self._start_batch(batch)
        previous, self._pending = self._pending, started
        if previous is None:
            return PredictionBatch(records=[], skipped=[])
        return self._finish_batch(previous)

    def finish_pending(self) -> PredictionBatch | None:
        """Finish the batch still waiting for its Louvain results, if any."""
        previous, self._pending = self._pending, None
        return self._finish_batch(previous) if previous is not None else None

    def _start_batch(self, batch: dict[str, Any]) -> PendingBatch:
        timer = StageTimer(self.device)
        pending = PendingBatch(batch=batch, timer=timer)
        if "image" not in batch:  # every file of the batch was unreadable
            return pending
        assert self._pool is not None
        with self.keys.capture():
            self.backbone.forward_features(batch["image"])
        keys, pending.cls_attention = self.keys.keys_and_attention()
        timer.lap("backbone_forward")
        adjacency = list(pack_adjacency(key_adjacency(keys)))
        timer.lap("affinity")
        pending.futures = self._pool.submit(adjacency, self.grid)
        timer.lap("louvain_and_components_wait")  # all of it without workers, else just the hand-over
        return pending

    def _finish_batch(self, pending: PendingBatch) -> PredictionBatch:
        batch, timer = pending.batch, pending.timer
        skipped = batch.get("skipped", [])
        if pending.cls_attention is None:
            return PredictionBatch(records=[], skipped=skipped)
        timer.restart()
        partitions = [future.result() for future in pending.futures]
        timer.lap("louvain_and_components_wait")
        timer.seconds["louvain_cpu"] += sum(p.cpu_seconds[0] for p in partitions)
        timer.seconds["components_cpu"] += sum(p.cpu_seconds[1] for p in partitions)
        images: Tensor = batch["image"]
        embeddings = self.embed_segments(images, partitions, timer).to(torch.float16).cpu().numpy()
        timer.lap("embedding_transfer")
        attention = pending.cls_attention.reshape(-1, *self.grid).to(torch.float16).cpu().numpy()
        records, offset = [], 0
        for index, partition in enumerate(partitions):
            count = len(partition.sizes)
            height, width = batch["orig_size"][index].tolist()
            records.append(
                ImageRecord(
                    image_id=batch["image_id"][index],
                    image_path=batch["image_path"][index],
                    mask_path=batch["mask_path"][index],
                    orig_size=(int(height), int(width)),
                    segment_map=partition.segment_map,
                    sizes=partition.sizes,
                    is_noise=partition.is_noise,
                    embeddings=embeddings[offset : offset + count],
                    cls_attention=attention[index],
                )
            )
            offset += count
        passes = len(images) + (len(embeddings) if self.embedding == "crop" else len(images))
        return PredictionBatch(records, skipped, dict(timer.seconds), backbone_passes=passes)
