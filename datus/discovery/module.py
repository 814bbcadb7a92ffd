"""The predict-only LightningModule: stages 1-5 of DatUS on batches of images.

``predict_step`` computes and returns compact per-image records; it writes nothing (the
prediction writer does file I/O) and runs no collective (DDP ranks may see different numbers
of batches in predict).

Only valid segments are embedded, by the discovery backbone again (the default) or by a
separate segment embedder (any timm model, e.g. the MoCo v2 ResNet-50 of the original DatUS
code). Noise segments (at most tau patches) take the label of a donor chosen from what the
discovery pass already computed: the valid segment of the same image whose mean key is most
similar to theirs (the same keys whose products built the patch graph, so "most similar"
means what the graph means by similar).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datus.discovery.backbones import (
    DEFAULT_WEIGHTS,
    EMBEDDER,
    LastBlockKeys,
    build_backbone,
    build_embedder,
    describe_weights,
    embedder_input_of,
    embedding_dim_of,
    load_frozen_weights,
    normalization_of,
    patch_size_of,
    pooled_output,
)
from datus.discovery.communities import CommunityPool, LouvainEngine, SegmentPartition, early_worker_waiting
from datus.discovery.embedding import CropSettings, embed_crops, embed_packed
from datus.core.errors import ConfigurationError
from datus.discovery.ops import (
    CropRecipe,
    donor_segments,
    key_adjacency,
    pack_adjacency,
    segment_masks,
    valid_segment_maps,
)
from datus.runfolder.records import UNKNOWN_MARK, ImageRecord, PredictionBatch
from datus.core.workers import available_cores, louvain_workers_for

log = logging.getLogger(__name__)


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
    images: Tensor | None = None
    keys: Tensor | None = None
    cls_attention: Tensor | None = None
    image_embeddings: Tensor | None = None
    futures: list[Future[SegmentPartition]] = field(default_factory=list)


def quiet_lightning() -> None:
    """Keep Lightning's start-up chatter (accelerator inventory, seeding, "Tip" adverts) and one
    deprecation warning of its own internals off the console, for the CLI and the Python API alike.

    datus states the facts that matter itself, once (device and precision, weights, resume). To
    have Lightning's lines back: ``logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.INFO)``.
    """
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


class DatusModule(L.LightningModule):
    """Frozen ViT segment discovery and segment embedding (DatUS stages 1-5).

    Args:
        backbone: timm ViT name (``vit_small_patch8_224.dino``, ``vit_base_patch8_224.dino``,
            ``vit_small_patch14_dinov2.lvd142m``, ...).
        weights: ``pretrained`` (official DINO file, else timm's source), a local checkpoint
            path, or ``random`` (untrained; smoke tests only, announced loudly).
        embedder: timm name of a separate segment embedder (any architecture; ``resnet50``
            with the MoCo v2 file reproduces the original DatUS code), or None to embed with
            the discovery backbone. Its crops have its own default input size and are
            normalised with its own mean and std; a ViT gives its CLS token, another network
            its globally pooled feature.
        embedder_weights: the embedder's weights, resolved like ``weights`` (MoCo v1/v2
            training checkpoints too); only with ``embedder``.
        image_size: side of the square model input; must be a multiple of the patch size.
        min_patches: segments of at most this many patches are noise (tau; paper: 5).
        resolution: Louvain resolution (paper: 1.0; higher gives more, smaller segments).
        louvain: ``fast`` (datus's engine, same partitions as scikit-network's at a fraction
            of its cost) or ``sknetwork`` (scikit-network itself, the reference).
        embedding: ``crop`` (the paper: one embedding pass per valid segment's crop) or
            ``packed`` (one backbone pass per image: each valid segment's own CLS token attends
            only to its patch tokens, through a block-diagonal attention mask; no resizing; needs
            the discovery backbone as embedder).
        crop_recipe: ``fit`` keeps the whole segment (square around its box, padded) or
            ``paper`` (shorter side to 256, centre crop 224: cuts elongated segments).
        crop_batch_size: segment crops per embedding forward pass (bounds device memory).
        louvain_workers: CPU processes for Louvain; 0 runs it in the main process. ``auto``:
            beside an accelerator as many as keep up with it, measured on the first batch; on
            a CPU run (Louvain costs about a millisecond an image) the worker the ``datus``
            command started during its imports, else the main process.
        backbone_kwargs: extra ``timm.create_model`` arguments (e.g. ``depth`` for tiny test
            networks).
    """

    def __init__(
        self,
        backbone: str = "vit_small_patch8_224.dino",
        weights: str = DEFAULT_WEIGHTS,
        embedder: str | None = None,
        embedder_weights: str = DEFAULT_WEIGHTS,
        image_size: int = 224,
        min_patches: int = 5,
        resolution: float = 1.0,
        louvain: LouvainEngine = "fast",
        embedding: Literal["crop", "packed"] = "crop",
        crop_recipe: CropRecipe = "fit",
        crop_batch_size: int = 64,
        louvain_workers: int | Literal["auto"] = "auto",
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        quiet_lightning()
        if image_size < 1:
            raise ConfigurationError(f"--model.image_size must be >= 1, got {image_size}")
        if min_patches < 0:
            raise ConfigurationError(f"--model.min_patches must be >= 0, got {min_patches}")
        if resolution <= 0:
            raise ConfigurationError(f"--model.resolution must be > 0, got {resolution}")
        if crop_batch_size < 1:
            raise ConfigurationError(f"--model.crop_batch_size must be >= 1, got {crop_batch_size}")
        if louvain_workers != "auto" and louvain_workers < 0:
            raise ConfigurationError(f"--model.louvain_workers must be 'auto' or >= 0, got {louvain_workers}")
        if embedder is None and embedder_weights != DEFAULT_WEIGHTS:
            raise ConfigurationError(
                f"--model.embedder_weights {embedder_weights} needs --model.embedder NAME; without one, segments "
                "are embedded by the backbone with --model.weights."
            )
        if embedder is not None and embedding == "packed":
            raise ConfigurationError(
                f"--model.embedding packed embeds with the discovery backbone itself, not --model.embedder {embedder}; "
                "drop --model.embedder or use --model.embedding crop."
            )
        self.save_hyperparameters()
        self.backbone_name = backbone
        self.image_size = image_size
        self.min_patches = min_patches
        self.resolution = resolution
        self.louvain = louvain
        self.embedding = embedding
        self.crop_recipe: CropRecipe = crop_recipe
        self.crop_batch_size = crop_batch_size
        self.louvain_workers = louvain_workers
        self.backbone = build_backbone(backbone, weights, **(backbone_kwargs or {}))  # weights last, after every check
        self.embedder_name = embedder
        self.embedder: nn.Module | None = build_embedder(embedder, embedder_weights) if embedder is not None else None
        self.patch_size = patch_size_of(self.backbone)
        if image_size % self.patch_size:
            raise ConfigurationError(
                f"--model.image_size {image_size} is not a multiple of the patch size {self.patch_size} of "
                f"{backbone}; use e.g. {image_size // self.patch_size * self.patch_size or self.patch_size}."
            )
        if embedding == "packed" and getattr(self.backbone, "num_prefix_tokens", 1) != 1:
            raise ConfigurationError(
                f"--model.embedding packed needs a backbone with a CLS token and no register tokens; {backbone} "
                f"has {self.backbone.num_prefix_tokens} prefix tokens. Use --model.embedding crop."
            )
        self.grid = (image_size // self.patch_size, image_size // self.patch_size)
        mean, std = normalization_of(backbone)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.crop_size, embed_mean, embed_std = (
            (image_size, mean, std) if self.embedder is None else embedder_input_of(self.embedder)
        )
        self.register_buffer("embed_mean", torch.tensor(embed_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("embed_std", torch.tensor(embed_std).view(1, 3, 1, 1), persistent=False)
        self.weights_source = describe_weights(backbone, weights)
        self.embedder_weights_source = describe_weights(embedder, embedder_weights) if embedder is not None else None
        load_frozen_weights(self.backbone, backbone, weights)
        if self.embedder is not None:
            load_frozen_weights(self.embedder, embedder, embedder_weights, EMBEDDER)
        self.keys = LastBlockKeys(self.backbone)
        self._pool: CommunityPool | None = None
        self._pending: PendingBatch | None = None
        self._calibrate_workers = False

    @property
    def segment_embedder(self) -> nn.Module:
        """The network that embeds segments: the separate embedder, else the discovery backbone."""
        return self.backbone if self.embedder is None else self.embedder

    @property
    def embedding_dim(self) -> int:
        return embedding_dim_of(self.segment_embedder)

    def describe(self) -> dict[str, Any]:
        """Settings that decide the records: a resumed run must match them exactly."""
        return {
            "backbone": self.backbone_name,
            "weights": self.weights_source,
            "embedder": self.embedder_name,
            "embedder_weights": self.embedder_weights_source,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "min_patches": self.min_patches,
            "resolution": self.resolution,
            "embedding": self.embedding,
            "crop_recipe": self.crop_recipe if self.embedding == "crop" else None,
            "embedding_dim": self.embedding_dim,
        }

    def _root_device(self) -> torch.device:
        """Where the backbone runs: the trainer's device once attached, else the module's."""
        return self.trainer.strategy.root_device if self._trainer is not None else self.device

    def setup(self, stage: str) -> None:
        """Start the Louvain workers early: their start-up overlaps the data loader's."""
        if self._pool is not None:
            return
        workers = self.louvain_workers if self.louvain_workers != "auto" else int(early_worker_waiting())
        device = self._root_device()
        self._calibrate_workers = self.louvain_workers == "auto" and device.type != "cpu"
        self._pool = CommunityPool(workers, self.resolution, self.min_patches, self.louvain)
        precision = self.trainer.precision if self._trainer is not None else "32-true"
        where = f"{workers} worker process{'es' if workers > 1 else ''}" if workers else "the main process"
        if self._calibrate_workers:
            where += ", more if the first batch shows the need"
        embedder = f", segments embedded by {self.embedder_name}" if self.embedder_name is not None else ""
        log.info(
            "%s on %s (%s)%s; Louvain (%s) in %s", self.backbone_name, device, precision, embedder, self.louvain, where
        )

    def on_predict_end(self) -> None:
        self._pending = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def teardown(self, stage: str) -> None:
        self.on_predict_end()

    def normalise(self, images: Tensor) -> Tensor:
        """uint8 (or [0, 1] float) images to the backbone's normalised input, on the device."""
        pixels = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        return (pixels - self.mean) / self.std

    def embed_segments(self, images: Tensor, partitions: list[SegmentPartition], timer: StageTimer | None = None) -> Tensor:
        """Stage 5 for the valid segments of a batch; sum(V_b) x D, image order then segment id.

        ``packed``: :func:`datus.discovery.embedding.embed_packed`; ``crop`` (the paper): each valid segment's
        masked crop through the segment embedder (:func:`datus.discovery.embedding.embed_crops`).
        """
        valid_maps = torch.from_numpy(np.stack([valid_segment_maps(p.segment_map, p.is_noise) for p in partitions]))
        valid_maps = valid_maps.to(images.device)
        counts = torch.tensor([int((~p.is_noise).sum()) for p in partitions], device=images.device)
        if int(counts.sum()) == 0:
            return torch.zeros((0, self.embedding_dim), device=images.device)
        if self.embedding == "packed":
            embeddings = embed_packed(self.backbone, images, valid_maps.flatten(1), counts)
            if timer is not None:
                timer.lap("packed_embeddings")
            return embeddings
        masks, image_index = segment_masks(valid_maps, counts)
        return self._embed_crops(images, masks, image_index, self.crop_recipe, timer)

    def embed_whole_images(self, images: Tensor) -> Tensor:
        """The separate embedder's embedding of each whole image, for images with no valid segment.

        The image is treated as one segment covering it, cropped with ``fit`` (the whole image).
        It must live in the segments' embedding space, which the discovery CLS token does not
        when another network embeds the segments.
        """
        masks = torch.ones((len(images), *self.grid), dtype=torch.bool, device=images.device)
        return self._embed_crops(images, masks, torch.arange(len(images), device=images.device), "fit")

    def _embed_crops(
        self, images: Tensor, masks: Tensor, image_index: Tensor, recipe: CropRecipe, timer: StageTimer | None = None
    ) -> Tensor:
        """:func:`datus.discovery.embedding.embed_crops` with this module's embedder, crop settings and normalisation."""
        crops = CropSettings(self.patch_size, recipe, self.crop_size, self.crop_batch_size)
        return embed_crops(self.segment_embedder, images * self.std + self.mean, masks, image_index, crops,
                           (self.embed_mean, self.embed_std), timer.lap if timer is not None else None)  # fmt: skip

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
        pending.images = self.normalise(batch["image"])
        with self.keys.capture():
            features = pooled_output(self.backbone, pending.images)
        pending.keys, pending.cls_attention = self.keys.keys_and_attention()
        if self.embedder is None:
            pending.image_embeddings = F.normalize(features.float(), dim=-1)
            timer.lap("backbone_forward")
        else:
            timer.lap("backbone_forward")
            pending.image_embeddings = self.embed_whole_images(pending.images)
            timer.lap("image_embeddings")
        adjacency = list(pack_adjacency(key_adjacency(pending.keys)))
        timer.lap("affinity")
        pending.futures = self._pool.submit(adjacency, self.grid)
        timer.lap("louvain_and_components_wait")  # all of it without workers, else just the hand-over
        return pending

    def _finish_batch(self, pending: PendingBatch) -> PredictionBatch:
        batch, timer = pending.batch, pending.timer
        skipped = batch.get("skipped", [])
        if pending.images is None or pending.keys is None:
            return PredictionBatch(records=[], skipped=skipped)
        timer.restart()
        partitions = [future.result() for future in pending.futures]
        timer.lap("louvain_and_components_wait")
        timer.seconds["louvain_cpu"] += sum(p.cpu_seconds[0] for p in partitions)
        timer.seconds["components_cpu"] += sum(p.cpu_seconds[1] for p in partitions)
        if self._calibrate_workers:
            self._size_worker_pool(timer.seconds["louvain_cpu"] + timer.seconds["components_cpu"], timer)
        segment_maps = torch.from_numpy(np.stack([p.segment_map for p in partitions])).to(self.device)
        is_noise = [torch.from_numpy(p.is_noise).to(self.device) for p in partitions]
        donors = donor_segments(pending.keys, segment_maps.flatten(1), is_noise)
        timer.lap("noise_donors")
        embeddings = self.embed_segments(pending.images, partitions, timer).to(torch.float16).cpu().numpy()
        timer.lap("embedding_transfer")
        attention = pending.cls_attention.reshape(-1, *self.grid).to(torch.float16).cpu().numpy()
        image_embeddings = pending.image_embeddings.to(torch.float16).cpu().numpy()
        records, offset = [], 0
        for index, partition in enumerate(partitions):
            count = int((~partition.is_noise).sum())
            height, width = batch["orig_size"][index].tolist()
            records.append(
                ImageRecord(
                    image_id=batch["image_id"][index],
                    image_path=batch["image_path"][index],
                    mask_path=batch["mask_path"][index],
                    orig_size=(int(height), int(width)),
                    image_mark=image_mark_of(batch, index),
                    segment_map=partition.segment_map,
                    sizes=partition.sizes,
                    is_noise=partition.is_noise,
                    donors=donors[index],
                    embeddings=embeddings[offset : offset + count],
                    image_embedding=image_embeddings[index],
                    cls_attention=attention[index],
                    modularity=partition.modularity,
                )
            )
            offset += count
        embedding_passes = len(embeddings) if self.embedding == "crop" else sum(bool(r.num_valid) for r in records)
        image_passes = len(partitions) * (1 if self.embedder is None else 2)
        passes = image_passes + embedding_passes
        return PredictionBatch(records, skipped, dict(timer.seconds), backbone_passes=passes)

    def _size_worker_pool(self, louvain_seconds: float, timer: StageTimer) -> None:
        """Beside an accelerator, start as many Louvain workers as the first batch showed are needed."""
        self._calibrate_workers = False
        workers = louvain_workers_for(louvain_seconds, timer.seconds["backbone_forward"], available_cores())
        log.info(
            "Louvain: %.1f ms of CPU per batch against %.1f ms of backbone: %d worker processes",
            1000 * louvain_seconds, 1000 * timer.seconds["backbone_forward"], workers,
        )
        assert self._pool is not None
        if workers == self._pool.num_workers:
            return
        previous, self._pool = self._pool, CommunityPool(workers, self.resolution, self.min_patches, self.louvain)
        previous.close(cancel_pending=False)  # the batch started last is still in its hands


def image_mark_of(batch: dict[str, Any], index: int) -> tuple[int, int]:
    """(size, modification time in ns) of the batch's image ``index`` when the loader recorded it, else unknown."""
    if "image_mark" not in batch:
        return UNKNOWN_MARK
    size, mtime = batch["image_mark"][index].tolist()
    return int(size), int(mtime)
