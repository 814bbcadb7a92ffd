"""How many segment partitions change when the backbone runs under bf16/fp16 autocast.

The affinity and its sign threshold are always fp32; the keys themselves come out of a
reduced-precision network, so a few edges of the patch graph can flip. This script runs stages
1-4 on the same images in fp32 and in each reduced precision and reports, per precision, the
number of images whose partition differs (up to relabelling), the mean adjusted Rand index of
the segment maps, and the fraction of graph edges that flipped.

    python scripts/precision_agreement.py --weights /path/dino_deitsmall16_pretrain.pth
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

from datus.datamodules.images import ImageDataset, list_images
from datus.discovery.backbones import LastBlockKeys, create_backbone, normalization_of, patch_size_of
from datus.discovery.communities import discover_segments
from datus.discovery.ops import key_adjacency, pack_adjacency

SUIM_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "suim-sample" / "train_val" / "images"
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


def adjacency_and_segments(
    model: torch.nn.Module, keys_hook: LastBlockKeys, images: torch.Tensor, dtype: torch.dtype | None, grid: tuple[int, int]
) -> tuple[torch.Tensor, list[np.ndarray]]:
    with torch.inference_mode(), torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        with keys_hook.capture():
            model.forward_features(images)
        keys, _ = keys_hook.keys_and_attention()
        adjacency = key_adjacency(keys)
    segments = [discover_segments(packed, grid, 1.0, 5).segment_map for packed in pack_adjacency(adjacency)]
    return adjacency, segments


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=SUIM_IMAGES)
    parser.add_argument("--backbone", default="vit_small_patch16_224.dino")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    options = parser.parse_args(argv)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, source = create_backbone(options.backbone, options.weights)
    model = model.to(options.device)
    keys_hook = LastBlockKeys(model)
    patch = patch_size_of(model)
    grid = (options.image_size // patch, options.image_size // patch)
    mean, std = normalization_of(options.backbone)
    dataset = ImageDataset(list_images(options.images), options.image_size, mean, std, patch)
    counts = {name: {"changed": 0, "ari": [], "flipped_edges": 0} for name in PRECISIONS}
    total_edges = 0
    for start in range(0, len(dataset), options.batch_size):
        items = [dataset[i] for i in range(start, min(start + options.batch_size, len(dataset)))]
        images = torch.stack([item["image"] for item in items]).to(options.device)
        reference_adjacency, reference = adjacency_and_segments(model, keys_hook, images, None, grid)
        total_edges += reference_adjacency.numel()
        for name, dtype in PRECISIONS.items():
            adjacency, segments = adjacency_and_segments(model, keys_hook, images, dtype, grid)
            counts[name]["flipped_edges"] += int((adjacency != reference_adjacency).sum())
            for a, b in zip(reference, segments):
                ari = adjusted_rand_score(a.ravel(), b.ravel())
                counts[name]["ari"].append(ari)
                counts[name]["changed"] += int(ari < 1.0)
    result = {
        "backbone": options.backbone,
        "weights": source,
        "device": options.device,
        "images": len(dataset),
        **{
            name: {
                "partitions_changed": value["changed"],
                "mean_ari_vs_fp32": round(float(np.mean(value["ari"])), 4),
                "flipped_edge_fraction": value["flipped_edges"] / total_edges,
            }
            for name, value in counts.items()
        },
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
