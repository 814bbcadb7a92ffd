"""Seconds per image and peak memory of the dense-CRF refinement (``datus.stages.crf``).

Two measurements, each run in fresh child processes so that peak RSS means one thing:

- images (default): the SUIM sample at original resolution (mostly 640 x 480), K = 6, made-up
  soft inputs (a 16 px patch grid cut into random blocks of patches, random centroid distances),
  through ``refine_many`` in one process and with ``--workers`` spawn workers;
- ``--memory``: one synthetic image per size (``--megapixels``) refined at full size (no
  pixel budget; with ``--budgeted``, the default budget), to see how peak RSS grows with
  pixels and choose ``max_pixels``.

    python scripts/benchmark_crf.py [--data ../shared/data/suim-sample/train_val/images] [--json]
    python scripts/benchmark_crf.py --memory --megapixels 0.3 1 2 4 8 12 [--clusters 27] [--budgeted] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datus.stages.crf import (  # noqa: E402
    CRFJob,
    CRFParams,
    refine_many,
    refine_segments,
    segment_probabilities,
    working_size,
)

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "suim-sample" / "train_val" / "images"
PATCH = 16
BLOCK = 4  # patches per random segment block side


def made_up_inputs(size: tuple[int, int], num_clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """S x K segment probabilities and an h x w segment map for an image of ``size`` (H, W)."""
    rng = np.random.default_rng(seed)
    grid_h, grid_w = max(1, size[0] // PATCH), max(1, size[1] // PATCH)
    rows, cols = np.arange(grid_h)[:, None] // BLOCK, np.arange(grid_w)[None, :] // BLOCK
    blocks_w = -(-grid_w // BLOCK)
    segment_map = (rows * blocks_w + cols).astype(np.int32)
    num_segments = int(segment_map.max()) + 1
    # Distances as between unit vectors (d^2 in [0, 4]), one clearly nearest centroid per segment.
    distances = rng.uniform(1.0, 2.0, size=(num_segments, num_clusters))
    distances[np.arange(num_segments), rng.integers(0, num_clusters, num_segments)] = rng.uniform(0.2, 0.9, num_segments)
    return segment_probabilities(distances), segment_map


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """High-water resident memory of this process (or of its largest finished child), MB."""
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    """User + system CPU time so far (of this process, or of its finished children)."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def load_average() -> float:
    """One-minute load average: other work on the machine inflates wall-clock seconds."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def current_rss_mb() -> float:
    """Resident memory of this process now, MB (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def run_images(data: Path, workers: int, num_clusters: int, limit: int | None) -> dict:
    from PIL import Image

    paths = sorted(data.glob("*.jpg"))[:limit]
    sizes = []
    for path in paths:
        with Image.open(path) as image:
            sizes.append((image.height, image.width))  # SUIM JPEGs carry no EXIF rotation
    jobs = [CRFJob(path, *made_up_inputs(size, num_clusters, seed)) for seed, (path, size) in enumerate(zip(paths, sizes))]
    if workers <= 1:  # import the decoder before the clock starts, as a warm worker would have
        import datus.datamodules.images  # noqa: F401
    base_rss = current_rss_mb()
    load_before, cpu_before = load_average(), cpu_seconds() + cpu_seconds(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    labels = list(refine_many(jobs, CRFParams(), workers=workers))
    seconds = time.perf_counter() - started
    cpu = cpu_seconds() + cpu_seconds(resource.RUSAGE_CHILDREN) - cpu_before  # workers: with their imports
    assert all(label.shape == size for label, size in zip(labels, sizes))
    pixels = [h * w for h, w in sizes]
    return {
        "mode": "single process" if workers <= 1 else f"{workers} workers",
        "images": len(paths),
        "median_megapixels": float(np.median(pixels)) / 1e6,
        "mean_megapixels": float(np.mean(pixels)) / 1e6,
        "seconds": seconds,
        "seconds_per_image": seconds / len(paths),
        "images_per_second": len(paths) / seconds,
        "cpu_seconds_per_image": cpu / len(paths),
        "load_average": max(load_before, load_average()),
        "peak_rss_mb_main": peak_rss_mb(),
        "rss_mb_main_after_imports": base_rss,
        "peak_rss_mb_largest_worker": peak_rss_mb(resource.RUSAGE_CHILDREN) if workers > 1 else None,
    }


def run_memory(megapixels: float, num_clusters: int, budgeted: bool) -> dict:
    height = int(round((megapixels * 1e6 * 3 / 4) ** 0.5))
    width = int(round(megapixels * 1e6 / height))
    rng = np.random.default_rng(0)
    # Flat-coloured 64 px tiles with noise: a busy but realistic colour lattice.
    tiles = rng.integers(0, 256, size=(-(-height // 64), -(-width // 64), 3), dtype=np.uint8)
    image = np.repeat(np.repeat(tiles, 64, 0), 64, 1)[:height, :width]
    image = np.clip(image.astype(np.int16) + rng.integers(-8, 9, image.shape, dtype=np.int16), 0, 255).astype(np.uint8)
    probs, segment_map = made_up_inputs((height, width), num_clusters, 0)
    base_rss = current_rss_mb()
    load_before, cpu_before = load_average(), cpu_seconds()
    started = time.perf_counter()
    params = CRFParams() if budgeted else CRFParams(max_pixels=height * width)
    labels = refine_segments(image, probs, segment_map, params)
    seconds = time.perf_counter() - started
    cpu = cpu_seconds() - cpu_before
    assert labels.shape == (height, width)
    peak = peak_rss_mb()
    return {
        "megapixels": height * width / 1e6,
        "size": f"{width}x{height}",
        "crf_size": "x".join(map(str, working_size((height, width), params.max_pixels)[::-1])),
        "seconds": seconds,
        "cpu_seconds": cpu,
        "load_average": max(load_before, load_average()),
        "rss_mb_before": base_rss,
        "peak_rss_mb": peak,
        "bytes_per_pixel_above_base": (peak - base_rss) * 2**20 / (height * width),
    }


def child(args: list[str]) -> dict:
    """Run this script in a fresh interpreter for one measurement; its JSON result."""
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"benchmark child {args} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of .jpg images")
    parser.add_argument("--workers", type=int, default=2, help="workers for the parallel run")
    parser.add_argument("--clusters", type=int, default=6, help="K")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images")
    parser.add_argument("--memory", action="store_true", help="peak RSS against image size instead")
    parser.add_argument("--megapixels", type=float, nargs="+", default=[0.3, 1, 2, 4, 8, 12])
    parser.add_argument(
        "--budgeted", action="store_true", help="with --memory: keep the default pixel budget (downscale above it)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--child", choices=["images", "memory"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "images":
        print(json.dumps(run_images(args.data, args.workers, args.clusters, args.limit)))
        return
    if args.child == "memory":
        print(json.dumps(run_memory(args.megapixels[0], args.clusters, args.budgeted)))
        return

    common = ["--clusters", str(args.clusters)]
    if args.memory:
        budget = ["--budgeted"] if args.budgeted else []
        rows = [child(["--child", "memory", "--megapixels", str(mp), *budget, *common]) for mp in args.megapixels]
        columns = ["size", "crf_size", "megapixels", "seconds", "cpu_seconds", "load_average", "rss_mb_before", "peak_rss_mb", "bytes_per_pixel_above_base"]
    else:
        data = ["--data", str(args.data), *(["--limit", str(args.limit)] if args.limit else []), *common]
        rows = [child(["--child", "images", "--workers", str(workers), *data]) for workers in (1, args.workers)]
        columns = [
            "mode",
            "images",
            "median_megapixels",
            "mean_megapixels",
            "seconds_per_image",
            "images_per_second",
            "cpu_seconds_per_image",
            "load_average",
            "rss_mb_main_after_imports",
            "peak_rss_mb_main",
            "peak_rss_mb_largest_worker",
        ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    table = [[_cell(row[column]) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in table)) for i, column in enumerate(columns)]
    print("  ".join(column.ljust(width) for column, width in zip(columns, widths)))
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 100 else f"{value:.0f}"
    return str(value)


if __name__ == "__main__":
    main()
