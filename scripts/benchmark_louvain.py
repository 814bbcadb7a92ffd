"""Louvain engines side by side: scikit-network as datus called it, and ``datus.discovery.louvain``.

Both run in this one process on the same patch graphs, ``A = (k k^T) > 0`` from the last-block
keys of a ViT over the SUIM sample, at 196 nodes (patch 16) and 784 nodes (patch 8). For each
graph it reports the CPU time of each engine (``time.process_time``, median of ``--repeat``
runs, after a warm-up; numba's compile is timed separately, in a fresh cache) and whether the
two partitions agree. Both engines are single-threaded (no BLAS, no thread pool), so CPU time is
one core's time, as in a Louvain worker process. From the mean CPU time per graph it derives the
images/s that W such workers would sustain (W / seconds per graph), if nothing else limited them.

    python scripts/benchmark_louvain.py                        # seeded random ViT-S, 42 images
    python scripts/benchmark_louvain.py --limit 10 --json louvain.json
    python scripts/benchmark_louvain.py --patches 8 --weights dino_deitsmall8_pretrain.pth

Random-weight ViTs give very dense graphs (67-100 % of pairs connected); real DINO weights give
sparser ones, so pass ``--weights`` (one patch size at a time) for production-like numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SUIM_IMAGES = REPO.parent / "shared" / "data" / "suim-sample" / "train_val" / "images"
WORKERS = (1, 2, 4, 8, 16)
IMAGE_SIZE = 224


def patch_graphs(
    images: Sequence[Path],
    backbone: str,
    seed: int = 0,
    weights: str | None = None,
    depth: int | None = None,
    batch_size: int = 8,
) -> list[np.ndarray]:
    """Boolean patch graphs ``(k k^T) > 0`` of ``images``, as datus builds them.

    Images are resized to 224 x 224 (bicubic) and normalised for the backbone; the keys are the
    last block's (heads concatenated, prefix tokens dropped), the product is taken in float32.

    Args:
        images: image files.
        backbone: timm ViT name, e.g. ``vit_small_patch8_224``.
        seed: ``torch.manual_seed`` before building the random network.
        weights: a state-dict file for the backbone; random weights when None.
        depth: number of blocks (fewer than the model's makes test networks fast).
        batch_size: images per forward pass.
    """
    import torch
    import torchvision.transforms.v2.functional as TF
    from PIL import Image

    from datus.discovery.backbones import RANDOM_WEIGHTS, LastBlockKeys, build_backbone, load_frozen_weights, normalization_of
    from datus.discovery.ops import key_adjacency

    torch.manual_seed(seed)
    overrides: dict[str, Any] = {} if depth is None else {"depth": depth}
    model = build_backbone(backbone, weights or RANDOM_WEIGHTS, **overrides)
    if weights is not None:
        load_frozen_weights(model, backbone, weights)
    model.eval().requires_grad_(False)
    keys = LastBlockKeys(model)
    mean, std = normalization_of(backbone)
    graphs: list[np.ndarray] = []
    for start in range(0, len(images), batch_size):
        batch = []
        for path in images[start : start + batch_size]:
            with Image.open(path) as image:
                tensor = TF.pil_to_tensor(image.convert("RGB"))
            resized = TF.resize(
                tensor, [IMAGE_SIZE, IMAGE_SIZE], interpolation=TF.InterpolationMode.BICUBIC, antialias=True
            )
            batch.append(TF.normalize(TF.to_dtype(resized, torch.float32, scale=True), mean, std))
        with torch.no_grad(), keys.capture():
            model(torch.stack(batch))
        patch_keys, _ = keys.keys_and_attention()
        graphs.extend(key_adjacency(patch_keys).numpy())
    return graphs


def same_partition(first: np.ndarray, second: np.ndarray) -> bool:
    """True when two labelings group the nodes identically (label values may differ)."""
    pairs = set(zip(first.tolist(), second.tolist()))
    return len(pairs) == len(set(first.tolist())) == len(set(second.tolist()))


def scikit_network_labels(adjacency: np.ndarray, resolution: float) -> np.ndarray:
    """The reference, exactly as ``datus.discovery.communities`` called it (CSR built from the dense matrix)."""
    from scipy import sparse
    from sknetwork.clustering import Louvain

    return np.asarray(
        Louvain(resolution=resolution).fit_predict(sparse.csr_matrix(adjacency, dtype=np.float64)), dtype=np.int64
    )


def cpu_seconds(function: Any, adjacency: np.ndarray, resolution: float, repeat: int) -> tuple[float, np.ndarray]:
    """Median CPU seconds of ``repeat`` calls, and the labels of the last."""
    times = []
    for _ in range(repeat):
        started = time.process_time()
        labels = function(adjacency, resolution)
        times.append(time.process_time() - started)
    return statistics.median(times), labels


def compile_seconds() -> tuple[float, float]:
    """numba's one-off compile in a fresh cache, then a new process's load of that cache.

    The second number is what each spawned Louvain worker pays at its first graph.
    """
    probe = (
        "import time, numpy as np; t = time.perf_counter(); from datus.discovery.louvain import louvain; "
        "louvain(np.eye(4, dtype=bool) | np.eye(4, k=1, dtype=bool)); print(time.perf_counter() - t)"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache, "PYTHONPATH": str(REPO)}
        seconds = []
        for _ in range(2):
            result = subprocess.run(
                [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True, cwd=REPO
            )
            seconds.append(float(result.stdout.strip().splitlines()[-1]))
    return seconds[0], seconds[1]


def summarise(name: str, sk_times: list[float], new_times: list[float], same: int, identical: int) -> dict[str, Any]:
    """Per-size numbers: ms per graph for both engines, their ratio, agreement, images/s per W workers."""
    sk_mean, new_mean = statistics.fmean(sk_times), statistics.fmean(new_times)
    return {
        "graphs": name,
        "count": len(sk_times),
        "sknetwork_ms_mean": 1e3 * sk_mean,
        "sknetwork_ms_median": 1e3 * statistics.median(sk_times),
        "datus_ms_mean": 1e3 * new_mean,
        "datus_ms_median": 1e3 * statistics.median(new_times),
        "ratio_of_means": new_mean / sk_mean,
        "same_partition": same,
        "same_labels": identical,
        "images_per_s": {
            str(workers): {"sknetwork": workers / sk_mean, "datus": workers / new_mean} for workers in WORKERS
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=SUIM_IMAGES, help="folder of images (default: SUIM sample)")
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    parser.add_argument("--patches", type=int, nargs="+", default=[16, 8], choices=[8, 16])
    parser.add_argument("--weights", default=None, help="state-dict file for the backbone (default: random)")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the random backbone")
    parser.add_argument("--resolution", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per graph and engine (median kept)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(os.cpu_count() or 1)  # keys only; the Louvain timings below are single-thread
    paths = sorted(path for path in args.images.iterdir() if path.suffix.lower() in {".jpg", ".jpeg", ".png"})
    paths = paths[: args.limit]
    if not paths:
        raise SystemExit(f"no images in {args.images}")

    fresh_compile, cached_load = compile_seconds()
    print(f"numba compile (fresh cache): {fresh_compile:.2f} s; a new process loading the cache: {cached_load:.2f} s")

    from datus.discovery.louvain import louvain

    results: dict[str, Any] = {
        "images": str(args.images),
        "weights": args.weights or f"random (seed {args.seed})",
        "repeat": args.repeat,
        "compile_s": fresh_compile,
        "cache_load_s": cached_load,
        "sizes": [],
    }
    for patch in args.patches:
        backbone = f"vit_small_patch{patch}_224"
        started = time.perf_counter()
        graphs = patch_graphs(paths, backbone, seed=args.seed, weights=args.weights)
        nodes = graphs[0].shape[0]
        density = float(np.mean([graph.mean() for graph in graphs]))
        print(
            f"\n{backbone}: {len(graphs)} graphs of {nodes} nodes, {100 * density:.0f} % of pairs connected "
            f"(keys in {time.perf_counter() - started:.1f} s)"
        )
        louvain(graphs[0], args.resolution)
        scikit_network_labels(graphs[0], args.resolution)
        sk_times, new_times, same, identical = [], [], 0, 0
        print(f"{'image':<28} {'sknetwork ms':>12} {'datus ms':>9} {'ratio':>7}  same")
        for path, graph in zip(paths, graphs):
            sk_seconds, reference = cpu_seconds(scikit_network_labels, graph, args.resolution, args.repeat)
            new_seconds, labels = cpu_seconds(louvain, graph, args.resolution, args.repeat)
            sk_times.append(sk_seconds)
            new_times.append(new_seconds)
            agrees = same_partition(reference, labels)
            same += agrees
            identical += bool(np.array_equal(reference, labels))
            print(
                f"{path.name[:28]:<28} {1e3 * sk_seconds:>12.2f} {1e3 * new_seconds:>9.3f} "
                f"{new_seconds / sk_seconds:>7.3f}  {'yes' if agrees else 'NO'}"
            )
        summary = summarise(f"{nodes} nodes ({backbone})", sk_times, new_times, same, identical)
        summary["density"] = density
        results["sizes"].append(summary)
        print(
            f"{nodes} nodes: scikit-network {summary['sknetwork_ms_mean']:.2f} ms/graph "
            f"(median {summary['sknetwork_ms_median']:.2f}), datus.discovery.louvain {summary['datus_ms_mean']:.3f} ms/graph "
            f"(median {summary['datus_ms_median']:.3f}); ratio of means {summary['ratio_of_means']:.4f} "
            f"(1/{1 / summary['ratio_of_means']:.0f}); same partition {same}/{len(graphs)}, "
            f"same labels {identical}/{len(graphs)}"
        )
        print("  images/s with W Louvain workers: " + ", ".join(
            f"W={w}: {v['sknetwork']:.0f} -> {v['datus']:.0f}" for w, v in summary["images_per_s"].items()
        ))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
